"""The pair and tuple losses of plugins/pair_losses.py against pytorch-metric-learning 2.9: values and
gradients (embeddings, reference set, learnable beta) in float64 over several seeds, without and with
mined triplets and pairs, and with a reference set wherever PML takes one. Where PML 2.9 is wrong, the
test names the fault and checks dmlkit against a loop written from the paper's formula."""

import dataclasses
import math
import types

import pytest
import torch

import dmlkit
from dmlkit import get_registry
from dmlkit.errors import DmlkitError, OptionError
from dmlkit.testing import check_plugin
from dmlkit_plugins import pair_losses as P

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")
from pytorch_metric_learning import distances, miners  # noqa: E402

F = torch.nn.functional
SEEDS = (0, 1, 2)
TOL = {"rtol": 1e-9, "atol": 1e-11}


def batch(seed, n=24, d=10, classes=5, m=None):
    """Float64 embeddings with uneven class sizes (random labels); ``m`` rows of a reference set too."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64)
    if m is None:
        return emb, labels
    return (
        emb,
        labels,
        torch.randn(m, d, generator=g, dtype=torch.float64),
        torch.randint(0, classes, (m,), generator=g),
    )


def mined(kind, emb, labels, ref=None, ref_labels=None):
    """PML miners' output: triplets (with their repeated pairs) or pairs."""
    miner = (
        miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")
        if kind == "triplets"
        else miners.PairMarginMiner(pos_margin=0.6, neg_margin=1.1)
    )
    return miner(emb, labels, ref, ref_labels)


def value_and_grads(loss, emb, labels, ref=None, ref_labels=None, indices=None, params=()):
    """The loss and its gradients w.r.t. the embeddings, the reference set and ``params``."""
    x = emb.clone().requires_grad_(True)
    r = None if ref is None else ref.clone().requires_grad_(True)
    if type(loss).__module__.startswith("pytorch_metric_learning"):
        value = loss(x, labels, indices_tuple=indices, ref_emb=r, ref_labels=ref_labels)
    else:
        value = loss(x, labels, r, ref_labels, indices=indices)
    wrt = [x, *([r] if r is not None else []), *params]
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return value.detach(), [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def assert_same(ours, theirs, emb, labels, ref=None, ref_labels=None, indices=None, params=(), nonzero=True):
    """Equal values and gradients; ``params`` pairs (ours, theirs) parameters."""
    v1, g1 = value_and_grads(ours, emb, labels, ref, ref_labels, indices, [p for p, _ in params])
    v2, g2 = value_and_grads(theirs, emb, labels, ref, ref_labels, indices, [q for _, q in params])
    torch.testing.assert_close(v1, v2.reshape(v1.shape).to(v1.dtype), **TOL)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.to(a.dtype), **TOL)
    if nonzero:  # a comparison of two zeros proves nothing
        assert float(v1) != 0 and float(g1[0].abs().sum()) > 0
    return v1


NAMES = ["circle", "margin", "npairs", "ntxent", "supcon", "lifted_structure", "generalized_lifted_structure",
         "tuplet_margin", "angular", "nca", "snr_contrastive", "intra_pair_variance", "instance", "vicreg"]  # fmt: skip

