"""loss_bench cases of the pair and tuple losses (plugins/pair_losses.py) beside PML 2.9's classes.

Where PML's largest tensor for a batch would exceed ``PML_TENSOR_CAP`` bytes, its side raises
MemoryError before any work and loss_bench records the row without a PML time (with the reason):
lifted structure, NT-Xent and tuplet margin build [positive pairs x negative pairs] matrices (12 GiB
each at batch 1,024 with 4 per class) and SNR contrastive an [n, n, D] tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from dmlkit import get_registry

#: The largest single tensor a PML loss may allocate here (a 2-core, 23 GiB machine shared by others).
PML_TENSOR_CAP = 2**30


class _Capped(nn.Module):
    """A PML loss that refuses (MemoryError) a batch on which its largest tensor would pass the cap."""

    def __init__(self, loss: nn.Module, largest_tensor):
        super().__init__()
        self.loss, self.largest_tensor = loss, largest_tensor

    def forward(self, x, labels, indices=None):
        size = self.largest_tensor(x, labels)
        if size > PML_TENSOR_CAP:
            raise MemoryError(f"PML's {type(self.loss).__name__} would allocate a {size / 2**30:.1f} GiB tensor")
        return self.loss(x, labels, indices_tuple=indices)


def _pairs_by_pairs(x, labels) -> int:
    """Bytes of a float [positive pairs x negative pairs] matrix."""
    same = labels[:, None] == labels[None, :]
    pos = int(same.sum()) - len(labels)
    return pos * int((~same).sum()) * x.element_size()


def _n_n_d(x, labels) -> int:
    return len(x) ** 2 * x.shape[1] * x.element_size()


class _InstanceLabels(nn.Module):
    """Calls a loss with one label per item in batch order, as instance loss needs."""

    def __init__(self, loss: nn.Module, pml: bool):
        super().__init__()
        self.loss, self.pml = loss, pml

    def forward(self, x, labels, indices=None):
        ids = torch.arange(len(x), device=x.device)
        return self.loss(x, ids, indices_tuple=indices) if self.pml else self.loss(x, ids, indices=indices)


class _TwoViews(nn.Module):
    """Calls VICReg with the first half of the batch as the first views and the second half as the second."""

    def __init__(self, loss: nn.Module, pml: bool):
        super().__init__()
        self.loss, self.pml = loss, pml

    def forward(self, x, labels, indices=None):
        half = len(x) // 2
        if self.pml:
            return self.loss(x[:half], ref_emb=x[half:])
        ids = torch.arange(half, device=x.device)
        return self.loss(x, torch.cat([ids, ids]))


def cases(num_classes: int, dim: int):
    """(name, build dmlkit (loss, miner), build PML (loss, miner) or None) for each pair loss."""
    reg = get_registry()
    ctx = {"num_classes": num_classes, "embedding_size": dim}
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        losses = None

    def ours(name, **options):
        return lambda: (reg.build("loss", name, context=ctx, **options), None)

    def pml(build):
        return (lambda: (build(), None)) if losses is not None else None

    return [
        ("circle", ours("circle"), pml(lambda: losses.CircleLoss())),
        ("margin", ours("margin"), pml(lambda: losses.MarginLoss())),
        (
            "margin (learned per-class beta)",
            ours("margin", learn_beta=True, per_class_beta=True, nu=0.1),
            pml(lambda: losses.MarginLoss(learn_beta=True, num_classes=num_classes, nu=0.1)),
        ),
        ("npairs", ours("npairs"), pml(lambda: losses.NPairsLoss())),
        ("ntxent", ours("ntxent"), pml(lambda: _Capped(losses.NTXentLoss(), _pairs_by_pairs))),
        ("supcon", ours("supcon"), pml(lambda: losses.SupConLoss())),
        (
            "lifted_structure",
            ours("lifted_structure"),
            pml(lambda: _Capped(losses.LiftedStructureLoss(), _pairs_by_pairs)),
        ),
        (
            "generalized_lifted_structure",
            ours("generalized_lifted_structure"),
            pml(lambda: losses.GeneralizedLiftedStructureLoss()),
        ),
        ("tuplet_margin", ours("tuplet_margin"), pml(lambda: _Capped(losses.TupletMarginLoss(), _pairs_by_pairs))),
        ("angular", ours("angular"), pml(lambda: losses.AngularLoss())),
        ("nca", ours("nca"), pml(lambda: losses.NCALoss())),
        (
            "snr_contrastive",
            ours("snr_contrastive"),
            pml(lambda: _Capped(losses.SignalToNoiseRatioContrastiveLoss(), _n_n_d)),
        ),
        ("intra_pair_variance", ours("intra_pair_variance"), pml(lambda: losses.IntraPairVarianceLoss())),
        (
            "instance",
            lambda: (_InstanceLabels(reg.build("loss", "instance"), pml=False), None),
            pml(lambda: _InstanceLabels(losses.InstanceLoss(), pml=True)),
        ),
        (
            "vicreg",
            lambda: (_TwoViews(reg.build("loss", "vicreg"), pml=False), None),
            pml(lambda: _TwoViews(losses.VICRegLoss(), pml=True)),
        ),
    ]
