"""The reading list's plugin: each loss against a loop over pairs/triplets written here from the
paper's formula (value and gradients), the N-way K-shot evaluator against a brute-force
episode loop, DeViSE's class-vector files, and short trainings through the CLI."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from dmlkit.errors import OptionError
from dmlkit.proxies import banks
from dmlkit_plugins.reading_list import (
    DeViSELoss,
    NWayKShotEvaluator,
    PDDMLoss,
    SiameseLoss,
    SoftmaxLoss,
    TripletNetworkLoss,
    load_class_vectors,
    nway_predict,
    sample_episodes,
)

F = torch.nn.functional


def batch(n=12, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % classes


def reference_set(m=7, d=6, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g), torch.arange(m) % classes


def all_pairs(n, m, same_source):
    return [(i, j) for i in range(n) for j in range(m) if not (same_source and i == j)]


def dist(a, b):
    return ((a - b) ** 2).sum().clamp_min(1e-12).sqrt()


def check(loss, ours, theirs, emb, atol=1e-5):
    """Same value, and the same gradients for the embeddings and every trainable loss parameter.
    ``ours(e, loss)`` calls the loss; ``theirs(e, loss_copy)`` is the loop written here."""
    loss.zero_grad(set_to_none=True)
    twin = copy.deepcopy(loss)
    a, b = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    va, vb = ours(a, loss), theirs(b, twin)
    va.backward()
    vb.backward()
    assert float(va.detach()) == pytest.approx(float(vb.detach()), abs=atol, rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=1e-4)
    for (name, p), (_, q) in zip(loss.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=1e-4, msg=f"gradient of {name}")
        else:
            assert p.grad is None and q.grad is None
    return float(va.detach())


# ================================================================================== siamese
def ref_siamese(emb, labels, loss, ref=None, ref_labels=None, pairs=None, balance=False):
    """p = sigmoid(sum_k alpha_k |h1_k - h2_k| + b); BCE with target 1 for a same-class pair."""
    other = emb if ref is None else ref
    rl = labels if ref_labels is None else ref_labels
    pairs = all_pairs(len(emb), len(other), ref is None) if pairs is None else pairs
    pos, neg = [], []
    for i, j in pairs:
        z = (loss.alpha * (emb[i] - other[j]).abs()).sum()
        if loss.bias is not None:
            z = z + loss.bias
        p = 1 / (1 + torch.exp(-z))
        if labels[i] == rl[j]:
            pos.append(-torch.log(p))
        else:
            neg.append(-torch.log(1 - p))
    if not balance:
        return sum(pos + neg) / len(pos + neg)
    parts = [sum(t) / len(t) for t in (pos, neg) if t]
    return sum(parts) / len(parts)


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_siamese_all_pairs(balance, bias, seed):
    torch.manual_seed(seed)
    emb, labels = batch(seed=seed)
    loss = SiameseLoss(embedding_size=6, bias=bias, balance=balance)
    assert loss.alpha.shape == (6,) and isinstance(loss.alpha, torch.nn.Parameter)
    check(loss, lambda e, m: m(e, labels), lambda e, m: ref_siamese(e, labels, m, balance=balance), emb)


def test_siamese_reference_set_and_mined_pairs():
    torch.manual_seed(0)
    emb, labels = batch()
    ref, ref_labels = reference_set()
    loss = SiameseLoss(embedding_size=6)
    check(
        loss, lambda e, m: m(e, labels, ref, ref_labels), lambda e, m: ref_siamese(e, labels, m, ref, ref_labels), emb
    )
    # mined pairs (anchor1, positive, anchor2, negative): only those pairs count
    a1, p, a2, n = torch.tensor([0, 1, 5]), torch.tensor([4, 9, 1]), torch.tensor([0, 2, 3]), torch.tensor([1, 7, 8])
    pairs = [*zip(a1.tolist(), p.tolist()), *zip(a2.tolist(), n.tolist())]
    check(
        loss,
        lambda e, m: m(e, labels, indices=(a1, p, a2, n)),
        lambda e, m: ref_siamese(e, labels, m, pairs=pairs),
        emb,
    )


# =========================================================================== triplet network
def ref_triplet_network(emb, labels, ref=None, ref_labels=None, triplets=None, normalize=False):
    """d+ = exp(|x-x+|) / (exp(|x-x+|) + exp(|x-x-|)), d- likewise; loss |(d+, d- - 1)|^2."""
    x = F.normalize(emb, dim=1) if normalize else emb
    r = x if ref is None else (F.normalize(ref, dim=1) if normalize else ref)
    rl = labels if ref_labels is None else ref_labels
    if triplets is None:
        triplets = [
            (a, p, n)
            for a, p in all_pairs(len(x), len(r), ref is None)
            if labels[a] == rl[p]
            for n in range(len(r))
            if rl[n] != labels[a]
        ]
    losses = []
    for a, p, n in triplets:
        ep, en = torch.exp(dist(x[a], r[p])), torch.exp(dist(x[a], r[n]))
        d_plus, d_minus = ep / (ep + en), en / (ep + en)
        losses.append(d_plus**2 + (d_minus - 1) ** 2)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_network_all_triplets(normalize, seed):
    emb, labels = batch(seed=seed)
    loss = TripletNetworkLoss(normalize=normalize)
    check(loss, lambda e, m: m(e, labels), lambda e, m: ref_triplet_network(e, labels, normalize=normalize), emb)


def test_triplet_network_reference_set_and_mined_triplets():
    emb, labels = batch()
    ref, ref_labels = reference_set()
    loss = TripletNetworkLoss()
    check(
        loss,
        lambda e, m: m(e, labels, ref, ref_labels),
        lambda e, m: ref_triplet_network(e, labels, ref, ref_labels),
        emb,
    )
    triplets = [(0, 4, 1), (0, 8, 3), (5, 1, 2)]
    idx = tuple(torch.tensor(t) for t in zip(*triplets))
    check(
        loss,
        lambda e, m: m(e, labels, indices=idx),
        lambda e, m: ref_triplet_network(e, labels, triplets=triplets),
        emb,
    )
    # pairs from a pair miner become the triplets that share an anchor
    a1, p, a2, n = torch.tensor([0, 5]), torch.tensor([4, 1]), torch.tensor([0, 0, 5]), torch.tensor([1, 3, 2])
    triplets = [(0, 4, 1), (0, 4, 3), (5, 1, 2)]
    check(
        loss,
        lambda e, m: m(e, labels, indices=(a1, p, a2, n)),
        lambda e, m: ref_triplet_network(e, labels, triplets=triplets),
        emb,
    )


def test_triplet_network_equals_two_d_plus_squared():
    emb, labels = batch()
    d = torch.cdist(emb, emb)
    a, p, n = 0, 4, 1
    d_plus = torch.exp(d[a, p]) / (torch.exp(d[a, p]) + torch.exp(d[a, n]))
    got = TripletNetworkLoss()(emb, labels, indices=(torch.tensor([a]), torch.tensor([p]), torch.tensor([n])))
    assert float(got) == pytest.approx(float(2 * d_plus**2), rel=1e-5)


# =================================================================================== devise
def ref_devise(emb, labels, loss, margin=0.1):
    """sum_{j != y} max(0, margin - t_y . M v + t_j . M v), mean over samples."""
    t = loss.bank.vectors[:, 0].detach()
    out = []
    for i in range(len(emb)):
        mv = loss.proj.weight @ emb[i]
        y = int(labels[i])
        out.append(sum(torch.relu(margin - t[y] @ mv + t[j] @ mv) for j in range(len(t)) if j != y))
    return sum(out) / len(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_devise_hinge_rank_loss(seed):
    torch.manual_seed(seed)
    emb, labels = batch(seed=seed)
    loss = DeViSELoss(num_classes=4, embedding_size=6, vector_size=5, seed=seed)
    assert not loss.bank.vectors.requires_grad and banks(loss) == [loss.bank]
    torch.testing.assert_close(loss.bank.vectors[:, 0].norm(dim=1), torch.ones(4))
    check(loss, lambda e, m: m(e, labels), lambda e, m: ref_devise(e, labels, m), emb)
    # the random class vectors are fixed by the seed
    again = DeViSELoss(num_classes=4, embedding_size=6, vector_size=5, seed=seed)
    torch.testing.assert_close(again.bank.vectors, loss.bank.vectors)


def test_devise_reads_npy_and_text_files(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 3))
    np.save(tmp_path / "v.npy", vectors)
    names = ["cat", "dog", "owl", "yak"]
    lines = ["# class vectors", ""] + [
        f"{n} " + " ".join(repr(float(v)) for v in row) for n, row in zip(names, vectors)
    ]
    (tmp_path / "v.txt").write_text("\n".join(lines) + "\n")
    unit = torch.tensor(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=torch.float32)
    for name in ("v.npy", "v.txt"):
        loss = DeViSELoss(num_classes=4, embedding_size=6, class_vectors=str(tmp_path / name))
        torch.testing.assert_close(loss.bank.vectors[:, 0], unit)
        assert loss.proj.weight.shape == (3, 6)
    assert load_class_vectors(tmp_path / "v.txt")[1] == names


def test_devise_refuses_wrong_or_missing_files(tmp_path):
    np.save(tmp_path / "v.npy", np.ones((3, 5)))
    with pytest.raises(OptionError, match="has 3 class vectors but the training split has 4 classes"):
        DeViSELoss(num_classes=4, embedding_size=6, class_vectors=str(tmp_path / "v.npy"))
    np.save(tmp_path / "flat.npy", np.ones(5))
    with pytest.raises(OptionError, match="shape"):
        DeViSELoss(num_classes=4, embedding_size=6, class_vectors=str(tmp_path / "flat.npy"))
    with pytest.raises(OptionError, match="not found"):
        DeViSELoss(num_classes=4, embedding_size=6, class_vectors=str(tmp_path / "missing.npy"))
    (tmp_path / "ragged.txt").write_text("a 1 2 3\nb 1 2\n")
    with pytest.raises(OptionError, match="line 2 has 2 values, expected 3"):
        DeViSELoss(num_classes=2, embedding_size=6, class_vectors=str(tmp_path / "ragged.txt"))
    (tmp_path / "words.txt").write_text("a 1 x 3\n")
    with pytest.raises(OptionError, match="line 1"):
        DeViSELoss(num_classes=1, embedding_size=6, class_vectors=str(tmp_path / "words.txt"))
    np.save(tmp_path / "zero.npy", np.zeros((2, 3)))
    with pytest.raises(OptionError, match="all zeros"):
        DeViSELoss(num_classes=2, embedding_size=6, class_vectors=str(tmp_path / "zero.npy"))


# ===================================================================================== pddm
def ref_pddm_score(loss, xi, xj):
    """The PDDM unit written out: u, v through Linear + ReLU + L2 norm, concat, Linear + ReLU, Linear."""
    u = torch.relu(loss.fc_u.weight @ (xi - xj).abs() + loss.fc_u.bias)
    v = torch.relu(loss.fc_v.weight @ ((xi + xj) / 2) + loss.fc_v.bias)
    u, v = u / u.norm().clamp_min(1e-12), v / v.norm().clamp_min(1e-12)
    c = torch.relu(loss.fc_c.weight @ torch.cat([u, v]) + loss.fc_c.bias)
    return (loss.fc_s.weight @ c + loss.fc_s.bias)[0]


def ref_pddm(emb, labels, loss, positive_pairs=1, ref=None, ref_labels=None, a=1.9, b=1.0, lam=0.5):
    x = torch.stack([e / e.norm() for e in emb])
    r = x if ref is None else torch.stack([e / e.norm() for e in ref])
    rl = labels if ref_labels is None else ref_labels

    def s(u, w):
        return ref_pddm_score(loss, u, w)

    def negatives_of_ref(j):
        return [l_ for l_ in range(len(r)) if rl[l_] != rl[j]]

    pairs = [
        (i, j)
        for i in range(len(x))
        for j in range(len(r))
        if labels[i] == rl[j] and (i < j if ref is None else True)
        if any(rl[k] != labels[i] for k in range(len(r))) and negatives_of_ref(j)
    ]
    scored = sorted(pairs, key=lambda ij: float(s(x[ij[0]], r[ij[1]]).detach()))
    chosen = scored if positive_pairs == 0 else scored[:positive_pairs]
    total = []
    for i, j in chosen:
        k = max((k for k in range(len(r)) if rl[k] != labels[i]), key=lambda k: float(s(x[i], r[k]).detach()))
        l_ = max(negatives_of_ref(j), key=lambda l_: float(s(r[j], r[l_]).detach()))
        s_ij, s_ik, s_jl = s(x[i], r[j]), s(x[i], r[k]), s(r[j], r[l_])
        metric = torch.relu(a + s_ik - s_ij) + torch.relu(a + s_jl - s_ij)
        d_ij, d_ik, d_jl = ((x[i] - r[j]) ** 2).sum(), ((x[i] - r[k]) ** 2).sum(), ((r[j] - r[l_]) ** 2).sum()
        embed = torch.relu(b + d_ij - d_ik) + torch.relu(b + d_ij - d_jl)
        total.append(metric + lam * embed)
    return sum(total) / len(total)


@pytest.mark.parametrize("positive_pairs", [1, 3, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_pddm_hard_quadruplets(positive_pairs, seed):
    torch.manual_seed(seed)
    emb, labels = batch(n=10, seed=seed, classes=3)
    loss = PDDMLoss(embedding_size=6, hidden=8, positive_pairs=positive_pairs)
    check(loss, lambda e, m: m(e, labels), lambda e, m: ref_pddm(e, labels, m, positive_pairs), emb)
    assert {n for n, _ in loss.named_parameters()} >= {"fc_u.weight", "fc_v.weight", "fc_c.weight", "fc_s.weight"}


def test_pddm_reference_set_and_options():
    torch.manual_seed(0)
    emb, labels = batch(n=8, classes=3)
    ref, ref_labels = reference_set(m=6, classes=3)
    loss = PDDMLoss(embedding_size=6, hidden=8, positive_pairs=0, margin=0.5, embedding_margin=0.3, lam=2.0)
    check(
        loss,
        lambda e, m: m(e, labels, ref, ref_labels),
        lambda e, m: ref_pddm(e, labels, m, 0, ref, ref_labels, a=0.5, b=0.3, lam=2.0),
        emb,
    )


def test_pddm_without_a_positive_pair_is_a_connected_zero():
    emb = torch.randn(4, 6, requires_grad=True)
    loss = PDDMLoss(embedding_size=6, hidden=8)
    value = loss(emb, torch.arange(4))
    value.backward()
    assert float(value.detach()) == 0 and emb.grad is not None


# ================================================================================== softmax
def ref_softmax(emb, labels, loss, normalized=False, scale=16.0):
    """-log softmax over classes; with several vectors per class, the class's nearest vector is
    the positive and the class's other vectors leave the denominator."""
    w = loss.bank.vectors  # [C, K, D]
    out = []
    for i in range(len(emb)):
        x = emb[i]

        def logit(v, x=x):
            return scale * (v @ x) / (v.norm() * x.norm()) if normalized else v @ x

        y = int(labels[i])
        pos = max((logit(v) for v in w[y]), key=lambda t: float(t.detach()))
        others = [logit(v) for c in range(len(w)) if c != y for v in w[c]]
        out.append(-pos + torch.log(torch.exp(pos) + sum(torch.exp(o) for o in others)))
    return sum(out) / len(out)


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("per_class", [1, 2])
def test_softmax_cross_entropy(normalized, per_class):
    torch.manual_seed(0)
    emb, labels = batch()
    loss = SoftmaxLoss(num_classes=4, embedding_size=6, normalized=normalized, proxies_per_class=per_class)
    assert banks(loss) == [loss.bank] and loss.bank.vectors.shape == (4, per_class, 6)
    check(loss, lambda e, m: m(e, labels), lambda e, m: ref_softmax(e, labels, m, normalized), emb, atol=2e-5)


