"""The ``two_views`` sampler and ``self_supervised`` in ``dmlkit train``: batches ``b + b`` (checked
by brute force), real digits runs whose captured batches hold two different augmentations of the
same images (checked against scikit-learn's raw digits), their loss against PML 2.9's
SelfSupervisedLoss(NTXentLoss), the feature cache's two views, and the refusals before any work."""

import numpy as np
import pytest
import torch

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.features import occurrence
from dmlkit.testing import check_plugin
from dmlkit.train import Trainer
from dmlkit_plugins import samplers
from dmlkit_plugins.samplers import TwoViewsSampler
from dmlkit_plugins.wrappers import SelfSupervisedLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")

LABELS = np.repeat(np.arange(5), 20)  # 5 classes of 20 items


def two_views(batch_size=16, labels=LABELS, **options):
    return dmlkit.build("sampler", "two_views", labels=labels, batch_size=batch_size, **options)


def epoch(sampler, e=1):
    sampler.set_epoch(e)
    return list(sampler)


def halves(batch):
    n = len(batch) // 2
    return batch[:n], batch[n:]


def test_every_batch_is_n_distinct_images_then_the_same_again_and_an_epoch_shows_each_image_once():
    sampler = two_views(16)
    batches = epoch(sampler)
    assert len(batches) == len(sampler) == 100 // 8
    for batch in batches:
        first, second = halves(batch)
        assert len(batch) == 16 and first == second and len(set(first)) == 8
    shown = [i for batch in batches for i in halves(batch)[0]]
    assert len(shown) == len(set(shown)) == 96  # every image at most once, the last 100 mod 8 dropped


def test_batches_are_drawn_from_seed_and_epoch():
    assert epoch(two_views(seed=3), 2) == epoch(two_views(seed=3), 2)
    assert epoch(two_views(seed=3), 2) != epoch(two_views(seed=3), 3)
    assert epoch(two_views(seed=3), 2) != epoch(two_views(seed=4), 2)


def test_the_base_sampler_keeps_its_class_structure():
    """m_per_class as the base: batch_size / 2 / m distinct classes of m distinct images, each twice, over
    epochs whose class cycles do not split evenly into batches (5 classes, 2 per batch)."""
    sampler = two_views(16, base="m_per_class", base_options={"m": 4})
    for e in range(1, 6):
        for batch in epoch(sampler, e):
            first, second = halves(batch)
            assert first == second and len(set(first)) == 8
            classes, counts = np.unique(LABELS[first], return_counts=True)
            assert len(classes) == 2 and counts.tolist() == [4, 4]
            for c in classes:  # the m images of a class are its own, consecutive, as m_per_class lays them out
                rows = [i for i, label in enumerate(LABELS[first]) if label == c]
                assert rows == list(range(rows[0], rows[0] + 4))


def test_ranks_share_the_single_process_batches():
    single = epoch(two_views(16))
    shares = [epoch(two_views(16, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(single) // 2
    assert shares[0] == single[0 : 2 * len(shares[0]) : 2] and shares[1] == single[1 : 2 * len(shares[1]) : 2]


def test_the_sampler_passes_check_plugin():
    report = check_plugin(samplers, name="copy_of_samplers", with_builtins=False)
    assert "two_views" in report.components["sampler"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 15}, "even batch_size of at least 4"),
        ({"batch_size": 2}, "even batch_size of at least 4"),
        ({"base": "two_views"}, "gives views itself"),
        ({"base_options": {"batch_size": 8}}, "cannot set 'batch_size'"),
        ({"base": "m_per_class", "base_options": {"m": 3}}, r"base 'm_per_class', given batch_size 8 .*multiple of m"),
        ({"base": "m_per_class", "base_options": {"mm": 2}}, "mm"),
        ({"base": "randon"}, "random"),
    ],
)
def test_bad_two_views_options_are_refused(options, message):
    with pytest.raises(dmlkit.DmlkitError, match=message):
        two_views(**options)


def test_a_base_whose_classes_are_smaller_than_m_is_refused():
    labels = np.r_[np.repeat(np.arange(4), 8), [4, 4]]  # class 4 has 2 images
    with pytest.raises(OptionError, match="a class with 2 images < m = 4"):
        two_views(16, labels=labels, base="m_per_class", base_options={"m": 4})


def test_occurrence_counts_earlier_equal_entries():
    idx = torch.tensor([5, 3, 5, 5, 0, 3, 9])
    expected = [sum(int(j) == int(i) for j in idx[:k]) for k, i in enumerate(idx)]
    assert occurrence(idx).tolist() == expected


# ----------------------------------------------------------------------------------- training runs
@pytest.fixture
def capture(monkeypatch):
    """Records each training step's (trainer, inputs, labels, the batch's indices) and each
    self_supervised call's (embeddings, labels, value)."""
    steps, calls = [], []
    step, forward, iterate = Trainer.train_step, SelfSupervisedLoss.forward, TwoViewsSampler.__iter__
    drawn = []

    def batches(self):
        for batch in iterate(self):
            drawn.append(batch)
            yield batch

    def train_step(self, x, y):
        steps.append((self, x.clone(), y.clone(), drawn[-1] if drawn else None))
        return step(self, x, y)

    def loss_forward(self, emb, labels, *args, **kwargs):
        value = forward(self, emb, labels, *args, **kwargs)
        calls.append((emb.detach().clone(), labels.clone(), value.detach().clone()))
        return value

    monkeypatch.setattr(TwoViewsSampler, "__iter__", batches)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(SelfSupervisedLoss, "forward", loss_forward)
    return steps, calls


