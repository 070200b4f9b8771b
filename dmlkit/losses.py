"""Building blocks for losses and miners, shared by built-in and third-party plugins.

Conventions:
- a loss is called as ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None, indices=None)``;
  without a reference set the batch is compared with itself (an item is never its own pair);
  ``loss(embeddings, labels, miner(embeddings, labels))``, pytorch-metric-learning's positional
  form, passes the mined indices;
- a miner is called the same way (without ``indices``) and returns either triplets
  ``(anchor, positive, negative)`` or pairs ``(anchor1, positive, anchor2, negative)``, index
  tensors whose anchors index the batch and whose other entries index the reference set.
- losses compute in float32 even under autocast (float64 inputs stay float64), and return a zero
  that still back-propagates when nothing in the batch contributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Indices = tuple[Tensor, ...]


def pairwise_distance(x: Tensor, y: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Euclidean (or squared Euclidean) distances between the rows of ``x`` and ``y``.

    The Euclidean distance is ``sqrt(max(d2, eps))`` of the squared one; its gradient is zero where
    ``d2 < eps`` (an item and its copy), as autograd gives it for the clamps.
    """
    if squared:
        return _squared_distances(x, y).clamp_min(0.0)
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        # reduced or mixed precision (a plugin's own call under autocast): autograd's formula, same values
        return torch.sqrt(_squared_distances(x, y).clamp_min(0.0).clamp_min(eps))
    return _Distance.apply(x, y, eps)


