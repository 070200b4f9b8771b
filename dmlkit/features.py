"""The frozen-backbone fast path: a frozen backbone's features, computed once and cached.

With ``train.freeze_backbone`` the backbone never changes, so its pooled features of an image
depend only on the image, its augmentation and the backbone. ``train.feature_cache`` computes
them once per augmentation view (``train.cache_views`` views of every training image, and one
test-transform view of every image that is evaluated: validation and test), stores them under
``train.cache_dir`` keyed by dataset, backbone, weights, transform and view, and trains the
head and loss on them: any backbone and loss, unchanged, at hundreds of steps per second on a
CPU. With the backbone frozen up to a stage (``freeze_backbone = "layer3"``) the cache holds
that stage's output maps instead and the later stages train on them; a cache larger than half
the available memory is refused before any image is embedded. A run's index (``dmlkit index``)
takes the cached rows of the images the run has already embedded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import Tensor

from dmlkit.data import Split
from dmlkit.embedding import embed_dataset, in_eval_mode
from dmlkit.errors import DmlkitError
from dmlkit.fileio import save_torch
from dmlkit.runtime import loader_workers, seed_everything

FORMAT = 1
#: The share of the machine's available memory a feature cache may fill.
MEMORY_SHARE = 0.5


def cache_dir(setting: str) -> Path:
    """``train.cache_dir``, else $DMLKIT_CACHE, else ~/.cache/dmlkit/features."""
    if setting:
        return Path(setting)
    if os.environ.get("DMLKIT_CACHE"):
        return Path(os.environ["DMLKIT_CACHE"])
    return Path.home() / ".cache" / "dmlkit" / "features"


def _weights_digest(backbone: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _items_digest(split: Split) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(split.labels).tobytes())
    for item in split.items:
        if isinstance(item, str | Path):
            h.update(str(item).encode())
        else:
            h.update(torch.as_tensor(item).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Pooled features of a frozen backbone, per split and view, in memory and on disk."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        t = trainer.settings
        self.dir = cache_dir(t["cache_dir"])
        self.views = t["cache_views"]
        model = trainer.model
        self._weights = _weights_digest(model.prefix if model.prefix is not None else model.backbone)
        self._memory: dict[str, Tensor] = {}
        self.check_size()

    def key(self, split: Split, view: int | None) -> str:
        cfg = self.trainer.cfg
        parts = {
            "format": FORMAT,
            "dataset": cfg["dataset"],
            "backbone": cfg["backbone"],
            "weights": self._weights,
            "pooling": cfg["train"]["pooling"],
            "frozen_upto": self.trainer.model.frozen_upto,  # "" (the pooled features) or a stage's output
            "transform": repr(split.transform),
            "items": _items_digest(split),
            "view": view,  # None: the evaluation transform, no randomness
            "amp": bool(self.trainer.settings["amp"]) and self.trainer.device.type == "cuda",  # bf16 features differ
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def features(self, split: Split, view: int | None, what: str) -> Tensor:
        """[N, F] pooled features of ``split`` (augmentation view ``view``, or None), computed once."""
        key = self.key(split, view)
        feats = self._stored(key, len(split))
        if feats is None:
            feats = self._compute(split, view, what) if view is not None else self._compute_reusing(split, what)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                # several runs may share the cache
                save_torch(feats, self.dir / f"{key}.pt", "feature cache file", unique=True)
            except (OSError, DmlkitError) as exc:
                self.trainer.console.print(
                    f"[yellow]warning: {escape(str(exc))} (the run goes on without caching)[/yellow]", soft_wrap=True
                )
        self._memory[key] = feats
        return feats

    def _evaluated_rows(self, split: Split) -> dict[str, Tensor]:
        """The run's cached evaluation-transform features of its validation and test images, by the
        image file's real path: what another split of image files under the same transform (the
        folder ``dmlkit index`` embeds) need not embed again. Only files already cached are read."""
        tr = self.trainer
        rows: dict[str, Tensor] = {}
        for other in (tr.val_split, tr.test_split):
            if other is None or other is split or other.mode != split.mode:
                continue
            if repr(other.transform) != repr(split.transform):
                continue
            if not all(isinstance(item, str | Path) for item in other.items):
                continue
            feats = self._stored(self.key(other, None), len(other))
            if feats is not None:
                rows.update(zip((os.path.realpath(item) for item in other.items), feats))
        return rows

    def _compute_reusing(self, split: Split, what: str) -> Tensor:
        """Evaluation-transform features of ``split``, taking the rows of images the run has already
        cached (its validation and test images) and embedding only the others."""
        known = self._evaluated_rows(split) if all(isinstance(i, str | Path) for i in split.items) else {}
        rows = [known.get(os.path.realpath(item)) for item in split.items] if known else []
        missing = [i for i, row in enumerate(rows) if row is None]
        if not known or len(missing) == len(split):
            return self._compute(split, None, what)
        self.trainer.console.print(
            f"feature cache: {len(split) - len(missing):,} of {len(split):,} images already cached "
            f"(the run's validation and test images); embedding the other {len(missing):,}",
            soft_wrap=True,
        )
        if missing:
            for i, row in zip(missing, self._compute(split.subset(np.asarray(missing)), None, what)):
                rows[i] = row
        return torch.stack(rows)

    def _stored(self, key: str, n: int) -> Tensor | None:
        """The [n, ...] features cached under ``key`` (in memory, else on disk), or None when they
        are absent, damaged or of another length."""
        if key in self._memory:
            return self._memory[key]
        path = self.dir / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None  # a damaged cache file is recomputed
        if not isinstance(feats, Tensor) or feats.ndim < 2 or len(feats) != n:
            return None
        return feats

    @torch.no_grad()
    def _compute(self, split: Split, view: int | None, what: str) -> Tensor:
        import random

        tr = self.trainer
        # each view its own, run-independent draw; the run's own random streams are left as they were
        states = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[tr.device] if tr.device.type == "cuda" else []):
            seed_everything(10_007 + (view if view is not None else -1))
            model = tr.model
            with in_eval_mode(model.backbone):
                out = embed_dataset(
                    model.prefix_features,
                    split,
                    device=tr.device,
                    batch_size=tr.settings["eval_batch_size"],
                    workers=loader_workers(tr.settings["num_workers"], split.items),
                    amp=tr.settings["amp"],
                    console=tr.console,
                    what=f"feature cache: {what}",
                    # the whole frozen backbone in channels-last, as the uncached steps run it on a CPU (a
                    # third to a half faster); a frozen prefix in the training steps' own default format
                    model=None if model.prefix is not None else model.backbone,
                ).contiguous()
        random.setstate(states[0])
        np.random.set_state(states[1])
        if not len(out):
            raise DmlkitError(f"the {what} split is empty: nothing to cache")
        return out

    def check_size(self) -> None:
        """Refuse, before any image is embedded, a cache of the training views and the evaluated
        images that would fill more than half the machine's available memory (a stage's feature
        maps can be hundreds of times larger than pooled features)."""
        tr = self.trainer
        full = tr.full_train_split
        x = full.with_transform(tr.test_split.transform)[0][0]
        with torch.no_grad(), in_eval_mode(tr.model):
            per_item = tr.model.prefix_features(x[None].to(tr.device)).numel() * 4
        items = len(full) * self.views + len(tr.val_split or ()) + len(tr.test_split)
        need, available = per_item * items, available_memory()
        if available is not None and need > MEMORY_SHARE * available:
            what = f"stage {tr.model.frozen_upto!r}'s outputs" if tr.model.frozen_upto else "pooled features"
            raise DmlkitError(
                f"the feature cache of {what} ({per_item // 4:,} numbers per image, {items:,} images and views) "
                f"needs {need / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB available; "
                "freeze up to a later stage, lower train.cache_views, or set feature_cache=false"
            )

    def train_views(self) -> Tensor:
        """[views, N, F] the training split's features (the whole dataset's training split is cached,
        so that every validation split and seed reuses the same files)."""
        tr = self.trainer
        full = tr.full_train_split
        views = [self.features(full, v, f"training view {v + 1}/{self.views}") for v in range(self.views)]
        stacked = torch.stack(views)
        return stacked if tr.train_index is None else stacked[:, torch.as_tensor(tr.train_index)]

    def eval_features(self, split: Split, what: str = "evaluation") -> Tensor:
        """[N, F] features of ``split`` under the evaluation transform: the validation images only
        (not every training image), the test split, or another split (``what`` names it)."""
        tr = self.trainer
        what = {id(tr.val_split): "validation", id(tr.test_split): "test"}.get(id(split), what)
        return self.features(split, None, what)

    def train_batches(self, epoch: int):
        """(features, labels) batches of one epoch: the sampler's batches, each item in one of the
        cached views drawn from (seed, epoch). A sampler that gives each image several times in a
        batch (``batch_views`` > 1, two_views) gets a different view for each copy: the first copy
        the view drawn as above, the k-th the first's view shifted by the k-th of a random
        permutation of 1..views-1 drawn per item from (seed, epoch)."""
        tr = self.trainer
        stacked = self.train_views()
        labels = torch.as_tensor(tr.train_split.labels)
        rng = np.random.default_rng([tr.settings["seed"], epoch])
        pick = torch.as_tensor(rng.integers(0, self.views, stacked.shape[1]))
        copies = getattr(tr.sampler, "batch_views", 1)
        if copies > 1:
            shifts = np.tile(np.arange(1, self.views), (stacked.shape[1], 1))
            other = np.random.default_rng([tr.settings["seed"], epoch, copies])
            shifts = torch.as_tensor(
                np.concatenate([np.zeros((len(shifts), 1), np.int64), other.permuted(shifts, axis=1)], 1)
            )
        for batch in tr.sampler:
            idx = torch.as_tensor(batch)
            view = pick[idx]
            if copies > 1:
                view = (view + shifts[idx, occurrence(idx)]) % self.views
            yield stacked[view, idx], labels[idx]

    def train_items(self, index: np.ndarray, seed: int) -> Tensor:
        """Features of training items ``index``, each in a view drawn from ``seed`` (augmented samples)."""
        stacked = self.train_views()
        idx = torch.as_tensor(index)
        pick = torch.as_tensor(np.random.default_rng(seed).integers(0, self.views, len(idx)))
        return stacked[pick, idx]


def occurrence(idx: Tensor) -> Tensor:
    """For each entry of ``idx``, how many equal entries come before it (0 for a first occurrence)."""
    order = torch.argsort(idx, stable=True)
    ordered = idx[order]
    starts = torch.ones(len(idx), dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    position = torch.arange(len(idx))
    first = torch.cummax(torch.where(starts, position, 0), 0).values
    out = torch.empty_like(position)
    out[order] = position - first
    return out


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
