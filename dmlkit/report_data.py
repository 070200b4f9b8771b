"""What a report reads from a run's test set: its embeddings (an mlrc run's fold models concatenated),
each query's nearest neighbours, per-class metrics, the most confused class pairs, worst and random
example queries, a 2-D map of the embeddings, and small image thumbnails."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.errors import DmlkitError, OptionError
from dmlkit.evaluation import _drop_own, knn, l2_normalise, retrieval_metrics

MAP_METHODS = ("auto", "pca", "tsne", "umap")


@dataclass
class Embedded:
    """A run's test embeddings as its evaluator searches them, with the split they come from."""

    name: str
    embeddings: np.ndarray  # [N, D] float32, L2-normalised when the evaluator normalises
    split: Any  # dmlkit.data.Split
    ks: tuple[int, ...] = (1, 2, 4, 8)
    normalise: bool = True


@dataclass
class Examples:
    """Example queries of one run and the class pairs its neighbours confuse."""

    searched: int  # queries whose neighbours were searched (all, or a random sample)
    queries: int  # queries of the test set
    top_k: int
    worst: list[dict[str, Any]] = field(default_factory=list)
    random: list[dict[str, Any]] = field(default_factory=list)
    confusions: list[dict[str, Any]] = field(default_factory=list)


def map_method(name: str) -> str:
    """The 2-D map method to use for ``name`` (auto: UMAP when umap-learn is installed, else PCA);
    refuses an unknown name or UMAP without umap-learn before any work."""
    if name not in MAP_METHODS:
        raise OptionError(f"--map must be one of {', '.join(MAP_METHODS)}; got {name!r}")
    has_umap = umap_installed()
    if name == "umap" and not has_umap:
        raise OptionError("--map umap needs umap-learn: pip install 'dmlkit[umap]' (or use --map pca or tsne)")
    if name == "auto":
        return "umap" if has_umap else "pca"
    return name


def umap_installed() -> bool:
    """Whether umap-learn is installed (its distribution, not a stray ``umap`` folder left behind)."""
    try:
        importlib.metadata.version("umap-learn")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("umap") is not None


def embed_run(run: dict[str, Any], load_trainer: Callable[[Path], Any]) -> Embedded:
    """The test embeddings of a run's best checkpoint; for an mlrc run the L2-normalised embeddings
    of its fold models concatenated, as mlrc.json's ``concatenated`` metrics were computed.

    ``load_trainer(run_dir)`` gives the trainer of a run directory's best checkpoint (the CLI passes
    ``dmlkit.train.load_run``): the report reads runs, it does not import the trainer."""
    parts = []
    for part in run.get("folds", [run]):
        trainer = load_trainer(part["dir"])
        emb, _ = trainer.embed(trainer.test_split, f"embedding {part['name']}'s test images")
        parts.append(l2_normalise(emb) if "folds" in run else emb)
    ev = trainer.cfg["evaluator"]
    normalise = bool(ev.get("normalize", True))
    emb = np.concatenate(parts, axis=1).astype(np.float32)
    return Embedded(
        name=run["name"],
        embeddings=l2_normalise(emb) if normalise else emb,
        split=trainer.test_split,
        ks=tuple(int(k) for k in ev.get("ks", (1, 2, 4, 8))),
        normalise=normalise,
    )


def recomputed_metrics(data: Embedded) -> dict[str, Any]:
    """The retrieval metrics of the embeddings, overall and per class (``per_class``, keyed by label)."""
    s = data.split
    return retrieval_metrics(
        data.embeddings,
        s.labels,
        query_mask=s.query_mask,
        gallery_mask=s.gallery_mask,
        ks=data.ks,
        normalise=data.normalise,
        per_class=True,
    )


def query_items(split: Any) -> np.ndarray:
    """Indices of the items that query: the query mask's, or every item."""
    return np.flatnonzero(split.query_mask) if split.query_mask is not None else np.arange(len(split.labels))


def gallery_items(split: Any) -> np.ndarray:
    """Indices of the items searched: the gallery mask's, or every item."""
    return np.flatnonzero(split.gallery_mask) if split.gallery_mask is not None else np.arange(len(split.labels))


