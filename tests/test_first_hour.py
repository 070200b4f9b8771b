"""What a new user sees outside a terminal (a log file, nohup, CI), and what the logs record (issue 31)."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run_dmlkit(*args, env=None, cwd=None):
    """``dmlkit`` as a real process whose output is a pipe (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "dmlkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "COLUMNS": "80", **(env or {})},
        timeout=600,
    )


def test_outside_a_terminal_every_phase_reports_progress_and_nothing_is_cut(tmp_path):
    """With progress lines due at every update (DMLKIT_PROGRESS_EVERY=0), each epoch and each embedding
    phase prints count/total lines; the epoch summary is one line, never cut at 80 columns."""
    out = run_dmlkit(
        "train", "--epochs", "2", "--set", "test_every_epoch=true", "--run-dir", str(tmp_path / "r"),
        env={"DMLKIT_PROGRESS_EVERY": "0"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for epoch in (1, 2):
        progress = [x for x in lines if x.startswith(f"epoch {epoch}/2: ") and " steps (" in x]
        assert progress and "/s" in progress[0]  # count, percentage, rate
        (summary,) = [x for x in lines if x.startswith(f"epoch {epoch}/2: loss ")]
        assert "val MAP@R" in summary and summary.endswith(" s") and "R@8" in summary and len(summary) > 80  # not cut
    assert any(x.startswith("embedding the test images: ") and "images" in x for x in lines)
    assert not any("…" in x for x in lines)


def test_outside_a_terminal_a_short_run_prints_few_lines(tmp_path):
    """Phases shorter than the progress interval print nothing and each epoch one line: a log of many
    epochs does not flood (the interval is set high so that a slow machine prints the same)."""
    out = run_dmlkit("train", "--epochs", "4", "--run-dir", str(tmp_path / "r"), env={"DMLKIT_PROGRESS_EVERY": "3600"})
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if not x.startswith("embedding ")]  # a slow one reports its end
    assert len([x for x in lines if x.startswith("epoch ")]) == 4
    assert len(lines) <= 4 + 8  # the epochs, the banner and the summary


def test_the_logged_lr_is_the_rate_the_epoch_trained_at(cli, tmp_path):
    code, _, err = cli("train", "--epochs", "3", "--lr", "0.002", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    cosine = [0.002 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]  # epoch 1 trains at e = 0
    assert [r["lr"] for r in rows] == pytest.approx(cosine)


def test_the_summary_shows_the_evaluators_own_metric(cli, tmp_path):
    code, out, err = cli(
        "train", "--epochs", "1", "--evaluator", "nway_kshot", "--evaluator-opt", "n_way=5", "--evaluator-opt",
        "episodes=50", "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert f"N-way accuracy {results['test']['nway_accuracy']:.4f}" in out
    assert "val N-way acc" in out  # the epoch line


def test_every_option_of_every_builtin_component_has_help():
    """`dmlkit show` prints a help text for every option of the built-ins (docstring Args sections)."""
    from dmlkit import get_registry

    empty = [
        f"{kind} {spec.name}: {option}"
        for kind, spec in get_registry()
        if spec.distribution == "dmlkit"
        for option, text in spec.option_help().items()
        if not text.strip()
    ]
    assert not empty, empty
