"""Built-in losses: ProxyNCA, triplet, contrastive (C1, C2), multi-similarity, ranked list, proxy anchor."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import (
    MetricLoss,
    cosine_similarity,
    label_masks,
    pair_masks,
    pairs_to_triplets,
    pairwise_distance,
    zero_loss,
)
from dmlkit.proxies import ProxyBank, check_initializer


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _masked_logsumexp1p(x: Tensor, mask: Tensor) -> Tensor:
    """log(1 + sum_j exp(x_ij)) over the masked j of each row (0 for an empty row)."""
    x = x.masked_fill(~mask, -math.inf)
    zeros = torch.zeros(x.shape[0], 1, device=x.device, dtype=x.dtype)
    return torch.logsumexp(torch.cat([zeros, x], dim=1), dim=1)


# ---------------------------------------------------------------------------------------- triplet
class TripletLoss(MetricLoss):
    """Triplet margin loss [d(a,p) - d(a,n) + margin]+ (Schroff et al., FaceNet, CVPR 2015).

    Embeddings are L2-normalised. Without a miner every valid triplet is used. ``reduction``
    is ``mean`` (over all mined triplets, the paper's) or ``mean_nonzero`` (over triplets
    with a positive loss, as batch-all training usually does).

    Args:
        margin: the margin between positive and negative distances.
        squared: squared Euclidean distances (FaceNet's) instead of plain ones.
        reduction: ``mean`` or ``mean_nonzero``.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, margin: float = 0.2, squared: bool = True, reduction: str = "mean", normalize: bool = True):
        super().__init__()
        _check(margin >= 0, f"triplet margin must be >= 0; got {margin}")
        _check(reduction in ("mean", "mean_nonzero"), f"reduction must be 'mean' or 'mean_nonzero'; got {reduction!r}")
        self.margin, self.squared, self.reduction, self.normalize = margin, squared, reduction, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        if self.normalize:
            emb = nn.functional.normalize(emb, dim=1)
            ref = None if ref is None else nn.functional.normalize(ref, dim=1)
        other = emb if ref is None else ref
        dist = pairwise_distance(emb, other, squared=self.squared)
        if indices is None:
            pos, neg = label_masks(labels, ref_labels)
            a, p = pos.nonzero(as_tuple=True)
            # [pairs, m]: every negative for every positive pair, no loop over anchors
            viol = dist[a, p][:, None] - dist[a] + self.margin
            valid = neg[a]
            losses = viol.clamp_min(0)[valid]
        else:
            a, p, n = pairs_to_triplets(indices)
            losses = (dist[a, p] - dist[a, n] + self.margin).clamp_min(0)
        return _reduce(losses, self.reduction, emb, other)


def _reduce(losses: Tensor, reduction: str, *graph: Tensor) -> Tensor:
    if reduction == "mean_nonzero":
        losses = losses[losses > 0]
    return losses.mean() if losses.numel() else zero_loss(*graph)


