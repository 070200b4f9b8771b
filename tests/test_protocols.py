"""The papers' protocols by name (CCP's preset), the dry run that shows where every setting comes
from, early stopping, and ccp-dml's weight decay and clipping order (issue 27)."""

import copy
import json
import re

import pytest
import torch
from conftest import SHARED_DATA

from dmlkit.config import resolve
from dmlkit.errors import OptionError
from dmlkit.plugins import get_host

CUB = SHARED_DATA / "CUB_200_2011"


def ccp_config(dataset: str, base: str = "contrastive", **loss) -> dict:
    cfg, _ = resolve({"dataset": {"name": dataset}, "loss": {"name": "ccp", "base": base, **loss}}, get_host().registry)
    return cfg


@pytest.mark.parametrize(
    "dataset, base, expected, k, rounds, steps",
    [
        ("cub200", "contrastive", {"pos_margin": 0.0, "neg_margin": 0.3841}, 8, 12, 25),
        ("cars196", "contrastive", {"pos_margin": 0.2652, "neg_margin": 0.5409}, 8, 12, 25),
        ("sop", "contrastive", {"pos_margin": 0.2858, "neg_margin": 0.5130}, 4, 7, 250),
        ("inshop", "contrastive", {"pos_margin": 0.2858, "neg_margin": 0.5130}, 4, 7, 250),
        ("cub200", "triplet", {"margin": 0.0961}, 8, 12, 25),
        ("cars196", "triplet", {"margin": 0.1190}, 8, 12, 25),
        ("sop", "triplet", {"margin": 0.0451}, 4, 7, 250),
        ("cub200", "multi_similarity", {"alpha": 2.0, "beta": 40.0, "base": 0.5}, 8, 12, 25),
        ("sop", "ms", {"alpha": 2.0, "beta": 40.0, "base": 0.5}, 4, 7, 250),
        ("cars196", "multi_similarity", {"alpha": 14.35, "beta": 75.83, "base": 0.66}, 8, 12, 25),
        ("inshop", "multi_similarity", {"alpha": 8.49, "beta": 57.38, "base": 0.41}, 4, 7, 250),
    ],
)
def test_ccp_paper_preset_gives_the_supplements_settings_per_dataset(dataset, base, expected, k, rounds, steps):
    """The values of the CCP supplement (not ccp-dml's code defaults), and the paper's run protocol."""
    cfg = ccp_config(dataset, base)
    loss, train, sampler = cfg["loss"], cfg["train"], cfg["sampler"]
    assert loss["base_options"] == expected
    assert (loss["proxies_per_class"], loss["pool_rounds"], sampler["batches_per_epoch"]) == (k, rounds, steps)
    assert (train["optimizer"], train["lr"], train["scheduler"], train["batch_size"], sampler["m"]) == (
        "adam", 1e-5, "none", 32, 4,
    )  # fmt: skip
    assert (train["embedding_size"], train["patience"], train["min_delta"], train["val_every_steps"]) == (
        128,
        60,
        1e-5,
        0,
    )
    assert train["weight_decay_before_clip"] and not train["weight_decay_norms"] and train["grad_clip_value"] == 10
    assert loss["keep_optimizer_state"] and train["freeze_bn"] and not train["normalize_embeddings"]


def test_ccp_presets_elsewhere():
    # a dataset the paper did not use: dmlkit's lighter recommendation, ccp-dml's code defaults for the base
    cfg = ccp_config("digits")
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["val_every_steps"] == 25 and cfg["loss"]["base_options"] is None
    with pytest.raises(OptionError, match="preset=paper has the paper's settings for cub200, cars196, sop, inshop"):
        ccp_config("digits", preset="paper")
    cfg = ccp_config("cub200", preset="none")  # opting out on a paper dataset
    assert cfg["train"]["lr"] == 1e-3 and cfg["loss"]["base_options"] is None
    # the user's own settings win, per key
    cfg, _ = resolve(
        {"dataset": {"name": "cub200"}, "train": {"lr": 3e-5},
         "loss": {"name": "ccp", "base_options": {"neg_margin": 0.5}}}, get_host().registry,
    )  # fmt: skip
    assert cfg["train"]["lr"] == 3e-5 and cfg["loss"]["base_options"] == {"pos_margin": 0.0, "neg_margin": 0.5}


@pytest.mark.skipif(not CUB.is_dir(), reason="needs ../shared/data/CUB_200_2011")
def test_dry_run_shows_each_setting_with_its_source_and_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text("[train]\nseed = 7\n")
    code, out, err = cli(
        "train", "--loss", "ccp", "--dataset", "cub200", "--data-root", str(CUB), "--config", "run.toml",
        "--batch-size", "48", "--run-dir", "runs/ccp", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"│ (\S+)\s+│ (.+?)\s+│ (.+?)\s+│", out)}
    assert rows["loss.base_options.pos_margin"] == ("0.0", "recommended by loss 'ccp'")
    assert rows["loss.base_options.neg_margin"] == ("0.3841", "recommended by loss 'ccp'")
    assert rows["train.lr"] == ("1e-05", "recommended by loss 'ccp'")
    assert rows["train.batch_size"] == ("48", "command line")
    assert rows["train.seed"] == ("7", "config file run.toml")
    assert rows["train.pooling"] == ('"avg"', "default")
    assert re.search(r"dataset 'cub200': [\d,]+ training items of 44 classes, 2,474 test items of 42 classes", out)
    assert "validation: 14 held-out training classes" in out and "evaluator 'retrieval': built" in out
    assert list(tmp_path.iterdir()) == [tmp_path / "run.toml"]  # no run directory, nothing written


