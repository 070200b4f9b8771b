"""Long mined pair lists (cross-batch memory, HDC): the masks they become, the Euclidean distance's
hand-written backward, and the contrastive loss on masks, each against a computation written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmlkit
from dmlkit.losses import pair_masks, pairwise_distance


def data(seed, n=12, m=30, d=5, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    ref = torch.randn(m, d, generator=g, dtype=torch.float64)
    return x, torch.randint(classes, (n,), generator=g), ref, torch.randint(classes, (m,), generator=g), g


def long_list_with_repeats(labels, ref_labels, g):
    """Every (batch, reference) pair as a positive or a negative, then a third of them again,
    then pairs whose labels contradict their side: a list longer than n m / 8 (the masks path)."""
    same = labels[:, None] == ref_labels[None, :]
    a1, p = same.nonzero(as_tuple=True)
    a2, n = (~same).nonzero(as_tuple=True)
    rp = torch.randint(len(a1), (len(a1) // 3,), generator=g)
    rn = torch.randint(len(a2), (len(a2) // 3,), generator=g)
    return (
        torch.cat([a1, a1[rp], a2[:3]]),  # a2[:3], n[:3]: negatives passed as positives (dropped)
        torch.cat([p, p[rp], n[:3]]),
        torch.cat([a2, a2[rn], a1[:3]]),
        torch.cat([n, n[rn], p[:3]]),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_masks_hold_each_valid_mined_pair(seed):
    """The masks a long list with repeats and contradicting pairs becomes, against a loop over it."""
    x, labels, ref, ref_labels, g = data(seed)
    idx = long_list_with_repeats(labels, ref_labels, g)
    pos, neg = pair_masks(labels, ref_labels, idx, len(x), len(ref), x.device)
    want_pos, want_neg = torch.zeros_like(pos), torch.zeros_like(neg)
    for i, j in zip(idx[0].tolist(), idx[1].tolist()):
        want_pos[i, j] |= bool(labels[i] == ref_labels[j])
    for i, j in zip(idx[2].tolist(), idx[3].tolist()):
        want_neg[i, j] |= bool(labels[i] != ref_labels[j])
    assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg)
    # without a reference set an item is never its own positive, even when mined as one
    n = len(x)
    own = (torch.arange(n), torch.arange(n), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    pos, _ = pair_masks(labels, None, own, n, n, x.device)
    assert not pos.any()


@pytest.mark.parametrize("same_tensor", [False, True])
def test_distance_gradient_is_autographs_of_the_clamped_formula(same_tensor):
    """pairwise_distance's hand-written backward against autograd on sqrt(max(max(d2, 0), eps)),
    with duplicated rows (d2 below eps: no gradient) and the batch as its own reference set."""
    x, _, ref, _, g = data(3)
    x[4] = x[2]
    ref[7] = x[2]
    if same_tensor:
        ref = x
    w = torch.randn(len(x), len(ref), generator=g, dtype=torch.float64)

    def reference(a, b):
        d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return torch.sqrt(d2.clamp_min(0.0).clamp_min(1e-12))

    grads = []
    for fn in (pairwise_distance, reference):
        a = x.clone().requires_grad_(True)
        b = a if same_tensor else ref.clone().requires_grad_(True)
        dist = fn(a, b)
        (dist * w).sum().backward()
        grads.append((dist.detach(), a.grad, None if same_tensor else b.grad))
    (d1, ga1, gb1), (d2, ga2, gb2) = grads
    torch.testing.assert_close(d1, d2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga1, ga2, rtol=1e-9, atol=1e-9)
    if not same_tensor:
        torch.testing.assert_close(gb1, gb2, rtol=1e-9, atol=1e-9)
    assert float(d1[4, 2] if same_tensor else d1[2, 7]) == pytest.approx(1e-6)  # a row and its copy: clamped


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_contrastive_over_a_long_list_with_repeats_counts_each_distinct_valid_pair_once(seed):
    """dmlkit's rule for a mined list (plugins/losses.py): each distinct pair whose labels agree
    with its side once, however often it is mined; a loop over those pairs computes the loss here,
    and PML's ContrastiveLoss gives the same on the list without repeats (it counts each repeat)."""
    x, labels, ref, ref_labels, g = data(seed)
    idx = long_list_with_repeats(labels, ref_labels, g)
    assert sum(len(t) for t in idx) > len(x) * len(ref) // 8  # the masks path, not the gathering one
    loss = dmlkit.get_registry().build("loss", "contrastive", pos_margin=0.2, neg_margin=1.1)
    a = x.clone().requires_grad_(True)
    value = loss(a, labels, ref, ref_labels, indices=idx)
    value.backward()

    b = x.clone().requires_grad_(True)
    d = torch.cdist(F.normalize(b, dim=1), F.normalize(ref, dim=1))
    pos = {(i, j) for i, j in zip(idx[0].tolist(), idx[1].tolist()) if labels[i] == ref_labels[j]}
    neg = {(i, j) for i, j in zip(idx[2].tolist(), idx[3].tolist()) if labels[i] != ref_labels[j]}
    pos_terms = [(d[i, j] - 0.2).clamp_min(0) for i, j in sorted(pos)]
    neg_terms = [(1.1 - d[i, j]).clamp_min(0) for i, j in sorted(neg)]
    expected = sum(pos_terms) / max(1, sum(float(t) > 0 for t in pos_terms)) + sum(neg_terms) / max(
        1, sum(float(t) > 0 for t in neg_terms)
    )
    expected.backward()
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)

    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    distinct = [torch.tensor(sorted(s), dtype=torch.long).reshape(-1, 2).T for s in (pos, neg)]
    pml_idx = (distinct[0][0], distinct[0][1], distinct[1][0], distinct[1][1])
    theirs = pml_losses.ContrastiveLoss(0.2, 1.1)(x, labels, pml_idx, ref, ref_labels)
    assert float(value) == pytest.approx(float(theirs), rel=1e-10)


