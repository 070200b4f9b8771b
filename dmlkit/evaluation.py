"""Embeddings -> retrieval and clustering metrics, in bounded memory.

Neighbours come from one of two exact k-NN backends, neither of which holds an N x N
matrix: ``faiss`` (flat index, CPU; faiss multiplies and selects in its own blocks) and
``torch`` (matrix products and a grouped top-k per tile of queries x gallery, on the GPU when
there is one). Only the k nearest needed by the metrics are kept. ``memory_mb`` bounds the
torch tile; see QUERY_ROWS_FLOOR for why neither backend searches in small slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmlkit.errors import DmlkitError

BACKENDS = ("auto", "faiss", "torch")


@dataclass
class Neighbours:
    """For each query, the indices into the gallery and squared distances of its k nearest."""

    indices: np.ndarray  # [n_query, k] int64
    distances: np.ndarray  # [n_query, k] float32


def _as_float32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


# faiss's IndexFlatL2 searches with BLAS (blocks of distance_compute_blas_query_bs x
# distance_compute_blas_database_bs, 4096 x 1024 by default) only when n_query * d reaches
# faiss.cvar.distance_compute_blas_threshold (128,000 in faiss 1.15); below that it takes a
# scalar path about 10x slower per query. Slicing the queries by a memory rule made 729-row
# calls at D = 128, N = 60,000: 130 s instead of 13 s. Faiss never holds a chunk x gallery
# matrix itself, so the dmlkit chunk only bounds the result arrays and can stay large.
QUERY_ROWS_FLOOR = 4096
# The torch backend computes distances tile by tile: a tile of 4096 query rows (faiss's own
# query block) by as many gallery columns as the memory budget allows, at least 1,024.
GALLERY_COLS_FLOOR = 1024
# Bytes per distance-tile entry: the float32 distance, its group minimum (1/16) and slack for
# the selection's temporaries.
TILE_BYTES_PER_ENTRY = 8
# The torch backend's selection reads each tile once to take the minimum of every group of
# GROUP columns, keeps the k groups with the smallest minima and picks the k nearest among
# their k * GROUP entries: the k smallest values of a row lie in at most k groups, and those
# groups have the k smallest minima, so the result is exact (ties may pick another index of
# the same distance). On a CPU this is twice as fast as torch.topk over the whole tile.
GROUP = 16


def _faiss_rows(n_query: int, d: int, k: int, memory_mb: float) -> int:
    """Query rows per faiss search call: what the budget allows for the call's results and query
    copy, but never fewer than faiss needs for its BLAS path (see QUERY_ROWS_FLOOR)."""
    import faiss

    blas_rows = -(-int(faiss.cvar.distance_compute_blas_threshold) // max(d, 1))
    by_memory = int(memory_mb * 2**20 // (12 * k + 4 * d))
    return max(1, min(n_query, max(QUERY_ROWS_FLOOR, blas_rows, by_memory)))


def _tile_shape(n_query: int, n_gallery: int, memory_mb: float) -> tuple[int, int]:
    """(query rows, gallery columns) of the torch backend's distance tile, about ``memory_mb``
    in all: the full gallery width when 4,096 rows of it fit the budget (then as many rows as
    fit), else 4,096 rows by the columns that fit; with a budget under 1,024 x 4,096 entries,
    1,024 columns by the rows that fit (at least one)."""
    entries = max(1, int(memory_mb * 2**20 // TILE_BYTES_PER_ENTRY))
    rows = min(n_query, QUERY_ROWS_FLOOR)
    cols = min(n_gallery, max(GALLERY_COLS_FLOOR, entries // rows))
    rows = min(n_query, max(1, entries // cols))
    return rows, cols


def _rows_per_chunk(n_gallery: int, memory_mb: float, bytes_per_entry: int = 12) -> int:
    """Query rows per chunk so that a chunk's distance block (plus top-k work) fits the budget."""
    return max(1, int(memory_mb * 2**20 // (max(n_gallery, 1) * bytes_per_entry)))


def knn(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor | None,
    k: int,
    *,
    backend: str = "auto",
    memory_mb: float = 512,
    device: str | torch.device | None = None,
) -> Neighbours:
    """The k nearest gallery items of each query by Euclidean distance.

    With ``gallery=None`` every query searches the other queries (leave-one-out): the item
    itself is never its own neighbour. ``backend="auto"`` takes torch on a GPU, else faiss.
    """
    if backend not in BACKENDS:
        raise DmlkitError(f"unknown k-NN backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    loo = gallery is None
    if backend == "auto":
        on_gpu = torch.cuda.is_available() and str(device or "cuda").startswith("cuda")
        backend = "torch" if on_gpu else "faiss"
    n_gallery = len(query) if loo else len(gallery)
    k_eff = min(k, n_gallery - 1 if loo else n_gallery)
    if k_eff < 1:
        raise DmlkitError("the gallery has no item to retrieve: it needs at least one (two without a gallery)")
    if backend == "faiss":
        return _knn_faiss(query, gallery, k_eff, memory_mb)
    return _knn_torch(query, gallery, k_eff, memory_mb, device)


def _drop_own(idx: np.ndarray, dist: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove from each row its own index ``own`` (-1: none), or else the last column."""
    is_own = idx == own[:, None]
    order = np.argsort(is_own, axis=1, kind="stable")[:, : idx.shape[1] - 1]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(dist, order, 1)


def _knn_faiss(query, gallery, k: int, memory_mb: float) -> Neighbours:
    import faiss

    q = _as_float32(query)
    g = q if gallery is None else _as_float32(gallery)
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(g)
    extra = 1 if gallery is None else 0
    rows = _faiss_rows(len(q), q.shape[1], k + extra, memory_mb)
    out_i = np.empty((len(q), k), dtype=np.int64)
    out_d = np.empty((len(q), k), dtype=np.float32)
    for start in range(0, len(q), rows):
        d, i = index.search(q[start : start + rows], k + extra)
        if extra:
            i, d = _drop_own(i, d, start + np.arange(len(i)))
        out_i[start : start + rows], out_d[start : start + rows] = i, d
    return Neighbours(out_i, out_d)


def _knn_torch(query, gallery, k: int, memory_mb: float, device) -> Neighbours:
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.as_tensor(_as_float32(query), device=dev)
    g = q if gallery is None else torch.as_tensor(_as_float32(gallery), device=dev)
    g_sq = (g * g).sum(1)
    rows, cols = _tile_shape(len(q), len(g), memory_mb)
    buf = torch.empty(rows * cols, dtype=torch.float32, device=dev)
    out_i = torch.empty((len(q), k), dtype=torch.int64, device=dev)
    out_d = torch.empty((len(q), k), dtype=torch.float32, device=dev)
    for start in range(0, len(q), rows):
        qc = q[start : start + rows]
        cand_d, cand_i = [], []
        for g0 in range(0, len(g), cols):
            w = min(cols, len(g) - g0)
            tile = buf[: len(qc) * w].view(len(qc), w)
            torch.addmm(g_sq[None, g0 : g0 + w], qc, g[g0 : g0 + w].T, alpha=-2.0, out=tile)  # |g|^2 - 2 q.g
            lo, hi = max(start, g0), min(start + len(qc), g0 + w)
            if gallery is None and lo < hi:  # leave-one-out: the queries' own columns in this tile
                r = torch.arange(lo, hi, device=dev)
                tile[r - start, r - g0] = math.inf
            d, i = _tile_nearest(tile, k)
            cand_d.append(d)
            cand_i.append(i + g0)
        d, j = torch.topk(torch.cat(cand_d, 1), k, dim=1, largest=False, sorted=True)
        out_i[start : start + rows] = torch.cat(cand_i, 1).gather(1, j)
        out_d[start : start + rows] = (d + (qc * qc).sum(1, keepdim=True)).clamp_min_(0)
    return Neighbours(out_i.cpu().numpy(), out_d.cpu().numpy())


def _tile_nearest(tile: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the k smallest of each row of ``tile``: values and column indices, at
    least the k smallest of every row among them (see GROUP)."""
    n_rows, w = tile.shape
    n_groups = w // GROUP
    if 4 * k > n_groups:  # few columns or a large k: a plain top-k is as cheap
        return torch.topk(tile, min(k, w), dim=1, largest=False, sorted=False)
    grouped = n_groups * GROUP
    # group j holds columns j, j + n_groups, j + 2 n_groups, ...: one contiguous min over GROUP slices
    mins = tile[:, :grouped].unflatten(1, (GROUP, n_groups)).amin(1)
    _, best = torch.topk(mins, k, dim=1, largest=False, sorted=False)
    offsets = n_groups * torch.arange(GROUP, device=tile.device)
    cols = (best[:, :, None] + offsets).reshape(n_rows, k * GROUP)
    d, j = torch.topk(tile.gather(1, cols), k, dim=1, largest=False, sorted=False)
    i = cols.gather(1, j)
    if grouped < w:  # the last w % GROUP columns are candidates as they are
        rest = torch.arange(grouped, w, device=tile.device).expand(n_rows, -1)
        d, i = torch.cat([d, tile[:, grouped:]], 1), torch.cat([i, rest], 1)
    return d, i


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_inputs(embeddings: np.ndarray, labels: np.ndarray) -> None:
    if embeddings.ndim != 2:
        raise DmlkitError(f"embeddings must be a 2-D array [N, D]; got shape {tuple(embeddings.shape)}")
    if labels.ndim != 1:
        raise DmlkitError(f"labels must be a 1-D array [N]; got shape {tuple(labels.shape)}")
    if len(embeddings) != len(labels):
        raise DmlkitError(f"{len(embeddings)} embeddings but {len(labels)} labels: they must have the same length")
    bad = ~np.isfinite(embeddings).all(1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DmlkitError(
            f"{int(bad.sum())} embeddings contain NaN or inf (first at row {first}); fix the model or data"
        )


def validated_inputs(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    query_mask: np.ndarray | None,
    gallery_mask: np.ndarray | None,
    normalise: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Refuse inputs that would crash the k-NN search or give metrics silently wrong.

    Complex, string or empty (N x 0) embeddings, non-finite values or values beyond float32,
    labels that are NaN or complex, and masks that are not boolean (or 0/1 integers) are errors.
    Before L2 normalisation each row is scaled by its largest magnitude, which leaves the
    normalised vector unchanged but keeps 1e30 (or 1e-30) from overflowing (underflowing) to a
    zero vector. Embeddings that are all the same direction (a collapsed model) are an error:
    their metrics would only reflect the order of ties.
    """
    if isinstance(embeddings, torch.Tensor):
        if embeddings.is_complex():
            embeddings = embeddings.detach().cpu().numpy()
        else:
            embeddings = embeddings.detach().float().cpu().numpy()
    emb = np.asarray(embeddings)
    if emb.dtype.kind == "c":
        raise DmlkitError(
            "embeddings are complex: distances need real vectors; pass x.real, or np.concatenate([x.real, x.imag], 1) "
            "to keep both parts"
        )
    if emb.dtype.kind not in "biuf":
        raise DmlkitError(f"embeddings must be numbers; got an array of dtype {emb.dtype}")
    if emb.ndim != 2:
        raise DmlkitError(f"embeddings must be a 2-D array [N, D]; got shape {tuple(emb.shape)}")
    n, d = emb.shape
    if d == 0 or n < 2:
        raise DmlkitError(f"embeddings of shape {n}x{d}: need at least 2 items of at least 1 dimension")
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.dtype.kind == "O":
        try:
            lab = np.asarray(lab.tolist())
        except Exception:
            pass
    if lab.dtype.kind not in "biufUS":
        raise DmlkitError(f"labels must be integers or strings (one class per item); got an array of dtype {lab.dtype}")
    if lab.dtype.kind == "f" and not np.isfinite(lab).all():
        first = int(np.flatnonzero(~np.isfinite(lab.reshape(-1)))[0])
        raise DmlkitError(f"labels contain NaN or inf (first at item {first}); every item needs a class")
    if emb.dtype.kind == "f":
        finite = np.isfinite(emb).all(1)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise DmlkitError(
                f"{int((~finite).sum())} embeddings contain NaN or inf (first at row {first}); fix the model or data"
            )
    big = float(np.abs(emb).max())
    if big > float(np.finfo(np.float32).max):
        raise DmlkitError(f"embeddings reach {big:.3g}, beyond the float32 range the search uses; rescale them")
    if normalise:
        if big > 1e15 or 0 < big < 1e-15:  # rows scaled by their largest entry: the same directions, no overflow
            scale = np.abs(emb).max(1, keepdims=True).astype(np.float64)
            emb = emb / np.where(scale > 0, scale, 1.0)
    elif big > math.sqrt(np.finfo(np.float32).max / (4 * d)):
        raise DmlkitError(
            f"embeddings reach {big:.3g}: their squared distances overflow float32; rescale them (or normalise)"
        )
    if _all_the_same(emb, normalise):
        raise DmlkitError(
            f"all {n} embeddings are the same{' direction' if normalise else ''} (a collapsed model?): every "
            "neighbour is a tie, so the metrics would be meaningless; check the learning rate and the loss"
        )
    masks = []
    for what, mask in (("query mask", query_mask), ("gallery mask", gallery_mask)):
        if mask is not None:
            m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            if m.dtype.kind in "iu" and np.isin(m, (0, 1)).all():
                m = m.astype(bool)
            if m.dtype.kind != "b":
                raise DmlkitError(
                    f"the {what} must be boolean (or 0/1 integers); got dtype {m.dtype}: it is not cast to bool, "
                    "since any non-zero value would count as True; save it with .astype(bool) if that is meant"
                )
            mask = m
        masks.append(mask)
    return emb, lab, masks[0], masks[1]


def _all_the_same(emb: np.ndarray, normalise: bool, rows: int = 65536) -> bool:
    """Whether every row equals the first (as a direction when ``normalise``), to float32 precision."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300) if normalise else x

    first = unit(emb[:1])
    tol = 1e-6 * max(1.0, float(np.abs(first).max()))
    for start in range(0, len(emb), rows):
        if np.abs(unit(emb[start : start + rows]) - first).max() > tol:
            return False
    return True


def query_gallery(
    n: int, query_mask: np.ndarray | None, gallery_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The query and gallery items' indices, and whether every item searches all the others
    (leave-one-out: no masks, or masks that select the same items)."""
    if query_mask is None and gallery_mask is None:
        return np.arange(n), np.arange(n), True
    qm = np.ones(n, bool) if query_mask is None else np.asarray(query_mask, bool).reshape(-1)
    gm = np.ones(n, bool) if gallery_mask is None else np.asarray(gallery_mask, bool).reshape(-1)
    if len(qm) != n or len(gm) != n:
        raise DmlkitError(f"query/gallery masks must have {n} entries, one per embedding")
    q_idx, g_idx = np.flatnonzero(qm), np.flatnonzero(gm)
    if len(q_idx) == 0:
        raise DmlkitError("the query set is empty: the query mask selects no item")
    if len(g_idx) == 0:
        raise DmlkitError("the gallery is empty: the gallery mask selects no item")
    return q_idx, g_idx, bool(np.array_equal(q_idx, g_idx))


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    query_mask: np.ndarray | None = None,
    gallery_mask: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    normalise: bool = True,
    backend: str = "auto",
    memory_mb: float = 512,
    device: str | torch.device | None = None,
    per_class: bool = False,
    per_query: bool = False,
) -> dict[str, float | int | dict]:
    """Recall@K, P@1, R-Precision and MAP@R of ``embeddings`` against ``labels``.

    Without masks every item queries all others (itself excluded). With ``query_mask`` and
    ``gallery_mask`` the queries search the gallery only; an item in both is still never
    its own neighbour. A query whose class has no other item in the gallery has no R: it is
    left out of every metric and counted in ``queries_without_match``. ``per_query=True`` adds
    each metric's values per query (``per_query``: name -> array, the queries with a match).
    """
    embeddings, labels, query_mask, gallery_mask = validated_inputs(
        embeddings, labels, query_mask, gallery_mask, normalise
    )
    emb = _as_float32(embeddings)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    _check_inputs(emb, lab)
    if normalise:
        emb = l2_normalise(emb)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DmlkitError(f"recall ks must be positive integers; got {list(ks)}")

    q_idx, g_idx, loo = query_gallery(len(lab), query_mask, gallery_mask)

    q_lab, g_lab = lab[q_idx], lab[g_idx]
    # R per query: same-class items in the gallery, itself excluded
    classes, g_counts = np.unique(g_lab, return_counts=True)
    pos = np.searchsorted(classes, q_lab)
    pos_c = np.clip(pos, 0, len(classes) - 1)
    r = np.where(classes[pos_c] == q_lab, g_counts[pos_c], 0)
    in_gallery = np.zeros(len(lab), bool)
    in_gallery[g_idx] = True
    r = r - in_gallery[q_idx].astype(np.int64)
    has_match = r > 0
    if not has_match.any():
        raise DmlkitError("no query has another item of its class in the gallery, so no metric is defined")

    k = max(int(r.max()), ks[-1])
    if loo:
        nn = knn(emb[q_idx], None, k, backend=backend, memory_mb=memory_mb, device=device)
        nn_gallery = nn.indices
    else:
        # search one extra neighbour so that a query that is also in the gallery can skip itself
        both = in_gallery[q_idx].any()
        nn = knn(emb[q_idx], emb[g_idx], k + int(both), backend=backend, memory_mb=memory_mb, device=device)
        nn_gallery = nn.indices
        if both:
            own = np.full(len(lab), -1)
            own[g_idx] = np.arange(len(g_idx))
            nn_gallery, _ = _drop_own(nn.indices, nn.distances, own[q_idx])
    rel = g_lab[nn_gallery] == q_lab[:, None]
    rel, r_m, q_lab_m = rel[has_match], r[has_match], q_lab[has_match]
    k_got = rel.shape[1]
    out: dict[str, float | int | dict] = {}
    per_query_values = per_query_metrics(rel, r_m, [kk for kk in ks if kk <= k_got])
    for name, values in per_query_values.items():
        out[name] = float(values.mean())
    out["queries"] = int(len(q_idx))
    out["queries_without_match"] = int((~has_match).sum())
    if per_class:  # class means by bincount: one pass per metric, not one per class
        classes, inverse = np.unique(q_lab_m, return_inverse=True)
        counts = np.bincount(inverse)
        means = {name: np.bincount(inverse, weights=values) / counts for name, values in per_query_values.items()}
        out["per_class"] = {str(c): {name: float(m[i]) for name, m in means.items()} for i, c in enumerate(classes)}
    if per_query:
        out["per_query"] = per_query_values
    return out


def per_query_metrics(rel: np.ndarray, r: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query P@1, R-Precision, MAP@R and Recall@K from the relevance of ranked neighbours."""
    k = rel.shape[1]
    within_r = np.arange(k)[None, :] < r[:, None]
    hits = rel & within_r
    out = {"precision_at_1": rel[:, 0].astype(np.float64)}
    out["r_precision"] = hits.sum(1) / r
    precision_at_i = np.cumsum(rel, axis=1) / np.arange(1, k + 1)[None, :]
    out["map_at_r"] = (precision_at_i * hits).sum(1) / r
    for kk in ks:
        out[f"recall_at_{kk}"] = rel[:, :kk].any(1).astype(np.float64)
    return out


#: faiss's (and so pytorch-metric-learning's) default k-means seed: with it, and faiss's other
#: defaults, dmlkit's clustering is PML AccuracyCalculator's, run for run.
KMEANS_SEED = 1234


def kmeans_labels(
    embeddings: np.ndarray,
    n_clusters: int,
    *,
    seed: int = KMEANS_SEED,
    niter: int = 20,
    restarts: int = 1,
    init: str = "random",
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Cluster assignments of k-means: faiss (CPU), or ``torch``, a chunked Lloyd loop on
    ``device`` (default: the GPU when there is one).

    By default the faiss backend runs what pytorch-metric-learning's ``AccuracyCalculator``
    runs (``faiss.Kmeans``: random start, 20 iterations, seed 1234, at most 256 points per
    centroid), so the two agree exactly on the same embeddings. One k-means run depends on its
    start: NMI moves by about 0.01 from seed to seed on the CUB subset's test set, and random
    starts find worse optima than k-means++ ones where clusters overlap. ``init="k-means++"``
    starts from greedy k-means++ picks (scikit-learn's start) and ``restarts`` runs that many
    starts and keeps the clustering with the lowest objective (scikit-learn's ``n_init``).
    """
    x = _as_float32(embeddings)
    if n_clusters < 1 or n_clusters > len(x):
        raise DmlkitError(f"k-means needs 1 <= k <= N; got k={n_clusters}, N={len(x)}")
    if restarts < 1:
        raise DmlkitError(f"k-means restarts must be >= 1; got {restarts}")
    if init not in KMEANS_INITS:
        raise DmlkitError(f"unknown k-means start '{init}'; choose {' or '.join(KMEANS_INITS)}")
    if backend == "auto":
        backend = "torch" if torch.cuda.is_available() else "faiss"
    if backend not in ("faiss", "torch"):
        raise DmlkitError(f"unknown k-means backend '{backend}'; choose auto, faiss or torch")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    best, best_obj = None, math.inf
    if backend == "faiss":
        import faiss

        if init == "random":  # faiss's own starts (nredo), as PML runs them
            km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, nredo=restarts, min_points_per_centroid=1)
            km.train(x)
            return km.index.search(x, 1)[1][:, 0]
        xt = torch.as_tensor(x)
        for s in _start_seeds(seed, restarts):
            start = _kmeanspp(xt, (xt * xt).sum(1), n_clusters, s).numpy()
            km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=s, min_points_per_centroid=1)
            km.train(x, init_centroids=start)
            dist, assign = km.index.search(x, 1)
            if float(dist.sum()) < best_obj:
                best, best_obj = assign[:, 0], float(dist.sum())
        return best
    for s in _start_seeds(seed, restarts):
        assign, obj = _kmeans_torch(x, n_clusters, seed=s, niter=niter, device=dev, init=init)
        if obj < best_obj:
            best, best_obj = assign, obj
    return best


def _start_seeds(seed: int, restarts: int) -> list[int]:
    """One seed per start: ``seed`` itself first, then seeds drawn from it (two seeds never share starts)."""
    return [seed] + [int(c.generate_state(1)[0] % 2**31) for c in np.random.SeedSequence(seed).spawn(restarts - 1)]


#: How k-means starts: random points (faiss's and PML's) or greedy k-means++ picks (scikit-learn's).
KMEANS_INITS = ("random", "k-means++")


def _kmeans_torch(
    x: np.ndarray, k: int, *, seed: int, niter: int, device: torch.device, init: str = "k-means++"
) -> tuple[np.ndarray, float]:
    """Lloyd's algorithm from a k-means++ start, chunked; an empty cluster keeps its centroid.
    Returns the assignments and the objective (sum of squared distances to the centroids)."""
    xt = torch.as_tensor(x, device=device)
    x_sq = (xt * xt).sum(1)
    if init == "random":
        gen = torch.Generator(device=device).manual_seed(seed)
        centroids = xt[torch.randperm(len(xt), generator=gen, device=device)[:k]].clone()
    else:
        centroids = _kmeanspp(xt, x_sq, k, seed)
    rows = _rows_per_chunk(k, 1024)
    assign = torch.empty(len(xt), dtype=torch.int64, device=device)
    for _ in range(niter + 1):
        c_sq = (centroids * centroids).sum(1)
        for s in range(0, len(xt), rows):
            assign[s : s + rows] = torch.addmm(c_sq[None, :], xt[s : s + rows], centroids.T, alpha=-2.0).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=k).float()
        centroids = torch.where((counts == 0)[:, None], centroids, sums / counts.clamp_min(1)[:, None])
    objective = float(((xt - centroids[assign]) ** 2).sum())
    return assign.cpu().numpy(), objective


def _kmeanspp(xt: torch.Tensor, x_sq: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn's): at each step 2 + log k candidates are drawn
    with probability proportional to D(x)^2 and the one that lowers the potential most is kept.
    Everything stays on the device: no host synchronisation inside the loop."""
    dev = xt.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    trials = 2 + int(math.log(k))
    chosen = torch.empty(k, dtype=torch.long, device=dev)
    chosen[0] = torch.randint(len(xt), (1,), generator=gen, device=dev)[0]
    d2 = (x_sq - 2 * xt @ xt[chosen[0]] + x_sq[chosen[0]]).clamp_min(0)
    for i in range(1, k):
        weights = torch.where(d2.sum() > 0, d2, torch.ones_like(d2))  # all points taken: uniform
        cands = torch.multinomial(weights, trials, replacement=True, generator=gen)
        dist = (x_sq[None, :] - 2 * xt[cands] @ xt.T + x_sq[cands][:, None]).clamp_min(0)  # [trials, N]
        new = torch.minimum(d2[None, :], dist)
        best = new.sum(1).argmin()
        chosen[i] = cands[best]
        d2 = new[best]
    return xt[chosen].clone()


def clustering_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    normalise: bool = True,
    seed: int = KMEANS_SEED,
    restarts: int = 1,
    init: str = "random",
    backend: str = "auto",
) -> dict[str, float]:
    """NMI and AMI of k-means (k = number of classes; :func:`kmeans_labels`) against ``labels``
    (scikit-learn's NMI; AMI as scikit-learn defines it, with the expected mutual information
    summed per pair of cluster sizes)."""
    from sklearn.metrics import normalized_mutual_info_score

    emb = _as_float32(embeddings)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    _check_inputs(emb, lab)
    if normalise:
        emb = l2_normalise(emb)
    pred = kmeans_labels(emb, len(np.unique(lab)), seed=seed, restarts=restarts, init=init, backend=backend)
    return {"nmi": float(normalized_mutual_info_score(lab, pred)), "ami": adjusted_mutual_info(lab, pred)}


def expected_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """E[MI] of two random labelings with cluster sizes ``a`` and ``b`` (Vinh et al. 2010).

    The formula scikit-learn evaluates for every pair of clusters (R x C pairs, 128 million at
    SOP size) depends on the pair only through its two sizes, so it is evaluated once per pair of
    distinct sizes and weighted by how many pairs share them.
    """
    from scipy.special import gammaln

    n = int(a.sum())
    if a.size <= 1 or b.size <= 1:
        return 0.0
    sa, ca = np.unique(a, return_counts=True)
    sb, cb = np.unique(b, return_counts=True)
    sb_f = sb.astype(np.float64)[:, None]
    emi = 0.0
    for size_a, count_a in zip(sa.tolist(), ca.tolist()):
        nij = np.arange(1, min(size_a, int(sb.max())) + 1, dtype=np.float64)[None, :]  # [1, m]
        valid = (nij <= np.minimum(size_a, sb_f)) & (nij >= size_a + sb_f - n)  # [V, m]
        term1 = nij / n
        term2 = math.log(n) + np.log(nij) - math.log(size_a) - np.log(sb_f)
        gln = (
            gammaln(size_a + 1)
            + gammaln(sb_f + 1)
            + gammaln(n - size_a + 1)
            + gammaln(n - sb_f + 1)
            - gammaln(nij + 1)
            - gammaln(n + 1)
            - gammaln(np.maximum(size_a - nij, 0) + 1)
            - gammaln(np.maximum(sb_f - nij, 0) + 1)
            - gammaln(np.maximum(n - size_a - sb_f + nij, 0) + 1)
        )
        terms = np.where(valid, term1 * term2 * np.exp(np.where(valid, gln, -np.inf)), 0.0)
        emi += count_a * float((cb[:, None] * terms).sum())
    return emi


def adjusted_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted mutual information, defined as scikit-learn's ``adjusted_mutual_info_score``
    (arithmetic mean of the entropies), with :func:`expected_mutual_information` for speed."""
    from sklearn.metrics import mutual_info_score

    _, t = np.unique(labels_true, return_inverse=True)
    _, p = np.unique(labels_pred, return_inverse=True)
    a, b = np.bincount(t.ravel()), np.bincount(p.ravel())
    if a.size == b.size and a.size <= 1:
        return 1.0
    if a.size == 1 or b.size == 1:
        return 0.0
    mi = mutual_info_score(t.ravel(), p.ravel())
    emi = expected_mutual_information(a, b)

    def entropy(counts: np.ndarray) -> float:
        total = counts.sum()
        return float(-np.sum((counts / total) * (np.log(counts) - math.log(total))))

    eps = np.finfo(np.float64).eps
    denominator = (entropy(a) + entropy(b)) / 2 - emi
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    numerator = mi - emi
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    return float(numerator / denominator)
