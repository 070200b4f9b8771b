"""The HTML report's own work at Stanford Online Products size, on synthetic embeddings: per-class
metrics, the example queries and confused pairs, the 2-D map, and the page (thumbnails included).
Embedding the test images is left out: it is the same forward pass as `dmlkit evaluate`.

    python bench/report_bench.py                      # 60,502 x 512, 11,316 classes (SOP test set)
    python bench/report_bench.py --n 5000 --classes 100 --dim 128 --map tsne

Items are 3 x 64 x 64 random arrays (500 of them, by class), so thumbnails are made and compressed as
for images, in the worst case (noise compresses worst); clusters are
Gaussian around per-class centres, so neighbours and confusions are not trivial.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit.data import Split  # noqa: E402
from dmlkit.evaluation import l2_normalise  # noqa: E402
from dmlkit.report_data import Embedded, embedding_map, example_queries, map_sample, recomputed_metrics  # noqa: E402
from dmlkit.report_html import page  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60502)
    ap.add_argument("--classes", type=int, default=11316)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--map", default="pca", choices=["pca", "tsne", "umap"])
    ap.add_argument("--map-points", type=int, default=1000)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, args.classes, args.n))
    _, labels = np.unique(labels, return_inverse=True)
    centres = rng.normal(size=(labels.max() + 1, args.dim)).astype(np.float32)
    emb = l2_normalise(centres[labels] + 0.9 * rng.normal(size=(args.n, args.dim)).astype(np.float32))
    pictures = rng.random((500, 3, 64, 64), dtype=np.float32)  # 500 pictures shared out by class
    split = Split([pictures[y % 500] for y in labels], labels, mode="array")
    data = Embedded("synthetic", emb, split)

    times = {}  # wall-clock and CPU seconds of each stage (CPU time: this process, all threads)

    def timed(name, fn, *a, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*a, **kw)
        times[f"{name}_wall_s"], times[f"{name}_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
        return out

    metrics = timed("per_class_metrics", recomputed_metrics, data)
    examples = timed("examples_and_confusions", example_queries, data, top_k=5, worst=6, random=6)
    sample = map_sample(args.n, args.map_points)
    xy = timed(f"map_{args.map}", embedding_map, emb[sample], args.map)
    run = {"name": "synthetic", "config": {}, "history": [{"epoch": 1, "loss": 1.0}], "results": None}
    row = {"run": "synthetic", **{k: v for k, v in metrics.items() if isinstance(v, float)}}
    run["results"] = {"best_epoch": 1, "selected_by": "-", "test": dict(row)}
    analysis = {
        "name": "synthetic",
        "data": data,
        "metrics": metrics,
        "differ": {},
        "examples": examples,
        "map": {"items": sample, "xy": xy, "method": args.map},
    }
    text = timed("page", page, [run], [row], [analysis])
    result = {
        "machine": machine(),
        "n": args.n,
        "classes": int(labels.max() + 1),
        "dim": args.dim,
        "map_points": len(sample),
        "searched_queries": examples.searched,
        "page_mb": round(len(text.encode()) / 2**20, 2),
        **{k: round(v, 2) for k, v in times.items()},
    }
    print(result)
    if args.out:
        save(result, args.out)


if __name__ == "__main__":
    main()
