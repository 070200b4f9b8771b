"""Built-in miners: semi-hard (FaceNet), batch-hard, batch-all, multi-similarity pair mining."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import Miner, cosine_similarity, label_masks, pairwise_distance


def _distances(emb: Tensor, ref: Tensor | None, squared: bool, normalize: bool) -> Tensor:
    if normalize:
        emb = nn.functional.normalize(emb, dim=1)
        ref = None if ref is None else nn.functional.normalize(ref, dim=1)
    return pairwise_distance(emb, emb if ref is None else ref, squared=squared)


def _empty(device: torch.device, n: int = 3) -> tuple[Tensor, ...]:
    return tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(n))


class SemiHardMiner(Miner):
    """FaceNet's semi-hard negatives (Schroff et al. 2015), as the reference TF code picks them.

    For every anchor-positive pair: the closest negative farther than the positive; where
    no negative is farther, the farthest negative. One triplet per positive pair; sorting
    each anchor's negatives once makes it O(n m log m), with no [pairs, m] tensor.

    Args:
        squared: squared Euclidean distances (FaceNet's).
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, squared: bool = True, normalize: bool = True):
        super().__init__()
        self.squared, self.normalize = squared, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _distances(emb, ref, self.squared, self.normalize)
        pos, neg = label_masks(labels, ref_labels)
        a, p = pos.nonzero(as_tuple=True)
        n_neg = neg.sum(1)
        keep = n_neg[a] > 0
        a, p = a[keep], p[keep]
        if a.numel() == 0:
            return _empty(emb.device)
        neg_dist = dist.masked_fill(~neg, math.inf)
        sorted_d, order = neg_dist.sort(dim=1)
        # for every (anchor, j): the first negative strictly farther than d(anchor, j)
        where = torch.searchsorted(sorted_d, dist.contiguous(), right=True)[a, p]
        fallback = n_neg[a] - 1  # the farthest negative
        col = torch.where(where < n_neg[a], where, fallback)
        return a, p, order[a, col]


class BatchHardMiner(Miner):
    """Batch-hard (Hermans et al. 2017): per anchor, its farthest positive and closest negative.

    Args:
        squared: squared Euclidean distances.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, squared: bool = False, normalize: bool = True):
        super().__init__()
        self.squared, self.normalize = squared, normalize

    def mine(self, emb, labels, ref, ref_labels):
        dist = _distances(emb, ref, self.squared, self.normalize)
        pos, neg = label_masks(labels, ref_labels)
        ok = pos.any(1) & neg.any(1)
        a = ok.nonzero(as_tuple=True)[0]
        p = dist.masked_fill(~pos, -math.inf).argmax(1)[a]
        n = dist.masked_fill(~neg, math.inf).argmin(1)[a]
        return a, p, n


class BatchAllMiner(Miner):
    """Every valid triplet; with ``only_violating`` just those inside the margin (loss > 0).

    Args:
        margin: the triplet margin that decides which triplets violate it.
        only_violating: keep only triplets inside the margin (loss > 0).
        squared: squared Euclidean distances.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, margin: float = 0.2, only_violating: bool = False, squared: bool = True, normalize: bool = True):
        super().__init__()
        if margin < 0:
            raise OptionError(f"margin must be >= 0; got {margin}")
        self.margin, self.only_violating, self.squared, self.normalize = margin, only_violating, squared, normalize

    def mine(self, emb, labels, ref, ref_labels):
        pos, neg = label_masks(labels, ref_labels)
        a, p = pos.nonzero(as_tuple=True)
        valid = neg[a]
        if self.only_violating:
            dist = _distances(emb, ref, self.squared, self.normalize)
            valid = valid & (dist[a, p][:, None] - dist[a] + self.margin > 0)
        i, n = valid.nonzero(as_tuple=True)
        return a[i], p[i], n


class MultiSimilarityMiner(Miner):
    """Multi-Similarity pair mining (Wang et al. 2019), cosine similarity.

    Keeps negatives with s + epsilon > the anchor's hardest positive similarity and
    positives with s - epsilon < its hardest negative similarity. Returns pairs.

    Args:
        epsilon: the slack of the paper's mining rule: a negative is kept if more similar than the hardest positive minus epsilon, a positive if less similar than the hardest negative plus epsilon.
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if epsilon < 0:
            raise OptionError(f"epsilon must be >= 0; got {epsilon}")
        self.epsilon = epsilon

    def mine(self, emb, labels, ref, ref_labels):
        sim = cosine_similarity(emb, emb if ref is None else ref)
        pos, neg = label_masks(labels, ref_labels)
        min_pos = sim.masked_fill(~pos, math.inf).min(1, keepdim=True).values
        max_neg = sim.masked_fill(~neg, -math.inf).max(1, keepdim=True).values
        keep_neg = neg & (sim + self.epsilon > min_pos)
        keep_pos = pos & (sim - self.epsilon < max_neg)
        a1, p = keep_pos.nonzero(as_tuple=True)
        a2, n = keep_neg.nonzero(as_tuple=True)
        return a1, p, a2, n


@dmlkit.hookimpl
def register_miners(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "semihard",
            SemiHardMiner,
            "Semi-hard negatives with FaceNet's fallback (Schroff et al. 2015)",
            aliases=("semi_hard",),
        )
    )
    register(
        ComponentSpec("batch_hard", BatchHardMiner, "Hardest positive and negative per anchor (Hermans et al. 2017)")
    )
    register(ComponentSpec("batch_all", BatchAllMiner, "All valid triplets, optionally only violating ones"))
    register(
        ComponentSpec(
            "multi_similarity", MultiSimilarityMiner, "Multi-Similarity pair mining (Wang et al. 2019)", aliases=("ms",)
        )
    )
