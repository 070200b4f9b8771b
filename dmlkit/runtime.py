"""Where and how a run computes: the device, seeding, autocast, data-loader workers."""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager

import numpy as np
import torch

from dmlkit.errors import DmlkitError


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; a GPU asked for but absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DmlkitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DmlkitError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def worker_init(worker_id: int) -> None:
    """A data-loader worker: one thread (decoding workers must not fight the main process for
    cores) and its own seed derived from torch's."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_workers(setting: int, items: list | tuple | object) -> int:
    """``train.num_workers``, or for -1 (auto): none for in-memory arrays, up to 8 for image files."""
    if setting >= 0:
        return setting
    first = items[0] if isinstance(items, list | tuple) and items else None
    return min(8, os.cpu_count() or 1) if isinstance(first, str | os.PathLike) else 0
