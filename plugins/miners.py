"""Built-in miners: semi-hard (FaceNet), batch-hard, batch-all, multi-similarity pair mining, and
pytorch-metric-learning 2.9's (PML) angular, batch easy/hard, distance-weighted, HDC, pair-margin,
triplet-margin and uniform-histogram miners, each mining PML's set.

PML's miners compare embeddings by PML's default distance, the Euclidean distance of
L2-normalised embeddings (``normalize=False`` keeps the vectors as they are, for CCP).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import Miner, cosine_similarity, label_masks, pairwise_distance


def _distances(emb: Tensor, ref: Tensor | None, squared: bool, normalize: bool) -> Tensor:
    if normalize:
        emb = nn.functional.normalize(emb, dim=1)
        ref = None if ref is None else nn.functional.normalize(ref, dim=1)
    return pairwise_distance(emb, emb if ref is None else ref, squared=squared)


def _empty(device: torch.device, n: int = 3) -> tuple[Tensor, ...]:
    return tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(n))


class SemiHardMiner(Miner):
    """FaceNet's semi-hard negatives (Schroff et al. 2015), as the reference TF code picks them.

    For every anchor-positive pair: the closest negative farther than the positive; where
    no negative is farther, the farthest negative. One triplet per positive pair; sorting
    each anchor's negatives once makes it O(n m log m), with no [pairs, m] tensor.

    Args:
        squared: squared Euclidean distances (FaceNet's).
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, squared: bool = True, normalize: bool = True):
        super().__init__()
        self.squared, self.normalize = squared, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _distances(emb, ref, self.squared, self.normalize)
        pos, neg = label_masks(labels, ref_labels)
        a, p = pos.nonzero(as_tuple=True)
        n_neg = neg.sum(1)
        keep = n_neg[a] > 0
        a, p = a[keep], p[keep]
        if a.numel() == 0:
            return _empty(emb.device)
        neg_dist = dist.masked_fill(~neg, math.inf)
        sorted_d, order = neg_dist.sort(dim=1)
        # for every (anchor, j): the first negative strictly farther than d(anchor, j)
        where = torch.searchsorted(sorted_d, dist.contiguous(), right=True)[a, p]
        fallback = n_neg[a] - 1  # the farthest negative
        col = torch.where(where < n_neg[a], where, fallback)
        return a, p, order[a, col]


class BatchHardMiner(Miner):
    """Batch-hard (Hermans et al. 2017): per anchor, its farthest positive and closest negative.

    Args:
        squared: squared Euclidean distances.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, squared: bool = False, normalize: bool = True):
        super().__init__()
        self.squared, self.normalize = squared, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _distances(emb, ref, self.squared, self.normalize)
        pos, neg = label_masks(labels, ref_labels)
        ok = pos.any(1) & neg.any(1)
        a = ok.nonzero(as_tuple=True)[0]
        p = dist.masked_fill(~pos, -math.inf).argmax(1)[a]
        n = dist.masked_fill(~neg, math.inf).argmin(1)[a]
        return a, p, n


class BatchAllMiner(Miner):
    """Every valid triplet; with ``only_violating`` just those inside the margin (loss > 0).

    Args:
        margin: the triplet margin that decides which triplets violate it.
        only_violating: keep only triplets inside the margin (loss > 0).
        squared: squared Euclidean distances.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, margin: float = 0.2, only_violating: bool = False, squared: bool = True, normalize: bool = True):
        super().__init__()
        if margin < 0:
            raise OptionError(f"margin must be >= 0; got {margin}")
        self.margin, self.only_violating, self.squared, self.normalize = margin, only_violating, squared, normalize

    def mine(self, emb, labels, ref, ref_labels):
        pos, neg = label_masks(labels, ref_labels)
        a, p = pos.nonzero(as_tuple=True)
        valid = neg[a]
        if self.only_violating:
            dist = _distances(emb, ref, self.squared, self.normalize)
            valid = valid & (dist[a, p][:, None] - dist[a] + self.margin > 0)
        i, n = valid.nonzero(as_tuple=True)
        return a[i], p[i], n