# (name, dmlkit factory, PML factory, takes a reference set)
CASES = [
    ("circle", lambda: P.CircleLoss(), lambda: pml_losses.CircleLoss(), True),
    ("circle_face", lambda: P.CircleLoss(m=0.25, gamma=256), lambda: pml_losses.CircleLoss(m=0.25, gamma=256), True),
    ("margin", lambda: P.MarginLoss(), lambda: pml_losses.MarginLoss(), True),
    ("npairs", lambda: P.NPairsLoss(), lambda: pml_losses.NPairsLoss(), False),
    ("ntxent", lambda: P.NTXentLoss(), lambda: pml_losses.NTXentLoss(), True),
    ("ntxent_t05", lambda: P.NTXentLoss(temperature=0.5), lambda: pml_losses.NTXentLoss(temperature=0.5), True),
    ("supcon", lambda: P.SupConLoss(), lambda: pml_losses.SupConLoss(), True),
    ("lifted_structure", lambda: P.LiftedStructureLoss(), lambda: pml_losses.LiftedStructureLoss(), False),
    (
        "lifted_structure_margins",
        lambda: P.LiftedStructureLoss(neg_margin=0.7, pos_margin=0.1),
        lambda: pml_losses.LiftedStructureLoss(neg_margin=0.7, pos_margin=0.1),
        False,
    ),
    (
        "generalized_lifted_structure",
        lambda: P.GeneralizedLiftedStructureLoss(neg_margin=1.2, pos_margin=0.1),
        lambda: pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.2, pos_margin=0.1),
        True,
    ),
    ("tuplet_margin", lambda: P.TupletMarginLoss(), lambda: pml_losses.TupletMarginLoss(), True),
    (
        "tuplet_margin_wide",
        lambda: P.TupletMarginLoss(margin=20, scale=16),
        lambda: pml_losses.TupletMarginLoss(margin=20, scale=16),
        True,
    ),
    ("nca", lambda: P.NCALoss(), lambda: pml_losses.NCALoss(), True),
    ("nca_scaled", lambda: P.NCALoss(softmax_scale=4), lambda: pml_losses.NCALoss(softmax_scale=4), True),
    ("snr_contrastive", lambda: P.SNRContrastiveLoss(), lambda: pml_losses.SignalToNoiseRatioContrastiveLoss(), True),
    (
        "snr_contrastive_margins",
        lambda: P.SNRContrastiveLoss(pos_margin=0.6, neg_margin=1.3),
        lambda: pml_losses.SignalToNoiseRatioContrastiveLoss(pos_margin=0.6, neg_margin=1.3),
        True,
    ),
    ("intra_pair_variance", lambda: P.IntraPairVarianceLoss(), lambda: pml_losses.IntraPairVarianceLoss(), True),
    (
        "intra_pair_variance_eps",
        lambda: P.IntraPairVarianceLoss(pos_eps=0.2, neg_eps=0.3),
        lambda: pml_losses.IntraPairVarianceLoss(pos_eps=0.2, neg_eps=0.3),
        True,
    ),
]
IDS = [c[0] for c in CASES]
MAIN = [c for c in CASES if c[0] in NAMES]  # one case per loss (the variants only change options)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,ours,theirs,takes_ref", CASES, ids=IDS)
def test_equal_to_pml_on_the_batch(name, ours, theirs, takes_ref, seed):
    emb, labels = batch(seed)
    assert_same(ours(), theirs(), emb, labels)


@pytest.mark.parametrize("kind", ["triplets", "pairs"])
@pytest.mark.parametrize("name,ours,theirs,takes_ref", MAIN, ids=[c[0] for c in MAIN])
def test_equal_to_pml_with_mined_indices(name, ours, theirs, takes_ref, kind):
    for seed in SEEDS[:2]:
        emb, labels = batch(seed + 10, n=20)
        indices = mined(kind, emb, labels)
        assert len(indices[0]) > 5
        assert_same(ours(), theirs(), emb, labels, indices=indices)


@pytest.mark.parametrize("name,ours,theirs,takes_ref", [c for c in MAIN if c[3]], ids=[c[0] for c in MAIN if c[3]])
def test_equal_to_pml_with_a_reference_set(name, ours, theirs, takes_ref):
    for seed in SEEDS[:2]:
        emb, labels, ref, ref_labels = batch(seed + 20, n=12, m=30)
        assert_same(ours(), theirs(), emb, labels, ref, ref_labels)  # gradients w.r.t. the reference set too
        indices = mined("pairs", emb, labels, ref, ref_labels)
        assert_same(ours(), theirs(), emb, labels, ref, ref_labels, indices=indices, nonzero=False)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: P.NTXentLoss(normalize=False), lambda: pml_losses.NTXentLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))),
        (lambda: P.SupConLoss(normalize=False), lambda: pml_losses.SupConLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))),
        (lambda: P.NPairsLoss(normalize=False), lambda: pml_losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))),
        (lambda: P.NCALoss(normalize=False), lambda: pml_losses.NCALoss(distance=distances.LpDistance(power=2, normalize_embeddings=False))),
        (lambda: P.MarginLoss(normalize=False, beta=3.0), lambda: pml_losses.MarginLoss(beta=3.0, distance=distances.LpDistance(normalize_embeddings=False))),
    ],
)  # fmt: skip
def test_normalize_false_is_pml_without_normalisation(ours, theirs):
    emb, labels = batch(3)
    assert_same(ours(), theirs(), emb * 0.3, labels)


