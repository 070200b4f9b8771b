"""After training: export a run's embedding model, index a folder of images, search the index.

``dmlkit export RUN`` writes the model for inference (TorchScript, ONNX, torch.export) with
``preprocessing.json``, the exact steps that turn an image file into the model's input, and
checks every file it writes against the run's own model. ``dmlkit index RUN --images DIR``
embeds a folder into a faiss index that carries its own TorchScript model and preprocessing,
so that ``dmlkit search INDEX IMAGE...`` needs nothing but the index folder. ``dmlkit classify``
gives an image's k-NN class among the indexed ones, ``dmlkit index INDEX --add/--remove`` grows or
shrinks an index with its own model, and ``dmlkit evaluate-index`` measures retrieval through it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import dmlkit
from dmlkit import interrupts
from dmlkit.data import Problems, Split, load_image
from dmlkit.errors import DataError, DmlkitError
from dmlkit.rundir import writable_error
from dmlkit_plugins.datasets import IMAGE_SUFFIXES

console = Console()
err_console = Console(stderr=True)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}
TOLERANCE = 1e-5  # the largest |difference| from the run's own embeddings an exported file may have
INDEX_FORMAT = "dmlkit-index"
INDEX_VERSION = 3  # 2: index.json records each file's size and SHA-256; 3: items' classes, the model's fingerprint


# ------------------------------------------------------------------------------- preprocessing
def describe_transform(transform: Any) -> list[dict[str, Any]]:
    """A torchvision test transform as a list of plain steps (``op`` and its arguments).

    A step dmlkit cannot name is kept as ``{"op": "unknown", "repr": ...}``:
    :func:`build_transform` refuses it, and ``dmlkit export`` warns about it.
    """
    from torchvision import transforms as T

    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    out: list[dict[str, Any]] = []
    for s in steps:
        if isinstance(s, T.Resize):
            size = s.size if isinstance(s.size, int) else list(s.size)
            out.append(
                {"op": "resize", "size": size, "interpolation": s.interpolation.value, "antialias": bool(s.antialias)}
            )
            if s.max_size is not None:
                out[-1]["max_size"] = s.max_size
        elif isinstance(s, T.CenterCrop):
            out.append({"op": "center_crop", "size": list(s.size)})
        elif isinstance(s, T.ToTensor):
            out.append({"op": "to_tensor"})
        elif isinstance(s, T.Normalize):
            out.append({"op": "normalize", "mean": [float(m) for m in s.mean], "std": [float(v) for v in s.std]})
        elif isinstance(s, T.Grayscale):
            out.append({"op": "grayscale", "channels": s.num_output_channels})
        else:
            out.append({"op": "unknown", "repr": repr(s)})
    return out


def build_transform(steps: list[dict[str, Any]]) -> Callable[[Any], torch.Tensor]:
    """The torchvision transform that :func:`describe_transform` described."""
    from torchvision import transforms as T

    made: list[Any] = []
    for s in steps:
        op = s.get("op")
        if op == "resize":
            made.append(
                T.Resize(
                    s["size"],
                    T.InterpolationMode(s.get("interpolation", "bilinear")),
                    max_size=s.get("max_size"),
                    antialias=s.get("antialias", True),
                )
            )
        elif op == "center_crop":
            made.append(T.CenterCrop(s["size"]))
        elif op == "to_tensor":
            made.append(T.ToTensor())
        elif op == "normalize":
            made.append(T.Normalize(s["mean"], s["std"]))
        elif op == "grayscale":
            made.append(T.Grayscale(s["channels"]))
        else:
            raise DmlkitError(
                f"preprocessing step {s.get('repr', op)!r} is not one dmlkit can rebuild; apply the run's "
                "test transform in your own code"
            )
    return T.Compose(made)


def preprocessing(trainer: Any, shape: list[int]) -> dict[str, Any]:
    """What an inference client does to a file before the model: colour mode, then the steps."""
    split = trainer.test_split
    out = {
        "input_name": "images",
        "output_name": "embeddings",
        "input_shape": ["batch", *shape],
        "dtype": "float32",
        "embedding_size": int(trainer.embedding_size),
        "normalized": bool(trainer.settings["normalize_embeddings"]),
        "distance": "euclidean",
    }
    if split.transform is None or not _is_path(split.items[0]):
        return {
            "input": "tensor",
            "note": f"dataset '{trainer.cfg['dataset']['name']}' feeds the model tensors, not image files",
            **out,
        }
    return {"input": "image", "color_mode": split.mode, "steps": describe_transform(split.transform), **out}


def _is_path(item: Any) -> bool:
    return isinstance(item, str | Path)


def image_input(prep: dict[str, Any], where: str) -> tuple[str, Callable[[Any], torch.Tensor]]:
    """The colour mode and transform that turn an image file into the model's input."""
    if prep.get("input") != "image":
        raise DmlkitError(
            f"{where}: {prep.get('note', 'the model takes tensors, not image files')}; index and search need a run "
            "trained on images (imagefolder, cub200, ...)"
        )
    return prep["color_mode"], build_transform(prep["steps"])


# ----------------------------------------------------------------------------------- export
def _sample(trainer: Any, n: int = 8) -> torch.Tensor:
    """A batch of real test inputs, through the run's own test transform (at least 2: a batch of
    one would let an exporter fix the batch size)."""
    split = trainer.test_split
    take = [split[i][0] for i in range(min(n, len(split)))]
    while len(take) < 2:
        take.append(take[0])
    return torch.stack(take).float()


def _exportable(trainer: Any) -> torch.nn.Module:
    model = copy.deepcopy(trainer.model).float().cpu().eval()
    model.backbone_frozen = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(memory_format=torch.contiguous_format)


def _write_torchscript(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks torch.jit deprecated; the file format is stable
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda batch: loaded(batch).numpy()


def _require_onnx() -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise DmlkitError(
                f"--format onnx needs the {package} package: pip install 'dmlkit[onnx]' (or --format torchscript,pt2)"
            ) from None


def _write_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    _require_onnx()
    import contextlib
    import io

    import onnxruntime

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["embeddings"], {"images": batch.numpy()})[0]


