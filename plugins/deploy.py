"""After training: export a run's embedding model, index a folder of images, search the index.

``dmlkit export RUN`` writes the model for inference (TorchScript, ONNX, torch.export) with
``preprocessing.json``, the exact steps that turn an image file into the model's input, and
checks every file it writes against the run's own model. ``dmlkit index RUN --images DIR``
embeds a folder into a faiss index that carries its own TorchScript model and preprocessing,
so that ``dmlkit search INDEX IMAGE...`` needs nothing but the index folder.
"""

from __future__ import annotations

import copy
import json
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

import dmlkit
from dmlkit.data import Problems, Split, load_image
from dmlkit.errors import DataError, DmlkitError
from dmlkit.rundir import writable_error
from dmlkit_plugins.datasets import IMAGE_SUFFIXES

console = Console()
err_console = Console(stderr=True)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}
TOLERANCE = 1e-5  # the largest |difference| from the run's own embeddings an exported file may have
INDEX_FORMAT = "dmlkit-index"


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


def export_model(trainer: Any, out: Path, formats: list[str], say: Console | None = None) -> dict[str, Any]:
    """Write ``formats`` and ``preprocessing.json`` into ``out``; every file is loaded back and its
    embeddings compared with the run's model on real test inputs (the whole batch and one image).
    A file off by more than :data:`TOLERANCE` is an error. Returns what ``export.json`` holds."""
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
    _write_json(out / "export.json", record)
    return record


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise writable_error(path, exc, "file") from None


class _NewFolder:
    """Write a folder's files into a sibling temporary folder, then put it in place: a failure
    leaves the old folder (or none) as it was. An existing folder is replaced only when
    ``replace`` says so and ``marker`` is in it (it is one of ours)."""

    def __init__(self, out: Path, marker: str, replace: bool, what: str):
        self.check(out, marker, replace, what)
        self.out = out
        self.tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"

    @staticmethod
    def check(out: Path, marker: str, replace: bool, what: str) -> None:
        """Refuse a file, a folder of other files, or an earlier result without ``--overwrite``."""
        if out.exists():
            if not out.is_dir():
                raise DmlkitError(f"{out} is a file; --out names a folder")
            if any(out.iterdir()):
                if not (out / marker).is_file():
                    raise DmlkitError(f"{out} holds other files; pick an empty or new --out folder")
                if not replace:
                    raise DmlkitError(
                        f"{out} already holds {what}; pass --overwrite to replace it, or pick another --out"
                    )

    def __enter__(self) -> Path:
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise writable_error(self.out.parent, exc, "to folder") from None
        return self.tmp

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            if self.out.exists():
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
        except OSError as exc:
            if old.exists() and not self.out.exists():
                os.replace(old, self.out)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise writable_error(self.out, exc, "to folder") from None
        shutil.rmtree(old, ignore_errors=True)


def _load(run: Path, checkpoint: str) -> Any:
    from dmlkit.train import load_run

    return load_run(run, checkpoint, console=console, err_console=err_console)


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the model files (default RUN/export).")] = None,
    format: Annotated[
        str, typer.Option("--format", help="Comma-separated: torchscript, onnx, pt2 (torch.export).")
    ] = "torchscript,onnx",
    checkpoint: Annotated[str, typer.Option(help="With a run directory: best or last.")] = "best",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")] = False,
) -> None:
    """Export a run's embedding model for inference, with preprocessing.json; each file is checked
    against the run's own embeddings (to 1e-5)."""
    formats = parse_formats(format)
    trainer = _load(run, checkpoint)
    out = out or (trainer.run_dir / "export")
    with _NewFolder(out, "export.json", overwrite, "an export") as tmp:
        with console.status(f"exporting {', '.join(formats)}"):
            record = export_model(trainer, tmp, formats)
    table = Table(title=f"{out}: epoch {record['epoch']} ({record['checkpoint']})")
    table.add_column("format")
    table.add_column("file")
    table.add_column("max |difference| from the run", justify="right")
    for fmt, info in record["files"].items():
        table.add_row(fmt, info["file"], f"{info['max_abs_diff']:.1e}")
    console.print(table)
    console.print(f"wrote {escape(str(out / 'preprocessing.json'))}: what a client does to an input before the model")


