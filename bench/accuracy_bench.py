"""Every built-in loss (and CCP variants) at a fixed budget: R@1/2/4/8, MAP@R, NMI, wall time.

    python bench/accuracy_bench.py --quick                     # digits, 3 epochs, 1 seed, CPU
    python bench/accuracy_bench.py --dataset omniglot --data-root ../shared/data/omniglot
    python bench/accuracy_bench.py --dataset cub200 --data-root ../shared/data/CUB_200_2011

Omniglot follows the losses issue's reference set-up (4-block conv net with 64 channels,
56x56 input, 128-d, batch 256 = 64 classes x 4, Adam 1e-3, random shifts, 30 epochs); CUB
uses pretrained EfficientNet-Lite0 with the fine-tuning recipe it recommends. Three seeds unless --quick.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, train  # noqa: E402

LOSSES: dict[str, dict[str, Any]] = {
    "proxynca": {"loss": {"name": "proxynca", "scale": 3.0}},
    "triplet+semihard": {"loss": {"name": "triplet", "margin": 0.2, "squared": False}, "miner": {"name": "semihard"}},
    "contrastive (C2)": {"loss": {"name": "contrastive"}},
    "contrastive (C1)": {"loss": {"name": "contrastive_cosine"}},
    "multi_similarity": {"loss": {"name": "multi_similarity"}, "miner": {"name": "multi_similarity"}},
    "ranked_list": {"loss": {"name": "ranked_list"}},
    "proxy_anchor": {"loss": {"name": "proxy_anchor"}},
    "C2-CCP": {
        "loss": {"name": "ccp", "base": "contrastive"},
        "train": {"val_fraction": 0.2, "normalize_embeddings": False},
    },
    "MS-CCP": {
        "loss": {"name": "ccp", "base": "multi_similarity"},
        "train": {"val_fraction": 0.2, "normalize_embeddings": False},
    },
}

SETUPS: dict[str, dict[str, Any]] = {
    "digits": {"train": {"epochs": 3, "batch_size": 64}},
    "omniglot": {
        "backbone": {"name": "smallcnn", "image_size": 56},
        "sampler": {"name": "m_per_class", "m": 4},
        "train": {
            "epochs": 30,
            "batch_size": 256,
            "lr": 1e-3,
            "optimizer": "adam",
            "embedding_size": 128,
            "scheduler": "none",
        },
    },
    "cub200": {  # the pretrained backbone brings its fine-tuning recipe (identity head, frozen BN, ...)
        "backbone": {"name": "efficientnet_lite0", "pretrained": True},
        "sampler": {"name": "m_per_class", "m": 4},
        "train": {"epochs": 25, "batch_size": 64},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", default="digits", choices=sorted(SETUPS))
    ap.add_argument("--data-root", default="")
    ap.add_argument("--seeds", default="")
    ap.add_argument("--losses", default="", help="comma-separated names (default: all)")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dataset = "digits" if args.quick else args.dataset
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    wanted = [w.strip() for w in args.losses.split(",") if w.strip()] or list(LOSSES)
    base = {
        "dataset": {"name": dataset, **({"root": args.data_root} if args.data_root else {})},
        **{k: v for k, v in SETUPS[dataset].items()},
    }
    if args.epochs:
        base["train"] = {**base["train"], "epochs": args.epochs}
    result = {**machine(), "dataset": dataset, "seeds": seeds, "setup": base, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            runs = []
            for seed in seeds:
                over = _merge(base, LOSSES[name])
                over["train"] = {**over.get("train", {}), "seed": seed}
                history, wall, results = train(over, Path(tmp) / f"{name}-{seed}".replace(" ", "_"))
                chosen = results["test"]  # at the epoch the validation chose (never the test set)
                runs.append(
                    {
                        "seed": seed,
                        "wall_s": round(wall, 1),
                        "best_epoch": results["best_epoch"],
                        "selected_by": results["selected_by"],
                        **{
                            k: chosen[k]
                            for k in chosen
                            if k.startswith(("recall_at_", "map_at_r", "precision_at_1", "nmi"))
                        },
                    }
                )
            row = {"loss": name, "epochs": history[-1]["epoch"], "runs": runs}
            for key in ("precision_at_1", "map_at_r"):
                vals = [r[key] for r in runs]
                row[f"{key}_mean"] = statistics.mean(vals)
                row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            result["rows"].append(row)
            print(
                f"{name:18s} P@1 {row['precision_at_1_mean']:.4f} ± {row['precision_at_1_sd']:.4f}  "
                f"MAP@R {row['map_at_r_mean']:.4f} ± {row['map_at_r_sd']:.4f}  "
                f"({len(runs)} seeds, {statistics.mean(r['wall_s'] for r in runs):.0f} s each)",
                flush=True,
            )
    save(result, args.out)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and k == "train" else v
    return out


if __name__ == "__main__":
    main()
