"""Compare runs: a summary table, metric and Recall@K curves, and a retrieval grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.errors import DmlkitError

SUMMARY = ("precision_at_1", "map_at_r", "r_precision", "nmi", "ami")


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's name, resolved config and per-epoch records."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DmlkitError(f"{run_dir} is not a run directory: it has no metrics.jsonl")
    history = []
    try:
        text = metrics.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DmlkitError(f"{metrics} is not UTF-8 text; the file is damaged") from None
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DmlkitError(f"{metrics} line {n} is not JSON; the file is damaged") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise DmlkitError(f"{metrics} line {n} is not an epoch record; the file is damaged")
        history.append(row)
    if not history:
        raise DmlkitError(f"{metrics} is empty: the run finished no epoch")
    import tomllib

    config_file = run_dir / "config.toml"
    try:
        config = tomllib.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DmlkitError(f"{config_file} is not valid TOML ({exc}); the file is damaged") from None
    if any(not isinstance(config.get(k, {}), dict) for k in ("dataset", "loss", "miner")):
        raise DmlkitError(f"{config_file} is damaged: its dataset, loss and miner entries must be tables")
    results_file = run_dir / "results.json"
    results = None
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DmlkitError(f"{results_file} is not JSON; the file is damaged") from None
        if not isinstance(results, dict) or not all(k in results for k in ("best_epoch", "selected_by", "test")):
            raise DmlkitError(f"{results_file} is not a dmlkit results file; the file is damaged")
    return {"name": run_dir.name, "dir": run_dir, "config": config, "history": history, "results": results}


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The run's components, the epoch its own selection chose, and the test metrics there.

    A run's results.json (written when training ends) holds the test metrics at the epoch
    chosen on validation data (or the last epoch). A run without one (unfinished, or written
    by dmlkit < 0.2) is summarised at its last evaluated epoch, and says so: its best epoch
    was chosen on the test set, which this report does not repeat.
    """
    cfg = run["config"]
    row: dict[str, Any] = {
        "run": run["name"],
        "dataset": cfg.get("dataset", {}).get("name", "?"),
        "loss": cfg.get("loss", {}).get("name", "?"),
        "miner": cfg.get("miner", {}).get("name", "") or "-",
        "epochs": run["history"][-1]["epoch"],
        "train_time_s": round(sum(h.get("epoch_time_s", 0.0) for h in run["history"]), 1),
    }
    results = run.get("results")
    if results:
        row.update(best_epoch=results["best_epoch"], selected_by=results["selected_by"])
        metrics = results["test"]
    else:
        evaluated = [h for h in run["history"] if "map_at_r" in h]
        if not evaluated:
            raise DmlkitError(
                f"run {run['name']} has no results.json and no test metrics: it has not finished; "
                f"`dmlkit evaluate {run['dir']}` measures its checkpoint"
            )
        metrics = evaluated[-1]
        row.update(best_epoch=metrics["epoch"], selected_by="last evaluated epoch (no results.json)")
    row.update({k: metrics[k] for k in SUMMARY if k in metrics})
    row.update({k: metrics[k] for k in metrics if k.startswith("recall_at_")})
    return row


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[dict[str, Any]], out: Path) -> Path:
    """P@1 and MAP@R against epochs, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("precision_at_1", "map_at_r"), strict=True):
        for run in runs:
            pts = [(h["epoch"], h[key]) for h in run["history"] if key in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=run["name"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "metric_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recall_at_k(rows: list[dict[str, Any]], out: Path) -> Path:
    """Recall@K against K (log scale) at each run's best epoch."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for row in rows:
        ks = sorted(int(k.removeprefix("recall_at_")) for k in row if k.startswith("recall_at_"))
        ax.plot(ks, [row[f"recall_at_{k}"] for k in ks], marker="o", label=row["run"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "recall_at_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def retrieval_grid(trainer: Any, out: Path, name: str, queries: int = 6, top_k: int = 5, seed: int = 0) -> Path:
    """Random test queries (left) and their top-k neighbours, framed green (same class) or red."""
    from dmlkit.evaluation import knn, l2_normalise

    split = trainer.test_split
    emb, labels = trainer.embed(split)
    emb = l2_normalise(emb)
    q_idx = np.flatnonzero(split.query_mask) if split.query_mask is not None else np.arange(len(labels))
    g_idx = np.flatnonzero(split.gallery_mask) if split.gallery_mask is not None else None
    chosen = np.random.default_rng(seed).choice(q_idx, min(queries, len(q_idx)), replace=False)
    nn = knn(emb[chosen], None if g_idx is None else emb[g_idx], top_k, backend="faiss") if g_idx is not None else None
    if nn is None:  # leave-one-out: search everything, drop the query itself
        full = knn(emb, None, top_k, backend="faiss")
        neighbours = full.indices[chosen]
    else:
        neighbours = g_idx[nn.indices]
    plt = _plt()
    fig, axes = plt.subplots(len(chosen), top_k + 1, figsize=(1.6 * (top_k + 1), 1.7 * len(chosen)), squeeze=False)
    for r, q in enumerate(chosen):
        for c, item in enumerate([q, *neighbours[r]]):
            ax = axes[r][c]
            ax.imshow(_picture(split.items[item]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "black" if c == 0 else ("green" if labels[item] == labels[q] else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if c else 1)
            if r == 0:
                ax.set_title("query" if c == 0 else f"#{c}", fontsize=9)
    fig.tight_layout()
    path = out / f"retrieval_{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _picture(item: Any) -> np.ndarray:
    if isinstance(item, str | Path):
        from dmlkit.data import load_image

        return np.asarray(load_image(item, "RGB"))
    arr = np.asarray(item, dtype=np.float32)
    return arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