def neighbours(data: Embedded, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest gallery items (indices into the split, a query never its own
    neighbour) and their Euclidean distances, nearest first."""
    gallery = gallery_items(data.split)
    position = np.full(len(data.split.labels), -1)
    position[gallery] = np.arange(len(gallery))
    nn = knn(data.embeddings[queries], data.embeddings[gallery], min(k + 1, len(gallery)))
    idx, dist = _drop_own(nn.indices, nn.distances, position[queries])
    return gallery[idx], np.sqrt(np.maximum(dist, 0.0))


def example_queries(
    data: Embedded, top_k: int = 5, worst: int = 6, random: int = 4, max_queries: int = 5000, seed: int = 0
) -> Examples:
    """Worst and random queries with their top-k neighbours, and the most confused class pairs.

    The neighbours of at most ``max_queries`` queries (a random sample beyond that) are searched.
    Worst: the fewest neighbours of the query's class among its top k, ties broken by the nearest
    wrong neighbour (closest first); queries whose class has no other item in the gallery are
    left out, as the metrics leave them out. Random: drawn from the other searched queries.
    """
    split, rng = data.split, np.random.default_rng(seed)
    labels = split.labels
    q_all = query_items(split)
    searched = np.sort(rng.choice(q_all, max_queries, replace=False)) if len(q_all) > max_queries else q_all
    idx, dist = neighbours(data, searched, top_k)
    correct = labels[idx] == labels[searched][:, None]
    in_gallery = np.zeros(len(labels), bool)
    in_gallery[gallery_items(split)] = True
    same_class = np.bincount(labels[in_gallery], minlength=split.num_classes)[labels[searched]]
    has_match = same_class - in_gallery[searched] > 0
    nearest_wrong = np.where(correct, np.inf, dist).min(axis=1)
    order = [i for i in np.lexsort((nearest_wrong, correct.sum(1))) if has_match[i]]
    chosen_worst = order[:worst]
    rest = np.setdiff1d(np.arange(len(searched)), chosen_worst)
    chosen_random = np.sort(rng.choice(rest, min(random, len(rest)), replace=False)) if len(rest) else []

    def example(i: int) -> dict[str, Any]:
        return {
            "query": int(searched[i]),
            "label": int(labels[searched[i]]),
            "neighbours": [int(j) for j in idx[i]],
            "distances": [float(d) for d in dist[i]],
            "correct": [bool(c) for c in correct[i]],
        }

    return Examples(
        searched=len(searched),
        queries=len(q_all),
        top_k=idx.shape[1],
        worst=[example(i) for i in chosen_worst],
        random=[example(int(i)) for i in chosen_random],
        confusions=confused_pairs(labels[searched], labels[idx]),
    )


def confused_pairs(query_labels: np.ndarray, neighbour_labels: np.ndarray, top: int = 10) -> list[dict[str, Any]]:
    """The class pairs {a, b} whose queries most often retrieve each other among their top k.

    ``a_to_b``: neighbours of class b in the top k of class a's queries (``b_to_a`` the reverse);
    ``share``: (a_to_b + b_to_a) over the top-k slots of both classes' queries. Ranked by share,
    then by count. Only the pairs that occur are counted (no classes x classes table: SOP has 11,316
    classes)."""
    k = neighbour_labels.shape[1]
    a = np.repeat(query_labels, k).astype(np.int64)
    b = neighbour_labels.reshape(-1).astype(np.int64)
    wrong = a != b
    a, b = a[wrong], b[wrong]
    if not len(a):
        return []
    n = int(max(query_labels.max(), neighbour_labels.max())) + 1
    codes, counts = np.unique(a * n + b, return_counts=True)
    pairs, both = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_counts=True)
    lo, hi = pairs // n, pairs % n
    queries = np.bincount(query_labels, minlength=n)
    share = both / (k * (queries[lo] + queries[hi]))
    order = np.lexsort((-both, -share))[:top]

    def directed(x: int, y: int) -> int:
        i = np.searchsorted(codes, x * n + y)
        return int(counts[i]) if i < len(codes) and codes[i] == x * n + y else 0

    return [
        {
            "a": int(lo[i]),
            "b": int(hi[i]),
            "a_to_b": directed(int(lo[i]), int(hi[i])),
            "b_to_a": directed(int(hi[i]), int(lo[i])),
            "share": float(share[i]),
        }
        for i in order
    ]


def map_sample(n: int, points: int, seed: int = 0) -> np.ndarray:
    """The items drawn on the map: all ``n``, or ``points`` of them at random (the same for runs on
    the same test set)."""
    if n <= points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, points, replace=False))


def embedding_map(embeddings: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates of ``embeddings`` by PCA, t-SNE (scikit-learn) or UMAP (umap-learn)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) < 3:
        raise DmlkitError(f"the map needs at least 3 test items; the test set has {len(x)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(2, random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(2, init="pca", random_state=seed, perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)
    elif method == "umap":
        with warnings.catch_warnings():  # umap-learn warns on import that TensorFlow (ParametricUMAP) is absent
            warnings.simplefilter("ignore", ImportWarning)
            import umap

        xy = umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=seed, n_jobs=1).fit_transform(x)
    else:
        raise OptionError(f"unknown map method {method!r}; choose one of {', '.join(MAP_METHODS[1:])}")
    if xy.shape[1] < 2:  # embeddings of one dimension: PCA gives one component
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return np.asarray(xy, dtype=np.float64)


class Thumbnails:
    """Small images as data: URLs, each item's made once; the same picture from two runs (same path,
    or equal array) is stored once, under one id. Small arrays (digits' 8 x 8) are enlarged by a
    whole factor into a sharp PNG; photos and larger arrays are shrunk into a JPEG."""

    def __init__(self, size: int = 64):
        self.size = size
        self.urls: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, item: Any) -> int:
        """The id of ``item``'s thumbnail in :attr:`urls` (-1 when the file cannot be read)."""
        key = self._key(item)
        if key not in self._ids:
            url = self._make(item)
            if url is None:
                return -1
            self._ids[key] = len(self.urls)
            self.urls.append(url)
        return self._ids[key]

    @staticmethod
    def _key(item: Any) -> str:
        if hasattr(item, "__fspath__") or isinstance(item, str):
            return f"path:{item}"
        arr = np.ascontiguousarray(np.asarray(item))
        return f"array:{arr.shape}:{hashlib.sha1(arr.tobytes()).hexdigest()}"

    def _make(self, item: Any) -> str | None:
        from PIL import Image

        from dmlkit.report import _picture

        try:
            arr = _picture(item)
        except DmlkitError:  # a file moved or deleted since training: the page shows a gap
            return None
        if arr.dtype != np.uint8:  # arrays scaled to 0..1
            arr = np.round(arr * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if max(img.size) <= self.size // 2:  # a small array: pixels enlarged by a whole factor, kept sharp
            factor = self.size // max(img.size)
            img = img.resize((img.size[0] * factor, img.size[1] * factor), Image.NEAREST)
            fmt, mime = "PNG", "image/png"
        else:
            img.thumbnail((self.size, self.size))
            fmt, mime = "JPEG", "image/jpeg"
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 75} if fmt == "JPEG" else {"optimize": True}))
        return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