def test_normalize_false_on_the_unit_ball_matches_the_cosine_form():
    """CCP hands its unit-ball points with normalize=False: on unit vectors both forms agree."""
    emb, labels = batch(4)
    unit = F.normalize(emb, dim=1)
    for cls in (
        P.CircleLoss,
        P.TupletMarginLoss,
        P.SupConLoss,
        P.IntraPairVarianceLoss,
        P.GeneralizedLiftedStructureLoss,
    ):
        a, b = cls()(unit, labels), cls(normalize=False)(unit, labels)
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------ margin
def test_margin_with_learnable_beta_and_its_regulariser_equals_pml():
    for seed in SEEDS:
        emb, labels = batch(seed + 30)
        ours = P.MarginLoss(margin=0.1, beta=1.0, nu=0.3, learn_beta=True).double()
        theirs = pml_losses.MarginLoss(margin=0.1, beta=1.0, nu=0.3, learn_beta=True).double()
        assert ours.beta.shape == (1,) and ours.beta.requires_grad
        assert_same(ours, theirs, emb, labels, params=[(ours.beta, theirs.beta)])
        indices = mined("pairs", emb, labels)
        assert_same(ours, theirs, emb, labels, indices=indices, params=[(ours.beta, theirs.beta)])


def test_margin_with_one_learnable_beta_per_class_equals_pml_given_num_classes():
    for seed in SEEDS:
        emb, labels = batch(seed + 40, classes=5)
        ours = P.MarginLoss(nu=0.2, learn_beta=True, num_classes=7).double()
        theirs = pml_losses.MarginLoss(nu=0.2, learn_beta=True, num_classes=7).double()
        with torch.no_grad():  # different betas per class, the same in both
            ours.beta.copy_(torch.linspace(0.8, 1.4, 7))
            theirs.beta.copy_(ours.beta)
        assert ours.beta.shape == (7,)
        assert_same(ours, theirs, emb, labels, params=[(ours.beta, theirs.beta)])
        indices = mined("triplets", emb, labels)
        assert_same(ours, theirs, emb, labels, indices=indices, params=[(ours.beta, theirs.beta)])
        emb, labels, ref, ref_labels = batch(seed + 45, n=10, m=20)
        assert_same(ours, theirs, emb, labels, ref, ref_labels, params=[(ours.beta, theirs.beta)])


def test_margin_with_random_triplets_per_anchor_draws_pmls_triplets():
    for seed in SEEDS:
        emb, labels = batch(seed + 50)
        ours, theirs = P.MarginLoss(triplets_per_anchor=3), pml_losses.MarginLoss(triplets_per_anchor=3)
        torch.manual_seed(seed)
        v1, g1 = value_and_grads(ours, emb, labels)
        torch.manual_seed(seed)
        v2, g2 = value_and_grads(theirs, emb, labels)
        torch.testing.assert_close(v1, v2, **TOL)
        torch.testing.assert_close(g1[0], g2[0], **TOL)
        emb, labels, ref, ref_labels = batch(seed + 55, n=10, m=20)
        torch.manual_seed(seed)
        v1, _ = value_and_grads(ours, emb, labels, ref, ref_labels)
        torch.manual_seed(seed)
        v2, _ = value_and_grads(theirs, emb, labels, ref, ref_labels)
        torch.testing.assert_close(v1, v2, **TOL)


