"""Bad input of every kind, table-driven: each case ends with exit 1 or 2, one ``error:`` line on
stderr, no traceback, no "internal error", and no file of a prepared folder created, changed or
removed. The folder is the case's working directory (defaults such as ``embed --out`` land in it)
and holds a copy of a tiny trained run when the case needs one.

Also here: the crash-injection test (a kill at every checkpoint write point, then resume), two
trainers on one run directory, and what used to be silent (a plugin replacing a built-in, a
plugin that exits at import, CSV byte-order marks, 1e30 embeddings).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_distribution

from dmlkit.plugins import reset_host

TINY = ["--epochs", "1", "--sampler-opt", "batches_per_epoch=2"]  # digits, about two seconds of training
LONG = "x" * 5000


def _main(*argv: str) -> tuple[int, str, str]:
    """The CLI in-process, outside a test's capsys (for module-scoped fixtures)."""
    from dmlkit.cli import main

    reset_host()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    reset_host()
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits run of one epoch, shared by every case (each case copies it)."""
    run = tmp_path_factory.mktemp("shared") / "run"
    code, _, err = _main("train", *TINY, "--run-dir", str(run))
    assert code == 0, err
    return run


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def edit_ckpt(path: Path, fn: Callable[[dict], object]) -> Path:
    ckpt = load_ckpt(path)
    out = fn(ckpt)
    torch.save(ckpt if out is None else out, path)
    return path


def snapshot(root: Path) -> dict[str, tuple | None]:
    """Every file (mtime, size, digest) and folder under ``root``."""
    out: dict[str, tuple | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            st = p.stat()
            out[rel] = (st.st_mtime_ns, st.st_size, hashlib.sha1(p.read_bytes()).hexdigest())
        else:
            out[rel + "/"] = None
    return out


@dataclass
class Ctx:
    """What a case prepares its input in: ``dir`` (the working directory, snapshotted)."""

    dir: Path
    trained: Path
    site: Path
    add_site: Callable[[Path], None]
    monkeypatch: pytest.MonkeyPatch
    held: list = field(default_factory=list)

    def run(self, name: str = "run") -> Path:
        dst = self.dir / name
        shutil.copytree(self.trained, dst)
        return dst

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    def npy(self, name: str, array: np.ndarray) -> str:
        np.save(self.dir / name, array)
        return str(self.dir / name)

    def emb(self, array: np.ndarray, labels: np.ndarray | None = None, **masks: np.ndarray) -> list[str]:
        """``evaluate --embeddings`` arguments for these arrays."""
        n = len(array) if array.ndim else 1
        labels = np.arange(n) % 5 if labels is None else labels
        argv = ["evaluate", "--embeddings", self.npy("e.npy", array), "--labels", self.npy("l.npy", labels)]
        for flag, mask in masks.items():
            argv += [f"--{flag.replace('_', '-')}", self.npy(f"{flag}.npy", mask)]
        return argv

    def images(self, layout: dict[str, dict[str, int]], bad: str | None = None) -> Path:
        """An imagefolder root: {"train": {"a": 3}, "test": {"c": 3}} (8x8 grey PNGs); ``bad`` names a
        file (relative to the root) to write as garbage."""
        from PIL import Image

        root = self.dir / "images"
        rng = np.random.default_rng(0)
        for part, classes in layout.items():
            for cls, count in classes.items():
                (root / part / cls).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / part / cls / f"{i}.png")
        if bad:
            (root / bad).write_bytes(b"not an image")
        return root

    def csv(self, rows: list[str], header: str = "label,path,split,is_query,is_gallery", bom: bool = False) -> str:
        """A CSV dataset table and its (tiny, valid) images."""
        from PIL import Image

        folder = self.dir / "csvdata"
        folder.mkdir(exist_ok=True)
        for i in range(8):
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(folder / f"{i}.png")
        text = "\n".join([header, *rows]) + "\n"
        (folder / "t.csv").write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
        return str(folder / "t.csv")

    def plugin(self, name: str, code: str, entry: str | None = None) -> None:
        """Install a third-party plugin distribution (outside ``dir``) and load it."""
        site = self.site / name
        make_distribution(
            site, f"thirdparty-{name}", {f"thirdparty_{name}": code}, {name: entry or f"thirdparty_{name}"}
        )
        self.add_site(site)

    def lock(self, run: Path) -> None:
        """Hold RUN/.lock as another process would (a separate open file: flock conflicts)."""
        f = open(run / ".lock", "a")  # noqa: SIM115
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.held.append(f)


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    match: str = ""  # a fragment the error line must contain
    process: str = ""  # "", "plain", "ulimit", "readonly", "tmpfs": run as a real process


def tiny_train(*extra: str) -> list[str]:
    return ["train", *TINY, *extra]


def _resumable(c: Ctx, last_epoch: int = 6) -> Path:
    """A copy of the run whose last.pt is at ``last_epoch`` (six rows of history), best.pt at 1."""
    run = c.run()

    def later(ckpt):
        row = ckpt["history"][0]
        ckpt["history"] = [{**row, "epoch": e} for e in range(1, last_epoch + 1)]
        ckpt["epoch"] = last_epoch
        ckpt["config"]["train"]["epochs"] = last_epoch

    edit_ckpt(run / "last.pt", later)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, last_epoch + 1)))
    return run


def _shape(ckpt):
    key = next(k for k in ckpt["model"] if k.endswith("weight"))
    ckpt["model"][key] = torch.zeros(3, 3)


def _drop(ckpt):
    ckpt["model"].pop(next(iter(ckpt["model"])))


def _extra(ckpt):
    ckpt["model"]["surplus.weight"] = torch.zeros(2)


ARGPARSE_PLUGIN = """
import argparse
argparse.ArgumentParser(prog="theirs").parse_args(["--not-an-option"])  # exits with status 2 at import
"""
LOSS_PLUGIN = """
import torch
import dmlkit

