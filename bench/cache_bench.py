"""Training steps/s with a frozen backbone, with and without the feature cache.

    python bench/cache_bench.py --data-root ../shared/data/CUB_200_2011            # CUB subset, EfficientNet-Lite0
    python bench/cache_bench.py --quick                                           # digits, small CNN

Both runs train the same head and loss (Proxy Anchor, 128-d, batches of 32) on the same
frozen backbone; the uncached one runs the backbone on every batch (what a frozen run costs
without the cache), the cached one reads pooled features built once (their build time is
reported apart: it is paid once per dataset, backbone and view, and reused across runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import get_registry  # noqa: E402
from dmlkit.config import resolve  # noqa: E402
from dmlkit.train import Trainer  # noqa: E402


def trainer(args: argparse.Namespace, cached: bool, run_dir: Path) -> Trainer:
    if args.quick:
        data, backbone = {"name": "digits"}, {"name": "smallcnn"}
    else:
        data = {"name": "cub200", "root": args.data_root}
        backbone = {"name": "efficientnet_lite0", "pretrained": True}
    train = {
        "freeze_backbone": True,
        "feature_cache": cached,
        "cache_dir": args.cache_dir,
        "batch_size": 32,
        "embedding_size": 128,
        "head_init": "random",
        "num_workers": args.workers,
        "val_fraction": 0.0,
    }
    cfg, _ = resolve(
        {
            "dataset": data,
            "backbone": backbone,
            "loss": {"name": "proxy_anchor"},
            "sampler": {"m": 4 if not args.quick else 8},
            "train": train,
        },
        get_registry(),
    )
    return Trainer(cfg, get_registry(), run_dir, console=Console(quiet=True))


def steps_per_s(tr: Trainer, batches, steps: int) -> float:
    it = iter(batches)
    x, y = next(it)
    tr.train_step(x, y)  # warm-up
    start, done = time.perf_counter(), 0
    for x, y in it:
        tr.train_step(x, y)
        done += 1
        if done == steps:
            break
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--uncached-steps", type=int, default=10)
    ap.add_argument("--cached-steps", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--runs", default="runs/cache_bench")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not args.quick and not args.data_root:
        ap.error("pass --data-root (the CUB subset) or --quick")
    torch.manual_seed(0)
    plain = trainer(args, False, Path(args.runs) / "plain")
    plain.sampler.set_epoch(1)
    uncached = steps_per_s(plain, plain.loader(plain.train_split, train=True), args.uncached_steps)
    cached_tr = trainer(args, True, Path(args.runs) / "cached")
    cached_tr.sampler.set_epoch(1)
    start = time.perf_counter()
    cached_tr.features.train_views()  # built once (or read from the cache folder)
    build = time.perf_counter() - start
    batches = (b for epoch in range(1, 1000) for b in cached_tr.features.train_batches(epoch))
    cached = steps_per_s(cached_tr, batches, args.cached_steps)
    row = {
        **machine(),
        "dataset": "digits" if args.quick else "cub200",
        "batch": 32,
        "uncached_steps_per_s": round(uncached, 3),
        "cached_steps_per_s": round(cached, 1),
        "speed_up": round(cached / uncached, 1),
        "cache_ready_s": round(build, 1),
    }
    print(json.dumps(row))
    save(row, args.out)


if __name__ == "__main__":
    main()