class MultiSimilarityMiner(Miner):
    """Multi-Similarity pair mining (Wang et al. 2019), cosine similarity.

    Keeps negatives with s + epsilon > the anchor's hardest positive similarity and
    positives with s - epsilon < its hardest negative similarity. Returns pairs.

    Args:
        epsilon: the slack of the paper's mining rule: a negative is kept if more similar than the hardest positive minus epsilon, a positive if less similar than the hardest negative plus epsilon.
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if epsilon < 0:
            raise OptionError(f"epsilon must be >= 0; got {epsilon}")
        self.epsilon = epsilon

    def mine(self, emb, labels, ref, ref_labels):
        sim = cosine_similarity(emb, emb if ref is None else ref)
        pos, neg = label_masks(labels, ref_labels)
        min_pos = sim.masked_fill(~pos, math.inf).min(1, keepdim=True).values
        max_neg = sim.masked_fill(~neg, -math.inf).max(1, keepdim=True).values
        keep_neg = neg & (sim + self.epsilon > min_pos)
        keep_pos = pos & (sim - self.epsilon < max_neg)
        a1, p = keep_pos.nonzero(as_tuple=True)
        a2, n = keep_neg.nonzero(as_tuple=True)
        return a1, p, a2, n


# ------------------------------------------------------------------------------------- PML's miners
def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _pml_distances(emb: Tensor, ref: Tensor | None, normalize: bool) -> Tensor:
    """PML's default distance: Euclidean, between L2-normalised embeddings, computed as PML does
    (``torch.cdist``), so that ties (d(i, j) = d(j, i)) break as in PML."""
    if normalize:
        emb = nn.functional.normalize(emb, dim=1)
        ref = None if ref is None else nn.functional.normalize(ref, dim=1)
    return torch.cdist(emb, emb if ref is None else ref)


def _pair_lists(labels: Tensor, ref_labels: Tensor | None) -> tuple[Tensor, ...]:
    """Every positive and every negative pair, (a1, p, a2, n), in PML's (row-major) order."""
    pos, neg = label_masks(labels, ref_labels)
    return (*pos.nonzero(as_tuple=True), *neg.nonzero(as_tuple=True))


def _triplets_where(labels: Tensor, ref_labels: Tensor | None, keep) -> tuple[Tensor, ...]:
    """The triplets (a, p, n) for which ``keep(a, p)`` ([pairs, m], one row per positive pair,
    one column per candidate negative) holds, in PML's (a, p, n) order, without [n, m, m] tensors."""
    pos, neg = label_masks(labels, ref_labels)
    a, p = pos.nonzero(as_tuple=True)
    i, n = (neg[a] & keep(a, p)).nonzero(as_tuple=True)
    return a[i], p[i], n


class AngularMiner(Miner):
    """Triplets whose angle at the negative exceeds ``angle`` degrees (the angular loss's
    criterion: Wang, Zhou, Wen, Liu, Lin, "Deep Metric Learning with Angular Loss", ICCV 2017),
    as PML's ``AngularMiner``: tan(angle) = |a - p| / (2 |n - c|), c = (a + p) / 2; like PML
    (``torch.nn.functional.pairwise_distance``) each difference is shifted by 1e-6 before its
    norm. Computed from Gram matrices, one [positive pairs, m] block, where PML gathers three
    [triplets, D] tensors.

    Differs from PML: PML declares a distance on L2-normalised embeddings but measures the
    angles on the embeddings as given; dmlkit normalises them first (the angular loss's
    setting), and ``normalize=False`` gives PML's set on the raw embeddings.

    Args:
        angle: the threshold angle in degrees, in [0, 90).
        normalize: L2-normalise the embeddings first (False: PML's computation on raw embeddings).
    """

    EPS = 1e-6  # torch.nn.functional.pairwise_distance's default

    def __init__(self, angle: float = 20.0, normalize: bool = True):
        super().__init__()
        _check(0 <= angle < 90, f"angular: angle is in degrees, in [0, 90); got {angle}")
        self.angle, self.normalize = angle, normalize

    def mine(self, emb, labels, ref, ref_labels):
        x = nn.functional.normalize(emb, dim=1) if self.normalize else emb
        r = x if ref is None else (nn.functional.normalize(ref, dim=1) if self.normalize else ref)
        eps, dim = self.EPS, x.shape[1]
        sx, sr, nx, nr = x.sum(1), r.sum(1), (x * x).sum(1), (r * r).sum(1)
        xr, rr = x @ r.T, r @ r.T
        threshold = math.radians(self.angle)

        def keep(a, p):
            # |a - p + eps|^2 and |n - c + eps|^2 expanded, so no [triplets, D] tensor is needed
            ap2 = nx[a] + nr[p] - 2 * xr[a, p] + 2 * eps * (sx[a] - sr[p]) + dim * eps**2
            c2 = (nx[a] + nr[p] + 2 * xr[a, p]) / 4
            sc = (sx[a] + sr[p]) / 2
            nc2 = nr[None, :] + c2[:, None] - (xr[a] + rr[p]) + 2 * eps * (sr[None, :] - sc[:, None]) + dim * eps**2
            ap, nc = ap2.clamp_min(0).sqrt(), nc2.clamp_min(0).sqrt()
            return torch.atan(ap[:, None] / (2 * nc)) > threshold

        return _triplets_where(labels, ref_labels, keep)


