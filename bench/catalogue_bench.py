"""The catalogue's losses beside the classics at equal budget, on the CUB-200-2011 subset with
frozen features: test P@1 and MAP@R at the epoch validation chose.

    python bench/catalogue_bench.py --data-root ../shared/data/CUB_200_2011 --out catalogue.json
    python bench/catalogue_bench.py --data-root ../shared/data/CUB_200_2011 --losses arcface circle --seeds 0

Set-up, the same for every loss (that of bench/ccp_protocol.py without CCP): a frozen ImageNet
EfficientNet-Lite0 whose pooled (avg+max) features are cached once (``train.feature_cache``,
``--views`` augmentation views per training image), a linear 1280 -> 128 head trained from random,
batches of 8 classes x 4 images, Adam 1e-4 with weight decay 1e-4 and gradient clipping at 10, no
schedule, ``--steps`` steps; each loss with its own defaults and recommended settings where the
run sets none (a classification loss's weights get their learning-rate group as it recommends).
A quarter of the 58 training species is held out (class-disjoint) and validated at each epoch's
end (an epoch: the sampler's pass, about 80 steps); the reported epoch is the best by validation
MAP@R, and the test split (42 species) is reported there. Each run's row is appended to
``--out``.jsonl as it ends, with its steps and views; a rerun with the same ones skips the rows it
finds (so an interrupted sweep goes on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import get_registry  # noqa: E402
from dmlkit.config import resolve  # noqa: E402
from dmlkit.train import Trainer  # noqa: E402

#: name in the table: (loss, miner), "old" = dmlkit's classics before the catalogue issue.
LOSSES: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "contrastive": ("old", {"name": "contrastive"}, None),
    "triplet+semihard": ("old", {"name": "triplet", "margin": 0.2}, {"name": "semihard"}),
    "multi_similarity+miner": ("old", {"name": "multi_similarity"}, {"name": "multi_similarity"}),
    "ranked_list": ("old", {"name": "ranked_list"}, None),
    "proxynca": ("old", {"name": "proxynca"}, None),
    "proxy_anchor": ("old", {"name": "proxy_anchor"}, None),
    "normalized_softmax": ("new", {"name": "normalized_softmax"}, None),
    "arcface": ("new", {"name": "arcface"}, None),
    "cosface": ("new", {"name": "cosface"}, None),
    "sphereface": ("new", {"name": "sphereface"}, None),
    "subcenter_arcface": ("new", {"name": "subcenter_arcface"}, None),
    "soft_triple": ("new", {"name": "soft_triple"}, None),
    "p2sgrad": ("new", {"name": "p2sgrad"}, None),
    "circle": ("new", {"name": "circle"}, None),
    "margin+distance_weighted": ("new", {"name": "margin"}, {"name": "distance_weighted"}),
    "supcon": ("new", {"name": "supcon"}, None),
    "ntxent": ("new", {"name": "ntxent"}, None),
    "npairs": ("new", {"name": "npairs"}, None),
    "lifted_structure": ("new", {"name": "lifted_structure"}, None),
    "generalized_lifted_structure": ("new", {"name": "generalized_lifted_structure"}, None),
    "tuplet_margin": ("new", {"name": "tuplet_margin"}, None),
    "angular": ("new", {"name": "angular"}, None),
    "nca": ("new", {"name": "nca"}, None),
    "snr_contrastive": ("new", {"name": "snr_contrastive"}, None),
    "fastap": ("new", {"name": "fastap"}, None),
    "smooth_ap": ("new", {"name": "smooth_ap"}, None),
    "histogram": ("new", {"name": "histogram"}, None),
    "pnp": ("new", {"name": "pnp"}, None),
    "triplet+triplet_margin(semihard)": (
        "new",
        {"name": "triplet", "margin": 0.2},
        {"name": "triplet_margin", "type_of_triplets": "semihard", "margin": 0.2},
    ),
}


def config(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    _, loss, miner = LOSSES[name]
    train = {
        "seed": seed,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "grad_clip": 10.0,
        "scheduler": "none",
        "embedding_size": 128,
        "head_init": "random",
        "pooling": "avgmax",
        "val_fraction": 0.25,
        "val_split": "classes",
        "eval_batch_size": 128,
        "num_workers": 2,
        "freeze_backbone": True,
        "feature_cache": True,
        "cache_views": args.views,
        "cache_dir": args.cache_dir,
    }
    cfg = {
        "dataset": {"name": "cub200", "root": args.data_root},
        "backbone": {"name": "efficientnet_lite0", "pretrained": True},
        "sampler": {"name": "m_per_class", "m": 4},
        "loss": dict(loss),
        "train": train,
    }
    if miner:
        cfg["miner"] = dict(miner)
    return cfg


def run_one(args: argparse.Namespace, name: str, seed: int, console: Console) -> dict[str, Any]:
    reg = get_registry()
    cfg, _ = resolve(config(args, name, seed), reg)
    out_dir = Path(args.runs) / f"{name.replace('+', '_').replace('(', '_').replace(')', '')}-s{seed}"
    steps_per_epoch = len(Trainer(cfg, reg, out_dir, console=Console(quiet=True)).sampler)
    cfg["train"]["epochs"] = max(1, round(args.steps / steps_per_epoch))
    trainer = Trainer(cfg, reg, out_dir, console=console)
    start = time.perf_counter()
    trainer.fit()
    res = trainer.results
    return {
        "loss": name,
        "family": LOSSES[name][0],
        "seed": seed,
        "steps": trainer.step,
        "best_epoch": res["best_epoch"],
        "val_map_at_r": res["best_value"],
        "precision_at_1": res["test"]["precision_at_1"],
        "map_at_r": res["test"]["map_at_r"],
        "seconds": round(time.perf_counter() - start, 1),
        "budget": {"steps": args.steps, "views": args.views},
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["loss"] for r in rows):
        sel = [r for r in rows if r["loss"] == name]
        row: dict[str, Any] = {"loss": name, "family": sel[0]["family"], "seeds": len(sel)}
        for k in ("val_map_at_r", "precision_at_1", "map_at_r", "best_epoch"):
            vals = [r[k] for r in sel]
            row[k] = statistics.mean(vals)
            row[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--views", type=int, default=1, help="augmentation views cached per training image")
    ap.add_argument("--cache-dir", default="", help="feature cache folder (default ~/.cache/dmlkit/features)")
    ap.add_argument("--runs", default="runs/catalogue_bench")
    ap.add_argument("--out", default="catalogue_bench.json")
    args = ap.parse_args()
    console = Console(quiet=True)
    log = Path(args.out).with_suffix(".jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    budget = {"steps": args.steps, "views": args.views}
    rows = [r for r in rows if r.get("budget", budget) == budget]  # rows of another budget are not mixed in
    done = {(r["loss"], r["seed"]) for r in rows}
    for name in args.losses:
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            row = run_one(args, name, seed, console)
            rows.append(row)
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [r for r in rows if r["loss"] in args.losses and r["seed"] in args.seeds]
    table = summarise(rows)
    print(f"{'loss':34} {'family':6} {'val MAP@R':>10} {'test P@1':>17} {'test MAP@R':>17}")
    for t in table:
        print(
            f"{t['loss']:34} {t['family']:6} {t['val_map_at_r']:10.4f} {t['precision_at_1']:.4f} ± "
            f"{t['precision_at_1_sd']:.4f} {t['map_at_r']:.4f} ± {t['map_at_r_sd']:.4f}"
        )
    save({**machine(), "args": vars(args), "runs": rows, "summary": table}, args.out)


if __name__ == "__main__":
    main()
