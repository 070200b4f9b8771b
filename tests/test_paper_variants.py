"""The papers' variants of two losses (issue 27): Ranked List Loss with constant pair weights (the
authors' Caffe layer, against a float64 loop written here) or weights back-propagated through (PML's
RankedListLoss), and ProxyNCA's named presets (the 2017 paper's form, ProxyNCA++)."""

import math
import warnings

import pytest
import torch

from dmlkit.config import resolve
from dmlkit.errors import OptionError
from dmlkit.plugins import get_host
from dmlkit_plugins.losses import RankedListLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")


def batch64(n=16, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.arange(n) % classes


def value_and_grad(loss, emb, *args):
    x = emb.clone().requires_grad_(True)
    value = loss(x, *args)
    value.backward()
    return float(value.detach()), x.grad


# ============================================================================ Ranked List Loss
def rll_authors_loop(emb, labels, ref, ref_labels, alpha, margin, t_pos, t_neg, lam):
    """The authors' layer, one anchor at a time: the violating positives (d > alpha - margin) and
    negatives (d < alpha) of the anchor's ranked list, each weighted by exp(T * violation) computed as a
    plain number (a constant for the backward pass), the weighted means mixed by lam; mean over anchors."""
    x = emb / emb.norm(dim=1, keepdim=True)
    y = x if ref is None else ref / ref.norm(dim=1, keepdim=True)
    y_labels = labels if ref is None else ref_labels
    total = 0
    for i in range(len(x)):
        terms = {"pos": [], "neg": []}
        for j in range(len(y)):
            if ref is None and j == i:
                continue
            d = (x[i] - y[j]).norm()
            if y_labels[j] == labels[i] and d > alpha - margin:
                violation = d - (alpha - margin)
                terms["pos"].append((math.exp(t_pos * float(violation.detach())), violation))
            elif y_labels[j] != labels[i] and d < alpha:
                violation = alpha - d
                terms["neg"].append((math.exp(t_neg * float(violation.detach())), violation))
        part = {}
        for kind, pairs in terms.items():
            weight_sum = sum(w for w, _ in pairs)
            part[kind] = sum(w * v for w, v in pairs) / weight_sum if pairs else 0
        total = total + (1 - lam) * part["pos"] + lam * part["neg"]
    return total / len(x)


@pytest.mark.parametrize(("t_pos", "t_neg"), [(0.0, 10.0), (2.0, 5.0)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_rll_by_default_holds_the_weights_constant_as_the_authors_layer(t_pos, t_neg, with_ref):
    emb, labels = batch64(seed=1)
    ref, ref_labels = batch64(n=10, seed=2) if with_ref else (None, None)
    ours = RankedListLoss(1.2, 0.4, t_pos, t_neg, 0.5)
    assert ours.backprop_weights is False
    v, g = value_and_grad(ours, emb, labels, ref, ref_labels)
    v_loop, g_loop = value_and_grad(
        lambda e, *_: rll_authors_loop(e, labels, ref, ref_labels, 1.2, 0.4, t_pos, t_neg, 0.5), emb
    )
    assert v == pytest.approx(v_loop, rel=1e-12)
    torch.testing.assert_close(g, g_loop, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("t_pos", "t_neg"), [(0.0, 10.0), (2.0, 5.0)])
def test_rll_backprop_weights_equals_pml(seed, t_pos, t_neg):
    """PML adds 1e-5 per batch item to each row's weight sum (every weight is >= 1 here), so the two
    agree to n * 1e-5 relative; the constant-weight mode is far from PML's gradient."""
    emb, labels = batch64(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PML warns about Tn > 5
        pml = pml_losses.RankedListLoss(margin=0.4, Tn=t_neg, imbalance=0.5, alpha=1.2, Tp=t_pos)
    v_pml, g_pml = value_and_grad(pml, emb, labels)
    v, g = value_and_grad(RankedListLoss(1.2, 0.4, t_pos, t_neg, 0.5, backprop_weights=True), emb, labels)
    tol = len(emb) * 1e-5
    assert v == pytest.approx(v_pml, rel=tol)
    scale = float(g_pml.abs().max())
    assert float((g - g_pml).abs().max()) < tol * scale
    _, g_const = value_and_grad(RankedListLoss(1.2, 0.4, t_pos, t_neg, 0.5), emb, labels)
    assert float((g_const - g_pml).abs().max()) > 0.05 * scale


# ============================================================================ ProxyNCA presets
def resolved_loss(**loss):
    cfg, _ = resolve({"loss": {"name": "proxynca", **loss}}, get_host().registry)
    return cfg


def test_proxynca_presets_resolve_to_their_options_and_yours_win():
    cfg = resolved_loss(preset="proxynca2017")
    assert (cfg["loss"]["scale"], cfg["loss"]["exclude_positive"], cfg["loss"]["proxy_lr_multiplier"]) == (1, True, 1)
    assert cfg["train"]["pooling"] == "avg"  # the 2017 preset sets the loss only
    cfg = resolved_loss(preset="proxynca++")
    assert (cfg["loss"]["scale"], cfg["loss"]["exclude_positive"], cfg["loss"]["proxy_lr_multiplier"]) == (
        3,
        False,
        100,
    )
    t = cfg["train"]
    assert (t["pooling"], t["head_norm"], t["embedding_size"], t["batch_size"]) == ("max", "layernorm", 2048, 32)
    assert cfg["sampler"]["name"] == "m_per_class" and cfg["sampler"]["m"] == 4  # 8 classes x 4
    cfg = resolved_loss(preset="proxynca2017", scale=2.0)
    assert cfg["loss"]["scale"] == 2.0 and cfg["loss"]["exclude_positive"] is True
    with pytest.raises(OptionError, match="proxynca preset must be one of none, proxynca2017, proxynca"):
        resolved_loss(preset="2017")


def build(cfg, classes=5, dim=8):
    options = {k: v for k, v in cfg["loss"].items() if k != "name"}
    context = {"num_classes": classes, "embedding_size": dim}
    return get_host().registry.build("loss", "proxynca", context=context, **options)  # float32 proxies


def test_the_2017_preset_is_the_papers_formula():
    """NCA with the positive proxy left out of the denominator, on unscaled unit vectors, one pair at a
    time in float64 (from the same float32 inputs; proxy banks compute in float32); gradients for the
    embeddings and the proxies; the proxies train at the base learning rate."""
    loss = build(resolved_loss(preset="proxynca2017"))
    assert loss.bank.lr_multiplier == 1.0
    emb, labels = batch64(n=12, classes=5, seed=4)
    emb = emb.float().requires_grad_(True)
    value = loss(emb, labels)
    value.backward()
    x = emb.detach().double().requires_grad_(True)
    p = loss.bank.vectors.detach().double().reshape(5, 8).requires_grad_(True)
    xs, ps = x / x.norm(dim=1, keepdim=True), p / p.norm(dim=1, keepdim=True)
    total = 0
    for i in range(len(xs)):
        d = [((xs[i] - ps[c]) ** 2).sum() for c in range(5)]
        negatives = sum(torch.exp(-d[c]) for c in range(5) if c != labels[i])
        total = total - torch.log(torch.exp(-d[labels[i]]) / negatives)
    (total / len(xs)).backward()
    assert float(value.detach()) == pytest.approx(float(total.detach() / len(xs)), rel=1e-5)
    torch.testing.assert_close(emb.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.bank.vectors.grad.double().reshape(5, 8), p.grad, rtol=1e-4, atol=1e-6)


def test_the_proxynca_plus_plus_preset_equals_pml():
    loss = build(resolved_loss(preset="proxynca++"))
    assert loss.bank.lr_multiplier == 100.0
    emb, labels = batch64(n=12, classes=5, seed=5)
    theirs = pml_losses.ProxyNCALoss(5, 8, softmax_scale=9)  # scale 3 on both sides: 9 on the squared distance
    theirs.proxies.data.copy_(loss.bank.vectors.detach().reshape(5, 8))
    v, g = value_and_grad(loss, emb.float(), labels)
    v_pml, g_pml = value_and_grad(theirs, emb.float(), labels)
    assert v == pytest.approx(v_pml, rel=1e-5)
    torch.testing.assert_close(g, g_pml, rtol=1e-4, atol=1e-6)


def test_a_preset_value_you_override_is_warned_about():
    cfg = resolved_loss(preset="proxynca2017", exclude_positive=False)
    with pytest.warns(UserWarning, match=r"preset=proxynca2017 sets exclude_positive=True, but this loss has "):
        build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(resolved_loss(preset="proxynca2017"))
        build(resolved_loss())
