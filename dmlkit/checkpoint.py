"""The checkpoint format: what ``last.pt`` and ``best.pt`` hold, how they are read and checked.

A checkpoint is a dict saved with ``torch.save`` and loaded with ``weights_only=True`` (no code
in a file ever runs). It carries its format version (a newer one than this dmlkit reads is
refused) and the identity of its run (``run_id``), so that one run's checkpoint never silently
replaces another run's files.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from dmlkit.errors import DmlkitError
from dmlkit.fileio import copy_file, short

#: Format 2 added ``run_id``; format 1 (dmlkit 0.1) checkpoints load, without an identity.
VERSION = 2

#: What every dmlkit checkpoint holds (``load`` refuses one without them).
KEYS = ("config", "epoch", "step", "model", "loss", "optimizer", "scheduler", "history", "best")


def new_run_id() -> str:
    return uuid.uuid4().hex


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (a file, or a run directory's ``last.pt``) without running code in it."""
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise DmlkitError(f"no checkpoint at {short(p)}; pass a run directory or a .pt file")
    if p.stat().st_size == 0:
        raise DmlkitError(f"checkpoint {short(p)} is empty (0 bytes): it was never written completely")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            first = "it holds Python objects other than tensors and plain data, which dmlkit never loads"
        else:
            first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise DmlkitError(f"cannot load checkpoint {short(p)} (corrupt, or not a dmlkit checkpoint): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dmlkit" or "config" not in ckpt:
        raise DmlkitError(f"{short(p)} is not a dmlkit checkpoint")
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise DmlkitError(
            f"checkpoint {short(p)} has format version {version!r}, newer than this dmlkit reads ({VERSION}); "
            "upgrade dmlkit to read it"
        )
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise DmlkitError(f"checkpoint {short(p)} is incomplete: it has no {', '.join(missing)}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["epoch"], int) or not isinstance(ckpt["best"], dict):
        raise DmlkitError(f"checkpoint {short(p)} is damaged: its config, epoch or best entry has the wrong type")
    if not isinstance(ckpt.get("run_id", ""), str):
        raise DmlkitError(f"checkpoint {short(p)} is damaged: its run_id is not a string")
    return ckpt


def run_id(ckpt: dict[str, Any]) -> str:
    """The checkpoint's run identity ("" for a format-1 checkpoint, which has none)."""
    return ckpt.get("run_id") or ""


def best_checkpoint(run_dir: Path, repair: bool, console: Any = None) -> Path:
    """The file that holds the run's recorded best epoch: ``best.pt`` (repaired from ``last.pt``
    when a kill fell between their writes), or ``last.pt``.

    ``last.pt`` records the best epoch. If ``best.pt`` holds another epoch and the recorded best
    is ``last.pt``'s own epoch, the process was killed after writing last.pt and before best.pt:
    with ``repair``, ``last.pt`` is copied over ``best.pt`` (atomically); without, ``last.pt``
    is returned. Any other disagreement is an error that says what to do.
    """
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if not last_path.is_file():
        return best_path
    last = load(last_path)
    recorded = (last.get("best") or {}).get("epoch")
    if recorded is None:  # no epoch chosen yet (no validation so far): best.pt need not exist
        return best_path if best_path.is_file() else last_path
    best = load(best_path) if best_path.is_file() else None
    if best is not None and run_id(best) != run_id(last):
        raise DmlkitError(
            f"{short(best_path)} belongs to another run than {short(last_path)}; move it away and use --checkpoint last"
        )
    best_epoch = best["epoch"] if best is not None else None
    if best_epoch == recorded:
        return best_path
    if recorded != last["epoch"]:
        raise DmlkitError(
            f"{short(best_path)} holds epoch {best_epoch} but the run's recorded best epoch is {recorded}, and "
            f"last.pt is epoch {last['epoch']}: best.pt cannot be restored; use --checkpoint last"
        )
    if not repair:
        return last_path
    copy_file(last_path, best_path, "checkpoint")
    if console is not None:
        from rich.markup import escape

        console.print(
            f"[yellow]restored {escape(short(best_path))} from last.pt: epoch {recorded} is the recorded best "
            f"(the previous run ended between the two writes; best.pt held epoch {best_epoch})[/yellow]"
        )
    return best_path
