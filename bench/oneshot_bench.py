"""20-way 1-shot accuracy on Omniglot's evaluation characters for a model trained with each
main loss (the one-shot protocol of Koch, Zemel, Salakhutdinov 2015; their figure: about 92 %).

    python bench/oneshot_bench.py --data-root ../shared/data/omniglot --epochs 30      # GPU budget
    python bench/oneshot_bench.py --data-root ../shared/data/omniglot --epochs 1       # CPU, small budget
    python bench/oneshot_bench.py --quick                                             # digits, 5-way

The Omniglot set-up of bench/accuracy_bench.py (Conv-4, 56 px, 128-d, batches of 64 classes x
4), trained on the 964 background characters with a quarter of them held out for validation;
the epoch is chosen on validation MAP@R (validation's episodes are drawn across all its characters:
no alphabet keeps 20 of them), and the model of that epoch embeds the test split (the
659 evaluation characters) once. The ``nway_kshot`` evaluator scores those embeddings by 1,000
20-way 1-shot episodes (seed 0, with a 95 % interval) under both protocols: each episode within
one alphabet (Lake's task, on which Koch et al. report, the evaluator's default on Omniglot) and
across all evaluation characters (dmlkit 0.1's episodes); a loss with a learned ``similarity``
(siamese) is also scored by it, as Koch et al. score, besides the Euclidean distance.
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
            run_dir = Path(tmp) / name.replace(" ", "_")
            _, wall, results = train(over, run_dir)
            for row in protocols(run_dir, base["evaluator"]):
                row = {"loss": name, "epochs": args.epochs, "best_epoch": results["best_epoch"], **row}
                row["run_test_nway_accuracy"] = results["test"]["nway_accuracy"]  # the run's own evaluation
                row["wall_s"] = round(wall, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    save({**machine(), "dataset": "digits" if args.quick else "omniglot", "rows": rows}, args.out)


def protocols(run_dir: Path, options: dict) -> list[dict]:
    """The test metrics of the run's chosen epoch under each protocol: episodes within one group
    (where the split has groups) and across all classes, each scored by distance and, where the
    loss has one, by its learned similarity; the test split is embedded once."""
    from dmlkit.contract import loss_similarity
    from dmlkit.train import load_run
    from dmlkit_plugins.reading_list import NWayKShotEvaluator

    trainer = load_run(run_dir, "best")
    emb, labels = trainer.embed(trainer.test_split, "embedding the test images")
    groups, similarity = trainer.test_split.groups, loss_similarity(trainer.loss)
    options = {k: v for k, v in options.items() if k != "name"}
    rows = []
    for within in ("auto", "all") if groups is not None else ("all",):
        for scoring in ("distance", "similarity") if similarity is not None else ("distance",):
            ev = NWayKShotEvaluator(**options, episodes_within=within, scoring=scoring, retrieval=scoring == "distance")
            out = ev(emb, labels, groups=groups, similarity=similarity)
            rows.append(
                {
                    "episodes": "within a group (alphabet)" if out["nway_within_groups"] else "across all classes",
                    "scoring": "distance" if scoring == "distance" else "learned similarity",
                    f"{options['n_way']}way_1shot": out["nway_accuracy"],
                    "ci95": out["nway_ci95"],
                    "precision_at_1": out.get("precision_at_1"),
                    "map_at_r": out.get("map_at_r"),
                }
            )
    return rows


if __name__ == "__main__":
    main()
