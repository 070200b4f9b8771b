"""Built-in plugin: pair and tuple losses, each equal to pytorch-metric-learning 2.9's class of the
same name (values and gradients) unless its docstring says where and why it differs.

Losses ``circle``, ``margin``, ``npairs``, ``ntxent``, ``supcon``, ``lifted_structure``,
``generalized_lifted_structure``, ``tuplet_margin``, ``angular``, ``nca``, ``snr_contrastive``,
``intra_pair_variance``, ``instance`` and ``vicreg``. Every loss works on [n, m] similarity or
distance matrices (batch x batch, or batch x reference set): none builds PML's [pairs x pairs]
or [n, n, D] tensors, and none loops over anchors in Python.

Mined indices: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` (read as the pairs
``(a, p)`` and ``(a, n)``, as PML does). Pairs whose labels contradict them are dropped. Where PML
counts a repeated pair once per repeat (its pair-list losses: ``ntxent``, ``lifted_structure``,
``tuplet_margin``, ``snr_contrastive``, ``intra_pair_variance``, ``angular``), so does dmlkit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import (
    MetricLoss,
    first_order,
    label_masks,
    pair_masks,
    pairs_to_triplets,
    pairwise_distance,
    triplets_to_pairs,
    zero_loss,
)

F = nn.functional

#: Cosines are kept this far inside [-1, 1] before ``acos`` (its gradient is infinite at +-1).
_ACOS_EPS = 1e-7


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _finite(**values: float) -> None:
    for name, value in values.items():
        _check(
            isinstance(value, int | float) and math.isfinite(value), f"{name} must be a finite number; got {value!r}"
        )


# ------------------------------------------------------------------------------------------ helpers
def _unit(emb: Tensor, ref: Tensor | None, normalize: bool) -> tuple[Tensor, Tensor]:
    """(batch, reference set) L2-normalised when ``normalize``; the batch is its own reference set."""
    x = F.normalize(emb, dim=1) if normalize else emb
    if ref is None:
        return x, x
    return x, F.normalize(ref, dim=1) if normalize else ref


def _lse(x: Tensor, keep: Tensor, dim: int = 1) -> Tensor:
    """Log-sum-exp over the kept entries; a row with none kept gives about the dtype's lowest number
    (its exp is 0), as PML's masked log-sum-exp does before it zeroes such rows."""
    return torch.logsumexp(x.masked_fill(~keep, torch.finfo(x.dtype).min), dim=dim)


