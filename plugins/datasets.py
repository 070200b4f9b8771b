"""Built-in datasets, each in its distribution's own layout; train and test classes are disjoint."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmlkit
from dmlkit.data import DatasetSplits, check_files, image_transforms, make_split, require
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


def _finish(train, test, spec: dict[str, Any] | None, style: str, augment: bool) -> DatasetSplits:
    spec = {**(_GRAY if style == "glyph" else _RGB), **(spec or {})}
    mode = "L" if spec["channels"] == 1 else "RGB"
    train.mode = test.mode = mode
    train.transform = image_transforms(spec, True, style, augment)
    test.transform = image_transforms(spec, False, style, augment)
    return DatasetSplits(train, test)


def _read_rows(path: Path, ncols: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows; a short row is an error naming file and line."""
    rows = []
    with open(require(path, "index file"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if n <= skip or not line.strip():
                continue
            parts = line.split()
            if len(parts) < ncols:
                raise DataError(f"{path} line {n}: expected {ncols} fields, got {len(parts)}: {line.strip()!r}")
            rows.append(parts)
    return rows


# ---------------------------------------------------------------------------------------- digits
def digits(train_classes: int = 5) -> DatasetSplits:
    """scikit-learn's bundled 8x8 handwritten digits (no download): classes 0-4 train, 5-9 test."""
    from sklearn.datasets import load_digits

    if not 1 <= train_classes <= 9:
        raise DataError(f"train_classes must be in 1..9; got {train_classes}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    y = d.target
    tr, te = np.flatnonzero(y < train_classes), np.flatnonzero(y >= train_classes)
    train = make_split([x[i] for i in tr], y[tr], mode="array")
    test = make_split([x[i] for i in te], y[te], mode="array")
    return DatasetSplits(train, test)


# -------------------------------------------------------------------------------------- omniglot
def omniglot(root: str = "", input_spec: dict | None = None, augment: bool = True) -> DatasetSplits:
    """Omniglot in torchvision's layout: background characters train, evaluation characters test."""
    base = _root(root, "omniglot")
    if (base / "omniglot-py").is_dir():
        base = base / "omniglot-py"
    splits = []
    for part in ("images_background", "images_evaluation"):
        folder = require(
            base / part,
            f"Omniglot folder {part}/ (torchvision layout: omniglot-py/{part}/<Alphabet>/characterNN/*.png)",
        )
        items, labels = [], []
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                for img in sorted(char.glob("*.png")):
                    items.append(str(img))
                    labels.append(f"{alphabet.name}/{char.name}")
        if not items:
            raise DataError(f"no PNG images under {folder}/<Alphabet>/characterNN/")
        splits.append(make_split(items, labels))
    return _finish(*splits, input_spec, "glyph", augment)


# ----------------------------------------------------------------------------------------- cub200
def cub200(root: str = "", input_spec: dict | None = None, augment: bool = True) -> DatasetSplits:
    """CUB-200-2011 (official layout: images.txt, image_class_labels.txt): class ids 1-100 train, 101-200 test."""
    base = _root(root, "cub200")
    if (base / "CUB_200_2011").is_dir():
        base = base / "CUB_200_2011"
    images = {r[0]: r[1] for r in _read_rows(base / "images.txt", 2)}
    labels = {r[0]: int(r[1]) for r in _read_rows(base / "image_class_labels.txt", 2)}
    missing = sorted(set(images) - set(labels), key=int)
    if missing:
        raise DataError(f"{base / 'image_class_labels.txt'} has no line for image id {missing[0]} of images.txt")
    ids = sorted(images, key=int)
    paths = [base / "images" / images[i] for i in ids]
    check_files(paths, base / "images.txt")
    cls = np.array([labels[i] for i in ids])
    tr, te = cls <= 100, cls > 100
    train = make_split([str(p) for p, t in zip(paths, tr) if t], cls[tr])
    test = make_split([str(p) for p, t in zip(paths, te) if t], cls[te])
    if not len(train) or not len(test):
        raise DataError(f"{base}: need images of class ids 1-100 (train) and 101-200 (test)")
    return _finish(train, test, input_spec, "natural", augment)


# ---------------------------------------------------------------------------------------- cars196
def cars196(root: str = "", input_spec: dict | None = None, augment: bool = True) -> DatasetSplits:
    """Stanford Cars in the devkit layout (cars_train/, cars_test/, devkit/*.mat): classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    base = _root(root, "cars196")
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
    check_files(items, base)
    cls = np.array(cls)
    tr, te = cls <= 98, cls > 98
    train = make_split([str(p) for p, t in zip(items, tr) if t], cls[tr])
    test = make_split([str(p) for p, t in zip(items, te) if t], cls[te])
    return _finish(train, test, input_spec, "natural", augment)


# -------------------------------------------------------------------------------------------- sop
def sop(root: str = "", input_spec: dict | None = None, augment: bool = True) -> DatasetSplits:
    """Stanford Online Products (Ebay_train.txt / Ebay_test.txt: image_id class_id super_class_id path)."""
    base = _root(root, "sop")
    if (base / "Stanford_Online_Products").is_dir():
        base = base / "Stanford_Online_Products"
    out = []
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        rows = _read_rows(base / name, 4, skip=1)
        paths = [base / r[3] for r in rows]
        check_files(paths, base / name)
        out.append(make_split([str(p) for p in paths], [int(r[1]) for r in rows]))
    return _finish(*out, input_spec, "natural", augment)


# ----------------------------------------------------------------------------------------- inshop
def inshop(root: str = "", input_spec: dict | None = None, augment: bool = True) -> DatasetSplits:
    """In-shop Clothes Retrieval (list_eval_partition.txt): train items; test = query against gallery."""
    base = _root(root, "inshop")
    index = base / "list_eval_partition.txt"
    if not index.exists() and (base / "Eval" / index.name).exists():
        index = base / "Eval" / index.name
    rows = _read_rows(index, 3, skip=2)
    bad = [r for r in rows if r[2] not in ("train", "query", "gallery")]
    if bad:
        raise DataError(f"{index}: evaluation_status must be train, query or gallery; got {bad[0][2]!r}")
    paths = [base / r[0] for r in rows]
    check_files(paths, index)
    status = np.array([r[2] for r in rows])
    items = np.array([str(p) for p in paths], dtype=object)
    ids = np.array([r[1] for r in rows])
    train = make_split(list(items[status == "train"]), ids[status == "train"])
    te = status != "train"
    test = make_split(list(items[te]), ids[te], query_mask=status[te] == "query", gallery_mask=status[te] == "gallery")
    return _finish(train, test, input_spec, "natural", augment)


# ------------------------------------------------------------------------------------ imagefolder
def imagefolder(
    root: str = "", input_spec: dict | None = None, augment: bool = True, style: str = "natural"
) -> DatasetSplits:
    """Your own images: root/train/<class>/* and root/test/<class>/* (test classes should be unseen)."""
    base = _root(root, "imagefolder")
    out = []
    for part in ("train", "test"):
        folder = require(base / part, f"folder {part}/ with one sub-folder per class")
        items, labels = [], []
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(str(f))
                    labels.append(cls.name)
        if not items:
            raise DataError(f"no images under {folder}/<class>/ (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
        out.append(make_split(items, labels))
    return _finish(*out, input_spec, style, augment)


# -------------------------------------------------------------------------------------------- csv
def csv_table(path: str = "", root: str = "", input_spec: dict | None = None, augment: bool = True) -> DatasetSplits:
    """An OML-style CSV: label, path, split (train/validation), is_query, is_gallery; paths relative to root."""
    if not path:
        raise DataError("dataset 'csv' needs path=TABLE.csv")
    table = require(Path(path).expanduser(), "CSV table")
    base = Path(root).expanduser() if root else table.parent
    need = ("label", "path", "split")
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{table}: missing column(s) {', '.join(missing)}; need label, path, split[, is_query, is_gallery]"
            )
        rows = list(reader)
    parts: dict[str, list] = {"train": [], "test": []}
    for n, r in enumerate(rows, 2):
        split = (r["split"] or "").strip()
        split = {"validation": "test", "val": "test"}.get(split, split)
        if split not in parts:
            raise DataError(f"{table} line {n}: split must be train or validation; got {r['split']!r}")
        parts[split].append((n, r))
    splits = []
    for name, entries in parts.items():
        if not entries:
            raise DataError(f"{table}: no rows with split={'train' if name == 'train' else 'validation'}")
        paths = [base / r["path"] for _, r in entries]
        for (n, _), p in zip(entries, paths):
            if not p.is_file():
                raise DataError(f"{table} line {n}: image {p} does not exist")
        kw = {}
        if name == "test" and "is_query" in entries[0][1]:
            kw = {
                "query_mask": np.array([_truthy(r.get("is_query")) for _, r in entries]),
                "gallery_mask": np.array([_truthy(r.get("is_gallery")) for _, r in entries]),
            }
        splits.append(make_split([str(p) for p in paths], [r["label"] for _, r in entries], **kw))
    return _finish(*splits, input_spec, "natural", augment)


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "t")


@dmlkit.hookimpl
def register_datasets(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec("digits", digits, "scikit-learn handwritten digits, embedded (no download): 0-4 train, 5-9 test")
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
