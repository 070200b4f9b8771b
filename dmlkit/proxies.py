"""Proxies as a core service: per-class vectors that a loss owns, trains and (re)initialises.

A loss with proxies holds one or more :class:`ProxyBank` modules as attributes. The bank
keeps ``K`` vectors for each class id, says its learning-rate multiplier (the trainer puts
it in the optimizer with that multiplier), gives pair losses a reference set
(:meth:`ProxyBank.reference`), and (re)initialises itself from embedded training samples
through a ``proxy_initializer`` component (:meth:`ProxyBank.reinitialise`), dropping the
optimizer state that belonged to the old vectors. A wrapper such as CCP finds the banks of
any loss through this public type and drives them.

An initializer is called as ``init(pool, previous, k)``: ``pool`` [C, b, D] holds b embedded
training samples per class (``None`` when it sets ``needs_pool = False``), ``previous`` the
current proxies [C, K, D] (or ``None``), and it returns new proxies [C, k, D]. It may define
``stats() -> dict`` to report on its last call (logged with the re-initialisation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dmlkit.errors import OptionError

#: What ``proxy_init`` may be: "" (keep the vectors), a name, or ``{name = "...", option = ...}``.
InitSpec = str | Mapping[str, Any]


def _parse_init(spec: InitSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", "")
        if not isinstance(name, str) or not name:
            raise OptionError(f'proxy_init needs a name, e.g. {{name = "greedy_kcenter"}}; got {dict(spec)!r}')
    else:
        raise OptionError(f"proxy_init must be a name or a table with a name; got {spec!r}")
    return name, options


def check_initializer(spec: InitSpec) -> None:
    """Check a ``proxy_init`` value (name and options) without building it: for config validation."""
    if spec:
        from dmlkit import get_registry

        get_registry().resolve_options("proxy_initializer", *_parse_init(spec))


def build_initializer(spec: InitSpec) -> Any:
    """A proxy initializer from a name or ``{"name": ..., **options}`` (``None`` for "")."""
    if not spec:
        return None
    from dmlkit import get_registry

    name, options = _parse_init(spec)
    return get_registry().build("proxy_initializer", name, **options)


class ProxyBank(nn.Module):
    """``per_class`` vectors of size ``dim`` for each of ``num_classes`` classes.

    ``class_ids`` are the label values the rows stand for (default ``0..num_classes-1``).
    ``lr_multiplier`` scales the base learning rate for the vectors; ``trainable=False``
    keeps them fixed (e.g. word vectors). ``proxy_init`` names an initializer applied when
    training starts (see :func:`build_initializer`); ``pool_rounds`` samples per class are
    embedded for it. ``init`` is the random start: ``kaiming`` (normal, fan-out) or
    ``normal`` with ``std``.
    """

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        dim: int,
        *,
        lr_multiplier: float = 1.0,
        trainable: bool = True,
        proxy_init: InitSpec = "",
        pool_rounds: int = 8,
        init: str = "kaiming",
        std: float = 1.0,
        class_ids: Tensor | None = None,
    ):
        super().__init__()
        if num_classes < 1 or per_class < 1 or dim < 1:
            raise OptionError(
                f"a proxy bank needs >= 1 class, proxy and dimension; got {num_classes}, {per_class}, {dim}"
            )
        if init not in ("kaiming", "normal"):
            raise OptionError(f"proxy init must be kaiming or normal; got {init!r}")
        self.init, self.std = init, std
        self.vectors = nn.Parameter(self._random(num_classes, per_class, dim), requires_grad=trainable)
        ids = torch.arange(num_classes) if class_ids is None else torch.as_tensor(class_ids, dtype=torch.long)
        if ids.shape != (num_classes,) or len(set(ids.tolist())) != num_classes:
            raise OptionError(f"class_ids must be {num_classes} distinct label ids")
        self.register_buffer("class_ids", ids)
        self.lr_multiplier = float(lr_multiplier)
        self.initializer = build_initializer(proxy_init)
        if self.initializer is not None and getattr(self.initializer, "needs_pool", True):
            if pool_rounds < per_class:
                raise OptionError(f"pool_rounds ({pool_rounds}) must be >= proxies per class ({per_class})")
            check_pool_size(num_classes, pool_rounds, per_class, dim)
        self.pool_rounds = pool_rounds
        #: set by a wrapper (e.g. CCP) that initialises and re-initialises this bank itself
        self.driven_by: str | None = None
        #: applied to the vectors by :meth:`reference` (e.g. a unit-ball projection set by a wrapper)
        self.transform: Callable[[Tensor], Tensor] | None = None

    def _random(self, c: int, k: int, d: int) -> Tensor:
        p = torch.empty(c * k, d)
        if self.init == "kaiming":
            nn.init.kaiming_normal_(p, mode="fan_out")
        else:
            nn.init.normal_(p, std=self.std)
        return p.reshape(c, k, d)

    # -- shape -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.vectors.shape[0]

    @property
    def per_class(self) -> int:
        return self.vectors.shape[1]

    @property
    def dim(self) -> int:
        return self.vectors.shape[2]

    def resize(self, per_class: int) -> None:
        """Hold ``per_class`` vectors per class (before the optimizer is built): the first
        ones are kept, new ones drawn at random."""
        if per_class == self.per_class:
            return
        if per_class < 1:
            raise OptionError(f"proxies per class must be >= 1; got {per_class}")
        old = self.vectors.detach()
        new = self._random(self.num_classes, per_class, self.dim).to(old)
        keep = min(per_class, self.per_class)
        new[:, :keep] = old[:, :keep]
        self.vectors = nn.Parameter(new, requires_grad=self.vectors.requires_grad)

    # -- use in a loss ---------------------------------------------------------------------
    def labels(self) -> Tensor:
        """[C*K] the class id of each flattened vector."""
        return self.class_ids.repeat_interleave(self.per_class)

    def reference(self) -> tuple[Tensor, Tensor]:
        """(vectors [C*K, D] in float32, their labels [C*K]): a reference set for a pair loss."""
        v = self.vectors.float().reshape(-1, self.dim)
        return (self.transform(v) if self.transform is not None else v), self.labels()

    def rows(self, labels: Tensor) -> Tensor:
        """The bank row of each label id (an error for a label the bank does not hold)."""
        ids = self.class_ids
        if torch.equal(ids, torch.arange(len(ids), device=ids.device)):
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(ids)):
                raise ValueError(f"a label has no proxy: the bank holds classes 0..{len(ids) - 1}")
            return labels
        match = labels[:, None] == ids[None, :]
        if not bool(match.any(1).all()):
            raise ValueError("a label has no proxy in the bank")
        return match.float().argmax(1)

    # -- (re)initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def assign(
        self, new: Tensor, optimizer: torch.optim.Optimizer | None = None, keep_optimizer_state: bool = False
    ) -> None:
        """Copy ``new`` [C, K, D] into the vectors; the optimizer's state for them (moments) is dropped,
        unless ``keep_optimizer_state`` (ccp-dml keeps it)."""
        if new.shape != self.vectors.shape:
            raise ValueError(f"new proxies have shape {tuple(new.shape)}; the bank holds {tuple(self.vectors.shape)}")
        self.vectors.copy_(new.to(self.vectors))
        if optimizer is not None and self.vectors in optimizer.state and not keep_optimizer_state:
            optimizer.state[self.vectors] = {}

    def reinitialise(
        self,
        trainer: Any,
        initializer: Any = None,
        *,
        rounds: int | None = None,
        seed: int = 0,
        previous: Tensor | None = None,
        keep_optimizer_state: bool = False,
    ) -> dict[str, Any]:
        """Embed a pool of training samples with the current network, call ``initializer``
        (default: the bank's ``proxy_init``) with ``previous`` (default: the current vectors),
        and copy its picks into the bank. Returns what happened (pool size, seconds, the
        initializer's ``stats()``)."""
        init = initializer if initializer is not None else self.initializer
        if init is None:
            raise OptionError("no proxy initializer: set proxy_init")
        rounds = self.pool_rounds if rounds is None else rounds
        needs_pool = getattr(init, "needs_pool", True)
        if needs_pool:
            check_pool_size(self.num_classes, rounds, self.per_class, self.dim)
        pool = embed_pool(trainer, rounds, seed, self.class_ids.cpu().numpy()) if needs_pool else None
        prev = self.vectors.detach() if previous is None else previous.to(self.vectors)
        start = time.perf_counter()
        picks = init(pool, prev, self.per_class)
        if picks.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.assign(picks, getattr(trainer, "optimizer", None), keep_optimizer_state)
        info: dict[str, Any] = {
            "pool_size": 0 if pool is None else int(pool.shape[0] * pool.shape[1]),
            "selection_s": seconds,
        }
        stats = getattr(init, "stats", None)
        if callable(stats):
            info.update(stats())
        return info

    # -- training event: the bank's own proxy_init at the start ----------------------------
    def on_train_start(self, run: Any) -> None:
        if self.initializer is None or self.driven_by is not None:
            return
        info = self.reinitialise(run, seed=run.settings["seed"])
        run.log_event(event="proxy_init", per_class=self.per_class, **info)


#: The most embedded samples a proxy pool may hold, and the most bytes its vectors and an
#: initializer's distance tables may take: beyond them a run would take hours or be killed.
MAX_POOL_ITEMS = 2_000_000
MAX_POOL_BYTES = 4 * 2**30


def check_pool_size(num_classes: int, rounds: int, per_class: int, dim: int) -> None:
    """Refuse, with the numbers, a pool that would not fit in memory or take hours to embed:
    ``num_classes x rounds`` samples of ``dim`` floats, and the ``[C, rounds, per_class]``
    distances a k-center pick keeps."""
    items = num_classes * rounds
    size = 4 * items * (dim + per_class)
    if items > MAX_POOL_ITEMS or size > MAX_POOL_BYTES:
        raise OptionError(
            f"a proxy pool of {rounds} samples x {num_classes} classes ({items:,} images to embed, about "
            f"{size / 2**30:.1f} GiB with {per_class} proxies per class) is beyond dmlkit's bounds "
            f"({MAX_POOL_ITEMS:,} images, {MAX_POOL_BYTES / 2**30:.0f} GiB); lower pool_rounds or proxies_per_class"
        )


def banks(module: nn.Module) -> list[ProxyBank]:
    """Every proxy bank inside ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, ProxyBank)]


@torch.no_grad()
def embed_pool(run: Any, rounds: int, seed: int, class_ids: np.ndarray | None = None) -> Tensor:
    """[C, rounds, D]: per round one random training image of every class in ``class_ids``
    (default: all training classes, in label order), without replacement within a class until
    it is exhausted, with training augmentation, embedded by the current network in inference
    mode (raw outputs of the model, as the run's head gives them). Shows progress.

    ``run`` is the run context a component receives in its events (or the trainer itself):
    this is ``run.embed_pool(rounds, seed, class_ids)``."""
    return run.embed_pool(rounds, seed, class_ids)


def pool_index(labels: np.ndarray, rounds: int, seed: int, class_ids: np.ndarray | None = None) -> np.ndarray:
    """[C, rounds] training item indices of :func:`embed_pool`'s pool."""
    labels = np.asarray(labels)
    classes = np.unique(labels) if class_ids is None else np.asarray(class_ids)
    rng = np.random.default_rng(seed)
    idx = np.empty((len(classes), rounds), dtype=np.int64)
    for row, c in enumerate(classes):  # index bookkeeping only; the embedding is batched
        items = np.flatnonzero(labels == c)
        if not len(items):
            raise OptionError(f"class {c} has no training sample to initialise its proxies from")
        order = np.concatenate([rng.permutation(items) for _ in range(-(-rounds // len(items)))])
        idx[row] = order[:rounds]
    return idx
