"""Ctrl-C (SIGINT) and SIGTERM on every long command, sent to a real ``dmlkit`` process at a moment
it is provably busy: one line ``error: interrupted`` / ``error: terminated`` (with how to resume
where something is resumable), exit 130 / 143, never 0 or -2, no traceback, and nothing
half-written.

"Provably busy" without sleeps that assume speed: ``train`` is signalled once its run directory
holds ``last.pt`` (it is then in its second of many epochs); every other command runs with a
test hook that makes the first model call (``torch.nn.Module.__call__``) touch a file and then
wait, so the signal lands in the middle of the command's work. The processes run side by side
(each waits for its own moment) to keep the file fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from reliability_helpers import image_run
from test_fuzz_tune import SPACE

#: A model call that tells the test it started (the file $DMLKIT_TEST_BUSY), then waits; with
#: $DMLKIT_TEST_SLOW_CLEANUP it also waits in its clean-up after the first signal (a second
#: signal must end the process). With $DMLKIT_TEST_AT_EXIT the command runs normally and the
#: wait happens at interpreter shutdown instead.
HOOK = """
import atexit, os, pathlib, sys, time
import torch

def wait():
    while True:
        time.sleep(0.05)

def busy(self, *args, **kwargs):
    pathlib.Path(os.environ["DMLKIT_TEST_BUSY"]).touch()
    try:
        wait()
    finally:
        if os.environ.get("DMLKIT_TEST_SLOW_CLEANUP"):
            pathlib.Path(os.environ["DMLKIT_TEST_SLOW_CLEANUP"]).touch()
            wait()

if os.environ.get("DMLKIT_TEST_AT_EXIT"):
    atexit.register(lambda: (pathlib.Path(os.environ["DMLKIT_TEST_BUSY"]).touch(), wait()))
else:
    torch.nn.Module.__call__ = busy
