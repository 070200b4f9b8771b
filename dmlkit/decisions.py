"""Embeddings -> decisions: verification (same class or not?), classification (which class?)
and ranking metrics, and the calibrated distance threshold that a deployed index decides by.

Everything is computed over blocks of query rows against the gallery, in float64, so memory
stays bounded by ``memory_mb`` (no N x N matrix; SOP's 60k x 60k would be 29 GB). Pairs and
queries follow :func:`dmlkit.evaluation.retrieval_metrics`: without masks every item is a
query and searches all the others (each unordered pair counted once); with a query and a
gallery mask, the pairs are (query, gallery item), an item never paired with itself.

Verification scores a pair by its Euclidean distance (of L2-normalised embeddings unless
``normalise=False``); a pair is accepted ("match") when its distance is at most a threshold.
FMR (false match rate) is the share of impostor pairs (different classes) accepted, FNMR
(false non-match rate) the share of genuine pairs (same class) rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmlkit.errors import DmlkitError
from dmlkit.evaluation import l2_normalise, query_gallery, validated_inputs

#: The false match rates whose FNMR is reported (keys ``fnmr_at_fmr_1e-2`` ...).
FMRS = (1e-2, 1e-3, 1e-4)
#: Above this many pairs (genuine or impostor, each), verification uses a seeded sample of them.
MAX_PAIRS = 10_000_000
#: The FMRs whose thresholds a calibrated operating point lists (``--fmr`` picks one of them).
CALIBRATED_FMRS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5)
#: Bytes per entry of a query block's distance rows (the distances and the masks and temporaries around them).
BLOCK_BYTES_PER_ENTRY = 40


def fmr_key(fmr: float) -> str:
    """The JSON key of the FNMR at ``fmr``: ``fnmr_at_fmr_1e-3``."""
    return f"fnmr_at_fmr_{fmr:.0e}".replace("e-0", "e-").replace("e+0", "e")


# ---------------------------------------------------------------------------------- the scan
@dataclass
class _Problem:
    """Embeddings (float64), integer class codes, and who queries whom."""

    emb: np.ndarray
    codes: np.ndarray  # [N] class index in 0..C-1
    q_idx: np.ndarray
    g_idx: np.ndarray
    loo: bool  # every item queries every other: unordered pairs
    own: np.ndarray  # [n_query] the query's position in the gallery, -1 when it is not there
    has_match: np.ndarray = field(init=False)  # [n_query] another gallery item has the query's class

    def __post_init__(self) -> None:
        n_classes = int(self.codes.max()) + 1
        g_counts = np.bincount(self.codes[self.g_idx], minlength=n_classes)
        self.has_match = g_counts[self.codes[self.q_idx]] - (self.own >= 0) > 0


def _problem(embeddings: Any, labels: Any, query_mask: Any, gallery_mask: Any, normalise: bool) -> _Problem:
    emb, lab, qm, gm = validated_inputs(embeddings, labels, query_mask, gallery_mask, normalise)
    emb = np.asarray(emb, dtype=np.float64)
    lab = np.asarray(lab).reshape(-1)
    if len(lab) != len(emb):
        raise DmlkitError(f"{len(emb)} embeddings but {len(lab)} labels: they must have the same length")
    if normalise:
        emb = l2_normalise(emb)
    _, codes = np.unique(lab, return_inverse=True)
    q_idx, g_idx, loo = query_gallery(len(lab), qm, gm)
    where = np.full(len(lab), -1)
    where[g_idx] = np.arange(len(g_idx))
    return _Problem(emb, codes.reshape(-1), q_idx, g_idx, loo, where[q_idx])


def _block_rows(n_gallery: int, memory_mb: float) -> int:
    return max(1, int(memory_mb * 2**20 // (BLOCK_BYTES_PER_ENTRY * max(n_gallery, 1))))


def _scan(p: _Problem, consumers: list[Any], memory_mb: float) -> None:
    """Squared distances of each block of queries to the whole gallery, handed to every consumer
    as ``(rows, dist, same)``: ``rows`` the queries' positions, ``dist`` [b, n_gallery] with a
    query's own column at +inf, ``same`` whether the gallery item has the query's class."""
    q, g = p.emb[p.q_idx], p.emb[p.g_idx]
    g_sq = (g * g).sum(1)
    g_codes = p.codes[p.g_idx]
    rows_per_block = _block_rows(len(g), memory_mb)
    for start in range(0, len(q), rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, len(q)))
        qb = q[rows]
        dist = (qb * qb).sum(1)[:, None] + g_sq[None, :] - 2.0 * (qb @ g.T)
        np.maximum(dist, 0.0, out=dist)
        own = p.own[rows]
        inside = own >= 0
        dist[np.flatnonzero(inside), own[inside]] = np.inf
        same = g_codes[None, :] == p.codes[p.q_idx[rows]][:, None]
        for c in consumers:
            c.update(rows, dist, same)


# ------------------------------------------------------------------------------ verification
class _PairCollector:
    """Genuine and impostor distances of a scan: all of them where they number at most
    ``max_pairs``, else a seeded sample (genuine: each kept with probability max_pairs / count;
    impostor: max_pairs (query, gallery) positions drawn uniformly with replacement, those that
    fall on a genuine pair or the query itself dropped)."""

    def __init__(self, p: _Problem, max_pairs: int, seed: int):
        self.p = p
        n_classes = int(p.codes.max()) + 1
        nq = np.bincount(p.codes[p.q_idx], minlength=n_classes).astype(np.int64)
        ng = np.bincount(p.codes[p.g_idx], minlength=n_classes).astype(np.int64)
        both = int((p.own >= 0).sum())
        if p.loo:
            total = len(p.q_idx) * (len(p.q_idx) - 1) // 2
            self.genuine = int((nq * (nq - 1) // 2).sum())
        else:
            total = len(p.q_idx) * len(p.g_idx) - both
            self.genuine = int((nq * ng).sum()) - both
        self.impostor = total - self.genuine
        if self.genuine == 0:
            raise DmlkitError(
                "no genuine pair (two items of one class) among the queries and gallery: verification needs one"
            )
        if self.impostor == 0:
            raise DmlkitError("no impostor pair (two items of different classes): verification needs one")
        self.rng = np.random.default_rng(seed)
        self.genuine_rate = min(1.0, max_pairs / self.genuine)
        self.sampled_impostors = self.impostor > max_pairs
        if self.sampled_impostors:
            draw_q = self.rng.integers(0, len(p.q_idx), max_pairs)
            draw_g = self.rng.integers(0, len(p.g_idx), max_pairs)
            order = np.argsort(draw_q, kind="stable")
            self.draw_q, self.draw_g = draw_q[order], draw_g[order]
        self.gen: list[np.ndarray] = []
        self.imp: list[np.ndarray] = []

    def update(self, rows: np.ndarray, dist: np.ndarray, same: np.ndarray) -> None:
        valid = np.isfinite(dist)  # a query's own column is +inf
        if self.p.loo:  # each unordered pair once: gallery position > query position
            valid &= np.arange(dist.shape[1])[None, :] > rows[:, None]
        gen = dist[same & valid]
        if self.genuine_rate < 1.0:
            gen = gen[self.rng.random(len(gen)) < self.genuine_rate]
        self.gen.append(gen)
        if not self.sampled_impostors:
            self.imp.append(dist[~same & valid])
            return
        lo, hi = np.searchsorted(self.draw_q, [rows[0], rows[-1] + 1])
        r, c = self.draw_q[lo:hi] - rows[0], self.draw_g[lo:hi]
        keep = ~same[r, c] & np.isfinite(dist[r, c])
        self.imp.append(dist[r[keep], c[keep]])

    def pairs(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Sorted genuine and impostor squared distances, and how they were taken."""
        gen, imp = np.sort(np.concatenate(self.gen)), np.sort(np.concatenate(self.imp))
        sampled = self.genuine_rate < 1.0 or self.sampled_impostors
        info = {
            "verification_pairs": "sampled" if sampled else "exact",
            "genuine_pairs": self.genuine,
            "impostor_pairs": self.impostor,
        }
        if sampled:
            info["genuine_pairs_used"], info["impostor_pairs_used"] = len(gen), len(imp)
        return gen, imp, info


