"""The ranking losses against pytorch-metric-learning 2.9 (values and gradients, float64), and against
loops written here from the papers where PML has a bug.

The losses are called through ``compute`` (what ``forward`` runs after casting to float32), so
that both sides compute in float64 and agree to ~1e-12 whatever the summation order."""

import math

import numpy as np
import pytest
import torch

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.testing import check_plugin
from dmlkit_plugins import ranking_losses
from dmlkit_plugins.ranking_losses import (
    DynamicSoftMarginLoss,
    FastAPLoss,
    HistogramLoss,
    PNPLoss,
    SmoothAPLoss,
    ThresholdConsistentMarginLoss,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

F = torch.nn.functional
SEEDS = (0, 1, 2)


def batch(seed, n=24, d=8, classes=6, shuffle=True):
    """n embeddings (float64), n / classes per class, in random order unless ``shuffle=False``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n // classes)
    if shuffle:
        labels = labels[torch.randperm(n, generator=g)]
    return torch.randn(n, d, generator=g, dtype=torch.float64), labels


def ours(loss, emb, labels, indices=None, ref=None, ref_labels=None):
    """(value, gradient w.r.t. the embeddings) of a dmlkit loss in float64."""
    x = emb.clone().requires_grad_(True)
    r = None if ref is None else ref.clone().requires_grad_(True)
    value = loss.compute(x, labels, r, ref_labels, indices)
    value.backward()
    return value.detach(), x.grad


def theirs(loss, emb, labels, indices=None, ref=None, ref_labels=None):
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels, indices, ref, ref_labels)
    value.backward()
    return value.detach(), x.grad


def assert_same(a, b, tol=1e-10):
    (va, ga), (vb, gb) = a, b
    assert float(va) == pytest.approx(float(vb), rel=tol, abs=tol)
    torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


def mined(emb, labels, kind):
    """A PML miner's output on the batch: triplets, or pairs."""
    if kind == "triplets":
        return pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")(emb, labels)
    return pml_miners.PairMarginMiner(pos_margin=0.9, neg_margin=1.2)(emb, labels)


# ------------------------------------------------------------------------------------------ FastAP
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_bins", [10, 25])
@pytest.mark.parametrize("mining", [None, "triplets", "pairs"])
def test_fastap_equals_pml(seed, num_bins, mining):
    emb, labels = batch(seed)
    idx = None if mining is None else mined(emb, labels, mining)
    assert idx is None or len(idx[0]) > 0
    assert_same(ours(FastAPLoss(num_bins), emb, labels, idx), theirs(pml_losses.FastAPLoss(num_bins), emb, labels, idx))


# --------------------------------------------------------------------------------------- Smooth-AP
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.01, 0.1])
@pytest.mark.parametrize("mining", [None, "triplets"])
def test_smooth_ap_equals_pml_on_a_class_sorted_batch_with_as_many_classes_as_samples_per_class(
    seed, temperature, mining
):
    emb, labels = batch(seed, n=25, classes=5, shuffle=False)
    idx = None if mining is None else mined(emb, labels, mining)
    # PML accumulates the AP in a float32 tensor whatever the input dtype: float32 tolerance
    assert_same(
        ours(SmoothAPLoss(temperature), emb, labels, idx),
        theirs(pml_losses.SmoothAPLoss(temperature), emb, labels, idx),
        tol=1e-6,
    )


def smooth_ap_loop(emb, labels, tau):
    """Smooth-AP from the paper (and the authors' code: the query counts among its positives),
    one query and one positive at a time."""
    x = F.normalize(emb, dim=1)
    sim = x @ x.T
    n = len(emb)
    total = 0.0
    for i in range(n):
        group = (labels == labels[i]).nonzero()[:, 0].tolist()
        ap = 0.0
        for j in group:
            others = torch.tensor([k for k in range(n) if k != j])
            members = torch.tensor([k for k in group if k != j], dtype=torch.long)
            pos_rank = 1 + torch.sigmoid((sim[i, members] - sim[i, j]) / tau).sum()
            all_rank = 1 + torch.sigmoid((sim[i, others] - sim[i, j]) / tau).sum()
            ap = ap + pos_rank / all_rank
        total = total + (1 - ap / len(group))
    return total / n