def first_order(name: str):
    """Decorator of a hand-written ``backward`` that has no second derivative: it raises when
    autograd asks for one (``create_graph=True``, a gradient penalty) instead of dropping the
    curvature without a word, as ``once_differentiable`` does when the incoming gradient is a constant."""

    def wrap(backward):
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # autograd enables grad mode in backward exactly for create_graph
                raise RuntimeError(
                    f"{name} has no second derivative (backward with create_graph=True, e.g. a gradient "
                    "penalty); use a loss without it for that"
                )
            return backward(ctx, *grads)

        checked.__doc__ = backward.__doc__
        return checked

    return wrap


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """||x_i||^2 + ||y_j||^2 - 2 x_i.y_j, unclamped."""
    return (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.T


class _Distance(torch.autograd.Function):
    """``sqrt(max(d2, 0, eps))`` with a hand-written backward: autograd's gradient for those three
    operations (``grad / (2 d)`` where ``d2 >= eps``, else 0). Written out because a pair loss's
    step on a CPU is mostly [n, m] passes, and a fresh [n, m] tensor costs more (its pages are new
    to the process) than a pass over one it has: this makes 3 of them where autograd's makes ~8."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, eps: float) -> Tensor:
        prod = (2.0 * x) @ y.T
        d2 = ((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :]).sub_(prod)  # = _squared_distances
        # in prod's memory: 1 where d2 >= eps (both clamps pass the gradient), else 0 (sign -> {0, 1, 1})
        live = torch.sub(d2, eps, out=prod).sign_().add_(1.0).clamp_max_(1.0)
        dist = d2.clamp_min_(eps).sqrt_()
        ctx.save_for_backward(x, y, dist, live)
        return dist

    @staticmethod
    @first_order("the pairwise Euclidean distance")
    def backward(ctx, grad: Tensor):
        x, y, dist, live = ctx.saved_tensors
        g = torch.div(grad, dist).mul_(0.5).mul_(live)  # grad / (2 d), exactly (halving is exact)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = 2.0 * (x * g.sum(1, keepdim=True) - g @ y)
        if ctx.needs_input_grad[1]:
            gy = 2.0 * (y * g.sum(0)[:, None] - g.T @ x)
        return gx, gy, None


def cosine_similarity(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarities between the rows of ``x`` and ``y``."""
    return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(y, dim=1).T


def label_masks(labels: Tensor, ref_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Boolean [n, m] masks of positive and negative pairs (the diagonal excluded without a reference set)."""
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref[None, :]
    pos = same.clone()
    if ref_labels is None:
        pos.fill_diagonal_(False)
    return pos, ~same


def indices_to_masks(indices: Indices, n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pair or triplet indices -> boolean [n, m] masks of the positive and negative pairs they use."""
    a1, p, a2, neg = triplets_to_pairs(indices) if len(indices) == 3 else indices
    return _pair_mask(a1, p, n, m, device), _pair_mask(a2, neg, n, m, device)


def _pair_mask(rows: Tensor, cols: Tensor, n: int, m: int, device: torch.device) -> Tensor:
    """[n, m] boolean mask, True at each (rows[k], cols[k]): ``index_fill_`` on the flat mask, several
    times faster on a long list than ``mask[rows, cols] = True`` (an indexed write per pair)."""
    rows, cols = rows.to(device, torch.long), cols.to(device, torch.long)
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n or int(cols.min()) < 0 or int(cols.max()) >= m):
        raise IndexError(f"mined pair indices out of range for {n} embeddings against a reference set of {m}")
    flat = torch.zeros(n * m, dtype=torch.bool, device=device)
    return flat.index_fill_(0, torch.add(cols, rows, alpha=m), True).view(n, m)


def pair_masks(
    labels: Tensor, ref_labels: Tensor | None, indices: Indices | None, n: int, m: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Positive and negative [n, m] masks (as :func:`label_masks`), restricted to the mined pairs
    or triplets when ``indices`` are given (each distinct pair once, however often it is mined)."""
    if indices is None:
        return label_masks(labels, ref_labels)
    same = labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]
    pos, neg = indices_to_masks(indices, n, m, device)
    pos &= same
    if ref_labels is None:
        pos.fill_diagonal_(False)
    neg &= ~same  # (masked_fill_ on a bool mask is ~50x slower)
    return pos, neg


def triplets_to_pairs(indices: Indices) -> Indices:
    a, p, n = indices
    return a, p, a, n


def pairs_to_triplets(indices: Indices) -> Indices:
    """Every (anchor, positive, negative) that two pairs with a shared anchor make."""
    if len(indices) == 3:
        return indices
    a1, p, a2, n = indices
    match = a1[:, None] == a2[None, :]
    i, j = match.nonzero(as_tuple=True)
    return a1[i], p[i], n[j]


def zero_loss(*tensors: Tensor) -> Tensor:
    """A zero connected to the graph of ``tensors``: backward() works and gives zero gradients."""
    return sum((t.sum() * 0.0 for t in tensors if t.requires_grad), torch.zeros((), device=tensors[0].device))


def _at_least_float32(t: Tensor) -> Tensor:
    """Half precision raised to float32; float64 kept (tests compare losses in float64)."""
    return t if t.dtype == torch.float64 else t.float()


class MetricLoss(nn.Module):
    """Base class of dmlkit losses: float32 maths (float64 inputs stay float64), optional reference
    set, optional mined indices."""

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        indices: Indices | None = None,
    ) -> Tensor:
        if isinstance(ref_embeddings, tuple) and ref_labels is None and indices is None:
            # PML's positional convention: loss(embeddings, labels, miner(embeddings, labels))
            ref_embeddings, indices = None, ref_embeddings
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError("pass both ref_embeddings and ref_labels, or neither")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = _at_least_float32(embeddings)
            ref = None if ref_embeddings is None else _at_least_float32(ref_embeddings)
            return self.compute(emb, labels, ref, ref_labels, indices)

    def compute(
        self, emb: Tensor, labels: Tensor, ref: Tensor | None, ref_labels: Tensor | None, indices: Indices | None
    ) -> Tensor:
        raise NotImplementedError


class Miner(nn.Module):
    """Base class of miners: returns pairs or triplets; ``last_count`` says how many it found."""

    last_count: int = 0

    @torch.no_grad()
    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None
    ) -> Indices:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.detach().float()
            ref = None if ref_embeddings is None else ref_embeddings.detach().float()
            out = self.mine(emb, labels, ref, ref_labels)
        self.last_count = int(out[0].numel())
        return out

    def mine(self, emb: Tensor, labels: Tensor, ref: Tensor | None, ref_labels: Tensor | None) -> Indices:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {"mined": self.last_count}