def test_margin_registered_keeps_one_beta_unless_per_class_beta_and_refuses_out_of_range_labels():
    reg = get_registry()
    ctx = {"num_classes": 6, "embedding_size": 8}
    assert reg.build("loss", "margin", context=ctx, learn_beta=True).beta.shape == (1,)
    per_class = reg.build("loss", "margin", context=ctx, learn_beta=True, per_class_beta=True)
    assert per_class.beta.shape == (6,)
    with pytest.raises(ValueError, match=r"labels in \[0, 6\)"):
        per_class(torch.randn(4, 8), torch.tensor([0, 0, 7, 7]))
    with pytest.raises(OptionError, match="per_class_beta needs num_classes"):
        P.MarginLoss(per_class_beta=True)


def test_margin_beta_gets_its_learning_rate_multiplier_in_the_trainer(tmp_path):
    from dmlkit.config import resolve
    from dmlkit.train import Trainer

    cfg, _ = resolve(
        {"loss": {"name": "margin", "learn_beta": True, "beta_lr_multiplier": 25.0}, "train": {"epochs": 1}},
        get_registry(),
    )
    trainer = Trainer(cfg, get_registry(), tmp_path)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    beta = groups["loss.beta"]
    assert beta["params"][0] is trainer.loss.beta and beta["lr_multiplier"] == 25.0
    assert beta["lr"] == pytest.approx(25.0 * groups["head"]["lr"] / groups["head"]["lr_multiplier"])


# ------------------------------------------------------------------------------------- angular
def angular_by_the_paper(emb, labels, alpha_degrees, pairs):
    """Wang et al. 2017, eq. 8, on unit vectors: a loop over positive pairs and their negatives."""
    x = F.normalize(emb, dim=1)
    t2 = math.tan(math.radians(alpha_degrees)) ** 2
    terms = []
    for a, p in pairs:
        negatives = x[labels != labels[a]]
        f = 4 * t2 * negatives @ (x[a] + x[p]) - 2 * (1 + t2) * x[a] @ x[p]
        terms.append(torch.log(1 + torch.exp(f).sum()))
    return torch.stack(terms).mean()


def test_angular_follows_the_paper_and_equals_pml_on_unit_vectors():
    """PML 2.9's AngularLoss normalises anchors and positives but multiplies by the raw negatives
    (``ref_emb`` un-normalised in ``compute_loss``), which its equation (unit-length x_n) does not
    allow; no PML issue names it. dmlkit normalises them: it follows the paper on any input and
    equals PML where the inputs are unit vectors (values and gradients through the normalisation)."""
    for seed in SEEDS:
        emb, labels = batch(seed + 60)
        pos = [(a, p) for a in range(len(labels)) for p in range(len(labels)) if a != p and labels[a] == labels[p]]
        ours = P.AngularLoss(alpha=45)
        torch.testing.assert_close(ours(emb, labels), angular_by_the_paper(emb, labels, 45, pos), **TOL)
        raw_pml = pml_losses.AngularLoss(alpha=45)(emb, labels)
        assert not torch.isclose(raw_pml, ours(emb, labels), rtol=1e-3)  # the fault shows on raw inputs

        class PMLOnUnitVectors(torch.nn.Module):
            def __init__(self, alpha):
                super().__init__()
                self.pml = pml_losses.AngularLoss(alpha=alpha)

            def forward(self, x, labels, ref=None, ref_labels=None, indices=None):
                r = None if ref is None else F.normalize(ref, dim=1)
                return self.pml(F.normalize(x, dim=1), labels, indices, r, ref_labels)

        assert_same(P.AngularLoss(), PMLOnUnitVectors(40), emb, labels)
        assert_same(P.AngularLoss(), PMLOnUnitVectors(40), emb, labels, indices=mined("triplets", emb, labels))
        assert_same(P.AngularLoss(alpha=50), PMLOnUnitVectors(50), emb, labels, indices=mined("pairs", emb, labels))
        emb, labels, ref, ref_labels = batch(seed + 65, n=12, m=30)
        assert_same(P.AngularLoss(), PMLOnUnitVectors(40), emb, labels, ref, ref_labels)


