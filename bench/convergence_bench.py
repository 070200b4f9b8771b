"""Test P@1 against epochs and wall time: ProxyNCA (plain and with ProxyNCA++ options) versus
triplet loss with semi-hard mining; epochs and seconds to reach a P@1 threshold, and a plot.

    python bench/convergence_bench.py --quick                  # digits, CPU, 6 epochs
    python bench/convergence_bench.py --data-root ../shared/data/omniglot --epochs 30 --png conv.png

The ProxyNCA paper claims about 3x faster convergence than triplet losses; measured with PML on
Omniglot, triplet + semi-hard reached P@1 0.80 after 5 epochs and ProxyNCA after 7-8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from accuracy_bench import SETUPS, _merge  # noqa: E402
from common import machine, save, train  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "ProxyNCA (scale 1, proxy lr x1)": {"loss": {"name": "proxynca", "scale": 1.0, "proxy_lr_multiplier": 1.0}},
    "ProxyNCA++ (scale 3, proxy lr x100)": {"loss": {"name": "proxynca", "scale": 3.0}},
    "ProxyNCA++ + class-mean proxies": {"loss": {"name": "proxynca", "scale": 3.0, "proxy_init": "class_means"}},
    "triplet + semi-hard": {
        "loss": {"name": "triplet", "margin": 0.2, "squared": False},
        "miner": {"name": "semihard"},
    },
}


def first_reaching(history: list[dict[str, Any]], threshold: float) -> tuple[int | None, float | None]:
    elapsed = 0.0
    for h in history:
        elapsed += h["epoch_time_s"]
        if h.get("precision_at_1", 0) >= threshold:
            return h["epoch"], round(elapsed, 1)
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=0.80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--png", default="")
    ap.add_argument("--variants", default="", help="comma-separated indices into the variant list (default: all)")
    args = ap.parse_args()
    chosen = [list(VARIANTS)[int(i)] for i in args.variants.split(",")] if args.variants else list(VARIANTS)
    dataset = "digits" if args.quick else "omniglot"
    epochs = 6 if args.quick else args.epochs
    threshold = 0.92 if args.quick and args.threshold == 0.80 else args.threshold
    base = _merge(
        {"dataset": {"name": dataset, **({"root": args.data_root} if args.data_root else {})}, **SETUPS[dataset]},
        # a convergence curve reads the test set after every epoch: logged, never used to choose anything
        {"train": {"epochs": epochs, "seed": args.seed, "test_every_epoch": True}},
    )
    result = {**machine(), "dataset": dataset, "threshold": threshold, "curves": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            over = VARIANTS[name]
            history, _, _ = train(_merge(base, over), Path(tmp) / str(len(result["curves"])))
            epoch, seconds = first_reaching(history, threshold)
            result["curves"][name] = {
                "p_at_1": [h["precision_at_1"] for h in history],
                "epoch_time_s": [h["epoch_time_s"] for h in history],
                "epochs_to_threshold": epoch,
                "seconds_to_threshold": seconds,
            }
            print(
                f"{name:38s} P@1 by epoch {[round(h['precision_at_1'], 3) for h in history]}  "
                f"reaches {threshold} at epoch {epoch} ({seconds} s)",
                flush=True,
            )
    save(result, args.out)
    if args.png:
        plot(result, args.png)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in result["curves"].items():
        epochs = np.arange(1, len(c["p_at_1"]) + 1)
        axes[0].plot(epochs, c["p_at_1"], marker="o", label=name)
        axes[1].plot(np.cumsum(c["epoch_time_s"]), c["p_at_1"], marker="o", label=name)
    for ax, xlabel in zip(axes, ("epoch", "training time (s)"), strict=True):
        ax.axhline(result["threshold"], color="grey", linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test P@1")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['dataset']}: ProxyNCA variants vs triplet + semi-hard")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
