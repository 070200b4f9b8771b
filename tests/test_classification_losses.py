"""The classification losses (plugins/classification_losses.py) against pytorch-metric-learning 2.9,
values and gradients in float64, and against loops written here from the papers where dmlkit goes
beyond PML (several vectors per class, SoftTriple's regulariser, the manifold loss's options).

The float64 comparisons call ``loss.compute`` (the maths, in the caller's dtype): ``loss(...)``
computes in float32, as every dmlkit loss does, which the float32 test below covers.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dmlkit
from dmlkit.errors import DmlkitError
from dmlkit.proxies import banks
from dmlkit.testing import check_plugin
from dmlkit_plugins import classification_losses as cl
from dmlkit_plugins.ccp import unit_ball

pml = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

C, D, N = 7, 12, 28
NAMES = [
    "arcface",
    "cosface",
    "sphereface",
    "large_margin_softmax",
    "subcenter_arcface",
    "normalized_softmax",
    "soft_triple",
    "p2sgrad",
    "manifold",
]


def batch(seed, n=N, d=D, classes=C):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randperm(n, generator=g) % classes  # every class present
    return emb, labels


def mine(emb, labels, form):
    """PML's mined pairs or triplets (counts per sample differ, so the weights are not uniform)."""
    if form is None:
        return None
    if form == "pairs":
        out = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    else:
        out = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb, labels)
    assert len(out[0]) > 0
    return out


# ---------------------------------------------------------------------- the PML twin of each loss
# name -> (dmlkit class, PML constructor, PML weight attribute, whether PML's weights are [D, C*K])
TWINS = {
    "arcface": (cl.ArcFaceLoss, lambda c, d, **o: pml.ArcFaceLoss(c, d, **o), "W", True),
    "cosface": (cl.CosFaceLoss, lambda c, d, **o: pml.CosFaceLoss(c, d, **o), "W", True),
    "sphereface": (cl.SphereFaceLoss, lambda c, d, **o: pml.SphereFaceLoss(c, d, **o), "W", True),
    "large_margin_softmax": (
        cl.LargeMarginSoftmaxLoss,
        lambda c, d, **o: pml.LargeMarginSoftmaxLoss(c, d, **o),
        "W",
        True,
    ),
    "subcenter_arcface": (
        cl.SubCenterArcFaceLoss,
        lambda c, d, **o: pml.SubCenterArcFaceLoss(num_classes=c, embedding_size=d, **o),
        "W",
        True,
    ),
    "normalized_softmax": (
        cl.NormalizedSoftmaxLoss,
        lambda c, d, **o: pml.NormalizedSoftmaxLoss(c, d, **o),
        "W",
        True,
    ),
    "soft_triple": (cl.SoftTripleLoss, lambda c, d, **o: pml.SoftTripleLoss(c, d, **o), "fc", True),
    "p2sgrad": (cl.P2SGradLoss, lambda c, d, **o: pml.P2SGradLoss(d, c, **o), "weight", True),
    "manifold": (cl.ManifoldLoss, lambda c, d, **o: pml.ManifoldLoss(d, K=c, **o), "proxies", False),
}

# options each loss is compared with, PML's defaults first
OPTIONS = {
    "arcface": [{}, {"margin": 15.0, "scale": 8.0}],
    "cosface": [{}, {"margin": 0.1, "scale": 10.0}],
    "sphereface": [{}, {"margin": 3, "scale": 2.0}],
    "large_margin_softmax": [{}, {"margin": 1}, {"margin": 2, "scale": 0.5}, {"margin": 3}],
    "subcenter_arcface": [{}, {"sub_centers": 2, "margin": 10.0, "scale": 16.0}],
    "normalized_softmax": [{}, {"temperature": 0.5}],
    "soft_triple": [{}, {"centers_per_class": 3, "la": 5.0, "gamma": 0.5, "margin": 0.2}],
    "p2sgrad": [{}],
    "manifold": [{}, {"lambdaC": 0.3, "alpha": 0.5, "margin": 0.01}],
}


def twins(name, options):
    """(dmlkit loss, PML loss) in float64 with the same weights."""
    ours_cls, theirs_fn, attr, transposed = TWINS[name]
    torch.manual_seed(0)
    ours = ours_cls(C, D, **options).double()
    theirs = theirs_fn(C, D, **options)
    w = ours.bank.vectors.detach().reshape(-1, D)
    getattr(theirs, attr).data = (w.T if transposed else w).contiguous().clone()
    return ours, theirs


