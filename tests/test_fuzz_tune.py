"""dmlkit tune fed bad spaces, flags, study folders and journals: each ends with exit 1 or 2 and
one ``error:`` line, no traceback, and (for everything refused before the first trial) no file
created, changed or removed. Then what issue 25 found, each as it happened: a study folder that
lost its journal (its trial folders must not give new settings old scores), a journal cut by a kill
mid-write, a journal whose ``dir`` leads out of the study, a trial folder of other settings, a
trial stopped by an internal error, and FIFOs in the study (real processes, under a time limit).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from reliability_helpers import Proc, bad_input_case, one_error_line, run_processes
from test_fuzz import _main, snapshot

BASE = """\
[dataset]
name = "digits"
train_classes = 8

[train]
epochs = 1
num_workers = 0

[sampler]
name = "m_per_class"
batches_per_epoch = 2
"""
TUNE = '[tune]\ntrials = 1\nfolds = 1\n\n[tune.space]\n"train.lr" = { low = 1e-4, high = 1e-2, log = true }\n'
SPACE = BASE + "\n" + TUNE


def space_with(
    tune: str = "", dims: str = '"train.lr" = { low = 1e-4, high = 1e-2, log = true }', base: str = BASE
) -> str:
    """A space file: ``base``, then [tune] with trials = 1 and folds = 1 unless ``tune`` sets them."""
    settings = {"trials": "trials = 1", "folds": "folds = 1"}
    if tune:
        settings[tune.split("=")[0].strip()] = tune
    return f"{base}\n[tune]\n" + "\n".join(settings.values()) + f"\n\n[tune.space]\n{dims}\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    """A finished study of one trial (one fold), and its space file."""
    base = tmp_path_factory.mktemp("tune")
    (base / "space.toml").write_text(SPACE)
    code, _, err = _main("tune", str(base / "space.toml"), "--study", str(base / "study"))
    assert code == 0, err
    return {"space": base / "space.toml", "study": base / "study"}


@dataclass
class Ctx:
    dir: Path
    study: dict[str, Path]

    def space(self, text: str) -> str:
        (self.dir / "s.toml").write_text(text)
        return str(self.dir / "s.toml")

    def tune(self, text: str, *extra: str) -> list[str]:
        return ["tune", self.space(text), "--study", str(self.dir / "st"), *extra]

    def copy(self) -> Path:
        shutil.copytree(self.study["study"], self.dir / "st")
        shutil.copy(self.study["space"], self.dir / "s.toml")
        return self.dir / "st"

    def rerun(self, *extra: str) -> list[str]:
        return ["tune", str(self.dir / "s.toml"), "--study", str(self.dir / "st"), *extra]

    def journal(self, append: bytes | None = None, replace: bytes | None = None) -> list[str]:
        st = self.copy()
        if replace is not None:
            (st / "journal.log").write_bytes(replace)
        if append is not None:
            with open(st / "journal.log", "ab") as f:
                f.write(append)
        return self.rerun("--trials", "2")


def _dim(spec: str, name: str = "train.lr") -> Callable[[Ctx], list[str]]:
    return lambda c: c.tune(space_with(dims=f'"{name}" = {spec}'))


def _tune(line: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.tune(space_with(tune=line))


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    match: str = ""


def _running_trial(c: Ctx, params: dict | None = None, **attrs: object) -> list[str]:
    """The study copy with one more trial left running (as a kill leaves it): of ``params`` if
    given, with user attrs ``attrs``."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = c.copy()
    storage = JournalStorage(JournalFileBackend(str(st / "journal.log")))
    s = optuna.load_study(study_name="dmlkit", storage=storage)
    if params is not None:
        s.enqueue_trial(params)
    trial = s.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    return c.rerun("--trials", "2")