def test_ntxent_on_two_stacked_views_is_simclrs_loss():
    """Chen et al. 2020, eq. 1: l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)), averaged
    over the 2N views, written here as a loop."""
    g = torch.Generator().manual_seed(90)
    views = torch.randn(12, 8, generator=g, dtype=torch.float64)
    ids = torch.randperm(6, generator=g)
    z = F.normalize(views, dim=1)
    terms = []
    for i in range(12):
        j = (i + 6) % 12
        others = torch.stack([z[i] @ z[k] / 0.5 for k in range(12) if k != i])
        terms.append(-(z[i] @ z[j] / 0.5 - torch.logsumexp(others, 0)))
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(P.NTXentLoss(temperature=0.5)(views, torch.cat([ids, ids])), expected, **TOL)


# ------------------------------------------------------------------------------------ instance
def test_instance_equals_pml_on_instance_labels_and_refuses_other_batches():
    for seed in SEEDS:
        emb, _ = batch(seed + 70)
        n = len(emb)
        assert_same(P.InstanceLoss(), pml_losses.InstanceLoss(), emb, torch.arange(n))
        increasing = torch.arange(n) * 3 + 5  # distinct ids in batch order: each item its own class
        assert_same(P.InstanceLoss(gamma=16), pml_losses.InstanceLoss(gamma=16), emb, increasing)
    emb, labels = batch(0)
    # PML computes these silently with a target column that holds another label (its docs' caveat)
    for bad in (labels, torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))):
        with pytest.raises(ValueError, match="one label per instance"):
            P.InstanceLoss()(emb, bad)
    with pytest.raises(ValueError, match="cannot take a reference set"):
        P.InstanceLoss()(emb, torch.arange(len(emb)), emb, torch.arange(len(emb)))
    with pytest.raises(ValueError, match="cannot take mined"):
        P.InstanceLoss()(emb, torch.arange(len(emb)), indices=mined("pairs", emb, labels))


# -------------------------------------------------------------------------------------- vicreg
def test_vicreg_equals_pml_with_the_second_views_stacked_or_as_the_reference_set():
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed + 80)
        z, z2 = torch.randn(2, 16, 12, generator=g, dtype=torch.float64).unbind(0)
        z2 = 0.4 * z2 + z  # correlated views
        ids = torch.randperm(16, generator=g)
        theirs = pml_losses.VICRegLoss()
        a, b = z.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        expected = theirs(a, ref_emb=b)
        expected_grads = torch.autograd.grad(expected, [a, b])
        # the reference set holds the second views, row for row
        v, grads = value_and_grads(P.VICRegLoss(), z, ids, z2, ids)
        torch.testing.assert_close(v, expected.detach(), **TOL)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, **TOL)
        # the batch holds both views stacked
        both = torch.cat([z, z2]).requires_grad_(True)
        value = P.VICRegLoss()(both, torch.cat([ids, ids]))
        torch.testing.assert_close(value.detach(), expected.detach(), **TOL)
        torch.testing.assert_close(torch.autograd.grad(value, both)[0], torch.cat(expected_grads), **TOL)
        weights = {"invariance_lambda": 5.0, "variance_mu": 2.0, "covariance_v": 3.0, "eps": 1e-3}
        torch.testing.assert_close(
            P.VICRegLoss(**weights)(z, ids, z2, ids), pml_losses.VICRegLoss(**weights)(z, ref_emb=z2), **TOL
        )


