"""Loss composition (GDT: a classification and a metric objective): --loss "triplet+0.5*softmax"."""

import json

import pytest
import torch

from dmlkit import get_registry
from dmlkit.config import parse_combination, resolve
from dmlkit.errors import DmlkitError, OptionError


def test_the_combined_loss_is_the_weighted_sum_of_its_terms_each_with_its_options_and_miner():
    reg = get_registry()
    loss = reg.build(
        "loss", "combined", context={"num_classes": 3, "embedding_size": 6},
        terms=["triplet", "softmax"], weights=[1.0, 0.5], triplet={"margin": 0.1, "miner": "semihard"},
    )  # fmt: skip
    emb, labels = torch.randn(12, 6, requires_grad=True), torch.arange(12) % 3
    triplet = reg.build("loss", "triplet", margin=0.1)
    mined = reg.build("miner", "semihard")(emb, labels)
    softmax = loss.terms[1]  # its classifier is the combined loss's own parameter
    expected = triplet(emb, labels, indices=mined) + 0.5 * softmax(emb, labels)
    got = loss(emb, labels)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert set(loss.last_terms) == {"triplet", "softmax"}
    got.backward()
    assert softmax.bank.vectors.grad is not None and emb.grad is not None


def test_the_shorthand_and_its_errors():
    assert parse_combination("triplet+0.5*softmax") == {
        "name": "combined", "terms": ["triplet", "softmax"], "weights": [1.0, 0.5],
    }  # fmt: skip
    for name, message in (
        ("triplet+x*softmax", "is not a weight"),
        ("triplet+", "has no loss name"),
        ("triplet+sofmax", "unknown loss 'sofmax'"),
        ("triplet+triplet", "may appear once"),
    ):
        with pytest.raises(DmlkitError, match=message):
            resolve({"loss": {"name": name}}, get_registry())
    with pytest.raises(OptionError, match="combined has no term 'contrastive'"):
        resolve({"loss": {"name": "triplet+softmax", "contrastive": {"margin": 1}}}, get_registry())
    with pytest.raises(OptionError, match="has no option 'margn'"):
        resolve({"loss": {"name": "triplet+softmax", "triplet": {"margn": 1}}}, get_registry())


def test_a_combined_run_trains_and_logs_each_term(cli, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli(
        "train", "--loss", "triplet+0.5*softmax", "--loss-opt", "triplet.margin=0.1", "--epochs", "2",
        "--run-dir", str(run),
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        terms = r["loss_terms"]
        assert set(terms) == {"triplet", "softmax"}
        assert r["loss"] == pytest.approx(terms["triplet"] + 0.5 * terms["softmax"], rel=1e-5)
    assert rows[1]["loss_terms"]["softmax"] < rows[0]["loss_terms"]["softmax"]


def test_training_events_reach_the_terms(tmp_path):
    """CCP as a term of a combination still initialises its proxies and keeps its schedule."""
    from dmlkit.train import Trainer

    cfg, _ = resolve(
        {"loss": {"name": "ccp+softmax", "ccp": {"proxies_per_class": 2, "pool_rounds": 3}}, "train": {"epochs": 1}},
        get_registry(),
    )
    trainer = Trainer(cfg, get_registry(), tmp_path)
    ccp = trainer.loss.terms[0]
    before = ccp.proxy_bank.vectors.detach().clone()
    trainer.emit("on_train_start")
    assert ccp.state["instance"] == 1 and not torch.equal(before, ccp.proxy_bank.vectors.detach())
