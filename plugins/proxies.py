"""Proxy initializers: greedy k-center (CCP), random samples, class means, normal.

An initializer is called as ``init(pool, previous, k)``: ``pool`` [C, b, D] holds b embedded
training samples per class (None for data-free initializers), ``previous`` [C, K, D] the
current proxies (or None), and it returns new proxies [C, k, D].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

import dmlkit
from dmlkit.errors import OptionError


def greedy_kcenter(pool: Tensor, previous: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Farthest-first traversal per class, vectorised over classes.

    Each pool point's min-distance (squared Euclidean) is seeded with its distance to the
    class's previous proxies (the origin when there are none: the first pick is then the
    largest norm); then k times the farthest point is picked and the min-distances updated.
    Returns the picks [C, k, D] and their min-distances at the time of picking [C, k].
    """
    c, b, _ = pool.shape
    if k > b:
        raise OptionError(f"cannot pick {k} proxies per class from a pool of {b} samples per class")
    seeds = torch.zeros_like(pool[:, :1]) if previous is None else previous.to(pool)
    min_d = torch.cdist(pool, seeds).square().amin(2)  # [C, b]
    rows = torch.arange(c, device=pool.device)
    picks, gaps = [], []
    for _ in range(k):  # k is small (4-8); the classes are the vectorised dimension
        j = min_d.argmax(1)
        chosen = pool[rows, j]  # [C, D]
        picks.append(chosen)
        gaps.append(min_d[rows, j])
        min_d = torch.minimum(min_d, (pool - chosen[:, None]).square().sum(2))
    return torch.stack(picks, 1), torch.stack(gaps, 1)


class GreedyKCenter:
    """Greedy k-center (farthest-first) selection from the pool, seeded by the previous proxies."""

    needs_pool = True

    def __call__(self, pool: Tensor, previous: Tensor | None, k: int) -> Tensor:
        return greedy_kcenter(pool, previous, k)[0]


class RandomSamples:
    """k random pool samples per class (without replacement)."""

    needs_pool = True

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, pool, previous, k):
        c, b, _ = pool.shape
        if k > b:
            raise OptionError(f"cannot pick {k} proxies per class from a pool of {b} samples per class")
        idx = torch.rand(c, b, generator=self.gen).argsort(1)[:, :k].to(pool.device)
        return torch.gather(pool, 1, idx[..., None].expand(-1, -1, pool.shape[2]))


class ClassMeans:
    """The class mean of the pool, plus small noise to tell several proxies of a class apart."""

    needs_pool = True

    def __init__(self, noise: float = 0.01, seed: int = 0):
        self.noise, self.gen = noise, torch.Generator().manual_seed(seed)

    def __call__(self, pool, previous, k):
        mean = pool.mean(1, keepdim=True).expand(-1, k, -1)
        return mean + self.noise * torch.randn(mean.shape, generator=self.gen).to(pool)


class NormalInit:
    """Proxies drawn from N(0, std^2); needs no data."""

    needs_pool = False

    def __init__(self, std: float = 1.0, seed: int = 0):
        if std <= 0:
            raise OptionError(f"std must be > 0; got {std}")
        self.std, self.gen = std, torch.Generator().manual_seed(seed)

    def __call__(self, pool, previous, k):
        ref = pool if pool is not None else previous
        return self.std * torch.randn(ref.shape[0], k, ref.shape[2], generator=self.gen).to(ref)


@torch.no_grad()
def embed_pool(trainer: Any, rounds: int, seed: int) -> Tensor:
    """[C, rounds, D]: per round one random training image of every class (without replacement
    within a class until it is exhausted), with training augmentation, embedded by the current
    network in inference mode."""
    labels = trainer.train_split.labels
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    idx = np.empty((len(classes), rounds), dtype=np.int64)
    for c in classes:  # index bookkeeping only; the embedding below is batched
        items = np.flatnonzero(labels == c)
        order = np.concatenate([rng.permutation(items) for _ in range(-(-rounds // len(items)))])
        idx[c] = order[:rounds]
    flat = idx.reshape(-1)
    loader = DataLoader(
        Subset(trainer.train_split, flat.tolist()), batch_size=trainer.settings["eval_batch_size"], num_workers=0
    )
    was = trainer.model.training
    trainer.model.eval()
    out = []
    for x, _ in loader:
        with trainer.autocast():
            out.append(trainer.model(x.to(trainer.device)).float())
    trainer.model.train(was)
    return torch.cat(out).reshape(len(classes), rounds, -1)


@dmlkit.hookimpl
def register_proxy_initializers(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "greedy_kcenter", GreedyKCenter, "Farthest-first k-center picks per class (CCP)", aliases=("kcenter",)
        )
    )
    register(ComponentSpec("random_samples", RandomSamples, "Random embedded training samples per class"))
    register(ComponentSpec("class_means", ClassMeans, "Embedded class means (plus small noise)"))
    register(ComponentSpec("normal", NormalInit, "Gaussian proxies, no data needed"))
