"""``dmlkit tune``: an Optuna search over any component's options, scored on validation only.

Each trial trains one model per class-disjoint fold of the *training* classes and is scored by
the mean of the folds' validation metric at their best epochs (as "A Metric Learning Reality
Check" and powerful-benchmarker do). The test set is never read. The study lives in one
folder: Optuna's journal, one run directory per trial and fold, ``trials.json`` and
``best.toml``, a config that ``dmlkit train --config`` reads. A killed search continues where
it stopped when the same command runs again: finished folds are kept, a cut fold resumes from
its last checkpoint.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import dmlkit
from dmlkit import interrupts
from dmlkit.config import load_toml, merge, resolve, to_toml, validate
from dmlkit.errors import DmlkitError, FoldsError, OptionError
from dmlkit.rundir import RunLock, writable_error

console = Console()

STUDY = "dmlkit"
RANGE_KEYS = {"low", "high", "log", "step"}
#: Settings the search itself decides: a space may not vary them.
FIXED = {"train.folds", "train.fold", "train.val_fraction", "train.val_split", "train.selection",
         "train.test_every_epoch", "train.run_dir", "train.best_metric"}  # fmt: skip
TUNE_DEFAULTS = {"trials": 20, "folds": 4, "metric": "", "sampler": "tpe", "seed": 0, "space": {}}


class SearchError(DmlkitError):
    """A problem of the search itself (not of one trial's settings): it stops the search."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise DmlkitError("dmlkit tune needs the optuna package: pip install 'dmlkit[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ----------------------------------------------------------------------------------- the space
def flatten_space(table: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{"train": {"lr": {low, high}}}`` or ``{"train.lr": {...}}`` -> ``{"train.lr": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if not isinstance(value, dict):
            raise OptionError(
                f"tune.space: {name} = {value!r} is not a range; write {{ low = ..., high = ... }} or {{ choices = [...] }}"
            )
        if "choices" in value or RANGE_KEYS & value.keys():
            out[name] = value
        else:
            out.update(flatten_space(value, name + "."))
    return out


def check_dimension(name: str, spec: dict[str, Any]) -> None:
    where = f"tune.space {name!r}"
    if name in FIXED:
        raise OptionError(f"{where}: dmlkit tune sets {name} itself (folds, selection on validation); leave it out")
    if len(name.split(".")) < 2:
        raise OptionError(f"{where}: name a section and an option, e.g. train.lr or loss.margin")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        choices = spec["choices"]
        if extra:
            raise OptionError(f"{where}: choices cannot be mixed with {', '.join(sorted(extra))}")
        if not isinstance(choices, list) or not choices:
            raise OptionError(f"{where}: choices must be a non-empty list")
        if any(isinstance(c, dict | list) for c in choices):
            raise OptionError(f"{where}: choices must be numbers, strings or booleans")
        return
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        raise OptionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use low, high, log, step or choices")
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    if not all(_is_number(v) for v in (low, high)):
        raise OptionError(f"{where}: low and high must both be numbers")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise OptionError(f"{where}: low and high must be finite numbers; got {low}, {high}")
    if not low < high:
        raise OptionError(f"{where}: low must be below high; got {low}, {high}")
    if not isinstance(spec.get("log", False), bool):
        raise OptionError(f"{where}: log must be true or false; got {spec['log']!r}")
    if spec.get("log") and low <= 0:
        raise OptionError(f"{where}: a log range needs low > 0; got {low}")
    if "step" in spec:
        if spec.get("log"):
            raise OptionError(f"{where}: log and step cannot be combined")
        if not _is_number(step) or not math.isfinite(step) or step <= 0:
            raise OptionError(f"{where}: step must be a positive number; got {step!r}")
        if step > high - low:
            raise OptionError(f"{where}: step {step} is larger than the range {low}..{high}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def extremes(spec: dict[str, Any]) -> list[Any]:
    """The values a dimension can take at its ends (every choice of a categorical one)."""
    if "choices" in spec:
        return list(spec["choices"])
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if step:  # the largest value on the grid low, low + step, ...
        high = low + step * math.floor((high - low) / step + 1e-9)
        if is_int(spec):
            high = int(high)
    return [low, high]


def is_int(spec: dict[str, Any]) -> bool:
    return all(isinstance(spec.get(k, 1), int) for k in ("low", "high", "step"))


def suggest(trial: Any, name: str, spec: dict[str, Any]) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    log, step = bool(spec.get("log", False)), spec.get("step")
    if is_int(spec):
        return trial.suggest_int(name, spec["low"], spec["high"], step=step or 1, log=log)
    return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), step=step, log=log)


def assign(name: str, value: Any) -> dict[str, Any]:
    """``"loss.base_options.margin", 0.2`` -> ``{"loss": {"base_options": {"margin": 0.2}}}``."""
    out: Any = value
    for part in reversed(name.split(".")):
        out = {part: out}
    return out


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    for name, value in params.items():
        cfg = merge(cfg, assign(name, value))
    return cfg


def read_space(path: Path, overrides: dict[str, Any], registry: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base run config (everything but ``[tune]``) and the tune settings, checked: every
    dimension's bounds and choices must make a valid run config."""
    user = load_toml(path)
    tune = user.pop("tune", {})
    if not isinstance(tune, dict):
        raise OptionError(f"{path}: [tune] must be a table")
    unknown = set(tune) - set(TUNE_DEFAULTS)
    if unknown:
        raise OptionError(
            f"{path}: unknown [tune] key(s) {', '.join(sorted(unknown))}; known: {', '.join(TUNE_DEFAULTS)}"
        )
    settings = {**TUNE_DEFAULTS, **tune, **{k: v for k, v in overrides.items() if v is not None}}
    if not isinstance(settings["space"], dict):
        raise OptionError(
            f'{path}: [tune.space] must be a table of ranges, e.g. "train.lr" = {{ low = 1e-4, high = 1e-2 }}; '
            f"got {settings['space']!r}"
        )
    settings["space"] = flatten_space(settings["space"])
    if not settings["space"]:
        raise OptionError(
            f'{path}: no [tune.space]; add ranges, e.g. "train.lr" = {{ low = 1e-4, high = 1e-2, log = true }}'
        )
    for key, most in (("trials", 100_000), ("folds", 100), ("seed", 2**32 - 1)):
        least = 0 if key == "seed" else 1
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
            raise OptionError(f"tune {key} must be an integer from {least} to {most:,}; got {value!r}")
    if settings["sampler"] not in ("tpe", "random"):
        raise OptionError(f"tune sampler must be tpe or random; got {settings['sampler']!r}")
    if not isinstance(settings["metric"], str):
        raise OptionError(f"tune metric must be a metric's name, e.g. map_at_r; got {settings['metric']!r}")
    for name, spec in settings["space"].items():
        check_dimension(name, spec)
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for v in values:
            try:
                resolve(with_params(user, {name: v}), registry)
            except DmlkitError as exc:
                raise OptionError(f"tune.space {name!r} = {v!r} is not a valid run setting: {exc}") from None
    cfg, _ = resolve(user, registry)
    metric = settings["metric"] or cfg["train"]["best_metric"]
    if metric == "loss":
        raise OptionError(
            "tune scores trials on validation data; metric 'loss' is the training loss: pick e.g. map_at_r"
        )
    settings["metric"] = metric
    return user, settings


def check_before_trials(user: dict[str, Any], settings: dict[str, Any], registry: Any, where: Path) -> None:
    """What a trial would find out when it starts, found before the first one (nothing is written):
    the trainer of every fold with the base settings (each fold must validate on two classes at
    least), and of the first fold with each end of each dimension (a batch size larger than the
    data, an m no class has, ...)."""
    import contextlib

    from dmlkit.folds import with_fold
    from dmlkit.train import Trainer

    quiet = Console(file=io.StringIO(), width=10_000)
    combos: list[tuple[str, dict[str, Any]]] = [("", {})]
    for name, spec in settings["space"].items():
        combos += [(f"tune.space {name!r} = {v!r}", {name: v}) for v in extremes(spec)]
    for label, params in combos:
        cfg, _ = resolve(with_params(user, params), registry)
        for fold in range(settings["folds"]) if not params else [0]:
            fold_cfg = with_fold(cfg, settings["folds"], fold, settings["metric"])
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    trainer = Trainer(validate(fold_cfg, registry), registry, where / ".check", console=quiet)
            except DmlkitError as exc:
                if isinstance(exc, FoldsError) and not label:
                    raise  # the base settings' folds: the message names the fold already
                what = label or f"fold {fold} of {settings['folds']}"
                raise OptionError(f"{what} cannot train: {one_line(str(exc))}") from None
            held_out = trainer.val_split.num_classes if trainer.val_split is not None else 0
            if held_out < 2:
                raise OptionError(
                    f"fold {fold} of {settings['folds']} validates on {held_out} class of the training set, where "
                    f"{settings['metric']} cannot tell models apart; use fewer folds, or more training classes"
                )


def one_line(text: str) -> str:
    from dmlkit.cli import one_line as line

    return line(text)


# ---------------------------------------------------------------------------------- the trials
def run_trial(
    user: dict[str, Any], params: dict[str, Any], settings: dict[str, Any], trial_dir: Path, registry: Any, say: Console
) -> list[float]:
    """Train the trial's fold models (reusing finished folds, resuming a cut one); their validation values."""
    from dmlkit.folds import fold_trainer, with_fold

    cfg, _ = resolve(with_params(user, params), registry)
    record_path = trial_dir / "folds.json"
    done = _read_folds(record_path, say)
    values = []
    for fold in range(settings["folds"]):
        if str(fold) in done:
            values.append(done[str(fold)])
            continue
        fold_cfg = with_fold(cfg, settings["folds"], fold, settings["metric"])
        trainer = fold_trainer(fold_cfg, registry, trial_dir / f"fold{fold}", say)
        held_out = trainer.val_split.num_classes if trainer.val_split is not None else 0
        if held_out < 2:
            raise SearchError(
                f"fold {fold} of {settings['folds']} validates on {held_out} class of the training set, where "
                f"{settings['metric']} cannot tell models apart; use fewer folds, or more training classes"
            )
        trainer.fit(test=False)
        value = trainer.best["value"]
        if value is None or not math.isfinite(value):
            raise DmlkitError(f"fold {fold} recorded no finite validation {settings['metric']}")
        values.append(float(value))
        done[str(fold)] = float(value)
        _write_json(record_path, done)
    return values


def _read_folds(path: Path, say: Console) -> dict[str, float]:
    """The finished folds' values; a damaged record is scored again (each fold resumes its own run)."""
    if not path.exists():
        return {}
    try:
        done = json.loads(_read_regular(path))
        if isinstance(done, dict) and all(k.isdigit() and _is_number(v) and math.isfinite(v) for k, v in done.items()):
            return done
    except (OSError, ValueError, DmlkitError):
        pass
    say.print(f"warning: {escape(str(path))} is damaged; the trial's folds are scored again", soft_wrap=True)
    return {}


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes; a FIFO or a device is refused without blocking."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DmlkitError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise writable_error(path, exc, "file") from None


def _repair_journal(path: Path, say: Console) -> None:
    """A kill in the middle of a journal write leaves a cut last line (no newline at the end);
    Optuna would append the next record to it and never read the study again. Under the journal's
    own lock, the cut line is removed and the complete lines kept; a line that is not JSON anywhere
    else is damage, reported in one line."""
    import os
    import stat

    from optuna.storages.journal import JournalFileSymlinkLock

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DmlkitError(
            f"{path} is not a regular file; the study folder is damaged: start afresh with another --study"
        )
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                data = data[:keep]
                say.print(
                    f"[yellow]warning: removed the cut last line of {escape(str(path))} (a kill while it was "
                    "written); its complete lines are kept[/yellow]",
                    soft_wrap=True,
                )
    finally:
        lock.release()
    for number, line in enumerate(data.splitlines(), 1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError("not a JSON object")
        except ValueError:
            raise DmlkitError(
                f"{path} is damaged at line {number} (not a journal record); restore it from a copy, or start afresh "
                "with another --study"
            ) from None


class _AskLock:
    """A blocking flock on STUDY/.ask.lock: one worker at a time looks for stale trials and asks."""

    def __init__(self, study_dir: Path):
        self.path = study_dir / ".ask.lock"

    def __enter__(self) -> None:
        import os
        import stat

        try:  # non-blocking open: a FIFO put there must not hang the search
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise DmlkitError(f"cannot open {self.path} ({exc.strerror}); the study folder is damaged") from None
        self.f = os.fdopen(fd, "ab")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            self.f.close()
            raise DmlkitError(f"{self.path} is not a regular file; the study folder is damaged")
        fcntl.flock(fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


class Search:
    """A study folder: its Optuna journal, trial folders, trials.json and best.toml."""

    def __init__(self, study_dir: Path, user: dict[str, Any], settings: dict[str, Any], registry: Any):
        from dmlkit.selection import metric_direction

        optuna = _optuna()
        self.optuna, self.dir, self.user, self.settings, self.registry = optuna, study_dir, user, settings, registry
        identity = {"base": user, "space": settings["space"], "folds": settings["folds"], "metric": settings["metric"]}
        if study_dir.exists() and not study_dir.is_dir():
            raise DmlkitError(f"--study {study_dir} is a file; --study names a folder")
        try:
            study_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise writable_error(study_dir, exc, "to study folder") from None
        spec_path, journal = study_dir / "study.json", study_dir / "journal.log"
        if spec_path.exists():
            try:
                known = json.loads(_read_regular(spec_path))
                if not isinstance(known, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError, DmlkitError) as exc:
                raise DmlkitError(
                    f"{spec_path} is damaged ({one_line(str(exc))}); start a new study with another --study"
                ) from None
            if known != json.loads(json.dumps(identity)):
                raise DmlkitError(
                    f"{study_dir} holds a study of another config, space, folds or metric; run it with the same "
                    "file (only --trials may change), or pick another --study"
                )
        elif journal.exists() or any(study_dir.iterdir()):
            raise DmlkitError(f"{study_dir} holds other files; pick a new or empty --study folder")
        else:
            _write_json(spec_path, identity)
        trials_dir = study_dir / "trials"
        empty = not journal.exists() or (
            journal.is_file() and journal.stat().st_size == 0
        )  # killed before its first record
        if empty and trials_dir.is_dir() and any(trials_dir.iterdir()):
            raise DmlkitError(
                f"{study_dir} is damaged, not new: it holds trial folders but no journal.log (the record of which "
                "settings each trial ran); restore journal.log to continue it, or start afresh with another --study"
            )
        if journal.exists() and not empty:
            _repair_journal(journal, console)
        self.fresh = empty  # this call starts the study
        cfg, _ = resolve(user, registry)
        evaluator = registry.build("evaluator", cfg["evaluator"]["name"], **_options(cfg["evaluator"]))
        self.direction = "minimize" if metric_direction(evaluator, settings["metric"]) == "min" else "maximize"
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.storage = JournalStorage(JournalFileBackend(str(journal)))
                if self.fresh:
                    self.study = optuna.create_study(storage=self.storage, study_name=STUDY, direction=self.direction)
                else:  # loading writes nothing: a study refused below is left as it was
                    self.study = optuna.load_study(storage=self.storage, study_name=STUDY)
                trials = self.study.get_trials(deepcopy=False)
                for t in trials:
                    self.trial_dir(t)  # a "dir" that leaves the study is damage
        except DmlkitError:
            raise
        except Exception as exc:
            raise DmlkitError(
                f"{journal} is damaged ({type(exc).__name__}: {one_line(str(exc))}); restore it from a copy, or start "
                "afresh with another --study"
            ) from None
        # a continued study draws new settings: the seed moves on by the trials it already holds
        seed = (settings["seed"] + len(trials)) % 2**32
        samplers = optuna.samplers
        self.study.sampler = (
            samplers.RandomSampler(seed) if settings["sampler"] == "random" else samplers.TPESampler(seed=seed)
        )
        self.study_id = self.storage.get_study_id_from_name(STUDY)

    def remove(self) -> None:
        """Remove what this study wrote (and its folder, if that is left empty)."""
        shutil.rmtree(self.dir / "trials", ignore_errors=True)
        for name in ("journal.log", "study.json", "trials.json", "best.toml", ".ask.lock"):
            (self.dir / name).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass

    def trial_dir(self, trial: Any) -> Path:
        """``trials/NNNN`` of the study; the journal's ``dir`` attribute can name no other place."""
        name = trial.user_attrs.get("dir", f"trials/{trial.number:04d}")
        if not isinstance(name, str) or not re.fullmatch(r"trials/\d{4,9}", name):
            raise DmlkitError(
                f"{self.dir / 'journal.log'} is damaged: trial {trial.number} names the folder {name!r}, not one of "
                "the study's trials/NNNN; restore the journal from a copy, or start afresh with another --study"
            )
        return self.dir / name

    def counted(self) -> list[Any]:
        """Trials that count towards --trials: finished, or failed by their settings (not killed)."""
        states = self.optuna.trial.TrialState
        return [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.state == states.COMPLETE or (t.state == states.FAIL and not t.user_attrs.get("killed"))
        ]

    def retry_killed(self) -> int:
        """A running trial whose folder nobody holds was killed: mark it, and queue its settings again
        (the retry reuses its folder: finished folds stay, a cut fold resumes)."""
        states = self.optuna.trial.TrialState
        retried = 0
        for t in self.study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            try:
                with RunLock(self.trial_dir(t)):
                    pass
            except DmlkitError:
                continue  # another worker runs it
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            self.storage.set_trial_user_attr(trial_id, "killed", True)
            self.storage.set_trial_state_values(trial_id, states.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.study.enqueue_trial(
                    t.params,
                    user_attrs={"dir": t.user_attrs.get("dir", f"trials/{t.number:04d}"), "retry_of": t.number},
                )
            retried += 1
        return retried

    def run(self, verbose: bool) -> None:
        states = self.optuna.trial.TrialState
        target = self.settings["trials"]
        # quiet trainers write into a buffer; their warnings (a fold with too few classes ...) are shown once
        say = console if verbose else Console(file=io.StringIO(), width=10_000)
        self.warned: set[str] = set()
        while True:
            with _AskLock(self.dir):
                retried = self.retry_killed()
                if retried:
                    console.print(
                        f"[yellow]{retried} trial(s) were cut short by a kill; their settings run again[/yellow]"
                    )
                running = len(self.study.get_trials(deepcopy=False, states=(states.RUNNING,)))
                if len(self.counted()) + running >= target:
                    break
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trial = self.study.ask()
                params = {name: suggest(trial, name, spec) for name, spec in self.settings["space"].items()}
                lock = RunLock(self.trial_dir(trial))
                lock.__enter__()
            try:
                self._one(trial, params, say, len(self.counted()) + 1, target)
            except (interrupts.Interrupted, KeyboardInterrupt):
                raise  # left running: the same command runs its settings again in its folder
            except BaseException as exc:  # not the settings' fault: recorded as failed, not as killed
                self._fail(trial, exc)
                raise
            finally:
                lock.__exit__(None, None, None)
        self.write_summary()

    def _warnings(self, say: Console) -> None:
        if isinstance(say.file, io.StringIO):
            for line in say.file.getvalue().splitlines():
                if line.startswith("warning:") and line not in self.warned:
                    self.warned.add(line)
                    console.print(f"  [yellow]{escape(line)}[/yellow]", soft_wrap=True)
            say.file.seek(0)
            say.file.truncate()

    def _fail(self, trial: Any, exc: BaseException) -> None:
        """Mark a trial that an error (not its settings) stopped as failed, with the error."""
        states = self.optuna.trial.TrialState
        try:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            if self.storage.get_trial(trial_id).state == states.RUNNING:
                text = one_line(str(exc)) if str(exc) else type(exc).__name__
                self.storage.set_trial_user_attr(trial_id, "error", f"{type(exc).__name__}: {text}")
                self.storage.set_trial_state_values(trial_id, states.FAIL)
            self.write_summary()
        except Exception:  # the original error is the one to report
            pass

    def _claim(self, trial: Any, params: dict[str, Any]) -> None:
        """A trial folder is reused only by a trial of the same settings (a retry after a kill)."""
        folder = self.trial_dir(trial)
        record = folder / "params.json"
        wanted = json.loads(json.dumps(params))
        if record.exists():
            try:
                recorded = json.loads(_read_regular(record))
            except (OSError, ValueError, DmlkitError):
                recorded = "(unreadable)"
            if recorded != wanted:
                raise SearchError(
                    f"trial folder {folder} holds the runs of other settings ({recorded}) than trial {trial.number} "
                    f"({wanted}): the study is damaged; move that folder out of the study to run the trial again"
                )
            return
        if folder.is_dir() and any(p.name != ".lock" for p in folder.iterdir()):
            raise SearchError(
                f"trial folder {folder} holds runs but no params.json, so they cannot be told to be trial "
                f"{trial.number}'s: the study is damaged; move that folder out of the study to run the trial again"
            )
        _write_json(record, params)

    def _one(self, trial: Any, params: dict[str, Any], say: Console, n: int, target: int) -> None:
        states = self.optuna.trial.TrialState
        shown = "  ".join(f"{k}={_short(v)}" for k, v in params.items())
        console.print(f"trial {trial.number} ({n}/{target}): {escape(shown)}", soft_wrap=True)
        self._claim(trial, params)
        try:
            values = run_trial(self.user, params, self.settings, self.trial_dir(trial), self.registry, say)
        except SearchError:
            self._warnings(say)
            raise
        except DmlkitError as exc:  # settings that cannot train (NaN loss, out of memory ...): the search goes on
            self._warnings(say)
            trial.set_user_attr("error", one_line(str(exc)))
            self.study.tell(trial, state=states.FAIL)
            console.print(f"  [yellow]failed: {escape(one_line(str(exc)))}[/yellow]", soft_wrap=True)
            self.write_summary()
            return
        self._warnings(say)
        score = sum(values) / len(values)
        trial.set_user_attr("folds", values)
        self.study.tell(trial, score)
        best = self.study.best_trial
        console.print(
            f"  validation {self.settings['metric']} {score:.4f} (folds {', '.join(f'{v:.4f}' for v in values)}); "
            f"best so far: trial {best.number}, {best.value:.4f}"
        )
        self.write_summary()

    def write_summary(self) -> None:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            rows.append(
                {
                    "number": t.number,
                    "state": "killed" if t.user_attrs.get("killed") else t.state.name.lower(),
                    "params": t.params,
                    "value": t.value,
                    "folds": t.user_attrs.get("folds"),
                    "error": t.user_attrs.get("error"),
                    "dir": str(self.trial_dir(t).relative_to(self.dir)),
                    **({"retry_of": t.user_attrs["retry_of"]} if "retry_of" in t.user_attrs else {}),
                }
            )
        _write_json(self.dir / "trials.json", rows)
        complete = [t for t in self.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if complete:
            best = self.study.best_trial
            header = (
                f"# dmlkit tune: trial {best.number} of {self.dir}, validation {self.settings['metric']} "
                f"{best.value:.4f}\n# (mean over {self.settings['folds']} class-disjoint fold(s) of the training "
                "classes; the test set was not read)\n# train it: dmlkit train --config <this file>\n\n"
            )
            text = header + to_toml(with_params(self.user, best.params))
            path = self.dir / "best.toml"
            try:
                path.with_suffix(".toml.tmp").write_text(text, encoding="utf-8")
                path.with_suffix(".toml.tmp").replace(path)
            except OSError as exc:
                raise writable_error(path, exc, "file") from None


def _complete(search: Search) -> list[Any]:
    return [t for t in search.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def _options(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "name"}


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tune_cmd(
    space: Annotated[
        Path, typer.Argument(help="TOML: a run config plus \\[tune] (trials, folds, metric) and \\[tune.space].")
    ],
    study: Annotated[Path | None, typer.Option(help="Study folder (default runs/tune-<file name>).")] = None,
    trials: Annotated[
        int | None, typer.Option(help="Trials the study should reach (overrides \\[tune] trials).")
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="Class-disjoint validation folds per trial (1 = one held-out share).")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="Validation metric to optimise (default train.best_metric).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show each fold's training output.")] = False,
) -> None:
    """Search hyper-parameters with Optuna on class-disjoint validation folds (never the test set);
    rerun the same command to continue a killed or finished study."""
    from dmlkit.plugins import get_host

    registry = get_host().registry
    _optuna()
    user, settings = read_space(space, {"trials": trials, "folds": folds, "metric": metric}, registry)
    study_dir = study or Path("runs") / f"tune-{space.stem}"
    check_before_trials(user, settings, registry, study_dir)
    search = Search(study_dir, user, settings, registry)
    interrupts.hint(f"continue the study: run the same command again (dmlkit tune {space} --study {study_dir})")
    try:
        search.run(verbose)
    except SearchError:
        if search.fresh and not _complete(search):  # nothing of value yet: the fixed command starts afresh
            search.remove()
        raise
    complete = _complete(search)
    if not complete:
        raise DmlkitError(f"no trial finished; see {study_dir / 'trials.json'} for each one's error")
    table = Table(title=Text(f"{study_dir}: best trials by validation {settings['metric']} (test set not read)"))
    table.add_column("trial", justify="right")
    table.add_column(settings["metric"], justify="right")
    for name in settings["space"]:
        table.add_column(name, justify="right")
    reverse = search.direction == "maximize"
    for t in sorted(complete, key=lambda t: t.value, reverse=reverse)[:10]:
        table.add_row(str(t.number), f"{t.value:.4f}", *(_short(t.params.get(n, "")) for n in settings["space"]))
    console.print(table)
    console.print(
        f"wrote {escape(str(study_dir / 'best.toml'))}; train it: dmlkit train --config {escape(str(study_dir / 'best.toml'))}"
    )


@dmlkit.hookimpl
def register_commands(app):
    app.command("tune")(tune_cmd)