def _write_pt2(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
    return lambda batch: loaded(batch).numpy()


WRITERS = {"torchscript": _write_torchscript, "onnx": _write_onnx, "pt2": _write_pt2}


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise DmlkitError(f"--format takes a comma-separated list of {', '.join(FORMATS)}; got {text!r}")
    if "onnx" in formats:
        _require_onnx()  # before any work
    return list(dict.fromkeys(formats))


def export_model(
    trainer: Any,
    out: Path,
    formats: list[str],
    say: Console | None = None,
    operating_point: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``formats`` and ``preprocessing.json`` into ``out``; every file is loaded back and its
    embeddings compared with the run's model on real test inputs (the whole batch and one image).
    A file off by more than :data:`TOLERANCE` is an error. Returns what ``export.json`` holds, with
    ``operating_point`` (:func:`calibrate`) when one is given."""
    model = _exportable(trainer)
    x = _sample(trainer)
    with torch.no_grad():
        reference = model(x).numpy()
    prep = preprocessing(trainer, list(x.shape[1:]))
    if prep["input"] == "image" and any(s["op"] == "unknown" for s in prep["steps"]):
        unknown = [s["repr"] for s in prep["steps"] if s["op"] == "unknown"]
        (say or console).print(
            f"[yellow]warning: the run's test transform has steps preprocessing.json cannot describe "
            f"({escape(', '.join(unknown))}); clients must apply them themselves[/yellow]"
        )
    files: dict[str, Any] = {}
    for fmt in formats:
        path = out / FORMATS[fmt]
        try:
            run = WRITERS[fmt](model, x, path)
            with torch.no_grad():
                diff = max(float(np.abs(run(x) - reference).max()), float(np.abs(run(x[:1]) - reference[:1]).max()))
        except DmlkitError:
            raise
        except Exception as exc:
            path.unlink(missing_ok=True)
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise DmlkitError(
                f"{fmt} export of this model failed: {type(exc).__name__}: {first}; try another --format"
            ) from None
        if not diff <= TOLERANCE:
            path.unlink(missing_ok=True)
            raise DmlkitError(
                f"the {fmt} model's embeddings differ from the run's by {diff:.2e} (> {TOLERANCE:g}); "
                "the file was not kept: export another --format, and report this"
            )
        files[fmt] = {"file": path.name, "max_abs_diff": diff}
    _write_json(out / "preprocessing.json", prep)
    record = {
        "run": str(trainer.run_dir.resolve()),
        "checkpoint": getattr(trainer, "checkpoint_file", "last.pt"),
        "epoch": trainer.epoch,
        "selected_by": trainer.best.get("selected_by"),
        "backbone": trainer.cfg["backbone"],
        "files": files,
        "checked_on": f"{len(x)} test inputs of the run, and 1; tolerance {TOLERANCE:g}",
        "dmlkit": dmlkit.__version__ if hasattr(dmlkit, "__version__") else "",
        "torch": torch.__version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if operating_point is not None:
        record["operating_point"] = operating_point
    _write_json(out / "export.json", record)
    return record


# -------------------------------------------------------------------------- operating point
#: The false match rate that ``dmlkit export`` and ``dmlkit index`` calibrate the threshold for by default.
DEFAULT_FMR = 1e-3


def calibrate(trainer: Any, fmr: float, say: Console | None = None) -> dict[str, Any] | None:
    """The run's operating point: the distance threshold at FMR ``fmr`` (and the EER point),
    chosen on the run's validation split (classes held out of training, as a deployed model meets
    new ones), in the space the index searches (the model's own embeddings, float32), with the
    FMR and FNMR that threshold gives on the test split. A run's results.json that already holds
    an ``operating_point`` for this FMR is used as it is. None, with a warning, when the run has
    no validation split or it cannot resolve ``fmr``."""
    from dmlkit.decisions import operating_point, rates_at

    say = say or err_console
    try:
        recorded = json.loads(_read_regular(trainer.run_dir / "results.json", SMALL_JSON)).get("operating_point")
    except (DmlkitError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("fmr_target") == fmr and _is_number(recorded.get("threshold")):
        return recorded
    if trainer.val_split is None:
        say.print(
            "[yellow]warning: the run has no validation split (val_fraction = 0), so no match threshold was "
            "calibrated; dmlkit search will list neighbours without a match decision unless given --threshold[/yellow]",
            soft_wrap=True,
        )
        return None
    trainer.settings = trainer.settings.replace(amp=False)  # float32, as the index embeds
    val = trainer.val_split
    emb, lab = trainer.embed(val, "embedding the validation split for the match threshold")
    try:
        point = operating_point(emb, lab, val.query_mask, val.gallery_mask, fmr=fmr)
    except DmlkitError as exc:
        say.print(f"[yellow]warning: no match threshold calibrated: {escape(str(exc))}[/yellow]", soft_wrap=True)
        return None
    point["calibrated_on"] = f"validation split: {len(lab):,} images of {len(np.unique(lab)):,} classes"
    test = trainer.test_split
    emb, lab = trainer.embed(test, "embedding the test split to report the threshold's error rates")
    try:
        rates = rates_at(emb, lab, point["threshold"], test.query_mask, test.gallery_mask)
        point["test"] = {k: rates[k] for k in ("fmr", "fnmr", "genuine_pairs", "impostor_pairs")}
    except DmlkitError:  # a test split without two classes: the threshold still stands
        pass
    return point


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise writable_error(path, exc, "file") from None


#: The file in an export or index folder that lists what dmlkit wrote there (``--overwrite`` replaces only those).
MANIFEST = ".dmlkit-files.json"
#: What dmlkit 0.1 wrote into an export or an index folder (before the manifest): its ``--overwrite`` replaces these.
LEGACY_FILES = {
    "export.json": {"export.json", "preprocessing.json", *FORMATS.values()},
    "index.json": {"index.json", "items.json", "index.faiss", "preprocessing.json", "export.json", "model.ts"},
}
KINDS = {"export.json": "export", "index.json": "index"}


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def ours(out: Path, marker: str) -> set[str] | None:
    """The names of the files dmlkit wrote into ``out`` when it holds a folder of this kind (its
    manifest, or a 0.1 folder's known files); None when it holds no such folder."""
    if not (out / marker).is_file():
        return None
    if not (out / MANIFEST).exists() and not (out / MANIFEST).is_symlink():
        return LEGACY_FILES[marker]
    try:
        record = json.loads(_read_regular(out / MANIFEST, 1 << 20))
        listed = record["files"]
        if record.get("kind") == KINDS[marker] and all(isinstance(f, str) and f == Path(f).name for f in listed):
            return {*listed, MANIFEST}
    except (DmlkitError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _manifest_kind(out: Path) -> str | None:
    """The kind of result (export, index) that ``out``'s manifest describes, if it can be read."""
    try:
        kind = json.loads(_read_regular(out / MANIFEST, 1 << 20)).get("kind")
    except (DmlkitError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


class _NewFolder:
    """Write a folder's files into a sibling temporary folder, then put it in place: a failure or an
    interrupt leaves the old folder (or none) as it was. An existing folder is replaced only when
    ``replace`` says so and every entry in it is a file dmlkit wrote there (:data:`MANIFEST`):
    nothing a user put there is ever deleted."""

    def __init__(self, out: Path, marker: str, replace: bool, what: str, inputs: dict[str, Path]):
        self.check(out, marker, replace, what, inputs)
        self.out, self.marker, self.what = out, marker, what
        self.created: list[Path] = []  # parent folders this command made (removed again on failure)

    @staticmethod
    def check(out: Path, marker: str, replace: bool, what: str, inputs: dict[str, Path]) -> None:
        """Refuse a file, a folder holding files dmlkit did not write, an input inside it, or an
        earlier result without ``--overwrite``."""
        for flag, path in inputs.items():
            if _inside(path, out):
                raise DmlkitError(
                    f"{flag} {path} lies inside --out {out}: writing there could replace it; pick an --out folder "
                    "outside it"
                )
        if not out.exists() and not out.is_symlink():
            return
        if not out.is_dir():
            raise DmlkitError(f"--out {out} is a file; --out names a folder")
        entries = sorted(out.iterdir())
        if not entries:
            return
        known = ours(out, marker)
        other = _manifest_kind(out)
        if known is None and other in KINDS.values() and other != KINDS[marker]:
            raise DmlkitError(
                f"--out {out} holds {'an index' if other == 'index' else 'an export'} (dmlkit {other}), not "
                f"{what}; pick an empty or new --out folder"
            )
        if known is None and ((out / MANIFEST).exists() or (out / MANIFEST).is_symlink()):
            raise DmlkitError(
                f"--out {out} holds {MANIFEST}, which is not dmlkit's list of the files of {what} there, so dmlkit "
                "cannot tell its files from yours: pick an empty or new --out folder"
            )
        foreign = [e for e in entries if known is None or e.name not in known or e.is_symlink() or not e.is_file()]
        if foreign:
            raise DmlkitError(
                f"--out {out} holds {foreign[0].name}, which dmlkit did not write there; dmlkit never replaces "
                "files it did not write: pick an empty or new --out folder"
            )
        if not replace:
            raise DmlkitError(f"{out} already holds {what}; pass --overwrite to replace it, or pick another --out")

    def __enter__(self) -> Path:

        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self.created.append(folder)
            self.tmp = _new_name(self.out, "tmp")
            self.tmp.mkdir()  # a new name: never a folder that holds anything
        except OSError as exc:
            self._remove_created()
            raise writable_error(self.out.parent, exc, "to folder") from None
        return self.tmp

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_created()
            return
        files = sorted([p.name for p in self.tmp.iterdir()] + [MANIFEST])
        _write_json(self.tmp / MANIFEST, {"written_by": "dmlkit", "kind": KINDS[self.marker], "files": files})
        with interrupts.deferred():  # the two renames are never separated by Ctrl-C
            old = None
            try:
                self.check(self.out, self.marker, True, self.what, {})  # again: a file may have appeared since
                if self.out.exists() and _exchange(self.tmp, self.out):
                    old = self.tmp  # one step: even a kill leaves the old folder or the new one at out
                elif self.out.exists():
                    old = _new_name(self.out, "old")
                    os.rename(self.out, old)
                    os.replace(self.tmp, self.out)
                else:
                    os.replace(self.tmp, self.out)
            except (OSError, DmlkitError) as exc:
                if old is not None and not self.out.exists():
                    os.replace(old, self.out)
                shutil.rmtree(self.tmp, ignore_errors=True)
                if old is not None and old.exists():
                    old.rmdir()
                if isinstance(exc, DmlkitError):
                    raise
                raise writable_error(self.out, exc, "to folder") from None
        if old is not None:  # only dmlkit's files were in it (checked above); anything else stays
            for name in ours(old, self.marker) or ():
                with contextlib.suppress(OSError):
                    (old / name).unlink()
            try:
                old.rmdir()
            except OSError:  # a file appeared there while this command ran: keep it
                err_console.print(
                    f"[yellow]warning: files that appeared in {escape(str(self.out))} while dmlkit wrote it are "
                    f"kept in {escape(str(old))}[/yellow]",
                    soft_wrap=True,
                )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where
    the system or its file system cannot, and nothing was changed."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _new_name(out: Path, what: str) -> Path:
    """A name beside ``out`` that nothing has: ``.OUT.tmp-PID-RANDOM``."""
    import secrets

    return out.parent / f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}"


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes. Anything else (a FIFO, a device, a folder) is refused without
    blocking: the file is opened non-blocking and checked before it is read."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DmlkitError(f"{path.name} cannot be opened ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DmlkitError(f"{path.name} is not a regular file")
    if limit is not None and info.st_size > limit:
        os.close(fd)
        raise DmlkitError(f"{path.name} is {info.st_size:,} bytes, more than the {limit:,} it can be")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _load(run: Path, checkpoint: str) -> Any:
    from dmlkit.train import load_run

    return load_run(run, checkpoint, console=console, err_console=err_console)


def _run_folder(run: Path) -> Path:
    """The run directory of a run argument (a directory, or a checkpoint file in one)."""
    return run if run.is_dir() else run.parent


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the model files (default RUN/export).")] = None,
    format: Annotated[
        str, typer.Option("--format", help="Comma-separated: torchscript, onnx, pt2 (torch.export).")
    ] = "torchscript,onnx",
    checkpoint: Annotated[str, typer.Option(help="With a run directory: best or last.")] = "best",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export in --out (only the files dmlkit wrote).")
    ] = False,
    fmr: Annotated[
        float, typer.Option(help="False match rate the match threshold is calibrated for, on the validation split.")
    ] = DEFAULT_FMR,
) -> None:
    """Export a run's embedding model for inference, with preprocessing.json; each file is checked
    against the run's own embeddings (to 1e-5)."""
    formats = parse_formats(format)
    check_fmr(fmr)
    inputs = {"RUN": _run_folder(run)}
    if out is not None:
        _NewFolder.check(out, "export.json", overwrite, "an export", inputs)  # before any work
    trainer = _load(run, checkpoint)
    out = out or (trainer.run_dir / "export")
    point = calibrate(trainer, fmr)
    with _NewFolder(out, "export.json", overwrite, "an export", inputs) as tmp:
        with console.status(f"exporting {', '.join(formats)}"):
            record = export_model(trainer, tmp, formats, operating_point=point)
    table = Table(title=Text(f"{out}: epoch {record['epoch']} ({record['checkpoint']})"))
    table.add_column("format")
    table.add_column("file")
    table.add_column("max |difference| from the run", justify="right")
    for fmt, info in record["files"].items():
        table.add_row(fmt, info["file"], f"{info['max_abs_diff']:.1e}")
    console.print(table)
    console.print(f"wrote {escape(str(out / 'preprocessing.json'))}: what a client does to an input before the model")
    say_operating_point(point)


def check_fmr(fmr: float) -> None:
    if not 0 < fmr < 1:
        raise DmlkitError(f"--fmr must lie between 0 and 1 (a false match rate such as 1e-3); got {fmr}")


def say_operating_point(point: dict[str, Any] | None) -> None:
    if point is None:
        return
    line = (
        f"match threshold {point['threshold']:.4f} (distance; FMR {point['fmr']:.2g}, FNMR {point['fnmr']:.3f} on the "
        f"{point.get('calibrated_on', 'calibration pairs')}; EER {point['eer']:.3f} at {point['eer_threshold']:.4f})"
    )
    if "test" in point:
        line += f"; on the test split: FMR {point['test']['fmr']:.2g}, FNMR {point['test']['fnmr']:.3f}"
    console.print(escape(line), soft_wrap=True)


# ------------------------------------------------------------------------------------ index
def image_files(paths: list[Path], what: str) -> list[Path]:
    """Image files: each path itself, or the images under a folder (sorted, recursively). Only
    regular files: a FIFO or a device is never opened (reading one could wait for ever)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not inside:
                raise DataError(f"no images under {p} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif p.is_file():
            found.append(p)
        elif p.exists():
            raise DataError(f"{what} {p} is not a regular file or a folder")
        else:
            raise DataError(f"{what} not found: {p}")
    return found


def _digest(path: Path) -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def index_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint; with --add or --remove, the index folder.")],
    paths: Annotated[
        list[Path] | None, typer.Argument(help="With --add: images (files or folders); with --remove: indexed paths.")
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder of images to index (searched recursively).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the index (default: index).")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="With a run directory: best (default) or last.")] = None,
    factory: Annotated[
        str | None, typer.Option(help="faiss index_factory string: Flat (exact, default), HNSW32, IVF256,Flat ...")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave unreadable images out instead of failing.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier index in --out (only the files dmlkit wrote).")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, max=65536, help="Images per forward pass (default: the run's).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Embed on auto, cpu, cuda or cuda:N (default: the run's).")
    ] = None,
    fmr: Annotated[
        float | None,
        typer.Option(
            help=f"False match rate the match threshold is calibrated for, on the validation split "
            f"(default {DEFAULT_FMR:g})."
        ),
    ] = None,
    add: Annotated[
        bool, typer.Option("--add", help="Add the images PATHS to the index RUN names, embedded by its own model.")
    ] = False,
    remove: Annotated[
        bool,
        typer.Option("--remove", help="Remove the indexed images PATHS (or those under a folder) from a Flat index."),
    ] = False,
) -> None:
    """Embed a folder of images with a run's model into a faiss index on disk, with the files'
    paths and classes (their folders) and the model and preprocessing that `dmlkit search` needs;
    or, with --add / --remove, grow or shrink an index without embedding again what it holds."""
    if add or remove:
        given = {"--images": images, "--out": out, "--checkpoint": checkpoint, "--factory": factory, "--fmr": fmr}
        given |= {"--device": device, "--overwrite": overwrite or None}
        wrong = [flag for flag, v in given.items() if v is not None]
        if wrong:
            raise DmlkitError(
                f"{wrong[0]} builds an index from a run; --add and --remove change the index INDEX with its own model "
                "and files: leave it out"
            )
        update_index(run, paths or [], add, remove, skip_bad, batch_size)
        return
    if paths:
        raise DmlkitError(f"dmlkit index takes one RUN; {paths[0]} is one too many (image paths follow --add)")
    if images is None:
        raise DmlkitError("dmlkit index RUN needs --images DIR (or: dmlkit index INDEX --add IMAGES...)")
    out, checkpoint, factory = out or Path("index"), checkpoint or "best", factory or "Flat"
    fmr = DEFAULT_FMR if fmr is None else fmr
    import faiss

    from dmlkit.runtime import resolve_device

    dev = resolve_device(device) if device is not None else None  # a bad name fails before any work
    if not images.is_dir():
        raise DataError(f"--images {images} is not a folder of images")
    check_fmr(fmr)
    inputs = {"--images": images, "RUN": _run_folder(run)}
    _NewFolder.check(out, "index.json", overwrite, "an index", inputs)  # before any work
    files = image_files([images], "--images folder")
    trainer = _load(run, checkpoint)
    if dev is not None:
        trainer.device = dev
        trainer.model.to(dev)
    try:
        index = faiss.index_factory(int(trainer.embedding_size), factory, faiss.METRIC_L2)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DmlkitError(
            f"--factory {factory!r} is not a faiss index_factory string ({first}); e.g. Flat, HNSW32"
        ) from None
    prep = preprocessing(trainer, list(_sample(trainer, 2).shape[1:]))
    mode, _ = image_input(prep, "dmlkit index")
    split = Split([str(f) for f in files], np.zeros(len(files), np.int64), trainer.test_split.transform, mode)
    skipped = 0
    if skip_bad:
        keep = Problems(skip_bad=True).readable(split.items)
        skipped = int((~keep).sum())
        if not keep.any():
            raise DataError(f"no readable images under {images}")
        if skipped:
            files = [f for f, k in zip(files, keep) if k]
            split = Split([str(f) for f in files], np.zeros(len(files), np.int64), split.transform, mode)
            err_console.print(f"[yellow]warning: left out {skipped} unreadable image(s)[/yellow]")
        if not files:
            raise DataError(f"no readable images under {images}")
    # float32, as search embeds its queries: an image finds itself at distance 0
    trainer.settings = trainer.settings.replace(
        amp=False, eval_batch_size=batch_size or trainer.settings.eval_batch_size
    )
    try:
        emb, _ = trainer.embed(split, "images to index")
    except DataError as exc:
        from dmlkit.cli import one_line

        raise DataError(f"{one_line(str(exc))} (pass --skip-bad to leave unreadable images out)") from None
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = files[int(np.flatnonzero(~np.isfinite(emb).all(1))[0])]
        raise DmlkitError(f"the run's model gives NaN or inf embeddings (first for {bad}); nothing was indexed")
    if not index.is_trained:
        try:
            index.train(emb)
        except Exception as exc:
            raise DmlkitError(
                f"cannot train the {factory} index on {len(emb)} images: {exc}; use --factory Flat"
            ) from None
    index.add(emb)
    point = calibrate(trainer, fmr)
    root = images.resolve()  # paths stay as found under it: a symlink to a file elsewhere keeps its name
    items = {
        "root": str(root),
        "paths": [str(f.relative_to(images)) for f in files],
        "classes": [class_of(f) for f in files],
    }
    with _NewFolder(out, "index.json", overwrite, "an index", inputs) as tmp:
        record = export_model(trainer, tmp, ["torchscript"], operating_point=point)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "dim": int(emb.shape[1]),
            "factory": factory,
            "metric": "euclidean",
            "model": FORMATS["torchscript"],
            "preprocessing": "preprocessing.json",
            "run": record["run"],
            "checkpoint": record["checkpoint"],
            "epoch": record["epoch"],
            "skipped": skipped,
            "created": record["exported"],
            **({"operating_point": point} if point is not None else {}),
        }
        _write_index(tmp, index, items, meta)
    console.print(f"indexed {index.ntotal:,} images ({emb.shape[1]}-d, {factory}) in {escape(str(out))}/")
    say_operating_point(point)


def class_of(path: Path) -> str:
    """An image's class as an index records it: the name of the folder it lies in."""
    return Path(os.path.abspath(path)).parent.name


def fingerprint(files: dict[str, Any], model: str, prep: str) -> str:
    """The fingerprint of the model and preprocessing that embedded an index's vectors: the SHA-256
    of their two SHA-256 digests (as index.json's ``files`` records them)."""
    import hashlib

    return hashlib.sha256(f"{files[model]['sha256']}\n{files[prep]['sha256']}".encode()).hexdigest()


def _write_index(tmp: Path, index: Any, items: dict[str, Any], meta: dict[str, Any]) -> None:
    """index.faiss, items.json and index.json (with the files' digests and the fingerprint) into
    ``tmp``, which already holds the model and preprocessing.json."""
    import faiss

    faiss.write_index(index, str(tmp / "index.faiss"))
    _write_json(tmp / "items.json", items)
    checked = ("index.faiss", "items.json", meta["model"], meta["preprocessing"])
    files = {name: _digest(tmp / name) for name in checked}
    meta = {**meta, "count": int(index.ntotal), "files": files}
    meta["fingerprint"] = fingerprint(files, meta["model"], meta["preprocessing"])
    _write_json(tmp / "index.json", meta)


def update_index(folder: Path, paths: list[Path], add: bool, remove: bool, skip_bad: bool, batch: int | None) -> None:
    """``dmlkit index INDEX --add PATHS`` / ``--remove PATHS``: new images embedded by the index's
    own model (its fingerprint holds) and added to its faiss index; or indexed images removed by
    rebuilding a Flat index from its stored vectors. Nothing is embedded again. The new folder is
    written beside the old one and swapped in (:class:`_NewFolder`): a failure or a kill leaves
    the old index."""
    import faiss

    if add and remove:
        raise DmlkitError("give --add or --remove, not both: run one, then the other")
    if not paths:
        raise DmlkitError(f"--{'add' if add else 'remove'} needs image paths after the index folder")
    loaded = LoadedIndex(folder)
    classes = loaded.need_classes(f"--{'add' if add else 'remove'}")
    _NewFolder.check(folder, "index.json", True, "an index", {})  # only dmlkit's files in it: before any work
    before = _digest(folder / "index.json")
    full = loaded.full_paths()
    index, root = loaded.index, str(loaded.root)
    if add:
        for p in paths:
            if _inside(p, folder):
                raise DmlkitError(f"--add {p} lies inside the index folder {folder}; add images from elsewhere")
        files = list(dict.fromkeys(Path(os.path.abspath(f)) for f in image_files(paths, "--add image")))
        known = set(full)
        again = next((f for f in files if str(f) in known), None)
        if again is not None:
            raise DmlkitError(f"{again} is already in index {folder}; --remove it first to embed it again")
        if skip_bad:
            keep = Problems(skip_bad=True).readable([str(f) for f in files])
            if not keep.all():
                err_console.print(f"[yellow]warning: left out {int((~keep).sum())} unreadable image(s)[/yellow]")
            files = [f for f, k in zip(files, keep) if k]
            if not files:
                raise DataError("no readable image to add; the index is unchanged")
        try:
            emb = loaded.embed(files, batch or 64)
        except DataError as exc:
            raise DataError(f"{exc} (pass --skip-bad to leave unreadable images out); the index is unchanged") from None
        index.add(emb)
        new_root = os.path.commonpath([root, *(str(f.parent) for f in files)])  # every path stays under the root
        items = {
            "root": new_root,
            "paths": [os.path.relpath(f, new_root) for f in [*full, *map(str, files)]],
            "classes": [*classes, *(class_of(f) for f in files)],
        }
        change = {"added": len(files)}
    else:
        gone = loaded.select(paths)
        if not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
            raise DmlkitError(
                f"--remove needs a Flat index; {folder} is {loaded.meta.get('factory')!r}, from which faiss cannot "
                "delete vectors: rebuild it without those images (dmlkit index RUN --images DIR --overwrite)"
            )
        keep = [i for i in range(index.ntotal) if i not in gone]
        if not keep:
            raise DmlkitError(f"--remove would leave index {folder} empty; delete the folder instead")
        vectors = _all_vectors(index)
        index = faiss.IndexFlatL2(index.d)
        index.add(np.ascontiguousarray(vectors[keep]))
        items = {"root": root, "paths": [loaded.paths[i] for i in keep], "classes": [classes[i] for i in keep]}
        change = {"removed": len(gone)}
    meta = {k: v for k, v in loaded.meta.items() if k not in ("count", "files", "fingerprint")}
    meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with _NewFolder(folder, "index.json", True, "an index", {}) as tmp:
        for name in (meta["model"], meta["preprocessing"], "export.json"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        _write_index(tmp, index, items, meta)
        if _digest(folder / "index.json") != before:
            raise DmlkitError(f"index {folder} changed while this command ran; run it again")
    what = ", ".join(f"{k} {v:,}" for k, v in change.items())
    console.print(f"{escape(str(folder))}: {what}; it holds {index.ntotal:,} images", soft_wrap=True)


# ----------------------------------------------------------------------------------- search
#: The longest a model call may take by default (seconds): a batch of query images, or the check at load.
MODEL_TIMEOUT = 120.0
#: The largest index.json / preprocessing.json dmlkit reads (bytes).
SMALL_JSON = 1 << 20


def call_with_limit(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """``fn()`` in a worker thread, waited for at most ``seconds``: a model that never ends is an
    error, not a hang (its thread is left behind; the CLI ends the process without waiting for it)."""
    import threading

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="dmlkit-model", daemon=True)
    interrupts.abandon(thread)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DmlkitError(f"{what} did not finish within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class LoadedIndex:
    """An index folder that ``dmlkit index`` wrote: the faiss index, the paths, the model.

    Every file is checked before it is used: a regular file (never a FIFO), of the size and
    SHA-256 that index.json records, JSON of the right shape, and a model that turns a probe image
    (made by preprocessing.json's steps, of the input shape recorded there) into one finite
    embedding of the index's dimension within ``timeout`` seconds. Any damage is one line that
    says to rebuild the index.
    """

    def __init__(self, folder: Path, timeout: float = MODEL_TIMEOUT):
        self.folder, self.timeout = folder, timeout
        meta_path = folder / "index.json"
        if not folder.is_dir():
            raise DmlkitError(
                f"index folder not found: {folder}; build one with dmlkit index RUN --images DIR --out {folder}"
            )
        if not meta_path.exists() and not meta_path.is_symlink():
            raise DmlkitError(
                f"{folder} is not a dmlkit index (no index.json); build one with dmlkit index RUN --images DIR --out {folder}"
            )
        try:
            self._load(folder)
        except _Damaged as exc:
            raise DmlkitError(
                f"index {folder} is damaged: {exc}; rebuild it with dmlkit index RUN --images DIR --out {folder} "
                "--overwrite"
            ) from None

    def _load(self, folder: Path) -> None:
        import faiss

        meta = _json_file(folder / "index.json", SMALL_JSON)
        _need(isinstance(meta, dict), "index.json is not a JSON object")
        _need(
            meta.get("format") == INDEX_FORMAT, f"index.json's format is {meta.get('format')!r}, not {INDEX_FORMAT!r}"
        )
        version = meta.get("version")
        _need(_is_int(version) and version >= 1, f"index.json's version is {version!r}")
        if version > INDEX_VERSION:
            raise DmlkitError(
                f"index {folder} was written by a newer dmlkit (index version {version}, this one reads up to "
                f"{INDEX_VERSION}); upgrade dmlkit"
            )
        for key in ("count", "dim"):
            _need(_is_int(meta.get(key)) and meta[key] >= 1, f"index.json's {key} is {meta.get(key)!r}")
        for key in ("model", "preprocessing"):
            name = meta.get(key)
            _need(
                isinstance(name, str) and name not in ("", ".", "..") and name == Path(name).name,
                f"index.json's {key} is {name!r}, not a file name in the folder",
            )
        names = {"index.faiss", "items.json", meta["model"], meta["preprocessing"]}
        if version >= 2:
            files = meta.get("files")
            _need(isinstance(files, dict) and names <= set(files), "index.json does not list the index's files")
            for name in sorted(names):
                _check_digest(folder / name, files[name])
        self.files = meta.get("files")
        items = _json_file(folder / "items.json")
        _need(isinstance(items, dict), "items.json is not a JSON object")
        root, paths = items.get("root"), items.get("paths")
        _need(
            isinstance(root, str) and Path(root).is_absolute(), f"items.json's root is {root!r}, not an absolute path"
        )
        _need(isinstance(paths, list) and all(isinstance(x, str) for x in paths), "items.json's paths are not strings")
        _need(len(paths) == meta["count"], f"items.json lists {len(paths)} paths, index.json counts {meta['count']}")
        _need(
            all(x and not Path(x).is_absolute() and ".." not in Path(x).parts for x in paths),
            "items.json holds a path outside its root",
        )
        classes = items.get("classes")
        if version >= 3:
            files = self.files
            _need(
                isinstance(classes, list) and all(isinstance(c, str) for c in classes),
                "items.json's classes are not strings",
            )
            _need(len(classes) == len(paths), f"items.json lists {len(classes)} classes for {len(paths)} paths")
            _need(
                meta.get("fingerprint") == fingerprint(files, meta["model"], meta["preprocessing"]),
                f"{meta['model']} and {meta['preprocessing']} are not the model and preprocessing that embedded "
                "its vectors (fingerprint)",
            )
        self.classes: list[str] | None = classes if version >= 3 else None
        prep = _json_file(folder / meta["preprocessing"], SMALL_JSON)
        _need(isinstance(prep, dict), f"{meta['preprocessing']} is not a JSON object")
        if prep.get("input") != "image":  # a run on tensors: a clear refusal, not damage
            image_input(prep, f"index {folder}")
        _need(
            prep.get("color_mode") in ("RGB", "L"),
            f"{meta['preprocessing']}'s color_mode is {prep.get('color_mode')!r}",
        )
        _need(isinstance(prep.get("steps"), list), f"{meta['preprocessing']}'s steps are not a list")
        try:
            self.mode, self.transform = image_input(prep, f"index {folder}")
        except Exception as exc:
            raise _Damaged(f"{meta['preprocessing']}'s steps cannot be rebuilt ({_first_line(exc)})") from None
        shape = prep.get("input_shape")
        _need(
            isinstance(shape, list)
            and len(shape) == 4
            and all(_is_int(v) and 1 <= v <= limit for v, limit in zip(shape[1:], (4, 16384, 16384))),
            f"{meta['preprocessing']}'s input_shape is {shape!r}",
        )
        try:
            _regular(folder / "index.faiss")
            self.index = faiss.read_index(str(folder / "index.faiss"))
        except _Damaged:
            raise
        except Exception as exc:
            raise _Damaged(f"index.faiss is not a faiss index ({_first_line(exc)})") from None
        _need(self.index.d == meta["dim"], f"index.faiss holds {self.index.d}-d vectors, index.json says {meta['dim']}")
        _need(
            self.index.ntotal == meta["count"],
            f"index.faiss holds {self.index.ntotal} vectors, index.json counts {meta['count']}",
        )
        _need(self.index.metric_type == faiss.METRIC_L2, "index.faiss does not measure Euclidean distance")
        try:
            data = _read_regular(folder / meta["model"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        except DmlkitError as exc:
            raise _Damaged(str(exc)) from None
        except Exception as exc:
            raise _Damaged(f"{meta['model']} is not a TorchScript model ({_first_line(exc)})") from None
        point = meta.get("operating_point")
        _need(
            point is None
            or (
                isinstance(point, dict)
                and _is_number(point.get("threshold"))
                and point["threshold"] >= 0
                and isinstance(point.get("thresholds", []), list)
                and all(
                    isinstance(r, dict) and _is_number(r.get("fmr_target")) and _is_number(r.get("threshold"))
                    for r in point.get("thresholds", [])
                )
            ),
            "index.json's operating_point is not a threshold dmlkit wrote",
        )
        self.operating_point = point
        self.root, self.paths, self.meta = Path(root), paths, meta
        self._probe(prep, [int(v) for v in shape[1:]])

    def _probe(self, prep: dict[str, Any], shape: list[int]) -> None:
        """One blank image through the preprocessing and the model: the shapes and values must fit."""
        from PIL import Image

        try:
            x = self.transform(Image.new(self.mode, (shape[-1], shape[-2])))
        except Exception as exc:
            raise _Damaged(f"preprocessing.json's steps fail on an image ({_first_line(exc)})") from None
        _need(
            isinstance(x, torch.Tensor) and list(x.shape) == shape,
            f"preprocessing.json makes inputs of shape {list(getattr(x, 'shape', []))}, its model takes {shape}",
        )
        emb = self._run(x[None])
        _need(
            emb.shape[1] == self.index.d,
            f"the model gives {emb.shape[1]}-d embeddings, the index holds {self.index.d}-d",
        )

    def _run(self, x: torch.Tensor) -> np.ndarray:
        def call() -> Any:
            with torch.no_grad():
                return self.model(x)

        try:
            out = call_with_limit(call, self.timeout, f"the index's model, on {len(x)} image(s),")
        except DmlkitError as exc:
            raise _Damaged(f"{exc} (a model that never ends; --timeout sets the limit)") from None
        except Exception as exc:
            raise _Damaged(f"its model fails on an input of shape {list(x.shape)} ({_first_line(exc)})") from None
        _need(
            isinstance(out, torch.Tensor) and out.dim() == 2 and len(out) == len(x),
            "its model does not return one embedding per image",
        )
        emb = np.ascontiguousarray(out.float().numpy(), dtype=np.float32)
        _need(bool(np.isfinite(emb).all()), "its model gives NaN or inf embeddings")
        return emb

    def embed(self, files: list[Path], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(files), batch_size):
            x = torch.stack([self.transform(load_image(f, self.mode)) for f in files[i : i + batch_size]])
            try:
                out.append(self._run(x))
            except _Damaged as exc:
                raise DmlkitError(
                    f"index {self.folder} is damaged: {exc} (queries {files[i]} ...); rebuild it with dmlkit index "
                    f"RUN --images DIR --out {self.folder} --overwrite"
                ) from None
        return np.concatenate(out)

    def threshold(self, threshold: float | None = None, fmr: float | None = None) -> tuple[float | None, str]:
        """The match threshold and where it comes from: ``threshold`` itself, the index's calibrated
        threshold for ``fmr``, or its default operating point; (None, "") when it has none."""
        if threshold is not None and fmr is not None:
            raise DmlkitError("give --threshold or --fmr, not both")
        if threshold is not None:
            if not (_is_number(threshold) and threshold >= 0):
                raise DmlkitError(f"--threshold must be a distance >= 0; got {threshold}")
            return float(threshold), "--threshold"
        point = self.operating_point
        if fmr is None:
            if point is None:
                return None, ""
            return float(point["threshold"]), f"FMR {point['fmr_target']:g} on the run's {_basis(point)}"
        if point is None:
            raise DmlkitError(
                f"index {self.folder} has no calibrated thresholds (its run had no validation split, or dmlkit 0.1 "
                "built it): pass --threshold DISTANCE, or rebuild the index from a run with a validation split"
            )
        rows = {float(r["fmr_target"]): float(r["threshold"]) for r in point.get("thresholds", [])}
        match = next((t for f, t in rows.items() if math.isclose(f, fmr, rel_tol=1e-9)), None)
        if match is None:
            raise DmlkitError(
                f"--fmr {fmr:g} is not among the FMRs index {self.folder} was calibrated for "
                f"({', '.join(f'{f:g}' for f in sorted(rows))}); pick one of them, or pass --threshold"
            )
        return match, f"FMR {fmr:g} on the run's {_basis(point)}"

    def search(
        self, files: list[Path], k: int, threshold: float | None = None, fmr: float | None = None
    ) -> list[dict[str, Any]]:
        """Each query's top-k items: rank, path, Euclidean distance; with a match threshold (the
        index's own, or ``threshold`` / the calibrated one for ``fmr``) each item is marked
        ``match`` (distance <= threshold) and the query's ``decision`` is ``match`` or ``unknown``."""
        limit, source = self.threshold(threshold, fmr)
        k = min(k, self.index.ntotal)
        dist, idx = self.index.search(self.embed(files), k)
        results = []
        for f, d_row, i_row in zip(files, dist, idx):
            hits = [
                {"rank": r + 1, "path": str(self.root / self.paths[i]), "distance": float(np.sqrt(max(d, 0.0)))}
                | ({"class": self.classes[i]} if self.classes is not None else {})
                for r, (d, i) in enumerate(zip(d_row, i_row))
                if 0 <= i < len(self.paths)
            ]
            if not hits:
                raise DmlkitError(
                    f"index {self.folder} found no neighbour of {f} (a {self.meta.get('factory')} index can miss: "
                    "rebuild it with --factory Flat)"
                )
            result: dict[str, Any] = {"query": str(f.resolve()), "results": hits}
            if limit is not None:
                for h in hits:
                    h["match"] = h["distance"] <= limit
                matched = any(h["match"] for h in hits)
                result.update(decision="match" if matched else "unknown", threshold=limit, threshold_from=source)
            results.append(result)
        return results

    def full_paths(self) -> list[str]:
        """Each indexed item's path as search prints it (the root joined with the recorded path)."""
        return [os.path.normpath(os.path.join(self.root, p)) for p in self.paths]

    def select(self, given: list[Path]) -> set[int]:
        """The items that ``given`` names: each a path as search prints it or as items.json records
        it, or a folder holding indexed items. A path that names none is refused."""
        full = self.full_paths()
        chosen: set[int] = set()
        for p in given:
            names = {os.path.normpath(os.path.abspath(p)), os.path.realpath(p)}
            if not p.is_absolute():
                names.add(os.path.normpath(os.path.join(self.root, p)))
            prefixes = tuple(n.rstrip(os.sep) + os.sep for n in names)
            hit = {i for i, f in enumerate(full) if f in names or f.startswith(prefixes)}
            if not hit:
                raise DmlkitError(
                    f"{p} is no image of index {self.folder}, nor a folder of them; name images as dmlkit search "
                    "prints them"
                )
            chosen |= hit
        return chosen

    def need_classes(self, command: str) -> list[str]:
        """The indexed items' classes; an index built before dmlkit recorded them is refused."""
        if self.classes is None:
            raise DmlkitError(
                f"index {self.folder} records no classes (an older dmlkit built it); {command} needs them: rebuild it "
                f"with dmlkit index RUN --images DIR --out {self.folder} --overwrite"
            )
        return self.classes


def _basis(point: dict[str, Any]) -> str:
    return str(point.get("calibrated_on", "calibration pairs")).split(":")[0]


class _Damaged(Exception):
    """What is wrong with an index folder (LoadedIndex turns it into the one-line error)."""


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Damaged(why)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _regular(path: Path) -> None:
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        raise _Damaged(f"{path.name} is missing") from None
    _need(stat.S_ISREG(mode), f"{path.name} is not a regular file")


def _json_file(path: Path, limit: int | None = None) -> Any:
    if not path.exists():
        raise _Damaged(f"{path.name} is missing")
    try:
        return json.loads(_read_regular(path, limit))
    except DmlkitError as exc:
        raise _Damaged(str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise _Damaged(f"{path.name} is not JSON ({_first_line(exc)})") from None


def _check_digest(path: Path, want: Any) -> None:
    _regular(path)
    _need(
        isinstance(want, dict) and _is_int(want.get("bytes")) and isinstance(want.get("sha256"), str),
        f"index.json's record of {path.name} is damaged",
    )
    size = path.stat().st_size
    _need(size == want["bytes"], f"{path.name} is {size:,} bytes, index.json records {want['bytes']:,}")
    _need(_digest(path)["sha256"] == want["sha256"], f"{path.name} changed since dmlkit index wrote it (SHA-256)")


GRID_MARK = "dmlkit search --grid"


def check_grid(grid: Path, index: Path, queries: list[Path]) -> None:
    """``--grid`` may name a new .png file, or one that an earlier ``search --grid`` wrote; never
    another file, a query image, or a file inside the index folder."""
    if grid.suffix.lower() != ".png":
        raise DmlkitError(f"--grid {grid} must name a .png file")
    if _inside(grid, index):
        raise DmlkitError(f"--grid {grid} lies inside the index folder {index}; pick a file outside it")
    for q in queries:
        if grid.resolve() == q.resolve() or (q.is_dir() and _inside(grid, q)):
            raise DmlkitError(f"--grid {grid} is (or lies among) the query images {q}; pick another file")
    if not grid.exists() and not grid.is_symlink():
        return
    if not grid.is_file() or grid.is_symlink():
        raise DmlkitError(f"--grid {grid} exists and is not a regular file; pick another file")
    try:
        from PIL import Image

        _regular(grid)
        with Image.open(grid) as img:
            mine = img.format == "PNG" and img.info.get("Software") == GRID_MARK
    except Exception:
        mine = False
    if not mine:
        raise DmlkitError(
            f"--grid {grid} exists and is not a grid that dmlkit search wrote; dmlkit never replaces other files: "
            "pick another file"
        )


def draw_grid(results: list[dict[str, Any]], path: Path) -> Path:
    """One row per query: the query, then its neighbours with their distances (written whole: a
    temporary file, then renamed)."""
    from dmlkit.report import _picture, _plt

    plt = _plt()
    cols = 1 + max(len(r["results"]) for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(1.8 * cols, 1.9 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax in row:
            ax.axis("off")
        for c, (file, title) in enumerate(
            [(res["query"], "query"), *((h["path"], f"#{h['rank']}  {h['distance']:.3f}") for h in res["results"])]
        ):
            try:
                _regular(Path(file))  # an indexed file replaced by a FIFO must not hang the grid
                row[c].imshow(_picture(file), cmap="gray")
            except (DmlkitError, _Damaged):  # moved or deleted since dmlkit index: the grid still shows the rest
                row[c].text(0.5, 0.5, "file\nmissing", ha="center", va="center", fontsize=8)
            row[c].set_title(title, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": GRID_MARK})
        os.replace(tmp, path)
    except OSError as exc:
        raise writable_error(path, exc, "file") from None
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


IndexArg = Annotated[Path, typer.Argument(help="Index folder written by dmlkit index.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds the index's model may take for one batch of images.")]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Match threshold (distance) instead of the index's calibrated one.")
]
FmrOpt = Annotated[float | None, typer.Option(help="Use the index's threshold calibrated for this false match rate.")]


def search_cmd(
    index: IndexArg,
    images: Annotated[list[Path], typer.Argument(help="Query images (files or folders).")],
    k: Annotated[int, typer.Option("-k", "--top-k", help="Neighbours per query.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    grid: Annotated[
        Path | None, typer.Option(help="Also draw the queries and their neighbours into this new .png file.")
    ] = None,
    timeout: TimeoutOpt = MODEL_TIMEOUT,
    threshold: ThresholdOpt = None,
    fmr: FmrOpt = None,
) -> None:
    """Print each query image's nearest indexed images and their distances; with the index's
    calibrated threshold (or --threshold / --fmr), whether each is a match, and "unknown" for a
    query that matches none."""
    _check_search_options(k, threshold, fmr, timeout)
    if grid is not None:
        check_grid(grid, index, images)  # before any work
    files = image_files(images, "query image")
    loaded = LoadedIndex(index, timeout)
    loaded.threshold(threshold, fmr)  # refused before any image is embedded
    results = loaded.search(files, k, threshold, fmr)
    if grid is not None:
        draw_grid(results, grid)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for res in results:
        title = res["query"]
        if "decision" in res:
            title += f"  ->  {res['decision']} (threshold {res['threshold']:.4f}, {res['threshold_from']})"
        table = Table(title=Text(title), title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("distance", justify="right")
        if "decision" in res:
            table.add_column("match")
        table.add_column("path", overflow="fold")
        for h in res["results"]:
            mark = ["yes" if h["match"] else "no"] if "match" in h else []
            table.add_row(str(h["rank"]), f"{h['distance']:.4f}", *mark, Text(h["path"]))
        console.print(table)
    if results and "decision" not in results[0]:
        console.print(
            "[dim]no match threshold: this index carries none (its run had no validation split); "
            "--threshold DISTANCE decides[/dim]",
            soft_wrap=True,
        )
    if grid is not None:
        console.print(f"wrote {escape(str(grid))}")


# --------------------------------------------------------------------------------- classify
def classify(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each search result's k-NN class: the class most of its neighbours have, a tie going to the
    tied class whose nearest neighbour comes first (:func:`dmlkit.decisions.vote`), with its votes,
    its share of the neighbours, and the distance of its nearest neighbour. With a match decision,
    a query that matches no neighbour is ``unknown`` and has no ``class`` (``knn_class`` still says
    which the vote gave)."""
    from dmlkit.decisions import vote

    out = []
    for res in results:
        classes = [h["class"] for h in res["results"]]
        names, codes = np.unique(classes, return_inverse=True)
        winner = str(names[vote(codes.reshape(1, -1))[0]])
        votes = classes.count(winner)
        row: dict[str, Any] = {
            "query": res["query"],
            "class": winner,
            "knn_class": winner,
            "votes": votes,
            "neighbours": len(classes),
            "vote_share": votes / len(classes),
            "distance": next(h["distance"] for h in res["results"] if h["class"] == winner),
        }
        if "decision" in res:
            row.update({k: res[k] for k in ("decision", "threshold", "threshold_from")})
            if res["decision"] == "unknown":
                row["class"] = None
        out.append(row)
    return out


def classify_cmd(
    index: IndexArg,
    images: Annotated[list[Path], typer.Argument(help="Images to classify (files or folders).")],
    k: Annotated[int, typer.Option("-k", "--top-k", help="Neighbours that vote.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: TimeoutOpt = MODEL_TIMEOUT,
    threshold: ThresholdOpt = None,
    fmr: FmrOpt = None,
) -> None:
    """Print each image's class by its k nearest indexed images (the majority class, a tie going to
    the nearest; an indexed image's class is the name of its folder), its votes and distance, and
    "unknown" when no neighbour is within the match threshold (as dmlkit search decides)."""
    _check_search_options(k, threshold, fmr, timeout)
    files = image_files(images, "image")
    loaded = LoadedIndex(index, timeout)
    loaded.need_classes("dmlkit classify")
    loaded.threshold(threshold, fmr)  # refused before any image is embedded
    rows = classify(loaded.search(files, k, threshold, fmr))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=Text(f"{index}: {k}-NN classes"), title_justify="left")
    for col, justify in (("image", "left"), ("class", "left"), ("votes", "right"), ("distance", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        name = r["class"] if r["class"] is not None else f"unknown (nearest: {r['knn_class']})"
        table.add_row(Text(r["query"]), Text(name), f"{r['votes']}/{r['neighbours']}", f"{r['distance']:.4f}")
    console.print(table)
    if rows and "decision" in rows[0]:
        console.print(
            escape(
                f"threshold {rows[0]['threshold']:.4f} ({rows[0]['threshold_from']}): an image with no neighbour "
                "within it is unknown"
            ),
            soft_wrap=True,
        )
    else:
        console.print(
            "[dim]no match threshold: this index carries none (its run had no validation split); every image gets "
            "its k-NN class; --threshold DISTANCE decides unknown[/dim]",
            soft_wrap=True,
        )


def _check_search_options(k: int, threshold: float | None, fmr: float | None, timeout: float) -> None:
    """search's and classify's options, refused before any work."""
    if k < 1:
        raise DmlkitError(f"-k must be >= 1; got {k}")
    if fmr is not None:
        check_fmr(fmr)
    if threshold is not None and not 0 <= threshold < float("inf"):
        raise DmlkitError(f"--threshold must be a distance >= 0; got {threshold}")
    if not 0 < timeout < float("inf"):
        raise DmlkitError(f"--timeout must be a positive number of seconds; got {timeout}")


def _all_vectors(index: Any) -> np.ndarray:
    """Every vector of ``index`` as a float32 array, also where ``faiss.contrib.torch_utils`` (which
    pytorch-metric-learning imports) makes faiss return torch tensors."""
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


# --------------------------------------------------------------------------- evaluate-index
def stored_vectors(index: Any, factory: str) -> np.ndarray:
    """The vectors a faiss index holds (for IVF through its direct map; for PQ codes, their
    reconstruction): what exact search over "the same vectors" searches."""
    import faiss

    try:
        try:
            return _all_vectors(index)
        except RuntimeError:
            faiss.extract_index_ivf(index).make_direct_map()
            return _all_vectors(index)
    except Exception as exc:
        raise DmlkitError(f"cannot read the vectors back from the {factory} index ({_first_line(exc)})") from None


def evaluate_index(loaded: LoadedIndex, files: list[Path]) -> dict[str, Any]:
    """P@1, R-Precision, MAP@R (:func:`dmlkit.evaluation.per_query_metrics`) of ``files`` as queries
    against the index's items, from the index's own search and from exact search
    (:func:`dmlkit.evaluation.knn`) over the vectors it stores, and each one's queries per second. A
    query's class is its folder's name; a query that is itself an indexed image leaves itself out
    (leave-one-out, as :func:`dmlkit.evaluation.retrieval_metrics`); a query whose class the index
    does not hold has no relevant item and is left out (``queries_without_match``)."""
    from dmlkit.evaluation import _drop_own, knn, per_query_metrics

    classes = np.asarray(loaded.need_classes("dmlkit evaluate-index"))
    q_classes = np.asarray([class_of(f) for f in files])
    where = {p: i for i, p in enumerate(loaded.full_paths())}
    own = np.asarray([where.get(os.path.abspath(f), -1) for f in files])
    names, g_counts = np.unique(classes, return_counts=True)
    count = dict(zip(names, g_counts))
    r = np.asarray([count.get(c, 0) for c in q_classes]) - (own >= 0)
    has_match = r > 0
    if not has_match.any():
        raise DmlkitError(
            "no query image's class (its folder's name) has another image in the index; evaluate-index needs "
            "queries of the indexed classes"
        )
    width = int(r.max())
    k = min(width + int((own >= 0).any()), loaded.index.ntotal)
    started = time.perf_counter()
    emb = loaded.embed(files)
    embedding_s = time.perf_counter() - started
    factory = str(loaded.meta.get("factory"))
    vectors = stored_vectors(loaded.index, factory)
    out: dict[str, Any] = {"index": str(loaded.folder), "factory": factory, "items": int(loaded.index.ntotal)}
    out |= {
        "queries": len(files),
        "queries_without_match": int((~has_match).sum()),
        "queries_indexed": int((own >= 0).sum()),
    }
    found: dict[str, dict[str, float]] = {}
    for name in ("index", "exact"):
        started = time.perf_counter()
        if name == "index":
            dist, idx = loaded.index.search(emb, k)
        else:
            nn = knn(emb, vectors, k, backend="faiss")
            dist, idx = nn.distances, nn.indices
        out[f"{name}_queries_per_s"] = len(files) / max(time.perf_counter() - started, 1e-9)
        if k > width:
            idx, _ = _drop_own(idx, dist, np.where(own >= 0, own, -2))  # -1: a miss of an approximate index
        rel = np.where(idx >= 0, classes[np.clip(idx, 0, None)] == q_classes[:, None], False)[has_match]
        values = per_query_metrics(rel, r[has_match], [1])
        found[name] = {m: float(v.mean()) for m, v in values.items() if m != "recall_at_1"}
    out["metrics"], out["exact"] = found["index"], found["exact"]
    out["difference"] = {m: found["index"][m] - found["exact"][m] for m in found["index"]}
    out["embedding_s"] = embedding_s
    return out


def evaluate_index_cmd(
    index: IndexArg,
    images: Annotated[Path, typer.Option("--images", help="Folder of query images; a query's class is its folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    timeout: TimeoutOpt = MODEL_TIMEOUT,
) -> None:
    """Retrieval metrics (P@1, R-Precision, MAP@R) of a folder of labelled query images through a
    deployed index, beside exact search over the vectors it stores, and both searches' queries per
    second: how much an approximate factory (HNSW, IVF, PQ) loses, measured."""
    if not images.is_dir():
        raise DataError(f"--images {images} is not a folder of images")
    _check_search_options(1, None, None, timeout)
    files = image_files([images], "--images folder")
    loaded = LoadedIndex(index, timeout)
    loaded.need_classes("dmlkit evaluate-index")
    result = evaluate_index(loaded, files)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(
        title=Text(f"{index} ({result['factory']}, {result['items']:,} items): {result['queries']:,} queries")
    )
    for col in ("metric", "index", "exact search", "difference"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for m, v in result["metrics"].items():
        table.add_row(m, f"{v:.4f}", f"{result['exact'][m]:.4f}", f"{result['difference'][m]:+.4f}")
    table.add_row("queries/s", f"{result['index_queries_per_s']:,.0f}", f"{result['exact_queries_per_s']:,.0f}", "")
    console.print(table)
    console.print(
        escape(
            f"{result['queries_without_match']} queries of classes the index does not hold are left out; "
            f"{result['queries_indexed']} indexed images left themselves out; embedding took {result['embedding_s']:.1f} s"
        ),
        soft_wrap=True,
    )


@dmlkit.hookimpl
def register_commands(app):
    app.command("export")(export_cmd)
    app.command("index")(index_cmd)
    app.command("search")(search_cmd)
    app.command("classify")(classify_cmd)
    app.command("evaluate-index")(evaluate_index_cmd)