def _max_accepted(n: int, fmr: float) -> int:
    """The most impostor pairs of ``n`` that may be accepted at FMR ``fmr``: the largest k with k / n <= fmr."""
    k = min(n, math.floor(fmr * n))
    while k < n and (k + 1) / n <= fmr:
        k += 1
    while k > 0 and k / n > fmr:
        k -= 1
    return k


def roc_from_distances(genuine: np.ndarray, impostor: np.ndarray, fmrs: Sequence[float] = FMRS) -> dict[str, float]:
    """ROC AUC, EER and FNMR at each FMR from sorted genuine and impostor distances (or any
    monotone function of them: squared distances give the same values).

    ROC AUC is the probability that a genuine pair is closer than an impostor pair (a tie
    counts one half), scikit-learn's ``roc_auc_score`` of the negated distance. The ROC's points
    are the thresholds at every distinct distance, starting from (FMR 0, FNMR 1); EER is where
    the straight line between the two points around FMR = FNMR crosses it. FNMR at FMR t is the
    lowest FNMR of a threshold whose FMR is at most t.
    """
    gen, imp = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    n_gen, n_imp = len(gen), len(imp)
    left = np.searchsorted(imp, gen, "left")
    right = np.searchsorted(imp, gen, "right")
    wins = float((n_imp - right).sum()) + 0.5 * float((right - left).sum())
    out = {"roc_auc": wins / (n_gen * n_imp)}
    eer, _ = _eer(gen, imp)
    out["eer"] = eer
    for fmr in fmrs:
        out[fmr_key(fmr)] = _fnmr_at(gen, imp, fmr)[0]
    return out