@pytest.mark.parametrize("seed", SEEDS)
def test_smooth_ap_follows_the_paper_in_any_batch_order_where_pml_does_not(seed):
    """PML bug (no PML issue found): SmoothAPLoss reshapes the batch into blocks of P = number of
    classes items and treats each block as a class, ignoring the labels; it is right only for a
    class-sorted batch with m == P. dmlkit uses the labels."""
    emb, labels = batch(seed, n=24, classes=6)  # m = 4 per class, P = 6 classes, shuffled
    x = emb.clone().requires_grad_(True)
    expected = smooth_ap_loop(x, labels, 0.05)
    expected.backward()
    assert_same(ours(SmoothAPLoss(0.05), emb, labels), (expected.detach(), x.grad))
    # the loss does not depend on the batch order
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(seed))
    assert float(ours(SmoothAPLoss(0.05), emb[perm], labels[perm])[0]) == pytest.approx(float(expected), rel=1e-12)
    # what PML computes instead: blocks of 6 consecutive items as classes
    sorted_emb = emb[torch.argsort(labels, stable=True)]
    blocks = torch.arange(4).repeat_interleave(6)
    pml = pml_losses.SmoothAPLoss(0.05)(sorted_emb, torch.sort(labels).values)
    assert float(pml) == pytest.approx(float(ours(SmoothAPLoss(0.05), sorted_emb, blocks)[0]), rel=1e-6)
    assert abs(float(pml) - float(expected)) > 1e-3


def test_smooth_ap_refuses_a_batch_with_unequal_classes_naming_the_sampler():
    emb, _ = batch(0, n=10, classes=5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"same number of samples of every class.*\[3, 4\].*m_per_class"):
        SmoothAPLoss()(emb.float(), labels)


# --------------------------------------------------------------------------------------------- PNP
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", PNPLoss.VARIANTS)
def test_pnp_equals_pml(seed, variant):
    emb, labels = batch(seed)
    kw = {"b": 3.0, "alpha": 2.0, "anneal": 0.05}
    assert_same(
        ours(PNPLoss(variant=variant, **kw), emb, labels),
        theirs(pml_losses.PNPLoss(variant=variant, **kw), emb, labels),
    )


def pnp_loop(emb, labels, pos_pairs, neg_pairs, anneal):
    """PNP-O over given (anchor, positive) and (anchor, negative) pairs, one anchor and one positive
    at a time; each anchor with a positive is also its own positive."""
    x = F.normalize(emb, dim=1)
    sim = x @ x.T
    per_anchor = []
    for i in range(len(emb)):
        positives = [j for (a, j) in pos_pairs if a == i]
        if not positives:
            continue
        negatives = torch.tensor([k for (a, k) in neg_pairs if a == i], dtype=torch.long)
        ranks = [
            (1 / (1 + torch.exp((-(sim[i, negatives] - sim[i, j]) / anneal).clamp(-50, 50)))).sum()
            for j in [*positives, i]
        ]
        per_anchor.append(sum(ranks) / len(ranks))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["triplets", "pairs"])
def test_pnp_with_mined_indices_ranks_only_the_mined_pairs(seed, kind):
    """PML refuses mined indices; dmlkit restricts positives and negatives to them."""
    emb, labels = batch(seed)
    idx = mined(emb, labels, kind)
    a1, p, a2, n = (idx[0], idx[1], idx[0], idx[2]) if kind == "triplets" else idx
    x = emb.clone().requires_grad_(True)
    expected = pnp_loop(x, labels, set(zip(a1.tolist(), p.tolist())), set(zip(a2.tolist(), n.tolist())), 0.05)
    expected.backward()
    assert_same(ours(PNPLoss(anneal=0.05), emb, labels, idx), (expected.detach(), x.grad))
    # without indices the same loop over every pair is PML's value
    everything = [(i, j) for i in range(24) for j in range(24) if i != j]
    same = {(i, j) for i, j in everything if labels[i] == labels[j]}
    full = pnp_loop(emb, labels, same, set(everything) - same, 0.05)
    assert float(full) == pytest.approx(float(pml_losses.PNPLoss(anneal=0.05)(emb, labels)), rel=1e-10)


# --------------------------------------------------------------------------------------- histogram
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [{}, {"n_bins": 40}, {"delta": 0.05}])
@pytest.mark.parametrize("mining", [None, "triplets", "pairs"])
def test_histogram_equals_pml(seed, bins, mining):
    emb, labels = batch(seed)
    idx = None if mining is None else mined(emb, labels, mining)
    # PML computes the bin offsets r * delta in float32 whatever the input dtype (a long tensor times a
    # float): its float64 values are off by ~1e-8 / delta relative; dmlkit computes them in the input dtype
    assert_same(
        ours(HistogramLoss(**bins), emb, labels, idx), theirs(pml_losses.HistogramLoss(**bins), emb, labels, idx), 1e-5
    )


