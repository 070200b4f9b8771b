"""A run directory's safety rules: one writer at a time (:class:`RunLock`), and a failed new run
that leaves nothing behind. Files are replaced whole by :mod:`dmlkit.fileio`; ``best.pt`` is kept
equal to the recorded best epoch by :func:`dmlkit.checkpoint.best_checkpoint`.

Test hook: ``DMLKIT_CRASH_AT=POINT:EPOCH`` makes the training process end at once
(``os._exit(137)``, as a SIGKILL would: no clean-up runs) at one checkpoint write point of
epoch EPOCH. POINT is ``before`` (before last.pt is written), ``between`` (last.pt written,
best.pt not yet) or ``after`` (both written, metrics.jsonl not yet). It exists for
``tests/test_fuzz.py``'s crash-injection test; nothing else should set it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

from dmlkit.checkpoint import best_checkpoint
from dmlkit.errors import DmlkitError
from dmlkit.fileio import short as _short
from dmlkit.fileio import writable_error, write_text

__all__ = [
    "CRASH_ENV",
    "RunLock",
    "best_checkpoint",
    "check_crash_env",
    "crash_point",
    "held",
    "writable_error",
    "write_text",
]

CRASH_ENV = "DMLKIT_CRASH_AT"
CRASH_POINTS = ("before", "between", "after")
LOCK_NAME = ".lock"

#: Run directories this process holds the lock of (resolved path -> [open lock file, depth]).
_HELD: dict[Path, list[Any]] = {}


def crash_point(point: str, epoch: int) -> None:
    """End the process here if ``$DMLKIT_CRASH_AT`` names this write point and epoch (a test hook)."""
    if os.environ.get(CRASH_ENV, "") == f"{point}:{epoch}":
        os._exit(137)


def check_crash_env() -> None:
    """A malformed ``$DMLKIT_CRASH_AT`` is refused rather than silently ignored."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return
    point, _, epoch = spec.partition(":")
    if point not in CRASH_POINTS or not epoch.isdigit():
        raise DmlkitError(
            f"{CRASH_ENV}={spec!r} is not POINT:EPOCH with POINT one of {', '.join(CRASH_POINTS)} (a test hook); unset it"
        )


def _open_lock(path: Path) -> Any:
    """``RUN/.lock`` opened for appending without blocking (a FIFO in its place would make ``open``
    wait for a reader for ever); anything but a regular file there is refused."""
    import stat

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.ELOOP, errno.EISDIR):
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return os.fdopen(fd, "a")
    if fd is not None:
        os.close(fd)
    raise DmlkitError(f"{_short(path)} is not a regular file (dmlkit's lock file); remove it and run again")


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for as long as the ``with`` block runs.

    A second process that wants to write the run (train, --resume) is refused at once. The
    kernel releases the lock when its holder ends, however it ends, so a crashed or killed run
    never leaves the directory locked. The empty ``.lock`` file stays (removing it would let two
    processes lock two different files). Taking a lock this process already holds nests.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.created_dir = self.created_lock = False

    def __enter__(self) -> RunLock:
        import fcntl

        key = self.run_dir.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        try:
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise DmlkitError(f"run directory {_short(self.run_dir)} is a file; pick another --run-dir")
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self.created_dir = True
            if not os.access(self.run_dir, os.W_OK | os.X_OK):
                read_only = os.statvfs(self.run_dir).f_flag & os.ST_RDONLY
                raise OSError(errno.EROFS if read_only else errno.EACCES, "not writable", str(self.run_dir))
            self.created_lock = not (self.run_dir / LOCK_NAME).exists()
            f = _open_lock(self.run_dir / LOCK_NAME)
        except OSError as exc:
            self._remove_created()
            raise writable_error(self.run_dir, exc, "to run directory") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise DmlkitError(
                f"{_short(self.run_dir)} is in use by another dmlkit process (training or resuming it); "
                "wait for it to end, or pick another --run-dir"
            ) from None
        _HELD[key] = [f, 1]
        return self

    def __exit__(self, *exc: Any) -> None:
        key = self.run_dir.resolve()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            held[0].close()  # releases the flock

    def _remove_created(self) -> None:
        if self.created_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.created_dir = False

    def discard_if_empty_run(self) -> None:
        """After a failure before the first checkpoint: remove what this run created, so that a
        failed run leaves no half-made run directory (a directory that existed keeps its files)."""
        if (self.run_dir / "last.pt").exists():
            return
        for name in (LOCK_NAME, "last.pt.tmp", "best.pt.tmp", "metrics.jsonl.tmp", "config.toml.tmp"):
            if name != LOCK_NAME or self.created_lock:
                (self.run_dir / name).unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.run_dir.rmdir()  # only if empty
            except OSError:
                pass


def held(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _HELD
