"""Built-in plugin: loss wrappers that change what a registered loss compares the batch with.

- ``cross_batch_memory``: XBM (Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding
  Learning", CVPR 2020), equal to pytorch-metric-learning 2.9's ``CrossBatchMemory``: a FIFO queue
  of past embeddings and labels serves as the reference set of any pair loss.
- ``self_supervised``: PML 2.9's ``SelfSupervisedLoss``: a batch of two views of each image, the
  pairing made into labels, for any pair loss.

Each wraps a loss named in its ``loss`` option (with ``loss_options``), built from the run's
registry, and passes every training event on to it (and to XBM's miner).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import dmlkit
from dmlkit.contract import EVENTS
from dmlkit.errors import OptionError
from dmlkit.losses import MetricLoss, zero_loss
from dmlkit.proxies import banks

#: what a built tiny instance is given (the trainer supplies the run's numbers)
_TINY = {"num_classes": 4, "embedding_size": 8}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _table(options: dict[str, Any], key: str) -> dict[str, Any]:
    value = options.get(key) or {}
    _check(isinstance(value, dict), f"{key} must be a table of options; got {value!r}")
    return dict(value)


def _forward_event(event: str):
    def forward(self, run, **kwargs) -> None:
        for part in self.parts():
            fn = getattr(part, event, None)
            if fn is not None:
                fn(run, **kwargs)

    forward.__name__ = event
    forward.__doc__ = f"Pass ``{event}`` on to the wrapped loss (and miner)."
    return forward


class LossWrapper(MetricLoss):
    """Base of the wrappers: holds the wrapped loss as ``loss`` (and a miner as ``miner``), passes
    every training event on to them, and exposes their learning-rate multipliers."""

    #: the wrapper's name in messages
    wrapper = "wrapper"

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner
        self.lr_multipliers = {
            f"{prefix}.{k}": v
            for prefix, part in (("loss", loss), ("miner", miner))
            for k, v in (getattr(part, "lr_multipliers", None) or {}).items()
        }

    def parts(self) -> list[nn.Module]:
        return [p for p in (self.loss, self.miner) if p is not None]

    def refuse(self, ref: Tensor | None, indices: Any, why_no_indices: str) -> None:
        """A wrapper makes its own reference set and pairs: refuse being given either."""
        if ref is not None:
            raise OptionError(
                f"{self.wrapper} makes its own reference set and cannot be given one (e.g. as CCP's base loss); "
                "call it with the batch alone"
            )
        if indices is not None:
            raise OptionError(f"{self.wrapper} cannot take pairs or triplets mined on the batch: {why_no_indices}")


for _event in EVENTS:
    setattr(LossWrapper, _event, _forward_event(_event))
del _event


def _build_loss(wrapper: str, name: str, options: dict[str, Any], context: dict[str, Any]) -> nn.Module:
    """The wrapped loss, refused when it keeps class weights or is itself a wrapper."""
    registry = dmlkit.get_registry()
    spec = registry.get("loss", name)  # an unknown name fails here, with suggestions
    _check(
        not (isinstance(spec.factory, type) and issubclass(spec.factory, LossWrapper)),
        f"{wrapper} cannot wrap the wrapper '{spec.name}'; wrap a pair loss (contrastive, multi_similarity, ...)",
    )
    loss = registry.build("loss", spec.name, context=context, **options)
    _check(
        not banks(loss),
        f"{wrapper} cannot wrap loss '{spec.name}': it compares embeddings with its own proxies or class weights "
        "(a ProxyBank), not with a reference set of embeddings; wrap a pair loss (contrastive, multi_similarity, "
        "triplet, ...)",
    )
    return loss


def _tiny_calls(seed: int = 0):
    """Three tiny random (batch, labels, reference set, reference labels) at different scales."""
    g = torch.Generator().manual_seed(seed)
    labels, ref_labels = torch.arange(8) % 4, torch.arange(24) % 4
    for scale in (1.0, 0.3, 3.0):
        x = torch.randn(8, 8, generator=g) * scale
        ref = torch.randn(24, 8, generator=g) * scale
        yield x, labels, ref.requires_grad_(True), ref_labels


def _guarded(wrapper: str, name: str, fn, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise OptionError(
            f"{wrapper} cannot use {name}: it fails when called as {wrapper} calls it ({type(exc).__name__}: {exc})"
        ) from None


def _call(wrapper: str, name: str, fn, *args, **kwargs) -> Tensor:
    value = _guarded(wrapper, name, fn, *args, **kwargs)
    _check(
        isinstance(value, Tensor) and value.ndim == 0,
        f"{wrapper} cannot wrap {name}: it does not return a scalar tensor",
    )
    return value


def _depends_on_reference(value: Tensor, ref: Tensor) -> bool:
    if not value.requires_grad:
        return False
    (grad,) = torch.autograd.grad(value, ref, allow_unused=True)
    return grad is not None and bool(grad.abs().sum() > 0)


# ------------------------------------------------------------------------------- cross-batch memory
_OWN_MINER = (
    "set cross_batch_memory's own miner option (--loss-opt miner=NAME), which mines between the batch and the "
    "memory, instead of the run's miner"
)


class CrossBatchMemory(LossWrapper):
    """Cross-batch memory, XBM (Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding
    Learning", CVPR 2020), equal to pytorch-metric-learning 2.9's ``CrossBatchMemory``.

    A FIFO queue of the last ``memory_size`` embeddings (detached) and their labels. Each call
    first enqueues the batch, overwriting the oldest entries (PML's order: slot ``(i + t) mod
    memory_size`` for row i of a batch written at queue position t), then calls the wrapped loss
    with the batch as anchors and the queue, the batch included, as its reference set. The pairs
    it gets are every (anchor, queue entry) pair, or those ``miner`` mines between the batch and
    the queue, each without the pair of an item with its own queued copy. Gradients reach the
    batch through the anchors only (the queue is detached), as in PML. Scripts may pass PML's
    ``enqueue_mask`` to the call (rows only enqueued, the others anchors).

    The wrapped loss must compare the batch with a reference set and honour mined pairs: a loss
    with its own proxies or class weights (proxynca, arcface, ...) or one that ignores either is
    refused in one line before any data loads. The queue is a buffer of the loss (``embedding_memory``,
    ``label_memory``, ``queue_idx``, ``filled``), saved in checkpoints and restored on resume.

    Under torchrun the trainer gives the loss the batches of all ranks, gathered in rank order, so
    every rank enqueues the same global batch and holds the same queue (PML's class, given each
    rank's own batch, keeps one queue per rank): ``memory_size`` counts entries of the global
    batch, and must be at least ``train.batch_size`` x the number of processes.

    Differences from the paper: the paper adds the in-batch loss to the memory loss and starts the
    memory after a warm-up of about 1,000 steps; for the first, combine the two
    (``--loss "contrastive+cross_batch_memory"``); the memory here starts with the first step.

    Args:
        num_classes: training classes (supplied by the trainer), passed on to the wrapped loss.
        embedding_size: embedding dimension (supplied by the trainer): the width of the queue.
        loss: the wrapped loss, a registered pair loss (contrastive, multi_similarity, triplet, circle, ...).
        loss_options: options of the wrapped loss (``--loss-opt loss_options.neg_margin=0.3``).
        miner: a registered miner that mines pairs or triplets between the batch and the queue; empty for
            every pair. Set it here, not as the run's miner (which sees the batch alone and is refused).
        miner_options: options of the miner (``--loss-opt miner_options.epsilon=0.2``).
        memory_size: entries the queue holds (PML's default 1024; the paper uses up to the training set size).
    """

    wrapper = "cross_batch_memory"
    nested_options = {"loss_options": ("loss", "loss"), "miner_options": ("miner", "miner")}

    @staticmethod
    def validate_options(options: dict[str, Any]) -> None:
        """Checked with the run's config, before any data loads: the memory size, the loss and miner
        and their options, and that the loss takes a reference set and mined pairs."""
        size = options.get("memory_size", 1024)
        _check(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1,
            f"cross_batch_memory memory_size must be an integer >= 1; got {size!r}",
        )
        name = options.get("loss", "contrastive")
        loss_options = _table(options, "loss_options")
        _check(
            not any(isinstance(t, dict) and t.get("miner") for t in loss_options.values()),
            "cross_batch_memory cannot wrap a combination whose terms have their own miners (they would mine "
            "without it, pairing items with their own queued copies); set cross_batch_memory's miner instead",
        )
        loss = _build_loss("cross_batch_memory", name, loss_options, _TINY)
        miner_name = options.get("miner") or ""
        miner = None
        if miner_name:
            miner = dmlkit.get_registry().build("miner", miner_name, context=_TINY, **_table(options, "miner_options"))
        _check_memory_loss(f"loss '{name}'", loss, miner, f"miner '{miner_name}'")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        loss: str = "contrastive",
        loss_options: dict | None = None,
        miner: str = "",
        miner_options: dict | None = None,
        memory_size: int = 1024,
    ):
        options = {"loss": loss, "loss_options": loss_options, "miner": miner, "miner_options": miner_options}
        self.validate_options({**options, "memory_size": memory_size})
        context = {"num_classes": num_classes, "embedding_size": embedding_size}
        registry = dmlkit.get_registry()
        super().__init__(
            _build_loss(self.wrapper, loss, dict(loss_options or {}), context),
            registry.build("miner", miner, context=context, **(miner_options or {})) if miner else None,
        )
        self.loss_name, self.miner_name = registry.get("loss", loss).name, miner
        self.memory_size, self.embedding_size = memory_size, embedding_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self._enqueue_mask: Tensor | None = None  # set for the duration of a call that passes one

    def reset_queue(self) -> None:
        """Empty the queue."""
        self.queue_idx.zero_()
        self.filled.zero_()

    def memory(self) -> tuple[Tensor, Tensor]:
        """The queue's occupied entries (embeddings, labels), in slot order."""
        if bool(self.filled):
            return self.embedding_memory, self.label_memory
        end = int(self.queue_idx)
        return self.embedding_memory[:end], self.label_memory[:end]

    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Write detached ``embeddings`` and ``labels`` over the oldest entries; returns their slots."""
        n = len(embeddings)
        _check(
            n <= self.memory_size,
            f"cross_batch_memory: a batch of {n} does not fit its memory_size {self.memory_size}; set memory_size "
            "to at least the global batch (train.batch_size x processes)",
        )
        start = int(self.queue_idx)
        slots = torch.arange(start, start + n, device=embeddings.device) % self.memory_size
        # out of place: a graph that still holds the previous queue (two calls before backward) stays valid
        memory = self.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
        self.embedding_memory = memory.index_copy(0, slots, embeddings.detach())
        self.label_memory = self.label_memory.to(labels.device).index_copy(0, slots, labels.detach().long())
        end = (start + n) % self.memory_size
        self.queue_idx.fill_(end)
        if end <= start:
            self.filled.fill_(True)
        return slots

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        indices: tuple[Tensor, ...] | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """The loss of the batch against the queue. ``enqueue_mask`` (a boolean per row, for scripts;
        PML's): the rows it marks are only enqueued (a key encoder's embeddings, MoCo-style) and the
        others are the anchors, with no pair left out; without it every row is both."""
        self._enqueue_mask = enqueue_mask
        try:
            return super().forward(embeddings, labels, ref_embeddings, ref_labels, indices)
        finally:
            self._enqueue_mask = None

    def compute(self, emb, labels, ref, ref_labels, indices):
        self.refuse(ref, indices, _OWN_MINER)
        mask = self._enqueue_mask
        if mask is None:
            slots = self.enqueue(emb, labels)
        else:
            mask = torch.as_tensor(mask, device=emb.device).bool()
            _check(
                mask.shape == labels.shape,
                f"cross_batch_memory: enqueue_mask needs one entry per row ({len(labels)}); got {tuple(mask.shape)}",
            )
            self.enqueue(emb[mask], labels[mask])
            emb, labels, slots = emb[~mask], labels[~mask], None
        mem, mem_labels = self.memory()
        if len(emb) == 0:
            return zero_loss(emb)
        if self.miner is not None:
            mined = self.miner(emb, labels, mem, mem_labels)
        else:
            same = labels[:, None] == mem_labels[None, :]
            mined = (*same.nonzero(as_tuple=True), *(~same).nonzero(as_tuple=True))
        if slots is not None:
            mined = without_self_pairs(mined, slots, len(mem))
        return self.loss(emb, labels, mem, mem_labels, indices=mined)

    # the queue must hold a whole global batch: refused before the first step rather than at it
    def on_train_start(self, run) -> None:
        miner = (run.config.get("miner") or {}).get("name") or ""
        _check(
            not miner,
            f"cross_batch_memory mines between the batch and its memory itself: drop the run's miner '{miner}' and "
            f"set it as the loss's option (--loss-opt miner={miner})",
        )
        batch = run.settings.batch_size * run.world_size
        _check(
            batch <= self.memory_size,
            f"cross_batch_memory memory_size {self.memory_size} is smaller than the global batch ({batch} = "
            f"train.batch_size x {run.world_size} processes); raise memory_size",
        )
        LossWrapper.on_train_start(self, run)


def without_self_pairs(indices: tuple[Tensor, ...], slots: Tensor, size: int) -> tuple[Tensor, ...]:
    """Mined pairs or triplets without the positive pairs of a batch row with its own queue slot
    (``slots[i]`` holds row i), as PML's ``remove_self_comparisons``."""
    owner = torch.full((size,), -1, dtype=torch.long, device=slots.device)
    owner[slots] = torch.arange(len(slots), device=slots.device)
    anchors, positives = indices[0], indices[1]
    keep = owner[positives] != anchors
    if len(indices) == 3:
        return tuple(t[keep] for t in indices)
    return anchors[keep], positives[keep], indices[2], indices[3]


def _check_memory_loss(name: str, loss: nn.Module, miner: nn.Module | None, miner_name: str) -> None:
    """On tiny random batches and reference sets, as cross_batch_memory calls them: the loss works,
    depends on the reference set and honours the pairs it is given (every pair, then half of them),
    and the miner's pairs reach into the reference set."""
    wrapper = "cross_batch_memory"
    uses_ref = honours_pairs = reaches_ref = False
    for x, labels, ref, ref_labels in _tiny_calls():
        same = labels[:, None] == ref_labels[None, :]
        pairs = (*same.nonzero(as_tuple=True), *(~same).nonzero(as_tuple=True))
        value = _call(wrapper, name, loss, x, labels, ref, ref_labels, indices=pairs)
        half = tuple(t[::2] for t in pairs)
        other = _call(wrapper, name, loss, x, labels, ref.detach(), ref_labels, indices=half)
        honours_pairs |= not torch.equal(value.detach(), other.detach())
        uses_ref |= _depends_on_reference(value, ref)
        if miner is not None:
            mined = _guarded(wrapper, miner_name, miner, x, labels, ref.detach(), ref_labels)
            partners = torch.cat(mined[1:] if len(mined) == 3 else (mined[1], mined[3]))
            reaches_ref |= bool(partners.numel() == 0 or (partners >= len(x)).any())
    _check(
        uses_ref,
        f"{wrapper} cannot wrap {name}: its value does not depend on the reference set it is given "
        "(ref_embeddings), so the memory would change nothing; wrap a loss that compares the batch with ref_embeddings",
    )
    _check(
        honours_pairs,
        f"{wrapper} cannot wrap {name}: it ignores the mined pairs it is given (indices), so it would pair each "
        "item with its own queued copy; wrap a loss that honours indices",
    )
    _check(
        miner is None or reaches_ref,
        f"{wrapper} cannot use {miner_name}: its pairs never reach past the batch into the reference set it is "
        "given, so it does not mine the memory",
    )


# ------------------------------------------------------------------------------------ self-supervised
class SelfSupervisedLoss(LossWrapper):
    """Self-supervised wrapper, equal to pytorch-metric-learning 2.9's ``SelfSupervisedLoss`` (its
    issue #411): two augmented views of each image are each other's only positives, as in SimCLR
    (Chen et al., ICML 2020); the wrapped loss sees labels made from the pairing.

    The batch holds 2n rows laid out as ``[view1; view2]``: row i and row i + n are two views of
    the same image (their labels must agree, which is all the wrapper can check). Image i gets
    label i; with ``symmetric`` (PML's default) the loss sees the 2n rows with labels
    ``[0..n-1, 0..n-1]``; without, the first views are the anchors and the second views the
    reference set. Under torchrun the trainer gathers each rank's ``[view1; view2]`` in rank order;
    the wrapper regroups them into one ``[view1; view2]``. PML takes the views as two arguments,
    ``loss(z1, z2)``; dmlkit takes them stacked, as the trainer calls a loss, with the same numbers.

    In ``dmlkit train`` the ``two_views`` sampler gives such batches: each image of a batch twice,
    each load augmented anew (``train.batch_size`` counts rows, 2n). This loss recommends it, and
    the dataset's augmentation (``augment = true``); a run with a sampler that gives each image
    once is refused when it is built, before any image is embedded. Scripts may also call it on
    ``torch.cat([z1, z2])`` themselves.

    Args:
        embedding_size: embedding dimension (supplied by the trainer), passed on to the wrapped loss.
        loss: the wrapped loss, a registered pair loss (ntxent for SimCLR, supcon, contrastive, triplet, vicreg, ...).
        loss_options: options of the wrapped loss (``--loss-opt loss_options.temperature=0.1``).
        symmetric: every view is an anchor against all 2n rows (True), or the first views against the second.
    """

    wrapper = "self_supervised"
    nested_options = {"loss_options": ("loss", "loss")}
    #: each batch as two views of its images (dmlkit.contract.ATTRIBUTES): the two_views sampler's
    batch_views = 2

    @staticmethod
    def validate_options(options: dict[str, Any]) -> None:
        """The loss and its options, and that it takes the batch as self_supervised gives it."""
        name = options.get("loss", "ntxent")
        loss = _build_loss("self_supervised", name, _table(options, "loss_options"), _TINY)
        symmetric = options.get("symmetric", True)
        uses_ref = False
        for x, _, ref, _ in _tiny_calls():
            ids, second = torch.arange(len(x)), ref[: len(x)]
            if symmetric:
                _call("self_supervised", f"loss '{name}'", loss, torch.cat([x, second]), torch.cat([ids, ids]))
                uses_ref = True
            else:
                value = _call("self_supervised", f"loss '{name}'", loss, x, ids, second, ids.clone())
                uses_ref |= _depends_on_reference(value, ref)
        _check(
            uses_ref,
            f"self_supervised cannot wrap loss '{name}' with symmetric=false: its value does not depend on the "
            "second views, passed as its reference set; use symmetric=true",
        )

    def __init__(
        self, embedding_size: int, loss: str = "ntxent", loss_options: dict | None = None, symmetric: bool = True
    ):
        self.validate_options({"loss": loss, "loss_options": loss_options, "symmetric": symmetric})
        context = {"embedding_size": embedding_size}  # no classes: the labels it gives are image ids
        super().__init__(_build_loss(self.wrapper, loss, dict(loss_options or {}), context))
        self.loss_name, self.symmetric = dmlkit.get_registry().get("loss", loss).name, symmetric

    def views(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(first views, second views) of a ``[view1; view2]`` batch (per rank under torchrun)."""
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        n = len(emb)
        _check(
            n % (2 * world) == 0 and n >= 2 * world,
            f"self_supervised needs a batch of two views [view1; view2] per process; got {n} rows"
            + (f" from {world} processes" if world > 1 else ""),
        )
        grouped = emb.reshape(world, 2, n // (2 * world), -1)
        lab = labels.reshape(world, 2, -1)
        _check(
            torch.equal(lab[:, 0], lab[:, 1]),
            "self_supervised needs each batch as two views of the same images, [view1; view2] with row i and row "
            "i + n/2 the same image, but this batch's halves have different labels; train with the two_views sampler "
            "(--sampler two_views), which gives such batches",
        )
        return grouped[:, 0].reshape(n // 2, -1), grouped[:, 1].reshape(n // 2, -1)

    def compute(self, emb, labels, ref, ref_labels, indices):
        self.refuse(ref, indices, "its positives are the two views of each image; use it without a miner")
        first, second = self.views(emb, labels)
        ids = torch.arange(len(first), device=emb.device)
        if self.symmetric:
            return self.loss(torch.cat([first, second]), torch.cat([ids, ids]))
        return self.loss(first, ids, second, ids.clone())


def _self_supervised_recommends(options: dict[str, Any]) -> dict[str, Any]:
    """The two_views sampler (batches of two views of each image) and the dataset's augmentation,
    which makes the two views differ (a dataset without an ``augment`` option keeps its own)."""
    return {"sampler": {"name": "two_views"}, "dataset": {"augment": True}}


@dmlkit.hookimpl
def register_losses(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "cross_batch_memory",
            CrossBatchMemory,
            "XBM: a queue of past embeddings as the reference set of any pair loss (Wang et al., CVPR 2020)",
            aliases=("xbm",),
        )
    )
    register(
        ComponentSpec(
            "self_supervised",
            SelfSupervisedLoss,
            "Two views of each image as the only positives, for any pair loss (PML's SelfSupervisedLoss)",
            recommends=_self_supervised_recommends,
        )
    )
