"""Built-in plugin: the reading list's methods.

Losses ``siamese`` (Koch et al. 2015), ``triplet_network`` (Hoffer & Ailon 2015), ``devise``
(Frome et al. 2013), ``pddm`` (Huang, Loy, Tang 2016) and ``softmax`` (a linear classifier,
optionally NormFace's cosine form, Wang et al. 2017); evaluator ``nway_kshot`` (N-way K-shot
episodes, as in Koch et al. 2015). Written against public hooks and the public
``dmlkit.losses`` / ``dmlkit.proxies`` / ``dmlkit.evaluation`` helpers only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.evaluation import BACKENDS, l2_normalise, retrieval_metrics
from dmlkit.losses import (
    MetricLoss,
    label_masks,
    pair_masks,
    pairs_to_triplets,
    pairwise_distance,
    zero_loss,
)
from dmlkit.proxies import ProxyBank

F = nn.functional


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _loss_graph(module: nn.Module, *tensors: Tensor) -> Tensor:
    """A zero connected to the inputs and to the module's parameters."""
    return zero_loss(*tensors, *[p for p in module.parameters() if p.requires_grad])


# ========================================================================================= siamese
class SiameseLoss(MetricLoss):
    """Siamese one-shot loss (Koch, Zemel, Salakhutdinov, "Siamese Neural Networks for One-shot
    Image Recognition", ICML Deep Learning Workshop 2015).

    For every pair (i, j) of the batch (or batch x reference set, or the mined pairs):
    ``p_ij = sigmoid(sum_k alpha_k |h_ik - h_jk| + b)`` with a learned weight vector ``alpha``
    (size ``embedding_size``) and bias ``b`` (``bias=False`` drops it), and binary
    cross-entropy with target 1 for a same-class pair, 0 otherwise. The loss is the mean over
    pairs, or with ``balance=True`` the mean of the positive pairs' mean and the negative
    pairs' mean. ``alpha`` starts from N(0, ``init_std``^2) and ``b`` from N(0.5, 0.01^2), the
    paper's initialisation of its fully connected layers. The paper's L2 weight decay is the
    trainer's ``weight_decay``. ``similarity(x, y)`` is ``p`` itself, the score Koch et al.'s one-shot
    task ranks the support by: the ``nway_kshot`` evaluator's ``scoring=similarity`` uses it.

    Args:
        embedding_size: embedding dimension (supplied by the trainer): the size of alpha.
        bias: learn the bias b.
        balance: average the positive and the negative pairs' means instead of all pairs.
        init_std: standard deviation of alpha's initialisation.
    """

    def __init__(self, embedding_size: int, bias: bool = True, balance: bool = False, init_std: float = 0.2):
        super().__init__()
        _check(embedding_size >= 1, f"embedding_size must be >= 1; got {embedding_size}")
        _check(init_std >= 0, f"init_std must be >= 0; got {init_std}")
        self.alpha = nn.Parameter(torch.randn(embedding_size) * init_std)
        self.bias = nn.Parameter(0.5 + 0.01 * torch.randn(())) if bias else None
        self.balance = balance

    def logits(self, x: Tensor, y: Tensor) -> Tensor:
        """[n, m] ``sum_k alpha_k |x_ik - y_jk| + b``: L1 distances of the rows scaled by the
        positive and by the negative part of alpha (no [n, m, D] tensor)."""
        a_pos, a_neg = self.alpha.clamp_min(0), (-self.alpha).clamp_min(0)
        out = torch.cdist(x * a_pos, y * a_pos, p=1) - torch.cdist(x * a_neg, y * a_neg, p=1)
        return out + self.bias if self.bias is not None else out

    def similarity(self, x: Tensor, y: Tensor) -> Tensor:
        """[n, m] Koch's score ``p = sigmoid(sum_k alpha_k |x_ik - y_jk| + b)`` of every pair of rows:
        the learned probability that the two are of one class (``nway_kshot``'s ``scoring=similarity``)."""
        return torch.sigmoid(self.logits(x, y))

    def compute(self, emb, labels, ref, ref_labels, indices):
        other = emb if ref is None else ref
        pos, neg = pair_masks(labels, ref_labels, indices, len(emb), len(other), emb.device)
        if not bool((pos | neg).any()):
            return _loss_graph(self, emb, other)
        logits = self.logits(emb, other)
        bce = F.binary_cross_entropy_with_logits(logits, pos.float(), reduction="none")
        if not self.balance:
            return bce[pos | neg].mean()
        parts = [bce[m].mean() for m in (pos, neg) if bool(m.any())]
        return sum(parts) / len(parts)


