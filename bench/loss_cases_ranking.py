"""bench/loss_bench.py cases for the ranking losses (plugins/ranking_losses.py) and PML's miners
(plugins/miners.py), each miner paired with the loss it usually feeds, beside PML's same pair.

Some PML implementations build [N, N, N] tensors (SmoothAPLoss, PNPLoss) or gather [pairs, D]
or [triplets, D] tensors (ThresholdConsistentMarginLoss, AngularMiner): their PML side refuses
batches above ``PML_LIMIT`` with a MemoryError, which loss_bench records as ``pml_not_run``
instead of exhausting a shared machine's memory.
"""

from __future__ import annotations

import torch
from torch import nn

from dmlkit import get_registry

#: the largest batch each memory-hungry PML component is run at, and why (peaks measured with
#: ru_maxrss, forward + backward, D 512, 4 per class, on the 2-core / 23 GB development machine)
PML_LIMIT = {
    "SmoothAPLoss": (512, "PML's SmoothAPLoss builds [N, N, N] float tensors: ~1 GB at batch 256, x64 at 1024"),
    "PNPLoss": (512, "PML's PNPLoss builds [N, N, N] float tensors: 5.3 GB at batch 512, x8 at 1024"),
    "AngularMiner": (512, "PML's AngularMiner gathers [triplets, D] tensors: 10 GB at batch 512, x4 at 1024"),
    "ThresholdConsistentMarginLoss": (
        512,
        "PML's ThresholdConsistentMarginLoss gathers [pairs, D] tensors: 3.2 GB at batch 512, x4 at 1024",
    ),
}


class ClassPerGroup(nn.Module):
    """Calls a loss with each run of 4 consecutive items as its own class: the batches an
    ``m_per_class`` sampler (m = 4) gives, which Smooth-AP needs. loss_bench draws 4 items per
    group but lets groups share a class (at batch 1024 and 100 classes: 8 or 12 per class)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, embeddings, labels, indices=None):
        groups = torch.arange(len(labels), device=labels.device) // 4
        return self.inner(embeddings, groups, indices=indices)


class PML(nn.Module):
    """A PML loss or miner, called as loss_bench calls dmlkit's; refuses batches it cannot fit
    (``PML_LIMIT``) and, for DynamicSoftMarginLoss, detaches its running histogram before each call
    (PML issue #731: otherwise the second backward fails)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, embeddings, labels, indices=None):
        limit, why = PML_LIMIT.get(type(self.inner).__name__, (None, ""))
        if limit is not None and len(embeddings) > limit:
            raise MemoryError(why)
        if hasattr(self.inner, "hist_"):
            self.inner.hist_ = self.inner.hist_.detach()
        if hasattr(self.inner, "mine"):  # a miner
            return self.inner(embeddings, labels)
        return self.inner(embeddings, labels, indices)


def _wrapped(module: nn.Module, wrap) -> nn.Module:
    return module if wrap is nn.Identity else wrap(module)


def cases(num_classes: int, dim: int) -> list:
    """(name, build dmlkit (loss, miner), build PML (loss, miner) or None)."""
    reg = get_registry()
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        losses = miners = None

    def pml(fn):
        return fn if losses is not None else None

    pair_losses = {  # dmlkit's and PML's same definition
        "triplet": (
            lambda: reg.build("loss", "triplet", margin=0.2, squared=False, reduction="mean_nonzero"),
            lambda: losses.TripletMarginLoss(0.2),
        ),
        "contrastive": (
            lambda: reg.build("loss", "contrastive", pos_margin=0.0, neg_margin=0.5),
            lambda: losses.ContrastiveLoss(0.0, 0.5),
        ),
    }

    def loss(name, pml_class, wrap=nn.Identity):
        """A case for a loss: dmlkit's registered one beside PML's class with its defaults."""
        return (
            name,
            lambda: (_wrapped(reg.build("loss", name), wrap), None),
            pml(lambda: (_wrapped(PML(getattr(losses, pml_class)()), wrap), None)),
        )

    out = [
        loss("fastap", "FastAPLoss"),
        loss("smooth_ap", "SmoothAPLoss", wrap=ClassPerGroup),
        loss("pnp", "PNPLoss"),
        loss("histogram", "HistogramLoss"),
        loss("threshold_consistent_margin", "ThresholdConsistentMarginLoss"),
        loss("dynamic_soft_margin", "DynamicSoftMarginLoss"),
    ]

    def mined(miner, pml_class, loss_name):
        """A case for a miner: dmlkit's registered one feeding ``loss_name``, beside PML's same pair."""
        ours_loss, pml_loss = pair_losses[loss_name]
        return (
            f"{miner} + {loss_name}",
            lambda: (ours_loss(), reg.build("miner", miner)),
            pml(lambda: (pml_loss(), PML(getattr(miners, pml_class)()))),
        )

    return out + [
        mined("angular", "AngularMiner", "triplet"),
        mined("batch_easy_hard", "BatchEasyHardMiner", "contrastive"),
        mined("distance_weighted", "DistanceWeightedMiner", "triplet"),
        mined("hdc", "HDCMiner", "contrastive"),
        mined("pair_margin", "PairMarginMiner", "contrastive"),
        mined("triplet_margin", "TripletMarginMiner", "triplet"),
        mined("uniform_histogram", "UniformHistogramMiner", "contrastive"),
    ]
