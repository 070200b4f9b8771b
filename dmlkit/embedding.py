"""The one loop that runs a model over a dataset: evaluation, the feature cache, the proxy pool,
``dmlkit embed`` and ``dmlkit index`` all embed through :func:`embed_dataset` (images) or
:func:`embed_tensors` (features already in memory)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dmlkit.console import phase
from dmlkit.runtime import autocast, worker_init

#: Images per forward pass on a CPU: measured fastest for every backbone of bench/embed_bench.py
#: (smallcnn, resnet18, efficientnet_lite0, a timm ViT; 8 against 16, 32 and 256: 1.3x to 2.5x
#: the images/s of 256 on a 2-core machine, docs/benchmarks.md), where the activations of a small
#: batch stay in cache; the loader still decodes ``batch_size`` images at a time.
CPU_FORWARD_BATCH = 8


@torch.no_grad()
def embed_dataset(
    forward: Callable[[Tensor], Tensor],
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int,
    workers: int = 0,
    amp: bool = False,
    console: Console | None = None,
    what: str = "embedding",
    unit: str = "images",
    model: torch.nn.Module | None = None,
) -> Tensor:
    """``forward`` over every item of ``dataset`` in order, in batches of ``batch_size``: a float32
    CPU tensor [N, D]. Image batches go to ``device``, under bf16 autocast when ``amp`` and on a
    GPU; ``workers`` data-loader processes decode; progress is shown on ``console``. On a GPU, and
    on a CPU when ``model`` (the module ``forward`` runs) is given, batches and weights are in
    channels-last memory format (a third to a half more images/s for convolutional backbones on
    a CPU, docs/benchmarks.md; the model is given back in its format after). Without ``model`` a
    CPU runs in the default format, as training steps do (the feature cache of a frozen prefix
    must equal them)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers else None,
    )
    out: list[Tensor] = []
    # on a CPU the loader's batches go through the model CPU_FORWARD_BATCH images at a time
    chunk = CPU_FORWARD_BATCH if device.type == "cpu" else batch_size
    with _channels_last(model, device), phase(console or Console(quiet=True), what, len(dataset), unit) as progress:
        for batch in loader:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            for part in x.split(chunk):
                out.append(
                    _forward(forward, part, device, amp, channels_last=device.type == "cuda" or model is not None)
                )
            progress.advance(len(x))
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_tensors(
    forward: Callable[[Tensor], Tensor], inputs: Tensor, *, device: torch.device, batch_size: int, amp: bool = False
) -> Tensor:
    """``forward`` over the rows of an in-memory tensor (cached features), in batches: float32 on the CPU."""
    return torch.cat([_forward(forward, x, device, amp) for x in inputs.split(batch_size)]) if len(inputs) else inputs


def _forward(
    forward: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, amp: bool, channels_last: bool = False
) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        return forward(x).float().cpu()


@contextmanager
def _channels_last(model: torch.nn.Module | None, device: torch.device) -> Iterator[None]:
    """``model``'s 4-d weights in channels-last format while the block runs, on a CPU (the layout
    oneDNN's convolutions prefer); back to the default format after, values unchanged."""
    if model is None or device.type != "cpu":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def in_eval_mode(model: torch.nn.Module) -> Any:
    """A context that puts ``model`` in eval mode and restores its previous mode."""
    return _EvalMode(model)


class _EvalMode:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.was = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)