def _log1p_exp(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` without softplus's linear cut-off above 20 (PML writes it as a log-sum-exp)."""
    return torch.logaddexp(x, x.new_zeros(()))


def _lse_weighted(x: Tensor, weight: Tensor, dim: int = 1) -> Tensor:
    """:func:`_lse` with each entry counted ``weight`` times (a bool mask counts each kept entry once)."""
    if weight.dtype == torch.bool:
        return _lse(x, weight, dim)
    return _lse(x + weight.log(), weight > 0, dim)


def _pair_weights(
    labels: Tensor, ref_labels: Tensor | None, indices: tuple | None, n: int, m: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, bool]:
    """Positive and negative pairs as [n, m] weights, and PML's 'nothing to compute' test.

    Without indices: the label masks (bool). With indices: how many times the miner named each
    pair (float), pairs that contradict the labels dropped. The flag is PML's GenericPairLoss
    guard: true when the positive and the negative pair lists hold at most one pair each.
    """
    pos, neg = label_masks(labels, ref_labels)
    if indices is None:
        few = int(pos.count_nonzero()) <= 1 and int(neg.count_nonzero()) <= 1  # (a bool sum makes an int64 copy)
        return pos, neg, few
    a1, p, a2, an = triplets_to_pairs(indices) if len(indices) == 3 else indices
    cpos = torch.zeros(n, m, dtype=dtype, device=pos.device)
    cneg = torch.zeros(n, m, dtype=dtype, device=pos.device)
    cpos.index_put_((a1, p), torch.ones(len(a1), dtype=dtype, device=pos.device), accumulate=True)
    cneg.index_put_((a2, an), torch.ones(len(a2), dtype=dtype, device=pos.device), accumulate=True)
    return cpos * pos, cneg * neg, len(a1) <= 1 and len(a2) <= 1


def _entries(weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The (row, column) of each pair in [n, m] weights, and its count (None for a mask: once each)."""
    if weight.dtype == torch.bool:
        return (*weight.nonzero(as_tuple=True), None)
    rows, cols = (weight > 0).nonzero(as_tuple=True)
    return rows, cols, weight[rows, cols]


def _values(matrix: Tensor, weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """The entries of ``matrix`` at the pairs in ``weight``, and their counts (None for a mask)."""
    if weight.dtype == torch.bool:
        return matrix.masked_select(weight), None
    kept = weight > 0
    return matrix.masked_select(kept), weight.masked_select(kept)


def _mean(values: Tensor, count: Tensor | None) -> Tensor:
    """Mean over a pair list, each value counted ``count`` times."""
    return values.mean() if count is None else (values * count).sum() / count.sum()


def _avg_nonzero(values: Tensor, count: Tensor | None) -> Tensor:
    """PML's AvgNonZeroReducer over a pair list: the mean over the pairs with a positive value (0 if none)."""
    if count is None:
        return values.sum() / (values > 0).sum().clamp_min(1)
    return (values * count).sum() / (count * (values > 0)).sum().clamp_min(1)


def _refuse_reference(name: str, ref: Tensor | None, why: str) -> None:
    if ref is not None:
        raise ValueError(f"{name} cannot take a reference set ({why}); call it with the batch alone")


def _refuse_indices(name: str, indices: tuple | None, why: str) -> None:
    if indices is not None:
        raise ValueError(f"{name} cannot take mined pairs or triplets ({why}); use it without a miner")


# =========================================================================================== circle
class CircleLoss(MetricLoss):
    """Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity
    Optimization", CVPR 2020), on cosine similarity, equal to PML's ``CircleLoss``.

    Per anchor: ``softplus(logsumexp_p(-gamma a_p (s_p - (1 - m))) + logsumexp_n(gamma a_n (s_n - m)))``
    with the weights ``a_p = [1 + m - s_p]+`` and ``a_n = [s_n + m]+`` treated as constants;
    anchors without a positive or a negative cost 0, and the loss is the mean over anchors with a
    positive loss. PML's defaults are the paper's fine-grained retrieval setting (the paper uses
    m = 0.25 with gamma = 256 for faces, gamma = 128 for re-identification).

    Args:
        m: the relaxation margin, in [0, 1).
        gamma: the scale of the similarities, > 0.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, normalize: bool = True):
        super().__init__()
        _finite(m=m, gamma=gamma)
        _check(0 <= m < 1, f"circle m must be in [0, 1); got {m}")
        _check(gamma > 0, f"circle gamma must be > 0; got {gamma}")
        self.m, self.gamma, self.normalize = m, gamma, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg = pair_masks(labels, ref_labels, indices, len(x), len(y), x.device)
        if _pml_guard(pos, neg, indices):
            return zero_loss(emb, y)
        sim = x @ y.T
        s = sim.detach()
        lp = -self.gamma * (1 + self.m - s).clamp_min(0) * (sim - (1 - self.m))
        ln = self.gamma * (s + self.m).clamp_min(0) * (sim - self.m)
        rows = pos.any(1) & neg.any(1)
        losses = F.softplus(_lse(lp, pos) + _lse(ln, neg))[rows]
        losses = losses[losses > 0]
        return losses.mean() if losses.numel() else zero_loss(emb, y)


def _pml_guard(pos: Tensor, neg: Tensor, indices: tuple | None) -> bool:
    """PML's GenericPairLoss returns 0 when both pair lists hold at most one pair (mask form)."""
    if indices is not None:
        a1, _, a2, _ = triplets_to_pairs(indices) if len(indices) == 3 else indices
        return len(a1) <= 1 and len(a2) <= 1
    return int(pos.sum()) <= 1 and int(neg.sum()) <= 1


# =========================================================================================== margin
class MarginLoss(MetricLoss):
    """Margin loss (Wu, Manmatha, Smola, Kraehenbuehl, "Sampling Matters in Deep Embedding
    Learning", ICCV 2017), equal to PML's ``MarginLoss``.

    For each triplet (a, p, n), Euclidean distances on L2-normalised embeddings:
    ``[d(a, p) - beta + margin]+ + [beta - d(a, n) + margin]+``, summed and divided by the number of
    positive terms. With ``learn_beta`` beta is a parameter (``beta``, with its own learning-rate
    multiplier ``beta_lr_multiplier``) and ``nu * beta`` is added (per class: summed over the
    triplets' anchors and divided as above). The paper samples triplets by distance (the
    ``distance_weighted`` miner); without a miner every triplet is used (``triplets_per_anchor =
    "all"``, computed per anchor, without listing the triplets) or that many random triplets per
    anchor, drawn as PML draws them.

    ``per_class_beta`` is PML's ``num_classes`` switch: PML keeps one beta per class when given
    ``num_classes``. The trainer always supplies ``num_classes``, so the registered loss keeps one
    shared beta unless ``per_class_beta = true``; built in Python with ``per_class_beta=None`` it
    follows PML's rule.

    Args:
        margin: the margin alpha around the boundary beta, >= 0.
        nu: weight of the beta regulariser nu * beta (used with learn_beta), >= 0.
        beta: initial boundary between positive and negative distances, >= 0.
        triplets_per_anchor: "all", or how many random triplets per anchor (an int >= 1).
        learn_beta: make beta a learnable parameter.
        num_classes: number of classes (supplied by the trainer); sizes the per-class betas.
        per_class_beta: one beta per class (needs num_classes); None follows PML: per class when num_classes is given.
        beta_lr_multiplier: factor on the base learning rate for beta.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0.0,
        beta: float = 1.2,
        triplets_per_anchor: int | str = "all",
        learn_beta: bool = False,
        num_classes: int | None = None,
        per_class_beta: bool | None = None,
        beta_lr_multiplier: float = 1.0,
        normalize: bool = True,
    ):
        super().__init__()
        _finite(margin=margin, nu=nu, beta=beta, beta_lr_multiplier=beta_lr_multiplier)
        _check(margin >= 0, f"margin must be >= 0; got {margin}")
        _check(nu >= 0, f"nu must be >= 0; got {nu}")
        _check(beta >= 0, f"beta must be >= 0; got {beta}")
        _check(beta_lr_multiplier >= 0, f"beta_lr_multiplier must be >= 0; got {beta_lr_multiplier}")
        _check(
            triplets_per_anchor == "all"
            or (isinstance(triplets_per_anchor, int) and not isinstance(triplets_per_anchor, bool))
            and triplets_per_anchor >= 1,
            f'triplets_per_anchor must be "all" or an int >= 1; got {triplets_per_anchor!r}',
        )
        _check(num_classes is None or num_classes >= 1, f"num_classes must be >= 1; got {num_classes}")
        if per_class_beta is None:
            per_class_beta = num_classes is not None
        _check(
            not per_class_beta or num_classes is not None,
            "per_class_beta needs num_classes (the trainer supplies it; in Python pass num_classes=...)",
        )
        self.margin, self.nu, self.learn_beta, self.normalize = margin, nu, learn_beta, normalize
        self.triplets_per_anchor = triplets_per_anchor
        initial = torch.full((num_classes if per_class_beta else 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)
        self.lr_multipliers = {"beta": beta_lr_multiplier}

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        dist = pairwise_distance(x, y)
        beta = self.beta.to(dist.dtype)
        per_class = beta.numel() > 1
        if per_class and bool(((labels < 0) | (labels >= beta.numel())).any()):
            bad = labels[(labels < 0) | (labels >= beta.numel())][0].item()
            raise ValueError(f"margin with per-class beta needs labels in [0, {beta.numel()}); got label {bad}")
        graph = (emb, y, *([self.beta] if self.learn_beta else []))
        if indices is None and self.triplets_per_anchor == "all":
            # every triplet, per anchor: a positive pair counts once per negative of its anchor and
            # a negative pair once per positive, so no [n, n, m] tensor or triplet list is needed
            pos, neg = label_masks(labels, ref_labels)
            n_pos, n_neg = pos.sum(1).to(dist.dtype), neg.sum(1).to(dist.dtype)
            b = beta[labels][:, None] if per_class else beta
            pos_l = (dist - b + self.margin).clamp_min(0) * pos
            neg_l = (b - dist + self.margin).clamp_min(0) * neg
            count = n_pos * n_neg
            total = (pos_l.sum(1) * n_neg + neg_l.sum(1) * n_pos).sum()
            divisor = ((pos_l > 0).sum(1) * n_neg + (neg_l > 0).sum(1) * n_pos).sum()
            anchor_beta = (count * b[:, 0]).sum() if per_class else None
            triplets = int(count.sum())
        else:
            a, p, n = self._triplets(labels, ref_labels, indices)
            b = beta[labels[a]] if per_class else beta
            pos_l = (dist[a, p] - b + self.margin).clamp_min(0)
            neg_l = (b - dist[a, n] + self.margin).clamp_min(0)
            total = (pos_l + neg_l).sum()
            divisor = (pos_l > 0).sum() + (neg_l > 0).sum()
            anchor_beta = b.sum() if per_class else None
            triplets = len(a)
        if triplets == 0:
            return zero_loss(*graph)
        divisor = int(divisor)
        loss = total / divisor if divisor else zero_loss(*graph)
        if self.learn_beta:  # PML's beta_reg_loss
            if not per_class:
                loss = loss + self.nu * beta[0]
            elif divisor:
                loss = loss + self.nu * anchor_beta / divisor
        return loss

    def _triplets(self, labels: Tensor, ref_labels: Tensor | None, indices: tuple | None) -> tuple[Tensor, ...]:
        if indices is None:
            return _random_triplets(labels, ref_labels, int(self.triplets_per_anchor))
        a, p, n = pairs_to_triplets(indices)
        ref = labels if ref_labels is None else ref_labels
        ok = (labels[a] == ref[p]) & (labels[a] != ref[n])
        if ref_labels is None:
            ok &= a != p
        return a[ok], p[ok], n[ok]


def _random_triplets(labels: Tensor, ref_labels: Tensor | None, per_anchor: int) -> tuple[Tensor, ...]:
    """``per_anchor`` random (positive, negative) per anchor, drawn from torch's global generator in
    PML's order (class by class, positives then negatives), so a seed gives PML's triplets."""
    same_source = ref_labels is None
    ref = labels if same_source else ref_labels
    out: list[list[Tensor]] = [[], [], []]
    for label in torch.unique(labels):
        positives = torch.nonzero(ref == label)[:, 0]
        anchors = positives if same_source else torch.nonzero(labels == label)[:, 0]
        negatives = torch.nonzero(ref != label)[:, 0]
        if len(positives) < (2 if same_source else 1) or len(negatives) == 0:
            continue
        k, total = len(anchors), len(anchors) * per_anchor
        choices = positives.expand(k, len(positives))
        if same_source:  # an anchor is not its own positive
            choices = choices[~torch.eye(k, dtype=torch.bool, device=choices.device)].view(k, k - 1)
        pick = torch.randint(0, choices.shape[1], (total,)).to(labels.device)
        row = torch.arange(k, device=labels.device).repeat_interleave(per_anchor)
        out[0].append(anchors[row])
        out[1].append(choices[row, pick])
        out[2].append(negatives[torch.randint(0, len(negatives), (total,)).to(labels.device)])
    if not out[0]:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty, empty
    return tuple(torch.cat(t) for t in out)


# =========================================================================================== npairs
class NPairsLoss(MetricLoss):
    """Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016), equal to PML's ``NPairsLoss``.

    One positive pair per class: the first (in row-major order, or in the miner's order) whose
    anchor has that label. The loss is the cross-entropy of each anchor over the similarities to
    all the pairs' positives, its own being the target. Like PML, the similarity is cosine by
    default (``normalize``); the paper uses the dot product (``normalize=False``) with an L2
    penalty on the embeddings, which dmlkit leaves to the trainer's weight decay. It cannot take
    a reference set (PML refuses one too).

    Args:
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _refuse_reference("npairs", ref, "its pairs and their negatives all come from the batch")
        if indices is None:
            same = labels[:, None] == labels[None, :]
            a, p = same.fill_diagonal_(False).nonzero(as_tuple=True)
        else:
            a, p, _, _ = triplets_to_pairs(indices) if len(indices) == 3 else indices
            ok = (labels[a] == labels[p]) & (a != p)
            a, p = a[ok], p[ok]
        if len(a) == 0:
            return zero_loss(emb)
        classes, which = torch.unique(labels[a], return_inverse=True)
        order = torch.arange(len(a), device=a.device)
        first = torch.full((len(classes),), len(a), device=a.device).scatter_reduce(0, which, order, "amin")
        anchors, positives = _unit(emb[a[first]], emb[p[first]], self.normalize)  # only the rows used
        return F.cross_entropy(anchors @ positives.T, torch.arange(len(first), device=a.device))


# ==================================================================================== ntxent, supcon
class _TemperatureLoss(MetricLoss):
    """A softmax with temperature over cosine (or, without ``normalize``, dot-product) similarities."""

    def __init__(self, temperature: float, normalize: bool):
        super().__init__()
        _finite(temperature=temperature)
        _check(temperature > 0, f"temperature must be > 0; got {temperature}")
        self.temperature, self.normalize = temperature, normalize

    def logits(self, x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.T) / self.temperature


class NTXentLoss(_TemperatureLoss):
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., "A Simple
    Framework for Contrastive Learning of Visual Representations", ICML 2020; InfoNCE, van den
    Oord et al. 2018), equal to PML's ``NTXentLoss``.

    For each positive pair (a, p): ``-log(exp(s_ap / t) / (exp(s_ap / t) + sum_n exp(s_an / t)))``
    over the negatives of anchor a (all of them, or the mined ones), averaged over positive
    pairs. On a batch of two stacked views whose labels are the image ids (``torch.cat([z,
    z_prime])`` with labels ``torch.cat([ids, ids])``), each view's positive is the other view and
    its negatives the 2N - 2 others: SimCLR's loss. The default temperature is PML's (MoCo's
    0.07); SimCLR reports 0.1 to 0.5.

    Args:
        temperature: the softmax temperature t, > 0.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, temperature: float = 0.07, normalize: bool = True):
        super().__init__(temperature, normalize)

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg, few = _pair_weights(labels, ref_labels, indices, len(x), len(y), x.dtype)
        a, p, count = _entries(pos)
        if few or len(a) == 0 or not bool(neg.any()):
            return zero_loss(emb, y)
        logits = self.logits(x, y)
        negatives = _lse_weighted(logits, neg)  # [n]: each anchor's negatives (about -inf when none)
        return _mean(_log1p_exp(negatives[a] - logits[a, p]), count)


class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS
    2020, its L_out form), equal to PML's ``SupConLoss``.

    Per anchor: minus the mean over its positives of ``log(exp(s_ap / t) / sum_{j != a}
    exp(s_aj / t))``, the sum over its positives and negatives; averaged over anchors with a
    positive loss. Temperature 0.1 is the paper's and PML's.

    Args:
        temperature: the softmax temperature t, > 0.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True):
        super().__init__(temperature, normalize)

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg = pair_masks(labels, ref_labels, indices, len(x), len(y), x.device)
        if _pml_guard(pos, neg, indices) or not bool(pos.any()) or not bool(neg.any()):
            return zero_loss(emb, y)
        logits = self.logits(x, y)
        log_prob = logits - _lse(logits, pos | neg)[:, None]
        losses = -torch.where(pos, log_prob, 0.0).sum(1) / pos.sum(1).clamp_min(1)
        losses = losses[losses > 0]
        return losses.mean() if losses.numel() else zero_loss(emb, y)


# ================================================================================ lifted structure
class LiftedStructureLoss(MetricLoss):
    """Lifted structured loss (Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
    Structured Feature Embedding", CVPR 2016), equal to PML's ``LiftedStructureLoss``.

    For each positive pair (i, j), Euclidean distances on normalised embeddings:
    ``J = log(sum_{(i,k)} exp(neg_margin - d_ik) + sum_{(j,l)} exp(neg_margin - d_jl)) + d_ij - pos_margin``
    over the negative pairs of i and of j, and the loss is the mean of ``[J]+^2 / 2``. It cannot
    take a reference set: the negatives of j are pairs of the batch (PML 2.9 accepts one but then
    compares a batch index with a reference-set index, a2 == p, and mixes unrelated pairs).

    Args:
        neg_margin: the margin alpha of the negative distances, >= 0.
        pos_margin: subtracted from the positive distances, >= 0.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0, normalize: bool = True):
        super().__init__()
        _check_margins(neg_margin, pos_margin)
        self.neg_margin, self.pos_margin, self.normalize = neg_margin, pos_margin, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _refuse_reference("lifted_structure", ref, "the negatives of a positive's second item are pairs of the batch")
        x, _ = _unit(emb, None, self.normalize)
        pos, neg, few = _pair_weights(labels, None, indices, len(x), len(x), x.dtype)
        i, j, count = _entries(pos)
        if few or len(i) == 0 or not bool(neg.any()):
            return zero_loss(emb)
        dist = pairwise_distance(x, x)
        per_row = _lse_weighted(self.neg_margin - dist, neg)  # [n]: each item's negative pairs
        has = neg.any(1) if neg.dtype == torch.bool else (neg > 0).any(1)
        both = torch.logaddexp(per_row[i], per_row[j])  # the negatives of i and of j
        both = torch.where(has[i] | has[j], both, 0.0)
        return _mean((both + dist[i, j] - self.pos_margin).clamp_min(0).square() / 2, count)


def _check_margins(neg_margin: float, pos_margin: float) -> None:
    _finite(neg_margin=neg_margin, pos_margin=pos_margin)
    _check(neg_margin >= 0, f"neg_margin must be >= 0; got {neg_margin}")
    _check(pos_margin >= 0, f"pos_margin must be >= 0; got {pos_margin}")


class GeneralizedLiftedStructureLoss(MetricLoss):
    """Generalised lifted structure loss (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss
    for Person Re-Identification", 2017, eq. 4), equal to PML's ``GeneralizedLiftedStructureLoss``.

    Per anchor, Euclidean distances on normalised embeddings:
    ``[log sum_p exp(d_ap - pos_margin) + log sum_n exp(neg_margin - d_an)]+`` (an empty sum
    counts 0), averaged over all anchors.

    Args:
        neg_margin: the margin of the negative distances, >= 0.
        pos_margin: subtracted from the positive distances, >= 0.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0, normalize: bool = True):
        super().__init__()
        _check_margins(neg_margin, pos_margin)
        self.neg_margin, self.pos_margin, self.normalize = neg_margin, pos_margin, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg = pair_masks(labels, ref_labels, indices, len(x), len(y), x.device)
        if _pml_guard(pos, neg, indices):
            return zero_loss(emb, y)
        dist = pairwise_distance(x, y)
        pos_term = torch.where(pos.any(1), _lse(dist - self.pos_margin, pos), 0.0)
        neg_term = torch.where(neg.any(1), _lse(self.neg_margin - dist, neg), 0.0)
        return (pos_term + neg_term).clamp_min(0).mean()


# ==================================================================================== tuplet margin
class TupletMarginLoss(MetricLoss):
    """Tuplet margin loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019),
    equal to PML's ``TupletMarginLoss``.

    For each positive pair (a, p): ``log(1 + sum_n exp(scale (cos theta_an - cos(theta_ap - margin))))``
    over the negatives of a, averaged over positive pairs. The paper pairs it with
    ``intra_pair_variance`` (``--loss "tuplet_margin+intra_pair_variance"``). Cosines are kept
    1e-7 inside [-1, 1] before the arccosine (PML 2.9 gives NaN when rounding puts a positive
    pair's cosine at or above 1).

    Args:
        margin: the angular margin beta, in degrees, in [0, 180).
        scale: the scale s of the cosines, > 0.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False; they must lie in the unit ball).
    """

    def __init__(self, margin: float = 5.73, scale: float = 64.0, normalize: bool = True):
        super().__init__()
        _finite(margin=margin, scale=scale)
        _check(0 <= margin < 180, f"tuplet_margin margin is an angle in degrees in [0, 180); got {margin}")
        _check(scale > 0, f"scale must be > 0; got {scale}")
        self.margin, self.scale, self.normalize = margin, scale, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg, few = _pair_weights(labels, ref_labels, indices, len(x), len(y), x.dtype)
        a, p, count = _entries(pos)
        if few or len(a) == 0 or not bool(neg.any()):
            return zero_loss(emb, y)
        scaled = self.scale * (x @ y.T)
        negatives = _lse_weighted(scaled, neg)  # [n]
        cos_ap = (scaled[a, p] / self.scale).clamp(-1 + _ACOS_EPS, 1 - _ACOS_EPS)
        target = torch.cos(torch.acos(cos_ap) - math.radians(self.margin))
        return _mean(_log1p_exp(negatives[a] - self.scale * target), count)


# ========================================================================================== angular
class AngularLoss(MetricLoss):
    """Angular loss, N-pair form (Wang, Zhou, Wen, Liu, Lin, "Deep Metric Learning with Angular
    Loss", ICCV 2017, eq. 8), PML's ``AngularLoss`` with the paper's unit-length negatives.

    For each positive pair (a, p), with unit vectors:
    ``log(1 + sum_n exp(4 tan^2(alpha) (x_a + x_p)^T x_n - 2 (1 + tan^2(alpha)) x_a^T x_p))`` over
    every item n whose label differs from a's, averaged over positive pairs. As in PML, a miner
    chooses the positive pairs only; the negatives are all of the batch (or reference set).

    Differs from PML 2.9: PML normalises anchors and positives but multiplies by the raw,
    un-normalised negatives, contrary to the paper's derivation (and to its own check that the
    distance normalises); dmlkit normalises the negatives too. Both agree on unit-length inputs.

    Args:
        alpha: the angle bound alpha, in degrees, in (0, 90); PML's default (the paper tries 36 to 55).
        normalize: L2-normalise the embeddings first (False: use them as they are).
    """

    def __init__(self, alpha: float = 40.0, normalize: bool = True):
        super().__init__()
        _finite(alpha=alpha)
        _check(0 < alpha < 90, f"angular alpha is an angle in degrees in (0, 90); got {alpha}")
        self.alpha, self.normalize = alpha, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        ref_l = labels if ref_labels is None else ref_labels
        if indices is None:
            a, p, a2, _ = _all_pairs(labels, ref_labels)
        else:
            a, p, a2, _ = triplets_to_pairs(indices) if len(indices) == 3 else indices
            ok = labels[a] == ref_l[p]
            if ref_labels is None:
                ok &= a != p
            a, p = a[ok], p[ok]
        if len(a) == 0 or len(a2) == 0:
            return zero_loss(emb, y)
        sq_tan = math.tan(math.radians(self.alpha)) ** 2
        # (x_a + x_p)^T x_n from the [n, m] and [m, m] similarities, gathered per pair: one product of
        # the batch with the reference set instead of one per positive pair
        sim = x @ y.T
        if ref is None:
            sim_p = sim[p]
        else:
            used, which = torch.unique(p, return_inverse=True)
            sim_p = (y[used] @ y.T)[which]
        f = 4 * sq_tan * (sim[a] + sim_p) - 2 * (1 + sq_tan) * sim[a, p][:, None]  # [pairs, m]
        keep = labels[a][:, None] != ref_l[None, :]
        return _log1p_exp(_lse(f, keep)).mean()


def _all_pairs(labels: Tensor, ref_labels: Tensor | None) -> tuple[Tensor, ...]:
    """Every positive and negative pair, in row-major order (PML's ``get_all_pairs_indices``)."""
    pos, neg = label_masks(labels, ref_labels)
    return (*pos.nonzero(as_tuple=True), *neg.nonzero(as_tuple=True))


# ============================================================================================== nca
class NCALoss(MetricLoss):
    """Neighbourhood components analysis (Goldberger, Roweis, Hinton, Salakhutdinov,
    "Neighbourhood Components Analysis", NeurIPS 2004), equal to PML's ``NCALoss``.

    Each anchor picks a neighbour j != itself with probability softmax over j of
    ``-softmax_scale |x_a - x_j|^2`` (squared Euclidean distance on normalised embeddings, PML's
    default; the paper's on the raw projections is ``normalize=False``); the loss is the mean over
    anchors with a same-class neighbour of ``-log P(same class)``. Mined indices weight each
    anchor by how often it appears in them (relative to the most frequent), as in PML.

    Args:
        softmax_scale: the scale of the negative squared distances, > 0.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, softmax_scale: float = 1.0, normalize: bool = True):
        super().__init__()
        _finite(softmax_scale=softmax_scale)
        _check(softmax_scale > 0, f"softmax_scale must be > 0; got {softmax_scale}")
        self.softmax_scale, self.normalize = softmax_scale, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        if len(x) <= 1:
            return zero_loss(emb, y)
        # -scale |x_i - y_j|^2 without its |x_i|^2 term, which the row's softmax cancels: one fused product
        bias = (-self.softmax_scale * (y * y).sum(1)).expand(len(x), len(y))
        logits = torch.addmm(bias, x, y.T, alpha=2 * self.softmax_scale)
        same = labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]
        if ref is None:
            logits = logits.fill_diagonal_(-math.inf)
            same.fill_diagonal_(False)
        p_same = (torch.softmax(logits, 1) * same).sum(1)  # P(a picks a same-class neighbour)
        valid = p_same > 0  # PML's rule: no same-class neighbour (or a softmax underflow) drops the anchor
        if not bool(valid.any()):
            return zero_loss(emb, y)
        losses = -torch.log(p_same[valid])
        if indices is not None:
            losses = losses * _anchor_weights(indices, len(x), ref is not None, x.dtype, x.device)[valid]
        return losses.mean()


def _anchor_weights(indices: tuple | None, n: int, using_ref: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """PML's ``convert_to_weights``: each batch item's count in the indices over the largest count
    (anchors only with a reference set; every index tensor without), 1 everywhere without indices."""
    if indices is None or all(len(t) == 0 for t in indices):
        return torch.ones(n, dtype=dtype, device=device)
    if using_ref:
        used = indices[0] if len(indices) == 3 else torch.cat([indices[0], indices[2]])
    else:
        used = torch.cat(list(indices))
    counts = torch.bincount(used, minlength=n)[:n].to(dtype)
    return counts / counts.max()


# ================================================================================== snr contrastive
class SNRContrastiveLoss(MetricLoss):
    """Contrastive loss on the signal-to-noise ratio distance (Yuan, Chen, Wang, Ding, "Signal-to-
    Noise Ratio: A Robust Distance Metric for Deep Metric Learning", CVPR 2019), equal to PML's
    ``SignalToNoiseRatioContrastiveLoss``.

    ``d(a, r) = var(a - r) / var(a)`` (variances over the feature dimensions, of L2-normalised
    embeddings as in PML), computed with one matrix product rather than PML's [n, m, D] tensor.
    The loss is the mean of ``[d - pos_margin]+`` over positive pairs with a positive value plus
    the mean of ``[neg_margin - d]+`` over such negative pairs. The paper's regulariser on the
    embeddings' means is not part of it (as in PML).

    Args:
        pos_margin: positive pairs closer than this cost nothing, >= 0.
        neg_margin: negative pairs farther than this cost nothing, >= 0.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, normalize: bool = True):
        super().__init__()
        _check_margins(neg_margin, pos_margin)
        self.pos_margin, self.neg_margin, self.normalize = pos_margin, neg_margin, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg, few = _pair_weights(labels, ref_labels, indices, len(x), len(y), x.dtype)
        if few:
            return zero_loss(emb, y)
        dist = snr_distance(x, y)
        pos_d, pos_count = _values(dist, pos)
        neg_d, neg_count = _values(dist, neg)
        pos_l = (pos_d - self.pos_margin).clamp_min(0)
        neg_l = (self.neg_margin - neg_d).clamp_min(0)
        return _avg_nonzero(pos_l, pos_count) + _avg_nonzero(neg_l, neg_count)


def snr_distance(x: Tensor, y: Tensor) -> Tensor:
    """[n, m] signal-to-noise ratio distances ``var(x_i - y_j) / var(x_i)`` without an [n, m, D] tensor:
    with rows centred, ``x_i - y_j`` centred is ``xc_i - yc_j``."""
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    sx, sy = (xc * xc).sum(1), (yc * yc).sum(1)
    noise = (sx[:, None] + sy[None, :] - 2 * xc @ yc.T).clamp_min(0)
    return noise / sx[:, None]


# ============================================================================= intra pair variance
class IntraPairVarianceLoss(MetricLoss):
    """Intra-pair variance loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV
    2019), equal to PML's ``IntraPairVarianceLoss``.

    With the mean cosine of the positive pairs mu_p and of the negative pairs mu_n:
    ``mean_pos [(1 - pos_eps) mu_p - s]+^2 + mean_neg [s - (1 + neg_eps) mu_n]+^2``, spreading
    neither kind of pair far from its mean. Meant beside ``tuplet_margin``.

    Args:
        pos_eps: the tolerance eps of the positive pairs, in [0, 1).
        neg_eps: the tolerance eps of the negative pairs, in [0, 1).
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, pos_eps: float = 0.01, neg_eps: float = 0.01, normalize: bool = True):
        super().__init__()
        _finite(pos_eps=pos_eps, neg_eps=neg_eps)
        _check(0 <= pos_eps < 1, f"pos_eps must be in [0, 1); got {pos_eps}")
        _check(0 <= neg_eps < 1, f"neg_eps must be in [0, 1); got {neg_eps}")
        self.pos_eps, self.neg_eps, self.normalize = pos_eps, neg_eps, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        x, y = _unit(emb, ref, self.normalize)
        pos, neg, few = _pair_weights(labels, ref_labels, indices, len(x), len(y), x.dtype)
        if few:
            return zero_loss(emb, y)
        sim = x @ y.T
        total = zero_loss(emb, y)
        if pos.dtype == torch.bool:  # every pair (no miner): dense [n, m] passes instead of pair lists
            return total + _VarianceTerms.apply(sim, pos, neg, 1 - self.pos_eps, 1 + self.neg_eps)
        s, count = _values(sim, pos)
        if len(s):
            total = total + _mean(((1 - self.pos_eps) * _mean(s, count) - s).clamp_min(0).square(), count)
        s, count = _values(sim, neg)
        if len(s):
            total = total + _mean((s - (1 + self.neg_eps) * _mean(s, count)).clamp_min(0).square(), count)
        return total


class _VarianceTerms(torch.autograd.Function):
    """Intra-pair variance on [n, m] masks: with mu the mean similarity of a mask's pairs,
    ``mean [pos_scale mu_p - s]+^2`` over the positive pairs plus ``mean [s - neg_scale mu_n]+^2``
    over the negative pairs (a side without pairs adds 0). Written out because, with every pair of
    a large batch, selecting the ~n m negative pairs into a list and scattering their gradient back
    took longer than the loss itself: here one fresh [n, m] tensor per side, and the gradient
    (through mu too) made in the forward pass. Gradient of a side with r = [sign (s - k mu)]+ over
    its c pairs: ``sign (2 / c) (r - (k / c) sum r)`` on its pairs, 0 elsewhere."""

    @staticmethod
    def forward(ctx, sim: Tensor, pos: Tensor, neg: Tensor, pos_scale: float, neg_scale: float) -> Tensor:
        value, grad = sim.new_zeros(()), None
        zero = sim.new_zeros(())
        for mask, scale, sign in ((pos, pos_scale, -1.0), (neg, neg_scale, 1.0)):
            count = mask.count_nonzero().to(sim.dtype)
            if not count:
                continue
            r = torch.where(mask, sim, zero)
            mean = r.sum() / count
            r = torch.sub(sim, scale * mean, out=r).mul_(sign).clamp_min_(0.0)
            r = torch.where(mask, r, zero, out=r)
            value = value + torch.dot(r.view(-1), r.view(-1)) / count
            shift = scale * r.sum() / count
            side = torch.where(mask, r.sub_(shift), zero, out=r).mul_(2.0 * sign / count)
            grad = side if grad is None else grad.add_(side)
        ctx.save_for_backward(torch.zeros_like(sim) if grad is None else grad)
        return value

    @staticmethod
    @first_order("intra_pair_variance")
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_value, None, None, None, None


# ========================================================================================= instance
class InstanceLoss(MetricLoss):
    """Instance loss (Zheng, Zheng, Garrett, Yang, Xu, Shen, "Dual-Path Convolutional Image-Text
    Embeddings with Instance Loss", ACM TOMM 2020), PML's batch form (``InstanceLoss``).

    Each embedding is classified among the batch: cross-entropy over ``gamma * cos(x_i, x_j)``
    for all j (itself included) with target column t_i, the rank of its label among the batch's
    distinct labels (PML's rule). That target is meaningful when it is an embedding of the same
    label - labels that are instance ids in batch order, e.g. ``arange(n)`` (each item its own
    class, the paper's setting) - so any other batch is refused with a ValueError rather than
    trained on an arbitrary target (PML computes it silently). It cannot take a reference set
    or mined indices (PML refuses both too).

    Args:
        gamma: the scale of the cosine similarities, > 0.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, gamma: float = 64.0, normalize: bool = True):
        super().__init__()
        _finite(gamma=gamma)
        _check(gamma > 0, f"instance gamma must be > 0; got {gamma}")
        self.gamma, self.normalize = gamma, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        _refuse_reference("instance", ref, "it classifies each embedding among the batch")
        _refuse_indices("instance", indices, "it classifies every embedding of the batch")
        _, target = torch.unique(labels, return_inverse=True)
        wrong = labels[target] != labels
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0, 0])
            raise ValueError(
                f"instance loss: item {i}'s target column {int(target[i])} (its label's rank) holds label "
                f"{labels[target[i]].item()}, not its own {labels[i].item()}; pass one label per instance in "
                "batch order (e.g. labels = arange(batch size), each item its own class)"
            )
        x, _ = _unit(emb, None, self.normalize)
        return F.cross_entropy(torch.mm(x, x.T) * self.gamma, target)


# =========================================================================================== vicreg
class VICRegLoss(MetricLoss):
    """VICReg (Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", ICLR 2022), equal to PML's ``VICRegLoss``; defaults are the paper's.

    ``lambda * mean |z - z'|^2 + mu (v(z) + v(z')) + nu (c(z) + c(z'))`` for two views z, z' of
    the same images: ``v`` the mean over dimensions of ``[1 - sqrt(var + eps)]+ / 2``, ``c`` the sum
    of the squared off-diagonal covariances divided by the dimension.

    How dmlkit passes the two views (labels only check the pairing; they are otherwise unused):

    - ``loss(views, labels)``: the batch holds both views stacked, rows [0, n/2) the first views
      and rows [n/2, n) the second (``torch.cat([z, z_prime])``), so row i and row i + n/2 are the
      same image and must share a label;
    - ``loss(z, labels, z_prime, labels)``: the reference set is the second views, row for row
      (PML's ``VICRegLoss()(z, ref_emb=z_prime)``).

    Anything else - an odd batch, halves whose labels differ, a reference set of another size or
    other labels (a memory queue, proxies), mined indices - is refused with a ValueError.

    Args:
        invariance_lambda: weight lambda of the invariance (mean squared distance) term, >= 0.
        variance_mu: weight mu of the variance term, >= 0.
        covariance_v: weight nu of the covariance term, >= 0.
        eps: added to the variance before its square root, > 0.
    """

    def __init__(
        self, invariance_lambda: float = 25.0, variance_mu: float = 25.0, covariance_v: float = 1.0, eps: float = 1e-4
    ):
        super().__init__()
        _finite(invariance_lambda=invariance_lambda, variance_mu=variance_mu, covariance_v=covariance_v, eps=eps)
        for name, value in (
            ("invariance_lambda", invariance_lambda),
            ("variance_mu", variance_mu),
            ("covariance_v", covariance_v),
        ):
            _check(value >= 0, f"{name} must be >= 0; got {value}")
        _check(eps > 0, f"eps must be > 0; got {eps}")
        self.invariance_lambda, self.variance_mu, self.covariance_v, self.eps = (
            invariance_lambda,
            variance_mu,
            covariance_v,
            eps,
        )

    def compute(self, emb, labels, ref, ref_labels, indices):
        _refuse_indices("vicreg", indices, "it compares each image's two views")
        z, z2 = self._views(emb, labels, ref, ref_labels)
        invariance = (z - z2).square().mean()
        variance = self._variance(z) + self._variance(z2)
        covariance = self._covariance(z) + self._covariance(z2)
        return self.invariance_lambda * invariance + self.variance_mu * variance + self.covariance_v * covariance

    @staticmethod
    def _views(emb: Tensor, labels: Tensor, ref: Tensor | None, ref_labels: Tensor | None) -> tuple[Tensor, Tensor]:
        if ref is not None:
            if ref.shape != emb.shape or not torch.equal(labels, ref_labels):
                raise ValueError(
                    f"vicreg takes the second views as the reference set, row for row with the same labels; got "
                    f"{tuple(emb.shape)} embeddings and a reference set {tuple(ref.shape)}"
                    + ("" if ref.shape != emb.shape else " with other labels")
                    + " (a memory queue or proxies cannot be second views)"
                )
            z, z2 = emb, ref
        else:
            half = len(emb) // 2
            if len(emb) % 2 or not torch.equal(labels[:half], labels[half:]):
                raise ValueError(
                    f"vicreg needs the batch as two stacked views, rows i and i + n/2 being the same image with the "
                    f"same label; got {len(emb)} rows"
                    + (" (odd)" if len(emb) % 2 else " whose halves' labels differ")
                    + ": build it as torch.cat([views1, views2]) or pass the second views as the reference set"
                )
            z, z2 = emb[:half], emb[half:]
        if len(z) < 2:
            raise ValueError("vicreg needs at least 2 images (two views each) to estimate variances")
        return z, z2

    def _variance(self, z: Tensor) -> Tensor:
        return (1 - torch.sqrt(z.var(dim=0) + self.eps)).clamp_min(0).mean() / 2

    @staticmethod
    def _covariance(z: Tensor) -> Tensor:
        zc = z - z.mean(0)
        cov = zc.T @ zc / (len(z) - 1)
        return (cov.square().sum() - cov.diagonal().square().sum()) / z.shape[1]


# ====================================================================================== registration
@dmlkit.hookimpl
def register_losses(register):
    from dmlkit import ComponentSpec

    specs = [
        ComponentSpec("circle", CircleLoss, "Circle loss (Sun et al., CVPR 2020)"),
        ComponentSpec(
            "margin",
            MarginLoss,
            "Margin loss with learnable beta (Wu et al., Sampling Matters, ICCV 2017)",
            defaults={"per_class_beta": False},  # the trainer always supplies num_classes
        ),
        ComponentSpec("npairs", NPairsLoss, "Multi-class N-pair loss (Sohn, NeurIPS 2016)", aliases=("n_pairs",)),
        ComponentSpec("ntxent", NTXentLoss, "NT-Xent / InfoNCE (Chen et al., SimCLR, ICML 2020)", aliases=("nt_xent",)),
        ComponentSpec(
            "supcon", SupConLoss, "Supervised contrastive loss (Khosla et al., NeurIPS 2020)", aliases=("sup_con",)
        ),
        ComponentSpec("lifted_structure", LiftedStructureLoss, "Lifted structured loss (Oh Song et al., CVPR 2016)"),
        ComponentSpec(
            "generalized_lifted_structure",
            GeneralizedLiftedStructureLoss,
            "Generalised lifted structure loss (Hermans et al., In Defense of the Triplet Loss, 2017)",
        ),
        ComponentSpec("tuplet_margin", TupletMarginLoss, "Tuplet margin loss (Yu & Tao, ICCV 2019)"),
        ComponentSpec("angular", AngularLoss, "Angular loss (Wang et al., ICCV 2017)"),
        ComponentSpec("nca", NCALoss, "Neighbourhood components analysis (Goldberger et al., NeurIPS 2004)"),
        ComponentSpec(
            "snr_contrastive",
            SNRContrastiveLoss,
            "Contrastive loss on the signal-to-noise ratio distance (Yuan et al., CVPR 2019)",
            aliases=("signal_to_noise_ratio_contrastive",),
        ),
        ComponentSpec("intra_pair_variance", IntraPairVarianceLoss, "Intra-pair variance loss (Yu & Tao, ICCV 2019)"),
        ComponentSpec("instance", InstanceLoss, "Instance loss (Zheng et al., ACM TOMM 2020)"),
        ComponentSpec("vicreg", VICRegLoss, "VICReg on two views (Bardes et al., ICLR 2022)"),
    ]
    for spec in specs:
        register(spec)