from dmlkit.cli import main
main()
"""


@dataclass
class Case:
    id: str
    argv: list[str]
    sig: int = signal.SIGINT
    hint: str = ""  # the line after "error: interrupted; " (or terminated)
    ready: str = "hook"  # "hook": the model call started; else a file (relative to the case folder) to wait for
    group: bool = False  # send the signal to the process group (a terminal's Ctrl-C reaches DataLoader workers too)
    env: dict[str, str] = field(default_factory=dict)
    second: bool = False  # a second signal while it cleans up after the first
    absent: list[str] = field(default_factory=list)  # paths (relative to the case folder) that must not exist after


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """An image run (for index/search), its index, a tune space of one trial."""
    res = image_run()
    space = tmp_path_factory.mktemp("signals") / "space.toml"
    space.write_text(SPACE)
    return {"run": res["run"], "data": res["data"], "idx": res["index"], "space": space}


def cases(p: dict[str, Path]) -> list[Case]:
    run, data, idx, space = str(p["run"]), str(p["data"]), str(p["idx"]), str(p["space"])
    train = ["train", "--epochs", "1000", "--sampler-opt", "batches_per_epoch=2", "--run-dir", "r"]
    out = [
        Case(
            "train-ctrl-c-with-workers",
            [*train, "--set", "num_workers=2"],
            signal.SIGINT,
            "resume it with dmlkit train --resume r",
            ready="r/last.pt",
            group=True,
        ),
        Case("train-sigterm", train, signal.SIGTERM, "resume it with dmlkit train --resume r", ready="r/last.pt"),
        Case(
            "train-sigterm-to-the-group-with-workers",  # torch's workers die of it: no traceback at shutdown
            [*train, "--set", "num_workers=2"],
            signal.SIGTERM,
            "resume it with dmlkit train --resume r",
            ready="r/last.pt",
            group=True,
        ),
        Case(
            "train-before-the-first-epoch",
            train,
            signal.SIGTERM,
            "no epoch was saved; run the command again",
            absent=["r"],
        ),
        Case(
            "second-signal-while-cleaning-up",
            ["embed", run, "--out", "emb"],
            signal.SIGINT,
            second=True,
            absent=["emb"],
        ),
        Case("signal-at-shutdown", ["list", "loss", "--json"], signal.SIGINT, env={"DMLKIT_TEST_AT_EXIT": "1"}),
    ]
    for sig in (signal.SIGINT, signal.SIGTERM):
        name = signal.Signals(sig).name.lower()
        out += [
            Case(f"mlrc-{name}", ["train", "--protocol", "mlrc", "--dataset-opt", "train_classes=8", "--epochs", "1", "--batch-size", "8", "--sampler-opt", "m=4", "--run-dir", "m"], sig,
                 "--protocol mlrc cannot resume: remove m and run the command again"),
            Case(f"evaluate-{name}", ["evaluate", run], sig),
            Case(f"embed-{name}", ["embed", run, "--out", "emb"], sig, absent=["emb"]),
            Case(f"report-{name}", ["report", run, "--out", "rep"], sig),
            Case(f"export-{name}", ["export", run, "--format", "torchscript", "--out", "exp"], sig,
                 absent=["exp"]),
            Case(f"index-{name}", ["index", run, "--images", data, "--out", "idx"], sig, absent=["idx"]),
            Case(f"search-{name}", ["search", idx, data, "--grid", "grid.png"], sig, absent=["grid.png"]),
            Case(f"tune-{name}", ["tune", space, "--study", "study"], sig,
                 f"continue the study: run the same command again (dmlkit tune {space} --study study)"),
        ]  # fmt: skip
    return out


def _start(case: Case, folder: Path) -> subprocess.Popen:
    folder.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DMLKIT_TEST_BUSY": str(folder / ".busy"), **case.env}
    if case.second:
        env["DMLKIT_TEST_SLOW_CLEANUP"] = str(folder / ".cleaning")
    argv = [sys.executable, "-m", "dmlkit", *case.argv] if case.ready != "hook" else [sys.executable, "-c", HOOK]
    if case.ready == "hook":
        argv += case.argv
    return subprocess.Popen(
        argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def _send(proc: subprocess.Popen, case: Case) -> None:
    (os.killpg if case.group else os.kill)(proc.pid, case.sig)


@pytest.fixture(scope="module")
def outcomes(prepared, tmp_path_factory) -> dict[str, tuple[Case, int, str, str, Path]]:
    """Every case run side by side (at most 6 at a time): (case, status, stdout, stderr, folder)."""
    base = tmp_path_factory.mktemp("cases")
    todo = cases(prepared)
    results: dict[str, tuple[Case, int, str, str, Path]] = {}
    running: dict[str, tuple[Case, subprocess.Popen, Path, float, str]] = {}
    while todo or running:
        while todo and len(running) < 6:
            case = todo.pop(0)
            folder = base / case.id
            running[case.id] = (case, _start(case, folder), folder, time.monotonic(), "starting")
        for cid, (case, proc, folder, since, stage) in list(running.items()):
            ready = folder / (".busy" if case.ready == "hook" else case.ready)
            if stage == "starting" and ready.exists():
                _send(proc, case)
                stage = "signalled"
            elif stage == "signalled" and case.second and (folder / ".cleaning").exists():
                _send(proc, case)
                stage = "signalled twice"
            elif proc.poll() is not None:
                out, err = proc.communicate()
                results[cid] = (case, proc.returncode, out.decode(), err.decode(), folder)
                del running[cid]
                continue
            elif time.monotonic() - since > 600:  # a bound for a loaded machine, not an assumption of speed
                proc.kill()
                out, err = proc.communicate()
                results[cid] = (case, -9, out.decode(), f"stuck at stage {stage}\n" + err.decode(), folder)
                del running[cid]
                continue
            running[cid] = (case, proc, folder, since, stage)
        time.sleep(0.05)
    return results


def _ids() -> list[str]:
    return [c.id for c in cases({k: Path(k) for k in ("run", "data", "idx", "space")})]


@pytest.mark.parametrize("case_id", _ids())
def test_a_signal_ends_the_command_in_one_line(case_id, outcomes):
    case, code, out, err, folder = outcomes[case_id]
    word = "interrupted" if case.sig == signal.SIGINT else "terminated"
    assert code == 128 + case.sig, (case_id, code, err[-3000:])
    assert "Traceback" not in out + err and "Exception ignored" not in err, (case_id, err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1] == f"error: {word}" + (f"; {case.hint}" if case.hint else ""), (case_id, err[-2000:])
    assert sum(line.startswith("error:") for line in lines) == 1, (case_id, err)
    for name in case.absent:
        assert not (folder / name).exists(), (case_id, name, "half-written output left behind")
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name], (case_id, "temporary files left behind")


def test_an_interrupted_run_resumes(outcomes, cli):
    """What the line says works: the interrupted run continues from its last checkpoint."""
    case, _, _, _, folder = outcomes["train-ctrl-c-with-workers"]
    run = folder / "r"
    import torch

    epoch = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    code, _, err = cli("train", "--resume", str(run), "--epochs", str(epoch + 1))
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epoch + 2))


def test_an_interrupted_study_continues_with_the_same_command(outcomes, prepared, cli, monkeypatch):
    _, _, _, _, folder = outcomes["tune-sigint"]
    monkeypatch.chdir(folder)
    code, out, err = cli("tune", str(prepared["space"]), "--study", "study")
    assert code == 0, err
    rows = json.loads((folder / "study" / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["killed", "complete"] and rows[1]["retry_of"] == 0
    assert rows[0]["params"] == rows[1]["params"]