def test_cross_batch_memory_contrastive_gradient_equals_pml_with_a_full_memory():
    """XBM over contrastive with a memory larger than the batch (every pair a long list), against
    PML's CrossBatchMemory over three batches: values and the batch's gradients."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    ours = dmlkit.get_registry().build(
        "loss", "cross_batch_memory", context={"num_classes": 4, "embedding_size": 5}, memory_size=30
    )
    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(0.0, 0.5), 5, memory_size=30)
    for seed in range(3):
        x, labels, *_ = data(seed, n=12)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        va, vb = ours(a, labels), theirs(b, labels)
        va.backward()
        vb.backward()
        assert float(va) == pytest.approx(float(vb), rel=1e-10)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["contrastive", "intra_pair_variance"])
def test_a_second_derivative_through_a_hand_written_backward_raises(name):
    """A gradient penalty (create_graph=True) through the hand-written backwards must raise, not
    drop their curvature: once_differentiable alone gave a silently wrong penalty gradient."""
    import dmlkit

    torch.manual_seed(0)
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.arange(12) % 3
    loss = dmlkit.get_registry().build("loss", name)
    value = loss(x @ w, labels)
    (plain,) = torch.autograd.grad(value, w, retain_graph=True)  # first order: fine
    assert torch.isfinite(plain).all() and plain.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(value, w, create_graph=True)


def test_pairwise_distance_under_autocast_and_bad_indices():
    """Under autocast (a plugin's own call; dmlkit's losses turn it off) the distance takes
    autograd's formula and its gradient; mined indices outside the batch are refused."""
    from dmlkit.losses import pair_masks, pairwise_distance

    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.cat([x[:2].detach(), torch.randn(3, 5)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_distance(x, y)
        ref = torch.sqrt((((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None]) - 2 * x @ y.T).clamp_min(1e-12))
    (g,) = torch.autograd.grad(d.float().sum(), x)
    (want,) = torch.autograd.grad(ref.float().sum(), x)
    assert torch.equal(d, ref) and torch.equal(g, want)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(IndexError, match="out of range"):
        pair_masks(labels, None, (torch.tensor([0]), torch.tensor([6]), torch.tensor([0]), torch.tensor([2])), 6, 6,
                   torch.device("cpu"))  # fmt: skip
    pos, neg = pair_masks(labels, None, tuple(torch.tensor(v, dtype=torch.int32) for v in ([0], [1], [0], [2])), 6, 6,
                          torch.device("cpu"))  # fmt: skip
    assert pos.sum() == 1 and pos[0, 1] and neg.sum() == 1 and neg[0, 2]