def pml_weight_grad(name, theirs):
    _, _, attr, transposed = TWINS[name]
    g = getattr(theirs, attr).grad
    return g.T if transposed else g


def call_pml(name, theirs, emb, labels, indices):
    if name == "manifold":  # PML's manifold loss takes no labels: its proxy assignments come as indices_tuple
        assert indices is None
        return theirs(emb, indices_tuple=labels)
    return theirs(emb, labels, indices_tuple=indices)


def assert_close(a, b, what, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2, msg=lambda m: f"{what}: {m}")


def compare(name, ours, theirs, emb, labels, indices, tol=1e-8):
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    v1 = ours.compute(e1, labels, None, None, indices)
    v2 = call_pml(name, theirs, e2, labels, indices)
    v1.backward()
    v2.backward()
    assert_close(v1.detach(), v2.detach().reshape(()), "value", tol)
    assert_close(e1.grad, e2.grad, "embedding gradient", tol)
    assert_close(ours.bank.vectors.grad.reshape(-1, D), pml_weight_grad(name, theirs), "weight gradient", tol)
    return float(v1.detach())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "manifold"])
@pytest.mark.parametrize("form", [None, "pairs", "triplets"])
def test_equals_pml_with_and_without_mined_tuples(name, form):
    for options in OPTIONS[name]:
        for seed in (0, 1, 2) if not options else (3,):  # PML's defaults on three seeds, other options on one
            ours, theirs = twins(name, options)
            emb, labels = batch(seed)
            indices = mine(emb, labels, form)
            if name == "p2sgrad" and indices is not None:
                with pytest.raises(ValueError):  # PML refuses them; dmlkit weights the samples (tested below)
                    theirs(emb, labels, indices_tuple=indices)
                continue
            compare(name, ours, theirs, emb, labels, indices)


@pytest.mark.parametrize("options", OPTIONS["manifold"])
def test_manifold_equals_pml_with_the_labels_as_proxy_assignments(options):
    """PML inverts the graph matrix in float32 even for float64 input, hence the tolerance."""
    for seed in (0, 1, 2):
        ours, theirs = twins("manifold", options)
        emb, labels = batch(seed)
        compare("manifold", ours, theirs, emb, labels, None, tol=2e-5)


def test_pml_copies_see_the_same_vectors():
    """The weight layouts line up: PML's class c sub-center k is bank row (c, k)."""
    ours, theirs = twins("subcenter_arcface", {"sub_centers": 3})
    assert torch.equal(theirs.W[:, 2 * 3 + 1], ours.bank.vectors[2, 1].detach())
    ours, theirs = twins("soft_triple", {"centers_per_class": 4})
    assert torch.equal(theirs.fc[:, 5 * 4 + 3], ours.bank.vectors[5, 3].detach())


@pytest.mark.parametrize(
    "name", ["arcface", "cosface", "sphereface", "large_margin_softmax", "subcenter_arcface", "normalized_softmax"]
)
def test_get_logits_equal_pml(name):
    for options in OPTIONS[name]:
        ours, theirs = twins(name, options)
        emb, _ = batch(3)
        torch.testing.assert_close(ours.get_logits(emb), theirs.get_logits(emb), rtol=1e-10, atol=1e-12)


def test_the_classifiers_have_logits_and_manifold_has_none():
    reg = dmlkit.get_registry()
    for name in NAMES:
        loss = reg.build("loss", name, context={"num_classes": C, "embedding_size": D})
        if name == "manifold":  # its affinities depend on the batch: no class logits
            assert not hasattr(loss, "get_logits")
        else:
            logits = loss.get_logits(batch(21)[0].float())
            assert logits.shape == (N, C) and logits.dtype == torch.float32


def test_soft_triple_logits_equal_pml():
    ours, theirs = twins("soft_triple", {"centers_per_class": 3, "gamma": 0.5})
    emb, _ = batch(4)
    theirs.cast_types(torch.float64, emb.device)
    torch.testing.assert_close(ours.get_logits(emb), theirs.get_logits(emb), rtol=1e-10, atol=1e-12)


