"""Retrieval through approximate faiss indexes against exact search, on saved embeddings: what
`dmlkit evaluate-index` reports for one index, for several factories side by side, so that an
index can be chosen by measurement (metrics lost, queries/s, build time).

    dmlkit embed RUN --out emb/          # or any embeddings.npy / labels.npy pair
    python bench/index_bench.py --embeddings emb/embeddings.npy --labels emb/labels.npy

Every item is a query against all the others (leave-one-out, as dmlkit's retrieval metrics);
vectors are L2-normalised, as a run's embeddings are by default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit.evaluation import _drop_own, knn, l2_normalise, per_query_metrics  # noqa: E402

FACTORIES = ["Flat", "HNSW32", "IVF64,Flat", "IVF64,Flat/nprobe8", "IVF64,PQ32x8"]


def metrics(idx: np.ndarray, dist: np.ndarray, labels: np.ndarray, r: np.ndarray) -> dict[str, float]:
    idx, _ = _drop_own(idx, dist, np.arange(len(labels)))
    rel = np.where(idx >= 0, labels[np.clip(idx, 0, None)] == labels[:, None], False)
    values = per_query_metrics(rel, r, [1])
    return {m: round(float(v.mean()), 4) for m, v in values.items() if m != "recall_at_1"}


def main() -> None:
    import faiss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument(
        "--factories", default=";".join(FACTORIES), help="faiss factories, ;-separated; /nprobeN sets nprobe"
    )
    p.add_argument("--out", default="")
    args = p.parse_args()
    emb = np.ascontiguousarray(l2_normalise(np.load(args.embeddings).astype(np.float32)))
    labels = np.load(args.labels)
    count = dict(zip(*np.unique(labels, return_counts=True)))
    r = np.asarray([count[c] - 1 for c in labels])
    k = int(r.max()) + 1
    result = {"machine": machine(), "items": len(emb), "dim": emb.shape[1], "classes": len(count), "rows": []}
    start = time.perf_counter()
    exact = knn(emb, emb, k, backend="faiss")
    exact_s = time.perf_counter() - start
    reference = metrics(exact.indices, exact.distances, labels, r)
    for spec in args.factories.split(";"):
        factory, _, probe = spec.partition("/nprobe")
        start = time.perf_counter()
        index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_L2)
        if not index.is_trained:
            index.train(emb)
        index.add(emb)
        build_s = time.perf_counter() - start
        if probe:
            faiss.extract_index_ivf(index).nprobe = int(probe)
        start = time.perf_counter()
        dist, idx = index.search(emb, k)
        search_s = time.perf_counter() - start
        got = metrics(idx, dist, labels, r)
        row = {
            "factory": spec,
            **got,
            **{f"{m}_lost": round(reference[m] - v, 4) for m, v in got.items()},
            "queries_per_s": round(len(emb) / search_s, 1),
            "build_s": round(build_s, 3),
        }
        result["rows"].append(row)
        print(row, flush=True)
    result["exact"] = {**reference, "queries_per_s": round(len(emb) / exact_s, 1)}
    print("exact (dmlkit.evaluation.knn):", result["exact"])
    save(result, args.out)


if __name__ == "__main__":
    main()