def test_vicreg_refuses_what_is_not_two_views():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match="odd"):
        P.VICRegLoss()(z[:7], torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="halves' labels differ"):
        P.VICRegLoss()(z, torch.arange(8))
    with pytest.raises(ValueError, match="a memory queue or proxies"):
        P.VICRegLoss()(z, torch.arange(8), torch.randn(32, 4), torch.arange(32))
    with pytest.raises(ValueError, match="with other labels"):
        P.VICRegLoss()(z, torch.arange(8), torch.randn(8, 4), torch.arange(8).flip(0))
    with pytest.raises(ValueError, match="cannot take mined"):
        P.VICRegLoss()(z, torch.arange(8) % 4, indices=(torch.tensor([0]), torch.tensor([4]), torch.tensor([1])))


# ------------------------------------------------------------------- losses that refuse a reference set
def test_lifted_structure_and_npairs_refuse_a_reference_set():
    """PML 2.9's LiftedStructureLoss takes one but then matches negative pairs to a positive pair by
    ``a2 == p``: a batch index against a reference-set index, so it mixes unrelated pairs."""
    emb, labels, ref, ref_labels = batch(0, n=8, m=12)
    for loss in (P.LiftedStructureLoss(), P.NPairsLoss()):
        with pytest.raises(ValueError, match="cannot take a reference set"):
            loss(emb, labels, ref, ref_labels)


# ------------------------------------------------------------------------------- robustness
def test_tuplet_margin_stays_finite_on_identical_positives_where_pml_gives_nan():
    emb, labels = batch(5)
    emb[1] = emb[0]
    labels[1] = labels[0]
    x = emb.clone().requires_grad_(True)
    P.TupletMarginLoss()(x, labels).backward()
    assert torch.isfinite(x.grad).all()
    y = emb.clone().requires_grad_(True)
    pml_losses.TupletMarginLoss()(y, labels).backward()
    assert torch.isnan(y.grad).any()  # acos at 1 without a clamp (PML 2.9)


@pytest.mark.parametrize("name", NAMES[:-2])
def test_nothing_to_compare_gives_a_zero_that_back_propagates(name):
    loss = get_registry().build("loss", name, context={"num_classes": 4, "embedding_size": 6})
    batches = [torch.zeros(1, dtype=torch.long)]  # one item: no pair at all
    if name not in ("snr_contrastive", "intra_pair_variance", "generalized_lifted_structure"):  # a negative-pair term
        batches.append(torch.arange(4))  # no positive pair
    for labels in batches:
        x = torch.randn(len(labels), 6, requires_grad=True)
        value = loss(x, labels)
        value.backward()
        assert float(value.detach()) == 0 and x.grad is not None and float(x.grad.abs().sum()) == 0