def test_p2sgrad_logits_are_the_clamped_cosines():
    ours, _ = twins("p2sgrad", {})
    emb, _ = batch(5)
    w = ours.bank.vectors.detach()[:, 0]
    expected = torch.stack([torch.stack([(x @ v) / x.norm() / v.norm() for v in w]) for x in emb]).clamp(-1, 1)
    torch.testing.assert_close(ours.get_logits(emb), expected, rtol=1e-10, atol=1e-12)


def test_p2sgrad_keeps_its_weights_on_the_unit_sphere_as_pml():
    ours, theirs = twins("p2sgrad", {})
    emb, labels = batch(6)
    with torch.no_grad():
        ours.bank.vectors.mul_(3.0)
        theirs.weight.mul_(3.0)
    compare("p2sgrad", ours, theirs, emb, labels, None)  # both project first: same value and gradients
    torch.testing.assert_close(ours.bank.vectors.detach().norm(dim=2), torch.ones(C, 1, dtype=torch.float64))


def test_miner_weights_are_pmls_convert_to_weights():
    from pytorch_metric_learning.utils.loss_and_miner_utils import convert_to_weights

    emb, labels = batch(7)
    for form in ("pairs", "triplets"):
        idx = mine(emb, labels, form)
        expected = convert_to_weights(idx, labels, dtype=torch.float64)
        torch.testing.assert_close(cl.miner_weights(idx, N, emb), expected)


@pytest.mark.parametrize("name", NAMES)
def test_empty_mined_tuples_give_a_connected_zero(name):
    """PML weights every sample 1 when the miner found nothing (as if there were no miner);
    dmlkit's losses return a zero that back-propagates, as its other losses do."""
    loss = dmlkit.get_registry().build("loss", name, context={"num_classes": C, "embedding_size": D})
    emb, labels = batch(8)
    emb = emb.float().requires_grad_(True)
    empty = torch.empty(0, dtype=torch.long)
    value = loss(emb, labels, indices=(empty, empty, empty))
    value.backward()
    assert float(value) == 0.0 and emb.grad is not None and not emb.grad.any()


@pytest.mark.parametrize("name", NAMES)
def test_a_reference_set_is_refused(name):
    loss = dmlkit.get_registry().build("loss", name, context={"num_classes": C, "embedding_size": D})
    emb, labels = batch(9)
    with pytest.raises(ValueError, match="takes no reference set"):
        loss(emb.float(), labels, emb.float(), labels)


@pytest.mark.parametrize("name", NAMES)
def test_float32_call_matches_float64_maths(name):
    """loss(...) in float32 (what training runs) agrees with the float64 maths."""
    loss = dmlkit.get_registry().build("loss", name, context={"num_classes": C, "embedding_size": D})
    emb, labels = batch(10)
    v32 = loss(emb.float(), labels)
    v64 = loss.double().compute(emb, labels, None, None, None)
    assert v32.dtype == torch.float32 and float(v32) == pytest.approx(float(v64), rel=1e-4, abs=1e-6)


# ------------------------------------------------------- beyond PML: loops written from the papers
def ref_p2sgrad(emb, labels, w, weights):
    """mean_i weight_i * mean_c (cos(x_i, w_c) - [c = y_i])^2 for unit-norm w (the gradient reaches w unprojected)."""
    total = 0
    for i in range(len(emb)):
        x = emb[i]
        sq = sum(((x @ w[c]) / x.norm() - float(c == labels[i])) ** 2 for c in range(len(w)))
        total = total + weights[i] * sq / len(w)
    return total / len(emb)


def test_p2sgrad_weights_samples_by_mined_tuples():
    ours, _ = twins("p2sgrad", {})
    emb, labels = batch(11)
    idx = mine(emb, labels, "pairs")
    weights = cl.miner_weights(idx, N, emb)
    assert len(set(weights.tolist())) > 2
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ours.project()  # in float64: the call below projects again, a no-op now
    w = ours.bank.vectors.detach()[:, 0].clone().requires_grad_(True)
    v1, v2 = ours.compute(e1, labels, None, None, idx), ref_p2sgrad(e2, labels, w, weights)
    v1.backward()
    v2.backward()
    assert float(v1) == pytest.approx(float(v2), rel=1e-10)
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(ours.bank.vectors.grad[:, 0], w.grad)


