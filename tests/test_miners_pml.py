"""The miners against pytorch-metric-learning 2.9: the deterministic ones mine PML's exact set (as
sets of tuples), the random ones PML's distribution (same weights or bins and counts, and draws
that follow them).

Both sides compute in float64 (dmlkit's ``mine``, what ``forward`` runs after casting to float32),
so no threshold decision can flip on summation order."""

import itertools
from collections import Counter

import pytest
import torch

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.testing import check_plugin
from dmlkit_plugins import miners
from dmlkit_plugins.miners import (
    AngularMiner,
    BatchEasyHardMiner,
    DistanceWeightedMiner,
    HDCMiner,
    PairMarginMiner,
    TripletMarginMiner,
    UniformHistogramMiner,
)

pml_miners = pytest.importorskip("pytorch_metric_learning.miners", reason="PML not installed")
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

F = torch.nn.functional
SEEDS = (0, 1, 2)


def batch(seed, n=32, d=6, classes=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale, torch.randint(0, classes, (n,), generator=g)


def with_ref(seed):
    """``(ref, ref_labels)`` kwargs: none, or a reference set of 20."""
    if seed is None:
        return {}
    ref, ref_labels = batch(seed + 100, n=20)
    return {"ref": ref, "ref_labels": ref_labels}


def mine(miner, emb, labels, ref=None, ref_labels=None):
    return miner.mine(emb, labels, ref, ref_labels)


def pml(miner, emb, labels, ref=None, ref_labels=None):
    return miner(emb, labels, ref, ref_labels)


def as_set(*tensors):
    return set(zip(*(t.tolist() for t in tensors)))


def assert_same_tuples(ours, theirs):
    assert len(ours) == len(theirs)
    if len(ours) == 3:
        assert as_set(*ours) == as_set(*theirs) and len(ours[0]) == len(theirs[0])
    else:
        assert as_set(*ours[:2]) == as_set(*theirs[:2]) and len(ours[0]) == len(theirs[0])
        assert as_set(*ours[2:]) == as_set(*theirs[2:]) and len(ours[2]) == len(theirs[2])


REFS = [None, 7]  # without and with a reference set


# ------------------------------------------------------------------------------ deterministic ones
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("type_of_triplets", TripletMarginMiner.TYPES)
@pytest.mark.parametrize("margin", [0.1, 0.3])
def test_triplet_margin_mines_pmls_triplets_in_pmls_order(seed, ref, type_of_triplets, margin):
    emb, labels = batch(seed)
    ours = mine(TripletMarginMiner(margin, type_of_triplets), emb, labels, **with_ref(ref))
    theirs = pml(pml_miners.TripletMarginMiner(margin, type_of_triplets=type_of_triplets), emb, labels, **with_ref(ref))
    assert len(ours[0]) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_triplet_margin_refuses_an_unknown_type_where_pml_mines_all():
    emb, labels = batch(0)
    typo = pml(pml_miners.TripletMarginMiner(0.2, type_of_triplets="semi-hard"), emb, labels)
    every = pml(pml_miners.TripletMarginMiner(0.2, type_of_triplets="all"), emb, labels)
    assert as_set(*typo) == as_set(*every)  # PML silently treats the typo as "all"
    with pytest.raises(OptionError, match="type_of_triplets must be one of all, hard, semihard, easy"):
        TripletMarginMiner(0.2, "semi-hard")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("margins", [(0.2, 0.8), (1.0, 1.3)])
def test_pair_margin_mines_pmls_pairs(seed, ref, margins):
    emb, labels = batch(seed)
    ours = mine(PairMarginMiner(*margins), emb, labels, **with_ref(ref))
    assert len(ours[0]) > 0 and len(ours[2]) > 0
    assert_same_tuples(ours, pml(pml_miners.PairMarginMiner(*margins), emb, labels, **with_ref(ref)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("share", [0.5, 0.3, 1.0])
def test_hdc_mines_pmls_pairs(seed, ref, share):
    emb, labels = batch(seed)
    ours = mine(HDCMiner(share), emb, labels, **with_ref(ref))
    assert_same_tuples(ours, pml(pml_miners.HDCMiner(share), emb, labels, **with_ref(ref)))


STRATEGY_PAIRS = [
    (p, n)
    for p, n in itertools.product(BatchEasyHardMiner.STRATEGIES, repeat=2)
    if not (p == n == "semihard" or {p, n} == {"semihard", "all"})
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("pos_strategy, neg_strategy", STRATEGY_PAIRS)
def test_batch_easy_hard_mines_pmls_pairs_for_every_strategy(seed, ref, pos_strategy, neg_strategy):
    emb, labels = batch(seed)
    ours = mine(BatchEasyHardMiner(pos_strategy, neg_strategy), emb, labels, **with_ref(ref))
    theirs = pml(pml_miners.BatchEasyHardMiner(pos_strategy, neg_strategy), emb, labels, **with_ref(ref))
    assert len(ours[0]) > 0
    assert_same_tuples(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pos_strategy, neg_strategy", [("easy", "semihard"), ("semihard", "hard"), ("all", "easy")])
def test_batch_easy_hard_keeps_picks_inside_the_allowed_ranges_as_pml(seed, pos_strategy, neg_strategy):
    emb, labels = batch(seed)
    ranges = {"allowed_pos_range": [0.6, 1.2], "allowed_neg_range": [0.9, 1.6]}
    ours = mine(BatchEasyHardMiner(pos_strategy, neg_strategy, **ranges), emb, labels)
    theirs = pml(pml_miners.BatchEasyHardMiner(pos_strategy, neg_strategy, **ranges), emb, labels)
    assert_same_tuples(ours, theirs)
    full = mine(BatchEasyHardMiner(pos_strategy, neg_strategy), emb, labels)
    assert as_set(*ours[2:]) != as_set(*full[2:])  # the ranges changed the picks


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pos_strategy": "hardest"}, "pos_strategy must be one of hard, semihard, easy, all"),
        ({"pos_strategy": "semihard", "neg_strategy": "semihard"}, "cannot both be 'semihard'"),
        ({"pos_strategy": "all", "neg_strategy": "semihard"}, "'semihard' cannot be combined with 'all'"),
        ({"allowed_neg_range": [1.0, 0.5]}, r"allowed_neg_range must be \[low, high\]"),
    ],
)
def test_batch_easy_hard_refuses_what_pml_refuses_or_cannot_do(options, message):
    with pytest.raises(OptionError, match=message):
        BatchEasyHardMiner(**options)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("angle", [20, 35])
def test_angular_mines_pmls_triplets(seed, ref, angle):
    """PML bug (no PML issue found): AngularMiner asserts a distance on normalised embeddings but
    measures the angles on the raw ones (only ``pairwise_distance``, which does not normalise).
    dmlkit's default normalises (PML's set on normalised embeddings); ``normalize=False`` is PML
    on the raw embeddings."""
    emb, labels = batch(seed, scale=3.0)
    kw = with_ref(ref)
    raw = mine(AngularMiner(angle, normalize=False), emb, labels, **kw)
    assert len(raw[0]) > 0
    assert_same_tuples(raw, pml(pml_miners.AngularMiner(angle), emb, labels, **kw))
    unit = {k: (F.normalize(v, dim=1) if k == "ref" else v) for k, v in kw.items()}
    ours = mine(AngularMiner(angle), emb, labels, **kw)
    assert_same_tuples(ours, pml(pml_miners.AngularMiner(angle), F.normalize(emb, dim=1), labels, **unit))
    assert as_set(*ours) != as_set(*raw)  # the scaled batch: normalising matters


# ------------------------------------------------------------------------------------- random ones
def pml_distance_weights(emb, labels, ref=None, ref_labels=None, **options):
    """The weights PML's DistanceWeightedMiner hands to its sampler, and its sampled triplets."""
    seen = {}
    sample = lmu.get_random_triplet_indices

    def spy(*args, **kwargs):
        seen["weights"] = kwargs["weights"]
        return sample(*args, **kwargs)

    lmu.get_random_triplet_indices = spy
    try:
        out = pml_miners.DistanceWeightedMiner(**options)(emb, labels, ref, ref_labels)
    finally:
        lmu.get_random_triplet_indices = sample
    return seen["weights"], out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("d, options", [(6, {}), (32, {"cutoff": 0.3, "nonzero_loss_cutoff": 1.3})])
def test_distance_weighted_has_pmls_weights_and_triplet_counts(seed, ref, d, options):
    emb, labels = batch(seed, d=d)
    kw = with_ref(ref)
    if kw:
        kw["ref"] = torch.randn(20, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    miner = DistanceWeightedMiner(**options)
    pml_w, pml_out = pml_distance_weights(emb, labels, kw.get("ref"), kw.get("ref_labels"), **options)
    torch.testing.assert_close(miner.weights(emb, labels, kw.get("ref"), kw.get("ref_labels")), pml_w, equal_nan=True)
    a, p, n = mine(miner, emb, labels, **kw)
    # deterministic: which anchors get triplets, and how many each
    assert Counter(a.tolist()) == Counter(pml_out[0].tolist())
    ref_labels = kw.get("ref_labels", labels)
    assert bool((labels[a] == ref_labels[p]).all()) and bool((labels[a] != ref_labels[n]).all())
    if not kw:
        assert bool((a != p).all())
    assert float(pml_w.nan_to_num()[a, n].min()) > 0  # only negatives PML could draw


def test_distance_weighted_draws_negatives_with_pmls_probabilities_and_positives_uniformly():
    emb, labels = batch(3, n=12, d=4, classes=3)
    miner = DistanceWeightedMiner()
    weights, _ = pml_distance_weights(emb, labels)
    torch.manual_seed(0)
    neg, pos = torch.zeros(12, 12), torch.zeros(12, 12)
    for _ in range(300):
        a, p, n = mine(miner, emb, labels)
        neg.index_put_((a, n), torch.ones(len(a)), accumulate=True)
        pos.index_put_((a, p), torch.ones(len(a)), accumulate=True)
    total = neg.sum(1, keepdim=True)  # triplets drawn per anchor
    assert bool((total > 0).all())
    for counts, prob in ((neg, weights.nan_to_num()), (pos, (labels[:, None] == labels[None, :]).double())):
        prob = prob.fill_diagonal_(0) if counts is pos else prob
        prob = prob / prob.sum(1, keepdim=True)
        expected = total * prob
        sd = (total * prob * (1 - prob)).sqrt()
        assert bool((counts[prob == 0] == 0).all())
        assert bool(((counts - expected).abs() <= 5 * sd + 1).all())


def uniform_histogram_bins(values, num_bins):
    """The bin of each value, computed here: edges[i] <= v < edges[i + 1], the last bin closed."""
    lo, hi = float(values.min()), float(values.max())
    width = (hi - lo) / num_bins
    return [min(int((float(v) - lo) / width), num_bins - 1) if width > 0 else num_bins - 1 for v in values]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("options", [{}, {"num_bins": 7, "pos_per_bin": 3, "neg_per_bin": 5}])
def test_uniform_histogram_draws_pmls_count_from_each_of_pmls_bins(seed, ref, options):
    emb, labels = batch(seed)
    kw = with_ref(ref)
    miner = UniformHistogramMiner(**options)
    ours = mine(miner, emb, labels, **kw)
    theirs = pml(pml_miners.UniformHistogramMiner(**options), emb, labels, **kw)
    other = F.normalize(kw.get("ref", emb), dim=1)
    dist = torch.cdist(F.normalize(emb, dim=1), other)
    pos, neg = (
        lmu.get_all_pairs_indices(labels, kw.get("ref_labels"))[:2],
        lmu.get_all_pairs_indices(labels, kw.get("ref_labels"))[2:],
    )
    for (a_all, b_all), (a, b) in ((pos, ours[:2]), (neg, ours[2:])):
        everything = dist[a_all, b_all]
        bins = dict(zip(zip(a_all.tolist(), b_all.tolist()), uniform_histogram_bins(everything, miner.num_bins)))
        assert set(zip(a.tolist(), b.tolist())) <= set(bins)
        ours_per_bin = Counter(bins[pair] for pair in zip(a.tolist(), b.tolist()))
        yield_theirs = (theirs[:2], theirs[2:])[b is ours[3]]
        theirs_per_bin = Counter(bins[pair] for pair in zip(*(t.tolist() for t in yield_theirs)))
        assert ours_per_bin == theirs_per_bin and len(ours_per_bin) > 1


def test_uniform_histogram_draws_uniformly_within_each_bin():
    emb, labels = batch(4, n=16, classes=3)
    miner = UniformHistogramMiner(num_bins=4, pos_per_bin=50, neg_per_bin=50)
    a_all, p_all = lmu.get_all_pairs_indices(labels)[:2]
    dist = torch.cdist(F.normalize(emb, dim=1), F.normalize(emb, dim=1))[a_all, p_all]
    bins = dict(zip(zip(a_all.tolist(), p_all.tolist()), uniform_histogram_bins(dist, 4)))
    size = Counter(bins.values())
    torch.manual_seed(0)
    counts = Counter()
    draws = 40
    for _ in range(draws):
        a, p, _, _ = mine(miner, emb, labels)
        counts.update(zip(a.tolist(), p.tolist()))
    for pair, b in bins.items():
        expected, prob = draws * 50 / size[b], 1 / size[b]
        assert abs(counts[pair] - expected) <= 5 * (draws * 50 * prob * (1 - prob)) ** 0.5 + 1, pair


# ------------------------------------------------------------------------------------------ plugin
def test_every_miner_passes_check_plugin_and_documents_each_option():
    report = check_plugin(miners, name="copy_of_miners", with_builtins=False)
    new = [
        "angular",
        "batch_easy_hard",
        "distance_weighted",
        "hdc",
        "pair_margin",
        "triplet_margin",
        "uniform_histogram",
    ]
    assert set(new) <= set(report.components["miner"])
    reg = dmlkit.get_registry()
    for name in new:
        spec = reg.get("miner", name)
        helps = spec.option_help()
        assert set(helps) == set(spec.parameters()) and all(helps.values()), name


@pytest.mark.parametrize(
    "miner, loss",
    [("triplet_margin", "triplet"), ("pair_margin", "contrastive"), ("distance_weighted", "triplet")],
)
def test_a_run_trains_a_step_with_each_kind_of_miner(miner, loss):
    """The trainer's call: loss(embeddings, labels, indices=miner(embeddings, labels)), float32."""
    reg = dmlkit.get_registry()
    emb, labels = batch(0, n=32, d=8, classes=4)
    emb = emb.float().requires_grad_(True)
    m = reg.build("miner", miner)
    value = reg.build("loss", loss)(emb, labels, indices=m(emb, labels))
    value.backward()
    assert m.stats()["mined"] > 0 and float(emb.grad.abs().sum()) > 0


PML_CLASSES = {
    "angular": "AngularMiner",
    "batch_easy_hard": "BatchEasyHardMiner",
    "distance_weighted": "DistanceWeightedMiner",
    "hdc": "HDCMiner",
    "pair_margin": "PairMarginMiner",
    "triplet_margin": "TripletMarginMiner",
    "uniform_histogram": "UniformHistogramMiner",
}


@pytest.mark.parametrize("name", PML_CLASSES)
@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0], [0]], ids=["distinct", "one-class", "one"])
def test_batches_without_positives_or_negatives_mine_as_much_as_pml(name, labels):
    """Nothing to mine on one side: as many tuples as PML (none, or every pair of the other side),
    as int64 index tensors."""
    emb, _ = batch(0, n=len(labels))
    labels = torch.tensor(labels)
    ours = mine(dmlkit.get_registry().build("miner", name), emb, labels)
    theirs = pml(getattr(pml_miners, PML_CLASSES[name])(), emb, labels)
    assert [len(t) for t in ours] == [len(t) for t in theirs]
    assert all(t.dtype == torch.long for t in ours)


@pytest.mark.parametrize(
    "miner, options, few",
    [
        ("pair_margin", {"pos_margin": 1.7, "neg_margin": 0.6}, True),
        ("batch_easy_hard", {}, True),
        ("uniform_histogram", {"num_bins": 5, "pos_per_bin": 4, "neg_per_bin": 4}, True),  # repeats
        ("pair_margin", {}, False),
        ("triplet_margin", {}, False),
    ],
)
def test_contrastive_over_a_miners_pairs_counts_each_distinct_valid_pair_once(miner, options, few):
    """The contrastive loss gathers a miner's few pairs, and masks many (plugins/losses.py): both
    give the value and gradient of the mean over the distinct mined pairs, computed here; equal
    to PML's ContrastiveLoss where the miner repeats no pair (PML counts repeats)."""
    emb, labels = batch(5)
    idx = mine(dmlkit.get_registry().build("miner", miner, **options), emb, labels)
    assert (sum(len(t) for t in idx) <= 32 * 32 // 8) == few  # the gathering path, or the masks
    loss = dmlkit.get_registry().build("loss", "contrastive", pos_margin=0.3, neg_margin=0.9)
    x = emb.clone().requires_grad_(True)
    value = loss.compute(x, labels, None, None, idx)
    value.backward()
    a1, p, a2, n = (idx[0], idx[1], idx[0], idx[2]) if len(idx) == 3 else idx
    y = emb.clone().requires_grad_(True)
    d = torch.cdist(F.normalize(y, dim=1), F.normalize(y, dim=1))
    pos = [(d[i, j] - 0.3).clamp_min(0) for i, j in sorted(as_set(a1, p)) if labels[i] == labels[j] and i != j]
    neg = [(0.9 - d[i, j]).clamp_min(0) for i, j in sorted(as_set(a2, n)) if labels[i] != labels[j]]
    expected = sum(pos) / max(1, sum(1 for v in pos if v > 0)) + sum(neg) / max(1, sum(1 for v in neg if v > 0))
    expected.backward()
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-10)
    if len(as_set(a1, p)) == len(a1) and len(as_set(a2, n)) == len(a2):
        pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
        assert float(value) == pytest.approx(float(pml_losses.ContrastiveLoss(0.3, 0.9)(emb, labels, idx)), rel=1e-10)
