"""Built-in batch samplers: random, m_per_class (P classes x M samples), one_per_class, and
two_views (each image of another sampler's batch twice, for self-supervised losses).

Each is deterministic given (seed, epoch); under DDP every rank draws the same global
sequence of batches and takes every world_size-th one, so the ranks' shares are disjoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import dmlkit
from dmlkit.errors import OptionError


class BatchSampler:
    """Base: ``set_epoch`` then iterate lists of dataset indices."""

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 0,
    ):
        if batch_size < 2:
            raise OptionError(f"batch_size must be >= 2; got {batch_size}")
        self.labels = np.asarray(labels)
        if len(self.labels) < batch_size:
            raise OptionError(f"batch_size {batch_size} is larger than the training set ({len(self.labels)} items)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0
        self.global_batches = batches_per_epoch or len(self.labels) // batch_size
        self.global_batches -= self.global_batches % world_size  # every rank gets as many batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.global_batches // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for b, batch in enumerate(self.batches(rng)):
            if b % self.world_size == self.rank:
                yield batch

    def batches(self, rng: np.random.Generator) -> Iterator[list[int]]:
        raise NotImplementedError


class RandomSampler(BatchSampler):
    """Shuffled batches of ``batch_size``, the last incomplete one dropped.

    Args:
        labels: supplied by the trainer: the training labels.
        batch_size: supplied by the trainer (train.batch_size): items per batch (each process gets whole batches).
        seed: supplied by the trainer: each epoch's order is drawn from (seed, epoch).
        rank: supplied by the trainer: this process's share of every epoch's batches.
        world_size: supplied by the trainer: the number of processes sharing the batches.
        batches_per_epoch: batches per epoch (0: the training set size // batch_size).
    """

    def batches(self, rng):
        perm = rng.permutation(len(self.labels))
        for b in range(self.global_batches):
            yield perm[np.arange(b * self.batch_size, (b + 1) * self.batch_size) % len(perm)].tolist()


class MPerClassSampler(BatchSampler):
    """Batches of batch_size / m classes x m samples each.

    Classes are visited in a shuffled cycle so every class comes up, and a batch never holds a
    class twice (as PML's MPerClassSampler), also across two cycles; a class with fewer
    than m items is sampled with replacement. An epoch is ``batches_per_epoch`` batches
    (default: the training set size // batch_size).

    Args:
        labels: supplied by the trainer: the training labels.
        batch_size: supplied by the trainer (train.batch_size): items per batch (each process gets whole batches).
        m: samples of each class in a batch (batch_size must be a multiple of it).
        seed: supplied by the trainer: each epoch's order is drawn from (seed, epoch).
        rank: supplied by the trainer: this process's share of every epoch's batches.
        world_size: supplied by the trainer: the number of processes sharing the batches.
        batches_per_epoch: batches per epoch (0: the training set size // batch_size).
    """

    def __init__(
        self,
        labels,
        batch_size: int = 64,
        m: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 0,
    ):
        super().__init__(labels, batch_size, seed, rank, world_size, batches_per_epoch)
        if m < 1 or batch_size % m:
            raise OptionError(f"batch_size ({batch_size}) must be a multiple of m ({m})")
        self.m = m
        self.classes, inverse = np.unique(self.labels, return_inverse=True)
        self.by_class = [np.flatnonzero(inverse == c) for c in range(len(self.classes))]
        self.p = batch_size // m
        if self.p > len(self.classes):
            raise OptionError(
                f"batch_size/m = {self.p} classes per batch, but the training set has {len(self.classes)}; "
                f"lower batch_size or raise m"
            )
        if m > max(len(x) for x in self.by_class):
            raise OptionError(
                f"m = {m} is larger than the samples of every class (at most {max(map(len, self.by_class))})"
            )

    #: a batch that takes the last classes of one shuffled cycle and the first of the next never takes
    #: a class twice (dmlkit 0.1 could: 2m samples of one class, which smooth_ap refuses mid-run)
    distinct_classes = True

    def batches(self, rng):
        order = np.empty(0, dtype=np.int64)
        for _ in range(self.global_batches):
            if len(order) < self.p:
                fresh = rng.permutation(len(self.classes))
                if self.distinct_classes:  # the leftover's classes go to the end of the next cycle
                    fresh = np.concatenate([fresh[~np.isin(fresh, order)], fresh[np.isin(fresh, order)]])
                order = np.concatenate([order, fresh])
            chosen, order = order[: self.p], order[self.p :]
            batch = []
            for c in chosen:
                items = self.by_class[c]
                batch.extend(rng.choice(items, self.m, replace=len(items) < self.m).tolist())
            yield batch


class OnePerClassSampler(MPerClassSampler):
    """Batches of batch_size distinct classes, one sample each (also where a batch takes the last
    classes of one shuffled cycle and the first of the next).

    Args:
        labels: supplied by the trainer: the training labels.
        batch_size: supplied by the trainer (train.batch_size): items per batch (each process gets whole batches).
        seed: supplied by the trainer: each epoch's order is drawn from (seed, epoch).
        rank: supplied by the trainer: this process's share of every epoch's batches.
        world_size: supplied by the trainer: the number of processes sharing the batches.
        batches_per_epoch: batches per epoch (0: the training set size // batch_size).
    """

    def __init__(
        self,
        labels,
        batch_size: int = 64,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 0,
    ):
        super().__init__(labels, batch_size, 1, seed, rank, world_size, batches_per_epoch)


#: what the trainer gives a sampler; two_views sets them for its base sampler
_RUNTIME = ("labels", "batch_size", "seed", "rank", "world_size")


class TwoViewsSampler:
    """Two views of each image: every batch is n distinct images followed by the same n again
    (indices ``batch + batch``), so the DataLoader loads each image twice and the training
    transform, drawn anew for every item, gives two independent augmentations: row i and row
    i + n are two views of one image, the ``[view1; view2]`` batch ``self_supervised`` needs
    (SimCLR's batches: Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020; PML has no sampler for it and leaves the views to the user).

    ``train.batch_size`` counts rows: a batch holds batch_size / 2 images, each twice (an odd
    batch size is refused). The n images are a batch of the ``base`` sampler, built with batch
    size n: ``random`` (default; an epoch shows every image once, in two views, the last
    training-set size mod n images dropped) or ``m_per_class`` (its class structure kept:
    batch_size / 2 / m distinct classes x m images, each twice), with ``base_options``. Under torchrun
    each process takes every world_size-th batch, as the other samplers. A base batch that
    holds an image twice is refused: ``self_supervised`` would count its copies as two images.

    With ``train.feature_cache`` the two copies of an image take two different cached views, so
    it needs ``train.cache_views >= 2``.

    Args:
        labels: supplied by the trainer: the training labels.
        batch_size: supplied by the trainer (train.batch_size): rows per batch, twice the images in it.
        base: the registered sampler that picks each batch's images (random, m_per_class, one_per_class, ...).
        base_options: options of the base sampler (``--sampler-opt base_options.m=4``).
        seed: supplied by the trainer: each epoch's order is drawn from (seed, epoch).
        rank: supplied by the trainer: this process's share of every epoch's batches.
        world_size: supplied by the trainer: the number of processes sharing the batches.
    """

    #: copies of each image in a batch, laid out [copy 1; copy 2] (dmlkit.contract.ATTRIBUTES)
    batch_views = 2
    nested_options = {"base_options": ("sampler", "base")}

    @staticmethod
    def validate_options(options: dict[str, Any]) -> None:
        """The base sampler and its options, checked with the config before any data loads."""
        name = options.get("base", "random")
        base_options = options.get("base_options") or {}
        if not isinstance(base_options, dict):
            raise OptionError(f"two_views base_options must be a table of options; got {base_options!r}")
        registry = dmlkit.get_registry()
        spec = registry.get("sampler", name)  # an unknown name fails here, with suggestions
        if getattr(spec.factory, "batch_views", 1) != 1:
            raise OptionError(f"two_views cannot take '{spec.name}' as its base: it gives views itself")
        given = sorted(set(base_options) & set(_RUNTIME))
        if given:
            raise OptionError(
                f"two_views base_options cannot set '{given[0]}': two_views gives its base sampler the trainer's, "
                "with batch_size = train.batch_size / 2"
            )
        registry.resolve_options("sampler", spec.name, dict(base_options))

    def __init__(
        self,
        labels,
        batch_size: int = 64,
        base: str = "random",
        base_options: dict | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.validate_options({"base": base, "base_options": base_options})
        if batch_size % 2 or batch_size < 4:
            raise OptionError(
                f"two_views needs an even batch_size of at least 4 (rows: two views of batch_size / 2 images); "
                f"got {batch_size}"
            )
        self.images = batch_size // 2
        self.rank, self.world_size = rank, world_size
        registry = dmlkit.get_registry()
        self.base_name = registry.get("sampler", base).name
        context = {"labels": labels, "batch_size": self.images, "seed": seed, "rank": 0, "world_size": 1}
        try:
            self.base = registry.build("sampler", base, context=context, **dict(base_options or {}))
        except OptionError as exc:
            raise OptionError(
                f"two_views base '{self.base_name}', given batch_size {self.images} (train.batch_size / 2): {exc}"
            ) from None
        if isinstance(self.base, MPerClassSampler):
            self.base.distinct_classes = True  # a class twice in a batch could draw an image twice
            small = [len(items) for items in self.base.by_class if len(items) < self.base.m]
            if small:
                raise OptionError(
                    f"two_views with base {self.base_name}: a class with {min(small)} images < m = {self.base.m} "
                    "would be drawn with repeats, one image counted as two; lower m (base_options.m)"
                )

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        total = len(self) * self.world_size  # every rank gets as many batches
        for b, batch in enumerate(self.base):
            if b >= total:
                return
            if b % self.world_size != self.rank:
                continue
            batch = [int(i) for i in batch]
            if len(set(batch)) != len(batch):
                raise OptionError(
                    f"two_views: base sampler '{self.base_name}' gave a batch that holds an image twice, which "
                    "self-supervised losses count as two images; pick a base that draws distinct images"
                )
            yield batch + batch

    def on_train_start(self, run) -> None:
        """Warn when the training transform is not random: the two views of an image would be equal."""
        split = run.train_split
        if len(split) and _fixed_transform(split, 0):
            run.console.print(
                "[bold yellow]warning: two_views: the training transform gives the same tensor every time (no "
                "random augmentation), so the two views of each image are identical and a self-supervised loss "
                "learns nothing from them; turn on the dataset's augmentation (--dataset-opt augment=true)"
                "[/bold yellow]",
                soft_wrap=True,
            )


def _fixed_transform(split, index: int, draws: int = 16) -> bool:
    """True when ``draws`` loads of item ``index`` are all equal; the random streams are left as they were."""
    import random

    states = (random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            first = split[index][0]
            return all(torch.equal(first, split[index][0]) for _ in range(draws - 1))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


@dmlkit.hookimpl
def register_samplers(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "m_per_class", MPerClassSampler, "P classes x M samples per batch, defined epoch length", aliases=("pk",)
        )
    )
    register(ComponentSpec("random", RandomSampler, "Shuffled batches"))
    register(ComponentSpec("one_per_class", OnePerClassSampler, "One sample from each of batch_size classes"))
    register(
        ComponentSpec(
            "two_views", TwoViewsSampler, "Each image of a batch twice, [view1; view2], for self-supervised losses"
        )
    )