class Loss(torch.nn.Module):
    def __init__(self, margin: float = 0.1):
        super().__init__()
        if margin > 1:
            raise ValueError("margin too large")

    def forward(self, emb, labels, indices=None):
        return emb.sum() * 0

@dmlkit.hookimpl
def register_losses(register):
    register(dmlkit.ComponentSpec("{name}", Loss{extra}))
"""
BAD_DATASET_PLUGIN = """
import dmlkit

@dmlkit.hookimpl
def register_datasets(register):
    register(dmlkit.ComponentSpec("listdata", lambda: [1, 2, 3]))
"""
EXIT_HOOK_PLUGIN = """
import sys
import dmlkit

@dmlkit.hookimpl
def register_losses(register):
    sys.exit("no losses today")
"""


def _toml(text: str) -> Callable[[Ctx], list[str]]:
    return lambda c: tiny_train("--config", str(c.write("c.toml", text)), "--run-dir", str(c.dir / "r"))


def _imgs(layout, bad=None, *extra: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        root = c.images(layout, bad)
        return tiny_train(
            "--dataset", "imagefolder", "--data-root", str(root), "--backbone-opt", "image_size=8",
            "--batch-size", "4", "--sampler-opt", "m=2", "--set", "val_fraction=0", *extra,
            "--run-dir", str(c.dir / "r"),
        )  # fmt: skip

    return build


def _csv(rows: list[str], header: str = "label,path,split,is_query,is_gallery", *extra: str):
    def build(c: Ctx) -> list[str]:
        table = c.csv(rows, header)
        return tiny_train(
            "--dataset", "csv", "--dataset-opt", f"path={table}", "--backbone-opt", "image_size=8",
            "--batch-size", "4", "--sampler-opt", "m=2", "--set", "val_fraction=0", *extra,
            "--run-dir", str(c.dir / "r"),
        )  # fmt: skip

    return build


COMBINED = '[loss]\nname = "combined"\nterms = ["triplet", "contrastive"]\nweights = {}\n'
GOOD_ROWS = [f"{'ab'[i % 2]},{i}.png,train,0,0" for i in range(4)] + [
    f"{'cd'[i % 2]},{i + 4}.png,validation,1,1" for i in range(4)
]
IMGS = {"train": {"a": 3, "b": 3}, "test": {"c": 3, "d": 3}}
RAND = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)


# fmt: off
CASES = [
    # --- command line: train ----------------------------------------------------------------
    Case("seed-huge", lambda c: tiny_train("--seed", "200000000000000", "--run-dir", str(c.dir / "r")), "'seed' must be <="),
    Case("seed-negative", lambda c: tiny_train("--seed", "-1", "--run-dir", str(c.dir / "r")), "'seed' must be >= 0"),
    Case("embedding-size-huge", lambda c: tiny_train("--set", "embedding_size=10000000000"), "'embedding_size' must be <="),
    Case("embedding-size-float", lambda c: tiny_train("--set", "embedding_size=1e10"), "must be int"),
    Case("lr-1e6", lambda c: tiny_train("--lr", "1e6", "--run-dir", str(c.dir / "r")), "'lr' must be <= 10"),
    Case("lr-set-1e6", lambda c: tiny_train("--set", "lr=1e6"), "'lr' must be <= 10"),
    Case("lr-nan", lambda c: tiny_train("--set", "lr=nan"), "'lr'"),
    Case("lr-inf", lambda c: tiny_train("--set", "lr=inf"), "'lr'"),
    Case("lr-word", lambda c: tiny_train("--lr", "fast"), "Invalid value"),
    Case("epochs-zero", lambda c: ["train", "--epochs", "0"], "'epochs' must be > 0"),
    Case("epochs-huge", lambda c: ["train", "--epochs", "10000000000"], "'epochs' must be <="),
    Case("epochs-word", lambda c: ["train", "--epochs", "abc"], "Invalid value"),
    Case("batch-zero", lambda c: tiny_train("--batch-size", "0"), "'batch_size' must be > 0"),
    Case("workers-huge", lambda c: tiny_train("--set", "num_workers=5000"), "'num_workers' must be <="),
    Case("val-fraction-1.5", lambda c: tiny_train("--set", "val_fraction=1.5"), "val_fraction"),
    Case("eval-every-0", lambda c: tiny_train("--set", "eval_every=0"), "eval_every"),
    Case("folds-1", lambda c: tiny_train("--set", "folds=1"), "folds"),
    Case("selection-word", lambda c: tiny_train("--set", "selection=test"), "'selection' must be one of"),
    Case("best-metric", lambda c: tiny_train("--set", "best_metric=nope"), "is not a metric"),
    Case("set-no-equals", lambda c: tiny_train("--set", "a.b.c"), "expected key=value"),
    Case("set-empty-key", lambda c: tiny_train("--set", "=5"), "expected key=value"),
    Case("set-table-and-value", lambda c: tiny_train("--loss-opt", "a=1", "--loss-opt", "a.b=2"), "is set to a value"),
    Case("unknown-flag", lambda c: ["train", "--bogus"], "No such option"),
    Case("unknown-loss", lambda c: tiny_train("--loss", "nope"), "unknown loss 'nope'"),
    Case("unknown-backbone", lambda c: tiny_train("--backbone", "resnet"), "unknown backbone"),
    Case("unknown-miner", lambda c: tiny_train("--miner", "x"), "unknown miner"),
    Case("protocol", lambda c: tiny_train("--protocol", "triple"), "--protocol must be"),
    Case("device", lambda c: tiny_train("--device", "tpu"), "unknown device"),
    Case("run-dir-5000", lambda c: tiny_train("--run-dir", LONG), "too long"),
    Case("config-5000", lambda c: tiny_train("--config", LONG), ""),
    Case("data-root-5000", lambda c: tiny_train("--dataset", "imagefolder", "--data-root", LONG), ""),
    Case("run-dir-is-file", lambda c: tiny_train("--run-dir", str(c.write("f", "x"))), "is a file"),
    Case("run-dir-existing-run", lambda c: tiny_train("--run-dir", str(c.run())), "already holds a run"),
    Case("crash-env", lambda c: c.monkeypatch.setenv("DMLKIT_CRASH_AT", "middle") or tiny_train(), "DMLKIT_CRASH_AT"),
    # --- config files ---------------------------------------------------------------------------
    Case("toml-train-5", _toml("train = 5\n"), "'train' must be a table"),
    Case("toml-train-array", _toml("[[train]]\nlr = 0.1\n"), "'train' must be a table"),
    Case("toml-dataset-string", _toml('dataset = "digits"\n'), "'dataset' must be a table"),
    Case("toml-loss-number", _toml("loss = 3\n"), "'loss' must be a table"),
    Case("toml-callbacks-5", _toml("callbacks = [5]\n"), "callback needs a name"),
    Case("toml-callbacks-string", _toml('callbacks = "x"\n'), "callbacks must be a list"),
    Case("toml-callback-no-name", _toml("[[callbacks]]\nevery = 2\n"), "callback needs a name"),
    Case("toml-callback-unknown", _toml('[[callbacks]]\nname = "nope"\n'), "unknown callback"),
    Case("toml-loss-name-list", _toml('[loss]\nname = ["a"]\n'), "name must be a string"),
    Case("toml-batch-string", _toml('[train]\nbatch_size = "2"\n'), "must be int"),
    Case("toml-warmup-inf", _toml("[train]\nwarmup_epochs = inf\n"), "must be int"),
    Case("toml-seed-huge", _toml("[train]\nseed = 99999999999999999999\n"), "'seed' must be <="),
    Case("toml-lr-huge", _toml("[train]\nlr = 1e6\n"), "'lr' must be <= 10"),
    Case("toml-best-metric-int", _toml("[train]\nbest_metric = 5\n"), "best_metric"),
    Case("toml-unknown-section", _toml("[trian]\nepochs = 2\n"), "unknown config section"),
    Case("toml-broken", _toml("[train\n"), "not valid TOML"),
    Case("toml-duplicate", _toml("[train]\n[train]\n"), "not valid TOML"),
    Case("toml-binary", lambda c: tiny_train("--config", str(c.write("c.toml", b"\xff\xfe\x00bad"))), "not valid TOML"),
    Case("toml-missing", lambda c: tiny_train("--config", str(c.dir / "none.toml")), "not found"),
    Case("toml-directory", lambda c: tiny_train("--config", str(c.dir)), "not found"),
    Case("toml-evaluator-ks", _toml('[evaluator]\nname = "retrieval"\nks = [0]\n'), "ks must be positive"),
    Case("toml-evaluator-backend", _toml('[evaluator]\nname = "retrieval"\nbackend = "gpu"\n'), "backend must be"),
    Case("toml-evaluator-memory", _toml('[evaluator]\nname = "retrieval"\nmemory_mb = -1\n'), "memory_mb"),
    Case("toml-sampler-m-word", _toml('[sampler]\nname = "m_per_class"\nm = "x"\n'), "must be int"),
    Case("toml-digits-classes", _toml('[dataset]\nname = "digits"\ntrain_classes = 10\n'), "train_classes"),
    Case("toml-options-no-name", _toml("[miner]\nepsilon = 0.1\n"), "has options but no component name"),
    Case("toml-runtime-option", _toml('[loss]\nname = "proxynca"\nnum_classes = 3\n'), "is set by the trainer"),
    Case("toml-deep", _toml("a = " + "[" * 3000 + "]" * 3000 + "\n"), "nests tables or arrays more than 32 deep"),
    Case("toml-deep-tables", _toml("a = " + "{ b = " * 40 + "1" + " }" * 40 + "\n"), "nests tables or arrays more than 32 deep"),
    Case("combined-weight-zero", _toml(COMBINED.format("[0.0, 1.0]")), "weights must be positive and finite"),
    Case("combined-weight-negative", _toml(COMBINED.format("[1.0, -0.5]")), "weights must be positive and finite"),
    Case("combined-weight-inf", _toml(COMBINED.format("[inf, 1.0]")), "weights must be positive and finite"),
    Case("combined-weight-nan", _toml(COMBINED.format("[nan, 1.0]")), "weights must be positive and finite"),
    Case("combined-weight-bool", _toml(COMBINED.format("[true, 1.0]")), "weights must be 2 numbers"),
    Case("combined-weight-count", _toml(COMBINED.format("[1.0]")), "weights must be 2 numbers"),
    # --- resume and run directories -----------------------------------------------------------
    Case("resume-from-best-cuts", lambda c: ["train", "--resume", str(_resumable(c) / "best.pt"), "--epochs", "4"], "would overwrite epochs 2-6"),
    Case("resume-from-best-same-epochs", lambda c: ["train", "--resume", str(_resumable(c) / "best.pt")], "would overwrite"),
    Case("resume-fewer-epochs", lambda c: ["train", "--resume", str(_resumable(c)), "--epochs", "4"], "--epochs 4 would not extend"),
    Case("resume-epochs-zero", lambda c: ["train", "--resume", str(c.run()), "--epochs", "0"], "would not extend"),
    Case("resume-with-lr", lambda c: ["train", "--resume", str(c.run()), "--lr", "0.1"], "cannot change it"),
    Case("resume-missing", lambda c: ["train", "--resume", str(c.dir / "nope")], "no checkpoint"),
    Case("resume-locked", lambda c: c.lock(c.run()) or ["train", "--resume", str(c.dir / "run"), "--epochs", "2"], "in use by another dmlkit process"),
    Case("resume-locked-new-run", lambda c: c.lock(c.dir.joinpath("r").mkdir() or c.dir / "r") or tiny_train("--run-dir", str(c.dir / "r")), "in use"),
    Case("resume-empty-last", lambda c: ["train", "--resume", str(c.write("run2/last.pt", b""))], "empty (0 bytes)"),
    Case("resume-unreadable-last", lambda c: ["train", "--resume", str(_run_with(c, "last.pt", b"junk") / "best.pt"), "--epochs", "2"], "cannot be read"),
    Case("resume-wrong-shape", lambda c: ["train", "--resume", str(edit_ckpt(c.run() / "last.pt", _shape)), "--epochs", "2"], "do not fit"),
    Case("resume-missing-key", lambda c: ["train", "--resume", str(edit_ckpt(c.run() / "last.pt", _drop)), "--epochs", "2"], "do not fit"),
    Case("resume-no-optimizer", lambda c: ["train", "--resume", str(edit_ckpt(c.run() / "last.pt", lambda k: k.pop("optimizer") and None))], "has no optimizer"),
    Case("resume-bad-config", lambda c: ["train", "--resume", str(edit_ckpt(c.run() / "last.pt", lambda k: k["config"]["loss"].update(name="nope")))], "unknown loss 'nope'"),
    # --- checkpoints: evaluate and embed -------------------------------------------------------
    Case("evaluate-empty-best", lambda c: ["evaluate", str(_run_with(c, "best.pt", b""))], "empty (0 bytes)"),
    Case("evaluate-empty-file", lambda c: ["evaluate", str(c.write("x.pt", b""))], "empty (0 bytes)"),
    Case("evaluate-truncated", lambda c: ["evaluate", str(c.write("x.pt", (c.trained / "last.pt").read_bytes()[:5000]))], "cannot load checkpoint"),
    Case("evaluate-garbage", lambda c: ["evaluate", str(c.write("x.pt", os.urandom(2000)))], "cannot load checkpoint"),
    Case("evaluate-list", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", lambda k: [1, 2]))], "not a dmlkit checkpoint"),
    Case("evaluate-wrong-shape", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", _shape))], "do not fit"),
    Case("evaluate-missing-key", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", _drop))], "do not fit"),
    Case("evaluate-extra-key", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", _extra))], "do not fit"),
    Case("evaluate-no-model", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", lambda k: k.pop("model") and None))], "has no model"),
    Case("evaluate-config-string", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", lambda k: k.update(config="x")))], "damaged"),
    Case("evaluate-epoch-string", lambda c: ["evaluate", str(edit_ckpt(c.run() / "last.pt", lambda k: k.update(epoch="1")))], "damaged"),
    Case("evaluate-best-unrestorable", lambda c: ["evaluate", str(_unrestorable(c))], "cannot be restored"),
    Case("evaluate-checkpoint-word", lambda c: ["evaluate", str(c.run()), "--checkpoint", "middle"], "--checkpoint must be"),
    Case("evaluate-empty-dir", lambda c: ["evaluate", str(c.write("d/x.txt", "").parent)], "no checkpoint"),
    Case("evaluate-both", lambda c: ["evaluate", str(c.run()), "--embeddings", "e.npy"], "either a run directory"),
    Case("evaluate-nothing", lambda c: ["evaluate"], "nothing to evaluate"),
    Case("evaluate-path-5000", lambda c: ["evaluate", LONG], ""),
    Case("embed-out-file", lambda c: ["embed", str(c.run()), "--out", str(c.write("out", "keep me"))], "is a file"),
    Case("embed-split", lambda c: ["embed", str(c.run()), "--split", "val"], "--split must be"),
    Case("embed-missing", lambda c: ["embed", str(c.dir / "nope")], "no checkpoint"),
    # --- embeddings and labels (.npy) ----------------------------------------------------------
    Case("npy-100x0", lambda c: c.emb(np.zeros((100, 0), np.float32)), "100x0"),
    Case("npy-one-item", lambda c: c.emb(np.ones((1, 4), np.float32)), "at least 2 items"),
    Case("npy-1e30-identical", lambda c: c.emb(np.full((100, 4), 1e30, np.float32)), "are the same"),
    Case("npy-all-zero", lambda c: c.emb(np.zeros((100, 4), np.float32)), "are the same"),
    Case("npy-identical", lambda c: c.emb(np.ones((100, 4), np.float32)), "are the same"),
    Case("npy-1e39", lambda c: c.emb(RAND.astype(np.float64) * 1e39), "beyond the float32 range"),
    Case("npy-complex", lambda c: c.emb(RAND + 1j * RAND), "complex"),
    Case("npy-strings", lambda c: c.emb(np.array([["a"] * 4] * 100)), "must be numbers"),
    Case("npy-object", lambda c: c.emb(np.array([{"a": 1}] * 100, dtype=object)), "cannot read embeddings"),
    Case("npz", lambda c: ["evaluate", "--embeddings", str(_npz(c)), "--labels", c.npy("l.npy", np.arange(100) % 5)], ".npz archive"),
    Case("npy-text", lambda c: ["evaluate", "--embeddings", str(c.write("e.npy", "1,2,3")), "--labels", str(c.write("l.npy", ""))], "cannot read embeddings"),
    Case("npy-nan", lambda c: c.emb(np.where(np.eye(100, 4) > 0, np.nan, RAND)), "NaN or inf"),
    Case("npy-inf", lambda c: c.emb(np.where(np.eye(100, 4) > 0, np.inf, RAND)), "NaN or inf"),
    Case("npy-3d", lambda c: c.emb(RAND.reshape(100, 2, 2)), "2-D array"),
    Case("npy-1d", lambda c: c.emb(RAND[:, 0]), "2-D array"),
    Case("labels-nan", lambda c: c.emb(RAND, np.where(np.arange(100) % 7 == 0, np.nan, np.arange(100) % 5)), "labels contain NaN"),
    Case("labels-complex", lambda c: c.emb(RAND, np.arange(100) * 1j), "labels must be"),
    Case("labels-length", lambda c: c.emb(RAND, np.arange(99) % 5), "same length"),
    Case("labels-all-distinct", lambda c: c.emb(RAND, np.arange(100)), "no query has another item"),
    Case("labels-missing-flag", lambda c: ["evaluate", "--embeddings", c.npy("e.npy", RAND)], "needs --labels"),
    Case("labels-missing-file", lambda c: ["evaluate", "--embeddings", c.npy("e.npy", RAND), "--labels", "nope.npy"], "not found"),
    Case("mask-float", lambda c: c.emb(RAND, query_mask=np.random.default_rng(0).random(100)), "must be boolean"),
    Case("mask-float-01", lambda c: c.emb(RAND, gallery_mask=np.ones(100)), "must be boolean"),
    Case("mask-int-2", lambda c: c.emb(RAND, query_mask=np.full(100, 2)), "must be boolean"),
    Case("mask-length", lambda c: c.emb(RAND, query_mask=np.ones(50, bool)), "entries"),
    Case("mask-empty", lambda c: c.emb(RAND, query_mask=np.zeros(100, bool)), "query set is empty"),
    Case("ks-zero", lambda c: c.emb(RAND) + ["--ks", "0"], "ks must be positive"),
    Case("ks-word", lambda c: c.emb(RAND) + ["--ks", "a,b"], "--ks must be"),
    Case("backend", lambda c: c.emb(RAND) + ["--backend", "gpu"], "backend must be"),
    # --- image folders --------------------------------------------------------------------------
    Case("images-class-overlap", _imgs({"train": {"a": 3, "b": 3}, "test": {"b": 3, "c": 3}}), "in both train/ and test/"),
    Case("images-no-test", _imgs({"train": {"a": 3, "b": 3}}), "folder test/"),
    Case("images-empty-classes", _imgs({"train": {"a": 0, "b": 0}, "test": {"c": 3}}), "no images under"),
    Case("images-one-test-item", _imgs({"train": {"a": 3, "b": 3}, "test": {"c": 1}}), "at least 2"),
    Case("images-root-missing", lambda c: tiny_train("--dataset", "imagefolder", "--data-root", str(c.dir / "none")), "does not exist"),
    Case("images-root-file", lambda c: tiny_train("--dataset", "imagefolder", "--data-root", str(c.write("f", "x"))), "does not exist"),
    Case("images-bad-image-workers", _imgs(IMGS, "train/a/0.png", "--set", "num_workers=2"), "cannot read image"),
    Case("images-bad-image", _imgs(IMGS, "train/a/1.png", "--set", "num_workers=0"), "cannot read image"),
    Case("images-skip-bad-word", _imgs(IMGS, None, "--dataset-opt", "skip_bad=maybe"), "must be bool"),
    Case("images-style", _imgs(IMGS, None, "--dataset-opt", "style=3"), "must be str"),
    # --- CSV tables -----------------------------------------------------------------------------
    Case("csv-nan-label", _csv(["nan,0.png,train,0,0", *GOOD_ROWS]), "marks a missing value"),
    Case("csv-null-label", _csv([*GOOD_ROWS, "NULL,5.png,validation,1,1"]), "marks a missing value"),
    Case("csv-na-label", _csv(["N/A,0.png,train,0,0", *GOOD_ROWS]), "marks a missing value"),
    Case("csv-empty-query", _csv([r[:-3] + "0,1" for r in GOOD_ROWS]), "query set is empty"),
    Case("csv-empty-gallery", _csv([r[:-3] + "1,0" for r in GOOD_ROWS]), "gallery set is empty"),
    Case("csv-missing-column", _csv(GOOD_ROWS, "label,file,split,is_query,is_gallery"), "missing column"),
    Case("csv-missing-image", _csv([*GOOD_ROWS, "a,99.png,train,0,0"]), "does not exist"),
    Case("csv-bad-split", _csv([*GOOD_ROWS, "a,0.png,testing,0,0"]), "split train or validation"),
    Case("csv-no-validation", _csv([r for r in GOOD_ROWS if "train" in r]), "no rows with split=validation"),
    Case("csv-latin1", lambda c: _csv_file(c, "label,path,split\n\xe9,a,train\n".encode("latin-1")), "not a UTF-8 CSV"),
    Case("csv-empty-file", lambda c: _csv_file(c, b""), "missing column"),
    Case("csv-no-path", lambda c: tiny_train("--dataset", "csv"), "needs path="),
    Case("csv-directory", lambda c: tiny_train("--dataset", "csv", "--dataset-opt", f"path={c.dir}"), ""),
    # --- plugins --------------------------------------------------------------------------------
    Case("plugin-argparse-at-import", lambda c: c.plugin("argy", ARGPARSE_PLUGIN) or tiny_train("--loss", "argy_loss"), "plugin 'argy' failed to load (import failed: SystemExit: 2"),
    Case("plugin-import-error", lambda c: c.plugin("imperr", "import not_a_module_anywhere\n") or tiny_train("--loss", "x"), "plugin 'imperr' failed to load"),
    Case("plugin-hook-exits", lambda c: c.plugin("exiter", EXIT_HOOK_PLUGIN) or tiny_train("--loss", "exiter_loss"), "plugin 'exiter' failed to load"),
    Case("plugin-option-check", lambda c: c.plugin("opt", LOSS_PLUGIN.format(name="optloss", extra="")) or tiny_train("--loss", "optloss", "--loss-opt", "margin=5"), "failed to build"),
    Case("plugin-option-type", lambda c: c.plugin("opt2", LOSS_PLUGIN.format(name="optloss2", extra="")) or tiny_train("--loss", "optloss2", "--loss-opt", "margin=x"), "must be float"),
    Case("plugin-replaces-missing", lambda c: c.plugin("rep", LOSS_PLUGIN.format(name="newloss", extra=", replaces='nope'")) or tiny_train("--loss", "newloss"), "unknown loss 'newloss'"),
    Case("plugin-replaced-name", lambda c: c.plugin("rep2", LOSS_PLUGIN.format(name="mycontrastive", extra=", replaces='contrastive'")) or tiny_train("--loss", "contrastive"), "was replaced by loss 'mycontrastive'"),
    Case("plugin-dataset-returns-list", lambda c: c.plugin("dl", BAD_DATASET_PLUGIN) or tiny_train("--dataset", "listdata"), "must return dmlkit.data.DatasetSplits"),
    # --- report ---------------------------------------------------------------------------------
    Case("report-damaged-config", lambda c: ["report", str(_run_with(c, "config.toml", "[train\n")), "--no-grid"], "not valid TOML"),
    Case("report-config-section", lambda c: ["report", str(_run_with(c, "config.toml", "loss = 3\n")), "--no-grid"], "must be tables"),
    Case("report-metrics-not-json", lambda c: ["report", str(_run_with(c, "metrics.jsonl", "{oops\n")), "--no-grid"], "is not JSON"),
    Case("report-metrics-not-record", lambda c: ["report", str(_run_with(c, "metrics.jsonl", "5\n")), "--no-grid"], "not an epoch record"),
    Case("report-metrics-empty", lambda c: ["report", str(_run_with(c, "metrics.jsonl", "")), "--no-grid"], "is empty"),
    Case("report-results-damaged", lambda c: ["report", str(_run_with(c, "results.json", "[]")), "--no-grid"], "not a dmlkit results file"),
    Case("report-not-a-run", lambda c: ["report", str(c.dir)], "not a run directory"),
    Case("report-queries", lambda c: ["report", str(c.run()), "--queries", "0"], "--queries"),
    Case("report-best-metric", lambda c: ["report", str(c.run()), "--best-metric", "map_at_r"], "--best-metric is gone"),
    # --- other commands -------------------------------------------------------------------------
    Case("show-unknown", lambda c: ["show", "loss", "tripplet"], "did you mean 'triplet'"),
    Case("show-kind", lambda c: ["show", "lossez", "x"], "unknown component kind"),
    Case("list-kind", lambda c: ["list", "nope"], "unknown component kind"),
    Case("plugins-flag", lambda c: ["plugins", "--bogus"], "No such option"),
    Case("no-command", lambda c: ["frobnicate"], "No such command"),
    # --- real processes: signals, limits, mounts -----------------------------------------------
    Case("process-npy-100x0-no-sigfpe", lambda c: c.emb(np.zeros((100, 0), np.float32)), "100x0", "plain"),
    Case("process-ulimit-f-resume", lambda c: ["train", "--resume", str(c.run()), "--epochs", "2"], "file size limit", "ulimit"),
    Case("process-read-only-run", lambda c: ["train", "--resume", str(c.run()), "--epochs", "2"], "read-only", "readonly"),
    Case("process-full-disk", lambda c: tiny_train("--run-dir", "small/run"), "disk is full", "tmpfs"),
]
# fmt: on


def _run_with(c: Ctx, name: str, content: str | bytes) -> Path:
    """A copy of the run with one file replaced."""
    run = c.run()
    c.write(f"run/{name}", content)
    return run


def _csv_file(c: Ctx, content: bytes) -> list[str]:
    return tiny_train("--dataset", "csv", "--dataset-opt", f"path={c.write('t.csv', content)}")


def _npz(c: Ctx) -> Path:
    np.savez(c.dir / "e.npz", a=RAND)
    return c.dir / "e.npz"


def _unrestorable(c: Ctx) -> Path:
    """last.pt at epoch 3 recording best epoch 2, best.pt at epoch 1: a best.pt that no kill explains."""
    run = c.run()

    def later(ckpt):
        ckpt["epoch"], ckpt["best"]["epoch"] = 3, 2

    edit_ckpt(run / "last.pt", later)
    return run


def _unshare_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _as_process(case: Case, ctx: Ctx, argv: list[str]) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "dmlkit", *argv]
    preexec = None
    if case.process == "ulimit":
        limit = 200_000  # bytes: smaller than a checkpoint

        def preexec():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    elif case.process in ("readonly", "tmpfs"):
        if not _unshare_ok():
            pytest.skip("needs user and mount namespaces (unshare -rm)")
        quoted = " ".join(f"'{a}'" for a in cmd)
        if case.process == "readonly":
            run = ctx.dir / "run"
            script = f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && exec {quoted}"
        else:  # "small" was made empty before the snapshot; the tmpfs is gone when the namespace ends
            script = f"mount -t tmpfs -o size=600k tmpfs small && {quoted}; rc=$?; echo LEFT:$(ls -A small); exit $rc"
        cmd = ["unshare", "-rm", "sh", "-c", script]
    proc = subprocess.run(cmd, cwd=ctx.dir, capture_output=True, text=True, timeout=300, preexec_fn=preexec)
    if case.process == "tmpfs":
        assert "LEFT:\n" in proc.stdout, ("the failed run left files on the full disk", proc.stdout[-500:])
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_with_one_line_and_changes_nothing(case, trained, tmp_path, monkeypatch, add_site, cli):
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)
    ctx = Ctx(work, trained, tmp_path / "site", add_site, monkeypatch)
    if case.process == "tmpfs":
        (work / "small").mkdir()
    try:
        argv = case.build(ctx)
        assert argv, "the case built no command"
        before = snapshot(work)
        code, out, err = _as_process(case, ctx, argv) if case.process else cli(*argv)
    finally:
        for f in ctx.held:
            f.close()
    assert code in (1, 2), (case.id, code, out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case.id, err[-3000:])
    assert "Traceback" not in err + out and "internal error" not in err, (case.id, err)
    assert case.match in lines[0], (case.id, lines[0])
    assert snapshot(work) == before, (case.id, "files changed")


def test_the_table_is_large_enough():
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)


# --- crash injection -------------------------------------------------------------------------------
def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("epoch", [1, 2])
@pytest.mark.parametrize("point", ["before", "between", "after"])
def test_a_kill_at_any_checkpoint_write_resumes_with_best_pt_at_the_recorded_epoch(point, epoch, tmp_path, cli):
    """DMLKIT_CRASH_AT ends the process (os._exit, as a SIGKILL would) at one write point: before
    last.pt, between last.pt and best.pt, or after both (before metrics.jsonl). selection=last makes
    every epoch the best, so every epoch writes best.pt. Whatever the point, `evaluate` scores the
    recorded best epoch, and resuming ends with best.pt at the recorded best and one row per epoch."""
    run = tmp_path / "run"
    argv = ["train", "--epochs", "2", "--sampler-opt", "batches_per_epoch=2", "--set", "selection=last"]
    env = {**os.environ, "DMLKIT_CRASH_AT": f"{point}:{epoch}"}
    proc = subprocess.run(
        [sys.executable, "-m", "dmlkit", *argv, "--run-dir", str(run)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 137, proc.stderr[-2000:]
    if not (run / "last.pt").exists():  # killed before the first checkpoint: nothing to resume, start again
        assert point == "before" and epoch == 1
        code, _, err = cli("train", "--resume", str(run))
        assert code == 1 and "no checkpoint" in err
        code, _, err = cli(*argv, "--run-dir", str(run))
    else:
        last = load_ckpt(run / "last.pt")
        recorded = last["best"]["epoch"]
        assert last["epoch"] == (epoch if point != "before" else epoch - 1)
        code, out, err = cli("evaluate", str(run), "--json")
        assert code == 0, err
        assert json.loads(out)["checkpoint"]["epoch"] == recorded  # never an older best.pt
        code, _, err = cli("train", "--resume", str(run))
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 2 == load_ckpt(run / "best.pt")["epoch"] == load_ckpt(run / "last.pt")["epoch"]
    assert _epochs(run) == [1, 2]
    assert not list(run.glob("*.tmp"))


def test_best_pt_is_restored_on_resume_after_a_kill_between_the_writes_of_the_last_epoch(tmp_path, cli):
    """The issue's case: the run records epoch 2 as best (its last), best.pt still holds epoch 1.
    Resuming has nothing to train; it restores best.pt before the test set is read."""
    run = tmp_path / "run"
    argv = ["train", "--epochs", "2", "--sampler-opt", "batches_per_epoch=2", "--set", "selection=last"]
    env = {**os.environ, "DMLKIT_CRASH_AT": "between:2"}
    proc = subprocess.run([sys.executable, "-m", "dmlkit", *argv, "--run-dir", str(run)], env=env, capture_output=True)
    assert proc.returncode == 137
    assert load_ckpt(run / "best.pt")["epoch"] == 1 and load_ckpt(run / "last.pt")["best"]["epoch"] == 2
    code, _, err = cli("train", "--resume", str(run))
    assert code == 0, err
    assert "restored" in err and load_ckpt(run / "best.pt")["epoch"] == 2
    assert json.loads((run / "results.json").read_text())["best_epoch"] == 2


# --- one writer per run directory ------------------------------------------------------------------
def test_a_second_trainer_on_a_run_directory_is_refused(tmp_path, cli):
    run = tmp_path / "run"
    argv = ["train", "--epochs", "3", "--sampler-opt", "batches_per_epoch=6", "--run-dir", str(run)]
    a = subprocess.Popen(
        [sys.executable, "-m", "dmlkit", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in a.stdout:  # printed once the lock is held
            if line.startswith("run directory:"):
                break
        code, _, err = cli(*argv)
        assert code == 1 and "in use by another dmlkit process" in err
        code, _, err = cli("train", "--resume", str(run), "--epochs", "4")
        assert code == 1 and ("in use by another dmlkit process" in err or "no checkpoint" in err)
        rest, a_err = a.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == 0, a_err
    assert _epochs(run) == [1, 2, 3]
    # the lock went with the process: the run can be continued now
    code, _, err = cli("train", "--resume", str(run), "--epochs", "4")
    assert code == 0, err
    assert _epochs(run) == [1, 2, 3, 4]


# --- made visible, or made to work ---------------------------------------------------------------
REPLACING_PLUGIN = """
import torch
import dmlkit