def shifts(image):
    """The 9 images a shift of -1..1 pixels in each direction makes of an 8x8 digit (background -1)."""
    padded = np.pad(image, 1, constant_values=-1.0)
    return [padded[i : i + 8, j : j + 8] for i in range(3) for j in range(3)]


def test_self_supervised_trains_on_two_augmented_views_of_the_same_digits(cli, capture, tmp_path):
    from sklearn.datasets import load_digits

    code, out, err = cli("train", "--loss", "self_supervised", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert 'sampler.name="two_views"' in out and "dataset.augment=true" in out  # recommended, and shown
    steps, _ = capture
    raw = load_digits()
    train_images = raw.images[raw.target < 5] / 8.0 - 1.0  # the digits dataset's training split, in order
    trainer, x, y, batch = steps[0]
    n = len(y) // 2
    assert len(y) == 64 and torch.equal(y[:n], y[n:])
    held_out = trainer.train_index  # the training split's positions in the dataset's (validation held out)
    held_out = np.arange(len(train_images)) if held_out is None else held_out
    differ = 0
    for row in range(n):
        image = train_images[held_out[batch[row]]]
        a, b = x[row, 0].numpy(), x[row + n, 0].numpy()
        assert any(np.array_equal(a, s) for s in shifts(image)) and any(np.array_equal(b, s) for s in shifts(image))
        differ += not np.array_equal(a, b)
    assert differ >= n // 2  # two independent shifts of 9 coincide for about 1 image in 9


def test_without_augmentation_the_two_views_are_equal_and_a_warning_says_so(cli, capture, tmp_path):
    code, out, err = cli(
        "train", "--loss", "self_supervised", "--dataset-opt", "augment=false", "--epochs", "1",
        "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    assert "two views of each image are identical" in " ".join(out.split())
    _, x, y, _ = capture[0][0]
    n = len(y) // 2
    assert torch.equal(x[:n], x[n:]) and torch.equal(y[:n], y[n:])


def test_the_loss_of_a_captured_batch_equals_pml(cli, capture, tmp_path):
    code, _, err = cli("train", "--loss", "self_supervised", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    temperature = dmlkit.get_registry().get("loss", "ntxent").resolved_defaults()["temperature"]
    for emb, labels, value in capture[1][:3]:
        n = len(labels) // 2
        z = emb.double()
        ours = SelfSupervisedLoss(z.shape[1])(z, labels)
        theirs = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=temperature))(z[:n], z[n:])
        assert float(ours) == pytest.approx(float(theirs), rel=1e-9) and float(theirs) > 0
        assert float(value) == pytest.approx(float(theirs), rel=1e-4)  # the run's own float32 value


def test_self_supervised_with_a_one_view_sampler_is_refused_before_any_work(cli, monkeypatch, tmp_path):
    import dmlkit.components

    monkeypatch.setattr(dmlkit.components, "Parts", lambda *a: pytest.fail("the run was built"))
    run = tmp_path / "r"
    for extra in ([], ["--dry-run"]):
        code, _, err = cli("train", "--loss", "self_supervised", "--sampler", "m_per_class", "--sampler-opt", "m=16",
                           "--epochs", "1", "--run-dir", str(run), *extra)  # fmt: skip
        text = " ".join(err.split())
        assert code != 0 and "needs each batch as 2 views of the same images" in text
        assert "sampler 'm_per_class' gives each image once; use --sampler two_views" in text
        assert "--sampler-opt base=m_per_class" in text and not run.exists()


# ---------------------------------------------------------------------------------- feature cache
FROZEN = ["--set", "freeze_backbone=true", "--set", "feature_cache=true"]


@pytest.mark.parametrize("views", [2, 3])
def test_the_two_copies_of_an_image_take_two_different_cached_views(cli, capture, tmp_path, views):
    code, _, err = cli(
        "train", "--loss", "self_supervised", *FROZEN, "--set", f"cache_views={views}",
        "--set", f"cache_dir={tmp_path / 'cache'}", "--epochs", "2", "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    steps = capture[0]
    trainer = steps[0][0]
    cached = trainer.features.train_views()  # [views, N, F]
    # an image whose cached views coincide (equal shifts, about 1 in 9) cannot tell which view a row took
    distinct = [all(not torch.equal(cached[v, i], cached[w, i]) for v in range(views) for w in range(v)) for i in
                range(cached.shape[1])]  # fmt: skip
    assert sum(distinct) > 0.5 * len(distinct)
    used = set()
    for _, x, y, batch in steps:
        n = len(y) // 2
        for row in range(n):
            i = batch[row]
            if not distinct[i]:
                continue
            match = [[v for v in range(views) if torch.equal(x[r], cached[v, i])] for r in (row, row + n)]
            assert len(match[0]) == len(match[1]) == 1 and match[0] != match[1]
            used.add((match[0][0], match[1][0]))
    assert len(used) == views * (views - 1)  # every ordered pair of views comes up


def test_two_views_with_one_cached_view_is_refused_before_any_image_is_embedded(cli, monkeypatch, tmp_path):
    from dmlkit.features import FeatureCache

    monkeypatch.setattr(FeatureCache, "__init__", lambda *a: pytest.fail("the feature cache was started"))
    code, _, err = cli(
        "train", "--loss", "self_supervised", *FROZEN, "--set", f"cache_dir={tmp_path / 'cache'}",
        "--epochs", "1", "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    text = " ".join(err.split())
    assert code != 0 and "sampler 'two_views' gives 2 copies of each image" in text
    assert "set train.cache_views >= 2" in text and not (tmp_path / "cache").exists()
