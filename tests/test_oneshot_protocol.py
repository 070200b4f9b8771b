"""Koch's one-shot protocol (issue 27): groups of classes in a split (Omniglot's alphabets, read
here from the folder names), episodes drawn within one group against a brute-force episode loop on
the real Omniglot, and scoring by a loss's learned similarity against a loop written here."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from dmlkit import get_registry
from dmlkit.contract import loss_similarity
from dmlkit.data import Split
from dmlkit.errors import DataError, OptionError
from dmlkit_plugins.reading_list import NWayKShotEvaluator, SiameseLoss, sample_episodes

OMNIGLOT = SHARED_DATA / "omniglot"


# ============================================================================ groups in a split
def test_split_groups_follow_subset_and_transform():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    groups = np.array(["a", "a", "a", "a", "b", "b", "b"])
    split = Split(list(range(7)), labels, class_names=["w", "x", "y", "z"], groups=groups)
    sub = split.subset(np.array([6, 2, 4, 3]))
    assert sub.groups.tolist() == ["b", "a", "b", "a"]
    assert sub.labels.tolist() == [2, 0, 1, 0] and sub.class_names == ["x", "y", "z"]
    assert split.with_transform(None).groups is split.groups
    assert Split(list(range(7)), labels).subset(np.arange(3)).groups is None
    with pytest.raises(DataError, match="7 items but 6 groups"):
        Split(list(range(7)), labels, groups=groups[:6])


@pytest.fixture(scope="module")
def omniglot():
    if not OMNIGLOT.is_dir():
        pytest.skip(f"{OMNIGLOT} not present (real Omniglot)")
    return get_registry().build("dataset", "omniglot", root=str(OMNIGLOT))


def test_omniglot_groups_are_the_alphabet_folders(omniglot):
    for split, alphabets in ((omniglot.train, 30), (omniglot.test, 20)):
        folders = np.array([Path(p).parent.parent.name for p in split.items])
        np.testing.assert_array_equal(split.groups, folders)
        assert len(np.unique(split.groups)) == alphabets
        named = np.array([name.split("/")[0] for name in split.class_names])  # "<Alphabet>/characterNN"
        np.testing.assert_array_equal(split.groups, named[split.labels])


# ============================================================== episodes within a group
def grouped_labels(seed=0):
    """12 classes in 4 groups: 'a' 4 classes, 'b' 3, 'c' 5 (one of them with too few items for k_shot=2),
    'd' 2; items shuffled."""
    sizes = {"a": [4, 5, 3, 6], "b": [3, 4, 5], "c": [4, 3, 2, 5, 3], "d": [6, 6]}
    labels, groups, c = [], [], 0
    for g, counts in sizes.items():
        for n in counts:
            labels += [c] * n
            groups += [g] * n
            c += 1
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.array(labels)[order], np.array(groups)[order]


def test_episodes_are_drawn_within_one_group_each_usable_group_alike():
    labels, groups = grouped_labels()
    ep = sample_episodes(labels, n_way=4, k_shot=2, episodes=3000, seed=5, groups=groups)
    group_of = {c: groups[labels == c][0] for c in np.unique(labels)}
    drawn = []
    for e in range(3000):
        in_groups = {group_of[c] for c in ep.classes[e]}
        assert len(in_groups) == 1 and len(set(ep.classes[e])) == 4
        drawn.append(in_groups.pop())
        for way in range(4):
            assert (labels[ep.support[e, way]] == ep.classes[e, way]).all()
        assert labels[ep.query[e]] == ep.classes[e, ep.target[e]]
        assert ep.query[e] not in ep.support[e, ep.target[e]]
    # 'b' and 'd' have fewer than 4 classes, and 'c' has 4 eligible ones (its 2-item class is never drawn)
    counts = {g: drawn.count(g) for g in "abcd"}
    assert counts["b"] == counts["d"] == 0 and 1350 < counts["a"] < 1650 and 1350 < counts["c"] < 1650
    assert 9 not in ep.classes  # c's class with 2 items (ids: a 0-3, b 4-6, c 7-11) cannot give k_shot + 1 = 3
    again = sample_episodes(labels, n_way=4, k_shot=2, episodes=3000, seed=5, groups=groups)
    assert all(np.array_equal(x, y) for x, y in zip(ep, again))


def test_within_a_group_every_class_set_is_equally_likely():
    labels, groups = grouped_labels()
    ep = sample_episodes(labels, n_way=3, k_shot=1, episodes=6000, seed=1, groups=groups)
    sets = {}
    for row in ep.classes:
        key = tuple(sorted(row))
        sets[key] = sets.get(key, 0) + 1
    # groups with >= 3 classes: a (4 sets of 3), b (1), c (10): each group 2000 episodes, its sets alike
    by_group = {"a": [], "b": [], "c": []}
    for key, n in sets.items():
        by_group["abc"[int(key[0] >= 4) + int(key[0] >= 7)]].append(n)
    assert len(by_group["a"]) == 4 and len(by_group["b"]) == 1 and len(by_group["c"]) == 10
    for g, expected in (("a", 2000 / 4), ("b", 2000), ("c", 2000 / 10)):
        assert all(abs(n - expected) < 0.25 * expected for n in by_group[g]), (g, by_group[g])


def test_episode_groups_are_checked():
    labels, groups = grouped_labels()
    with pytest.raises(OptionError, match=r"no group has n_way = 6 classes.*largest has 5.*episodes_within=all"):
        sample_episodes(labels, n_way=6, k_shot=1, episodes=10, groups=groups)
    mixed = groups.copy()
    mixed[np.flatnonzero(labels == 0)[0]] = "b"
    with pytest.raises(OptionError, match="class 0 has items in groups 'a' and 'b'; a group must hold whole classes"):
        sample_episodes(labels, n_way=2, k_shot=1, episodes=10, groups=mixed)
    with pytest.raises(OptionError, match="labels but .* groups; give one group per item"):
        sample_episodes(labels, n_way=2, k_shot=1, episodes=10, groups=groups[:-1])
    emb = np.random.default_rng(0).normal(size=(len(labels), 4))
    with pytest.raises(OptionError, match="episodes_within=groups, and the evaluated split has no groups"):
        NWayKShotEvaluator(n_way=3, episodes_within="groups", retrieval=False)(emb, labels)
    with pytest.raises(OptionError, match="episodes_within must be one of auto, groups, all"):
        NWayKShotEvaluator(episodes_within="alphabet")


def test_the_protocol_is_recorded_and_all_ignores_groups():
    labels, groups = grouped_labels()
    emb = np.random.default_rng(0).normal(size=(len(labels), 4))
    within = NWayKShotEvaluator(n_way=4, episodes=50, retrieval=False)(emb, labels, groups=groups)
    assert within["nway_within_groups"] == 1 and within["nway_groups"] == 2
    assert within["nway_protocol"].startswith("4-way 1-shot, 50 episodes each within one group (2 groups)")
    across = NWayKShotEvaluator(n_way=4, episodes=50, episodes_within="all", retrieval=False)
    out = across(emb, labels, groups=groups)
    assert out["nway_within_groups"] == 0 and "across all classes" in out["nway_protocol"]
    assert out["nway_accuracy"] == across(emb, labels)["nway_accuracy"]  # the episodes of the plain sampler
    assert all(
        np.array_equal(x, y) for x, y in zip(across.episodes_for(labels, groups), sample_episodes(labels, 4, 1, 50))
    )


def test_auto_draws_across_all_classes_with_a_warning_where_no_group_is_large_enough():
    """As on Omniglot's validation split (a quarter of the background characters: at most 18 of an
    alphabet), where 20-way episodes within an alphabet cannot be drawn."""
    labels, groups = grouped_labels()
    emb = np.random.default_rng(0).normal(size=(len(labels), 4))
    with pytest.warns(UserWarning, match="no group of the evaluated split has n_way = 6 classes"):
        out = NWayKShotEvaluator(n_way=6, episodes=50, retrieval=False)(emb, labels, groups=groups)
    across = NWayKShotEvaluator(n_way=6, episodes=50, retrieval=False, episodes_within="all")(emb, labels)
    assert out["nway_within_groups"] == 0 and out["nway_accuracy"] == across["nway_accuracy"]
    with pytest.raises(OptionError, match="no group has n_way = 6 classes"):
        NWayKShotEvaluator(n_way=6, episodes=50, retrieval=False, episodes_within="groups")(emb, labels, groups=groups)


def inverted_pixels(paths, size=28):
    """Raw pixels of Omniglot images at ``size`` x ``size``, strokes bright (1) on a dark background."""
    from PIL import Image

    return np.stack(
        [
            1 - np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), np.float64).ravel() / 255
            for p in paths
        ]
    )


def brute_force_accuracy(emb, episodes):
    """One episode at a time, in float64: the way whose support is nearest (Euclidean, L2-normalised) wins."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    correct = 0
    for e in range(len(episodes.query)):
        q = x[episodes.query[e]]
        means = [np.mean([np.linalg.norm(x[s] - q) for s in way]) for way in episodes.support[e]]
        correct += int(np.argmin(means) == episodes.target[e])
    return correct / len(episodes.query)


