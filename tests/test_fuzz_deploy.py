"""export, index and search fed bad input of every kind: damaged index folders (each file missing,
empty, not JSON, of the wrong types or lengths, changed since it was written, a FIFO, a model of
the wrong size, a NaN model, a never-ending model), output folders that hold a user's files,
inputs inside the output, bad flags and odd paths.

Each case ends with exit 1 or 2 and one ``error:`` line (a damaged index: ``index ... is damaged:
...; rebuild it with dmlkit index ...``), no traceback, no internal error, and no file of the
case's folder created, changed or removed. Cases run in-process; those whose property is "never
hangs" (FIFOs, a model that never ends) run as real processes under a time limit, side by side.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import Proc, bad_input_case, image_run, one_error_line, run_processes, unchanged
from test_fuzz import snapshot
from torch import nn

from dmlkit_plugins.deploy import INDEX_VERSION, MANIFEST, _digest, fingerprint

LONG = "x" * 5000


@pytest.fixture(scope="module")
def res() -> dict[str, Path]:
    return image_run()


@dataclass
class Ctx:
    dir: Path
    res: dict[str, Path]

    @property
    def query(self) -> str:
        return str(self.res["data"] / "test" / "c4" / "0.png")

    def index(self) -> Path:
        idx = self.dir / "idx"
        shutil.copytree(self.res["index"], idx)
        return idx

    def put(self, name: str, content: object, rehash: bool = True) -> Path:
        """Replace one file of a copied index; with ``rehash``, index.json records its new size and
        SHA-256 (so that the check behind the checksum is the one that must catch it)."""
        idx = self.dir / "idx" if (self.dir / "idx").exists() else self.index()
        path = idx / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, nn.Module):
            torch.jit.save(torch.jit.script(content), str(path))
        elif content is FIFO:
            os.mkfifo(path)
        elif content is FOLDER:
            path.mkdir()
        elif content is not MISSING:
            path.write_text(json.dumps(content))
        if rehash and path.is_file() and name != "index.json":
            meta = json.loads((idx / "index.json").read_text())
            if name in meta.get("files", {}):
                meta["files"][name] = _digest(path)
                if "fingerprint" in meta:
                    meta["fingerprint"] = fingerprint(meta["files"], meta["model"], meta["preprocessing"])
                (idx / "index.json").write_text(json.dumps(meta))
        return idx

    def meta(self, **changes: object) -> Path:
        idx = self.dir / "idx" if (self.dir / "idx").exists() else self.index()
        meta = json.loads((idx / "index.json").read_text())
        for k, v in changes.items():
            if v is MISSING:
                meta.pop(k, None)
            else:
                meta[k] = v
        (idx / "index.json").write_text(json.dumps(meta))
        return idx

    def json_of(self, name: str, fn: Callable[[dict], object]) -> Path:
        idx = self.dir / "idx" if (self.dir / "idx").exists() else self.index()
        data = json.loads((idx / name).read_text())
        out = fn(data)
        return self.put(name, data if out is None else out)

    def search(self, idx: Path, *extra: str) -> list[str]:
        return ["search", str(idx), self.query, *extra]

    def folder(self, name: str, files: dict[str, str]) -> Path:
        folder = self.dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        return folder

    def images(self, name: str = "imgs") -> Path:
        folder = self.dir / name
        shutil.copytree(self.res["data"] / "test", folder)
        return folder


MISSING, FIFO, FOLDER = object(), object(), object()


class Seven(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :7]


class NaNs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :128] * float("nan")


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.flatten(1)[:, :128]
        return y, y


class Scalar(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class Gray(nn.Module):  # takes one channel: the index's RGB preprocessing does not fit it
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 1, "one channel"
        return x.flatten(1)[:, :128]


class Forever(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(1)[:, :128]
        while bool(y.sum() > -1e30):
            y = y + 0.0
        return y


def faiss_bytes(dim: int, count: int, metric: str = "l2") -> bytes:
    import faiss

    index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    index.add(np.random.default_rng(0).normal(size=(count, dim)).astype(np.float32))
    return bytes(faiss.serialize_index(index))


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    match: str = ""


DAMAGED = "is damaged"


def _run_arg(c: Ctx) -> str:
    return str(c.res["run"])


def _steps(fn: Callable[[list], object]) -> Callable[[dict], None]:
    def edit(prep: dict) -> None:
        fn(prep["steps"])

    return edit


# fmt: off
CASES = [
    # --- index.json -------------------------------------------------------------------------------
    Case("meta-missing", lambda c: c.search(c.put("index.json", MISSING)), "not a dmlkit index (no index.json)"),
    Case("meta-empty", lambda c: c.search(c.put("index.json", "")), "index.json is not JSON"),
    Case("meta-not-json", lambda c: c.search(c.put("index.json", "{oops")), "index.json is not JSON"),
    Case("meta-binary", lambda c: c.search(c.put("index.json", os.urandom(300))), "index.json is not JSON"),
    Case("meta-list", lambda c: c.search(c.put("index.json", [1, 2])), "index.json is not a JSON object"),
    Case("meta-folder", lambda c: c.search(c.put("index.json", FOLDER)), "index.json is not a regular file"),
    Case("meta-deep", lambda c: c.search(c.put("index.json", "[" * 100000 + "]" * 100000)), "index.json is not JSON"),
    Case("meta-huge", lambda c: c.search(c.put("index.json", " " * (2 << 20) + "{}")), "more than the"),
    Case("meta-format", lambda c: c.search(c.meta(format="faiss")), "format is 'faiss'"),
    Case("meta-no-format", lambda c: c.search(c.meta(format=MISSING)), "format is None"),
    Case("meta-version-string", lambda c: c.search(c.meta(version="2")), "version is '2'"),
    Case("meta-version-newer", lambda c: c.search(c.meta(version=99)), "written by a newer dmlkit"),
    Case("meta-version-bool", lambda c: c.search(c.meta(version=True)), "version is True"),
    Case("meta-count-zero", lambda c: c.search(c.meta(count=0)), "count is 0"),
    Case("meta-count-string", lambda c: c.search(c.meta(count="12")), "count is '12'"),
    Case("meta-count-wrong", lambda c: c.search(c.meta(count=11)), "items.json lists 12 paths, index.json counts 11"),
    Case("meta-dim-wrong", lambda c: c.search(c.meta(dim=64)), "holds 128-d vectors, index.json says 64"),
    Case("meta-dim-float", lambda c: c.search(c.meta(dim=128.0)), "dim is 128.0"),
    Case("meta-model-escape", lambda c: c.search(c.meta(model="../model.ts")), "not a file name in the folder"),
    Case("meta-model-absolute", lambda c: c.search(c.meta(model="/etc/passwd")), "not a file name in the folder"),
    Case("meta-model-none", lambda c: c.search(c.meta(model=None)), "model is None"),
    Case("meta-prep-dotdot", lambda c: c.search(c.meta(preprocessing="..")), "not a file name in the folder"),
    Case("meta-files-missing", lambda c: c.search(c.meta(files=MISSING)), "does not list the index's files"),
    Case("meta-files-list", lambda c: c.search(c.meta(files=[1])), "does not list the index's files"),
    Case("meta-files-partial", lambda c: c.search(c.json_of("index.json", lambda m: m["files"].pop("model.ts") and None)), "does not list the index's files"),
    Case("meta-digest-string", lambda c: c.search(c.json_of("index.json", lambda m: m["files"].update({"items.json": "x"}))), "record of items.json is damaged"),
    Case("meta-size-wrong", lambda c: c.search(c.json_of("index.json", lambda m: m["files"]["model.ts"].update(bytes=5))), "index.json records 5"),
    Case("meta-sha-wrong", lambda c: c.search(c.json_of("index.json", lambda m: m["files"]["index.faiss"].update(sha256="0" * 64))), "index.faiss changed since dmlkit index wrote it"),
    # --- items.json -------------------------------------------------------------------------------
    Case("items-missing", lambda c: c.search(c.put("items.json", MISSING)), "items.json is missing"),
    Case("items-empty", lambda c: c.search(c.put("items.json", "")), "items.json is not JSON"),
    Case("items-not-json", lambda c: c.search(c.put("items.json", "paths: a")), "items.json is not JSON"),
    Case("items-list", lambda c: c.search(c.put("items.json", ["a.png"])), "items.json is not a JSON object"),
    Case("items-root-relative", lambda c: c.search(c.json_of("items.json", lambda d: d.update(root="imgs"))), "root is 'imgs'"),
    Case("items-root-int", lambda c: c.search(c.json_of("items.json", lambda d: d.update(root=5))), "root is 5"),
    Case("items-no-root", lambda c: c.search(c.json_of("items.json", lambda d: d.pop("root") and None)), "root is None"),
    Case("items-paths-string", lambda c: c.search(c.json_of("items.json", lambda d: d.update(paths="a.png"))), "paths are not strings"),
    Case("items-paths-ints", lambda c: c.search(c.json_of("items.json", lambda d: d.update(paths=list(range(12))))), "paths are not strings"),
    Case("items-paths-short", lambda c: c.search(c.json_of("items.json", lambda d: d["paths"].pop() and None)), "lists 11 paths"),
    Case("items-paths-long", lambda c: c.search(c.json_of("items.json", lambda d: d["paths"].append("x.png"))), "lists 13 paths"),
    Case("items-path-escape", lambda c: c.search(c.json_of("items.json", lambda d: d["paths"].__setitem__(0, "../../etc/passwd"))), "a path outside its root"),
    Case("items-path-absolute", lambda c: c.search(c.json_of("items.json", lambda d: d["paths"].__setitem__(0, "/etc/passwd"))), "a path outside its root"),
    Case("items-path-empty", lambda c: c.search(c.json_of("items.json", lambda d: d["paths"].__setitem__(0, ""))), "a path outside its root"),
    Case("items-changed", lambda c: c.search(c.put("items.json", json.dumps({"root": "/", "paths": ["x"] * 12}), rehash=False)), "items.json is"),
    # --- preprocessing.json -----------------------------------------------------------------------
    Case("prep-missing", lambda c: c.search(c.put("preprocessing.json", MISSING)), "preprocessing.json is missing"),
    Case("prep-empty", lambda c: c.search(c.put("preprocessing.json", "")), "preprocessing.json is not JSON"),
    Case("prep-list", lambda c: c.search(c.put("preprocessing.json", [])), "preprocessing.json is not a JSON object"),
    Case("prep-tensor-input", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(input="tensor"))), "index and search need a run trained on images"),
    Case("prep-mode", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(color_mode="CMYK"))), "color_mode is 'CMYK'"),
    Case("prep-steps-dict", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(steps={"op": "resize"}))), "steps are not a list"),
    Case("prep-step-unknown", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s.append({"op": "sharpen"})))), "steps cannot be rebuilt"),
    Case("prep-step-string", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s.append("resize")))), "steps cannot be rebuilt"),
    Case("prep-resize-no-size", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s[0].pop("size")))), "steps cannot be rebuilt"),
    Case("prep-resize-word", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s[0].update(size="big")))), "steps"),
    Case("prep-interpolation", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s[0].update(interpolation="magic")))), "steps cannot be rebuilt"),
    Case("prep-normalize-short", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s[3].update(mean=[0.5, 0.5])))), "steps fail on an image"),
    Case("prep-std-zero", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s[3].update(std=[0, 0, 0])))), "steps"),
    Case("prep-no-to-tensor", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s.pop(2) and None))), "steps"),
    Case("prep-bigger-crop", lambda c: c.search(c.json_of("preprocessing.json", _steps(lambda s: s[1].update(size=[24, 24])))), "makes inputs of shape [3, 24, 24], its model takes [3, 16, 16]"),
    Case("prep-shape-other", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(input_shape=["batch", 3, 32, 32]))), "its model takes [3, 32, 32]"),
    Case("prep-shape-huge", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(input_shape=["batch", 3, 10**9, 10**9]))), "input_shape is"),
    Case("prep-shape-string", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(input_shape="3x16x16"))), "input_shape is"),
    Case("prep-grayscale", lambda c: c.search(c.json_of("preprocessing.json", lambda p: p.update(color_mode="L", input_shape=["batch", 1, 16, 16], steps=p["steps"][:3]))), "its model fails on an input of shape [1, 1, 16, 16]"),
    Case("prep-changed", lambda c: c.search(c.put("preprocessing.json", "{}", rehash=False)), "preprocessing.json is"),
    # --- model.ts ---------------------------------------------------------------------------------
    Case("model-missing", lambda c: c.search(c.put("model.ts", MISSING)), "model.ts is missing"),
    Case("model-empty", lambda c: c.search(c.put("model.ts", b"")), "model.ts is not a TorchScript model"),
    Case("model-garbage", lambda c: c.search(c.put("model.ts", os.urandom(5000))), "model.ts is not a TorchScript model"),
    Case("model-truncated", lambda c: c.search(c.put("model.ts", (c.res["index"] / "model.ts").read_bytes()[:20000])), "model.ts is not a TorchScript model"),
    Case("model-folder", lambda c: c.search(c.put("model.ts", FOLDER)), "model.ts is not a regular file"),
    Case("model-checkpoint", lambda c: c.search(c.put("model.ts", (c.res["run"] / "last.pt").read_bytes())), "model.ts is not a TorchScript model"),
    Case("model-seven", lambda c: c.search(c.put("model.ts", Seven())), "the model gives 7-d embeddings, the index holds 128-d"),
    Case("model-nan", lambda c: c.search(c.put("model.ts", NaNs())), "its model gives NaN or inf embeddings"),
    Case("model-pair", lambda c: c.search(c.put("model.ts", Pair())), "does not return one embedding per image"),
    Case("model-scalar", lambda c: c.search(c.put("model.ts", Scalar())), "does not return one embedding per image"),
    Case("model-gray", lambda c: c.search(c.put("model.ts", Gray())), "its model fails on an input of shape [1, 3, 16, 16]"),
    Case("model-changed", lambda c: c.search(c.put("model.ts", Seven(), rehash=False)), "model.ts is"),
    # --- index.faiss ------------------------------------------------------------------------------
    Case("faiss-missing", lambda c: c.search(c.put("index.faiss", MISSING)), "index.faiss is missing"),
    Case("faiss-empty", lambda c: c.search(c.put("index.faiss", b"")), "index.faiss is not a faiss index"),
    Case("faiss-garbage", lambda c: c.search(c.put("index.faiss", os.urandom(4000))), "index.faiss is not a faiss index"),
    Case("faiss-truncated", lambda c: c.search(c.put("index.faiss", (c.res["index"] / "index.faiss").read_bytes()[:3000])), "index.faiss is not a faiss index"),
    Case("faiss-folder", lambda c: c.search(c.put("index.faiss", FOLDER)), "index.faiss is not a regular file"),
    Case("faiss-dim", lambda c: c.search(c.put("index.faiss", faiss_bytes(7, 12))), "index.faiss holds 7-d vectors, index.json says 128"),
    Case("faiss-count", lambda c: c.search(c.put("index.faiss", faiss_bytes(128, 5))), "index.faiss holds 5 vectors, index.json counts 12"),
    Case("faiss-inner-product", lambda c: c.search(c.put("index.faiss", faiss_bytes(128, 12, "ip"))), "does not measure Euclidean distance"),
    Case("faiss-changed", lambda c: c.search(c.put("index.faiss", faiss_bytes(128, 12), rehash=False)), "index.faiss changed since"),
    # --- search's own inputs ----------------------------------------------------------------------
    Case("search-no-folder", lambda c: ["search", str(c.dir / "none"), c.query], "index folder not found"),
    Case("search-folder-is-file", lambda c: ["search", str(c.folder("f", {"x": "1"}) / "x"), c.query], "index folder not found"),
    Case("search-not-an-index", lambda c: ["search", str(c.folder("f", {"notes.txt": "mine"})), c.query], "not a dmlkit index"),
    Case("search-query-missing", lambda c: ["search", str(c.index()), str(c.dir / "no.png")], "query image not found"),
    Case("search-query-garbage", lambda c: ["search", str(c.index()), str(c.folder("q", {"a.png": "not an image"}) / "a.png")], "cannot read image"),
    Case("search-query-empty-folder", lambda c: ["search", str(c.index()), str(c.folder("q", {"notes.txt": "x"}))], "no images under"),
    Case("search-k-zero", lambda c: c.search(c.index(), "-k", "0"), "-k must be >= 1"),
    Case("search-k-word", lambda c: c.search(c.index(), "-k", "many"), "Invalid value"),
    Case("search-timeout-zero", lambda c: c.search(c.index(), "--timeout", "0"), "--timeout must be a positive"),
    Case("search-timeout-nan", lambda c: c.search(c.index(), "--timeout", "nan"), "--timeout must be a positive"),
    Case("search-timeout-inf", lambda c: c.search(c.index(), "--timeout", "inf"), "--timeout must be a positive"),
    Case("search-path-5000", lambda c: ["search", LONG, c.query], ""),
    # --- search --grid: never another file ------------------------------------------------------
    Case("grid-user-file", lambda c: c.search(c.index(), "--grid", str(c.folder("g", {"mine.png": "my notes"}) / "mine.png")), "is not a grid that dmlkit search wrote"),
    Case("grid-user-png", lambda c: c.search(c.index(), "--grid", str(_user_png(c))), "is not a grid that dmlkit search wrote"),
    Case("grid-query-image", lambda c: ["search", str(c.index()), str(_user_png(c)), "--grid", str(_user_png(c))], "is (or lies among) the query images"),
    Case("grid-in-query-folder", lambda c: ["search", str(c.index()), str(c.images()), "--grid", str(c.dir / "imgs" / "g.png")], "lies among) the query images"),
    Case("grid-in-index", lambda c: c.search(c.index(), "--grid", str(c.dir / "idx" / "grid.png")), "lies inside the index folder"),
    Case("grid-jpg", lambda c: c.search(c.index(), "--grid", str(c.dir / "grid.jpg")), "must name a .png file"),
    Case("grid-no-suffix", lambda c: c.search(c.index(), "--grid", str(c.dir / "grid")), "must name a .png file"),
    Case("grid-folder", lambda c: c.search(c.index(), "--grid", str(c.folder("g.png", {"x": "1"}))), "is not a regular file"),
    Case("grid-symlink", lambda c: c.search(c.index(), "--grid", str(_link(c, "g.png", _user_png(c)))), "is not a regular file"),
    # --- export -----------------------------------------------------------------------------------
    Case("export-format", lambda c: ["export", _run_arg(c), "--format", "tflite", "--out", str(c.dir / "e")], "--format takes"),
    Case("export-format-empty", lambda c: ["export", _run_arg(c), "--format", ",", "--out", str(c.dir / "e")], "--format takes"),
    Case("export-run-missing", lambda c: ["export", str(c.dir / "none"), "--out", str(c.dir / "e")], "no checkpoint"),
    Case("export-checkpoint", lambda c: ["export", _run_arg(c), "--checkpoint", "middle", "--out", str(c.dir / "e")], "--checkpoint must be"),
    Case("export-out-file", lambda c: ["export", _run_arg(c), "--out", str(c.folder("f", {"x": "1"}) / "x")], "is a file"),
    Case("export-out-user-files", lambda c: ["export", _run_arg(c), "--out", str(c.folder("e", {"notes.txt": "mine"}))], "holds notes.txt, which dmlkit did not write"),
    Case("export-overwrite-user-files", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(c.folder("e", {"notes.txt": "mine"}))], "holds notes.txt"),
    Case("export-overwrite-user-file-beside-export", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(_export_plus(c, "notes.txt"))], "holds notes.txt"),
    Case("export-overwrite-user-folder-beside-export", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(_export_plus(c, "sub/x"))], "holds sub"),
    Case("export-overwrite-legacy-plus-user", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(c.folder("e", {"export.json": "{}", "model.ts": "", "my.py": "x"}))], "holds my.py"),
    Case("export-overwrite-damaged-manifest", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(c.folder("e", {"export.json": "{}", MANIFEST: "{oops"}))], f"holds {MANIFEST}"),
    Case("export-overwrite-manifest-lies", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(c.folder("e", {"export.json": "{}", MANIFEST: json.dumps({"kind": "export", "files": ["../x"]})}))], f"holds {MANIFEST}"),
    Case("export-overwrite-an-index", lambda c: ["export", _run_arg(c), "--overwrite", "--out", str(c.index())], "holds an index (dmlkit index), not an export"),
    Case("export-without-overwrite", lambda c: ["export", _run_arg(c), "--out", str(_export_plus(c, None))], "pass --overwrite"),
    Case("export-out-is-run", lambda c: ["export", str(_run_copy(c)), "--out", str(c.dir / "run")], "lies inside --out"),
    Case("export-run-inside-out", lambda c: ["export", str(_run_copy(c)), "--out", str(c.dir)], "lies inside --out"),
    Case("export-checkpoint-inside-out", lambda c: ["export", str(_run_copy(c) / "best.pt"), "--out", str(c.dir)], "lies inside --out"),
    Case("export-out-5000", lambda c: ["export", _run_arg(c), "--out", LONG], ""),
    # --- index --------------------------------------------------------------------------------------
    Case("index-images-missing", lambda c: ["index", _run_arg(c), "--images", str(c.dir / "none"), "--out", str(c.dir / "i")], "not a folder of images"),
    Case("index-images-file", lambda c: ["index", _run_arg(c), "--images", c.query, "--out", str(c.dir / "i")], "not a folder of images"),
    Case("index-images-none", lambda c: ["index", _run_arg(c), "--images", str(c.folder("imgs", {"a.txt": "x"})), "--out", str(c.dir / "i")], "no images under"),
    Case("index-images-unreadable", lambda c: ["index", _run_arg(c), "--images", str(c.folder("imgs", {"a.png": "x"})), "--out", str(c.dir / "i")], "--skip-bad"),
    Case("index-images-unreadable-skip", lambda c: ["index", _run_arg(c), "--images", str(c.folder("imgs", {"a.png": "x"})), "--out", str(c.dir / "i"), "--skip-bad"], "no readable images"),
    Case("index-images-inside-out", lambda c: ["index", _run_arg(c), "--images", str(c.images("out/imgs")), "--out", str(c.dir / "out"), "--overwrite"], "--images"),
    Case("index-images-are-out", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--out", str(c.dir / "imgs"), "--overwrite"], "lies inside --out"),
    Case("index-run-inside-out", lambda c: ["index", str(_run_copy(c)), "--images", str(c.images()), "--out", str(c.dir), "--overwrite"], "lies inside --out"),
    Case("index-overwrite-user-notes", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--out", str(c.put("notes.txt", "mine")), "--overwrite"], "holds notes.txt, which dmlkit did not write"),
    Case("index-overwrite-an-export", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--out", str(_export_plus(c, None)), "--overwrite"], "holds an export (dmlkit export), not an index"),
    Case("index-without-overwrite", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--out", str(c.index())], "pass --overwrite"),
    Case("index-factory", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--out", str(c.dir / "i"), "--factory", "Nope9"], "index_factory"),
    Case("index-factory-ivf", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--out", str(c.dir / "i"), "--factory", "IVF4096,Flat"], "cannot train"),
    Case("index-checkpoint", lambda c: ["index", _run_arg(c), "--images", str(c.images()), "--checkpoint", "x"], "--checkpoint must be"),
    Case("index-digits-run", lambda c: ["index", str(_digits_run(c)), "--images", str(c.images()), "--out", str(c.dir / "i")], "tensors, not image files"),
]
# fmt: on

_DIGITS: dict[str, Path] = {}


def _digits_run(c: Ctx) -> Path:
    """A run trained on tensors (made once; outside the case folder)."""
    if not _DIGITS:
        from test_fuzz import TINY, _main

        run = c.res["base"] / "digits"
        code, _, err = _main("train", *TINY, "--run-dir", str(run))
        assert code == 0, err
        _DIGITS["run"] = run
    return _DIGITS["run"]


def _user_png(c: Ctx) -> Path:
    from PIL import Image

    path = c.dir / "photo.png"
    if not path.exists():
        Image.new("RGB", (20, 20), (200, 10, 10)).save(path)
    return path


def _link(c: Ctx, name: str, target: Path) -> Path:
    (c.dir / name).symlink_to(target)
    return c.dir / name


def _run_copy(c: Ctx) -> Path:
    run = c.dir / "run"
    if not run.exists():
        shutil.copytree(c.res["run"], run)
    return run


def _export_plus(c: Ctx, extra: str | None) -> Path:
    """A folder holding a real export (its manifest included), and a user's file or folder."""
    out = c.dir / "e"
    shutil.copytree(c.res["export"], out)
    if extra:
        (out / extra).parent.mkdir(parents=True, exist_ok=True)
        (out / extra).write_text("mine")
    return out


