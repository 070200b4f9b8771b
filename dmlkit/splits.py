"""Validation splits held out of the training split, and the checks a dataset's splits must pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dmlkit.data import Split
from dmlkit.errors import DmlkitError, FoldsError


def sample_disjoint_index(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of the images of every training class (at least one, and at least one
    left for training): the same classes, unseen images. Returns (kept for training, held out)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        items = rng.permutation(np.flatnonzero(labels == c))
        if len(items) < 2:
            continue
        n_val = min(len(items) - 1, max(1, int(round(len(items) * fraction))))
        is_val[items[:n_val]] = True
    if not is_val.any():
        raise DmlkitError("val_split=samples needs classes with at least 2 training images")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def class_disjoint_index(
    labels: np.ndarray, fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out classes: ``fraction`` of them (at least one), or, with ``folds``, fold number
    ``fold`` of a seeded partition of the classes into ``folds``. Returns (kept, held out)."""
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    if folds:
        if folds > len(classes):
            raise DmlkitError(f"{folds} folds need at least {folds} training classes; there are {len(classes)}")
        val_classes = np.array_split(classes, folds)[fold]
    else:
        n_val = max(1, int(round(len(classes) * fraction)))
        if n_val >= len(classes):
            raise DmlkitError(f"val_fraction {fraction} leaves no training class ({len(classes)} classes)")
        val_classes = classes[:n_val]
    is_val = np.isin(labels, val_classes)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def sample_disjoint_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    keep, held = sample_disjoint_index(split.labels, fraction, seed)
    return split.subset(keep), split.subset(held)


def class_disjoint_split(
    split: Split, fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[Split, Split]:
    keep, held = class_disjoint_index(split.labels, fraction, seed, folds, fold)
    return split.subset(keep), split.subset(held)


@dataclass
class Validation:
    """How a run validates: the training split it trains on, the held-out split (or None), their
    indices into the dataset's training split, and the sentence that says so."""

    train: Split
    val: Split | None
    train_index: np.ndarray | None
    val_index: np.ndarray | None
    note: str
    warnings: list[str]


def hold_out(train: Split, test_transform: Any, settings: Any) -> Validation:
    """The validation split that ``settings`` (``folds``/``fold``, ``val_fraction``, ``val_split``,
    ``seed``) ask for, evaluated with the test transform."""
    warnings: list[str] = []
    if settings["folds"]:
        check_folds(train.labels, settings["folds"], settings["seed"])
    if settings["folds"] or (settings["val_fraction"] > 0 and settings["val_split"] == "classes"):
        keep, held = class_disjoint_index(
            train.labels, settings["val_fraction"], settings["seed"], settings["folds"], settings["fold"]
        )
        val = train.subset(held)
        note = f"validation: {val.num_classes} held-out training classes ({len(val)} images)"
        if val.num_classes < 2:
            warnings.append(
                f"the validation split holds {val.num_classes} class: every neighbour shares it, so MAP@R is 1.0 "
                "whatever the model; use more classes (val_fraction) or --set val_split=samples"
            )
    elif settings["val_fraction"] > 0:
        keep, held = sample_disjoint_index(train.labels, settings["val_fraction"], settings["seed"])
        val = train.subset(held)
        note = (
            f"validation: {len(val)} held-out images of the {val.num_classes} training classes (sample-disjoint: "
            "the same classes, unseen images)"
        )
    else:
        return Validation(train, None, None, None, "no validation: best = last epoch", warnings)
    return Validation(train.subset(keep), val.with_transform(test_transform), keep, held, note, warnings)


def check_folds(labels: np.ndarray, folds: int, seed: int) -> None:
    """Every fold must validate on two classes or more: with one, every neighbour shares the query's
    class and MAP@R is 1.0 whatever the model, so the fold's selection means nothing."""
    for fold in range(folds):
        _, held = class_disjoint_index(labels, 0.0, seed, folds, fold)
        n = len(np.unique(np.asarray(labels)[held]))
        if n < 2:
            raise FoldsError(
                f"fold {fold} of {folds} would validate on {n} class of the {len(np.unique(labels))} training "
                f"classes, where the selection metric cannot tell models apart; {folds} folds need at least "
                f"{2 * folds} training classes: use fewer folds, or more training classes"
            )


def check_splits(name: str, train: Split, test: Split) -> list[str]:
    """What training and the final test need of a dataset's splits, checked before any work: a test
    query set and gallery that are not empty, and at least two items on each side. Returns warnings
    for splits that would give meaningless numbers (a one-class test set scores 1.0)."""
    if len(train) < 2 or len(test) < 2:
        raise DmlkitError(
            f"dataset '{name}' has {len(train)} training and {len(test)} test items; each split needs at least 2"
        )
    for what, mask in (("query", test.query_mask), ("gallery", test.gallery_mask)):
        if mask is not None and not np.asarray(mask, bool).any():
            raise DmlkitError(
                f"dataset '{name}': the test {what} set is empty (no test item is marked as a {what}); "
                f"mark some items as {what} items"
            )
    out = []
    if len(np.unique(test.labels)) < 2:
        out.append(
            f"dataset '{name}': the test split holds one class, so every retrieval metric is 1.0 whatever the model; "
            "test on two or more classes"
        )
    return out
