"""A run directory's figures: ``loss.png`` and ``metrics.png`` over epochs, redrawn after each epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmlkit.fileio import save_figure

#: Metrics drawn in metrics.png, when the run logs them.
CURVES = ("val_precision_at_1", "val_map_at_r", "val_accuracy", "precision_at_1", "map_at_r", "r_precision")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg back end (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict[str, Any]], run_dir: Path, best_epoch: int | None = None) -> None:
    """loss.png and (when metrics were logged) metrics.png, titled with the run's name, integer
    epochs on the x axis, the chosen epoch marked."""
    plt = pyplot()
    name = Path(run_dir).name
    fig, ax = plt.subplots(figsize=(5, 3.2))
    pts = [(h["epoch"], h["loss"]) for h in history if h.get("loss") is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o")
    _axes(ax, f"{name}: training loss", "training loss", best_epoch)
    fig.tight_layout()
    save_figure(fig, run_dir / "loss.png")
    plt.close(fig)
    curves = [(k, [(h["epoch"], h[k]) for h in history if isinstance(h.get(k), int | float)]) for k in CURVES]
    curves = [(k, pts) for k, pts in curves if pts]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, pts in curves:
        ax.plot(*zip(*pts, strict=True), marker="o", label=k if k.startswith("val_") else f"test {k}")
    _axes(ax, f"{name}: metrics", "metric", best_epoch)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, run_dir / "metrics.png")
    plt.close(fig)


def _axes(ax: Any, title: str, ylabel: str, best_epoch: int | None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"chosen epoch {best_epoch}")