def _eer(gen: np.ndarray, imp: np.ndarray) -> tuple[float, float]:
    """EER, and a threshold there: halfway between the two ROC points around the crossing."""
    values = np.unique(np.concatenate([gen, imp]))
    fmr = np.concatenate([[0.0], np.searchsorted(imp, values, "right") / len(imp)])
    fnmr = np.concatenate([[1.0], 1.0 - np.searchsorted(gen, values, "right") / len(gen)])
    i = int(np.argmax(fnmr <= fmr))  # exists: the last point has FMR 1, FNMR 0
    d0, d1 = fnmr[i - 1] - fmr[i - 1], fnmr[i] - fmr[i]
    t = d0 / (d0 - d1)
    before = values[i - 2] if i >= 2 else 0.0  # point i accepts up to values[i - 1]
    return float(fmr[i - 1] + t * (fmr[i] - fmr[i - 1])), float((before + values[i - 1]) / 2)


def _fnmr_at(gen: np.ndarray, imp: np.ndarray, fmr: float) -> tuple[float, float, float]:
    """(FNMR, FMR, threshold) of the most accepting threshold whose FMR is at most ``fmr``; the
    threshold lies halfway between the last accepted value and the first rejected impostor."""
    k = _max_accepted(len(imp), fmr)
    if k == len(imp):
        return 0.0, 1.0, float(max(gen[-1], imp[-1]))
    first_rejected = imp[k]
    j, i = np.searchsorted(imp, first_rejected, "left"), np.searchsorted(gen, first_rejected, "left")
    below = max(imp[j - 1] if j else -np.inf, gen[i - 1] if i else -np.inf)  # the largest value accepted
    threshold = (below + first_rejected) / 2 if np.isfinite(below) else first_rejected / 2
    return float(1.0 - i / len(gen)), float(j / len(imp)), float(threshold)


