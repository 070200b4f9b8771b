"""Built-in batch samplers: random, m_per_class (P classes x M samples), one_per_class.

Each is deterministic given (seed, epoch); under DDP every rank draws the same global
sequence of batches and takes every world_size-th one, so the ranks' shares are disjoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

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

    Classes are visited in a shuffled cycle so every class comes up; a class with fewer
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

    def batches(self, rng):
        order = np.empty(0, dtype=np.int64)
        for _ in range(self.global_batches):
            if len(order) < self.p:
                order = np.concatenate([order, rng.permutation(len(self.classes))])
            chosen, order = order[: self.p], order[self.p :]
            batch = []
            for c in chosen:
                items = self.by_class[c]
                batch.extend(rng.choice(items, self.m, replace=len(items) < self.m).tolist())
            yield batch


class OnePerClassSampler(MPerClassSampler):
    """Batches of batch_size distinct classes, one sample each.

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