def test_omniglot_episodes_within_an_alphabet_and_their_gap_to_the_across_protocol(omniglot):
    """Lake's task: every 20-way episode's characters share an alphabet (read from the image paths). On
    fixed embeddings (raw pixels) it is harder than episodes across alphabets: measured 21-23 % within vs
    30-32 % across over seeds 0-4 (2,000 episodes each); the issue measured 25.4 % vs 34.7 % on its own
    pixels. The margin asserted, 4 points, is 2.6 standard errors of the difference below the smallest gap
    seen."""
    test = omniglot.test
    alphabet = np.array([Path(p).parent.parent.name for p in test.items])
    emb = inverted_pixels(test.items)
    result = {}
    for within in ("auto", "all"):
        ev = NWayKShotEvaluator(episodes=2000, seed=0, retrieval=False, episodes_within=within)
        out = ev(emb, test.labels, groups=test.groups)
        ep = ev.episodes_for(test.labels, test.groups)
        shared = [len(set(alphabet[ep.support[e].ravel()])) == 1 for e in range(2000)]
        if within == "auto":
            assert all(shared) and out["nway_within_groups"] == 1 and out["nway_groups"] == 20
        else:
            assert sum(shared) == 0 and out["nway_within_groups"] == 0  # 20 of 659 characters: never one alphabet
        assert out["nway_accuracy"] == pytest.approx(brute_force_accuracy(emb, ep), abs=1e-12)
        result[within] = out["nway_accuracy"]
    assert 0.1 < result["auto"] < result["all"] - 0.04