def test_float32_stays_close_to_float64():
    emb, labels = batch(7)
    for _name, ours, _, _ in CASES:
        torch.testing.assert_close(ours()(emb.float(), labels).double(), ours()(emb, labels), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "name,options,message",
    [
        ("circle", {"m": 1.5}, r"m must be in \[0, 1\)"),
        ("circle", {"gamma": 0}, "gamma must be > 0"),
        ("margin", {"margin": -0.1}, "margin must be >= 0"),
        ("margin", {"triplets_per_anchor": "some"}, "triplets_per_anchor must be"),
        ("margin", {"triplets_per_anchor": 0}, "triplets_per_anchor must be"),
        ("margin", {"beta_lr_multiplier": -1.0}, "beta_lr_multiplier must be >= 0"),
        ("ntxent", {"temperature": 0}, "temperature must be > 0"),
        ("supcon", {"temperature": -1.0}, "temperature must be > 0"),
        ("lifted_structure", {"neg_margin": -1.0}, "neg_margin must be >= 0"),
        ("generalized_lifted_structure", {"pos_margin": float("nan")}, "pos_margin must be a finite number"),
        ("tuplet_margin", {"margin": 200}, "angle in degrees"),
        ("angular", {"alpha": 90}, r"in \(0, 90\)"),
        ("nca", {"softmax_scale": 0}, "softmax_scale must be > 0"),
        ("snr_contrastive", {"pos_margin": -0.5}, "pos_margin must be >= 0"),
        ("intra_pair_variance", {"neg_eps": 1.0}, r"neg_eps must be in \[0, 1\)"),
        ("instance", {"gamma": float("inf")}, "gamma must be a finite number"),
        ("vicreg", {"eps": 0}, "eps must be > 0"),
        ("vicreg", {"covariance_v": -1.0}, "covariance_v must be >= 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option_and_its_range(name, options, message):
    with pytest.raises(OptionError, match=message):
        get_registry().build("loss", name, context={"num_classes": 4, "embedding_size": 6}, **options)


@pytest.mark.parametrize("name", NAMES)
def test_dmlkit_show_documents_every_option(cli, name):
    import json

    code, out, err = cli("show", "loss", name, "--json")
    assert code == 0, err
    info = json.loads(out)["option_info"]
    missing = [k for k, v in info.items() if not v["help"] and k not in ("num_classes",)]
    assert not missing, f"{name}: no help for {missing}"
    assert get_registry().get("loss", name).plugin == "pair_losses"


# ------------------------------------------------------------------------------------- plugin checks
def _only(names, keep):
    """A plugin module registering copies (``copy_<name>``) of the pair losses named in ``names``
    (keep=True) or of all the others, beside the built-ins."""
    mod = types.ModuleType("pair_losses_subset")

    def register_losses(register):
        def copy(spec):
            if (spec.name in names) == keep:
                register(dataclasses.replace(spec, name=f"copy_{spec.name}", aliases=()))

        P.register_losses(copy)

    mod.register_losses = dmlkit.hookimpl(register_losses)
    return mod


def test_every_pair_loss_passes_check_plugin_but_the_two_that_need_instance_or_view_batches():
    """check_plugin calls each loss on a 4-class batch and with a batch_all miner's triplets: every
    loss passes except instance and vicreg, which cannot take mined indices (PML refuses them too)
    and say so in one line instead of computing something meaningless."""
    report = check_plugin(_only({"instance", "vicreg"}, keep=False), name="pair_losses_copy")
    assert sorted(report.components["loss"]) == sorted(f"copy_{n}" for n in set(NAMES) - {"instance", "vicreg"})
    with pytest.raises(DmlkitError, match="instance cannot take mined"):
        check_plugin(_only({"instance"}, keep=True), name="instance_copy")
    with pytest.raises(DmlkitError, match="vicreg cannot take mined"):
        check_plugin(_only({"vicreg"}, keep=True), name="vicreg_copy")


def test_a_combination_of_pair_losses_is_the_weighted_sum_of_its_terms():
    reg = get_registry()
    emb, labels = batch(8)
    loss = reg.build(
        "loss", "combined", context={"num_classes": 5, "embedding_size": 10},
        terms=["tuplet_margin", "intra_pair_variance"], weights=[1.0, 0.5], tuplet_margin={"scale": 32.0},
    )  # fmt: skip
    expected = P.TupletMarginLoss(scale=32.0)(emb, labels) + 0.5 * P.IntraPairVarianceLoss()(emb, labels)
    torch.testing.assert_close(loss(emb, labels), expected, **TOL)


REF_TAKERS = ["circle", "margin", "ntxent", "supcon", "generalized_lifted_structure", "tuplet_margin", "angular",
              "nca", "snr_contrastive", "intra_pair_variance"]  # fmt: skip


@pytest.mark.parametrize("name", REF_TAKERS)
def test_ccp_wraps_each_loss_that_takes_a_reference_set(name):
    """CCP (plugins/ccp.py) calls the base on the batch and with its unit-ball proxies as the reference set."""
    reg = get_registry()
    ccp = reg.build("loss", "ccp", context={"num_classes": 5, "embedding_size": 10}, base=name, proxies_per_class=2)
    emb, labels = batch(9)
    x = emb.float().requires_grad_(True)
    value = ccp(x, labels)
    value.backward()
    assert torch.isfinite(value) and float(x.grad.abs().sum()) > 0
    assert ccp.proxy_bank.vectors.grad is not None and float(ccp.proxy_bank.vectors.grad.abs().sum()) > 0
