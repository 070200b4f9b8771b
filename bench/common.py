"""Shared by the training benchmarks: build and run dmlkit trainings from config overrides."""

from __future__ import annotations

import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dmlkit import get_registry
from dmlkit.config import resolve
from dmlkit.train import Trainer


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": str(date.today()),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def train(
    overrides: dict[str, Any], run_dir: Path, quiet: bool = True
) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """Train one run from defaults, the chosen components' recommendations and ``overrides``;
    returns its per-epoch records, wall time, and results (test metrics at the epoch its
    validation chose, and at the last epoch)."""
    cfg, _ = resolve(overrides, get_registry())
    trainer = Trainer(cfg, get_registry(), run_dir, console=Console(quiet=quiet))
    start = time.perf_counter()
    trainer.fit()
    return trainer.history, time.perf_counter() - start, trainer.results


def save(result: dict[str, Any], out: str) -> None:
    if out:
        Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
