"""Proxy initializers: greedy k-center (CCP), random samples, class means, normal.

An initializer is called as ``init(pool, previous, k)`` by :class:`dmlkit.proxies.ProxyBank`:
``pool`` [C, b, D] holds b embedded training samples per class (None for data-free
initializers), ``previous`` [C, K, D] the current proxies (or None), and it returns new
proxies [C, k, D].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.proxies import embed_pool as core_embed_pool


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
    """Greedy k-center (farthest-first) selection from the pool, seeded by the previous proxies.

    ``seed_with_previous``: start each pool point's min-distance from its distance to the
    class's previous proxies (CCP's rule); off, from the origin (the first pick is the
    largest-norm sample).

    Args:
        seed_with_previous: start the min-distances from the class's previous proxies (CCP); off: from the origin.
    """

    needs_pool = True

    def __init__(self, seed_with_previous: bool = True):
        self.seed_with_previous = seed_with_previous
        self._gaps: Tensor | None = None

    def __call__(self, pool: Tensor, previous: Tensor | None, k: int) -> Tensor:
        picks, self._gaps = greedy_kcenter(pool, previous if self.seed_with_previous else None, k)
        return picks

    def stats(self) -> dict[str, float]:
        """The mean min-distance of the picks when they were picked (the k-center radius, on average)."""
        return {} if self._gaps is None else {"mean_min_distance": float(self._gaps.mean())}


class RandomSamples:
    """k random pool samples per class (without replacement).

    Args:
        seed: seed of the random picks.
    """

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
    """The class mean of the pool, plus small noise to tell several proxies of a class apart.

    Args:
        noise: standard deviation of the Gaussian noise added to each copy of the mean.
        seed: seed of the noise.
    """

    needs_pool = True

    def __init__(self, noise: float = 0.01, seed: int = 0):
        self.noise, self.gen = noise, torch.Generator().manual_seed(seed)

    def __call__(self, pool, previous, k):
        mean = pool.mean(1, keepdim=True).expand(-1, k, -1)
        return mean + self.noise * torch.randn(mean.shape, generator=self.gen).to(pool)


class NormalInit:
    """Proxies drawn from N(0, std^2); needs no data.

    Args:
        std: the standard deviation.
        seed: seed of the draw.
    """

    needs_pool = False

    def __init__(self, std: float = 1.0, seed: int = 0):
        if std <= 0:
            raise OptionError(f"std must be > 0; got {std}")
        self.std, self.gen = std, torch.Generator().manual_seed(seed)

    def __call__(self, pool, previous, k):
        ref = pool if pool is not None else previous
        return self.std * torch.randn(ref.shape[0], k, ref.shape[2], generator=self.gen).to(ref)


def embed_pool(trainer: Any, rounds: int, seed: int) -> Tensor:
    """Deprecated: use :func:`dmlkit.proxies.embed_pool` (the core proxy service)."""
    import warnings

    warnings.warn(
        "dmlkit_plugins.proxies.embed_pool moved to dmlkit.proxies.embed_pool", DeprecationWarning, stacklevel=2
    )
    return core_embed_pool(trainer, rounds, seed)


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