class BatchEasyHardMiner(Miner):
    """Per anchor, one positive and one negative picked by strategy (Xuan et al.,
    "Improved Embeddings with Easy Positive Triplet Mining", WACV 2020), as PML's
    ``BatchEasyHardMiner``: positives ``easy`` (closest), ``hard`` (farthest), ``semihard``
    (farthest closer than the chosen negative) or ``all``; negatives ``hard`` (closest),
    ``easy`` (farthest), ``semihard`` (closest farther than the chosen positive) or ``all``.
    Distances outside ``allowed_pos_range`` / ``allowed_neg_range`` ([low, high]) are never
    picked. Returns pairs (a1, p, a2, n); an anchor without an allowed pick is dropped.

    Args:
        pos_strategy: ``easy``, ``hard``, ``semihard`` or ``all``.
        neg_strategy: ``semihard``, ``hard``, ``easy`` or ``all``.
        allowed_pos_range: [low, high] distances a positive may have (none: any).
        allowed_neg_range: [low, high] distances a negative may have (none: any).
        normalize: L2-normalise the embeddings first.
    """

    STRATEGIES = ("hard", "semihard", "easy", "all")

    def __init__(
        self,
        pos_strategy: str = "easy",
        neg_strategy: str = "semihard",
        allowed_pos_range: list[float] | None = None,
        allowed_neg_range: list[float] | None = None,
        normalize: bool = True,
    ):
        super().__init__()
        for name, value in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
            _check(value in self.STRATEGIES, f"batch_easy_hard: {name} must be one of {', '.join(self.STRATEGIES)}")
        _check(
            not pos_strategy == neg_strategy == "semihard",
            "batch_easy_hard: pos_strategy and neg_strategy cannot both be 'semihard'",
        )
        _check(
            {pos_strategy, neg_strategy} != {"semihard", "all"},
            "batch_easy_hard: 'semihard' cannot be combined with 'all' (it needs one pick on the other side)",
        )
        for name, rng in (("allowed_pos_range", allowed_pos_range), ("allowed_neg_range", allowed_neg_range)):
            _check(
                rng is None or (len(rng) == 2 and rng[0] <= rng[1]),
                f"batch_easy_hard: {name} must be [low, high] with low <= high; got {rng}",
            )
        self.pos_strategy, self.neg_strategy = pos_strategy, neg_strategy
        self.allowed_pos_range, self.allowed_neg_range, self.normalize = allowed_pos_range, allowed_neg_range, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _pml_distances(emb, ref, self.normalize)
        pos, neg = label_masks(labels, ref_labels)
        ps, ns = self.pos_strategy, self.neg_strategy
        # the farthest positive is the hard one, the closest negative the hard one
        pos_pick = "min" if ps == "easy" else "max"
        neg_pick = "max" if ns == "easy" else "min"
        picked = {}
        if ps == "semihard":
            picked["n"] = _pick(dist, neg, neg_pick, self.allowed_neg_range)
            picked["p"] = _pick(dist, pos, pos_pick, self.allowed_pos_range, below=picked["n"][0])
        elif ns == "semihard":
            picked["p"] = _pick(dist, pos, pos_pick, self.allowed_pos_range)
            picked["n"] = _pick(dist, neg, neg_pick, self.allowed_neg_range, above=picked["p"][0])
        else:
            if ps != "all":
                picked["p"] = _pick(dist, pos, pos_pick, self.allowed_pos_range)
            if ns != "all":
                picked["n"] = _pick(dist, neg, neg_pick, self.allowed_neg_range)
        if "p" in picked and "n" in picked:
            a = (picked["p"][2] & picked["n"][2]).nonzero(as_tuple=True)[0]
            return a, picked["p"][1][a], a, picked["n"][1][a]
        a1, p, a2, n = _pair_lists(labels, ref_labels)
        if "p" in picked:
            a1 = picked["p"][2].nonzero(as_tuple=True)[0]
            p = picked["p"][1][a1]
        if "n" in picked:
            a2 = picked["n"][2].nonzero(as_tuple=True)[0]
            n = picked["n"][1][a2]
        return a1, p, a2, n


