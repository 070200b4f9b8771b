"""Each loss and miner against a straightforward loop over anchors written here, and against PML."""

import math

import pytest
import torch

from dmlkit_plugins.losses import (
    ContrastiveLoss,
    CosineContrastiveLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    RankedListLoss,
    TripletLoss,
)
from dmlkit_plugins.miners import BatchAllMiner, BatchHardMiner, MultiSimilarityMiner, SemiHardMiner

F = torch.nn.functional


def batch(n=24, d=8, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    emb = torch.randn(n, d, generator=g, dtype=torch.float64).float()
    return emb, labels


def dist(a, b, squared):
    d2 = ((a - b) ** 2).sum()
    return d2 if squared else d2.clamp_min(1e-12).sqrt()


def pairs_of(labels, ref_labels=None):
    ref = labels if ref_labels is None else ref_labels
    same_src = ref_labels is None
    pos = [
        (i, j) for i in range(len(labels)) for j in range(len(ref)) if labels[i] == ref[j] and not (same_src and i == j)
    ]
    neg = [(i, j) for i in range(len(labels)) for j in range(len(ref)) if labels[i] != ref[j]]
    return pos, neg


# ------------------------------------------------------------------------------------ references
def ref_triplet(emb, labels, margin, squared, reduction, triplets=None, ref=None, ref_labels=None):
    x = F.normalize(emb, dim=1)
    r = x if ref is None else F.normalize(ref, dim=1)
    if triplets is None:
        pos, _ = pairs_of(labels, ref_labels)
        rl = labels if ref_labels is None else ref_labels
        triplets = [(a, p, n) for a, p in pos for n in range(len(r)) if rl[n] != labels[a]]
    losses = [torch.relu(dist(x[a], r[p], squared) - dist(x[a], r[n], squared) + margin) for a, p, n in triplets]
    if reduction == "mean_nonzero":
        losses = [v for v in losses if v > 0]
    return torch.stack(losses).mean() if losses else emb.sum() * 0


def ref_contrastive(emb, labels, pm, nm, ref=None, ref_labels=None):
    x = F.normalize(emb, dim=1)
    r = x if ref is None else F.normalize(ref, dim=1)
    pos, neg = pairs_of(labels, ref_labels)
    pl = [torch.relu(dist(x[i], r[j], False) - pm) for i, j in pos]
    nl = [torch.relu(nm - dist(x[i], r[j], False)) for i, j in neg]
    pl = [v for v in pl if v > 0]
    nl = [v for v in nl if v > 0]
    return (torch.stack(pl).mean() if pl else 0) + (torch.stack(nl).mean() if nl else 0)


def ref_c1(emb, labels, margin, ref=None, ref_labels=None):
    x = F.normalize(emb, dim=1)
    r = x if ref is None else F.normalize(ref, dim=1)
    pos, neg = pairs_of(labels, ref_labels)
    total = sum(1 - x[i] @ r[j] for i, j in pos) + sum(torch.relu(x[i] @ r[j] - margin) for i, j in neg)
    return total / len(emb)


def ref_ms(emb, labels, alpha, beta, base, ref=None, ref_labels=None):
    x = F.normalize(emb, dim=1)
    r = x if ref is None else F.normalize(ref, dim=1)
    rl = labels if ref_labels is None else ref_labels
    out = []
    for i in range(len(x)):
        ps = [x[i] @ r[j] for j in range(len(r)) if rl[j] == labels[i] and not (ref is None and i == j)]
        ns = [x[i] @ r[j] for j in range(len(r)) if rl[j] != labels[i]]
        lp = torch.log(1 + sum(torch.exp(-alpha * (s - base)) for s in ps)) / alpha if ps else 0
        ln = torch.log(1 + sum(torch.exp(beta * (s - base)) for s in ns)) / beta if ns else 0
        out.append(lp + ln)
    return sum(out) / len(out)


def ref_rll(emb, labels, alpha, m, tp, tn, lam):
    x = F.normalize(emb, dim=1)
    out = []
    for i in range(len(x)):
        lp, ln, wp, wn = 0, 0, 0, 0
        for j in range(len(x)):
            d = dist(x[i], x[j], False)
            if labels[j] == labels[i] and i != j and d > alpha - m:
                w = math.exp(tp * float(d - (alpha - m)))
                lp, wp = lp + w * (d - (alpha - m)), wp + w
            if labels[j] != labels[i] and d < alpha:
                w = math.exp(tn * float(alpha - d))
                ln, wn = ln + w * (alpha - d), wn + w
        out.append((1 - lam) * (lp / wp if wp else 0) + lam * (ln / wn if wn else 0))
    return sum(out) / len(out)


def ref_proxynca(emb, labels, proxies, proxy_labels, scale, exclude_positive):
    x = scale * F.normalize(emb, dim=1)
    p = scale * F.normalize(proxies, dim=1)
    out = []
    for i in range(len(x)):
        d = torch.stack([((x[i] - p[j]) ** 2).sum() for j in range(len(p))])
        own = [j for j in range(len(p)) if proxy_labels[j] == labels[i]]
        jpos = min(own, key=lambda j: float(d[j]))
        others = [j for j in range(len(p)) if proxy_labels[j] != labels[i]]
        den = others if exclude_positive else [jpos, *others]
        out.append(d[jpos] + torch.logsumexp(torch.stack([-d[j] for j in den]), 0))
    return sum(out) / len(out)


def ref_proxy_anchor(emb, labels, proxies, proxy_labels, alpha, delta):
    x, p = F.normalize(emb, dim=1), F.normalize(proxies, dim=1)
    pos_terms, neg_terms = [], []
    for j in range(len(p)):
        sp = [x[i] @ p[j] for i in range(len(x)) if labels[i] == proxy_labels[j]]
        sn = [x[i] @ p[j] for i in range(len(x)) if labels[i] != proxy_labels[j]]
        if sp:
            pos_terms.append(torch.log(1 + sum(torch.exp(-alpha * (s - delta)) for s in sp)))
        neg_terms.append(torch.log(1 + sum(torch.exp(alpha * (s + delta)) for s in sn)) if sn else torch.tensor(0.0))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / len(p)


def check(ours, ref_fn, emb, *args, atol=1e-5):
    """Same value and the same gradient with respect to the embeddings."""
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    va, vb = ours(a, *args), ref_fn(b)
    va.backward()
    vb.backward()
    assert float(va.detach()) == pytest.approx(float(vb.detach()), abs=atol, rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_triplet_all_triplets(seed, squared, reduction):
    emb, labels = batch(seed=seed)
    loss = TripletLoss(margin=0.2, squared=squared, reduction=reduction)
    check(loss, lambda e: ref_triplet(e, labels, 0.2, squared, reduction), emb, labels)


def test_triplet_with_reference_set():
    emb, labels = batch(n=10, seed=2)
    ref, ref_labels = batch(n=12, seed=3)
    loss = TripletLoss(margin=0.3)
    v = loss(emb, labels, ref, ref_labels)
    assert float(v) == pytest.approx(
        float(ref_triplet(emb, labels, 0.3, True, "mean", ref=ref, ref_labels=ref_labels)), abs=1e-5
    )


def ref_semihard(emb, labels, squared=True):
    x = F.normalize(emb, dim=1)
    out = []
    for a in range(len(x)):
        for p in range(len(x)):
            if p == a or labels[p] != labels[a]:
                continue
            dap = float(dist(x[a], x[p], squared))
            negs = [(float(dist(x[a], x[n], squared)), n) for n in range(len(x)) if labels[n] != labels[a]]
            farther = [t for t in negs if t[0] > dap]
            out.append((a, p, min(farther)[1] if farther else max(negs)[1]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_miner_matches_loop(seed):
    emb, labels = batch(n=32, seed=seed)
    emb = emb * 0.3  # tighter clusters: some pairs have no farther negative (the fallback)
    a, p, n = SemiHardMiner()(emb, labels)
    got = sorted(zip(a.tolist(), p.tolist(), n.tolist()))
    assert got == sorted(ref_semihard(emb, labels))


def test_semihard_fallback_is_the_farthest_negative():
    # anchor 0 and positive 1 far apart; every negative closer than the positive
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    a, p, n = SemiHardMiner()(emb, labels)
    trip = dict(((x, y), z) for x, y, z in zip(a.tolist(), p.tolist(), n.tolist()))
    assert trip[(0, 1)] == 4  # farthest negative from anchor 0


def test_batch_hard_and_batch_all_match_loops():
    emb, labels = batch(seed=4)
    x = F.normalize(emb, dim=1)
    d = torch.cdist(x, x)
    a, p, n = BatchHardMiner()(emb, labels)
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        pos = [j for j in range(len(x)) if labels[j] == labels[ai] and j != ai]
        neg = [j for j in range(len(x)) if labels[j] != labels[ai]]
        assert pi == max(pos, key=lambda j: d[ai, j]) and ni == min(neg, key=lambda j: d[ai, j])
    assert len(a) == len(x)
    a, p, n = BatchAllMiner()(emb, labels)
    pos, _ = pairs_of(labels)
    assert len(a) == sum(1 for ai, _ in pos for j in range(len(x)) if labels[j] != labels[ai])
    a2, p2, n2 = BatchAllMiner(margin=0.2, only_violating=True)(emb, labels)
    d2 = d**2
    assert all(d2[i, j] - d2[i, k] + 0.2 > 0 for i, j, k in zip(a2.tolist(), p2.tolist(), n2.tolist()))
    assert len(a2) == sum(1 for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()) if d2[i, j] - d2[i, k] + 0.2 > 0)


def test_triplet_with_mined_triplets_matches_loop():
    emb, labels = batch(seed=5)
    trip = SemiHardMiner()(emb, labels)
    loss = TripletLoss(margin=0.2)
    ref = list(zip(*[t.tolist() for t in trip]))
    check(
        lambda e, y: loss(e, y, indices=trip),
        lambda e: ref_triplet(e, labels, 0.2, True, "mean", triplets=ref),
        emb,
        labels,
    )


@pytest.mark.parametrize("pm, nm", [(0.0, 0.5), (0.3841, 1.2)])
def test_contrastive_c2(pm, nm):
    emb, labels = batch(seed=6)
    check(ContrastiveLoss(pm, nm), lambda e: ref_contrastive(e, labels, pm, nm), emb, labels)


def test_contrastive_c1_and_reference_set():
    emb, labels = batch(seed=7)
    check(CosineContrastiveLoss(0.5), lambda e: ref_c1(e, labels, 0.5), emb, labels)
    ref, ref_labels = batch(n=9, seed=8)
    v = CosineContrastiveLoss(0.5)(emb, labels, ref, ref_labels)
    assert float(v) == pytest.approx(float(ref_c1(emb, labels, 0.5, ref, ref_labels)), abs=1e-5)


def test_multi_similarity_and_its_miner():
    emb, labels = batch(seed=9)
    check(MultiSimilarityLoss(2, 50, 0.5), lambda e: ref_ms(e, labels, 2, 50, 0.5), emb, labels)
    # the miner keeps exactly the pairs of the paper's epsilon rule
    a1, p, a2, n = MultiSimilarityMiner(0.1)(emb, labels)
    x = F.normalize(emb, dim=1)
    s = x @ x.T
    pos, neg = pairs_of(labels)
    minp = {i: min(s[i, j] for a, j in pos if a == i) for i in range(len(x))}
    maxn = {i: max(s[i, j] for a, j in neg if a == i) for i in range(len(x))}
    assert sorted(zip(a1.tolist(), p.tolist())) == sorted((i, j) for i, j in pos if s[i, j] - 0.1 < maxn[i])
    assert sorted(zip(a2.tolist(), n.tolist())) == sorted((i, j) for i, j in neg if s[i, j] + 0.1 > minp[i])


def test_ranked_list():
    emb, labels = batch(seed=10)
    check(RankedListLoss(1.2, 0.4, 0.0, 10.0, 0.5), lambda e: ref_rll(e, labels, 1.2, 0.4, 0.0, 10.0, 0.5), emb, labels)


@pytest.mark.parametrize("k, exclude", [(1, False), (1, True), (3, False)])
def test_proxynca(k, exclude):
    emb, labels = batch(seed=11)
    loss = ProxyNCALoss(6, 8, scale=3.0, proxies_per_class=k, exclude_positive=exclude)
    check(loss, lambda e: ref_proxynca(e, labels, loss.proxies.detach(), loss.proxy_labels, 3.0, exclude), emb, labels)


def test_proxy_anchor_with_absent_classes():
    emb, labels = batch(seed=12)
    labels = labels % 4  # classes 4 and 5 have no sample: only negative terms for their proxies
    loss = ProxyAnchorLoss(6, 8)
    check(
        loss,
        lambda e: ref_proxy_anchor(e, labels, loss.proxies.detach(), loss.proxy_labels, 32.0, 0.1),
        emb,
        labels,
        atol=1e-4,
    )


def test_proxy_gradients_reach_the_proxies():
    emb, labels = batch(seed=13)
    for loss in (ProxyNCALoss(6, 8), ProxyAnchorLoss(6, 8)):
        loss(emb, labels).backward()
        assert loss.bank.vectors.grad is not None and loss.bank.vectors.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: TripletLoss(),
        lambda: ContrastiveLoss(),
        lambda: CosineContrastiveLoss(),
        lambda: MultiSimilarityLoss(),
        lambda: RankedListLoss(),
    ],
)
def test_no_positive_pair_gives_a_zero_that_backpropagates(make):
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.arange(6)  # all different: no positive pair, no triplet
    v = make()(emb, labels)
    v.backward()
    assert torch.isfinite(v) and emb.grad is not None and torch.isfinite(emb.grad).all()
    if isinstance(make(), TripletLoss):
        assert float(v) == 0.0
    miner = SemiHardMiner()
    assert len(miner(emb, labels)[0]) == 0 and miner.stats() == {"mined": 0}


def test_losses_compute_in_float32_under_bf16_autocast():
    emb, labels = batch(seed=14)
    half = emb.bfloat16()
    for loss in (TripletLoss(), MultiSimilarityLoss(), ProxyNCALoss(6, 8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = loss(half, labels)
        assert v.dtype == torch.float32
        assert float(v) == pytest.approx(float(loss(half.float(), labels)), rel=1e-6)


def test_pml_positional_call_with_mined_indices():
    """loss(emb, labels, miner(emb, labels)): the call every PML user knows."""
    from dmlkit import get_registry

    reg = get_registry()
    loss, miner = reg.build("loss", "triplet"), reg.build("miner", "semihard")
    emb, labels = torch.randn(12, 6), torch.arange(12) % 3
    mined = miner(emb, labels)
    assert float(loss(emb, labels, mined)) == pytest.approx(float(loss(emb, labels, indices=mined)))
    assert float(loss(emb, labels, mined)) != pytest.approx(float(loss(emb, labels)))