# ------------------------------------------------------------------------------------ contrastive
class ContrastiveLoss(MetricLoss):
    """Contrastive loss C2 on Euclidean distance (Hadsell, Chopra, LeCun, CVPR 2006).

    Mean over positives with d > pos_margin of (d - pos_margin), plus mean over negatives
    with d < neg_margin of (neg_margin - d); embeddings L2-normalised.

    Args:
        pos_margin: positive pairs closer than this cost nothing.
        neg_margin: negative pairs farther than this cost nothing.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 0.5, normalize: bool = True):
        super().__init__()
        _check(
            0 <= pos_margin < neg_margin or neg_margin == 0 == pos_margin,
            f"need 0 <= pos_margin < neg_margin; got {pos_margin}, {neg_margin}",
        )
        self.pos_margin, self.neg_margin, self.normalize = pos_margin, neg_margin, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        if self.normalize:
            emb = nn.functional.normalize(emb, dim=1)
            ref = None if ref is None else nn.functional.normalize(ref, dim=1)
        other = emb if ref is None else ref
        dist = pairwise_distance(emb, other)
        if indices is not None and sum(len(t) for t in indices) <= dist.numel() // 8:
            # a miner's few pairs: gather the pairs pair_masks would keep (17-19 % faster at batch 1024)
            pos_d, neg_d = _mined_pair_values(dist, labels, ref_labels, indices)
            return _mean_nonzero((pos_d - self.pos_margin).clamp_min(0)) + _mean_nonzero(
                (self.neg_margin - neg_d).clamp_min(0)
            )
        pos, neg = pair_masks(labels, ref_labels, indices, len(emb), len(other), emb.device)
        return _HingeMeans.apply(dist, pos, neg, self.pos_margin, self.neg_margin)


def _mined_pair_values(mat: Tensor, labels: Tensor, ref_labels: Tensor | None, indices) -> tuple[Tensor, Tensor]:
    """The entries of ``mat`` at the distinct mined positive and negative pairs that are really
    positive (same label, not an item with itself) and negative: the pairs of ``pair_masks``."""
    a1, p, a2, n = (indices[0], indices[1], indices[0], indices[2]) if len(indices) == 3 else indices
    ref = labels if ref_labels is None else ref_labels
    m = mat.shape[1]
    ok = labels[a1] == ref[p]
    if ref_labels is None:
        ok &= a1 != p
    flat = mat.flatten()
    pos = torch.unique(a1[ok] * m + p[ok])
    neg = torch.unique((a2 * m + n)[labels[a2] != ref[n]])
    return flat[pos], flat[neg]


class _HingeMeans(torch.autograd.Function):
    """The contrastive loss on [n, m] masks: the mean over the positive pairs with ``d > pos_margin``
    of ``d - pos_margin`` plus the mean over the negative pairs with ``d < neg_margin`` of
    ``neg_margin - d`` (0 for a side with none): ``_mean_nonzero`` of the clamped, masked terms.
    Written out because it is most of a long mined list's step: two fresh [n, m] tensors (a new
    one costs more than a pass over one the process has) where autograd's graph makes ~8, and the
    gradient made in the forward pass. Gradient: PML's (its relu's), 0 at a pair exactly on its
    margin, where clamp_min's would be 1 (a tie of measure zero)."""

    @staticmethod
    def forward(ctx, dist: Tensor, pos: Tensor, neg: Tensor, pos_margin: float, neg_margin: float) -> Tensor:
        value, grad = 0.0, None
        for mask, term, sign in ((pos, dist - pos_margin, 1.0), (neg, neg_margin - dist, -1.0)):
            term = torch.where(mask, term.clamp_min_(0.0), term.new_zeros(()), out=term)
            total = term.sum()
            slope = term.sign_()  # the term's gradient: 1 where it is > 0
            count = _count_ones(slope)
            value = value + total / count
            slope.mul_(sign / count)
            grad = slope if grad is None else grad.add_(slope)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable  # piecewise linear in dist: its second derivative is 0, as this gives
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_value, None, None, None, None


def _count_ones(ones: Tensor) -> Tensor:
    """How many entries of a 0/1 float tensor are 1 (at least 1), in its dtype: a plain sum, exact while
    the total stays below 2^24 in float32 (count_nonzero, or a sum in float64, take ~20x longer)."""
    exact = ones.dtype == torch.float64 or ones.numel() < 2**24
    return (ones.sum() if exact else ones.sum(dtype=torch.float64).to(ones.dtype)).clamp_min(1)


def _similarity(x: Tensor, y: Tensor, normalize: bool) -> Tensor:
    """Cosine similarity, or with ``normalize=False`` the dot product of the vectors as they are."""
    return cosine_similarity(x, y) if normalize else x @ y.T


def _mean_nonzero(values: Tensor) -> Tensor:
    """Mean over the positive entries (0, still connected to the graph, when there is none)."""
    return values.sum() / (values > 0).sum().clamp_min(1)


class CosineContrastiveLoss(MetricLoss):
    """Contrastive loss C1 on cosine similarity: [sum_pos (1 - s) + sum_neg [s - margin]+] / n.

    ``normalize=False`` uses the dot product of the vectors as they are (CCP's unit ball).

    Args:
        margin: negative pairs less similar than this cost nothing (a cosine similarity, in [-1, 1]).
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False).
    """

    def __init__(self, margin: float = 0.5, normalize: bool = True):
        super().__init__()
        _check(-1 <= margin <= 1, f"margin is a cosine similarity, in [-1, 1]; got {margin}")
        self.margin, self.normalize = margin, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        other = emb if ref is None else ref
        sim = _similarity(emb, other, self.normalize)
        pos, neg = pair_masks(labels, ref_labels, indices, len(emb), len(other), emb.device)
        total = (1 - sim)[pos].sum() + (sim - self.margin).clamp_min(0)[neg].sum()
        return total / len(emb)