def _pick(
    dist: Tensor,
    valid: Tensor,
    how: str,
    allowed: list[float] | None,
    below: Tensor | None = None,
    above: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the smallest (``min``) or largest (``max``) valid distance, restricted to distances
    strictly ``below`` / ``above`` a per-row threshold and inside ``allowed``: (values, columns,
    rows that had a candidate)."""
    ok = valid
    if below is not None:
        ok = ok & (dist < below[:, None])
    if above is not None:
        ok = ok & (dist > above[:, None])
    if allowed is not None:
        ok = ok & (dist >= allowed[0]) & (dist <= allowed[1])
    if how == "min":
        values, cols = dist.masked_fill(~ok, math.inf).min(1)
    else:
        values, cols = dist.masked_fill(~ok, -math.inf).max(1)
    return values, cols, ok.any(1)


class DistanceWeightedMiner(Miner):
    """Distance-weighted sampling (Wu, Manmatha, Smola, Krahenbuhl, "Sampling Matters in Deep
    Embedding Learning", ICCV 2017), as PML's ``DistanceWeightedMiner``: each negative is drawn
    with probability proportional to 1 / q(d), q the density of distances between uniform points
    on the unit sphere of dimension D, with d clipped below at ``cutoff`` and negatives at
    ``nonzero_loss_cutoff`` or farther left out. Each anchor gets as many triplets as its class
    has items in the reference set (PML's count), each with a uniformly drawn positive.

    Random, from torch's global generator: the same distribution as PML's (same weights, same
    triplets per anchor), drawn in one vectorised call rather than PML's loop over classes, so a
    seed does not give PML's exact draw. Like PML, the weights underflow to 0 for far negatives
    in high dimension (exp of a large negative log-weight), leaving the closest ones.

    Args:
        cutoff: distances below this count as this (limits the weight of very close negatives).
        nonzero_loss_cutoff: negatives at this distance or farther are never drawn.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, normalize: bool = True):
        super().__init__()
        _check(cutoff > 0, f"distance_weighted: cutoff must be > 0; got {cutoff}")
        _check(
            nonzero_loss_cutoff > cutoff,
            f"distance_weighted: nonzero_loss_cutoff must be > cutoff; got {nonzero_loss_cutoff} <= {cutoff}",
        )
        self.cutoff, self.nonzero_loss_cutoff, self.normalize = float(cutoff), float(nonzero_loss_cutoff), normalize

    def weights(self, emb: Tensor, labels: Tensor, ref: Tensor | None, ref_labels: Tensor | None) -> Tensor:
        """[n, m] sampling probabilities of each negative per anchor, PML's (a row with none is NaN)."""
        dim = float(emb.shape[1])
        dist = _pml_distances(emb, ref, self.normalize).clamp_min(self.cutoff)
        log_w = (2.0 - dim) * torch.log(dist) - ((dim - 3) / 2) * torch.log(1.0 - 0.25 * dist**2)
        bad = torch.isinf(log_w) | torch.isnan(log_w)
        same = labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]
        log_w = log_w.masked_fill(same, 0.0)  # PML multiplies by the mask: same-class entries count as 0
        w = torch.exp(log_w - log_w[~bad].max()) * (~same & (dist < self.nonzero_loss_cutoff))
        w = w.masked_fill(bad, 0.0)
        return w / w.sum(1, keepdim=True)

    def mine(self, emb, labels, ref, ref_labels):
        w = self.weights(emb, labels, ref, ref_labels)
        pos, neg = label_masks(labels, ref_labels)
        class_size = pos.sum(1) + (1 if ref is None else 0)  # PML's k: the class's items in the reference set
        need = 2 if ref is None else 1
        ok = (class_size >= need) & neg.any(1) & (w.sum(1) > 0)  # a NaN row (no weight) fails the last test
        a = ok.nonzero(as_tuple=True)[0]
        if a.numel() == 0:
            return _empty(emb.device)
        ends = class_size[a].cumsum(0)  # each anchor repeated class_size times (repeat_interleave is slow on CPU)
        a = a[torch.searchsorted(ends, torch.arange(int(ends[-1]), device=a.device), right=True)]
        p = torch.multinomial(pos[a].to(w.dtype), 1).squeeze(1)
        n = torch.multinomial(w[a], 1).squeeze(1)
        return a, p, n


class HDCMiner(Miner):
    """Hard-aware deeply cascaded mining (Yuan, Yang, Zhang, "Hard-Aware Deeply Cascaded Embedding",
    ICCV 2017), one stage, as PML's ``HDCMiner``: the ``filter_percentage`` farthest positive
    pairs and closest negative pairs (rounded up). Returns pairs.

    Args:
        filter_percentage: the share of positive and of negative pairs kept, in (0, 1].
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, filter_percentage: float = 0.5, normalize: bool = True):
        super().__init__()
        _check(0 < filter_percentage <= 1, f"hdc: filter_percentage must be in (0, 1]; got {filter_percentage}")
        self.filter_percentage, self.normalize = filter_percentage, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _pml_distances(emb, ref, self.normalize)
        a1, p, a2, n = _pair_lists(labels, ref_labels)
        a1, p = self._hardest(dist, a1, p, largest=True)
        a2, n = self._hardest(dist, a2, n, largest=False)
        return a1, p, a2, n

    def _hardest(self, dist: Tensor, a: Tensor, b: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
        if a.numel() == 0:
            return a, b
        k = math.ceil(self.filter_percentage * a.numel())
        idx = torch.topk(dist[a, b], k, largest=largest).indices
        return a[idx], b[idx]


class PairMarginMiner(Miner):
    """Pairs that violate a contrastive margin (Hadsell, Chopra, LeCun, CVPR 2006), as PML's
    ``PairMarginMiner``: positives farther than ``pos_margin``, negatives closer than
    ``neg_margin``. Returns pairs.

    Args:
        pos_margin: positive pairs farther than this are mined.
        neg_margin: negative pairs closer than this are mined.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, normalize: bool = True):
        super().__init__()
        _check(
            pos_margin >= 0 and neg_margin >= 0, f"pair_margin: margins must be >= 0; got {pos_margin}, {neg_margin}"
        )
        self.pos_margin, self.neg_margin, self.normalize = pos_margin, neg_margin, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _pml_distances(emb, ref, self.normalize)
        pos, neg = label_masks(labels, ref_labels)
        a1, p = (pos & (dist > self.pos_margin)).nonzero(as_tuple=True)
        a2, n = (neg & (dist < self.neg_margin)).nonzero(as_tuple=True)
        return a1, p, a2, n