def test_histogram_puts_a_similarity_of_one_in_the_top_bin():
    """Duplicate embeddings (similarity 1) make PML index past its histogram; the paper's
    estimate puts them in the top bin: the loss is then P(s_neg >= s_pos) by linear interpolation."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # positives: s = 1 (top node) and s = 0.6; negatives: 1.0*0.6, 0, 0.6, 0 -> all below 1
    value, _ = ours(HistogramLoss(n_bins=10), emb, labels)
    x = F.normalize(emb, dim=1)
    sim = (x @ x.T).numpy()
    nodes = np.linspace(-1, 1, 11)

    def density(values):
        d = np.zeros(11)
        for s in values:
            d += np.maximum(0, 1 - np.abs(s - nodes) / 0.2)
        return d / len(values)

    pos = [sim[0, 1], sim[2, 3]]
    neg = [sim[i, j] for i in range(4) for j in range(i + 1, 4) if labels[i] != labels[j]]
    assert float(value) == pytest.approx(float((density(neg) * np.cumsum(density(pos))).sum()), abs=1e-12)


def test_histogram_options_are_checked():
    with pytest.raises(OptionError, match="delta must be 2 / n_bins"):
        HistogramLoss(n_bins=10, delta=0.5)
    assert HistogramLoss(n_bins=10, delta=0.2).delta == pytest.approx(0.2)
    assert HistogramLoss().nodes == 101


# --------------------------------------------------------------------------------------------- TCM
TCM_OPTIONS = {"lambda_plus": 0.7, "lambda_minus": 1.3, "margin_plus": 0.2, "margin_minus": -0.1}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mining", [None, "triplets", "pairs"])
def test_threshold_consistent_margin_equals_pml(seed, mining):
    emb, labels = batch(seed)
    idx = None if mining is None else mined(emb, labels, mining)
    assert_same(
        ours(ThresholdConsistentMarginLoss(**TCM_OPTIONS), emb, labels, idx),
        theirs(pml_losses.ThresholdConsistentMarginLoss(**TCM_OPTIONS), emb, labels, idx),
    )


def test_threshold_consistent_margin_counts_repeated_mined_pairs_as_pml_does():
    emb, labels = batch(3)
    a1, p, a2, n = mined(emb, labels, "pairs")
    idx = (a1.repeat(3)[:-2], p.repeat(3)[:-2], a2.repeat(2)[:-1], n.repeat(2)[:-1])
    assert_same(
        ours(ThresholdConsistentMarginLoss(**TCM_OPTIONS), emb, labels, idx),
        theirs(pml_losses.ThresholdConsistentMarginLoss(**TCM_OPTIONS), emb, labels, idx),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_consistent_margin_takes_pairs_from_the_reference_set(seed):
    """PML bug (no PML issue found): with ref_emb, ThresholdConsistentMarginLoss indexes the batch
    with the reference set's indices. dmlkit compares each anchor with the reference items."""
    emb, labels = batch(seed, n=12, classes=3)
    ref, ref_labels = batch(seed + 10, n=18, classes=3)
    x = emb.clone().requires_grad_(True)
    sim = F.normalize(x, dim=1) @ F.normalize(ref, dim=1).T
    same = labels[:, None] == ref_labels[None, :]
    pos, neg = sim[same], sim[~same]
    o = TCM_OPTIONS
    pos_in, neg_in = pos[pos <= o["margin_plus"]], neg[neg >= o["margin_minus"]]
    expected = (
        o["lambda_plus"] * (o["margin_plus"] - pos_in).mean() + o["lambda_minus"] * (neg_in - o["margin_minus"]).mean()
    )
    expected.backward()
    got = ours(ThresholdConsistentMarginLoss(**o), emb, labels, ref=ref, ref_labels=ref_labels)
    assert_same(got, (expected.detach(), x.grad))


# ------------------------------------------------------------------------------ dynamic soft margin
def dsm_loop(steps, min_val=-2.0, num_bins=10, momentum=0.01):
    """The dynamic soft margin from the paper: a running histogram of x = d(a,p) - d(a,n) over all
    triplets, linearly interpolated onto num_bins nodes (an x past the last node on the last),
    CDF weights held constant; yields (value, gradient) per step."""
    delta = 2 * abs(min_val) / num_bins
    hist = None
    for emb, labels in steps:
        x_emb = emb.clone().requires_grad_(True)
        d = torch.cdist(F.normalize(x_emb, dim=1), F.normalize(x_emb, dim=1))
        xs = [
            d[a, p] - d[a, n]
            for a in range(len(labels))
            for p in range(len(labels))
            for n in range(len(labels))
            if a != p and labels[a] == labels[p] and labels[a] != labels[n]
        ]
        new = np.zeros(num_bins)
        for x in xs:
            t = (float(x) - min_val) / delta
            lo = math.floor(t)
            new[min(max(lo, 0), num_bins - 1)] += 1 - (t - lo)
            new[min(max(lo + 1, 0), num_bins - 1)] += t - lo
        hist = new if hist is None else (1 - momentum) * hist + momentum * new
        hist = hist / hist.sum()
        cdf = np.cumsum(hist)
        weights = [cdf[min(max(math.floor((float(x) - min_val) / delta), 0), num_bins - 1)] for x in xs]
        value = sum(w * x for w, x in zip(weights, xs)) / len(xs)
        value.backward()
        yield value.detach(), x_emb.grad


