"""Model selection: the epoch is chosen on validation data, never silently on the test set."""

import json

import numpy as np
import pytest

import dmlkit
from dmlkit import get_registry
from dmlkit.checkpoint import load as load_checkpoint


class Scripted:
    """A constructed evaluator: its MAP@R follows a script per split, told apart by their sizes.

    Validation peaks at epoch 2, test at epoch 3, so the two selections must differ.
    """

    metrics = {"map_at_r": "max", "precision_at_1": "max", "spread": "min"}
    script = {"val": [0.1, 0.5, 0.9, 0.7, 0.6], "test": [0.1, 0.2, 0.3, 0.9, 0.4]}

    def __init__(self, test_size: int = 896):
        self.test_size, self.calls = test_size, {"val": 0, "test": 0}

    def __call__(self, embeddings, labels, query_mask=None, gallery_mask=None):
        split = "test" if len(labels) == self.test_size else "val"
        value = self.script[split][min(self.calls[split], 4)]
        self.calls[split] += 1
        return {"map_at_r": value, "precision_at_1": value, "spread": float(np.std(embeddings))}


@pytest.fixture
def scripted():
    get_registry().add("evaluator", dmlkit.ComponentSpec("scripted", Scripted), plugin="test")


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def results(run):
    return json.loads((run / "results.json").read_text())


def test_best_epoch_is_the_validation_argmax_not_the_test_argmax(scripted, cli, tmp_path):
    run = tmp_path / "val"
    base = ["--evaluator", "scripted", "--epochs", "4", "--set", "test_every_epoch=true", "--set", "eval_at_start=true"]
    code, out, err = cli("train", *base, "--run-dir", str(run))
    assert code == 0, err
    history = rows(run)
    val_best = max(history, key=lambda r: r["val_map_at_r"])["epoch"]
    test_best = max(history, key=lambda r: r["map_at_r"])["epoch"]
    assert (val_best, test_best) == (2, 3)  # epoch 0 is the untrained model
    assert load_checkpoint(run / "best.pt")["epoch"] == 2 == results(run)["best_epoch"]
    assert results(run)["selected_by"] == "best by validation map_at_r"
    assert "epoch 2 chosen (best by validation map_at_r = 0.9000)" in out
    # the test set chooses only when asked, loudly
    biased = tmp_path / "biased"
    code, out, err = cli("train", *base, "--set", "selection=test_set_biased", "--run-dir", str(biased))
    assert code == 0, err
    assert load_checkpoint(biased / "best.pt")["epoch"] == 3
    assert out.count("TEST set") >= 2 and results(biased)["selection_split"] == "test"


def test_a_metric_where_lower_is_better_picks_the_minimum(scripted, cli, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli("train", "--evaluator", "scripted", "--epochs", "3", "--set", "best_metric=spread",
                       "--run-dir", str(run))  # fmt: skip
    assert code == 0, err
    history = rows(run)
    assert results(run)["best_epoch"] == min(history, key=lambda r: r["val_spread"])["epoch"]


def test_best_metric_loss_picks_the_lowest_training_loss(cli, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli("train", "--epochs", "3", "--lr", "0.05", "--set", "best_metric=loss", "--run-dir", str(run))
    assert code == 0, err
    history = rows(run)
    losses = [r["loss"] for r in history]
    assert len(set(losses)) == 3
    assert results(run)["best_epoch"] == min(history, key=lambda r: r["loss"])["epoch"]
    assert load_checkpoint(run / "best.pt")["best"]["mode"] == "min"


def test_an_unknown_metric_fails_before_any_data_loads(scripted, cli, tmp_path):
    # cub200 at a folder that does not exist: the metric error must come first
    args = ["--dataset", "cub200", "--data-root", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r")]
    code, _, err = cli("train", *args, "--set", "best_metric=recall_at_3")
    assert code == 1 and "'recall_at_3' is not a metric of evaluator 'retrieval'" in err and "map_at_r" in err
    code, _, err = cli("train", *args, "--evaluator", "scripted", "--loss", "ccp", "--loss-opt", "metric=r_precision")
    assert code == 1 and "option metric = 'r_precision' is not a metric of evaluator 'scripted'" in err
    assert not (tmp_path / "r").exists()


def test_without_validation_the_best_epoch_is_the_last(cli, tmp_path):
    run = tmp_path / "r"
    code, out, err = cli("train", "--epochs", "2", "--set", "val_fraction=0", "--run-dir", str(run))
    assert code == 0, err
    assert "no validation: best = last epoch" in out
    assert results(run)["best_epoch"] == 2 and results(run)["selection_split"] == "last"
    assert all("map_at_r" not in r and "val_map_at_r" not in r for r in rows(run))  # the test set is read once


def test_a_degenerate_validation_split_warns(cli, tmp_path):
    # digits has 5 training classes: a fifth of them is one class, where MAP@R is 1 whatever the model
    code, out, err = cli("train", "--epochs", "1", "--set", "val_split=classes", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "the validation split holds 1 class" in out and "val_split=samples" in out


def test_a_constant_validation_metric_warns(scripted, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(Scripted, "script", {"val": [0.5] * 5, "test": [0.1] * 5})
    code, out, err = cli("train", "--evaluator", "scripted", "--epochs", "3", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "val_map_at_r is 0.5000 at every validation so far" in out


def test_folds_alone_take_the_place_of_the_default_validation_fraction():
    from dmlkit.config import resolve

    for train in ({"folds": 4, "fold": 1}, {"folds": 4, "fold": 1, "val_fraction": 0.3}):
        cfg, _ = resolve({"train": train}, get_registry())
        assert cfg["train"]["val_fraction"] == 0.0 and cfg["train"]["folds"] == 4
