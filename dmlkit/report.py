"""Compare runs: a summary table and PNG figures (per-epoch curves, Recall@K, retrieval grids).

A run is a run directory (metrics.jsonl, config.toml, results.json, best.pt) or a ``--protocol
mlrc`` directory (mlrc.json and one run directory per fold). The self-contained HTML page is
written by :mod:`dmlkit.report_html` from the same runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.errors import DmlkitError

SUMMARY = ("precision_at_1", "map_at_r", "r_precision", "nmi", "ami")
#: The metrics drawn per epoch, with their short names.
CURVES = {"precision_at_1": "P@1", "map_at_r": "MAP@R"}


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's name, resolved config and per-epoch records; an mlrc directory's folds and mlrc.json."""
    if (run_dir / "mlrc.json").is_file():
        return _load_mlrc(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        if (run_dir / "fold0").is_dir():
            raise DmlkitError(
                f"{run_dir} is an unfinished --protocol mlrc run: it has fold directories but no mlrc.json; "
                f"report one fold with `dmlkit report {run_dir / 'fold0'}`"
            )
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
    results = _read_json(run_dir / "results.json")
    if results is not None and not all(k in results for k in ("best_epoch", "selected_by", "test")):
        raise DmlkitError(f"{run_dir / 'results.json'} is not a dmlkit results file; the file is damaged")
    return {"name": run_dir.name, "dir": run_dir, "config": config, "history": history, "results": results}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DmlkitError(f"{path} is not JSON; the file is damaged") from None
    if not isinstance(data, dict):
        raise DmlkitError(f"{path} is not a dmlkit results file; the file is damaged")
    return data


def _load_mlrc(run_dir: Path) -> dict[str, Any]:
    """An mlrc directory: mlrc.json (the concatenated test metrics) and its fold runs."""
    mlrc = _read_json(run_dir / "mlrc.json")
    models = mlrc.get("models")
    if (
        mlrc.get("protocol") != "mlrc"
        or not isinstance(mlrc.get("concatenated"), dict)
        or not isinstance(models, list)
        or not models
        or not all(isinstance(m, dict) and isinstance(m.get("fold"), int) for m in models)
    ):
        raise DmlkitError(f"{run_dir / 'mlrc.json'} is not a dmlkit mlrc.json; the file is damaged")
    folds = []
    for m in models:
        fold_dir = run_dir / f"fold{m['fold']}"
        if not (fold_dir / "metrics.jsonl").is_file():
            raise DmlkitError(f"{run_dir / 'mlrc.json'} names fold {m['fold']}, but {fold_dir} is not a run directory")
        fold = load_run(fold_dir)
        fold["name"] = f"{run_dir.name}/fold{m['fold']}"
        folds.append(fold)
    return {
        "name": run_dir.name,
        "dir": run_dir,
        "protocol": "mlrc",
        "mlrc": mlrc,
        "folds": folds,
        "config": folds[0]["config"],
    }


def curve_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose epochs are drawn: each plain run, and each fold of an mlrc run."""
    return [part for run in runs for part in run.get("folds", [run])]


def chosen_epoch(run: dict[str, Any]) -> int | None:
    """The epoch a plain run's selection chose (results.json), or None when it has no results.json."""
    return run["results"]["best_epoch"] if run.get("results") else None


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The run's components, the epoch its own selection chose, and the test metrics there.

    A run's results.json (written when training ends) holds the test metrics at the epoch
    chosen on validation data (or the last epoch). A run without one (unfinished, or written
    by dmlkit < 0.2) is summarised at its last evaluated epoch, and says so: its best epoch
    was chosen on the test set, which this report does not repeat. An mlrc run is summarised
    by the test metrics of its fold models' concatenated embeddings (mlrc.json), with one
    summary per fold under ``folds``.
    """
    cfg = run["config"]
    row: dict[str, Any] = {
        "run": run["name"],
        "dataset": cfg.get("dataset", {}).get("name", "?"),
        "loss": cfg.get("loss", {}).get("name", "?"),
        "miner": cfg.get("miner", {}).get("name", "") or "-",
    }
    if run.get("protocol") == "mlrc":
        folds = [summary(f) for f in run["folds"]]
        concat = run["mlrc"]["concatenated"]
        metric = run["mlrc"].get("best_metric") or cfg.get("train", {}).get("best_metric", "map_at_r")
        row.update(
            protocol="mlrc",
            epochs=max(f["epochs"] for f in folds),
            train_time_s=round(sum(f["train_time_s"] for f in folds), 1),
            best_epoch=", ".join(str(f.get("best_epoch", "?")) for f in folds),
            selected_by=f"each fold by validation {metric}; {concat.get('dim', '?')}-d concatenation",
            selection_split="val",
        )
        metrics = concat
    else:
        row.update(
            epochs=run["history"][-1]["epoch"],
            train_time_s=round(sum(h.get("epoch_time_s", 0.0) for h in run["history"]), 1),
        )
        results = run.get("results")
        if results:
            row.update(
                best_epoch=results["best_epoch"],
                selected_by=results["selected_by"],
                selection_split=results.get("selection_split", "?"),
            )
            if "wall_time_s" in results:  # with set-up, feature cache, validation and test (runs since 0.2)
                row["wall_time_s"] = results["wall_time_s"]
            metrics = results["test"]
        else:
            evaluated = [h for h in run["history"] if "map_at_r" in h]
            if not evaluated:
                raise DmlkitError(
                    f"run {run['name']} has no results.json and no test metrics: it has not finished; "
                    f"`dmlkit evaluate {run['dir']}` measures its checkpoint"
                )
            last = evaluated[-1]  # an epoch record: only its test metrics, not its loss, lr or val_ values
            metrics = {k: v for k, v in last.items() if k in SUMMARY or k.startswith("recall_at_")}
            row.update(
                best_epoch=last["epoch"],
                selected_by="last evaluated epoch (no results.json)",
                selection_split="test",
            )
    row.update({k: metrics[k] for k in SUMMARY if k in metrics})
    # every other metric too (Recall@K, an evaluator's own), counts such as "queries" left out
    row.update({k: v for k, v in metrics.items() if isinstance(v, float) and k not in row})
    if run.get("protocol") == "mlrc":
        row["folds"] = folds
    return row


def shown_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """The test metrics the report shows for a run: results.json's (mlrc.json's concatenated for mlrc)."""
    if run.get("protocol") == "mlrc":
        return run["mlrc"]["concatenated"]
    if run.get("results"):
        return run["results"]["test"]
    return next(h for h in reversed(run["history"]) if "map_at_r" in h)


def epoch_series(run: dict[str, Any], metric: str) -> tuple[str, list[tuple[int, float]]]:
    """A plain run's per-epoch values of ``metric`` (``loss``: the training loss): its validation
    values (``val_`` keys) when it logged any, else the test values of runs that tested every epoch.
    Returns (split, points), the split ``train`` for the loss."""
    keys = [("train", "loss")] if metric == "loss" else [("val", f"val_{metric}"), ("test", metric)]
    for split, key in keys:
        pts = [(h["epoch"], float(h[key])) for h in run["history"] if isinstance(h.get(key), int | float)]
        if pts:
            return split, pts
    return "", []


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int) -> Path:
    """Save and close a figure through a temporary file and a rename (a failed write leaves the old one)."""
    from dmlkit.rundir import writable_error

    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise writable_error(path, exc, "figure") from None
    finally:
        _plt().close(fig)
    return path


def _names(runs: list[dict[str, Any]], limit: int = 60) -> str:
    text = ", ".join(r["name"] if "name" in r else r["run"] for r in runs)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def curves_figure(runs: list[dict[str, Any]]) -> Any:
    """Training loss and validation P@1 and MAP@R against epochs, one line per run (per fold of an
    mlrc run), each run's chosen epoch marked with a star. A run that logged no validation metric
    but tested every epoch is drawn with its test values, labelled ``(test)``."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    parts = curve_runs(runs)
    fig, axes = plt.subplots(1, 1 + len(CURVES), figsize=(14, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [("loss", "training loss")] + [(k, f"validation {v}") for k, v in CURVES.items()]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, run in enumerate(parts):
            colour = colours[i % len(colours)]
            split, pts = epoch_series(run, key)
            if not pts:
                continue
            label = run["name"] if split in ("val", "train") else f"{run['name']} ({split})"
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, color=colour, label=label)
            best = dict(pts).get(chosen_epoch(run))
            if best is not None:
                ax.plot([chosen_epoch(run)], [best], marker="*", ms=16, ls="none", color=colour, mec="black")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run logged this per epoch", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Per-epoch curves of {_names(runs)}  (\u2605 the epoch each run chose)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(runs: list[dict[str, Any]], out: Path) -> Path:
    """metric_curves.png: :func:`curves_figure` saved in ``out``."""
    return _save(curves_figure(runs), out / "metric_curves.png", 110)


def recall_figure(rows: list[dict[str, Any]]) -> Any:
    """Recall@K against K (log scale, ticks at the Ks themselves) at each run's chosen epoch."""
    from matplotlib.ticker import FixedLocator, NullLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_ks: set[int] = set()
    for row in rows:
        ks = sorted(int(k.removeprefix("recall_at_")) for k in row if k.startswith("recall_at_"))
        if ks:
            ax.plot(ks, [row[f"recall_at_{k}"] for k in ks], marker="o", label=row["run"])
            all_ks.update(ks)
    if all_ks:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(all_ks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in sorted(all_ks)])
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run reports Recall@K", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (test)")
    ax.set_title(f"Recall@K at the chosen epoch: {_names(rows)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_recall_at_k(rows: list[dict[str, Any]], out: Path) -> Path:
    """recall_at_k.png: :func:`recall_figure` saved in ``out``."""
    return _save(recall_figure(rows), out / "recall_at_k.png", 110)


def grid_figure(examples: list[dict[str, Any]], split: Any, name: str) -> Any:
    """One row per query: the query, then its nearest test images framed green (the query's class)
    or red (another class), each titled with its class name and distance; a key for the colours."""
    from matplotlib.patches import Patch

    plt = _plt()
    cols = 1 + max(len(e["neighbours"]) for e in examples)
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.7 * cols, 1.9 * len(examples) + 0.9), squeeze=False)
    names = class_names(split)
    for row, ex in zip(axes, examples, strict=True):
        for ax in row:
            ax.axis("off")
        tiles = [(ex["query"], f"query: {names[ex['label']]}", "black")]
        for rank, (item, dist, ok) in enumerate(zip(ex["neighbours"], ex["distances"], ex["correct"]), 1):
            tiles.append((item, f"#{rank}: {names[split.labels[item]]}\nd={dist:.3f}", "green" if ok else "red"))
        for ax, (item, title, colour) in zip(row, tiles):
            ax.axis("on")
            ax.imshow(_picture(split.items[item]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if colour == "black" else 4)
            ax.set_title(title, fontsize=8, color="black" if colour == "black" else colour)
    fig.legend(
        handles=[Patch(color="green", label="same class as the query"), Patch(color="red", label="another class")],
        loc="lower center",
        ncol=2,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(f"{name}: test queries and their nearest test images (d: Euclidean distance)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def retrieval_grid(examples: list[dict[str, Any]], split: Any, out: Path, name: str) -> Path:
    """retrieval_NAME.png: :func:`grid_figure` saved in ``out`` (``/`` in an mlrc fold name becomes ``_``)."""
    return _save(grid_figure(examples, split, name), out / f"retrieval_{name.replace('/', '_')}.png", 90)


def class_names(split: Any) -> list[str]:
    """Each label's class name (the label itself when the dataset names none)."""
    names = list(getattr(split, "class_names", []) or [])
    return names if len(names) >= split.num_classes else [str(c) for c in range(split.num_classes)]


def _picture(item: Any) -> np.ndarray:
    """An item as an image array: a path read from disk (uint8), or a CHW (1xHxW) tensor moved to HWC (HxW)
    and scaled to 0..1."""
    if isinstance(item, str | Path):
        from dmlkit.data import load_image

        return np.asarray(load_image(item, "RGB"))
    arr = np.asarray(item, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.reshape(arr.shape[-2:]) if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if arr.ndim not in (2, 3):
        raise DmlkitError(f"an item of shape {tuple(np.shape(item))} is not an image (H x W or C x H x W)")
    lo, hi = float(arr.min()), float(arr.max())  # normalised tensors: their own range becomes 0..1
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