def test_dynamic_soft_margin_equals_pml_in_value_and_the_paper_in_gradient_over_several_steps():
    """PML issue #731 (https://github.com/KevinMusgrave/pytorch-metric-learning/issues/731):
    DynamicSoftMarginLoss keeps its running histogram in the autograd graph, so the second
    backward fails. dmlkit holds the histogram constant (the authors' code detaches it): the
    values equal PML's at every step, the gradients are CDF(x) dx, the paper's."""
    steps = [batch(seed, n=16, d=6, classes=4) for seed in range(4)]
    loss, pml = DynamicSoftMarginLoss(), pml_losses.DynamicSoftMarginLoss()
    for (emb, labels), expected in zip(steps, dsm_loop(steps)):
        got = ours(loss, emb, labels)
        assert_same(got, expected)
        assert float(got[0]) == pytest.approx(float(pml(emb, labels)), rel=1e-10)
        torch.testing.assert_close(loss.hist, pml.hist_.detach(), rtol=1e-10, atol=1e-12)
        pml.hist_ = pml.hist_.detach()  # the fix for #731, so PML can go on
    assert "hist" in loss.state_dict()  # the running histogram is saved with checkpoints


def test_pml_dynamic_soft_margin_fails_at_the_second_backward():
    """The PML bug the test above names (if PML fixes it, revisit the gradient difference)."""
    pml = pml_losses.DynamicSoftMarginLoss()
    for seed in range(2):
        emb, labels = batch(seed, n=16, d=6, classes=4)
        value = pml(emb.clone().requires_grad_(True), labels)
        if seed == 0:
            value.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        value.backward()


def test_dynamic_soft_margin_puts_an_x_past_the_last_node_on_it():
    """In 2-D, d(a,p) - d(a,n) reaches past -min_val - delta = 1.6 (PML raises an index error)."""
    emb = torch.tensor(
        [[1.0, 0.0], [-1.0, 0.05], [0.9, 0.1], [-0.9, 0.2], [0.0, 1.0], [0.1, -1.0]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = DynamicSoftMarginLoss()
    for step, expected in enumerate(dsm_loop([(emb, labels), (emb.flip(0), labels)])):
        got = ours(loss, *((emb, labels) if step == 0 else (emb.flip(0), labels)))
        assert_same(got, expected)


@pytest.mark.parametrize("mining", ["triplets", "pairs", "reference"])
def test_dynamic_soft_margin_with_mined_indices_or_a_reference_set_equals_pml_in_value(mining):
    emb, labels = batch(4, n=16, d=16, classes=4)  # in 16-D no x reaches PML's index error
    if mining == "reference":
        ref, ref_labels = batch(5, n=12, d=16, classes=4)
        kw = {"ref": ref, "ref_labels": ref_labels}
        expected = pml_losses.DynamicSoftMarginLoss()(emb, labels, None, ref, ref_labels)
    else:
        kw = {"indices": mined(emb, labels, mining)}
        expected = pml_losses.DynamicSoftMarginLoss()(emb, labels, kw["indices"])
    assert float(ours(DynamicSoftMarginLoss(), emb, labels, **kw)[0]) == pytest.approx(float(expected), rel=1e-10)


# ------------------------------------------------------------------------------------ all of them
RANKERS = {"fastap": FastAPLoss, "smooth_ap": SmoothAPLoss, "pnp": PNPLoss, "histogram": HistogramLoss}


@pytest.mark.parametrize("name", RANKERS)
def test_losses_that_rank_the_batch_refuse_a_reference_set(name):
    emb, labels = batch(0, n=16, classes=4)
    with pytest.raises(ValueError, match=f"{name} ranks each item against the rest of its own batch"):
        RANKERS[name]()(emb.float(), labels, emb.float(), labels)


@pytest.mark.parametrize(
    "name, labels",
    [
        ("fastap", [0, 1, 2, 3]),  # no positive pair
        ("pnp", [0, 1, 2, 3]),
        ("histogram", [0, 1, 2, 3]),
        ("dynamic_soft_margin", [0, 1, 2, 3]),
        ("histogram", [0, 0, 0, 0]),  # no negative pair: no triplet
        ("dynamic_soft_margin", [0, 0, 0, 0]),
        ("threshold_consistent_margin", [0]),  # no pair at all
    ],
)
def test_no_usable_pair_gives_a_zero_that_back_propagates(name, labels):
    emb = torch.randn(len(labels), 8, requires_grad=True)
    value = dmlkit.get_registry().build("loss", name)(emb, torch.tensor(labels))
    value.backward()
    assert float(value) == 0 and emb.grad is not None and float(emb.grad.abs().sum()) == 0


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("fastap", {"num_bins": 0}, "num_bins must be >= 1"),
        ("smooth_ap", {"temperature": 0}, "temperature must be > 0"),
        ("pnp", {"variant": "Dx"}, "variant must be one of Ds, Dq, Iu, Ib, O"),
        ("threshold_consistent_margin", {"margin_plus": 1.5}, r"margin_plus is a cosine similarity, in \[-1, 1\]"),
        ("dynamic_soft_margin", {"momentum": 0}, r"momentum must be in \(0, 1\]"),
        ("dynamic_soft_margin", {"min_val": 1.0}, "min_val must be < 0"),
    ],
)
def test_options_out_of_range_are_refused_naming_the_option(name, options, message):
    with pytest.raises(OptionError, match=message):
        dmlkit.get_registry().build("loss", name, **options)