def ref_soft_triple_reg(centers):
    """The authors' regulariser: sum over same-class center pairs j < k of sqrt(2 + 1e-5 - 2 cos)
    divided by C K (K - 1)."""
    c, k, _ = centers.shape
    total = 0
    for cls in range(c):
        for j in range(k):
            for m in range(j + 1, k):
                cos = F.cosine_similarity(centers[cls, j], centers[cls, m], dim=0)
                total = total + torch.sqrt(2.0 + 1e-5 - 2.0 * cos)
    return total / (c * k * (k - 1))


def test_soft_triple_tau_adds_the_papers_center_regulariser():
    options = {"centers_per_class": 3, "la": 5.0}
    ours, theirs = twins("soft_triple", options)
    ours.tau = 0.2
    emb, labels = batch(12)
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    v1 = ours.compute(e1, labels, None, None, None)
    v2 = theirs(e2, labels) + 0.2 * ref_soft_triple_reg(theirs.fc.T.reshape(C, 3, D))
    v1.backward()
    v2.backward()
    assert float(v1) == pytest.approx(float(v2), rel=1e-10)
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(ours.bank.vectors.grad.reshape(-1, D), theirs.fc.grad.T)


def ref_lsoftmax_multi(emb, labels, w, m, scale, sphere=False):
    """L-Softmax with K vectors per class: a class's cosine is its most similar vector's, whose
    norm scales its logit; psi(theta) = (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m]."""
    out = 0
    for i in range(len(emb)):
        x = emb[i]
        logits = []
        for c in range(len(w)):
            cos = torch.stack([(x @ v) / x.norm() / v.norm() for v in w[c]])
            j = int(cos.argmax())
            t = cos[j]
            if c == labels[i]:
                theta = math.acos(float(t.clamp(-1, 1)))
                k = math.floor(theta / (math.pi / m))
                t = (-1) ** k * torch.cos(m * torch.acos(t)) - 2 * k
            logits.append(t * x.norm() * scale * (1.0 if sphere else w[c][j].norm()))
        logits = torch.stack(logits)
        out = out - torch.log_softmax(logits, 0)[labels[i]]
    return out / len(emb)


@pytest.mark.parametrize("sphere", [False, True])
def test_large_margin_softmax_with_several_vectors_per_class(sphere):
    loss = (cl.SphereFaceLoss if sphere else cl.LargeMarginSoftmaxLoss)(C, D, margin=3, scale=0.7).double()
    loss.bank.resize(2)  # as CCP does
    emb, labels = batch(13)
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    w = loss.bank.vectors.detach().clone().requires_grad_(True)
    v1, v2 = loss.compute(e1, labels, None, None, None), ref_lsoftmax_multi(e2, labels, w, 3, 0.7, sphere)
    v1.backward()
    v2.backward()
    assert float(v1) == pytest.approx(float(v2), rel=1e-9)
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(loss.bank.vectors.grad, w.grad)


def test_arcface_with_several_vectors_per_class_is_subcenter_arcface():
    sub, _ = twins("subcenter_arcface", {"sub_centers": 3})  # equal to PML above
    arc = cl.ArcFaceLoss(C, D).double()
    arc.bank.resize(3)
    arc.bank.vectors.data.copy_(sub.bank.vectors.data)
    emb, labels = batch(14)
    assert float(arc.compute(emb, labels, None, None, None)) == pytest.approx(
        float(sub.compute(emb, labels, None, None, None)), rel=1e-12
    )