def verification_metrics(
    embeddings: Any,
    labels: Any,
    query_mask: Any = None,
    gallery_mask: Any = None,
    *,
    fmrs: Sequence[float] = FMRS,
    normalise: bool = True,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    memory_mb: float = 256,
) -> dict[str, Any]:
    """ROC AUC, EER and FNMR at FMR 1e-2, 1e-3, 1e-4 of the pairs of ``embeddings``.

    Exact when the genuine and the impostor pairs each number at most ``max_pairs``; beyond,
    from a seeded sample of at most ``max_pairs`` of each (``verification_pairs`` says which,
    with the population counts and, when sampled, the counts used). An FNMR at an FMR below
    1 / (impostor pairs used) is that of the strictest threshold (FMR 0).
    """
    p = _problem(embeddings, labels, query_mask, gallery_mask, normalise)
    return _verification(p, fmrs, max_pairs, seed, memory_mb)


def _verification(p: _Problem, fmrs: Sequence[float], max_pairs: int, seed: int, memory_mb: float) -> dict[str, Any]:
    _check_max_pairs(max_pairs)
    pairs = _PairCollector(p, max_pairs, seed)
    _scan(p, [pairs], memory_mb)
    gen, imp, info = pairs.pairs()
    return {**roc_from_distances(gen, imp, fmrs), **info}


def _check_max_pairs(max_pairs: int) -> None:
    if not isinstance(max_pairs, int) or max_pairs < 1:
        raise DmlkitError(f"max_pairs must be a positive integer; got {max_pairs!r}")


