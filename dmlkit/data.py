"""Dataset splits and image transforms shared by dataset plugins."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dmlkit.errors import DataError


def load_image(path: str | Path, mode: str) -> Any:
    """Open an image file as a PIL image in ``mode`` ('RGB' or 'L'); a bad file names its path."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


@dataclass
class Split(Dataset):
    """Items with contiguous labels 0..C-1; ``item[i]`` is a path or an array.

    ``groups``, when a dataset has them, names a group of each item (a group holds whole classes:
    Omniglot's alphabet of each character); the ``nway_kshot`` evaluator draws each episode's
    classes within one group.
    """

    items: Sequence[Any]
    labels: np.ndarray
    transform: Callable[[Any], torch.Tensor] | None = None
    mode: str = "RGB"
    class_names: list[str] = field(default_factory=list)
    query_mask: np.ndarray | None = None
    gallery_mask: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise DataError(f"{len(self.items)} items but {len(self.labels)} labels")
        if self.groups is not None:
            self.groups = np.asarray(self.groups)
            if self.groups.shape != self.labels.shape:
                raise DataError(f"{len(self.labels)} items but {len(self.groups)} groups; give one group per item")

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        img = load_image(item, self.mode) if isinstance(item, str | Path) else item
        x = self.transform(img) if self.transform is not None else torch.as_tensor(img)
        return x, int(self.labels[i])

    def with_transform(self, transform: Callable[[Any], torch.Tensor] | None) -> Split:
        return Split(
            self.items,
            self.labels,
            transform,
            self.mode,
            self.class_names,
            self.query_mask,
            self.gallery_mask,
            self.groups,
        )

    def subset(self, index: np.ndarray) -> Split:
        """The items at ``index``, labels made contiguous again (class names and groups follow;
        query and gallery masks do not)."""
        index = np.asarray(index, dtype=np.int64)
        kept, labels = np.unique(self.labels[index], return_inverse=True)
        names = [self.class_names[c] for c in kept] if len(self.class_names) == self.num_classes else []
        groups = None if self.groups is None else self.groups[index]
        return Split([self.items[i] for i in index], labels, self.transform, self.mode, names, groups=groups)


@dataclass
class DatasetSplits:
    """What a dataset component returns: a training split and a test split of disjoint classes."""

    train: Split
    test: Split
    skipped: dict[str, int] = field(default_factory=dict)


def make_split(items: Sequence[Any], raw_labels: Sequence[Any], mode: str = "RGB", **kw: Any) -> Split:
    """A split whose raw labels (any sortable values) become contiguous ids."""
    names, labels = np.unique(np.asarray(raw_labels), return_inverse=True)
    return Split(list(items), labels, mode=mode, class_names=[str(n) for n in names], **kw)


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a DataError naming what was expected there."""
    if not path.exists():
        raise DataError(f"{what} not found: expected {path}")
    return path


class Problems:
    """Bad index lines and missing or unreadable images: an error naming file and line, or,
    with ``skip_bad``, skipped and counted (``counts``)."""

    def __init__(self, skip_bad: bool = False) -> None:
        self.skip_bad = skip_bad
        self.counts: dict[str, int] = {}

    def report(self, kind: str, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message + " (or pass skip_bad=true to skip such items)")
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def existing(self, paths: Sequence[Path], index: Path, lines: Sequence[int] | None = None) -> np.ndarray:
        """A mask of the listed files that exist; a missing one is reported with its index line."""
        keep = np.ones(len(paths), bool)
        for i, p in enumerate(paths):
            if not p.is_file():
                line = lines[i] if lines is not None else i + 1
                self.report("missing images", f"{index} line {line}: listed image {p} does not exist")
                keep[i] = False
        return keep

    def readable(self, paths: Sequence[str | Path]) -> np.ndarray:
        """With ``skip_bad``: a mask of the images that decode (each one is read). Otherwise all True."""
        keep = np.ones(len(paths), bool)
        if not self.skip_bad:
            return keep
        from PIL import Image

        for i, p in enumerate(paths):
            try:
                with Image.open(p) as img:
                    img.load()
            except Exception:
                self.report("unreadable images", f"cannot read image {p}")
                keep[i] = False
        return keep


def image_transforms(spec: dict[str, Any], train: bool, style: str = "natural", augment: bool = True) -> Callable:
    """torchvision transforms for a backbone's input spec.

    ``natural``: RandomResizedCrop + flip for training, Resize(size / crop_pct) + CenterCrop for test.
    ``glyph``: small grayscale images: Resize, random shifts of up to 10 % for training.
    The spec's optional ``interpolation`` (bilinear, bicubic, nearest ...) and ``crop_pct`` (the
    test crop's share of the resized image, default 224/256) are a backbone's own (timm's config).
    """
    from torchvision import transforms as T

    size = int(spec["image_size"])
    norm = T.Normalize(spec["mean"], spec["std"])
    try:
        mode = T.InterpolationMode(str(spec.get("interpolation") or "bilinear"))
    except ValueError:  # e.g. timm's "random": bilinear
        mode = T.InterpolationMode.BILINEAR
    if style == "glyph":
        steps = [T.Resize((size, size), interpolation=mode)]
        if train and augment:
            steps.append(T.RandomAffine(0, translate=(0.1, 0.1), fill=255))
        return T.Compose([*steps, T.ToTensor(), norm])
    if train and augment:
        steps = [T.RandomResizedCrop(size, interpolation=mode), T.RandomHorizontalFlip()]
    else:
        scale = 1 / float(spec["crop_pct"]) if spec.get("crop_pct") else 256 / 224
        steps = [T.Resize(int(round(size * scale)), interpolation=mode), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), norm])
