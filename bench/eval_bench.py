"""Retrieval metrics at SOP test size, per embedding width, beside PML and the GEMM floor.

    python bench/eval_bench.py                    # N=60,502, 11,316 classes, D = 64, 128, 512, 1024
    python bench/eval_bench.py --quick            # N=6,000, 1,100 classes, same widths
    python bench/eval_bench.py --dims 128,512 --backends faiss --out eval.json
    python bench/eval_bench.py --dims 512 --clustering   # also k-means + NMI/AMI

For each D, in one process and on the same synthetic embeddings (class centres plus noise,
2-12 items per class as in SOP), it times:

- dmlkit's ``retrieval_metrics`` (P@1, R-Precision, MAP@R, Recall@1/2/4/8) with each backend,
  at the evaluator's default memory budget (``--memory-mb``, 512 MiB);
- PML's ``AccuracyCalculator`` (P@1, R-Precision, MAP@R, k = max_bin_count) on the same
  L2-normalised embeddings, and checks that the three values agree with dmlkit's;
- the matrix-multiply floor of exact k-NN on this machine: the N x N x D float32 products
  done with ``torch.mm`` in 4,096 x 16,384 blocks (on the GPU when there is one), timed over
  ``--bound-rows`` query rows and scaled to N (the time is linear in the rows). Any exact
  k-NN does at least this work; faiss multiplies with its own BLAS (OpenBLAS in the
  faiss-cpu wheel), which can be faster than torch's on some CPUs.

Peak memory is the largest resident-set growth over the run's start, sampled every 5 ms
(GPU: torch's peak allocation). One JSON line per measurement; ``--out`` saves them all.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit.evaluation import clustering_metrics, l2_normalise, retrieval_metrics

METRICS = {"precision_at_1": "precision_at_1", "r_precision": "r_precision", "map_at_r": "mean_average_precision_at_r"}


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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakMemory:
    """Largest RSS growth (MiB) while the block runs, sampled every 5 ms; GPU peak from torch."""

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.rss_mb = round(self.peak - self.base, 1)
        self.gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0.0
        return False


def timed(fn):
    """(result, seconds, memory); ``mem.cpu_util`` is the process's CPU seconds per second of wall
    time (about the thread count on an idle machine; less when something else competes)."""
    with PeakMemory() as mem:
        t, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        mem.cpu_util = round((time.process_time() - cpu) / secs, 2)
    return out, secs, mem


def gemm_floor(unit: np.ndarray, rows: int, device: str, block: tuple[int, int] = (4096, 16384)) -> tuple[float, float]:
    """Seconds for the N x N x D float32 products of exact k-NN with torch.mm, in blocks, and
    CPU utilisation as in :func:`timed`. Times the first ``rows`` query rows against the whole
    gallery and scales to N."""
    x = torch.from_numpy(unit).to(device)
    n = len(x)
    rows = n if rows <= 0 else min(rows, n)
    br, bc = block
    out = torch.empty(br * bc, device=device)
    torch.mm(x[:br], x[:bc].T, out=out[: min(br, n) * min(bc, n)].view(min(br, n), min(bc, n)))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    for r0 in range(0, rows, br):
        q = x[r0 : min(r0 + br, rows)]
        for c0 in range(0, n, bc):
            g = x[c0 : c0 + bc]
            torch.mm(q, g.T, out=out[: len(q) * len(g)].view(len(q), len(g)))
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return secs * n / rows, round((time.process_time() - cpu) / secs, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=6,000 and 1,100 classes")
    ap.add_argument("--n", type=int, default=0, help="embeddings (default 60,502; --quick 6,000)")
    ap.add_argument("--classes", type=int, default=0, help="classes (default 11,316; --quick 1,100)")
    ap.add_argument("--dims", default="64,128,512,1024")
    ap.add_argument("--backends", default="faiss,torch")
    ap.add_argument("--memory-mb", type=float, default=512, help="dmlkit's k-NN budget (the evaluator's default)")
    ap.add_argument("--bound-rows", type=int, default=8192, help="query rows timed for the GEMM floor (0: all)")
    ap.add_argument("--no-pml", action="store_true")
    ap.add_argument("--no-bound", action="store_true")
    ap.add_argument("--clustering", action="store_true", help="also time k-means + NMI/AMI (slow at SOP size)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    n = args.n or (6000 if args.quick else 60502)
    c = args.classes or (1100 if args.quick else 11316)
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    results = {"n": n, "classes": c, "dims": dims, "memory_mb": args.memory_mb, **machine(), "runs": []}
    calc = None
    if not args.no_pml:
        try:
            from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        except ImportError:
            print("PML not installed: skipped")
        else:
            pml_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            calc = AccuracyCalculator(include=tuple(METRICS.values()), k="max_bin_count", device=pml_device)

    def emit(row: dict) -> None:
        results["runs"].append(row)
        print(json.dumps(row), flush=True)

    for d in dims:
        emb, labels = synthetic(n, d, c)
        unit = l2_normalise(emb).astype(np.float32)
        ours = {}
        for backend in args.backends.split(","):
            device = "cuda" if backend == "torch" and torch.cuda.is_available() else "cpu"
            m, secs, mem = timed(
                lambda b=backend, dv=device, e=emb, y=labels: retrieval_metrics(
                    e, y, backend=b, device=dv, memory_mb=args.memory_mb
                )
            )
            ours[backend] = m
            row = {"dim": d, "impl": f"dmlkit-{backend}", "device": device, "retrieval_s": round(secs, 3)}
            row.update({k: m[k] for k in METRICS})
            row.update({"peak_rss_mb": mem.rss_mb, "peak_gpu_mb": mem.gpu_mb, "cpu_util": mem.cpu_util})
            if args.clustering:
                cm, csecs, _ = timed(
                    lambda dv=device, e=emb, y=labels: clustering_metrics(
                        e, y, backend="torch" if dv == "cuda" else "faiss"
                    )
                )
                row.update({"clustering_s": round(csecs, 3), "nmi": cm["nmi"], "ami": cm["ami"]})
            emit(row)
        if calc is not None:
            ut, lt = torch.from_numpy(unit), torch.from_numpy(labels)
            m, secs, mem = timed(lambda ut=ut, lt=lt: calc.get_accuracy(ut, lt))
            row = {"dim": d, "impl": "pml", "device": str(calc.device), "retrieval_s": round(secs, 3)}
            row.update({k: float(m[v]) for k, v in METRICS.items()})
            row.update({"peak_rss_mb": mem.rss_mb, "peak_gpu_mb": mem.gpu_mb, "cpu_util": mem.cpu_util})
            # same values: the largest difference to each dmlkit backend over the three metrics
            for backend, om in ours.items():
                row[f"max_abs_diff_vs_{backend}"] = max(abs(om[k] - row[k]) for k in METRICS)
            emit(row)
        if not args.no_bound:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            secs, util = gemm_floor(unit, args.bound_rows, device)
            row = {"dim": d, "impl": "gemm-floor (torch.mm)", "device": device, "retrieval_s": round(secs, 3)}
            row["cpu_util"] = util
            row["bound_rows"] = min(args.bound_rows, n) if args.bound_rows > 0 else n
            for backend in ours:
                mine = next(r for r in results["runs"] if r["dim"] == d and r["impl"] == f"dmlkit-{backend}")
                row[f"dmlkit_{backend}_over_floor"] = round(mine["retrieval_s"] / secs, 2)
            emit(row)
        del emb, unit
        gc.collect()
    save(results, args.out)


if __name__ == "__main__":
    main()