def test_every_ranking_loss_passes_check_plugin_and_documents_each_option():
    report = check_plugin(ranking_losses, name="copy_of_ranking_losses", with_builtins=False)
    names = ["fastap", "smooth_ap", "pnp", "histogram", "threshold_consistent_margin", "dynamic_soft_margin"]
    assert sorted(report.components["loss"]) == sorted(names) and list(report.components) == ["loss"]
    reg = dmlkit.get_registry()
    for name in names:
        spec = reg.get("loss", name)
        helps = spec.option_help()
        assert set(helps) == set(spec.parameters()) and all(helps.values()), name


def test_a_ranking_loss_combines_with_a_pair_loss():
    emb, labels = batch(0, n=16, classes=4)
    emb = emb.float().requires_grad_(True)
    combined = dmlkit.get_registry().build(
        "loss", "combined", context={"num_classes": 4, "embedding_size": 8}, terms=["fastap", "contrastive"]
    )
    value = combined(emb, labels)
    expected = FastAPLoss()(emb, labels) + dmlkit.get_registry().build("loss", "contrastive")(emb, labels)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("name", ["threshold_consistent_margin", "dynamic_soft_margin"])
def test_ccp_wraps_the_losses_that_take_a_reference_set(name):
    """CCP calls its base with its proxies as the reference set, on unit-ball vectors (normalize off)."""
    ccp = dmlkit.get_registry().build("loss", "ccp", context={"num_classes": 4, "embedding_size": 8}, base=name)
    assert ccp.base.normalize is False
    emb, labels = batch(0, n=16, classes=4)
    emb = emb.float().requires_grad_(True)
    value = ccp(emb, labels)
    value.backward()
    assert torch.isfinite(value) and float(emb.grad.abs().sum()) > 0


def test_ccp_over_a_loss_without_reference_set_stops_with_its_message():
    ccp = dmlkit.get_registry().build("loss", "ccp", context={"num_classes": 4, "embedding_size": 8}, base="fastap")
    emb, labels = batch(0, n=16, classes=4)
    with pytest.raises(ValueError, match="fastap ranks each item against the rest of its own batch"):
        ccp(emb.float(), labels)


@pytest.mark.parametrize("name, what", [("fastap", "squared distances"), ("histogram", "dot products")])
def test_histogram_losses_refuse_unnormalised_values_they_cannot_bin(name, what):
    """Their histograms span [0, 4] (squared distances) or [-1, 1] (similarities): without
    normalisation, vectors outside the unit ball would fall off them unnoticed."""
    loss = dmlkit.get_registry().build("loss", name, normalize=False)
    emb, labels = batch(0, n=16, classes=4)
    with pytest.raises(ValueError, match=f"{name}: with normalize=False the {what} must lie in"):
        loss(emb.float() * 3, labels)
    inside = F.normalize(emb.float(), dim=1) * 0.9  # the unit ball: accepted
    assert torch.isfinite(loss(inside, labels))
