"""Built-in datasets, each in its distribution's own layout; train and test classes are disjoint."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmlkit
from dmlkit.data import DatasetSplits, Problems, image_transforms, make_split, require
from dmlkit.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_GRAY = {"channels": 1, "image_size": 56, "mean": (0.5,), "std": (0.5,)}
_RGB = {"channels": 3, "image_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _root(root: str, name: str) -> Path:
    if not root:
        raise DataError(f"dataset '{name}' needs its folder: pass --data-root PATH (or dataset option root=PATH)")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataError(f"dataset '{name}': root folder {p} does not exist")
    return p


def _finish(train, test, spec: dict[str, Any] | None, style: str, augment: bool, problems: Problems) -> DatasetSplits:
    if problems.skip_bad:
        train, test = (_keep(s, problems.readable(s.items)) for s in (train, test))
    spec = {**(_GRAY if style == "glyph" else _RGB), **(spec or {})}
    mode = "L" if spec["channels"] == 1 else "RGB"
    train.mode = test.mode = mode
    train.transform = image_transforms(spec, True, style, augment)
    test.transform = image_transforms(spec, False, style, augment)
    return DatasetSplits(train, test, skipped=problems.counts)


def _keep(split, mask: np.ndarray):
    if mask.all():
        return split
    idx = np.flatnonzero(mask)
    out = split.subset(idx)
    if split.query_mask is not None:
        out.query_mask, out.gallery_mask = split.query_mask[idx], split.gallery_mask[idx]
    return out


def _read_rows(path: Path, ncols: int, problems: Problems, skip: int = 0) -> tuple[list[list[str]], list[int]]:
    """Whitespace-separated rows and their line numbers; a short row is reported naming file and line."""
    rows, lines = [], []
    try:
        with open(require(path, "index file"), encoding="utf-8") as f:
            text = f.readlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a UTF-8 text file: {exc}") from None
    for n, line in enumerate(text, 1):
        if n <= skip or not line.strip():
            continue
        parts = line.split()
        if len(parts) < ncols:
            problems.report(
                "bad index lines", f"{path} line {n}: expected {ncols} fields, got {len(parts)}: {line.strip()!r}"
            )
            continue
        rows.append(parts)
        lines.append(n)
    return rows, lines


def _ints(rows: list[list[str]], lines: list[int], col: int, path: Path, problems: Problems) -> dict[int, int]:
    """Row index -> integer in column ``col``; a non-integer is reported naming file and line."""
    out = {}
    for i, (r, n) in enumerate(zip(rows, lines)):
        try:
            out[i] = int(r[col])
        except ValueError:
            problems.report(
                "bad index lines", f"{path} line {n}: expected an integer in field {col + 1}, got {r[col]!r}"
            )
    return out


# ---------------------------------------------------------------------------------------- digits
def digits(train_classes: int = 5, augment: bool = False) -> DatasetSplits:
    """scikit-learn's bundled 8x8 handwritten digits (no download): classes 0-4 train, 5-9 test.

    Args:
        train_classes: the digits 0 .. train_classes-1 train, the others are the unseen test classes.
        augment: shift each training image by a random -1..1 pixels in each direction (background filled in);
            false (default): training images as they are. self_supervised turns it on.
    """
    from sklearn.datasets import load_digits

    if not 1 <= train_classes <= 9:
        raise DataError(f"train_classes must be in 1..9; got {train_classes}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    y = d.target
    tr, te = np.flatnonzero(y < train_classes), np.flatnonzero(y >= train_classes)
    train = make_split([x[i] for i in tr], y[tr], mode="array", transform=DigitShift() if augment else None)
    test = make_split([x[i] for i in te], y[te], mode="array")
    return DatasetSplits(train, test)


class DigitShift:
    """A random shift of an image by -pixels..pixels in each direction, drawn from torch's random
    stream; the uncovered border takes the background value (-1)."""

    def __init__(self, pixels: int = 1):
        self.pixels = pixels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.pixels, x.shape[-2:]
        padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        return padded[..., i : i + h, j : j + w]

    def __repr__(self) -> str:  # part of the feature cache's key
        return f"DigitShift(pixels={self.pixels})"


def _digits_recommends(options: dict) -> dict:
    few = options.get("train_classes", 5) < 8
    return {"sampler": {"name": "m_per_class", "m": 16}, "train": {"val_split": "samples" if few else "classes"}}


# -------------------------------------------------------------------------------------- omniglot
def omniglot(
    root: str = "", input_spec: dict | None = None, augment: bool = True, skip_bad: bool = False
) -> DatasetSplits:
    """Omniglot in torchvision's layout: background characters train, evaluation characters test.

    Each image's alphabet is its group (``Split.groups``): the ``nway_kshot`` evaluator draws each
    episode's characters within one alphabet, as in Lake et al.'s one-shot task.

    Args:
        root: the dataset's folder, in its distribution's layout (``--data-root`` sets it).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
    """
    base = _root(root, "omniglot")
    if (base / "omniglot-py").is_dir():
        base = base / "omniglot-py"
    splits = []
    for part in ("images_background", "images_evaluation"):
        folder = require(
            base / part,
            f"Omniglot folder {part}/ (torchvision layout: omniglot-py/{part}/<Alphabet>/characterNN/*.png)",
        )
        items, labels, alphabets = [], [], []
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                for img in sorted(char.glob("*.png")):
                    items.append(str(img))
                    labels.append(f"{alphabet.name}/{char.name}")
                    alphabets.append(alphabet.name)
        if not items:
            raise DataError(f"no PNG images under {folder}/<Alphabet>/characterNN/")
        splits.append(make_split(items, labels, groups=np.array(alphabets)))
    return _finish(*splits, input_spec, "glyph", augment, Problems(skip_bad))


# ----------------------------------------------------------------------------------------- cub200
def cub200(
    root: str = "", input_spec: dict | None = None, augment: bool = True, skip_bad: bool = False
) -> DatasetSplits:
    """CUB-200-2011 (official layout: images.txt, image_class_labels.txt): class ids 1-100 train, 101-200 test.

    Args:
        root: the dataset's folder, in its distribution's layout (``--data-root`` sets it).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
    """
    base = _root(root, "cub200")
    if (base / "CUB_200_2011").is_dir():
        base = base / "CUB_200_2011"
    problems = Problems(skip_bad)
    img_rows, img_lines = _read_rows(base / "images.txt", 2, problems)
    lab_rows, lab_lines = _read_rows(base / "image_class_labels.txt", 2, problems)
    lab_index = base / "image_class_labels.txt"
    labels = {lab_rows[i][0]: v for i, v in _ints(lab_rows, lab_lines, 1, lab_index, problems).items()}
    items, cls, lines = [], [], []
    for (image_id, rel), n in zip(img_rows, img_lines):
        if image_id not in labels:
            problems.report(
                "images without a label", f"{lab_index} has no line for image id {image_id} (images.txt line {n})"
            )
            continue
        items.append(base / "images" / rel)
        cls.append(labels[image_id])
        lines.append(n)
    keep = problems.existing(items, base / "images.txt", lines)
    items, cls = [str(p) for p, k in zip(items, keep) if k], np.array(cls)[keep]
    tr, te = cls <= 100, cls > 100
    if not tr.any() or not te.any():
        raise DataError(f"{base}: need images of class ids 1-100 (train) and 101-200 (test)")
    train = make_split([p for p, t in zip(items, tr) if t], cls[tr])
    test = make_split([p for p, t in zip(items, te) if t], cls[te])
    return _finish(train, test, input_spec, "natural", augment, problems)


# ---------------------------------------------------------------------------------------- cars196
def cars196(
    root: str = "", input_spec: dict | None = None, augment: bool = True, skip_bad: bool = False
) -> DatasetSplits:
    """Stanford Cars in the devkit layout (cars_train/, cars_test/, devkit/*.mat): classes 1-98 train, 99-196 test.

    Args:
        root: the dataset's folder, in its distribution's layout (``--data-root`` sets it).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
    """
    from scipy.io import loadmat

    base = _root(root, "cars196")
    problems = Problems(skip_bad)
    items, cls = [], []
    for folder, mat in (
        ("cars_train", base / "devkit" / "cars_train_annos.mat"),
        ("cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        if not mat.exists() and (base / "devkit" / mat.name).exists():
            mat = base / "devkit" / mat.name
        try:
            annos = loadmat(str(require(mat, "Cars196 annotation file")), squeeze_me=True)["annotations"]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read {mat}: {exc}") from None
        for a in np.atleast_1d(annos):
            items.append(base / folder / str(a["fname"]))
            cls.append(int(a["class"]))
    keep = problems.existing(items, base / "devkit")
    items, cls = [str(p) for p, k in zip(items, keep) if k], np.array(cls)[keep]
    tr, te = cls <= 98, cls > 98
    train = make_split([p for p, t in zip(items, tr) if t], cls[tr])
    test = make_split([p for p, t in zip(items, te) if t], cls[te])
    return _finish(train, test, input_spec, "natural", augment, problems)


# -------------------------------------------------------------------------------------------- sop
def sop(root: str = "", input_spec: dict | None = None, augment: bool = True, skip_bad: bool = False) -> DatasetSplits:
    """Stanford Online Products (Ebay_train.txt / Ebay_test.txt: image_id class_id super_class_id path).

    Args:
        root: the dataset's folder, in its distribution's layout (``--data-root`` sets it).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
    """
    base = _root(root, "sop")
    if (base / "Stanford_Online_Products").is_dir():
        base = base / "Stanford_Online_Products"
    problems = Problems(skip_bad)
    out = []
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        rows, lines = _read_rows(base / name, 4, problems, skip=1)
        classes = _ints(rows, lines, 1, base / name, problems)
        rows, lines = [rows[i] for i in classes], [lines[i] for i in classes]
        paths = [base / r[3] for r in rows]
        keep = problems.existing(paths, base / name, lines)
        out.append(make_split([str(p) for p, k in zip(paths, keep) if k], np.array(list(classes.values()))[keep]))
    return _finish(*out, input_spec, "natural", augment, problems)


# ----------------------------------------------------------------------------------------- inshop
def inshop(
    root: str = "", input_spec: dict | None = None, augment: bool = True, skip_bad: bool = False
) -> DatasetSplits:
    """In-shop Clothes Retrieval (list_eval_partition.txt): train items; test = query against gallery.

    Args:
        root: the dataset's folder, in its distribution's layout (``--data-root`` sets it).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
    """
    base = _root(root, "inshop")
    index = base / "list_eval_partition.txt"
    if not index.exists() and (base / "Eval" / index.name).exists():
        index = base / "Eval" / index.name
    problems = Problems(skip_bad)
    rows, lines = _read_rows(index, 3, problems, skip=2)
    ok = []
    for r, n in zip(rows, lines):
        if r[2] in ("train", "query", "gallery"):
            ok.append((r, n))
        else:
            problems.report(
                "bad index lines", f"{index} line {n}: evaluation_status must be train, query or gallery; got {r[2]!r}"
            )
    rows, lines = [r for r, _ in ok], [n for _, n in ok]
    paths = [base / r[0] for r in rows]
    keep = problems.existing(paths, index, lines)
    rows, paths = [r for r, k in zip(rows, keep) if k], [p for p, k in zip(paths, keep) if k]
    status = np.array([r[2] for r in rows])
    items = np.array([str(p) for p in paths], dtype=object)
    ids = np.array([r[1] for r in rows])
    train = make_split(list(items[status == "train"]), ids[status == "train"])
    te = status != "train"
    test = make_split(list(items[te]), ids[te], query_mask=status[te] == "query", gallery_mask=status[te] == "gallery")
    return _finish(train, test, input_spec, "natural", augment, problems)


# ------------------------------------------------------------------------------------ imagefolder
def imagefolder(
    root: str = "",
    input_spec: dict | None = None,
    augment: bool = True,
    style: str = "natural",
    skip_bad: bool = False,
    allow_class_overlap: bool = False,
) -> DatasetSplits:
    """Your own images: root/train/<class>/* and root/test/<class>/* (test classes must be unseen:
    a class in both is refused unless ``allow_class_overlap=true``).

    Args:
        root: the dataset's folder, holding train/ and test/ (``--data-root`` sets it).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        style: ``natural`` (photos: RGB, crops) or ``glyph`` (small greyscale drawings: resize, shifts).
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
        allow_class_overlap: accept classes in both train/ and test/ (retrieval of seen classes).
    """
    base = _root(root, "imagefolder")
    out = []
    for part in ("train", "test"):
        folder = require(base / part, f"folder {part}/ with one sub-folder per class")
        items, labels = [], []
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():  # not a FIFO or a device
                    items.append(str(f))
                    labels.append(cls.name)
        if not items:
            raise DataError(f"no images under {folder}/<class>/ (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
        out.append(make_split(items, labels))
    shared = sorted(set(out[0].class_names) & set(out[1].class_names))
    if shared and not allow_class_overlap:
        raise DataError(
            f"{base}: {len(shared)} class(es) are in both train/ and test/ ({', '.join(shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''}); test classes must be unseen in training: move them, or set "
            "allow_class_overlap=true to measure retrieval of seen classes"
        )
    return _finish(*out, input_spec, style, augment, Problems(skip_bad))


# -------------------------------------------------------------------------------------------- csv
def csv_table(
    path: str = "", root: str = "", input_spec: dict | None = None, augment: bool = True, skip_bad: bool = False
) -> DatasetSplits:
    """An OML-style CSV: label, path, split (train/validation), is_query, is_gallery; paths relative to root.

    Args:
        path: the CSV table.
        root: the folder its relative paths start from (default: the table's folder).
        input_spec: supplied by the trainer: the backbone's channels, image size, mean and std.
        augment: random resized crops and flips of training images (small shifts for glyphs); false: the
            test transform for training too.
        skip_bad: skip (and count, in a warning) missing or unreadable images and bad index lines instead of
            stopping at the first.
    """
    if not path:
        raise DataError("dataset 'csv' needs path=TABLE.csv")
    table = require(Path(path).expanduser(), "CSV table")
    if not table.is_file():
        raise DataError(f"CSV table {table} is not a file")
    base = Path(root).expanduser() if root else table.parent
    need = ("label", "path", "split")
    try:  # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in need if c not in reader.fieldnames]
            if missing:
                raise DataError(
                    f"{table}: missing column(s) {', '.join(missing)}; need label, path, split[, is_query, is_gallery]"
                )
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{table} is not a UTF-8 CSV table: {exc}") from None
    problems = Problems(skip_bad)
    parts: dict[str, list] = {"train": [], "test": []}
    for n, r in enumerate(rows, 2):
        split = (r["split"] or "").strip()
        split = {"validation": "test", "val": "test"}.get(split, split)
        if split not in parts or not (r.get("label") or "").strip() or not (r.get("path") or "").strip():
            problems.report(
                "bad index lines", f"{table} line {n}: need a label, a path and split train or validation; got {r}"
            )
            continue
        if r["label"].strip().lower() in MISSING_LABELS:
            problems.report(
                "bad index lines",
                f"{table} line {n}: label {r['label']!r} marks a missing value, not a class; give the item its "
                "class or remove the row",
            )
            continue
        if not (base / r["path"]).is_file():
            problems.report("missing images", f"{table} line {n}: image {base / r['path']} does not exist")
            continue
        parts[split].append((n, r))
    splits = []
    for name, entries in parts.items():
        if not entries:
            raise DataError(f"{table}: no rows with split={'train' if name == 'train' else 'validation'}")
        if name == "test" and "is_query" in entries[0][1]:
            for col in ("is_query", "is_gallery"):
                if not any(_truthy(r.get(col)) for _, r in entries):
                    raise DataError(
                        f"{table}: no validation row has {col}=1, so the test {col.removeprefix('is_')} set is "
                        f"empty; mark some rows {col}=1 (or drop the is_query and is_gallery columns)"
                    )
        paths = [base / r["path"] for _, r in entries]
        kw = {}
        if name == "test" and "is_query" in entries[0][1]:
            kw = {
                "query_mask": np.array([_truthy(r.get("is_query")) for _, r in entries]),
                "gallery_mask": np.array([_truthy(r.get("is_gallery")) for _, r in entries]),
            }
        splits.append(make_split([str(p) for p in paths], [r["label"] for _, r in entries], **kw))
    return _finish(*splits, input_spec, "natural", augment, problems)


#: Labels that spreadsheets and pandas write for a missing value: refused rather than made a class.
MISSING_LABELS = {"nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>"}


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "t")


@dmlkit.hookimpl
def register_datasets(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "digits",
            digits,
            "scikit-learn handwritten digits, embedded (no download): 0-4 train, 5-9 test",
            # 5 training classes: batches of 4 classes x 16 rather than 16 classes x 4, and validation on
            # held-out images of the training classes (one or two held-out classes would make MAP@R trivial)
            recommends=_digits_recommends,
        )
    )
    register(
        ComponentSpec("omniglot", omniglot, "Omniglot, torchvision layout: 964 background / 659 evaluation characters")
    )
    register(
        ComponentSpec(
            "cub200", cub200, "CUB-200-2011, official layout: classes 1-100 train, 101-200 test", aliases=("cub",)
        )
    )
    register(
        ComponentSpec(
            "cars196", cars196, "Stanford Cars, devkit layout: classes 1-98 train, 99-196 test", aliases=("cars",)
        )
    )
    register(ComponentSpec("sop", sop, "Stanford Online Products: Ebay_train.txt / Ebay_test.txt"))
    register(ComponentSpec("inshop", inshop, "In-shop Clothes Retrieval: query against gallery"))
    register(ComponentSpec("imagefolder", imagefolder, "Your images as train/<class>/* and test/<class>/*"))
    register(ComponentSpec("csv", csv_table, "OML-style CSV table: label, path, split, is_query, is_gallery"))