def test_softmax_weights_carry_the_lr_multiplier_and_match_torch():
    emb, labels = batch()
    loss = SoftmaxLoss(num_classes=4, embedding_size=6, lr_multiplier=10.0, normalized=True, scale=4.0)
    assert loss.bank.lr_multiplier == 10.0 and loss.bank.vectors.requires_grad
    w = loss.bank.vectors[:, 0]
    expected = F.cross_entropy(4.0 * F.normalize(emb, dim=1) @ F.normalize(w, dim=1).T, labels)
    assert float(loss(emb, labels).detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


# =============================================================================== nway_kshot
def brute_force_accuracy(emb, episodes, distance="euclidean"):
    """One episode at a time: the way whose support items are nearest on average wins."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    x = x.astype(np.float64)
    correct = 0
    for e in range(len(episodes.query)):
        q = x[episodes.query[e]]
        means = []
        for way in range(episodes.support.shape[1]):
            ds = []
            for s in episodes.support[e, way]:
                if distance == "cosine":
                    ds.append(1 - x[s] @ q / (np.linalg.norm(x[s]) * np.linalg.norm(q)))
                elif distance == "sqeuclidean":
                    ds.append(((x[s] - q) ** 2).sum())
                else:
                    ds.append(np.linalg.norm(x[s] - q))
            means.append(np.mean(ds))
        correct += int(np.argmin(means) == episodes.target[e])
    return correct / len(episodes.query)


def labelled_points(classes=8, per_class=5, dim=6, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, dim))
    emb = (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)
    return emb, labels


@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize(("n_way", "k_shot"), [(5, 1), (3, 3)])
def test_nway_accuracy_equals_a_brute_force_episode_loop(distance, n_way, k_shot):
    emb, labels = labelled_points()
    ev = NWayKShotEvaluator(n_way=n_way, k_shot=k_shot, episodes=300, seed=3, distance=distance, retrieval=False)
    out = ev(emb, labels)
    expected = brute_force_accuracy(emb, sample_episodes(labels, n_way, k_shot, 300, seed=3), distance)
    assert 0.2 < expected < 1.0  # neither trivial nor perfect: the comparison means something
    assert out["nway_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert out["nway_ci95"] == pytest.approx(1.96 * math.sqrt(expected * (1 - expected) / 300))
    assert set(ev.metrics) == {"nway_accuracy", "nway_ci95"} and ev.metrics["nway_ci95"] == "min"


def test_nway_on_separated_classes_is_perfect_and_predict_is_chunk_invariant():
    emb, labels = labelled_points(spread=0.01)
    out = NWayKShotEvaluator(n_way=8, k_shot=2, episodes=50, retrieval=False)(emb, labels)
    assert out["nway_accuracy"] == 1.0 and out["nway_ci95"] == 0.0
    ep = sample_episodes(labels, 4, 2, 40, seed=0)
    whole = nway_predict(emb, ep.support, ep.query)
    one_by_one = np.concatenate([nway_predict(emb, ep.support[i : i + 1], ep.query[i : i + 1]) for i in range(40)])
    np.testing.assert_array_equal(whole, one_by_one)


def test_episode_sampling_properties():
    # class 5 has 2 items and class 6 one: with k_shot=2 neither may be drawn
    labels = np.array([0] * 6 + [1] * 4 + [2] * 3 + [3] * 5 + [4] * 3 + [5] * 2 + [6])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    ep = sample_episodes(labels, n_way=4, k_shot=2, episodes=2000, seed=7)
    assert ep.classes.shape == (2000, 4) and ep.support.shape == (2000, 4, 2) and ep.query.shape == (2000,)
    for e in range(2000):
        assert len(set(ep.classes[e])) == 4 and set(ep.classes[e]) <= {0, 1, 2, 3, 4}
        for way in range(4):
            assert (labels[ep.support[e, way]] == ep.classes[e, way]).all()
            assert len(set(ep.support[e, way])) == 2
        assert labels[ep.query[e]] == ep.classes[e, ep.target[e]]
        assert ep.query[e] not in ep.support[e, ep.target[e]]
    # roughly uniform: every item of a usable class is a query about equally often
    usable = np.flatnonzero(labels <= 4)
    counts = np.bincount(ep.query, minlength=len(labels))[usable]
    per_class = np.bincount(labels[usable])
    expected = 2000 / 5 / per_class[labels[usable]]  # a class is the target 1/5 of the time, items alike
    assert (np.abs(counts - expected) < 0.35 * expected).all()
    assert np.bincount(ep.target, minlength=4).min() > 400
    # reproducible from the seed, different for another seed
    again = sample_episodes(labels, n_way=4, k_shot=2, episodes=2000, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(ep, again))
    other = sample_episodes(labels, n_way=4, k_shot=2, episodes=2000, seed=8)
    assert not np.array_equal(ep.query, other.query)


def test_nway_refuses_too_few_classes():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    with pytest.raises(OptionError, match=r"only 3 classes have at least k_shot \+ 1 = 2 items.*n_way"):
        NWayKShotEvaluator(n_way=4, retrieval=False)(np.random.default_rng(0).normal(size=(7, 3)), labels)
    with pytest.raises(OptionError, match="n_way must be >= 2"):
        NWayKShotEvaluator(n_way=1)


def test_nway_with_retrieval_metrics():
    emb, labels = labelled_points()
    ev = NWayKShotEvaluator(n_way=5, episodes=100, ks=(1, 4))
    out = ev(emb, labels)
    assert set(ev.metrics) == {"nway_accuracy", "nway_ci95", "precision_at_1", "r_precision", "map_at_r"} | {
        "recall_at_1",
        "recall_at_4",
    }
    assert set(ev.metrics) <= set(out)
    from dmlkit.evaluation import retrieval_metrics

    assert out["map_at_r"] == pytest.approx(retrieval_metrics(emb, labels, ks=(1, 4))["map_at_r"])


# ====================================================================================== CLI
NEW_LOSSES = ["siamese", "triplet_network", "devise", "pddm", "softmax"]


def test_listed(cli):
    code, out, _ = cli("list", "loss", "--json")
    assert code == 0
    listed = {c["name"]: c for c in json.loads(out)["loss"]}
    assert set(NEW_LOSSES) <= set(listed)
    assert all(listed[n]["plugin"] == "reading_list" for n in NEW_LOSSES)
    code, out, _ = cli("list", "evaluator", "--json")
    assert code == 0 and "nway_kshot" in {c["name"] for c in json.loads(out)["evaluator"]}


@pytest.mark.parametrize("loss", ["siamese", "softmax", "devise", "pddm"])
def test_trains_through_the_cli(cli, tmp_path, loss):
    run = tmp_path / "r"
    code, _, err = cli("train", "--loss", loss, "--epochs", "1", "--run-dir", str(run))
    assert code == 0, err
    assert math.isfinite(json.loads((run / "results.json").read_text())["test"]["map_at_r"])


def test_nway_evaluator_in_a_run(cli, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli(
        "train",
        "--evaluator",
        "nway_kshot",
        "--evaluator-opt",
        "n_way=5",
        "--evaluator-opt",
        "episodes=200",
        "--epochs",
        "1",
        "--run-dir",
        str(run),
    )
    assert code == 0, err
    test = json.loads((run / "results.json").read_text())["test"]
    assert 0 <= test["nway_accuracy"] <= 1 and test["nway_ci95"] >= 0 and "map_at_r" in test


def test_devise_missing_file_is_one_clear_line(cli, tmp_path):
    code, _, err = cli(
        "train", "--loss", "devise", "--loss-opt", f"class_vectors={tmp_path / 'nope.npy'}", "--run-dir", str(tmp_path)
    )
    assert code != 0 and "not found" in err and "Traceback" not in err