class Loss(torch.nn.Module):
    def forward(self, emb, labels, indices=None):
        return (emb[:, 0] - labels.float()).pow(2).mean()

@dmlkit.hookimpl
def register_losses(register):
    register(dmlkit.ComponentSpec("contrastive", Loss, "my contrastive", replaces="contrastive"))
"""


def test_a_replaced_builtin_is_visible_everywhere(cli, tmp_path, add_site):
    make_distribution(
        tmp_path / "site", "thirdparty-mine", {"thirdparty_mine": REPLACING_PLUGIN}, {"mine": "thirdparty_mine"}
    )
    add_site(tmp_path / "site")
    said = "loss 'contrastive' of plugin 'losses'"
    code, out, _ = cli("plugins", "--json")
    assert code == 0 and next(p for p in json.loads(out) if p["name"] == "mine")["replaces"] == [said]
    code, out, _ = cli("list", "loss", "--json")
    assert next(c for c in json.loads(out)["loss"] if c["name"] == "contrastive")["replaces"] == said
    code, out, _ = cli("show", "loss", "contrastive", "--json")
    assert json.loads(out)["replaces"] == said and json.loads(out)["plugin"] == "mine"
    code, out, _ = cli("show", "loss", "contrastive")
    assert "replaces the" in out
    run = tmp_path / "r"
    code, out, err = cli("train", *TINY, "--loss", "contrastive", "--run-dir", str(run))
    assert code == 0, err
    note = "loss 'contrastive' is plugin 'mine''s replacement of the loss 'contrastive' of plugin 'losses'"
    assert f"note: {note}" in out
    assert (run / "config.toml").read_text().startswith(f"# {note}\n")


def test_a_plugin_that_exits_at_import_breaks_no_command(cli, tmp_path, add_site):
    make_distribution(
        tmp_path / "site", "thirdparty-argy", {"thirdparty_argy": ARGPARSE_PLUGIN}, {"argy": "thirdparty_argy"}
    )
    add_site(tmp_path / "site")
    code, out, err = cli("list", "loss", "--json")
    assert code == 0 and json.loads(out) and "usage" not in err  # argparse's usage text is held back
    code, out, _ = cli("plugins", "--json")
    errors = next(p for p in json.loads(out) if p["name"] == "argy")["errors"]
    assert errors[0].startswith("import failed: SystemExit: 2")


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    from dmlkit.plugins import get_host

    ctx = Ctx(tmp_path, tmp_path, tmp_path, lambda p: None, None)
    table = ctx.csv(GOOD_ROWS, bom=True)
    data = get_host().registry.build("dataset", "csv", path=table)
    assert len(data.train) == 4 and data.test.query_mask.all()


def test_huge_and_tiny_embeddings_keep_their_directions():
    from dmlkit.evaluation import retrieval_metrics

    labels = np.arange(100) % 5
    base = retrieval_metrics(RAND, labels, backend="torch")
    for scale in (1e30, 1e-30):
        assert retrieval_metrics(RAND * np.float32(scale), labels, backend="torch") == pytest.approx(base)