# fmt: off
CASES = [
    # --- the space file ---------------------------------------------------------------------------
    Case("space-missing", lambda c: ["tune", str(c.dir / "none.toml")], "config file not found"),
    Case("space-folder", lambda c: ["tune", str(c.dir)], "config file not found"),
    Case("space-binary", lambda c: ["tune", c.space("\x00\xff".encode("latin-1").decode("latin-1"))], "not valid TOML"),
    Case("space-not-toml", lambda c: ["tune", c.space("[tune\n")], "not valid TOML"),
    Case("space-deep", lambda c: ["tune", c.space("a = " + "[" * 3000 + "]" * 3000)], "nests tables or arrays"),
    Case("space-empty", lambda c: ["tune", c.space("")], "no [tune.space]"),
    Case("tune-not-table", lambda c: c.tune("tune = 5\n" + BASE), "[tune] must be a table"),
    Case("tune-unknown-key", _tune("trails = 3"), "unknown [tune] key(s) trails"),
    Case("trials-zero", _tune("trials = 0"), "tune trials must be an integer from 1"),
    Case("trials-negative", _tune("trials = -5"), "tune trials must be an integer from 1"),
    Case("trials-string", _tune('trials = "3"'), "tune trials must be an integer"),
    Case("trials-float", _tune("trials = 2.5"), "tune trials must be an integer"),
    Case("trials-bool", _tune("trials = true"), "tune trials must be an integer"),
    Case("trials-huge", _tune("trials = 1000000000"), "tune trials must be an integer from 1 to 100,000"),
    Case("folds-zero", _tune("folds = 0"), "tune folds must be an integer from 1"),
    Case("folds-huge", _tune("folds = 101"), "tune folds must be an integer from 1 to 100"),
    Case("folds-more-than-classes", _tune("folds = 5"), "validate on 1 class"),
    Case("seed-negative", _tune("seed = -1"), "tune seed must be an integer from 0"),
    Case("seed-huge", _tune("seed = 4294967296"), "tune seed must be an integer from 0 to 4,294,967,295"),
    Case("seed-float", _tune("seed = 1.5"), "tune seed must be an integer"),
    Case("seed-string", _tune('seed = "x"'), "tune seed must be an integer"),
    Case("sampler", _tune('sampler = "grid"'), "tune sampler must be tpe or random"),
    Case("metric-number", _tune("metric = 5"), "tune metric must be a metric's name"),
    Case("metric-loss", _tune('metric = "loss"'), "metric 'loss' is the training loss"),
    Case("metric-unknown", _tune('metric = "nope"'), "cannot train"),
    Case("space-not-table", lambda c: c.tune(BASE + "[tune]\nspace = 5\n"), "[tune.space] must be a table"),
    # --- dimensions -------------------------------------------------------------------------------
    Case("dim-value", _dim("0.1"), "is not a range"),
    Case("dim-list", _dim("[0.1, 0.2]"), "is not a range"),
    Case("dim-low-above-high", _dim("{ low = 0.1, high = 0.01 }"), "low must be below high"),
    Case("dim-low-equals-high", _dim("{ low = 0.1, high = 0.1 }"), "low must be below high"),
    Case("dim-nan", _dim("{ low = nan, high = 0.1 }"), "must be finite numbers"),
    Case("dim-inf", _dim("{ low = 0.0001, high = inf }"), "must be finite numbers"),
    Case("dim-minus-inf", _dim("{ low = -inf, high = 0.1 }"), "must be finite numbers"),
    Case("dim-string-bounds", _dim('{ low = "a", high = "b" }'), "low and high must both be numbers"),
    Case("dim-bool-bounds", _dim("{ low = false, high = true }"), "low and high must both be numbers"),
    Case("dim-only-low", _dim("{ low = 0.1 }"), "low and high must both be numbers"),
    Case("dim-log-zero", _dim("{ low = 0.0, high = 0.1, log = true }"), "a log range needs low > 0"),
    Case("dim-log-word", _dim('{ low = 0.001, high = 0.1, log = "yes" }'), "log must be true or false"),
    Case("dim-step-zero", _dim("{ low = 0.001, high = 0.1, step = 0 }"), "step must be a positive number"),
    Case("dim-step-zero-float", _dim("{ low = 0.001, high = 0.1, step = 0.0 }"), "step must be a positive number"),
    Case("dim-step-negative", _dim("{ low = 0.001, high = 0.1, step = -0.01 }"), "step must be a positive number"),
    Case("dim-step-inf", _dim("{ low = 0.001, high = 0.1, step = inf }"), "step must be a positive number"),
    Case("dim-step-nan", _dim("{ low = 0.001, high = 0.1, step = nan }"), "step must be a positive number"),
    Case("dim-step-string", _dim('{ low = 0.001, high = 0.1, step = "0.01" }'), "step must be a positive number"),
    Case("dim-step-too-big", _dim("{ low = 0.001, high = 0.1, step = 1.0 }"), "larger than the range"),
    Case("dim-step-and-log", _dim("{ low = 0.001, high = 0.1, step = 0.01, log = true }"), "log and step cannot be combined"),
    Case("dim-unknown-key", _dim("{ low = 0.001, high = 0.1, steps = 2 }"), "unknown key(s) steps"),
    Case("dim-choices-empty", _dim("{ choices = [] }"), "choices must be a non-empty list"),
    Case("dim-choices-string", _dim('{ choices = "adam" }'), "choices must be a non-empty list"),
    Case("dim-choices-table", _dim("{ choices = [{ a = 1 }] }"), "choices must be numbers, strings or booleans"),
    Case("dim-choices-and-low", _dim("{ choices = [1], low = 1 }"), "cannot be mixed"),
    Case("dim-no-section", _dim("{ low = 0.001, high = 0.1 }", "lr"), "name a section and an option"),
    Case("dim-fixed-folds", _dim("{ choices = [2, 4] }", "train.folds"), "sets train.folds itself"),
    Case("dim-fixed-selection", _dim('{ choices = ["last"] }', "train.selection"), "sets train.selection itself"),
    Case("dim-unknown-option", _dim("{ low = 0.1, high = 0.5 }", "loss.marg"), "loss.marg"),
    Case("dim-unknown-section", _dim("{ low = 0.1, high = 0.5 }", "lss.margin"), "lss.margin"),
    Case("dim-bad-choice", _dim("{ choices = [16, -3] }", "train.embedding_size"), "embedding_size"),
    Case("dim-lr-too-high", _dim("{ low = 0.001, high = 1000.0 }"), "'lr' must be <= 10"),
    Case("dim-batch-too-big", _dim("{ choices = [32, 100000000] }", "train.batch_size"), "batch_size"),
    Case("dim-m-too-big", _dim("{ low = 2, high = 1000 }", "sampler.m"), "cannot train"),
    Case("dim-classes-too-few", _dim("{ choices = [8, 2] }", "dataset.train_classes"), "'dataset.train_classes' = 2 cannot train"),
    Case("base-bad", lambda c: c.tune(space_with(base=BASE.replace("epochs = 1", "epochs = 0"))), "'epochs' must be > 0"),
    # --- flags ------------------------------------------------------------------------------------
    Case("flag-trials-zero", lambda c: c.tune(SPACE, "--trials", "0"), "tune trials must be an integer from 1"),
    Case("flag-trials-word", lambda c: c.tune(SPACE, "--trials", "many"), "Invalid value"),
    Case("flag-folds-zero", lambda c: c.tune(SPACE, "--folds", "0"), "tune folds must be"),
    Case("flag-metric-loss", lambda c: c.tune(SPACE, "--metric", "loss"), "is the training loss"),
    Case("flag-unknown", lambda c: c.tune(SPACE, "--trails", "2"), "No such option"),
    Case("flag-study-5000", lambda c: ["tune", c.space(SPACE), "--study", "x" * 5000], ""),
    # --- study folders ------------------------------------------------------------------------------
    Case("study-is-file", lambda c: ["tune", c.space(SPACE), "--study", str(c.dir / "s.toml")], "is a file"),
    Case("study-holds-user-files", lambda c: (c.dir / "st").mkdir() or (c.dir / "st" / "notes.txt").write_text("mine") and c.tune(SPACE), "holds other files"),
    Case("study-other-space", lambda c: c.copy() and ["tune", c.space(SPACE.replace("1e-2", "2e-2")), "--study", str(c.dir / "st")], "another config, space, folds or metric"),
    Case("study-other-folds", lambda c: c.copy() and c.rerun("--folds", "2"), "another config, space, folds or metric"),
    Case("study-json-damaged", lambda c: c.copy().joinpath("study.json").write_text("{oops") and c.rerun(), "study.json is damaged"),
    Case("study-json-list", lambda c: c.copy().joinpath("study.json").write_text("[]") and c.rerun(), "study.json is damaged"),
    Case("study-json-folder", lambda c: _replace_with_folder(c.copy() / "study.json") and c.rerun(), "study.json is damaged"),
    Case("study-lost-journal", lambda c: c.copy().joinpath("journal.log").unlink() or c.rerun("--trials", "2"), "is damaged, not new"),
    Case("study-empty-journal", lambda c: c.copy().joinpath("journal.log").write_bytes(b"") or c.rerun("--trials", "2"), "is damaged, not new"),
    Case("journal-garbage-line", lambda c: c.journal(replace=(c.study["study"] / "journal.log").read_bytes() + b"{oops}\n" + b'{"op_code": 0}\n'), "damaged at line"),
    Case("journal-not-records", lambda c: c.journal(replace=b"[1, 2]\n"), "damaged at line 1"),
    Case("journal-binary", lambda c: c.journal(replace=os.urandom(200).replace(b"\n", b" ") + b"\n"), "damaged at line 1"),
    Case("journal-unknown-record", lambda c: c.journal(replace=b'{"op_code": 99, "worker_id": "x"}\n'), "journal.log is damaged"),
    Case("journal-dir-escapes", lambda c: _running_trial(c, dir="../../outside"), "names the folder '../../outside'"),
    Case("journal-dir-absolute", lambda c: _running_trial(c, dir="/tmp"), "names the folder '/tmp'"),
    Case("journal-dir-number", lambda c: _running_trial(c, dir=5), "names the folder 5"),
]
# fmt: on