def test_dry_run_of_a_bad_config_is_one_line(cli, tmp_path):
    code, _, err = cli("train", "--loss", "ccp", "--loss-opt", "preset=paper", "--dry-run")
    assert code == 1 and "preset=paper has the paper's settings" in err


# -- early stopping -------------------------------------------------------------------------------------
def test_patience_counts_evaluated_epochs_without_a_gain_above_min_delta():
    from dmlkit.selection import Selection
    from dmlkit.settings import Settings

    class Evaluator:
        metrics = {"map_at_r": "max"}

    sel = Selection(Settings({"patience": 2, "min_delta": 0.01}), Evaluator(), True)
    stops = []
    for epoch, value in enumerate([0.50, 0.60, 0.605, 0.608, 0.63, 0.625, 0.635], start=1):
        sel.observe({"epoch": epoch, "val_map_at_r": value})
        stops.append(sel.stop())
    # 0.605 and 0.608 gain 0.005 and 0.008 over 0.60 (not more than min_delta): two stale epochs -> stop after
    # epoch 4; 0.63 resets; 0.635 gains only 0.005 over 0.63, yet it is the best epoch
    assert stops == [False, False, False, True, False, False, True]
    assert sel.best["epoch"] == 7 and sel.best["value"] == 0.635


def test_a_run_stops_early_resumes_with_its_count_and_tests_the_best_epoch(cli, tmp_path):
    run = tmp_path / "r"
    code, out, err = cli("train", "--epochs", "30", "--set", "patience=1", "--lr", "0.05", "--run-dir", str(run))
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r["val_map_at_r"] for r in rows]
    # the first epoch whose value is not above the last improvement ends the run
    stop = next(i for i in range(1, len(values)) if values[i] <= max(values[:i]))
    assert len(rows) == stop + 1 < 30 and "early stop after epoch" in out
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == values.index(max(values)) + 1
    # resuming a stopped run does not train on: its patience is replayed from the log
    code, out, _ = cli("train", "--resume", str(run), "--epochs", "40")
    assert code == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == len(rows)


# -- ccp-dml's weight decay and clipping ------------------------------------------------------------------
def test_weight_decay_before_clipping_without_norm_layers_equals_a_manual_step(tmp_path):
    """One step with weight_decay_before_clip, weight_decay_norms=false, grad_clip and grad_clip_value
    equals: g += wd * w for the network's non-norm weights, clip the global norm, clip each value, SGD."""
    from dmlkit.components import norm_parameters
    from dmlkit.train import Trainer

    settings = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.05, "weight_decay_before_clip": True,
                "weight_decay_norms": False, "grad_clip": 0.5, "grad_clip_value": 0.002, "device": "cpu"}  # fmt: skip
    cfg, _ = resolve({"train": settings}, get_host().registry)
    trainer = Trainer(cfg, get_host().registry, tmp_path / "r")
    model, loss = copy.deepcopy(trainer.model), copy.deepcopy(trainer.loss)
    x, y = next(iter(trainer.loader(trainer.train_split)))
    torch.manual_seed(0)
    value = loss(model(x), y)
    value.backward()
    norms = {id(p) for p in norm_parameters(model)}
    params = [p for p in [*model.parameters(), *loss.parameters()] if p.grad is not None]
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None and id(p) not in norms:
                p.grad += 0.05 * p
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        torch.nn.utils.clip_grad_value_(params, 0.002)
        expected = [p - 0.1 * p.grad for p in model.parameters()]
    torch.manual_seed(0)
    trainer.train_step(x, y)
    for p, e in zip(trainer.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    groups = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert (
        groups["backbone"] == groups["head"] == 0.0 and groups["loss.bank.vectors"] == 0.05
    )  # proxies: in the optimizer
    assert groups.get("backbone.norms", 0.0) == 0.0


def test_default_weight_decay_is_the_optimizers_on_every_group(tmp_path):
    from dmlkit.train import Trainer

    cfg, _ = resolve({"train": {"weight_decay": 0.01}}, get_host().registry)
    trainer = Trainer(cfg, get_host().registry, tmp_path / "r")
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.01} and not trainer._decayed


# -- CCP: one kind of validation, optimizer state -------------------------------------------------------
def test_ccp_plateau_counts_only_the_periodic_validations_when_they_are_set():
    from dmlkit.settings import Settings
    from dmlkit.testing import stub_run

    cfg = ccp_config("digits")
    opts = {k: v for k, v in cfg["loss"].items() if k != "name"}
    loss = get_host().registry.build("loss", "ccp", context={"num_classes": 4, "embedding_size": 4}, **opts)
    run = stub_run()
    object.__getattribute__(run, "_trainer").settings = Settings({"val_every_steps": 25})
    for step, value in [(25, 0.5), (30, 0.1), (40, 0.1), (50, 0.4), (75, 0.4)]:  # 30 and 40: epoch-end ones
        loss.on_validation_end(run, {"val_map_at_r": value, "step": step})
    assert loss.state["bad"] == 2 and loss.state["best"] == 0.5


def test_a_bank_keeps_or_drops_the_optimizer_state_of_reinitialised_proxies():
    from dmlkit.proxies import ProxyBank

    for keep in (False, True):
        bank = ProxyBank(3, 2, 4)
        opt = torch.optim.Adam(bank.parameters(), lr=0.1)
        bank.vectors.sum().backward()
        opt.step()
        before = opt.state[bank.vectors]["exp_avg"].clone()
        bank.assign(torch.zeros(3, 2, 4), opt, keep_optimizer_state=keep)
        assert torch.equal(bank.vectors.detach(), torch.zeros(3, 2, 4))
        state = opt.state[bank.vectors]
        assert torch.equal(state["exp_avg"], before) if keep else state == {}
