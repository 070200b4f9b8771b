"""Ranking and histogram losses, each equal to its pytorch-metric-learning 2.9 class (PML):
FastAP, Smooth-AP, PNP, Histogram, Threshold-Consistent Margin, Dynamic Soft Margin.

Where PML builds [N, N, N] tensors (Smooth-AP, PNP) or one histogram pulse per bin and pair
(FastAP), these compute the same numbers from [N, m, N] / [pairs, N] tensors or two
scatter-adds. Where PML has a bug, the docstring says so and what dmlkit does instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import (
    Indices,
    MetricLoss,
    label_masks,
    pair_masks,
    pairs_to_triplets,
    pairwise_distance,
    triplets_to_pairs,
    zero_loss,
)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _no_reference(name: str, ref: Tensor | None) -> None:
    if ref is not None:
        raise ValueError(
            f"{name} ranks each item against the rest of its own batch and takes no reference set "
            "(ref_embeddings); use it without a cross-batch memory or CCP, or pick a pair loss"
        )


def _unit(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=1) if normalize else x


def _in_range(name: str, what: str, values: Tensor, low: float, high: float) -> None:
    """Refuse values a histogram over [low, high] cannot place (embeddings not normalised)."""
    lo, hi = float(values.min()), float(values.max())
    if lo < low - 1e-5 or hi > high + 1e-5:
        raise ValueError(
            f"{name}: with normalize=False the {what} must lie in [{low:g}, {high:g}] (vectors in the unit "
            f"ball); got [{lo:.4g}, {hi:.4g}]: normalise the embeddings or set normalize=true"
        )


def _similarity(emb: Tensor, other: Tensor, normalize: bool) -> Tensor:
    """Cosine similarity (PML's CosineSimilarity), or the dot product with ``normalize=False``."""
    return _unit(emb, normalize) @ _unit(other, normalize).T


def _miner_weights(indices: Indices | None, n: int, like: Tensor) -> Tensor:
    """PML's ``convert_to_weights``: each batch item weighted by how often it occurs in the mined
    tuple, over the most frequent item's count (all ones without indices or with an empty tuple)."""
    weights = torch.zeros(n, dtype=like.dtype, device=like.device)
    if indices is None or all(len(t) == 0 for t in indices):
        return weights + 1
    items, counts = torch.unique(torch.cat(list(indices)), return_counts=True)
    weights[items] = counts.to(like.dtype) / counts.max()
    return weights


# -------------------------------------------------------------------------------------------- FastAP
def _soft_histogram(t: Tensor, weight: Tensor, nodes: int) -> Tensor:
    """Per row, triangular-kernel counts at the integer nodes 0 .. nodes-1: each value ``t`` (in bin
    widths) gives 1 - frac(t) to node floor(t) and frac(t) to the next; beyond the last node it
    counts nothing. Equal to summing PML's ``relu(1 - |t - k|)`` pulses, in two scatter-adds."""
    lo = t.detach().floor()
    frac = t - lo
    lo = lo.long()
    hist = t.new_zeros(t.shape[0], nodes + 1)  # the last column collects what falls past the last node
    hist.scatter_add_(1, lo.clamp(0, nodes), (1 - frac) * weight)
    hist.scatter_add_(1, (lo + 1).clamp(0, nodes), frac * weight)
    return hist[:, :nodes]


class FastAPLoss(MetricLoss):
    """FastAP (Cakir, He, Xia, Kulis, Sclaroff, "Deep Metric Learning to Rank", CVPR 2019).

    Each anchor ranks the rest of the batch by squared Euclidean distance of L2-normalised
    embeddings (range [0, 4]); a soft histogram of ``num_bins`` bins (triangular kernels)
    turns the ranking into an average precision; the loss is the mean over anchors with a
    positive of 1 - FastAP. Mined indices weight each anchor by how often it occurs in them
    (PML's ``convert_to_weights``). No reference set (as in PML): the batch ranks itself.
    Same numbers as PML's ``FastAPLoss``, without its [bins, N, N] pulse tensor.

    Args:
        num_bins: histogram bins over the distance range [0, 4].
        normalize: L2-normalise the embeddings first (off: they must lie in the unit ball).
    """

    def __init__(self, num_bins: int = 10, normalize: bool = True):
        super().__init__()
        _check(num_bins >= 1, f"fastap: num_bins must be >= 1; got {num_bins}")
        self.num_bins, self.normalize = int(num_bins), normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _no_reference("fastap", ref)
        x = _unit(emb, self.normalize)
        pos, neg = label_masks(labels, None)
        n_pos = pos.sum(1)
        with_pos = n_pos > 0
        if not bool(with_pos.any()):
            return zero_loss(emb)
        dist = pairwise_distance(x, x, squared=True)
        if not self.normalize:
            _in_range("fastap", "squared distances", dist, 0.0, 4.0)
        t = dist / (4.0 / self.num_bins)  # distance in bin widths
        nodes = self.num_bins + 1
        pos_hist = _soft_histogram(t, pos.to(t.dtype), nodes)
        all_hist = _soft_histogram(t, (pos | neg).to(t.dtype), nodes)
        h_pos = pos_hist * pos_hist.cumsum(1)
        total = all_hist.cumsum(1)
        ok = (h_pos > 0) & (total > 0)
        if not bool(ok.any()):
            return zero_loss(emb)
        fast_ap = torch.where(ok, h_pos / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(h_pos))
        fast_ap = fast_ap.sum(1)[with_pos] / n_pos[with_pos]
        weights = _miner_weights(indices, len(emb), fast_ap)[with_pos]
        return ((1 - fast_ap) * weights).mean()


# ----------------------------------------------------------------------------------------- Smooth-AP
def _class_groups(labels: Tensor) -> Tensor:
    """[N, m]: the batch positions of each item's class (itself included); every class must have m."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if bool((counts != counts[0]).any()):
        sizes = sorted({int(c) for c in counts})
        raise ValueError(
            f"smooth_ap needs the same number of samples of every class in a batch, got {sizes}: "
            "use --sampler m_per_class (P classes x m samples, batch_size a multiple of m)"
        )
    order = torch.argsort(inverse, stable=True)
    return order.view(len(counts), int(counts[0]))[inverse]


class SmoothAPLoss(MetricLoss):
    """Smooth-AP (Brown, Xie, Kalogeiton, Zisserman, ECCV 2020): average precision with the rank
    indicator replaced by a sigmoid of temperature ``temperature``, on cosine similarity.

    For each anchor i with class members G (i itself included, as in the authors' code and PML):
    AP_i = 1/|G| sum_{j in G} (1 + sum_{k in G, k != j} s(k, j)) / (1 + sum_{k != j} s(k, j)),
    s(k, j) = sigmoid((sim_ik - sim_ij) / temperature); the loss is the mean of 1 - AP_i, each
    weighted by mined indices as in PML. Every class in a batch must have the same number of
    samples (the ``m_per_class`` sampler): a batch that does not is refused. No reference set.

    Differs from PML: PML reshapes the batch into blocks of P items, P the number of classes,
    and treats each block as one class, so its value is right only when the batch is sorted by
    class and m == P. dmlkit finds each item's class members from the labels, in any order.

    Args:
        temperature: sigmoid temperature (0.01, the paper's and PML's default).
        normalize: cosine similarity (True) or the dot product (False).
    """

    def __init__(self, temperature: float = 0.01, normalize: bool = True):
        super().__init__()
        _check(temperature > 0, f"smooth_ap: temperature must be > 0; got {temperature}")
        self.temperature, self.normalize = temperature, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _no_reference("smooth_ap", ref)
        groups = _class_groups(labels)  # [N, m]
        m = groups.shape[1]
        sim = _similarity(emb, emb, self.normalize)
        sim_pos = sim.gather(1, groups)  # sim_ij for the m members j of i's class
        # rank of each member j among the whole batch: [N, m, N], k == j left out
        not_j = torch.arange(len(emb), device=emb.device)[None, None, :] != groups[:, :, None]
        all_rank = 1 + (torch.sigmoid((sim[:, None, :] - sim_pos[:, :, None]) / self.temperature) * not_j).sum(2)
        # rank among the class members: [N, m, m], k == j left out
        off = ~torch.eye(m, dtype=torch.bool, device=emb.device)
        pos_rank = 1 + (torch.sigmoid((sim_pos[:, None, :] - sim_pos[:, :, None]) / self.temperature) * off).sum(2)
        ap = (pos_rank / all_rank).sum(1) / m
        return ((1 - ap) * _miner_weights(indices, len(emb), ap)).mean()


# ----------------------------------------------------------------------------------------------- PNP
class PNPLoss(MetricLoss):
    """PNP: penalise only the negatives ranked before each positive (Li et al., "Rethinking the
    Optimization of Average Precision: Only Penalizing Negative Instances before Positive Ones is
    Enough", AAAI 2022), on cosine similarity.

    For anchor i and positive j (i itself included), R_ij = sum over negatives k of
    sigmoid((sim_ik - sim_ij) / anneal); the loss is the mean over anchors with a positive of
    the mean over positives of f(R): ``O`` R, ``Ds`` log(1 + R), ``Dq`` 1 - mean
    1 / (1 + R)^alpha, ``Iu`` (1 + R) log(1 + R), ``Ib`` (b R - log(1 + b R)) / b^2. PML's
    default variant is ``O``; the paper favours the decreasing-gradient ones (``Ds``, ``Dq``).
    No reference set (as in PML).

    Differs from PML: PML refuses mined indices; dmlkit restricts each anchor's positives and
    negatives to the mined pairs (triplets count as their two pairs), its own item staying a
    positive of every anchor with a mined positive.

    Args:
        b: the slope of the ``Ib`` variant.
        alpha: the exponent of the ``Dq`` variant.
        anneal: the sigmoid temperature.
        variant: one of ``O``, ``Ds``, ``Dq``, ``Iu``, ``Ib``.
        normalize: cosine similarity (True) or the dot product (False).
    """

    VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")

    def __init__(
        self, b: float = 2.0, alpha: float = 1.0, anneal: float = 0.01, variant: str = "O", normalize: bool = True
    ):
        super().__init__()
        _check(variant in self.VARIANTS, f"pnp: variant must be one of {', '.join(self.VARIANTS)}; got {variant!r}")
        _check(anneal > 0, f"pnp: anneal must be > 0; got {anneal}")
        _check(b > 0, f"pnp: b must be > 0; got {b}")
        _check(alpha > 0, f"pnp: alpha must be > 0; got {alpha}")
        self.b, self.alpha, self.anneal, self.variant, self.normalize = b, alpha, anneal, variant, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _no_reference("pnp", ref)
        n = len(emb)
        pos, neg = pair_masks(labels, None, indices, n, n, emb.device)
        with_pos = pos.any(1)
        if not bool(with_pos.any()):
            return zero_loss(emb)
        pos = pos | torch.diag(with_pos)  # each anchor is its own positive (PML's I_pos diagonal)
        a, p = pos.nonzero(as_tuple=True)
        sim = _similarity(emb, emb, self.normalize)
        # sigmoid((sim_ik - sim_ij) / anneal) over the anchor's negatives k: [pairs, N]. PML clips the
        # exponent to +-50 (against overflow, which torch.sigmoid avoids): a change below 2e-22
        rank = (torch.sigmoid((sim[a] - sim[a, p][:, None]) / self.anneal) * neg[a]).sum(1)
        f = self._transform(rank)
        per_anchor = torch.zeros(n, dtype=f.dtype, device=f.device).index_add(0, a, f) / pos.sum(1).clamp_min(1)
        loss = per_anchor[with_pos].mean()
        return 1 - loss if self.variant == "Dq" else loss

    def _transform(self, r: Tensor) -> Tensor:
        if self.variant == "Ds":
            return torch.log(1 + r)
        if self.variant == "Dq":
            return 1 / (1 + r) ** self.alpha
        if self.variant == "Iu":
            return (1 + r) * torch.log(1 + r)
        if self.variant == "Ib":
            return (self.b * r - torch.log(1 + self.b * r)) / self.b**2
        return r


# ----------------------------------------------------------------------------------------- histogram
class HistogramLoss(MetricLoss):
    """Histogram loss (Ustinova, Lempitsky, "Learning Deep Embeddings with Histogram Loss", NeurIPS 2016).

    Soft histograms (linear interpolation onto nodes -1, -1 + delta, ..., 1) of the cosine
    similarities of the distinct positive and negative pairs of the batch's triplets; the loss
    is the probability that a negative pair is more similar than a positive one,
    sum_r p_neg(r) * CDF_pos(r). Mined triplets or pairs choose the pairs, as in PML. No
    reference set (as in PML). Give ``n_bins`` or ``delta`` (= 2 / n_bins); PML's default is 100
    bins.

    Differs from PML: a similarity of exactly 1 (duplicate embeddings) falls in the top bin, where
    PML raises an index error.

    Args:
        n_bins: number of histogram bins on [-1, 1] (default 100 when delta is not given).
        delta: the bin width, 2 / n_bins.
        normalize: cosine similarity (True) or the dot product (False: vectors in the unit ball).
    """

    def __init__(self, n_bins: int | None = None, delta: float | None = None, normalize: bool = True):
        super().__init__()
        if n_bins is None and delta is None:
            n_bins = 100
        if n_bins is not None:
            _check(n_bins >= 1, f"histogram: n_bins must be >= 1; got {n_bins}")
            _check(
                delta is None or math.isclose(delta, 2 / n_bins, rel_tol=1e-9),
                f"histogram: delta must be 2 / n_bins; got delta={delta}, n_bins={n_bins} (give one of them)",
            )
        self.delta = float(delta) if delta is not None else 2 / n_bins
        _check(0 < self.delta <= 2, f"histogram: delta must be in (0, 2]; got {self.delta}")
        self.nodes = round(1 + 2 / self.delta)
        self.normalize = normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _no_reference("histogram", ref)
        n = len(emb)
        if indices is None:
            pos, neg = label_masks(labels, None)
            anchor = pos.any(1) & neg.any(1)  # items that anchor at least one triplet
            upper = torch.ones(n, n, dtype=torch.bool, device=emb.device).triu(1)
            pos_pairs = pos & upper & anchor[:, None]
            neg_pairs = neg & upper & (anchor[:, None] | anchor[None, :])
            if not bool(anchor.any()):
                return zero_loss(emb)
        else:
            a, p, ng = pairs_to_triplets(indices)
            if len(a) == 0:
                return zero_loss(emb)
            pos_pairs = torch.zeros(n, n, dtype=torch.bool, device=emb.device)
            neg_pairs = torch.zeros_like(pos_pairs)
            pos_pairs[torch.minimum(a, p), torch.maximum(a, p)] = True  # unordered, each pair once
            neg_pairs[torch.minimum(a, ng), torch.maximum(a, ng)] = True
        sim = _similarity(emb, emb, self.normalize)
        if not self.normalize:
            _in_range("histogram", "dot products", sim, -1.0, 1.0)
        p_pos = self._density(sim[pos_pairs])
        p_neg = self._density(sim[neg_pairs])
        return (p_neg * p_pos.cumsum(0)).sum()

    def _density(self, s: Tensor) -> Tensor:
        r = torch.floor((s.detach() + 1) / self.delta).clamp(0, self.nodes - 2)
        upper = (s + 1 - r * self.delta) / self.delta
        lower = ((r + 1) * self.delta - 1 - s) / self.delta
        r = r.long()
        density = s.new_zeros(self.nodes).scatter_add(0, r + 1, upper).scatter_add(0, r, lower)
        return density / len(s)


# ------------------------------------------------------------------------------------------------ TCM
class ThresholdConsistentMarginLoss(MetricLoss):
    """Threshold-Consistent Margin loss (Zhang et al., "Threshold-Consistent Margin Loss for
    Open-World Deep Metric Learning", ICLR 2024), on cosine
    similarity: lambda_plus x mean over positive pairs with s <= margin_plus of (margin_plus - s)
    + lambda_minus x mean over negative pairs with s >= margin_minus of (s - margin_minus).
    A regulariser meant to be added to a base loss (``combined``, e.g.
    ``"arcface+threshold_consistent_margin"``).

    Differs from PML: given a reference set, PML looks the pairs' second items up in the batch
    instead of the reference set; dmlkit takes them from the reference set.

    Args:
        lambda_plus: weight of the positive term.
        lambda_minus: weight of the negative term.
        margin_plus: positive pairs less similar than this are penalised.
        margin_minus: negative pairs more similar than this are penalised.
        normalize: cosine similarity (True) or the dot product (False, for CCP's unit ball).
    """

    def __init__(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
        normalize: bool = True,
    ):
        super().__init__()
        _check(lambda_plus >= 0 and lambda_minus >= 0, f"tcm: lambdas must be >= 0; got {lambda_plus}, {lambda_minus}")
        _check(-1 <= margin_plus <= 1, f"tcm: margin_plus is a cosine similarity, in [-1, 1]; got {margin_plus}")
        _check(-1 <= margin_minus <= 1, f"tcm: margin_minus is a cosine similarity, in [-1, 1]; got {margin_minus}")
        self.lambda_plus, self.lambda_minus = lambda_plus, lambda_minus
        self.margin_plus, self.margin_minus, self.normalize = margin_plus, margin_minus, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        other = emb if ref is None else ref
        sim = _similarity(emb, other, self.normalize)
        if indices is None:  # masked sums: no gather of the N^2 pairs
            pos, neg = label_masks(labels, ref_labels)
            pos_in = pos & (sim <= self.margin_plus)
            neg_in = neg & (sim >= self.margin_minus)
            pos_sum, pos_n = ((self.margin_plus - sim) * pos_in).sum(), pos_in.sum()
            neg_sum, neg_n = ((sim - self.margin_minus) * neg_in).sum(), neg_in.sum()
        else:  # mined pairs, repeats counted as PML counts them
            a1, p, a2, ng = triplets_to_pairs(indices) if len(indices) == 3 else indices
            s_pos, s_neg = sim[a1, p], sim[a2, ng]
            pos_in, neg_in = s_pos <= self.margin_plus, s_neg >= self.margin_minus
            pos_sum, pos_n = ((self.margin_plus - s_pos) * pos_in).sum(), pos_in.sum()
            neg_sum, neg_n = ((s_neg - self.margin_minus) * neg_in).sum(), neg_in.sum()
        if pos_n == 0 and neg_n == 0:
            return zero_loss(emb, other)
        loss = zero_loss(emb, other)
        if pos_n > 0:
            loss = loss + self.lambda_plus * pos_sum / pos_n
        if neg_n > 0:
            loss = loss + self.lambda_minus * neg_sum / neg_n
        return loss


# --------------------------------------------------------------------------------- dynamic soft margin
class DynamicSoftMarginLoss(MetricLoss):
    """Dynamic soft margin (Zhang, Rusinkiewicz, "Learning Local Descriptors with a CDF-Based
    Dynamic Soft Margin", ICCV 2019): each triplet's x = d(a, p) - d(a, n) (Euclidean distance of
    L2-normalised embeddings) is weighted by the CDF of a running histogram of x, so the
    currently hardest triplets weigh most; the loss is mean(CDF(x) x).

    The histogram has ``num_bins`` nodes min_val + k delta, delta = 2 |min_val| / num_bins; each
    batch's x are interpolated onto them and blended in with weight ``momentum`` (the first batch
    alone). It is a buffer, saved in checkpoints. Every triplet of the batch is used (or the
    mined ones).

    Differs from PML: (1) PML keeps the histogram inside the autograd graph, so the second
    training step fails with "Trying to backward through the graph a second time" (PML issue
    #731); dmlkit, like the authors' code, treats the histogram (hence each CDF weight) as a
    constant. Values equal PML's at every step; gradients are CDF(x) dx. (2) An x past the last
    node (x >= -min_val - delta, e.g. 1.6 with the defaults) goes to the last node, where PML
    raises an index error. (3) PML's label-free mode (row i of the batch matches row i of the
    reference set) is not offered: dmlkit losses always take labels.

    Args:
        min_val: the smallest x the histogram resolves (x lies in [-2, 2] on the unit sphere).
        num_bins: number of histogram nodes on [min_val, -min_val).
        momentum: weight of the current batch in the running histogram.
        normalize: L2-normalise the embeddings first (CCP turns it off).
    """

    def __init__(self, min_val: float = -2.0, num_bins: int = 10, momentum: float = 0.01, normalize: bool = True):
        super().__init__()
        _check(min_val < 0, f"dynamic_soft_margin: min_val must be < 0; got {min_val}")
        _check(num_bins >= 1, f"dynamic_soft_margin: num_bins must be >= 1; got {num_bins}")
        _check(0 < momentum <= 1, f"dynamic_soft_margin: momentum must be in (0, 1]; got {momentum}")
        self.min_val, self.num_bins, self.momentum, self.normalize = min_val, int(num_bins), momentum, normalize
        self.delta = 2 * abs(min_val) / num_bins
        self.register_buffer("hist", torch.zeros(self.num_bins))

    def compute(self, emb, labels, ref, ref_labels, indices):
        x = _unit(emb, self.normalize)
        other = x if ref is None else _unit(ref, self.normalize)
        dist = pairwise_distance(x, other)
        if indices is None:  # every triplet (PML's t_per_anchor="all"): [positive pairs, m], negatives masked
            pos, neg = label_masks(labels, ref_labels)
            a, p = pos.nonzero(as_tuple=True)
            diff = dist[a, p][:, None] - dist[a]
            mask = neg[a].to(diff.dtype)
        else:
            a, p, ng = pairs_to_triplets(indices)
            diff = dist[a, p] - dist[a, ng]
            mask = torch.ones_like(diff)
        count = mask.sum()
        if count == 0:
            return zero_loss(emb, other)
        t = (diff.detach() - self.min_val) / self.delta
        lo = t.floor()
        self._update(lo.long(), t - lo, mask)
        weight = self.hist.cumsum(0)[lo.long().clamp(0, self.num_bins - 1)] * mask  # constant CDF weights
        return (weight * diff).sum() / count

    @torch.no_grad()
    def _update(self, lo: Tensor, frac: Tensor, mask: Tensor) -> None:
        hist = self.hist.to(frac.dtype)
        momentum = self.momentum if bool(hist.sum() != 0) else 1.0
        last = self.num_bins - 1
        hist = (1 - momentum) * hist
        hist = hist.scatter_add(0, lo.clamp(0, last).flatten(), (momentum * (1 - frac) * mask).flatten())
        hist = hist.scatter_add(0, (lo + 1).clamp(0, last).flatten(), (momentum * frac * mask).flatten())
        self.hist = hist / hist.sum()


@dmlkit.hookimpl
def register_losses(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "fastap", FastAPLoss, "FastAP: histogram-binned average precision (Cakir et al. 2019)", aliases=("fast_ap",)
        )
    )
    register(
        ComponentSpec("smooth_ap", SmoothAPLoss, "Smooth-AP: sigmoid-relaxed average precision (Brown et al. 2020)")
    )
    register(ComponentSpec("pnp", PNPLoss, "PNP: penalise negatives ranked before positives (Li et al. 2022)"))
    register(
        ComponentSpec(
            "histogram", HistogramLoss, "Histogram loss on similarity distributions (Ustinova, Lempitsky 2016)"
        )
    )
    register(
        ComponentSpec(
            "threshold_consistent_margin",
            ThresholdConsistentMarginLoss,
            "Threshold-Consistent Margin regulariser (Zhang et al. 2024)",
            aliases=("tcm",),
        )
    )
    register(
        ComponentSpec(
            "dynamic_soft_margin",
            DynamicSoftMarginLoss,
            "CDF-based dynamic soft margin (Zhang, Rusinkiewicz 2019)",
        )
    )