# ------------------------------------------------------------------------------- multi-similarity
class MultiSimilarityLoss(MetricLoss):
    """Multi-Similarity loss (Wang et al., CVPR 2019), cosine similarity, mean over anchors.

    Pair mining (the paper's epsilon rule) is the ``multi_similarity`` miner.
    ``normalize=False`` uses the dot product of the vectors as they are (CCP's unit ball).

    Args:
        alpha: scale of the positive similarities.
        beta: scale of the negative similarities.
        base: the similarity margin lambda around which pairs are weighted.
        normalize: cosine similarity (True) or the dot product (False).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, normalize: bool = True):
        super().__init__()
        _check(alpha > 0 and beta > 0, f"alpha and beta must be > 0; got {alpha}, {beta}")
        self.alpha, self.beta, self.base, self.normalize = alpha, beta, base, normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        other = emb if ref is None else ref
        sim = _similarity(emb, other, self.normalize)
        pos, neg = pair_masks(labels, ref_labels, indices, len(emb), len(other), emb.device)
        pos_term = _masked_logsumexp1p(-self.alpha * (sim - self.base), pos) / self.alpha
        neg_term = _masked_logsumexp1p(self.beta * (sim - self.base), neg) / self.beta
        return (pos_term + neg_term).mean()


# ------------------------------------------------------------------------------------ ranked list
class RankedListLoss(MetricLoss):
    """Ranked List Loss (Wang, Hua, Kodirov, Hu, Garnier, Robertson, "Ranked List Loss for Deep Metric
    Learning", CVPR 2019): Euclidean distance on normalised embeddings.

    Positives beyond alpha - margin and negatives within alpha are penalised linearly, each
    weighted by exp(T (violation)); mean over anchors of (1 - lam) L_P + lam L_N. By default the
    weights are constants in the backward pass, as in the authors' Caffe layer;
    ``backprop_weights=True`` back-propagates through them, as PML's ``RankedListLoss`` does (the
    gradients differ: cosine 0.97-0.99 on real batches). PML also adds 1e-5 per item of the batch
    to each row's weight sum; dmlkit does not (a relative difference below batch size x 1e-5), and
    takes a reference set and mined pairs, which PML's refuses.

    Args:
        alpha: the distance boundary of negatives: negatives closer than it are penalised.
        margin: the gap between positives and negatives: positives farther than alpha - margin are penalised.
        t_pos: temperature of the positives' weights exp(t_pos * violation) (0: equal weights).
        t_neg: temperature of the negatives' weights exp(t_neg * violation).
        lam: weight of the negatives' term, (1 - lam) of the positives'.
        backprop_weights: back-propagate through the weights (PML); false: constants (the authors' layer).
    """

    def __init__(
        self,
        alpha: float = 1.2,
        margin: float = 0.4,
        t_pos: float = 0.0,
        t_neg: float = 10.0,
        lam: float = 0.5,
        backprop_weights: bool = False,
    ):
        super().__init__()
        _check(0 < margin <= alpha, f"need 0 < margin <= alpha; got margin {margin}, alpha {alpha}")
        _check(0 <= lam <= 1, f"lam must be in [0, 1]; got {lam}")
        self.alpha, self.margin, self.t_pos, self.t_neg, self.lam = alpha, margin, t_pos, t_neg, lam
        self.backprop_weights = backprop_weights

    def compute(self, emb, labels, ref, ref_labels, indices):
        emb = nn.functional.normalize(emb, dim=1)
        other = emb if ref is None else nn.functional.normalize(ref, dim=1)
        dist = pairwise_distance(emb, other)
        pos, neg = pair_masks(labels, ref_labels, indices, len(emb), len(other), emb.device)
        pos_v = dist - (self.alpha - self.margin)
        neg_v = self.alpha - dist
        pos = pos & (pos_v > 0)
        neg = neg & (neg_v > 0)
        lp = _weighted_mean(pos_v, pos, self.t_pos, self.backprop_weights)
        ln = _weighted_mean(neg_v, neg, self.t_neg, self.backprop_weights)
        return ((1 - self.lam) * lp + self.lam * ln).mean()


def _check_preset(preset: str) -> None:
    _check(
        preset in PROXYNCA_PRESETS,
        f"proxynca preset must be one of {', '.join(PROXYNCA_PRESETS)}; got {preset!r}",
    )


def _weighted_mean(v: Tensor, mask: Tensor, t: float, through_weights: bool = False) -> Tensor:
    """Per row, sum(w v) / sum(w) over masked entries with w = exp(t v), detached unless
    ``through_weights`` (0 for an empty row)."""
    logits = (t * (v if through_weights else v.detach())).masked_fill(~mask, -math.inf)
    w = torch.softmax(logits, dim=1).nan_to_num(0.0)  # an empty row: all -inf -> nan -> 0
    return (w * v.masked_fill(~mask, 0)).sum(1)


# ------------------------------------------------------------------------------------- proxy base
class ProxyLoss(MetricLoss):
    """A loss with learnable proxies held in a core :class:`dmlkit.proxies.ProxyBank` (``bank``).

    Given a reference set, the call uses it in place of the proxies. ``proxy_init`` names a
    proxy initializer (or ``{name = ..., option = ...}``) applied to ``pool_rounds`` embedded
    training samples per class when training starts; empty keeps the random proxies.
    """

    #: ``dmlkit show`` lists the initializer's options as ``proxy_init.NAME``
    nested_options = {"proxy_init": ("proxy_initializer", None)}

    @staticmethod
    def validate_options(options: dict) -> None:
        """The proxy initializer and its options exist (checked before any data loads)."""
        check_initializer(options.get("proxy_init", ""))

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 1,
        init_std: float | None = None,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
        proxy_lr_multiplier: float = 1.0,
    ):
        super().__init__()
        _check(num_classes >= 1, f"num_classes must be >= 1; got {num_classes}")
        _check(embedding_size >= 1, f"embedding_size must be >= 1; got {embedding_size}")
        _check(proxies_per_class >= 1, f"proxies_per_class must be >= 1; got {proxies_per_class}")
        self.bank = ProxyBank(
            num_classes,
            proxies_per_class,
            embedding_size,
            lr_multiplier=proxy_lr_multiplier,
            proxy_init=proxy_init,
            pool_rounds=pool_rounds,
            init="kaiming" if init_std is None else "normal",
            std=1.0 if init_std is None else init_std,
        )
        self.num_classes = num_classes

    @property
    def proxies_per_class(self) -> int:
        return self.bank.per_class

    @property
    def proxies(self) -> Tensor:
        """All proxies, flattened: [C*K, D] (a view of ``bank.vectors``)."""
        return self.bank.vectors.reshape(-1, self.bank.dim)

    @property
    def proxy_labels(self) -> Tensor:
        """The class of each flattened proxy: [C*K]."""
        return self.bank.labels()

    def compute(self, emb, labels, ref, ref_labels, indices):
        self._own_proxies = ref is None  # the bank's proxies: row c is class c
        if ref is None:
            ref, ref_labels = self.bank.reference()
        return self.proxy_loss(emb, labels, ref, ref_labels)

    def proxy_loss(self, emb: Tensor, labels: Tensor, proxies: Tensor, proxy_labels: Tensor) -> Tensor:
        raise NotImplementedError


#: ProxyNCA's named presets: ``(the loss options it sets, the run settings it recommends)``. The 2017
#: paper's form (Movshovitz-Attias et al.): the positive proxy left out of the denominator, unscaled
#: unit vectors (the paper gives no scale), proxies at the network's learning rate. ProxyNCA++ (Teh et
#: al. 2020, and its authors' code, config/cub.json): softmax over all proxies, scale 3 (T = 1/9),
#: fast-moving proxies, global max pooling and LayerNorm before the embedding layer, 2048-d, batches
#: of 32 = 8 classes x 4, no weight decay.
PROXYNCA_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({}, {}),
    "proxynca2017": ({"scale": 1.0, "exclude_positive": True, "proxy_lr_multiplier": 1.0}, {}),
    "proxynca++": (
        {"scale": 3.0, "exclude_positive": False, "proxy_lr_multiplier": 100.0},
        {
            "train": {
                "pooling": "max",
                "head_norm": "layernorm",
                "embedding_size": 2048,
                "batch_size": 32,
                "weight_decay": 0.0,
            },
            "sampler": {"name": "m_per_class", "m": 4},
        },
    ),
}


def _proxynca_recommends(options: dict[str, Any]) -> dict[str, Any]:
    """The loss options and run settings of the chosen ``preset`` (the user's own settings win)."""
    loss, run = PROXYNCA_PRESETS.get(options.get("preset", "none"), ({}, {}))
    return {**run, "loss": dict(loss)} if loss else {}


class ProxyNCALoss(ProxyLoss):
    """ProxyNCA (Movshovitz-Attias et al., ICCV 2017) with the ProxyNCA++ options (Teh et al., ECCV 2020).

    Squared Euclidean distance between scaled, normalised embeddings and proxies; softmax
    cross-entropy over proxies, or the paper's target-excluded denominator with
    ``exclude_positive``. With several proxies per class, the nearest of the class is the
    positive (dynamic assignment) and the other proxies of the class are left out.
    ``scale`` multiplies both sides, so the temperature on squared distance is 1/scale^2.
    ``proxy_init`` names a proxy initializer (``class_means``, ``greedy_kcenter`` ...) applied
    to embedded training samples when training starts; empty keeps the random proxies.
    ``preset`` picks a paper's settings by name (``--loss-opt preset=proxynca2017``): the loss
    options above and, for ProxyNCA++, the run settings of its authors' code; your own settings win
    (a preset value you override is warned about) and ``dmlkit train --dry-run`` shows each one's
    source. docs/algorithms.md says what each preset reproduces and what it does not.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        scale: scale of embeddings and proxies (3 in ProxyNCA++, 1 in the original).
        proxies_per_class: proxies per class; the nearest of its class is the positive.
        exclude_positive: leave the positive proxy out of the softmax denominator.
        proxy_lr_multiplier: factor on the base learning rate for the proxies.
        proxy_init: a proxy initializer, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
        preset: ``none``, ``proxynca2017`` (the 2017 paper's form: positive excluded, scale 1, proxies at the
            base learning rate) or ``proxynca++`` (scale 3, softmax over all proxies, proxies x100, and the
            run settings: max pooling, LayerNorm, 2048-d, batches of 8 classes x 4, no weight decay).
    """

    @staticmethod
    def validate_options(options: dict) -> None:
        """The preset exists, and the proxy initializer (checked before any data loads)."""
        _check_preset(options.get("preset", "none"))
        ProxyLoss.validate_options(options)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 3.0,
        proxies_per_class: int = 1,
        exclude_positive: bool = False,
        proxy_lr_multiplier: float = 100.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
        preset: str = "none",
    ):
        super().__init__(
            num_classes, embedding_size, proxies_per_class, 1.0, proxy_init, pool_rounds, proxy_lr_multiplier
        )
        _check(scale > 0, f"scale must be > 0; got {scale}")
        _check_preset(preset)
        self.scale, self.exclude_positive, self.preset = scale, exclude_positive, preset
        given = {"scale": scale, "exclude_positive": exclude_positive, "proxy_lr_multiplier": proxy_lr_multiplier}
        differ = {k: v for k, v in PROXYNCA_PRESETS[preset][0].items() if given[k] != v}
        if differ:
            warnings.warn(
                f"proxynca preset={preset} sets {', '.join(f'{k}={v}' for k, v in differ.items())}, but this loss "
                f"has {', '.join(f'{k}={given[k]}' for k in differ)}: your settings win (as CCP's base loss a preset "
                "is not applied: give the options themselves)",
                UserWarning,
                stacklevel=2,
            )

    def proxy_loss(self, emb, labels, proxies, proxy_labels):
        # for unit vectors -|s x - s p|^2 = 2 s^2 cos(x, p) - 2 s^2; the constant cancels in the loss
        logits = (2 * self.scale**2) * cosine_similarity(emb, proxies)
        if self.proxies_per_class == 1 and self._own_proxies and not self.exclude_positive:
            return nn.functional.cross_entropy(logits, labels)  # static assignment: proxy c is class c
        same = labels[:, None] == proxy_labels[None, :]
        # the positive: the nearest proxy of the class
        pos_logit = logits.masked_fill(~same, -math.inf).max(1).values
        if not torch.isfinite(pos_logit).all():
            raise ValueError("a label has no proxy: labels must be in [0, num_classes)")
        other = logits.masked_fill(same, -math.inf)
        if self.exclude_positive:
            denom = torch.logsumexp(other, dim=1)
        else:
            denom = torch.logaddexp(pos_logit, torch.logsumexp(other, dim=1))
        return (denom - pos_logit).mean()


class ProxyAnchorLoss(ProxyLoss):
    """Proxy Anchor loss (Kim et al., CVPR 2020): cosine similarity, scale alpha, margin delta.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        alpha: the scale of the similarities.
        delta: the margin.
        proxies_per_class: proxies per class.
        proxy_lr_multiplier: factor on the base learning rate for the proxies.
        proxy_init: a proxy initializer, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        alpha: float = 32.0,
        delta: float = 0.1,
        proxies_per_class: int = 1,
        proxy_lr_multiplier: float = 100.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        super().__init__(
            num_classes, embedding_size, proxies_per_class, None, proxy_init, pool_rounds, proxy_lr_multiplier
        )
        _check(alpha > 0, f"alpha must be > 0; got {alpha}")
        self.alpha, self.delta = alpha, delta

    def proxy_loss(self, emb, labels, proxies, proxy_labels):
        sim = cosine_similarity(emb, proxies)  # [n, P]
        same = labels[:, None] == proxy_labels[None, :]
        pos_sum = _masked_logsumexp1p((-self.alpha * (sim - self.delta)).T, same.T)
        neg_sum = _masked_logsumexp1p((self.alpha * (sim + self.delta)).T, ~same.T)
        with_pos = same.any(0)
        pos_term = pos_sum[with_pos].sum() / with_pos.sum().clamp_min(1)
        return pos_term + neg_sum.mean()


# -------------------------------------------------------------------------------------- combined
class CombinedLoss(MetricLoss):
    """A weighted sum of registered losses (GDT: Huang, Qiu, Calderbank, Sapiro, "Geometry-aware
    Deep Transform", 2015: a classification and a metric objective; here any losses).

    ``terms`` names the losses, ``weights`` their weights (default 1 each). Each term's options
    are a table named after it (``triplet = {margin = 0.1}``, on the command line
    ``--loss "triplet+0.5*softmax" --loss-opt triplet.margin=0.1``); a table may name a
    ``miner`` (and ``miner_options``) for that term alone. Each term keeps its own parameters
    (proxies, classifiers) and is logged apart in metrics.jsonl (``loss_terms``).

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        terms: the losses to add, by name (``--loss "triplet+0.5*softmax"`` sets terms and weights).
        weights: one weight per term (default 1 each).
    """

    #: ``--loss "a+0.5*b"`` builds this loss (see dmlkit.contract.ATTRIBUTES)
    combines_terms = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        terms: list = ("triplet", "softmax"),
        weights: list | None = None,
        **term_options: dict,
    ):
        super().__init__()
        self.validate_options({"terms": terms, "weights": weights, **term_options})
        reg = dmlkit.get_registry()
        ctx = {"num_classes": num_classes, "embedding_size": embedding_size}
        self.names = [reg.get("loss", t).name for t in terms]
        self.weights = [float(w) for w in (weights or [1.0] * len(terms))]
        self.terms, self.miners = nn.ModuleList(), nn.ModuleList()
        self.has_miner = []
        for given, name in zip(terms, self.names):
            opts = dict(term_options.get(given, term_options.get(name, {})))
            miner, miner_opts = opts.pop("miner", ""), opts.pop("miner_options", {})
            self.terms.append(reg.build("loss", name, context=ctx, **opts))
            self.miners.append(reg.build("miner", miner, context=ctx, **miner_opts) if miner else nn.Identity())
            self.has_miner.append(bool(miner))
        self.last_terms: dict[str, Tensor] = {}
        # each term's own learning-rate multipliers, under the term's parameter names here
        self.lr_multipliers = {
            f"terms.{i}.{k}": v for i, t in enumerate(self.terms) for k, v in getattr(t, "lr_multipliers", {}).items()
        }

    def _forward_event(self, event: str, trainer, **kwargs) -> None:
        for part in (*self.terms, *self.miners):
            fn = getattr(part, event, None)
            if fn is not None:
                fn(trainer, **kwargs)

    # training events reach every term and miner (CCP as a term, a loss with a schedule ...)
    def on_train_start(self, trainer) -> None:
        self._forward_event("on_train_start", trainer)

    def on_epoch_start(self, trainer) -> None:
        self._forward_event("on_epoch_start", trainer)

    def on_after_backward(self, trainer) -> None:
        self._forward_event("on_after_backward", trainer)

    def on_validation_end(self, trainer, metrics) -> None:
        self._forward_event("on_validation_end", trainer, metrics=metrics)

    def on_epoch_end(self, trainer, record) -> None:
        self._forward_event("on_epoch_end", trainer, record=record)

    def on_train_end(self, trainer) -> None:
        self._forward_event("on_train_end", trainer)

    @staticmethod
    def validate_options(options: dict) -> None:
        reg = dmlkit.get_registry()
        terms, weights = list(options.get("terms") or []), options.get("weights")
        _check(len(terms) >= 1, 'combined needs at least one term, e.g. terms = ["triplet", "softmax"]')
        names = [reg.get("loss", t).name for t in terms]  # unknown names fail here, with suggestions
        _check("combined" not in names, "a combined loss cannot hold another combined loss")
        _check(len(set(names)) == len(names), f"each loss may appear once in a combination; got {terms}")
        _check(
            weights is None
            or (
                isinstance(weights, list | tuple)
                and len(weights) == len(terms)
                and all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)
            ),
            f"weights must be {len(terms)} numbers, one per term; got {weights}",
        )
        _check(
            weights is None or all(math.isfinite(w) and w > 0 for w in weights),
            f"weights must be positive and finite (leave a term out rather than weigh it 0); got {weights}",
        )
        for key, table in options.items():
            if key in ("terms", "weights", "num_classes", "embedding_size"):
                continue
            _check(key in terms or key in names, f"combined has no term '{key}'; its terms: {', '.join(terms)}")
            _check(isinstance(table, dict), f"the options of term '{key}' must be a table; got {table!r}")
            opts = {k: v for k, v in table.items() if k not in ("miner", "miner_options")}
            reg.resolve_options("loss", key, opts)
            if table.get("miner"):
                reg.resolve_options("miner", table["miner"], table.get("miner_options", {}))

    def compute(self, emb, labels, ref, ref_labels, indices):
        total, parts = 0.0, {}
        for name, weight, term, miner, mined in zip(self.names, self.weights, self.terms, self.miners, self.has_miner):
            idx = miner(emb, labels, ref, ref_labels) if mined else indices
            value = term(emb, labels, ref, ref_labels, indices=idx)
            parts[name] = value.detach()
            total = total + weight * value
        self.last_terms = parts
        return total


@dmlkit.hookimpl
def register_losses(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "proxynca",
            ProxyNCALoss,
            "ProxyNCA / ProxyNCA++ (Movshovitz-Attias et al. 2017; Teh et al. 2020)",
            aliases=("proxy_nca",),
            recommends=_proxynca_recommends,
        )
    )
    register(
        ComponentSpec("triplet", TripletLoss, "Triplet margin loss (Schroff et al., FaceNet 2015); pair with a miner")
    )
    register(
        ComponentSpec(
            "contrastive",
            ContrastiveLoss,
            "Contrastive C2 on Euclidean distance (Hadsell et al. 2006)",
            aliases=("c2",),
        )
    )
    register(
        ComponentSpec(
            "contrastive_cosine",
            CosineContrastiveLoss,
            "Contrastive C1 on cosine similarity (Hadsell et al. 2006)",
            aliases=("c1",),
        )
    )
    register(
        ComponentSpec(
            "multi_similarity", MultiSimilarityLoss, "Multi-Similarity loss (Wang et al. 2019)", aliases=("ms",)
        )
    )
    register(ComponentSpec("ranked_list", RankedListLoss, "Ranked List Loss (Wang et al. 2019)", aliases=("rll",)))
    register(ComponentSpec("proxy_anchor", ProxyAnchorLoss, "Proxy Anchor loss (Kim et al. 2020)"))
    register(
        ComponentSpec(
            "combined", CombinedLoss, "Weighted sum of losses, e.g. --loss triplet+softmax (GDT, Huang et al. 2015)"
        )
    )