# ------------------------------------------------------------------------------------ index
def image_files(paths: list[Path], what: str) -> list[Path]:
    """Image files: each path itself, or the images under a folder (sorted, recursively)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not inside:
                raise DataError(f"no images under {p} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{what} not found: {p}")
    return found


def index_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of images to index (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Folder for the index.")] = Path("index"),
    checkpoint: Annotated[str, typer.Option(help="With a run directory: best or last.")] = "best",
    factory: Annotated[
        str, typer.Option(help="faiss index_factory string: Flat (exact), HNSW32, IVF256,Flat ...")
    ] = "Flat",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave unreadable images out instead of failing.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier index in --out.")] = False,
) -> None:
    """Embed a folder of images with a run's model into a faiss index on disk, with the files'
    paths and the model and preprocessing that `dmlkit search` needs."""
    import faiss

    if not images.is_dir():
        raise DataError(f"--images {images} is not a folder of images")
    files = image_files([images], "--images folder")
    _NewFolder.check(out, "index.json", overwrite, "an index")  # before any work
    trainer = _load(run, checkpoint)
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
        if skipped:
            files = [f for f, k in zip(files, keep) if k]
            split = Split([str(f) for f in files], np.zeros(len(files), np.int64), split.transform, mode)
            err_console.print(f"[yellow]warning: left out {skipped} unreadable image(s)[/yellow]")
        if not files:
            raise DataError(f"no readable images under {images}")
    trainer.settings = trainer.settings.replace(amp=False)  # float32, as search embeds its queries: an image finds itself at distance 0
    try:
        emb, _ = trainer.embed(split, f"embedding {len(files):,} images")
    except DataError as exc:
        from dmlkit.cli import one_line

        raise DataError(f"{one_line(str(exc))} (pass --skip-bad to leave unreadable images out)") from None
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if not index.is_trained:
        try:
            index.train(emb)
        except Exception as exc:
            raise DmlkitError(
                f"cannot train the {factory} index on {len(emb)} images: {exc}; use --factory Flat"
            ) from None
    index.add(emb)
    root = images.resolve()
    with _NewFolder(out, "index.json", overwrite, "an index") as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        _write_json(
            tmp / "items.json", {"root": str(root), "paths": [str(f.resolve().relative_to(root)) for f in files]}
        )
        record = export_model(trainer, tmp, ["torchscript"])
        _write_json(
            tmp / "index.json",
            {
                "format": INDEX_FORMAT,
                "version": 1,
                "count": int(index.ntotal),
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
            },
        )
    console.print(f"indexed {index.ntotal:,} images ({emb.shape[1]}-d, {factory}) in {escape(str(out))}/")


# ----------------------------------------------------------------------------------- search
class LoadedIndex:
    """An index folder that ``dmlkit index`` wrote: the faiss index, the paths, the model."""

    def __init__(self, folder: Path):
        import faiss

        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise DmlkitError(
                f"{folder} is not a dmlkit index (no index.json); build one with dmlkit index RUN --images DIR --out {folder}"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            items = json.loads((folder / "items.json").read_text(encoding="utf-8"))
            prep = json.loads((folder / meta["preprocessing"]).read_text(encoding="utf-8"))
            if meta.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}")
            self.index = faiss.read_index(str(folder / "index.faiss"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = torch.jit.load(str(folder / meta["model"]), map_location="cpu").eval()
        except Exception as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise DmlkitError(
                f"index {folder} is damaged or incomplete ({first}); rebuild it with dmlkit index"
            ) from None
        if self.index.ntotal != len(items["paths"]):
            raise DmlkitError(
                f"index {folder} is damaged: {self.index.ntotal} vectors but {len(items['paths'])} paths; rebuild it"
            )
        self.root = Path(items["root"])
        self.paths = items["paths"]
        self.meta = meta
        self.mode, self.transform = image_input(prep, f"index {folder}")

    @torch.no_grad()
    def embed(self, files: list[Path], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(files), batch_size):
            x = torch.stack([self.transform(load_image(f, self.mode)) for f in files[i : i + batch_size]])
            out.append(self.model(x).numpy())
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def search(self, files: list[Path], k: int) -> list[dict[str, Any]]:
        """Each query's top-k items: rank, path, Euclidean distance."""
        k = min(k, self.index.ntotal)
        dist, idx = self.index.search(self.embed(files), k)
        results = []
        for f, d_row, i_row in zip(files, dist, idx):
            hits = [
                {"rank": r + 1, "path": str(self.root / self.paths[i]), "distance": float(np.sqrt(max(d, 0.0)))}
                for r, (d, i) in enumerate(zip(d_row, i_row))
                if i >= 0
            ]
            results.append({"query": str(f.resolve()), "results": hits})
        return results


def draw_grid(results: list[dict[str, Any]], path: Path) -> Path:
    """One row per query: the query, then its neighbours with their distances."""
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
                row[c].imshow(_picture(file), cmap="gray")
            except DmlkitError:  # an indexed file moved or deleted since dmlkit index: the grid still shows the rest
                row[c].text(0.5, 0.5, "file\nmissing", ha="center", va="center", fontsize=8)
            row[c].set_title(title, fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    except OSError as exc:
        raise writable_error(path, exc, "file") from None
    finally:
        plt.close(fig)
    return path


def search_cmd(
    index: Annotated[Path, typer.Argument(help="Index folder written by dmlkit index.")],
    images: Annotated[list[Path], typer.Argument(help="Query images (files or folders).")],
    k: Annotated[int, typer.Option("-k", "--top-k", help="Neighbours per query.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    grid: Annotated[Path | None, typer.Option(help="Also draw the queries and their neighbours into this PNG.")] = None,
) -> None:
    """Print each query image's nearest indexed images and their distances."""
    if k < 1:
        raise DmlkitError(f"-k must be >= 1; got {k}")
    loaded = LoadedIndex(index)
    files = image_files(images, "query image")
    results = loaded.search(files, k)
    if grid is not None:
        draw_grid(results, grid)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for res in results:
        table = Table(title=escape(res["query"]), title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("distance", justify="right")
        table.add_column("path", overflow="fold")
        for h in res["results"]:
            table.add_row(str(h["rank"]), f"{h['distance']:.4f}", escape(h["path"]))
        console.print(table)
    if grid is not None:
        console.print(f"wrote {escape(str(grid))}")


@dmlkit.hookimpl
def register_commands(app):
    app.command("export")(export_cmd)
    app.command("index")(index_cmd)
    app.command("search")(search_cmd)
