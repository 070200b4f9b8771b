"""Feature-cache build speed on real images: the frozen backbone's pooled features of CUB images
through dmlkit's embedding loop (JPEG decoding in loader workers, the test transform, the model),
as the cache built them before issue 29 (default memory format, whole loader batches through the
model) and now (channels-last, ``CPU_FORWARD_BATCH`` images per forward pass).

    python bench/cache_build_bench.py --data-root ../shared/data/CUB_200_2011 --images 256 --out cache_build.json

Rounds alternate between the two so that other load on the machine affects both alike; the
median images/s of ``--rounds`` is reported, and the largest difference between the two ways'
features (they must agree to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import (
    embedding,  # noqa: E402
    get_registry,  # noqa: E402
)
from dmlkit.config import resolve  # noqa: E402
from dmlkit.embedding import embed_dataset, in_eval_mode  # noqa: E402
from dmlkit.train import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256, help="train.eval_batch_size, the cache's batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    reg = get_registry()
    cfg, _ = resolve(
        {
            "dataset": {"name": "cub200", "root": args.data_root},
            "backbone": {"name": args.backbone, "pretrained": True},
            "train": {"freeze_backbone": True, "pooling": "avgmax", "val_fraction": 0.0},
        },
        reg,
    )
    trainer = Trainer(cfg, reg, Path("runs/cache_build_bench"), console=Console(quiet=True))
    model = trainer.model
    split = trainer.full_train_split.with_transform(trainer.test_split.transform)
    split = split.subset(np.arange(min(args.images, len(split))))
    rates: dict[str, list[float]] = {"before": [], "now": []}
    chunk = embedding.CPU_FORWARD_BATCH
    feats: dict[str, torch.Tensor] = {}
    with in_eval_mode(model):
        for _ in range(args.rounds):
            for fmt in rates:
                embedding.CPU_FORWARD_BATCH = chunk if fmt == "now" else args.batch_size
                start = time.perf_counter()
                feats[fmt] = embed_dataset(
                    model.prefix_features,
                    split,
                    device=torch.device("cpu"),
                    batch_size=args.batch_size,
                    workers=args.workers,
                    model=model.backbone if fmt == "now" else None,
                )
                rates[fmt].append(len(split) / (time.perf_counter() - start))
    embedding.CPU_FORWARD_BATCH = chunk
    diff = float((feats["before"] - feats["now"]).abs().max())
    scale = float(feats["before"].abs().max())
    rows = [
        {"format": k, "images_per_s": statistics.median(v), "rounds": [round(x, 2) for x in v]}
        for k, v in rates.items()
    ]
    for r in rows:
        print(f"{r['format']:14} {r['images_per_s']:7.2f} images/s (median of {args.rounds}: {r['rounds']})")
    print(f"largest |difference| of the features: {diff:.2e} (largest |feature| {scale:.2f})")
    if args.out:
        save({**machine(), "args": vars(args), "rows": rows, "max_abs_diff": diff, "max_abs_feature": scale}, args.out)


if __name__ == "__main__":
    main()
