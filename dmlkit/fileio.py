"""Files written whole or not at all: every file dmlkit writes goes through :func:`atomic_write`.

A file is written to a temporary sibling, flushed to disk (fsync) and renamed over the target,
so a crash, a kill or a full disk leaves either the old file or the new one, never half of one.
A failed write becomes one :class:`~dmlkit.errors.DmlkitError` line that names the file and the
reason (full disk, file size limit, read-only, no permission).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dmlkit.errors import DmlkitError


def short(path: Path | str, limit: int = 120) -> str:
    """A path as messages show it: shortened in the middle when it is very long."""
    text = str(path)
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2 :]


def writable_error(path: Path, exc: OSError, what: str) -> DmlkitError:
    """A one-line error for a write that failed: full disk, file size limit, read-only, no permission."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file size limit (ulimit -f) is reached",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENAMETOOLONG: "the path is too long",
    }.get(exc.errno, exc.strerror or type(exc).__name__)
    return DmlkitError(f"cannot write {what} {short(path)}: {reason}; the files written before are intact")


def temporary(path: Path, unique: bool = False) -> Path:
    """The temporary sibling :func:`atomic_write` writes ``path`` through (``unique``: one per process,
    for files that several processes may write at once, such as a shared cache)."""
    return path.with_name(path.name + (f".{os.getpid()}.tmp" if unique else ".tmp"))


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any], what: str = "file", unique: bool = False) -> None:
    """Call ``write(f)`` on a temporary sibling of ``path`` opened for binary writing, flush it to
    disk and rename it over ``path``. On any failure the temporary file is removed and ``path`` is
    left as it was; an ``OSError`` (anywhere in the chain of causes) becomes a one-line error."""
    path = Path(path)
    tmp = temporary(path, unique)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause: BaseException | None = exc  # torch's and numpy's writers wrap an OSError in their own errors
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and not isinstance(exc, DmlkitError):
            raise writable_error(path, cause, what) from None
        raise


def write_text(path: Path | str, text: str, what: str = "file") -> None:
    """Write ``text`` (UTF-8) atomically, and only if it differs from what is there (an unchanged
    file keeps its time stamp)."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        if path.is_file() and path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path, lambda f: f.write(data), what)


def write_json(path: Path | str, obj: Any, what: str = "file") -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2), what)


def save_torch(obj: Any, path: Path | str, what: str = "checkpoint", unique: bool = False) -> None:
    """``torch.save`` atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), what, unique)


def save_npy(path: Path | str, array: Any, what: str = "file") -> None:
    """``numpy.save`` atomically."""
    import numpy as np

    atomic_write(path, lambda f: np.save(f, array), what)


def save_figure(fig: Any, path: Path | str, dpi: int = 100, what: str = "figure") -> None:
    """A matplotlib figure as PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"), what)


def copy_file(source: Path | str, path: Path | str, what: str = "file") -> None:
    """Copy ``source`` over ``path`` atomically."""
    import shutil

    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f), what)