class TripletMarginMiner(Miner):
    """Triplets typed by their margin m = d(a, n) - d(a, p), as PML's ``TripletMarginMiner``:
    ``all`` m <= margin (they violate it), ``hard`` m <= 0 (the negative is not farther than
    the positive), ``semihard`` 0 < m <= margin, ``easy`` m > margin. Euclidean distance of
    L2-normalised embeddings, not squared. PML's ``semihard`` keeps every such triplet; the
    ``semihard`` miner (FaceNet's) keeps one negative per positive pair.

    Args:
        margin: the margin that d(a, n) - d(a, p) is compared with.
        type_of_triplets: ``all``, ``hard``, ``semihard`` or ``easy``.
        normalize: L2-normalise the embeddings first.
    """

    TYPES = ("all", "hard", "semihard", "easy")

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", normalize: bool = True):
        super().__init__()
        _check(
            type_of_triplets in self.TYPES,
            f"triplet_margin: type_of_triplets must be one of {', '.join(self.TYPES)}; got {type_of_triplets!r}",
        )
        _check(margin >= 0, f"triplet_margin: margin must be >= 0; got {margin}")
        self.margin, self.type_of_triplets, self.normalize = margin, type_of_triplets, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _pml_distances(emb, ref, self.normalize)
        kind, margin = self.type_of_triplets, self.margin

        def keep(a, p):
            m = dist[a] - dist[a, p][:, None]
            if kind == "easy":
                return m > margin
            if kind == "hard":
                return m <= min(margin, 0.0)
            if kind == "semihard":
                return (m > 0) & (m <= margin)
            return m <= margin

        return _triplets_where(labels, ref_labels, keep)