# ================================================================================= triplet network
class TripletNetworkLoss(MetricLoss):
    """Triplet network loss (Hoffer & Ailon, "Deep metric learning using Triplet network",
    SIMBAD 2015).

    With Euclidean distances d+ = |x - x+| and d- = |x - x-|, the softmax
    ``D+ = exp(d+) / (exp(d+) + exp(d-))``, ``D- = 1 - D+``, and the loss
    ``|(D+, D- - 1)|^2 = 2 (D+)^2``, averaged over every valid triplet of the batch (or
    batch x reference set), or over the triplets a miner gives. The paper uses the network's
    outputs as they are (``normalize=False``); ``normalize=True`` L2-normalises them first.

    Args:
        normalize: L2-normalise the embeddings first (the paper does not).
    """

    def __init__(self, normalize: bool = False):
        super().__init__()
        self.normalize = normalize

    def compute(self, emb, labels, ref, ref_labels, indices):
        if self.normalize:
            emb = F.normalize(emb, dim=1)
            ref = None if ref is None else F.normalize(ref, dim=1)
        other = emb if ref is None else ref
        dist = pairwise_distance(emb, other)
        if indices is None:
            pos, neg = label_masks(labels, ref_labels)
            a, p = pos.nonzero(as_tuple=True)
            # [pairs, m]: every negative for every positive pair, no loop over anchors
            d_plus = torch.sigmoid(dist[a, p][:, None] - dist[a])
            losses = 2 * d_plus.square()[neg[a]]
        else:
            a, p, n = pairs_to_triplets(indices)
            losses = 2 * torch.sigmoid(dist[a, p] - dist[a, n]).square()
        return losses.mean() if losses.numel() else zero_loss(emb, other)


