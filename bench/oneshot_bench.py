"""20-way 1-shot accuracy on Omniglot's evaluation characters for a model trained with each
main loss (the one-shot protocol of Koch, Zemel, Salakhutdinov 2015; their figure: about 92 %).

    python bench/oneshot_bench.py --data-root ../shared/data/omniglot --epochs 30      # GPU budget
    python bench/oneshot_bench.py --data-root ../shared/data/omniglot --epochs 1       # CPU, small budget
    python bench/oneshot_bench.py --quick                                             # digits, 5-way

The Omniglot set-up of bench/accuracy_bench.py (Conv-4, 56 px, 128-d, batches of 64 classes x
4), trained on the 964 background characters with a quarter of them held out for validation;
the epoch is chosen on validation MAP@R and the test split (the 659 evaluation characters) is
read once there, by the ``nway_kshot`` evaluator: 20-way 1-shot episodes drawn from all
evaluation characters (the paper draws each episode within one alphabet, which is harder),
1,000 episodes, seed 0, with a 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, train  # noqa: E402

LOSSES = {
    "proxynca": {"loss": {"name": "proxynca"}},
    "triplet+semihard": {"loss": {"name": "triplet", "margin": 0.2, "squared": False}, "miner": {"name": "semihard"}},
    "contrastive (C2)": {"loss": {"name": "contrastive"}},
    "multi_similarity": {"loss": {"name": "multi_similarity"}, "miner": {"name": "multi_similarity"}},
    "siamese": {"loss": {"name": "siamese"}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--losses", default="", help="comma-separated names (default: all)")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not args.quick and not args.data_root:
        ap.error("pass --data-root (Omniglot in torchvision's layout) or --quick")
    n_way = 5 if args.quick else 20
    if args.quick:
        base = {"train": {"epochs": args.epochs, "batch_size": 64}}
    else:
        base = {
            "dataset": {"name": "omniglot", "root": args.data_root},
            "backbone": {"name": "smallcnn", "image_size": 56},
            "sampler": {"name": "m_per_class", "m": 4},
            "train": {"epochs": args.epochs, "batch_size": 256, "embedding_size": 128, "scheduler": "none",
                      "val_fraction": 0.25, "num_workers": 2},
        }  # fmt: skip
    base["evaluator"] = {"name": "nway_kshot", "n_way": n_way, "k_shot": 1, "episodes": args.episodes}
    wanted = args.losses.split(",") if args.losses else list(LOSSES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            over = {**base, **LOSSES[name]}
            _, wall, results = train(over, Path(tmp) / name.replace(" ", "_"))
            test = results["test"]
            row = {
                "loss": name,
                "epochs": args.epochs,
                "best_epoch": results["best_epoch"],
                "selected_by": results["selected_by"],
                f"{n_way}way_1shot": test["nway_accuracy"],
                "ci95": test["nway_ci95"],
                "precision_at_1": test["precision_at_1"],
                "map_at_r": test["map_at_r"],
                "wall_s": round(wall, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    save({**machine(), "dataset": "digits" if args.quick else "omniglot", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
