"""Multi-process training under torchrun: process group set-up and batch gathering.

``torchrun --nproc-per-node N -m dmlkit train ...`` starts N processes; each trains on a
disjoint share of every epoch's batches (the sampler's rank/world_size), gradients are
averaged by DistributedDataParallel, and losses see the embeddings of all ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group (nccl on GPU, gloo on CPU) once."""
    world = world_size_from_env()
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllGather(torch.autograd.Function):
    """Every rank's tensor; the gradient of each rank's share is summed over the ranks' losses (what
    ``torch.distributed.nn.functional.all_gather`` did before torch deprecated it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads).contiguous()
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings (differentiably) and labels of every rank's batch, concatenated in rank order."""
    emb = torch.cat(_AllGather.apply(embeddings))
    out = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(out, labels)
    return emb, torch.cat(out)
