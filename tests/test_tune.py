"""dmlkit tune: trials on class-disjoint validation folds, never the test set; resumable; best.toml trains."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from dmlkit.train import Trainer

SPACE = """\
[dataset]
name = "digits"
train_classes = 8

[backbone]
name = "smallcnn"
channels = 16
blocks = 2

[train]
epochs = 2
batch_size = 32
num_workers = 0

[tune]
trials = 4
folds = 2

[tune.space]
"train.lr" = { low = 1e-4, high = 1e-2, log = true }
train.embedding_size = { choices = [16, 32, 64] }
"""


def trials(study):
    return json.loads((study / "trials.json").read_text())


def test_four_trials_score_on_validation_folds_and_never_read_the_test_set(cli, tmp_path, monkeypatch):
    seen = []
    embed = Trainer.embed

    def watched(self, split, what="embedding"):
        assert split is not self.test_split, "a trial embedded the test set"
        seen.append((len(split), self.settings["folds"], self.settings["fold"]))
        return embed(self, split, what)

    monkeypatch.setattr(Trainer, "embed", watched)
    monkeypatch.setattr(Trainer, "final_test", lambda self: pytest.fail("a trial ran the final test"))
    (tmp_path / "space.toml").write_text(SPACE)
    study = tmp_path / "study"
    code, out, err = cli("tune", str(tmp_path / "space.toml"), "--study", str(study))
    assert code == 0, err
    rows = trials(study)
    assert [r["state"] for r in rows] == ["complete"] * 4
    for r in rows:
        assert len(r["folds"]) == 2 and r["value"] == pytest.approx(sum(r["folds"]) / 2)
        assert 1e-4 <= r["params"]["train.lr"] <= 1e-2 and r["params"]["train.embedding_size"] in (16, 32, 64)
        # each fold's score is the validation value its own run selected its best epoch by
        for fold, value in enumerate(r["folds"]):
            lines = (study / r["dir"] / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()
            assert value == max(json.loads(line)["val_map_at_r"] for line in lines)
            assert not (study / r["dir"] / f"fold{fold}" / "results.json").exists()
    # both folds validate on training classes only: 8 classes, 4 held out each time, disjoint
    assert {(f, k) for _, f, k in seen} == {(2, 0), (2, 1)}
    best_row = max(rows, key=lambda r: r["value"])
    best = tomllib.loads((study / "best.toml").read_text())
    assert best["train"]["lr"] == pytest.approx(best_row["params"]["train.lr"])
    assert best["train"]["embedding_size"] == best_row["params"]["train.embedding_size"]
    assert "tune" not in best and best["dataset"] == {"name": "digits", "train_classes": 8}
    assert f"trial {best_row['number']}" in (study / "best.toml").read_text()
    monkeypatch.undo()
    # the best config trains as it is (and only this run reads the test set)
    code, _, err = cli("train", "--config", str(study / "best.toml"), "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert (tmp_path / "r" / "results.json").is_file()
    # a finished study runs nothing more; --trials 5 adds exactly one trial
    code, _, err = cli("tune", str(tmp_path / "space.toml"), "--study", str(study), "--trials", "5")
    assert code == 0, err
    assert [r["state"] for r in trials(study)] == ["complete"] * 5
    assert len({json.dumps(r["params"], sort_keys=True) for r in trials(study)}) == 5


def test_a_killed_search_resumes_and_finishes(tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    study = tmp_path / "study"
    argv = [sys.executable, "-m", "dmlkit", "tune", str(tmp_path / "space.toml"), "--study", str(study)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 300
    # kill it in the middle of trial 1: its first fold's run has a checkpoint, its trial is not finished
    while not (study / "trials" / "0001" / "fold0" / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [r["state"] for r in trials(study)] == ["complete"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "cut short by a kill" in done.stdout
    rows = trials(study)
    states = [r["state"] for r in rows]
    assert states.count("complete") == 4 and states.count("killed") == 1
    killed = next(r for r in rows if r["state"] == "killed")
    retry = next(r for r in rows if r.get("retry_of") == killed["number"])
    assert retry["params"] == killed["params"] and retry["dir"] == killed["dir"] and retry["state"] == "complete"
    assert (study / "best.toml").is_file()


def test_bad_spaces_fail_before_any_trial(cli, tmp_path, monkeypatch):
    base = SPACE.split("[tune.space]")[0] + "[tune.space]\n"
    cases = {
        '"loss.marg" = { low = 0.1, high = 0.5 }': "loss.marg",
        '"train.lr" = { low = 0.1, high = 0.01 }': "low must be below high",
        '"train.lr" = { low = 0.0, high = 0.01, log = true }': "low > 0",
        '"train.lr" = { lo = 0.1, hi = 0.5 }': "not a range",
        '"train.folds" = { choices = [2, 4] }': "sets train.folds itself",
        '"train.embedding_size" = { choices = [16, -3] }': "embedding_size",
        '"train.lr" = 0.1': "not a range",
    }
    for line, message in cases.items():
        (tmp_path / "bad.toml").write_text(base + line + "\n")
        code, _, err = cli("tune", str(tmp_path / "bad.toml"), "--study", str(tmp_path / "s"))
        assert code == 1 and message in err, (line, err)
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "s").exists()
    (tmp_path / "space.toml").write_text(SPACE)
    code, _, err = cli("tune", str(tmp_path / "space.toml"), "--folds", "0")
    assert code == 1 and "folds must be an integer from 1" in err
    code, _, err = cli("tune", str(tmp_path / "space.toml"), "--metric", "loss")
    assert code == 1 and "validation" in err
    # a fold of one class cannot rank models: the search stops at once and leaves no study behind
    few = SPACE.replace("train_classes = 8", "train_classes = 5").replace("folds = 2", "folds = 3")
    (tmp_path / "few.toml").write_text(few)
    code, _, err = cli("tune", str(tmp_path / "few.toml"), "--study", str(tmp_path / "s"))
    assert code == 1 and "validate on 1 class" in err and "fewer folds" in err
    assert not (tmp_path / "s").exists()
    monkeypatch.setitem(sys.modules, "optuna", None)
    code, _, err = cli("tune", str(tmp_path / "space.toml"))
    assert code == 1 and "pip install 'dmlkit[tune]'" in err


def test_a_study_keeps_its_space_and_failed_trials_do_not_stop_it(cli, tmp_path, monkeypatch):
    import dmlkit_plugins.tune as tune

    (tmp_path / "space.toml").write_text(SPACE.replace("trials = 4", "trials = 3").replace("folds = 2", "folds = 1"))
    real = tune.run_trial
    calls = []

    def flaky(user, params, *args):
        calls.append(params)
        if len(calls) == 2:
            raise tune.DmlkitError("non-finite loss at step 3 (nan)")
        return real(user, params, *args)

    monkeypatch.setattr(tune, "run_trial", flaky)
    study = tmp_path / "study"
    code, out, err = cli("tune", str(tmp_path / "space.toml"), "--study", str(study))
    assert code == 0, err
    rows = trials(study)
    assert [r["state"] for r in rows] == ["complete", "fail", "complete"]
    assert rows[1]["error"] == "non-finite loss at step 3 (nan)" and "non-finite loss" in out
    assert all(len(r["folds"]) == 1 for r in rows if r["state"] == "complete")
    # the same study with another space is refused
    (tmp_path / "space.toml").write_text(SPACE.replace("trials = 4", "trials = 3"))
    code, _, err = cli("tune", str(tmp_path / "space.toml"), "--study", str(study))
    assert code == 1 and "another config, space, folds or metric" in err