# ========================================================================================== devise
def load_class_vectors(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Class vectors from ``path``: a ``.npy`` array [C, d], or a text file of
    ``name v1 v2 ... vd`` lines (blank lines and ``#`` comments skipped), rows in label order.
    Returns (vectors float64 [C, d], names; the names are row numbers for a .npy file)."""
    p = Path(path).expanduser()
    hint = "give a .npy array [classes, d] or a text file of 'name v1 v2 ...' lines, one per class in label order"
    if not p.is_file():
        raise OptionError(f"devise: class_vectors file {str(p)!r} not found; {hint}")
    if p.suffix == ".npy":
        try:
            vectors = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise OptionError(f"devise: cannot read {str(p)!r} as a .npy array ({exc}); {hint}") from exc
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
            raise OptionError(f"devise: {str(p)!r} holds a {vectors.dtype} array of shape {vectors.shape}; {hint}")
        names = [str(i) for i in range(len(vectors))]
    else:
        names, rows = [], []
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                raise OptionError(
                    f"devise: {p.name} line {number}: expected 'name v1 v2 ...' numbers; {hint}"
                ) from None
            if not values or (rows and len(values) != len(rows[0])):
                want = len(rows[0]) if rows else "at least 1"
                raise OptionError(f"devise: {p.name} line {number} has {len(values)} values, expected {want}; {hint}")
            names.append(parts[0])
            rows.append(values)
        if not rows:
            raise OptionError(f"devise: {str(p)!r} holds no vector; {hint}")
        vectors = np.asarray(rows)
    vectors = vectors.astype(np.float64)
    if not np.isfinite(vectors).all():
        raise OptionError(f"devise: {str(p)!r} holds NaN or inf values; fix the class vectors")
    return vectors, names


class DeViSELoss(MetricLoss):
    """DeViSE (Frome, Corrado, Shlens, Bengio, Dean, Ranzato, Mikolov, "DeViSE: A Deep
    Visual-Semantic Embedding Model", NeurIPS 2013): hinge rank loss against fixed label vectors.

    A trainable linear map M (``embedding_size`` -> d, no bias) takes an embedding v to the
    label space; the fixed unit-norm class vectors t_c sit in a non-trainable
    :class:`~dmlkit.proxies.ProxyBank`. Per sample of class y:
    ``sum_{j != y} max(0, margin - t_y . M v + t_j . M v)``, margin 0.1, mean over samples.
    ``class_vectors`` is a .npy file (C x d) or a text file of ``name v1 ... vd`` lines, rows
    in label order (e.g. word vectors of the class names); empty draws fixed random unit
    vectors of size ``vector_size`` with ``seed``. A reference set, when given, stands in for
    the class vectors (label-space rows with their labels).

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        class_vectors: a .npy file [C, d] or a text file of ``name v1 ... vd`` lines, in label order; empty: random.
        vector_size: d, the size of random class vectors.
        margin: the hinge margin.
        seed: seed of random class vectors.
    """

    @staticmethod
    def validate_options(options: dict) -> None:
        """The class-vector file exists and parses (checked before any data loads)."""
        if options.get("class_vectors"):
            load_class_vectors(options["class_vectors"])

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        class_vectors: str = "",
        vector_size: int = 500,
        margin: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        _check(num_classes >= 1, f"num_classes must be >= 1; got {num_classes}")
        _check(embedding_size >= 1, f"embedding_size must be >= 1; got {embedding_size}")
        _check(margin >= 0, f"margin must be >= 0; got {margin}")
        if class_vectors:
            vectors, self.class_names = load_class_vectors(class_vectors)
            if vectors.shape[0] != num_classes:
                raise OptionError(
                    f"devise: {class_vectors!r} has {vectors.shape[0]} class vectors but the training split has "
                    f"{num_classes} classes; give one row per class, in label order"
                )
            vectors = torch.from_numpy(vectors)
        else:
            _check(vector_size >= 1, f"vector_size must be >= 1; got {vector_size}")
            g = torch.Generator().manual_seed(seed)
            vectors = torch.randn(num_classes, vector_size, generator=g, dtype=torch.float64)
            self.class_names = [str(i) for i in range(num_classes)]
        norms = vectors.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            raise OptionError(f"devise: class vector {int((norms[:, 0] == 0).nonzero()[0])} is all zeros; fix it")
        vectors = (vectors / norms).float()
        self.bank = ProxyBank(num_classes, 1, vectors.shape[1], trainable=False)
        with torch.no_grad():
            self.bank.vectors.copy_(vectors[:, None, :])
        self.proj = nn.Linear(embedding_size, vectors.shape[1], bias=False)
        self.margin = margin

    def scores(self, emb: Tensor, vectors: Tensor) -> Tensor:
        """[n, m] ``t . M v`` of every embedding against every class vector."""
        return self.proj(emb) @ vectors.T

    def compute(self, emb, labels, ref, ref_labels, indices):
        vectors, vec_labels = self.bank.reference() if ref is None else (ref, ref_labels)
        if vectors.shape[1] != self.proj.out_features:
            raise ValueError(
                f"devise: reference rows have size {vectors.shape[1]}, the label space {self.proj.out_features}"
            )
        s = self.scores(emb, vectors)
        same = labels[:, None] == vec_labels[None, :]
        pos = s.masked_fill(~same, -math.inf).max(1).values
        if not bool(torch.isfinite(pos).all()):
            raise ValueError("devise: a label has no class vector")
        hinge = (self.margin - pos[:, None] + s).clamp_min(0) * ~same
        return hinge.sum(1).mean()


# ============================================================================================ pddm
class PDDMLoss(MetricLoss):
    """PDDM (Huang, Loy, Tang, "Local Similarity-Aware Deep Feature Embedding", NeurIPS 2016):
    a learned similarity unit, hard quadruplets mined with it, a double-header hinge.

    On L2-normalised features x_i, x_j: ``u = |x_i - x_j|``, ``v = (x_i + x_j) / 2``, each
    through Linear + ReLU and L2-normalised, concatenated, Linear + ReLU, Linear -> S(i, j)
    (widths ``hidden``). Mining (no gradient): the ``positive_pairs`` same-class pairs with
    the lowest S (default 1, one quadruplet per batch; 0 = every positive pair; without a
    reference set each unordered pair counts once), and for each of their
    members i, j the different-class item with the highest S: k for i, l for j. Per quadruplet
    ``max(0, a + S(i,k) - S(i,j)) + max(0, a + S(j,l) - S(i,j))`` (a = ``margin``) plus
    ``lam`` times the embedding loss on the same quadruplet
    ``max(0, b + |x_i - x_j|^2 - |x_i - x_k|^2) + max(0, b + |x_i - x_j|^2 - |x_j - x_l|^2)``
    (b = ``embedding_margin``); mean over quadruplets. The unit's layers are parameters of the loss and train with the network.

    Args:
        embedding_size: embedding dimension (supplied by the trainer).
        margin: a, the margin of the similarity hinge.
        embedding_margin: b, the margin of the embedding hinge.
        lam: weight of the embedding loss.
        hidden: width of the similarity unit's layers.
        positive_pairs: same-class pairs with the lowest similarity mined per batch (0: all).
    """

    def __init__(
        self,
        embedding_size: int,
        margin: float = 1.9,
        embedding_margin: float = 1.0,
        lam: float = 0.5,
        hidden: int = 128,
        positive_pairs: int = 1,
    ):
        super().__init__()
        _check(
            embedding_size >= 1 and hidden >= 1,
            f"embedding_size and hidden must be >= 1; got {embedding_size}, {hidden}",
        )
        _check(margin >= 0 and embedding_margin >= 0, "margin and embedding_margin must be >= 0")
        _check(lam >= 0, f"lam must be >= 0; got {lam}")
        _check(positive_pairs >= 0, f"positive_pairs must be >= 0 (0: every positive pair); got {positive_pairs}")
        self.fc_u = nn.Linear(embedding_size, hidden)
        self.fc_v = nn.Linear(embedding_size, hidden)
        self.fc_c = nn.Linear(2 * hidden, hidden)
        self.fc_s = nn.Linear(hidden, 1)
        self.margin, self.embedding_margin, self.lam = margin, embedding_margin, lam
        self.positive_pairs = positive_pairs

    def score(self, x: Tensor, y: Tensor) -> Tensor:
        """S of each row pair (x[k], y[k]) of L2-normalised rows: [..., D] -> [...]."""
        u = F.normalize(F.relu(self.fc_u((x - y).abs())), dim=-1)
        v = F.normalize(F.relu(self.fc_v((x + y) / 2)), dim=-1)
        c = F.relu(self.fc_c(torch.cat([u, v], dim=-1)))
        return self.fc_s(c)[..., 0]

    def scores(self, x: Tensor, y: Tensor) -> Tensor:
        """[n, m] S of every pair of rows of x and y (L2-normalised rows)."""
        return self.score(x[:, None, :], y[None, :, :])

    def compute(self, emb, labels, ref, ref_labels, indices):
        x = F.normalize(emb, dim=1)
        r = x if ref is None else F.normalize(ref, dim=1)
        r_labels = labels if ref_labels is None else ref_labels
        s = self.scores(x, r)  # [n, m]
        pos, neg = pair_masks(labels, ref_labels, indices, len(x), len(r), x.device)
        # negatives of the second member j (a reference item): other-class reference items
        neg_r = neg if ref is None else r_labels[:, None] != r_labels[None, :]
        with torch.no_grad():
            usable = pos & neg.any(1, keepdim=True) & neg_r.any(1)[None, :]
            if ref is None:  # S is symmetric: each unordered pair once
                usable = (usable | usable.T).triu(1)
            count = int(usable.sum())
        if count == 0:
            return _loss_graph(self, emb, r)
        with torch.no_grad():
            take = count if self.positive_pairs == 0 else min(self.positive_pairs, count)
            flat = s.detach().masked_fill(~usable, math.inf).flatten()
            chosen = flat.topk(take, largest=False).indices
            i, j = chosen // s.shape[1], chosen % s.shape[1]
            k = s.detach().masked_fill(~neg, -math.inf)[i].argmax(1)
        s_j = s[j] if ref is None else self.scores(r[j], r)  # [take, m]: j against the reference set
        with torch.no_grad():
            l_ = s_j.detach().masked_fill(~neg_r[j], -math.inf).argmax(1)
        s_ij, s_ik, s_jl = s[i, j], s[i, k], s_j[torch.arange(take, device=x.device), l_]
        metric = (self.margin + s_ik - s_ij).clamp_min(0) + (self.margin + s_jl - s_ij).clamp_min(0)
        d_ij = (x[i] - r[j]).square().sum(1)
        d_ik = (x[i] - r[k]).square().sum(1)
        d_jl = (r[j] - r[l_]).square().sum(1)
        embed = (self.embedding_margin + d_ij - d_ik).clamp_min(0) + (self.embedding_margin + d_ij - d_jl).clamp_min(0)
        return (metric + self.lam * embed).mean()


# ========================================================================================= softmax
class SoftmaxLoss(MetricLoss):
    """Softmax cross-entropy through a linear classifier; ``normalized=True`` is NormFace's cosine
    form (Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017).

    Logits ``w_c . x`` (no bias), or ``scale * cos(w_c, x)`` when ``normalized`` (scale 16).
    The C x D weights are a :class:`~dmlkit.proxies.ProxyBank` (one vector per class, drawn
    from N(0, 1/D)), so the trainer optimises them at ``lr_multiplier`` times the base
    learning rate. With several vectors per class (``proxies_per_class``, or a wrapper such as
    CCP resizing the bank) or a reference set in their place, a class's logit is its nearest
    vector's and the class's other vectors leave the denominator.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        normalized: NormFace's cosine logits instead of dot products.
        scale: the scale of the cosine logits.
        proxies_per_class: weight vectors per class (the nearest one is the class's logit).
        lr_multiplier: factor on the base learning rate for the weights.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        normalized: bool = False,
        scale: float = 16.0,
        proxies_per_class: int = 1,
        lr_multiplier: float = 1.0,
    ):
        super().__init__()
        _check(num_classes >= 1, f"num_classes must be >= 1; got {num_classes}")
        _check(embedding_size >= 1, f"embedding_size must be >= 1; got {embedding_size}")
        _check(scale > 0, f"scale must be > 0; got {scale}")
        _check(proxies_per_class >= 1, f"proxies_per_class must be >= 1; got {proxies_per_class}")
        self.bank = ProxyBank(
            num_classes,
            proxies_per_class,
            embedding_size,
            lr_multiplier=lr_multiplier,
            init="normal",
            std=embedding_size**-0.5,
        )
        self.normalized, self.scale = normalized, scale

    def logits(self, emb: Tensor, weights: Tensor) -> Tensor:
        if self.normalized:
            return self.scale * (F.normalize(emb, dim=1) @ F.normalize(weights, dim=1).T)
        return emb @ weights.T

    def compute(self, emb, labels, ref, ref_labels, indices):
        own = ref is None
        weights, w_labels = self.bank.reference() if own else (ref, ref_labels)
        logits = self.logits(emb, weights)
        if own and self.bank.per_class == 1:
            return F.cross_entropy(logits, self.bank.rows(labels))
        same = labels[:, None] == w_labels[None, :]
        pos = logits.masked_fill(~same, -math.inf).max(1).values
        if not bool(torch.isfinite(pos).all()):
            raise ValueError("softmax: a label has no classifier vector")
        denom = torch.logaddexp(pos, torch.logsumexp(logits.masked_fill(same, -math.inf), dim=1))
        return (denom - pos).mean()


# ====================================================================================== nway_kshot
class Episodes(NamedTuple):
    """N-way K-shot episodes, as item indices into the evaluated split."""

    classes: np.ndarray  # [E, N] the label of each way
    support: np.ndarray  # [E, N, K] support items of each way
    query: np.ndarray  # [E] the query item
    target: np.ndarray  # [E] the way (0..N-1) the query belongs to


def sample_episodes(labels: Any, n_way: int, k_shot: int, episodes: int, seed: int = 0, groups: Any = None) -> Episodes:
    """``episodes`` random N-way K-shot episodes over ``labels``, reproducible from ``seed``.

    Only classes with at least K + 1 items take part. Each episode draws N distinct such
    classes uniformly, then for each class K + 1 distinct items uniformly (Floyd's algorithm,
    vectorised over episodes and ways) in random order: the first K are its support; the
    query is the (K+1)-th item of one way drawn uniformly, so it is never in the support.

    With ``groups`` (one per item; a group holds whole classes, e.g. Omniglot's alphabets),
    each episode first draws a group uniformly among those with at least N such classes, then
    its N classes uniformly within that group (Lake et al.'s one-shot task, which Koch et al.
    report on); groups with fewer are never drawn from. Without groups the random stream is
    the one of earlier versions: the same seed gives the same episodes.
    """
    _check(n_way >= 2, f"n_way must be >= 2; got {n_way}")
    _check(k_shot >= 1, f"k_shot must be >= 1; got {k_shot}")
    _check(episodes >= 1, f"episodes must be >= 1; got {episodes}")
    lab = np.asarray(labels).reshape(-1)
    classes, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts >= k_shot + 1)
    if len(eligible) < n_way:
        raise OptionError(
            f"nway_kshot: only {len(eligible)} classes have at least k_shot + 1 = {k_shot + 1} items, fewer than "
            f"n_way = {n_way}; set the evaluator option n_way (or k_shot) lower"
        )
    order = np.argsort(inverse, kind="stable")  # items grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    if groups is None:
        ways = _draw_classes(rng, np.arange(len(eligible))[None, :], np.zeros(episodes, np.int64), n_way)
    else:
        members = _group_members(class_groups(lab, groups)[1][eligible], n_way, k_shot)
        drawn = rng.integers(0, len(members), size=episodes)  # each usable group alike
        ways = _draw_classes(rng, members, drawn, n_way)
    ways = eligible[ways]  # [E, N] class positions
    target = rng.integers(0, n_way, size=episodes)
    m = k_shot + 1
    cnt = counts[ways]
    picks = np.empty((episodes, n_way, m), dtype=np.int64)
    for t in range(m):  # Floyd: a uniform m-subset of range(cnt) per (episode, way)
        top = cnt - m + t
        r = rng.integers(0, top + 1)
        dup = (picks[..., :t] == r[..., None]).any(-1)
        picks[..., t] = np.where(dup, top, r)
    shuffle = np.argsort(rng.random(picks.shape), axis=-1)
    picks = np.take_along_axis(picks, shuffle, axis=-1)
    items = order[starts[ways][..., None] + picks]  # [E, N, K+1]
    query = items[np.arange(episodes), target, k_shot]
    return Episodes(classes[ways], items[..., :k_shot], query, target)


def class_groups(labels: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """The group of each class of ``labels`` (in ``np.unique`` order of the labels) from a group per
    item: (group names, [C] the index of each class's group). A class spanning groups is refused."""
    lab = np.asarray(labels).reshape(-1)
    grp = np.asarray(groups).reshape(-1)
    if grp.shape != lab.shape:
        raise OptionError(f"nway_kshot: {len(lab)} labels but {len(grp)} groups; give one group per item")
    classes, inverse = np.unique(lab, return_inverse=True)
    names, codes = np.unique(grp, return_inverse=True)
    of_class = np.full(len(classes), -1, dtype=np.int64)
    of_class[inverse] = codes
    mixed = np.flatnonzero(of_class[inverse] != codes)
    if len(mixed):
        c = inverse[mixed[0]]
        raise OptionError(
            f"nway_kshot: class {classes[c].item()!r} has items in groups {names[of_class[c]].item()!r} and "
            f"{names[codes[mixed[0]]].item()!r}; a group must hold whole classes (fix the dataset's groups)"
        )
    return names, of_class


def _group_members(of_class: np.ndarray, n_way: int, k_shot: int) -> np.ndarray:
    """[G, S] positions (into ``of_class``) of the classes of each group with at least ``n_way`` of
    them, padded with -1; refuses when no group has that many."""
    sizes = np.bincount(of_class) if len(of_class) else np.zeros(0, np.int64)
    usable = np.flatnonzero(sizes >= n_way)
    if not len(usable):
        raise OptionError(
            f"nway_kshot: no group has n_way = {n_way} classes with at least k_shot + 1 = {k_shot + 1} items "
            f"(the largest has {int(sizes.max(initial=0))}); set n_way lower or episodes_within=all"
        )
    members = np.full((len(usable), int(sizes[usable].max())), -1, dtype=np.int64)
    for row, g in enumerate(usable):
        found = np.flatnonzero(of_class == g)
        members[row, : len(found)] = found
    return members


def _draw_classes(rng: np.random.Generator, members: np.ndarray, drawn: np.ndarray, n_way: int) -> np.ndarray:
    """[E, N] distinct entries of row ``drawn[e]`` of ``members`` (-1 is padding), each set uniform."""
    episodes, width = len(drawn), members.shape[1]
    ways = np.empty((episodes, n_way), dtype=np.int64)
    rows = max(1, (1 << 22) // width)  # bound the random-key matrix; the stream is the same in chunks
    for lo in range(0, episodes, rows):
        keys = rng.random((min(rows, episodes - lo), width))
        row = members[drawn[lo : lo + len(keys)]]
        keys[row < 0] = np.inf  # padding is never among the smallest keys
        # the n_way smallest keys of each row: a uniform random set of n_way distinct classes
        pick = np.argpartition(keys, n_way - 1, axis=1)[:, :n_way]
        ways[lo : lo + len(keys)] = np.take_along_axis(row, pick, axis=1)
    return ways


DISTANCES = ("euclidean", "sqeuclidean", "cosine")
EPISODES_WITHIN = ("auto", "groups", "all")
SCORINGS = ("distance", "similarity")


def nway_predict(
    embeddings: np.ndarray,
    support: np.ndarray,
    query: np.ndarray,
    distance: str = "euclidean",
    similarity: Any = None,
) -> np.ndarray:
    """[E] the predicted way of each episode: the way whose K support items are nearest to the
    query on average (mean ``distance`` over the K), ties to the lower way. With ``similarity``
    (a function of two arrays ``[n, D]``, ``[m, D]`` -> ``[n, m]`` scores, higher = more alike, e.g.
    a loss's learned one) the way with the highest mean score over its K support items wins."""
    emb = np.asarray(embeddings)
    if emb.dtype != np.float64:
        emb = emb.astype(np.float32)
    e, n, k = support.shape
    out = np.empty(e, dtype=np.int64)
    if similarity is not None:
        rows = 64  # episodes per call: a [rows, rows * N * K] score matrix, its diagonal blocks used
        for lo in range(0, e, rows):
            s = support[lo : lo + rows].reshape(-1)
            c = len(s) // (n * k)
            scores = np.asarray(similarity(emb[query[lo : lo + rows]], emb[s])).reshape(c, c, n, k)
            out[lo : lo + c] = scores[np.arange(c), np.arange(c)].mean(-1).argmax(-1)
        return out
    rows = max(1, (1 << 22) // max(1, n * k * emb.shape[1]))
    for lo in range(0, e, rows):
        s = emb[support[lo : lo + rows]]  # [c, N, K, D]
        qv = emb[query[lo : lo + rows]][:, None, None, :]
        if distance == "cosine":
            d = 1.0 - (s * qv).sum(-1) / np.maximum(np.linalg.norm(s, axis=-1) * np.linalg.norm(qv, axis=-1), 1e-12)
        else:
            d = ((s - qv) ** 2).sum(-1)
            if distance == "euclidean":
                d = np.sqrt(d)
        out[lo : lo + rows] = d.mean(-1).argmin(-1)
    return out


class NWayKShotEvaluator:
    """N-way K-shot accuracy over random episodes (the one-shot evaluation of Koch, Zemel,
    Salakhutdinov, "Siamese Neural Networks for One-shot Image Recognition", 2015).

    Each of ``episodes`` episodes picks ``n_way`` classes among those with at least
    ``k_shot`` + 1 items, ``k_shot`` support items per class and one query of one of them
    (not in the support), and predicts the class whose support is nearest (mean distance over
    the K; Euclidean on L2-normalised embeddings by default). Reports ``nway_accuracy`` and
    ``nway_ci95``, the normal-approximation 95 % half-width ``1.96 sqrt(acc (1 - acc) / E)``.
    The episodes depend only on the labels, the groups and ``seed``, so every evaluation of a run
    uses the same ones. Episodes are drawn from all items of the split; query and gallery masks
    apply to the retrieval metrics only. With ``retrieval`` (default) the evaluator also reports
    dmlkit's retrieval metrics (P@1, R-Precision, MAP@R, Recall@``ks``), so it can serve as a
    run's evaluator with ``best_metric = "map_at_r"``.

    Koch et al. report on Lake et al.'s task, whose episodes hold characters of one alphabet: with
    ``episodes_within = "auto"`` (default) and a split with groups (``Split.groups``: the omniglot
    dataset's alphabets) each episode draws a group uniformly among those with at least ``n_way``
    eligible classes, then its classes within it (across all classes, with a warning, where no group
    is that large, as in a validation split of a few characters per alphabet). That is harder than
    drawing across all classes (raw pixels of Omniglot's evaluation set, 20-way 1-shot: about 22 %
    within vs 31 % across).
    The results record the protocol: ``nway_within_groups`` (1 or 0), ``nway_groups`` (the groups
    drawn from) and the text ``nway_protocol``. With ``scoring = "similarity"`` a query is compared
    with the support by the run's loss's learned ``similarity`` (the siamese loss's weighted L1 +
    sigmoid, as Koch et al. score), on the embeddings as the loss sees them (``normalize`` then
    applies to the retrieval metrics only); a run whose loss has none is refused before data loads.

    Args:
        n_way: classes in each episode.
        k_shot: support items of each class in an episode.
        episodes: episodes drawn (the same ones at every evaluation).
        seed: seed of the episodes.
        distance: how a query is compared with the support: ``euclidean``, ``sqeuclidean`` or ``cosine``.
        normalize: L2-normalise the embeddings first.
        retrieval: also report the retrieval metrics (P@1, R-Precision, MAP@R, Recall@K).
        ks: the K of Recall@K.
        backend: k-NN search for the retrieval metrics: ``faiss``, ``torch`` or ``auto``.
        memory_mb: the memory one chunk of the retrieval search may take.
        episodes_within: ``auto``: each episode's classes share a group when the split has groups (an
            Omniglot alphabet), else any classes; ``groups``: within a group, refused for a dataset without
            groups; ``all``: across all classes.
        scoring: ``distance`` (the ``distance`` option) or ``similarity``: the run's loss's learned
            similarity, higher = more alike (the siamese loss has one).
    """

    def __init__(
        self,
        n_way: int = 20,
        k_shot: int = 1,
        episodes: int = 1000,
        seed: int = 0,
        distance: str = "euclidean",
        normalize: bool = True,
        retrieval: bool = True,
        ks: Sequence[int] = (1, 2, 4, 8),
        backend: str = "auto",
        memory_mb: float = 512,
        episodes_within: str = "auto",
        scoring: str = "distance",
    ):
        _check(n_way >= 2, f"n_way must be >= 2; got {n_way}")
        _check(k_shot >= 1, f"k_shot must be >= 1; got {k_shot}")
        _check(episodes >= 1, f"episodes must be >= 1; got {episodes}")
        _check(distance in DISTANCES, f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")
        _check(backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        _check(bool(ks) and min(ks) >= 1, f"ks must be positive integers; got {list(ks)}")
        _check(memory_mb > 0, f"memory_mb must be > 0; got {memory_mb}")
        _check(
            episodes_within in EPISODES_WITHIN,
            f"episodes_within must be one of {', '.join(EPISODES_WITHIN)}; got {episodes_within!r}",
        )
        _check(scoring in SCORINGS, f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
        self.n_way, self.k_shot, self.episodes, self.seed = n_way, k_shot, episodes, seed
        self.distance, self.normalize, self.retrieval = distance, normalize, retrieval
        self.ks, self.backend, self.memory_mb = tuple(ks), backend, memory_mb
        self.episodes_within, self.scoring = episodes_within, scoring

    @property
    def metrics(self) -> dict[str, str]:
        """The metrics this evaluator reports, each with its direction."""
        out = {"nway_accuracy": "max", "nway_ci95": "min"}
        if self.retrieval:
            names = ["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{k}" for k in self.ks)]
            out.update(dict.fromkeys(names, "max"))
        return out

    @property
    def requires(self) -> dict[str, str]:
        """The evaluator arguments it cannot do without, each with the option that asks for it."""
        out = {}
        if self.episodes_within == "groups":
            out["groups"] = "episodes_within = 'groups'"
        if self.scoring == "similarity":
            out["similarity"] = "scoring = 'similarity'"
        return out

    def episodes_for(self, labels: Any, groups: Any = None) -> Episodes:
        """The episodes over ``labels``, within the groups of :meth:`groups_used`."""
        return sample_episodes(
            labels, self.n_way, self.k_shot, self.episodes, self.seed, self.groups_used(labels, groups)
        )

    def groups_used(self, labels: Any, groups: Any) -> Any:
        """The groups the episodes are drawn within, or None (across all classes). ``auto`` draws across
        all classes, with a warning, when no group has ``n_way`` classes of ``k_shot`` + 1 items (e.g. a
        validation split holding a few characters of each alphabet); ``groups`` refuses a split without."""
        if self.episodes_within == "groups" and groups is None:
            raise OptionError(
                "nway_kshot: episodes_within=groups, and the evaluated split has no groups (Split.groups; the "
                "omniglot dataset gives alphabets); set episodes_within=all or auto"
            )
        if groups is None or self.episodes_within == "all":
            return None
        if self.episodes_within == "auto":
            lab = np.asarray(labels).reshape(-1)
            of_class = class_groups(lab, groups)[1]
            counts = np.unique(lab, return_counts=True)[1]  # the classes in class_groups' order
            eligible = of_class[counts >= self.k_shot + 1]
            if not len(eligible) or np.bincount(eligible).max() < self.n_way:
                warnings.warn(
                    f"nway_kshot: no group of the evaluated split has n_way = {self.n_way} classes of k_shot + 1 = "
                    f"{self.k_shot + 1} items, so its episodes are drawn across all classes (nway_within_groups = 0)",
                    UserWarning,
                    stacklevel=3,
                )
                return None
        return groups

    def __call__(
        self,
        embeddings: Any,
        labels: Any,
        query_mask: np.ndarray | None = None,
        gallery_mask: np.ndarray | None = None,
        groups: Any = None,
        similarity: Any = None,
    ) -> dict[str, Any]:
        if self.scoring == "similarity" and similarity is None:
            raise OptionError(
                "nway_kshot: scoring=similarity needs the run's loss similarity (the siamese loss has one), and none "
                "was given; evaluate a run whose loss has one, or set scoring=distance"
            )
        emb = np.asarray(embeddings.cpu() if isinstance(embeddings, torch.Tensor) else embeddings)
        if emb.dtype != np.float64:
            emb = emb.astype(np.float32)
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        groups = self.groups_used(lab, groups)
        ep = sample_episodes(lab, self.n_way, self.k_shot, self.episodes, self.seed, groups)
        if self.scoring == "similarity":
            pred = nway_predict(emb, ep.support, ep.query, similarity=similarity)
            scored = "the loss's learned similarity"
        else:
            pred = nway_predict(l2_normalise(emb) if self.normalize else emb, ep.support, ep.query, self.distance)
            scored = f"{self.distance} distance" + (" of L2-normalised embeddings" if self.normalize else "")
        within = groups is not None
        used = len(np.unique(np.asarray(groups).reshape(-1)[ep.query])) if within else 0
        acc = float((pred == ep.target).mean())
        out: dict[str, Any] = {
            "nway_accuracy": acc,
            "nway_ci95": 1.96 * math.sqrt(acc * (1 - acc) / self.episodes),
            "nway_episodes": self.episodes,
            "nway_within_groups": int(within),
            "nway_groups": used,
            "nway_protocol": f"{self.n_way}-way {self.k_shot}-shot, {self.episodes} episodes "
            + (f"each within one group ({used} groups)" if within else "across all classes")
            + f", scored by {scored}",
        }
        if self.retrieval:
            out.update(
                retrieval_metrics(
                    emb.astype(np.float32, copy=False),
                    lab,
                    query_mask=query_mask,
                    gallery_mask=gallery_mask,
                    ks=self.ks,
                    normalise=self.normalize,
                    backend=self.backend,
                    memory_mb=self.memory_mb,
                )
            )
        return out


# ======================================================================================== register
@dmlkit.hookimpl
def register_losses(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "siamese", SiameseLoss, "Siamese one-shot loss: weighted L1 + sigmoid + BCE over pairs (Koch et al. 2015)"
        )
    )
    register(
        ComponentSpec(
            "triplet_network",
            TripletNetworkLoss,
            "Triplet network loss: softmax over (d+, d-), squared error to (0, 1) (Hoffer & Ailon 2015)",
        )
    )
    register(
        ComponentSpec("devise", DeViSELoss, "DeViSE hinge rank loss against fixed class vectors (Frome et al. 2013)")
    )
    register(
        ComponentSpec(
            "pddm", PDDMLoss, "PDDM similarity unit, hard quadruplets, double-header hinge (Huang, Loy, Tang 2016)"
        )
    )
    register(
        ComponentSpec(
            "softmax",
            SoftmaxLoss,
            "Softmax cross-entropy via a linear classifier; NormFace cosine form (Wang et al. 2017)",
        )
    )


@dmlkit.hookimpl
def register_evaluators(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "nway_kshot",
            NWayKShotEvaluator,
            "N-way K-shot episode accuracy with a 95% interval, plus retrieval metrics (Koch et al. 2015)",
        )
    )
