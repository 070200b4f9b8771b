"""bench/loss_bench.py cases for the cross-batch memory (XBM, plugins/wrappers.py) over contrastive,
with every pair and with HDC mining between the batch and the memory, beside PML 2.9's
``CrossBatchMemory`` with the same loss and miner: the long mined pair lists (batch x memory) that
the contrastive loss turns into masks.

Each memory starts full (``MEMORY_SIZES`` entries of one seeded random draw, labels from the
bench's classes, the same for dmlkit and PML), so every timed step compares the batch with the
whole queue.
"""

from __future__ import annotations

import torch
from torch import nn

from dmlkit import get_registry

#: the queue sizes timed (each at the bench's batch sizes)
MEMORY_SIZES = (1024, 4096)


class _Full(nn.Module):
    """A cross-batch memory loss whose queue is filled before the first step."""

    def __init__(self, loss: nn.Module, pml: bool, size: int, num_classes: int, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        emb, labels = torch.randn(size, dim, generator=g), torch.randint(num_classes, (size,), generator=g)
        if pml:
            loss.add_to_memory(emb, labels, size)
        else:
            loss.enqueue(emb, labels)
        self.loss, self.pml = loss, pml

    def forward(self, x, labels, indices=None):
        return self.loss(x, labels)


def cases(num_classes: int, dim: int) -> list:
    """(name, build dmlkit (loss, miner), build PML (loss, miner) or None)."""
    reg = get_registry()
    ctx = {"num_classes": num_classes, "embedding_size": dim}
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        losses = miners = None

    def case(size: int, miner: str):
        def ours():
            xbm = reg.build(
                "loss", "cross_batch_memory", context=ctx, loss="contrastive",
                loss_options={"pos_margin": 0.0, "neg_margin": 0.5}, miner=miner, memory_size=size,
            )  # fmt: skip
            return _Full(xbm, False, size, num_classes, dim), None

        def theirs():
            mined = miners.HDCMiner() if miner == "hdc" else None
            xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(0.0, 0.5), dim, memory_size=size, miner=mined)
            return _Full(xbm, True, size, num_classes, dim), None

        name = f"cross_batch_memory {size} + {miner + ' + ' if miner else ''}contrastive"
        return name, ours, theirs if losses is not None else None

    return [case(size, miner) for miner in ("", "hdc") for size in MEMORY_SIZES]