def _replace_with_folder(path: Path) -> Path:
    path.unlink()
    path.mkdir()
    return path


def test_the_table_is_large_enough():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_with_one_line_and_changes_nothing(case, study, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    bad_input_case(cli, tmp_path / "case", lambda work: case.build(Ctx(work, study)), case.match, case.id)


# --- what issue 25 found, each as it happened ----------------------------------------------------------
def test_a_cut_journal_line_is_cut_off_and_the_study_goes_on(study, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, study)
    whole = (study["study"] / "journal.log").read_bytes()
    argv = c.journal(append=b'{"op_code": 5, "worker_id": "x", "trial_id": 1, "st')
    code, out, err = cli(*argv)
    assert code == 0, err
    assert "removed the cut last line" in out
    journal = (tmp_path / "st" / "journal.log").read_bytes()
    assert journal.startswith(whole) and all(json.loads(line) for line in journal.splitlines())
    rows = json.loads((tmp_path / "st" / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["complete", "complete"]


def test_a_trial_folder_of_other_settings_is_never_reused(study, tmp_path, cli, monkeypatch):
    """A trial left running (killed) whose folder holds another trial's settings and runs: the retry
    refuses to score the new settings with the old runs, and the folder is left as it was."""
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, study)
    argv = _running_trial(c)
    folder = tmp_path / "st" / "trials" / "0001"
    shutil.copytree(tmp_path / "st" / "trials" / "0000", folder)  # trial 0's params and finished fold
    before = snapshot(folder)
    code, out, err = cli(*argv)
    one_error_line(code, out, err, "holds the runs of other settings", "other settings")
    assert snapshot(folder) == before
    rows = json.loads((tmp_path / "st" / "trials.json").read_text())
    assert rows[0]["state"] == "complete" and all(r["state"] != "complete" for r in rows[1:])
    assert all(r["value"] is None for r in rows[1:])  # the old scores went to no new trial


def test_a_trial_stopped_by_an_internal_error_is_failed_not_killed_forever(study, tmp_path, cli, monkeypatch):
    import dmlkit_plugins.tune as tune

    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, study)
    c.copy()

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(tune, "run_trial", broken)
    code, out, err = cli(*c.rerun("--trials", "2"))
    assert code == 1 and err.startswith("error: internal error: ZeroDivisionError") and "Traceback" not in err
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    rows = json.loads((tmp_path / "st" / "trials.json").read_text())
    assert rows[1]["state"] == "fail" and "ZeroDivisionError" in rows[1]["error"]
    code, out, err = cli(*c.rerun("--trials", "2"))  # it counts as a failed trial: nothing is run again
    assert code == 0, err
    assert "cut short by a kill" not in out
    assert [r["state"] for r in json.loads((tmp_path / "st" / "trials.json").read_text())] == ["complete", "fail"]


def test_a_damaged_folds_record_is_scored_again(study, tmp_path, cli, monkeypatch):
    """A killed retry of trial 0's settings in trial 0's folder, whose folds.json is damaged: its
    finished fold run is read again (not retrained) and gives the same score."""
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, study)
    first = json.loads((study["study"] / "trials.json").read_text())[0]
    argv = _running_trial(c, first["params"], dir="trials/0000")
    folder = tmp_path / "st" / "trials" / "0000"
    (folder / "folds.json").write_text("{oops")
    checkpoint = snapshot(folder / "fold0")["last.pt"]
    code, out, err = cli(*argv)
    assert code == 0, err
    assert "folds.json is damaged; the trial's folds are scored again" in out
    rows = json.loads((tmp_path / "st" / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["complete", "killed", "complete"]
    assert rows[2]["value"] == rows[0]["value"] and rows[2]["params"] == rows[0]["params"]
    assert snapshot(folder / "fold0")["last.pt"] == checkpoint  # nothing retrained


def test_fifos_in_a_study_are_errors_not_hangs(study, tmp_path):
    procs = []
    for cid in ("journal", "ask-lock", "params"):
        work = tmp_path / cid
        work.mkdir()
        c = Ctx(work, study)
        argv = (c.copy() and c.rerun("--trials", "2")) if cid != "params" else _running_trial(c)
        st = work / "st"
        if cid == "journal":
            (st / "journal.log").unlink()
            os.mkfifo(st / "journal.log")
        elif cid == "ask-lock":
            (st / ".ask.lock").unlink(missing_ok=True)
            os.mkfifo(st / ".ask.lock")
        else:
            (st / "trials" / "0001").mkdir(parents=True)
            os.mkfifo(st / "trials" / "0001" / "params.json")
        procs.append(Proc(cid, argv, work))
    done = run_processes(procs, at_once=3)
    expected = {"journal": "not a regular file", "ask-lock": "damaged", "params": "holds the runs of other settings"}
    for cid, (code, out, err, took) in done.items():
        assert "hung" not in err, (cid, took)
        one_error_line(code, out, err, expected[cid], cid)