@pytest.fixture(scope="module")
def resources(res, tmp_path_factory) -> dict[str, Path]:
    """The run and index, plus a real export of the run."""
    from test_fuzz import _main

    export = tmp_path_factory.mktemp("export") / "e"
    code, _, err = _main("export", str(res["run"]), "--format", "torchscript", "--out", str(export))
    assert code == 0, err
    return {**res, "export": export}


def test_the_table_is_large_enough():
    assert len(CASES) >= 130 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_with_one_line_and_changes_nothing(case, resources, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    line = bad_input_case(cli, tmp_path / "case", lambda work: case.build(Ctx(work, resources)), case.match, case.id)
    if DAMAGED in line:
        assert "rebuild it with dmlkit index" in line, line


# --- never a hang: FIFOs and a model that never ends, as real processes ------------------------------
HANGS = {
    "fifo-index-json": ("index.json", "index.json is not a regular file"),
    "fifo-items-json": ("items.json", "items.json is not a regular file"),
    "fifo-preprocessing": ("preprocessing.json", "preprocessing.json is not a regular file"),
    "fifo-model": ("model.ts", "model.ts is not a regular file"),
    "fifo-faiss": ("index.faiss", "index.faiss is not a regular file"),
    "fifo-manifest-on-overwrite": (MANIFEST, f"holds {MANIFEST}"),
    "fifo-query": (None, "is not a regular file or a folder"),
    "fifo-grid": (None, "is not a regular file"),
    "fifo-neighbour-in-grid": (None, ""),
    "never-ending-model": ("model.ts", "did not finish within 3 s"),
}


def test_a_fifo_or_a_never_ending_model_is_an_error_not_a_hang(resources, tmp_path):
    procs = []
    for cid, (name, _) in HANGS.items():
        work = tmp_path / cid
        work.mkdir()
        c = Ctx(work, resources)
        if cid == "never-ending-model":
            argv = c.search(c.put(name, Forever()), "--timeout", "3")
        elif cid == "fifo-manifest-on-overwrite":
            out = _export_plus(c, None)
            (out / MANIFEST).unlink()
            os.mkfifo(out / MANIFEST)
            argv = ["export", _run_arg(c), "--format", "torchscript", "--overwrite", "--out", str(out)]
        elif cid == "fifo-query":
            os.mkfifo(work / "q.png")
            argv = ["search", str(c.index()), str(work / "q.png")]
        elif cid == "fifo-grid":
            os.mkfifo(work / "g.png")
            argv = c.search(c.index(), "--grid", str(work / "g.png"))
        elif cid == "fifo-neighbour-in-grid":  # an indexed image replaced by a FIFO since: drawn as missing
            imgs = c.images()
            code_out = run_processes([Proc("i", ["index", _run_arg(c), "--images", str(imgs), "--out", "idx"], work)])
            assert code_out["i"][0] == 0, code_out["i"][2]
            victim = sorted(imgs.rglob("*.png"))[1]
            victim.unlink()
            os.mkfifo(victim)
            argv = ["search", "idx", str(sorted(imgs.rglob("*.png"))[0]), "-k", "12", "--grid", "g.png"]
        else:
            argv = c.search(c.put(name, FIFO, rehash=False))
        procs.append(Proc(cid, argv, work, limit=300))
    done = run_processes(procs)
    for cid, (code, out, err, took) in done.items():
        assert "hung" not in err, (cid, took)
        if cid == "fifo-neighbour-in-grid":
            assert code == 0 and (tmp_path / cid / "g.png").is_file(), err
            continue
        line = one_error_line(code, out, err, HANGS[cid][1], cid)
        if cid == "never-ending-model":
            assert "is damaged" in line and code == 1


# --- what works: --overwrite, --grid, an index of 0.1 ------------------------------------------------
def test_overwrite_replaces_dmlkits_files_and_refuses_once_a_user_file_is_there(resources, tmp_path, cli):
    images = tmp_path / "imgs"
    shutil.copytree(resources["data"] / "test", images)
    out = tmp_path / "idx"
    argv = ["index", str(resources["run"]), "--images", str(images), "--out", str(out)]
    assert cli(*argv)[0] == 0
    first = snapshot(out)
    code, _, err = cli(*argv, "--overwrite")
    assert code == 0, err
    assert set(snapshot(out)) == set(first) and json.loads((out / MANIFEST).read_text())["kind"] == "index"
    (out / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    code, out_text, err = cli(*argv, "--overwrite")
    one_error_line(code, out_text, err, "holds notes.txt, which dmlkit did not write")
    unchanged(tmp_path, before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_index_of_dmlkit_0_1_searches_and_is_replaced_by_overwrite(resources, tmp_path, cli):
    """0.1 wrote no manifest and no checksums: its known files are dmlkit's, and search checks the rest."""
    idx = tmp_path / "idx"
    shutil.copytree(resources["index"], idx)
    (idx / MANIFEST).unlink()
    meta = json.loads((idx / "index.json").read_text())
    meta.pop("files")
    meta["version"] = 1
    (idx / "index.json").write_text(json.dumps(meta))
    query = resources["data"] / "test" / "c4" / "0.png"
    code, out, err = cli("search", str(idx), str(query), "-k", "1", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["results"][0]["path"] == str(query.resolve())
    code, _, err = cli("index", str(resources["run"]), "--images", str(resources["data"] / "test"), "--out", str(idx),
                       "--overwrite")  # fmt: skip
    assert code == 0, err
    assert json.loads((idx / "index.json").read_text())["version"] == INDEX_VERSION


def test_search_redraws_its_own_grid(resources, tmp_path, cli):
    grid = tmp_path / "grid.png"
    query = str(resources["data"] / "test" / "c4" / "0.png")
    for _ in range(2):
        code, _, err = cli("search", str(resources["index"]), query, "--grid", str(grid))
        assert code == 0, err
    from PIL import Image

    with Image.open(grid) as img:
        assert img.info.get("Software") == "dmlkit search --grid"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_export_overwrite_keeps_nothing_but_the_new_export(resources, tmp_path, cli):
    out = tmp_path / "e"
    shutil.copytree(resources["export"], out)
    code, _, err = cli("export", str(resources["run"]), "--format", "pt2", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"model.pt2", "preprocessing.json", "export.json", MANIFEST}
