"""Models trained on class-disjoint validation folds of the training classes.

Shared by ``dmlkit train --protocol mlrc`` (the protocol of "A Metric Learning Reality Check",
Musgrave, Belongie, Lim, ECCV 2020: four models, each selected on its own held-out fold, tested
one by one and concatenated) and by ``dmlkit tune`` (each trial's score is the mean of its folds'
validation values; the test set is never read).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dmlkit import checkpoint
from dmlkit.config import validate
from dmlkit.evaluation import l2_normalise
from dmlkit.fileio import write_json
from dmlkit.registry import Registry
from dmlkit.train import Trainer

#: The MLRC protocol's folds.
MLRC_FOLDS = 4
FOLDS = MLRC_FOLDS  # the 0.1 name


def fold_settings(folds: int, fold: int, metric: str | None = None) -> dict[str, Any]:
    """One fold's validation: class-disjoint, selection on validation, no test reads during training.
    ``folds = 1``: one held-out share of the training classes (``train.val_fraction``)."""
    common: dict[str, Any] = {"selection": "validation", "test_every_epoch": False, "val_split": "classes"}
    if metric is not None:
        common["best_metric"] = metric
    if folds == 1:
        return {**common, "folds": 0, "fold": 0}
    return {**common, "folds": folds, "fold": fold, "val_fraction": 0.0}


def fold_trainer(cfg: dict[str, Any], registry: Registry, run: Path, console: Console) -> Trainer:
    """The trainer of one fold's run directory: resumed from its ``last.pt`` when a previous call was
    cut, else new with ``cfg`` (whose train section already holds the fold's settings)."""
    if (run / "last.pt").is_file():
        ckpt = checkpoint.load(run)
        trainer = Trainer(validate(ckpt["config"], registry), registry, run, console=console)
        trainer.load_state_dict(ckpt)
        return trainer
    return Trainer(validate(cfg, registry), registry, run, console=console)


def with_fold(cfg: dict[str, Any], folds: int, fold: int, metric: str | None = None) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out["train"].update(fold_settings(folds, fold, metric))
    return out


def run_mlrc(cfg: dict[str, Any], registry: Registry, out_dir: Path, console: Console) -> dict[str, Any]:
    """Train the fold models under ``out_dir/fold{i}`` and write ``out_dir/mlrc.json``: each fold
    model's validation value (under the run's ``best_metric``) and test metrics at the epoch its
    validation chose, and the test metrics of the concatenated embeddings."""
    models, embeddings = [], []
    trainer = None
    for fold in range(MLRC_FOLDS):
        run = out_dir / f"fold{fold}"
        console.print(f"[bold]MLRC fold {fold + 1}/{MLRC_FOLDS}[/bold]: {run}", markup=True, highlight=False)
        trainer = fold_trainer(with_fold(cfg, MLRC_FOLDS, fold), registry, run, console)
        trainer.fit()
        trainer.load_state_dict(checkpoint.load(checkpoint.best_checkpoint(run, repair=False)))
        emb, labels = trainer.embed(trainer.test_split)
        split = trainer.test_split
        metrics = trainer.evaluator(emb, labels, split.query_mask, split.gallery_mask)
        best = trainer.best
        models.append(
            {
                "fold": fold,
                "best_epoch": best["epoch"],
                "best_metric": best["metric"],
                "val_value": best["value"],
                f"val_{best['metric']}": best["value"],
                **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
            }
        )
        embeddings.append(l2_normalise(emb))
    assert trainer is not None
    concat = np.concatenate(embeddings, axis=1)
    split = trainer.test_split
    together = trainer.evaluator(concat, split.labels, split.query_mask, split.gallery_mask)
    result = {
        "protocol": "mlrc",
        "folds": MLRC_FOLDS,
        "best_metric": trainer.best["metric"],
        "models": models,
        "concatenated": {
            "dim": int(concat.shape[1]),
            **{k: v for k, v in together.items() if isinstance(v, int | float)},
        },
    }
    write_json(out_dir / "mlrc.json", result)
    return result