class UniformHistogramMiner(Miner):
    """Pairs spread evenly over their distance range, as PML's ``UniformHistogramMiner``: the
    positive (and the negative) pair distances are cut into ``num_bins`` equal bins between
    their minimum and maximum, and ``pos_per_bin`` (``neg_per_bin``) pairs are drawn, with
    replacement, from each non-empty bin. Returns pairs (repeats included).

    Random, from torch's global generator: the same bins and counts as PML's, each draw uniform
    within its bin, drawn in one vectorised call rather than PML's loop over bins, so a seed
    does not give PML's exact draw.

    Args:
        num_bins: number of equal-width distance bins.
        pos_per_bin: positive pairs drawn from each non-empty bin.
        neg_per_bin: negative pairs drawn from each non-empty bin.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, num_bins: int = 100, pos_per_bin: int = 10, neg_per_bin: int = 10, normalize: bool = True):
        super().__init__()
        _check(num_bins >= 1, f"uniform_histogram: num_bins must be >= 1; got {num_bins}")
        _check(
            pos_per_bin >= 1 and neg_per_bin >= 1,
            f"uniform_histogram: pos_per_bin and neg_per_bin must be >= 1; got {pos_per_bin}, {neg_per_bin}",
        )
        self.num_bins, self.pos_per_bin, self.neg_per_bin, self.normalize = (
            num_bins,
            pos_per_bin,
            neg_per_bin,
            normalize,
        )

    def mine(self, emb, labels, ref, ref_labels):
        dist = _pml_distances(emb, ref, self.normalize)
        a1, p, a2, n = _pair_lists(labels, ref_labels)
        if a1.numel():
            keep = self._uniform(dist[a1, p], self.pos_per_bin)
            a1, p = a1[keep], p[keep]
        if a2.numel():
            keep = self._uniform(dist[a2, n], self.neg_per_bin)
            a2, n = a2[keep], n[keep]
        return a1, p, a2, n

    def bins(self, values: Tensor) -> Tensor:
        """The bin of each value: PML's ``edges[i] <= v < edges[i + 1]``, the last bin closed."""
        edges = torch.linspace(values.min(), values.max(), self.num_bins + 1, device=values.device, dtype=values.dtype)
        return (torch.bucketize(values, edges, right=True) - 1).clamp(0, self.num_bins - 1)

    def _uniform(self, values: Tensor, per_bin: int) -> Tensor:
        b = self.bins(values)
        order = torch.argsort(b, stable=True)
        counts = torch.bincount(b, minlength=self.num_bins)
        starts = counts.cumsum(0) - counts
        full = counts.nonzero(as_tuple=True)[0]
        size = counts[full][:, None]
        draw = (torch.rand(len(full), per_bin, device=values.device) * size).long().clamp_max(size - 1)
        return order[(starts[full][:, None] + draw).flatten()]


@dmlkit.hookimpl
def register_miners(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "semihard",
            SemiHardMiner,
            "Semi-hard negatives with FaceNet's fallback (Schroff et al. 2015)",
            aliases=("semi_hard",),
        )
    )
    register(
        ComponentSpec("batch_hard", BatchHardMiner, "Hardest positive and negative per anchor (Hermans et al. 2017)")
    )
    register(ComponentSpec("batch_all", BatchAllMiner, "All valid triplets, optionally only violating ones"))
    register(
        ComponentSpec(
            "multi_similarity", MultiSimilarityMiner, "Multi-Similarity pair mining (Wang et al. 2019)", aliases=("ms",)
        )
    )
    register(ComponentSpec("angular", AngularMiner, "Triplets past an angle at the negative (Wang et al. 2017)"))
    register(
        ComponentSpec(
            "batch_easy_hard",
            BatchEasyHardMiner,
            "One positive and negative per anchor by easy/hard/semihard strategy (Xuan et al. 2020)",
        )
    )
    register(
        ComponentSpec(
            "distance_weighted",
            DistanceWeightedMiner,
            "Negatives drawn by inverse distance density (Wu et al. 2017)",
        )
    )
    register(ComponentSpec("hdc", HDCMiner, "Hardest share of positive and negative pairs (Yuan et al. 2017)"))
    register(ComponentSpec("pair_margin", PairMarginMiner, "Pairs violating positive/negative margins"))
    register(
        ComponentSpec(
            "triplet_margin",
            TripletMarginMiner,
            "Triplets typed all/hard/semihard/easy by their margin (PML's TripletMarginMiner)",
        )
    )
    register(
        ComponentSpec(
            "uniform_histogram", UniformHistogramMiner, "Pairs drawn evenly over the distance histogram's bins"
        )
    )
