import json

import numpy as np
import pytest
import torch

from dmlkit.errors import DmlkitError
from dmlkit.evaluation import clustering_metrics, knn, retrieval_metrics


def brute_force(emb, labels, query_mask=None, gallery_mask=None, ks=(1, 2, 4, 8)):
    """Reference metrics from the full distance matrix, one query at a time."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(labels)
    q_idx = np.arange(n) if query_mask is None else np.flatnonzero(query_mask)
    g_idx = np.arange(n) if gallery_mask is None else np.flatnonzero(gallery_mask)
    per = {"precision_at_1": [], "r_precision": [], "map_at_r": [], **{f"recall_at_{k}": [] for k in ks}}
    for q in q_idx:
        gal = np.array([g for g in g_idx if g != q])
        d = ((emb[gal] - emb[q]) ** 2).sum(1)
        ranked = labels[gal[np.argsort(d, kind="stable")]] == labels[q]
        r = int(ranked.sum())
        if r == 0:
            continue
        per["precision_at_1"].append(float(ranked[0]))
        per["r_precision"].append(ranked[:r].sum() / r)
        ap = sum(ranked[: i + 1].sum() / (i + 1) for i in range(r) if ranked[i]) / r
        per["map_at_r"].append(ap)
        for k in ks:
            per[f"recall_at_{k}"].append(float(ranked[:k].any()))
    return {k: float(np.mean(v)) for k, v in per.items()}


def data(n=150, d=16, classes=12, seed=0, tie_free=True):
    """Clustered random embeddings without near-ties (float32 rounding could reorder those)."""
    for attempt in range(200):
        rng = np.random.default_rng([seed, attempt])
        labels = rng.integers(0, classes, n)
        centers = rng.normal(size=(classes, d))
        emb = (centers[labels] + 1.2 * rng.normal(size=(n, d))).astype(np.float32)
        if not tie_free:
            return emb, labels
        e = emb / np.linalg.norm(emb, axis=1, keepdims=True).astype(np.float64)
        dist = np.sort(((e[:, None] - e[None]) ** 2).sum(-1), axis=1)
        if np.diff(dist[:, 1:], axis=1).min() > 2e-6:
            return emb, labels
    raise RuntimeError("no tie-free sample found")


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_matches_brute_force(backend, seed):
    emb, labels = data(seed=seed)
    ref = brute_force(emb, labels)
    got = retrieval_metrics(emb, labels, backend=backend, memory_mb=0.01)  # tiny budget: many chunks
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    assert got["queries"] == len(labels) and got["queries_without_match"] == 0


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_query_gallery_matches_brute_force(backend):
    emb, labels = data(seed=3)
    rng = np.random.default_rng(3)
    qm = rng.random(len(labels)) < 0.4
    gm = ~qm
    gm[:20] = True  # some items are both query and gallery: never their own neighbour
    ref = brute_force(emb, labels, qm, gm)
    got = retrieval_metrics(emb, labels, query_mask=qm, gallery_mask=gm, backend=backend)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_backends_give_the_same_neighbours():
    emb, _ = data(n=500, d=32, seed=4, tie_free=False)
    a = knn(emb, None, 10, backend="faiss")
    b = knn(emb, None, 10, backend="torch", memory_mb=0.05)
    assert (a.indices == b.indices).mean() > 0.999
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-4, atol=1e-4)
    assert not (a.indices == np.arange(500)[:, None]).any()  # never itself


def _well_separated_rows(emb, gallery, k, gap=1e-5):
    """Rows whose k + 1 nearest (float64) have no two distances within ``gap``: their order is
    the same whatever the float32 blocking."""
    g = emb if gallery is None else gallery
    d = ((emb[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)
    if gallery is None:
        np.fill_diagonal(d, np.inf)
    first = np.sort(d, axis=1)[:, : k + 1]
    return np.diff(first, axis=1).min(1) > gap, np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("with_gallery", [False, True])
def test_chunked_equals_unchunked(backend, with_gallery, monkeypatch):
    """Every chunk shape gives the neighbours of one unchunked search: query chunks that cut
    the leave-one-out diagonal anywhere, gallery tiles with a remainder of columns, the grouped
    selection (small k) and the plain top-k (large k)."""
    import dmlkit.evaluation as ev

    rng = np.random.default_rng(11)
    emb = rng.normal(size=(1203, 6)).astype(np.float32)
    gallery = rng.normal(size=(1011, 6)).astype(np.float32) if with_gallery else None
    for k in (1, 7, 60):
        whole = knn(emb, gallery, k, backend=backend, memory_mb=1e4)
        ok, ref = _well_separated_rows(emb, gallery, k)
        assert ok.mean() > 0.5
        np.testing.assert_array_equal(whole.indices[ok], ref[ok])
        if backend == "faiss":
            shapes = [(1,), (37,), (500,), (1203,)]
            target = "_faiss_rows"
        else:
            shapes = [(1, 1203), (37, 1024), (500, 999), (1203, 16 * 33 + 5), (64, 1011)]
            target = "_tile_shape"
        for shape in shapes:
            monkeypatch.setattr(ev, target, lambda *a, shape=shape: shape if len(shape) > 1 else shape[0])
            got = knn(emb, gallery, k, backend=backend)
            np.testing.assert_array_equal(got.indices[ok], whole.indices[ok], err_msg=f"k={k} chunk {shape}")
            np.testing.assert_allclose(got.distances, whole.distances, rtol=1e-5, atol=1e-5)
            if gallery is None:
                assert not (got.indices == np.arange(len(emb))[:, None]).any()  # never itself
        monkeypatch.undo()


def test_grouped_selection_is_exact_with_ties():
    """The grouped top-k returns the k smallest values of every row even when many are equal."""
    from dmlkit.evaluation import GROUP, _tile_nearest

    rng = np.random.default_rng(12)
    for k in (1, 3, 10):
        tile = torch.from_numpy(rng.integers(0, 40, size=(50, GROUP * 4 * k + 9)).astype(np.float32))
        d, i = _tile_nearest(tile, k)
        np.testing.assert_array_equal(torch.gather(tile, 1, i).numpy(), d.numpy())  # values match indices
        best = torch.topk(d, k, dim=1, largest=False).values
        np.testing.assert_array_equal(best.numpy(), torch.sort(tile, 1).values[:, :k].numpy())
        assert all(len(set(row)) == len(row) for row in i.tolist())  # no column twice


def test_chunk_rules_keep_faiss_on_its_blas_path_and_tiles_in_budget():
    import faiss

    from dmlkit.evaluation import _faiss_rows, _tile_shape

    # the issue: N = 60,000, D = 128, 512 MiB gave 729-row faiss calls, below faiss's BLAS threshold
    for d in (16, 64, 128, 512, 1024):
        rows = _faiss_rows(60000, d, 14, 512)
        assert rows * d >= faiss.cvar.distance_compute_blas_threshold and rows >= 4096
    assert _faiss_rows(100, 128, 5, 512) == 100
    rows, cols = _tile_shape(60502, 60502, 512)
    assert (rows, cols) == (4096, 16384) and rows * cols * 8 <= 512 * 2**20
    rows, cols = _tile_shape(60502, 60502, 4096)
    assert cols == 60502 and rows >= 4096 and rows * cols * 8 <= 4096 * 2**20
    assert _tile_shape(150, 150, 0.01) == (8, 150)  # a tiny budget: narrow chunks of the whole gallery


def test_singleton_class_is_left_out_and_counted():
    emb, labels = data(seed=5)
    labels = labels.copy()
    labels[0] = 999  # a class with one item has no R
    got = retrieval_metrics(emb, labels)
    ref = brute_force(emb, labels)
    assert got["queries_without_match"] == 1
    assert got["map_at_r"] == pytest.approx(ref["map_at_r"], abs=1e-6)


def test_per_class_breakdown_averages_to_the_whole():
    emb, labels = data(seed=6)
    got = retrieval_metrics(emb, labels, per_class=True)
    counts = np.bincount(labels)
    weighted = sum(got["per_class"][str(c)]["map_at_r"] * counts[c] for c in range(len(counts))) / counts.sum()
    assert weighted == pytest.approx(got["map_at_r"], abs=1e-9)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e, y: (e, y[:-1]), "150 embeddings but 149 labels"),
        (lambda e, y: (np.where(np.arange(len(e))[:, None] == 7, np.nan, e), y), "contain NaN or inf (first at row 7)"),
        (lambda e, y: (e, np.arange(len(y))), "no query has another item of its class"),
        (lambda e, y: (e[:, :, None], y), "embeddings must be a 2-D array"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    emb, labels = data()
    emb, labels = change(emb, labels)
    with pytest.raises(DmlkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        retrieval_metrics(emb, labels)


def test_empty_gallery_is_an_error():
    emb, labels = data()
    with pytest.raises(DmlkitError, match="the gallery is empty"):
        retrieval_metrics(emb, labels, query_mask=np.ones(len(labels), bool), gallery_mask=np.zeros(len(labels), bool))


def test_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    emb, labels = data(seed=7)
    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    # PML's default k-NN is faiss L2 on the raw vectors: give it the normalised ones
    unit = torch.nn.functional.normalize(torch.tensor(emb), dim=1)
    ref = calc.get_accuracy(unit, torch.tensor(labels))
    got = retrieval_metrics(emb, labels)
    assert got["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


def test_clustering_metrics_match_sklearn_on_separable_data():
    from sklearn.metrics import adjusted_mutual_info_score

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)
    emb = np.eye(8)[labels] * 10 + 0.01 * rng.normal(size=(200, 8))
    # k-means++ starts find every one of 5 well-separated clusters (PML's default, one random start,
    # may merge two of them: a local optimum, not a wrong metric)
    got = clustering_metrics(emb, labels, init="k-means++", restarts=3)
    assert got["nmi"] == pytest.approx(1.0, abs=1e-9) and got["ami"] == pytest.approx(1.0, abs=1e-9)
    shuffled = rng.permutation(labels)
    got = clustering_metrics(emb, shuffled, init="k-means++", restarts=3)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(shuffled, labels), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_adjusted_mutual_info_equals_sklearn(seed):
    from sklearn.metrics import adjusted_mutual_info_score

    from dmlkit.evaluation import adjusted_mutual_info

    rng = np.random.default_rng(seed)
    cases = [
        (np.zeros(7, int), np.zeros(7, int)),  # one cluster each: a perfect match
        (np.zeros(7, int), np.arange(7)),  # one class
        (np.arange(9), np.arange(9)),  # all singletons
        (np.repeat(np.arange(3), [1, 5, 30]), np.repeat(np.arange(4), [20, 10, 5, 1])),  # uneven sizes
    ]
    for _ in range(25):
        n, k1, k2 = int(rng.integers(2, 400)), int(rng.integers(1, 60)), int(rng.integers(1, 60))
        t = rng.integers(0, k1, n)
        p = np.where(rng.random(n) < rng.random(), t, rng.integers(0, k2, n))  # correlated to a random degree
        cases.append((t, p))
    for t, p in cases:
        assert adjusted_mutual_info(t, p) == pytest.approx(adjusted_mutual_info_score(t, p), abs=1e-10)


def test_evaluate_command_json(cli, tmp_path):
    emb, labels = data(seed=8)
    np.save(tmp_path / "x.npy", emb)
    np.save(tmp_path / "y.npy", labels)
    code, out, err = cli(
        "evaluate",
        "--embeddings",
        str(tmp_path / "x.npy"),
        "--labels",
        str(tmp_path / "y.npy"),
        "--json",
        "--clustering",
    )
    assert code == 0, err
    got = json.loads(out)
    ref = brute_force(emb, labels)
    assert got["map_at_r"] == pytest.approx(ref["map_at_r"], abs=1e-6)
    assert {"precision_at_1", "r_precision", "recall_at_1", "nmi", "ami"} <= set(got)


def test_torch_kmeans_matches_faiss_on_clustered_data():
    from sklearn.metrics import normalized_mutual_info_score

    from dmlkit.evaluation import kmeans_labels

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 30)
    emb = 10 * np.eye(16)[labels] + rng.normal(size=(180, 16))  # six well-separated blobs
    for seed in range(5):
        # greedy k-means++ finds every blob; faiss's random start sometimes merges two
        torch_nmi = normalized_mutual_info_score(
            labels, kmeans_labels(emb, 6, backend="torch", device="cpu", seed=seed, init="k-means++")
        )
        faiss_nmi = normalized_mutual_info_score(labels, kmeans_labels(emb, 6, backend="faiss", seed=seed))
        assert torch_nmi == pytest.approx(1.0) and torch_nmi >= faiss_nmi - 1e-9
    with pytest.raises(DmlkitError, match="unknown k-means backend"):
        kmeans_labels(emb, 6, backend="sklearn")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_gpu_knn_and_kmeans_agree_with_the_cpu():
    emb, labels = data(n=2000, d=64, classes=50, seed=9, tie_free=False)
    cpu = retrieval_metrics(emb, labels, backend="faiss")
    cuda = retrieval_metrics(emb, labels, backend="torch", device="cuda", memory_mb=1)
    for k in ("precision_at_1", "r_precision", "map_at_r"):
        assert cuda[k] == pytest.approx(cpu[k], abs=2e-3)
    got = clustering_metrics(emb, labels, backend="torch")
    ref = clustering_metrics(emb, labels, backend="faiss")
    assert got["nmi"] == pytest.approx(ref["nmi"], abs=0.05)


def test_evaluate_command_with_query_and_gallery_masks_and_per_class(cli, tmp_path):
    emb, labels = data(seed=10)
    qm = np.arange(len(labels)) % 3 == 0
    gm = ~qm
    for name, arr in (("x", emb), ("y", labels), ("q", qm), ("g", gm)):
        np.save(tmp_path / f"{name}.npy", arr)
    files = ["--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--no-clustering"]
    masks = ["--query-mask", str(tmp_path / "q.npy"), "--gallery-mask", str(tmp_path / "g.npy")]
    code, out, err = cli("evaluate", *files, *masks, "--per-class", "--json")
    assert code == 0, err
    got = json.loads(out)
    ref = brute_force(emb, labels, qm, gm)
    for k in ("precision_at_1", "r_precision", "map_at_r", "recall_at_4"):
        assert got[k] == pytest.approx(ref[k], abs=1e-6)
    assert set(got["per_class"]) == {str(c) for c in np.unique(labels[qm])}
    np.save(tmp_path / "q.npy", qm[:-1])
    code, _, err = cli("evaluate", *files, *masks[:2])
    assert code == 1 and "masks must have 150 entries" in err
