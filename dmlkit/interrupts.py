"""Ctrl-C (SIGINT) and SIGTERM in a dmlkit command: one line, exit 130 or 143, and how to resume.

:func:`install` (``dmlkit.cli.main`` calls it first) replaces Python's handlers of both signals
in the dmlkit process. The first signal raises :class:`Interrupted` in the main thread. It is a
``BaseException`` and not a ``KeyboardInterrupt``: no ``except Exception`` of dmlkit, a plugin
or a library swallows it, and typer's own handling (which turns a ``KeyboardInterrupt`` into a
*returned* 130 when the app runs with ``standalone_mode=False``) never sees it. Whatever
exception then leaves the command (a DataLoader's "worker exited", an error raised while
cleaning up), :func:`received` says the command was stopped by a signal, and the CLI reports
that and nothing else.

A forked child of the process (a DataLoader worker) that receives the signal ends at once with
status 0 and prints nothing: its parent is stopping too, and a worker that ended by a signal or
with an error would make torch raise in the parent. A second signal in the parent, while it is
cleaning up after the first, ends the process at once with the same line and status.

Code that must not be cut between two steps (two renames that swap a folder) runs inside
:func:`deferred`: a signal that arrives there is raised when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a dmlkit command ran."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return WORDS.get(self.signum, f"signal {self.signum}")


class _State:
    def __init__(self) -> None:
        self.pid: int | None = None  # the process that installed the handlers
        self.previous: dict[int, Any] = {}
        self.received: int | None = None
        self.deferred = 0
        self.reported = False
        self.closing = False  # the command is over: a signal now only changes the exit status
        self.hints: list[Callable[[], str]] = []
        self.abandoned: list[threading.Thread] = []
        self.quieted: dict[str, Any] = {}  # what _quiet_shutdown replaced


_state = _State()


def install() -> None:
    """Handle SIGINT and SIGTERM in this process from now on (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    global _state
    previous = _state.previous if _state.pid == os.getpid() else {}
    _state = _State()
    _state.pid = os.getpid()
    for sig in SIGNALS:
        _state.previous[sig] = previous.get(sig, signal.getsignal(sig))
        signal.signal(sig, _handle)


def restore() -> None:
    """Put back the handlers that :func:`install` replaced (for a caller that runs ``main`` in-process)."""
    if _state.pid != os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in _state.previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if _state.quieted:  # a signal arrived during an in-process call: undo what stopping changed
        import sys

        sys.unraisablehook = _state.quieted["unraisablehook"]
        if "SIGCHLD" in _state.quieted:
            signal.signal(signal.SIGCHLD, _state.quieted["SIGCHLD"] or signal.SIG_DFL)
    _state.previous = {}
    _state.pid = None


def closing() -> None:
    """The command is over (its status is chosen): a signal from now on, while Python shuts down,
    prints the line and ends the process with its status instead of raising there."""
    _state.closing = True


def abandon(thread: threading.Thread) -> None:
    """A thread that may still run native code when the command ends (a model call that ran past its
    time limit, or was interrupted): :func:`leave` then ends the process without Python's shutdown,
    which would abort (``terminate called without an active exception``) while such a thread runs."""
    _state.abandoned.append(thread)


def leave(code: int, in_process: bool) -> None:
    """End the command with ``code``: return when it is 0, else ``sys.exit``; but ``os._exit`` after
    flushing the output when a thread given to :func:`abandon` still runs (and this is the dmlkit
    process, not a caller's)."""
    import sys

    if not in_process and any(t.is_alive() for t in _state.abandoned):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def note(signum: int) -> None:
    """Record ``signum`` as the signal that stopped the command (an :class:`Interrupted` raised by code)."""
    if _state.received is None:
        _state.received = signum


def received() -> int | None:
    """The signal that stopped the command, if one did."""
    return _state.received


def status(signum: int) -> int:
    """The exit status of a command stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def hint(make: Callable[[], str] | str) -> None:
    """What to tell the user after an interrupt (``make`` is called then: it can look at what is on disk)."""
    _state.hints.append(make if callable(make) else lambda: make)


def resumable_run(run_dir: Path, protocol: str = "single") -> None:
    """The hint of ``dmlkit train``: resume the run if it has a checkpoint, else start it again."""

    def text() -> str:
        if protocol == "mlrc":
            return f"--protocol mlrc cannot resume: remove {run_dir} and run the command again"
        if (Path(run_dir) / "last.pt").is_file():
            return f"resume it with dmlkit train --resume {run_dir}"
        return "no epoch was saved; run the command again"

    hint(text)


def message() -> str:
    """``interrupted`` or ``terminated``, and the hints registered by the command."""
    word = WORDS.get(_state.received or signal.SIGINT, "interrupted")
    hints = []
    for make in _state.hints:
        try:
            text = make()
        except Exception:  # a hint must never hide the interrupt
            text = ""
        if text:
            hints.append(text)
    return "; ".join([word, *hints])


def report(print_line: Callable[[str], None]) -> int:
    """Print the one line (once) and return the exit status."""
    if not _state.reported:
        _state.reported = True
        print_line(message())
    return status(_state.received or signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run a block that must not be cut: a signal that arrives inside it is raised at its end."""
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if not _state.deferred and _state.received is not None and not _state.reported:
        raise Interrupted(_state.received)


def _handle(signum: int, frame: Any) -> None:
    if os.getpid() != _state.pid:  # a forked child (DataLoader worker): its parent stops too
        os._exit(0)
    if _state.received is not None or _state.closing:  # a second signal while stopping, or one at exit
        _state.received = _state.received or signum
        if not _state.reported:
            _state.reported = True
            with contextlib.suppress(OSError):
                os.write(2, f"error: {message()}\n".encode(errors="replace"))
        os._exit(status(_state.received))
    _state.received = signum
    _quiet_shutdown()
    if _state.deferred:
        return
    raise Interrupted(signum)


def _quiet_shutdown() -> None:
    """The process is stopping: DataLoader workers that a group-wide signal ended must not make
    torch's SIGCHLD handler raise while it cleans up, and an error in a ``__del__`` at interpreter
    shutdown (a DataLoader iterator's) must not print a traceback under the one line."""
    import sys

    _state.quieted = {"unraisablehook": sys.unraisablehook}
    if hasattr(signal, "SIGCHLD"):
        with contextlib.suppress(ValueError, OSError):
            _state.quieted["SIGCHLD"] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.unraisablehook = lambda unraisable: None
