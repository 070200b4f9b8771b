"""The protocol of "A Metric Learning Reality Check" (Musgrave, Belongie, Lim, ECCV 2020).

Four models, each trained with one of four class-disjoint folds of the training classes
held out for validation and selected on it; test metrics are reported per model and for
the four embeddings concatenated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dmlkit.evaluation import l2_normalise
from dmlkit.registry import Registry
from dmlkit.train import Trainer, load_checkpoint, write_json

FOLDS = 4


def run_mlrc(cfg: dict[str, Any], registry: Registry, out_dir: Path, console: Console) -> dict[str, Any]:
    """Train the fold models under ``out_dir/fold{i}`` and write ``out_dir/mlrc.json``."""
    models, embeddings = [], []
    trainer = None
    for fold in range(FOLDS):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg["train"].update(folds=FOLDS, fold=fold, val_fraction=0.0, selection="validation")
        run = out_dir / f"fold{fold}"
        console.print(f"[bold]MLRC fold {fold + 1}/{FOLDS}[/bold]: {run}")
        trainer = Trainer(fold_cfg, registry, run, console=console)
        trainer.fit()
        trainer.load_state_dict(load_checkpoint(run / "best.pt"))  # selected on its validation fold
        emb, labels = trainer.embed(trainer.test_split)
        metrics = trainer.evaluator(emb, labels, trainer.test_split.query_mask, trainer.test_split.gallery_mask)
        models.append(
            {
                "fold": fold,
                "best_epoch": trainer.best["epoch"],
                "val_map_at_r": trainer.best["value"],
                **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
            }
        )
        embeddings.append(l2_normalise(emb))
    concat = np.concatenate(embeddings, axis=1)
    split = trainer.test_split
    together = trainer.evaluator(concat, split.labels, split.query_mask, split.gallery_mask)
    result = {
        "protocol": "mlrc",
        "folds": FOLDS,
        "models": models,
        "concatenated": {
            "dim": int(concat.shape[1]),
            **{k: v for k, v in together.items() if isinstance(v, int | float)},
        },
    }
    write_json(out_dir / "mlrc.json", result)
    return result
