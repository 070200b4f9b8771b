"""Greedy k-center proxy selection time at SOP scale: C=11,318 classes, b=7 rounds, K=4, D=128.

    python bench/ccp_bench.py [--device cpu|cuda] [--out r.json]

Times only the selection (the pool is random, as the forward passes are excluded); median
of 5 runs after one warm-up, CUDA synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit_plugins.proxies import greedy_kcenter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", type=int, default=11318)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(args.classes, args.rounds, args.dim, generator=g).to(dev)
    previous = torch.randn(args.classes, args.k, args.dim, generator=g).to(dev)
    times = []
    for i in range(6):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        greedy_kcenter(pool, previous if i % 2 else None, args.k)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    row = {**vars(args), **machine(), "selection_ms_median": round(statistics.median(times) * 1000, 2)}
    print(json.dumps(row))
    save(row, args.out)


if __name__ == "__main__":
    main()
