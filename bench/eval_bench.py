"""Time and peak memory of the retrieval and clustering metrics at SOP test size.

    python bench/eval_bench.py            # N=60,502, D=512, 11,316 classes (SOP test size)
    python bench/eval_bench.py --quick    # N=6,000, D=128, 1,100 classes
    python bench/eval_bench.py --no-pml --backends torch --out results.json

Embeddings are synthetic (class centres plus noise, 2-12 items per class as in SOP);
PML's AccuracyCalculator runs on the same data in the same process when it is installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit.evaluation import clustering_metrics, retrieval_metrics


def synthetic(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 13, classes)
    sizes = np.maximum(1, np.round(sizes * n / sizes.sum()).astype(int))
    labels = np.repeat(np.arange(classes), sizes)[:n]
    if len(labels) < n:
        labels = np.concatenate([labels, rng.integers(0, classes, n - len(labels))])
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    emb = centres[labels] + 1.5 * rng.normal(size=(n, d)).astype(np.float32)
    return emb, labels


def peak_mb() -> float:
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0.0), gpu


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="faiss,torch")
    ap.add_argument("--no-pml", action="store_true")
    ap.add_argument("--no-clustering", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    n, d, c = (6000, 128, 1100) if args.quick else (60502, 512, 11316)
    emb, labels = synthetic(n, d, c)
    results = {
        "n": n,
        "dim": d,
        "classes": c,
        **machine(),
        "runs": [],
    }
    for backend in args.backends.split(","):
        device = "cuda" if backend == "torch" and torch.cuda.is_available() else "cpu"
        m, secs = timed(partial(retrieval_metrics, emb, labels, backend=backend, device=device, memory_mb=2048))
        row = {
            "impl": f"dmlkit-{backend}",
            "device": device,
            "retrieval_s": round(secs, 3),
            "precision_at_1": m["precision_at_1"],
            "map_at_r": m["map_at_r"],
        }
        if not args.no_clustering:
            km_backend = "torch" if device == "cuda" else "faiss"
            cm, csecs = timed(partial(clustering_metrics, emb, labels, backend=km_backend))
            row.update({"clustering_s": round(csecs, 3), "nmi": cm["nmi"], "ami": cm["ami"]})
        row["peak_rss_mb"], row["peak_gpu_mb"] = peak_mb()
        results["runs"].append(row)
        print(json.dumps(row))
    if not args.no_pml:
        try:
            from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        except ImportError:
            print("PML not installed: skipped")
        else:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            unit = torch.nn.functional.normalize(torch.tensor(emb), dim=1)
            lab = torch.tensor(labels)
            calc = AccuracyCalculator(
                include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count", device=dev
            )
            m, secs = timed(lambda: calc.get_accuracy(unit, lab))
            row = {
                "impl": "pml",
                "device": str(dev),
                "retrieval_s": round(secs, 3),
                "precision_at_1": m["precision_at_1"],
                "map_at_r": m["mean_average_precision_at_r"],
            }
            if not args.no_clustering:
                calc2 = AccuracyCalculator(include=("NMI", "AMI"), device=dev)
                cm, csecs = timed(lambda: calc2.get_accuracy(unit, lab))
                row.update({"clustering_s": round(csecs, 3), "nmi": cm["NMI"], "ami": cm["AMI"]})
            row["peak_rss_mb"], row["peak_gpu_mb"] = peak_mb()
            results["runs"].append(row)
            print(json.dumps(row))
    save(results, args.out)


if __name__ == "__main__":
    main()
