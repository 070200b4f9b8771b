"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", CVPR 2020)."""

import torch

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import MetricLoss, cosine_similarity, indices_to_masks, label_masks, zero_loss


class CircleLoss(MetricLoss):
    """Circle loss on cosine similarity, with margin m and scale gamma.

    Per anchor: log(1 + sum_n exp(gamma a_n (s_n - m)) * sum_p exp(-gamma a_p (s_p - 1 + m))),
    with a_p = [1 + m - s_p]+ and a_n = [s_n + m]+ held constant; mean over anchors that
    have a positive and a negative.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        if not 0 <= m < 1 or gamma <= 0:
            raise OptionError(f"circle loss needs 0 <= m < 1 and gamma > 0; got m={m}, gamma={gamma}")
        self.m, self.gamma = m, gamma

    def compute(self, emb, labels, ref, ref_labels, indices):
        other = emb if ref is None else ref
        sim = cosine_similarity(emb, other)
        pos, neg = label_masks(labels, ref_labels)
        if indices is not None:  # a miner chose the pairs
            mined_pos, mined_neg = indices_to_masks(indices, len(emb), len(other), emb.device)
            pos, neg = pos & mined_pos, neg & mined_neg
        alpha_p = (1 + self.m - sim.detach()).clamp_min(0)
        alpha_n = (sim.detach() + self.m).clamp_min(0)
        logit_p = (-self.gamma * alpha_p * (sim - (1 - self.m))).masked_fill(~pos, -torch.inf)
        logit_n = (self.gamma * alpha_n * (sim - self.m)).masked_fill(~neg, -torch.inf)
        rows = pos.any(1) & neg.any(1)
        if not rows.any():
            return zero_loss(emb, other)
        per_anchor = torch.nn.functional.softplus(
            torch.logsumexp(logit_p[rows], dim=1) + torch.logsumexp(logit_n[rows], dim=1)
        )
        return per_anchor.mean()


@dmlkit.hookimpl
def register_losses(register):
    register(dmlkit.ComponentSpec("my_circle", CircleLoss, "Circle loss (Sun et al., CVPR 2020)"))
