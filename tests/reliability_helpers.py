"""Shared by the fuzz and reliability tests of export, index, search, tune and new-plugin: one tiny
image run and its index per test process, the "one line, nothing changed" check, and a runner
that starts real ``dmlkit`` processes side by side, each under a time limit."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from test_deploy import shapes
from test_fuzz import _main, snapshot

_CACHE: dict[str, Path] = {}


def image_run() -> dict[str, Path]:
    """A run trained for one epoch on a tiny RGB image folder, and a Flat index of its test images
    (made once per test process; callers copy what they change)."""
    if not _CACHE:
        base = Path(tempfile.mkdtemp(prefix="dmlkit-reliability-"))
        atexit.register(shutil.rmtree, base, True)
        data = shapes(base / "shapes")
        run = base / "run"
        code, _, err = _main(
            "train", "--dataset", "imagefolder", "--data-root", str(data), "--backbone-opt", "in_channels=3",
            "--backbone-opt", "image_size=16", "--backbone-opt", "channels=8", "--epochs", "1", "--batch-size", "8",
            "--set", "val_fraction=0.5", "--run-dir", str(run),
        )  # fmt: skip
        assert code == 0, err
        code, _, err = _main("index", str(run), "--images", str(data / "test"), "--out", str(base / "index"))
        assert code == 0, err
        _CACHE.update(base=base, run=run, data=data, index=base / "index")
    return dict(_CACHE)


def one_error_line(code: int, out: str, err: str, match: str = "", what: object = "") -> str:
    """Assert a failure the standards allow: exit 1 or 2, one ``error:`` line, no traceback, no
    internal error, ``match`` in the line. Returns the line."""
    assert code in (1, 2), (what, code, out[-1500:], err[-1500:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, err[-3000:])
    assert "Traceback" not in out + err and "internal error" not in err, (what, err[-3000:])
    assert match in lines[0], (what, match, lines[0])
    return lines[0]


def bad_input_case(cli, work: Path, build, match: str, what: object) -> str:
    """Make ``work`` the working folder, build a case's command line in it, run it in-process and
    check the failure (:func:`one_error_line`) and that nothing in ``work`` changed. The line."""
    work.mkdir()
    os.chdir(work)
    argv = build(work)
    before = snapshot(work)
    code, out, err = cli(*argv)
    line = one_error_line(code, out, err, match, what)
    unchanged(work, before, what)
    return line


def unchanged(folder: Path, before: dict, what: object = "") -> None:
    after = snapshot(folder)
    changed = sorted(k for k in set(before) | set(after) if before.get(k, "-") != after.get(k, "-"))
    assert not changed, (what, "files created, changed or removed", changed[:10])


@dataclass
class Proc:
    """A real ``dmlkit`` process: its command line, working folder and the time it may take."""

    id: str
    argv: list[str]
    cwd: Path
    limit: float = 300.0  # seconds; a bound against hangs on a loaded machine, not a speed assumption
    env: dict[str, str] = field(default_factory=dict)


def run_processes(procs: list[Proc], at_once: int = 4) -> dict[str, tuple[int, str, str, float]]:
    """Run ``dmlkit`` processes side by side; each one's (status, stdout, stderr, seconds). A process
    past its limit is killed and gets status -9 and 'hung' on stderr."""
    todo, running, done = list(procs), {}, {}
    while todo or running:
        while todo and len(running) < at_once:
            p = todo.pop(0)
            child = subprocess.Popen(
                [sys.executable, "-m", "dmlkit", *p.argv],
                cwd=p.cwd,
                env={**os.environ, **p.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            running[p.id] = (p, child, time.monotonic())
        for pid, (p, child, since) in list(running.items()):
            took = time.monotonic() - since
            if child.poll() is not None or took > p.limit:
                hung = child.poll() is None
                if hung:
                    os.killpg(child.pid, 9)
                out, err = child.communicate()
                done[pid] = (
                    -9 if hung else child.returncode,
                    out.decode(),
                    ("hung\n" if hung else "") + err.decode(),
                    took,
                )
                del running[pid]
        time.sleep(0.05)
    return done