# -------------------------------------------------------------------- classification, ranking
class _Ranker:
    """Per-query k-NN votes, MRR, MAP@k and Precision@k over a scan."""

    def __init__(self, p: _Problem, knn: Sequence[int], ks: Sequence[int]):
        self.p, self.knn, self.ks = p, list(knn), list(ks)
        self.depth = max([*self.knn, *self.ks, 1])
        self.values: dict[str, list[np.ndarray]] = {}

    def _add(self, name: str, values: np.ndarray) -> None:
        self.values.setdefault(name, []).append(values)

    def update(self, rows: np.ndarray, dist: np.ndarray, same: np.ndarray) -> None:
        keep = self.p.has_match[rows]
        dist, same = dist[keep], same[keep]
        if not len(dist):
            return
        valid = np.isfinite(dist)
        # rank of the first same-class item: 1 + the other-class items strictly closer than it
        nearest_same = np.where(same & valid, dist, np.inf).min(1)
        self._add("mrr", 1.0 / (1 + ((dist < nearest_same[:, None]) & ~same).sum(1)))
        depth = self.depth
        top = np.argpartition(dist, depth - 1, axis=1)[:, :depth] if depth < dist.shape[1] else np.argsort(dist, 1)
        order = np.argsort(np.take_along_axis(dist, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)[:, :depth]
        rel = np.take_along_axis(same, top, 1)
        g_codes = self.p.codes[self.p.g_idx]
        for k in self.knn:
            self._add(f"knn_accuracy_at_{k}", vote(g_codes[top[:, :k]]) == self.p.codes[self.p.q_idx[rows[keep]]])
        r = (same & valid).sum(1)
        hits = np.cumsum(rel, 1)
        for k in self.ks:
            self._add(f"precision_at_{k}", hits[:, k - 1] / k)
            precision_at_i = hits[:, :k] / np.arange(1, k + 1)
            self._add(f"map_at_{k}", (precision_at_i * rel[:, :k]).sum(1) / np.minimum(r, k))

    def result(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(v).astype(np.float64) for name, v in self.values.items()}


def vote(neighbour_codes: np.ndarray) -> np.ndarray:
    """The class most of each row's neighbours (nearest first) have; a tie goes to the tied class
    whose nearest neighbour comes first (k-NN classification; ``dmlkit classify`` decides by it too)."""
    votes = (neighbour_codes[:, :, None] == neighbour_codes[:, None, :]).sum(2)  # votes of each position's class
    first_best = np.argmax(votes == votes.max(1, keepdims=True), axis=1)
    return neighbour_codes[np.arange(len(neighbour_codes)), first_best]


def _centroid_hits(p: _Problem, memory_mb: float) -> np.ndarray:
    """Per query (with a match): whether the nearest gallery class centroid is its own class's.
    The query's own class centroid leaves the query out when it is in the gallery."""
    n_classes = int(p.codes.max()) + 1
    g_codes = p.codes[p.g_idx]
    counts = np.bincount(g_codes, minlength=n_classes).astype(np.float64)
    sums = np.zeros((n_classes, p.emb.shape[1]))
    np.add.at(sums, g_codes, p.emb[p.g_idx])
    present = counts > 0
    centroids = sums[present] / counts[present, None]
    column = np.cumsum(present) - 1  # class code -> centroid column
    c_sq = (centroids * centroids).sum(1)
    queries = p.q_idx[p.has_match]
    in_gallery = p.own[p.has_match] >= 0
    out = []
    step = _block_rows(len(centroids), memory_mb)
    for s in range(0, len(queries), step):
        x, codes, inside = p.emb[queries[s : s + step]], p.codes[queries[s : s + step]], in_gallery[s : s + step]
        dist = (x * x).sum(1)[:, None] + c_sq[None, :] - 2.0 * (x @ centroids.T)
        own_col = column[codes]
        n = counts[codes]
        own_centroid = np.where(
            inside[:, None], (sums[codes] - x) / np.maximum(n - inside, 1)[:, None], centroids[own_col]
        )
        dist[np.arange(len(x)), own_col] = ((x - own_centroid) ** 2).sum(1)
        out.append(dist.argmin(1) == own_col)
    return np.concatenate(out).astype(np.float64)


def ranking_metrics(
    embeddings: Any,
    labels: Any,
    query_mask: Any = None,
    gallery_mask: Any = None,
    *,
    knn: Sequence[int] = (1, 5),
    ks: Sequence[int] = (1, 5, 10),
    centroid: bool = True,
    normalise: bool = True,
    memory_mb: float = 256,
    per_query: bool = False,
) -> dict[str, Any]:
    """k-NN accuracy (``knn_accuracy_at_K``: the majority class of the K nearest gallery items,
    a tie going to the tied class seen first), nearest-centroid accuracy (the nearest gallery
    class mean), MRR (mean of 1 / rank of the first same-class item), MAP@k (``map_at_k``:
    the mean over the first k ranks holding a same-class item of the precision there, divided
    by min(k, R), R the same-class items in the gallery) and Precision@k (``precision_at_k``).

    Queries whose class has no other item in the gallery are left out (``queries_without_match``),
    as in :func:`dmlkit.evaluation.retrieval_metrics`. Ties in distance are ordered arbitrarily.
    ``per_query=True`` adds each metric's per-query values (``per_query``: name -> array, for
    :func:`bootstrap_ci`) and the queries' positions among all items (``query_items``).

    Differs from pytorch-metric-learning: its ``mean_average_precision`` divides by the
    same-class items retrieved within k, not by min(k, R); PML has no MRR, k-NN or centroid accuracy.
    """
    p = _problem(embeddings, labels, query_mask, gallery_mask, normalise)
    return _ranking(p, knn, ks, centroid, memory_mb, per_query)


def _check_depths(p: _Problem, knn: Sequence[int], ks: Sequence[int]) -> tuple[list[int], list[int]]:
    knn, ks = sorted({int(k) for k in knn}), sorted({int(k) for k in ks})
    if any(k < 1 for k in [*knn, *ks]):
        raise DmlkitError(f"k-NN K and MAP/precision k must be positive integers; got knn={knn}, ks={ks}")
    reachable = len(p.g_idx) - int((p.own >= 0).any())
    if max([*knn, *ks, 0]) > reachable:
        raise DmlkitError(
            f"k = {max([*knn, *ks])} is more than the {reachable} gallery items a query can reach; use a smaller K"
        )
    return knn, ks


def _ranking(
    p: _Problem, knn: Sequence[int], ks: Sequence[int], centroid: bool, memory_mb: float, per_query: bool
) -> dict[str, Any]:
    knn, ks = _check_depths(p, knn, ks)
    if not p.has_match.any():
        raise DmlkitError("no query has another item of its class in the gallery, so no metric is defined")
    ranker = _Ranker(p, knn, ks)
    _scan(p, [ranker], memory_mb)
    values = ranker.result()
    if centroid:
        values["nearest_centroid_accuracy"] = _centroid_hits(p, memory_mb)
    return _summary(p, values, per_query)


#: Classification accuracies also reported as a macro average over classes (``<name>_macro``).
MACRO = ("knn_accuracy_at_", "nearest_centroid_accuracy")


def _summary(p: _Problem, values: dict[str, np.ndarray], per_query: bool) -> dict[str, Any]:
    out: dict[str, Any] = {name: float(v.mean()) for name, v in values.items()}
    codes = p.codes[p.q_idx[p.has_match]]  # the class of each query the values are of, in order
    for name, v in values.items():
        if name.startswith(MACRO):  # each class's accuracy, then their mean: small classes count as much
            counts = np.bincount(codes, minlength=1)
            hits = np.bincount(codes, weights=v, minlength=1)
            out[f"{name}_macro"] = float((hits[counts > 0] / counts[counts > 0]).mean())
    out["queries"] = len(p.q_idx)
    out["queries_without_match"] = int((~p.has_match).sum())
    if per_query:
        out["per_query"] = values
        out["query_items"] = p.q_idx[p.has_match]
    return out


def decision_metrics(
    embeddings: Any,
    labels: Any,
    query_mask: Any = None,
    gallery_mask: Any = None,
    *,
    verification: bool = True,
    knn: Sequence[int] = (),
    ks: Sequence[int] = (),
    centroid: bool = False,
    fmrs: Sequence[float] = FMRS,
    normalise: bool = True,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    memory_mb: float = 256,
    per_query: bool = False,
) -> dict[str, Any]:
    """:func:`verification_metrics` and :func:`ranking_metrics` in one scan of the distances."""
    p = _problem(embeddings, labels, query_mask, gallery_mask, normalise)
    ranked = bool(knn or ks or centroid)
    if not verification:
        return _ranking(p, knn, ks, centroid, memory_mb, per_query) if ranked else {}
    if not ranked:
        return _verification(p, fmrs, max_pairs, seed, memory_mb)
    knn, ks = _check_depths(p, knn, ks)
    _check_max_pairs(max_pairs)
    pairs, ranker = _PairCollector(p, max_pairs, seed), _Ranker(p, knn, ks)
    _scan(p, [pairs, ranker] if p.has_match.any() else [pairs], memory_mb)
    gen, imp, info = pairs.pairs()
    values = ranker.result()
    if centroid and p.has_match.any():
        values["nearest_centroid_accuracy"] = _centroid_hits(p, memory_mb)
    return {**roc_from_distances(gen, imp, fmrs), **info, **_summary(p, values, per_query)}


# ------------------------------------------------------------------------ confidence intervals
def bootstrap_ci(
    per_query: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of each metric's mean over queries: ``resamples`` draws of
    the queries with replacement (the same draws for every metric), seeded."""
    if resamples < 10:
        raise DmlkitError(f"bootstrap needs at least 10 resamples; got {resamples}")
    if not 0 < level < 1:
        raise DmlkitError(f"the confidence level must lie between 0 and 1; got {level}")
    names = list(per_query)
    n = len(per_query[names[0]]) if names else 0
    if n == 0 or any(len(v) != n for v in per_query.values()):
        raise DmlkitError("bootstrap needs per-query values of the same, non-zero length for every metric")
    stacked = np.stack([np.asarray(per_query[k], np.float64) for k in names])  # [metrics, n]
    rng = np.random.default_rng(seed)
    means = np.empty((len(names), resamples))
    step = max(1, 2**24 // n)
    for s in range(0, resamples, step):
        draws = rng.integers(0, n, (min(step, resamples - s), n))
        means[:, s : s + len(draws)] = stacked[:, draws].mean(2)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return {name: [float(a), float(b)] for name, a, b in zip(names, lo, hi)}


# ------------------------------------------------------------------------- operating point
def operating_point_from_distances(
    genuine: np.ndarray, impostor: np.ndarray, fmr: float = 1e-3, fmrs: Sequence[float] = CALIBRATED_FMRS
) -> dict[str, Any]:
    """The distance threshold for a target FMR (and the EER point) from genuine and impostor
    Euclidean distances: the most accepting threshold whose FMR on these pairs is at most ``fmr``,
    halfway between the largest distance it accepts and the smallest impostor distance it rejects.
    ``thresholds`` lists the same for each of ``fmrs`` that the impostor pairs can resolve (at
    least one accepted impostor pair: fmr >= 1 / impostor pairs).

    A pair is a match when its distance is at most ``threshold``. On new pairs of the same
    population the FMR is ``fmr`` up to binomial noise (tests/test_decisions.py checks it).
    """
    gen = np.sort(np.asarray(genuine, np.float64) ** 2)
    imp = np.sort(np.asarray(impostor, np.float64) ** 2)
    if not len(gen) or not len(imp):
        raise DmlkitError("an operating point needs genuine and impostor pairs (two classes, one with two items)")
    if not 0 < fmr < 1:
        raise DmlkitError(f"the target FMR must lie between 0 and 1; got {fmr}")
    if fmr * len(imp) < 1:
        raise DmlkitError(
            f"FMR {fmr:g} cannot be calibrated on {len(imp):,} impostor pairs (it needs at least {math.ceil(1 / fmr):,}); "
            f"choose an FMR of at least {1 / len(imp):.1g}, or calibrate on more images"
        )
    fnmr, achieved, threshold = _fnmr_at(gen, imp, fmr)
    eer, eer_threshold = _eer(gen, imp)
    rows = []
    for t in sorted({*fmrs, fmr}, reverse=True):
        if t * len(imp) >= 1:
            f, a, th = _fnmr_at(gen, imp, t)
            rows.append({"fmr_target": t, "threshold": math.sqrt(th), "fmr": a, "fnmr": f})
    return {
        "distance": "euclidean",
        "fmr_target": fmr,
        "threshold": math.sqrt(threshold),
        "fmr": achieved,
        "fnmr": fnmr,
        "eer": eer,
        "eer_threshold": math.sqrt(eer_threshold),
        "genuine_pairs": len(gen),
        "impostor_pairs": len(imp),
        "thresholds": rows,
    }


def _distances(p: _Problem, max_pairs: int, seed: int, memory_mb: float) -> tuple[np.ndarray, np.ndarray, dict]:
    _check_max_pairs(max_pairs)
    pairs = _PairCollector(p, max_pairs, seed)
    _scan(p, [pairs], memory_mb)
    gen, imp, info = pairs.pairs()
    return np.sqrt(gen), np.sqrt(imp), info


def operating_point(
    embeddings: Any,
    labels: Any,
    query_mask: Any = None,
    gallery_mask: Any = None,
    *,
    fmr: float = 1e-3,
    normalise: bool = False,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    memory_mb: float = 256,
) -> dict[str, Any]:
    """:func:`operating_point_from_distances` of the pairs of ``embeddings`` (validation
    embeddings of held-out classes, as a deployed model meets new ones). ``normalise`` is off by
    default: the threshold must be in the space the index searches, the model's own outputs."""
    p = _problem(embeddings, labels, query_mask, gallery_mask, normalise)
    gen, imp, info = _distances(p, max_pairs, seed, memory_mb)
    return {**operating_point_from_distances(gen, imp, fmr), "normalized": normalise, **info}


def rates_at(
    embeddings: Any,
    labels: Any,
    threshold: float,
    query_mask: Any = None,
    gallery_mask: Any = None,
    *,
    normalise: bool = False,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    memory_mb: float = 256,
) -> dict[str, Any]:
    """FMR and FNMR of the pairs of ``embeddings`` when a distance of at most ``threshold`` is a match."""
    p = _problem(embeddings, labels, query_mask, gallery_mask, normalise)
    gen, imp, info = _distances(p, max_pairs, seed, memory_mb)
    fmr = float(np.searchsorted(imp, threshold, "right") / len(imp))
    fnmr = float(1.0 - np.searchsorted(gen, threshold, "right") / len(gen))
    return {"threshold": float(threshold), "fmr": fmr, "fnmr": fnmr, **info}