def ref_manifold(emb, labels, proxies, k, lambda_c, alpha, margin, weights=None):
    """The paper's formulas with loops: S, S_bar, F = (1 - alpha)(I - alpha S_bar)^-1; each sample's
    own proxy is its class's proxy of largest affinity; the class's other proxies leave the sums."""
    z = torch.cat([emb, proxies])
    n, t = len(emb), len(z)
    s = torch.zeros(t, t, dtype=z.dtype)
    for i in range(t):
        for j in range(t):
            if i != j:
                s[i, j] = torch.exp(F.cosine_similarity(z[i], z[j], dim=0).clamp_min(0) / 0.5)
    deg = s.sum(1)
    s_bar = torch.stack([torch.stack([s[i, j] / torch.sqrt(deg[i] * deg[j]) for j in range(t)]) for i in range(t)])
    f = (1 - alpha) * torch.linalg.inv(torch.eye(t, dtype=z.dtype) - alpha * s_bar)
    total = 0
    for i in range(n):
        y = int(labels[i])
        own = max(range(y * k, (y + 1) * k), key=lambda p: float(f[i, n + p]))
        others = [p for p in range(len(proxies)) if p // k != y]

        def hinge(score, own=own, others=others):
            v = [score(p) - score(own) + margin for p in others]
            return torch.log(1 + sum((torch.exp(x) for x in v if x >= 0), torch.zeros((), dtype=z.dtype)))

        intrinsic = hinge(lambda p, i=i: f[i, n + p])
        context = hinge(lambda p, i=i: F.cosine_similarity(f[i], f[n + p], dim=0))
        term = context if math.isinf(lambda_c) else intrinsic + lambda_c * context
        total = total + (1.0 if weights is None else weights[i]) * term
    return total / n


@pytest.mark.parametrize(
    "k, lambda_c, mined",
    [(2, 1.0, False), (1, math.inf, False), (1, 0.5, True), (3, 0.0, False)],
)
def test_manifold_beyond_pml_against_the_paper(k, lambda_c, mined):
    """Several proxies per class, the context loss alone (lambdaC = inf: PML returns inf or nan),
    mined tuples weighting the samples, the intrinsic loss alone."""
    loss = cl.ManifoldLoss(C, D, lambdaC=lambda_c, alpha=0.7, margin=0.002, proxies_per_class=k).double()
    emb, labels = batch(15, n=16)
    idx = mine(emb, labels, "triplets") if mined else None
    weights = None if idx is None else cl.miner_weights(idx, 16, emb)
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    p = loss.bank.vectors.detach().reshape(-1, D).clone().requires_grad_(True)
    v1 = loss.compute(e1, labels, None, None, idx)
    v2 = ref_manifold(e2, labels, p, k, lambda_c, 0.7, 0.002, weights)
    assert float(v2) > 0
    v1.backward()
    v2.backward()
    assert float(v1) == pytest.approx(float(v2), rel=1e-9)
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(loss.bank.vectors.grad.reshape(-1, D), p.grad)


# -------------------------------------------------------------------------------- sub-center outliers
@pytest.mark.parametrize("threshold", [60.0, 80.0])
def test_subcenter_outliers_equal_pml(threshold):
    ours, theirs = twins("subcenter_arcface", {"sub_centers": 3})
    emb, labels = batch(16, n=60)
    out, centers = ours.get_outliers(emb, labels, threshold=threshold)
    their_out, their_centers = theirs.get_outliers(emb, labels, threshold=threshold)
    assert 0 < len(out) < len(emb)  # the thresholds split the batch
    assert out.tolist() == their_out.tolist()
    torch.testing.assert_close(centers, their_centers.T)


def test_subcenter_outliers_of_a_subset_of_classes():
    ours, theirs = twins("subcenter_arcface", {})
    emb, labels = batch(17, n=60)
    keep = labels != 4
    out, centers = ours.get_outliers(emb[keep], labels[keep], threshold=70.0)
    their_out, their_centers = theirs.get_outliers(emb[keep], labels[keep], threshold=70.0)
    assert out.tolist() == their_out.tolist()
    present = [c for c in range(C) if c != 4]
    torch.testing.assert_close(centers[present], their_centers.T[present])
    assert torch.isnan(centers[4]).all()  # PML leaves that column uninitialised
    alone = ours.get_outliers(emb[keep], labels[keep], threshold=70.0, return_dominant_centers=False)
    assert isinstance(alone, torch.Tensor) and alone.tolist() == out.tolist()


# ------------------------------------------------------------------------------------ CCP and options
@pytest.mark.parametrize("name", ["soft_triple", "subcenter_arcface"])
def test_ccp_wraps_the_multi_center_losses_and_drives_their_bank(name):
    reg = dmlkit.get_registry()
    ccp = reg.build(
        "loss", "ccp", context={"num_classes": C, "embedding_size": D}, base=name, proxies_per_class=4, pool_rounds=4
    )
    bank = ccp.base.bank
    assert ccp.driven == [bank] == banks(ccp) and not ccp.pair_based
    assert bank.per_class == ccp.k == 4 and bank.driven_by == "ccp" and bank.transform is unit_ball
    emb, labels = batch(18)
    emb = emb.float().requires_grad_(True)
    value = ccp(emb, labels)
    value.backward()
    assert torch.isfinite(value) and emb.grad.abs().sum() > 0 and bank.vectors.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_applies_the_banks_transform(name):
    """CCP projects the class vectors through bank.transform: a loss that read bank.vectors
    directly would silently skip it. Compare with a copy holding the projected vectors."""
    reg = dmlkit.get_registry()
    ctx = {"num_classes": C, "embedding_size": D}
    opts = {"normalize": False} if "normalize" in reg.get("loss", name).parameters() else {}
    loss = reg.build("loss", name, context=ctx, **opts).double()
    plain = reg.build("loss", name, context=ctx, **opts).double()
    loss.bank.resize(2)
    with torch.no_grad():
        loss.bank.vectors.mul_(4.0)  # norms well above 1: the unit-ball projection changes them
    plain.bank.resize(2)
    plain.bank.vectors.data.copy_(unit_ball(loss.bank.vectors.detach()))
    loss.bank.transform = unit_ball
    emb, labels = batch(19)
    x = unit_ball(emb / 3)
    expected = plain.compute(x, labels, None, None, None)
    # rel 1e-6: p2sgrad's projection (torch.renorm) leaves norms of 1 - 1e-7/|w|, as in PML
    assert float(loss.compute(x, labels, None, None, None)) == pytest.approx(float(expected), rel=1e-6)


BAD_OPTIONS = [
    ("arcface", {"margin": 180.0}, "margin"),
    ("arcface", {"scale": 0.0}, "scale"),
    ("cosface", {"margin": -0.1}, "margin"),
    ("large_margin_softmax", {"margin": 2.5}, "margin"),
    ("sphereface", {"margin": 0}, "integer"),
    ("subcenter_arcface", {"sub_centers": 0}, "sub_centers"),
    ("normalized_softmax", {"temperature": 0.0}, "temperature"),
    ("soft_triple", {"centers_per_class": 0}, "centers_per_class"),
    ("soft_triple", {"gamma": 0.0}, "gamma"),
    ("soft_triple", {"tau": -1.0}, "tau"),
    ("manifold", {"alpha": 1.0}, "alpha"),
    ("manifold", {"lambdaC": -1.0}, "lambdaC"),
    ("p2sgrad", {"lr_multiplier": -1.0}, "lr_multiplier"),
    ("arcface", {"proxy_init": "no_such_initializer"}, "no_such_initializer"),
]


@pytest.mark.parametrize("name, options, word", BAD_OPTIONS)
def test_bad_options_are_refused_naming_the_option(name, options, word):
    reg = dmlkit.get_registry()
    with pytest.raises(DmlkitError, match=word):  # OptionError, or an unknown initializer
        spec = reg.get("loss", name)
        spec.factory.validate_options(options)
        reg.build("loss", name, context={"num_classes": C, "embedding_size": D}, **options)


@pytest.mark.parametrize("name", NAMES)
def test_show_documents_every_option(name):
    spec = dmlkit.get_registry().get("loss", name)
    helps = spec.option_help()
    assert set(helps) == set(spec.parameters()) and all(helps.values()), helps


def test_plugin_passes_check_plugin():
    report = check_plugin(cl, name="copy_of_classification_losses", with_builtins=False)
    assert sorted(report.components["loss"]) == sorted(NAMES)


def test_combined_with_a_pair_loss():
    reg = dmlkit.get_registry()
    ctx = {"num_classes": C, "embedding_size": D}
    combined = reg.build("loss", "combined", context=ctx, terms=["arcface", "triplet"], weights=[1.0, 0.5])
    emb, labels = batch(20)
    emb = emb.float()
    expected = combined.terms[0](emb, labels) + 0.5 * combined.terms[1](emb, labels)
    assert float(combined(emb, labels)) == pytest.approx(float(expected), rel=1e-6)


def test_arcface_trains_end_to_end_with_its_own_learning_rate_group(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli(
        "train", "--loss", "arcface", "--epochs", "1", "--loss-opt", "lr_multiplier=10", "--run-dir", str(run)
    )
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["test_last"]["precision_at_1"] > 0.5
    ckpt = torch.load(run / "last.pt", weights_only=False)
    groups = {g["name"]: g for g in ckpt["optimizer"]["param_groups"]}
    bank = groups["loss.bank.vectors"]
    assert bank["lr_multiplier"] == 10.0 and bank["lr"] == pytest.approx(10.0 * groups["head"]["lr"])
    assert ckpt["loss"]["bank.vectors"].shape == (5, 1, ckpt["config"]["train"]["embedding_size"])