# ======================================================== through a run and dmlkit evaluate
def grouped_digits():
    """The digits dataset with groups: digits 0-2 / 5-7 in one group each, 3-4 / 8-9 in another."""
    from dmlkit_plugins.datasets import digits

    data = digits()
    for split, low in ((data.train, 3), (data.test, 3)):
        split.groups = np.where(split.labels < low, "first", "second")
    return data


def add_plugin(name, **hooks):
    import types

    import dmlkit
    from dmlkit.plugins import get_host

    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, dmlkit.hookimpl(fn))
    get_host().add_plugin(module, name)


def register_grouped(register):
    import dmlkit

    recommends = {"sampler": {"name": "m_per_class", "m": 16}, "train": {"val_split": "samples"}}  # as digits
    register(dmlkit.ComponentSpec("grouped_digits", grouped_digits, recommends=recommends))


def test_a_run_passes_the_groups_and_records_the_protocol(cli, tmp_path):
    add_plugin("grouped", register_datasets=register_grouped)
    run = tmp_path / "r"
    code, _, err = cli(
        "train", "--dataset", "grouped_digits", "--evaluator", "nway_kshot", "--evaluator-opt", "n_way=3",
        "--evaluator-opt", "episodes=100", "--epochs", "1", "--run-dir", str(run),
    )  # fmt: skip
    assert code == 0, err
    test = json.loads((run / "results.json").read_text())["test"]
    assert test["nway_within_groups"] == 1 and test["nway_groups"] == 1  # only 5-7 is a group of 3 test classes
    validations = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(v["val_nway_within_groups"] == 1 and v["val_nway_groups"] == 1 for v in validations)
    code, out, err = cli("evaluate", str(run), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["nway_accuracy"] == test["nway_accuracy"]
    assert shown["nway_protocol"].startswith("3-way 1-shot, 100 episodes each within one group (1 groups)")
    code, out, err = cli("evaluate", str(run), "--json", "--evaluator-opt", "episodes_within=all")
    assert code == 0, err
    assert json.loads(out)["nway_within_groups"] == 0


def test_episodes_within_groups_on_a_dataset_without_groups_is_refused_before_training(cli, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli(
        "train", "--evaluator", "nway_kshot", "--evaluator-opt", "n_way=3", "--evaluator-opt", "episodes_within=groups",
        "--run-dir", str(run),
    )  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "evaluator 'nway_kshot' (episodes_within = 'groups') needs groups of classes" in err
    assert "dataset 'digits' gives none for its train and test split" in err
    assert not (run / "metrics.jsonl").exists()


# ============================================================ scoring by a loss's similarity
def siamese_loop_accuracy(emb, episodes, alpha, bias):
    """Koch's score p = sigmoid(sum_k alpha_k |q_k - s_k| + b), one pair at a time in float64; per way the
    mean p over its support items; the highest wins (ties to the lower way)."""
    correct = 0
    for e in range(len(episodes.query)):
        q = emb[episodes.query[e]]
        means = []
        for way in episodes.support[e]:
            ps = [1 / (1 + np.exp(-(float(np.sum(alpha * np.abs(q - emb[s]))) + bias))) for s in way]
            means.append(np.mean(ps))
        correct += int(np.argmax(means) == episodes.target[e])
    return correct / len(episodes.query)


@pytest.mark.parametrize(("k_shot", "grouped"), [(1, False), (3, True)])
def test_siamese_scoring_by_its_learned_similarity_equals_a_loop(k_shot, grouped):
    torch.manual_seed(0)
    loss = SiameseLoss(embedding_size=6).double()
    with torch.no_grad():  # mostly negative, as training makes it, with a positive weight no distance has
        loss.alpha.copy_(torch.tensor([-1.5, -0.8, 0.6, -1.2, -0.3, 0.9]))
    alpha, bias = loss.alpha.detach().numpy(), float(loss.bias.detach())
    labels, groups = grouped_labels()
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(14, 6))[labels] + 0.8 * rng.normal(size=(len(labels), 6))  # float64
    ev = NWayKShotEvaluator(n_way=3, k_shot=k_shot, episodes=400, seed=2, retrieval=False, scoring="similarity")
    out = ev(emb, labels, groups=groups if grouped else None, similarity=loss_similarity(loss))
    expected = siamese_loop_accuracy(emb, ev.episodes_for(labels, groups if grouped else None), alpha, bias)
    assert 0.4 < expected < 1.0
    assert out["nway_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert "scored by the loss's learned similarity" in out["nway_protocol"]
    by_distance = NWayKShotEvaluator(n_way=3, k_shot=k_shot, episodes=400, seed=2, retrieval=False)
    assert by_distance(emb, labels, groups=groups if grouped else None)["nway_accuracy"] != expected


def test_scoring_by_similarity_needs_it():
    labels, _ = grouped_labels()
    emb = np.zeros((len(labels), 3))
    with pytest.raises(OptionError, match="scoring=similarity needs the run's loss similarity"):
        NWayKShotEvaluator(n_way=3, scoring="similarity", retrieval=False)(emb, labels)
    with pytest.raises(OptionError, match="scoring must be one of distance, similarity"):
        NWayKShotEvaluator(scoring="siamese")
    assert loss_similarity(torch.nn.Linear(2, 2)) is None


def test_a_loss_without_similarity_is_refused_before_data_loads(cli, tmp_path):
    loaded = []

    def register(register):
        import dmlkit

        register(dmlkit.ComponentSpec("watched", lambda: loaded.append(1) or grouped_digits()))

    add_plugin("watched", register_datasets=register)
    code, _, err = cli(
        "train", "--dataset", "watched", "--loss", "contrastive", "--evaluator", "nway_kshot",
        "--evaluator-opt", "scoring=similarity", "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code != 0 and "Traceback" not in err and not loaded
    assert "evaluator 'nway_kshot' (scoring = 'similarity') scores with the loss's learned similarity" in err
    assert "loss 'contrastive' has none" in err


def test_a_siamese_run_scores_its_episodes_with_its_learned_similarity(cli, tmp_path):
    from dmlkit.train import load_run

    run = tmp_path / "r"
    code, _, err = cli(
        "train", "--loss", "siamese", "--evaluator", "nway_kshot", "--evaluator-opt", "n_way=4",
        "--evaluator-opt", "episodes=300", "--evaluator-opt", "scoring=similarity", "--epochs", "1",
        "--run-dir", str(run),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    trainer = load_run(run, "best")
    emb, labels = trainer.embed(trainer.test_split)
    alpha, bias = trainer.loss.alpha.detach().double().numpy(), float(trainer.loss.bias.detach())
    ev = NWayKShotEvaluator(n_way=4, episodes=300)
    expected = siamese_loop_accuracy(emb.astype(np.float64), ev.episodes_for(labels), alpha, bias)
    assert abs(results["test"]["nway_accuracy"] - expected) <= 1 / 300  # float32 in the run: one near-tie at most
    code, out, err = cli("evaluate", str(run), "--json")
    assert code == 0, err
    assert json.loads(out)["nway_accuracy"] == results["test"]["nway_accuracy"]
