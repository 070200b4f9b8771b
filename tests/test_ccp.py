"""CCP: greedy k-center against brute force, the proximal term, and a plateau-driven run on digits."""

import json
from types import SimpleNamespace

import pytest
import torch

from dmlkit import get_registry
from dmlkit_plugins.ccp import CCPLoss, unit_ball
from dmlkit_plugins.proxies import greedy_kcenter


def brute_kcenter(pool, previous, k):
    """One class at a time, one point at a time."""
    picks = []
    for c in range(pool.shape[0]):
        seeds = [torch.zeros(pool.shape[2])] if previous is None else list(previous[c])
        chosen = []
        for _ in range(k):
            best, best_d = None, -1.0
            for i in range(pool.shape[1]):
                d = min(float(((pool[c, i] - s) ** 2).sum()) for s in seeds + chosen)
                if d > best_d:
                    best, best_d = i, d
            chosen.append(pool[c, best])
        picks.append(torch.stack(chosen))
    return torch.stack(picks)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_previous", [False, True])
def test_kcenter_matches_brute_force(seed, with_previous):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(6, 9, 5, generator=g, dtype=torch.float64)
    previous = torch.randn(6, 3, 5, generator=g, dtype=torch.float64) if with_previous else None
    picks, gaps = greedy_kcenter(pool, previous, 4)
    torch.testing.assert_close(picks, brute_kcenter(pool, previous, 4))
    assert (gaps[:, :-1] >= gaps[:, 1:] - 1e-12).all()  # farthest-first: non-increasing gaps


def test_first_pick_without_previous_is_the_largest_norm():
    pool = torch.tensor([[[0.1, 0.0], [3.0, 0.0], [0.0, 1.0]]])
    picks, _ = greedy_kcenter(pool, None, 1)
    assert picks[0, 0].tolist() == [3.0, 0.0]


def test_previous_proxies_steer_the_picks_away():
    pool = torch.tensor([[[1.0, 0.0], [1.1, 0.0], [-1.0, 0.0]]])
    previous = torch.tensor([[[1.0, 0.0]]])  # the class already has a proxy at (1, 0)
    picks, _ = greedy_kcenter(pool, previous, 1)
    assert picks[0, 0].tolist() == [-1.0, 0.0]


def test_unit_ball_projection():
    v = torch.tensor([[0.3, 0.4], [3.0, 4.0]])
    torch.testing.assert_close(unit_ball(v), torch.tensor([[0.3, 0.4], [0.6, 0.8]]))


def test_loss_is_batch_term_plus_proxy_term_of_the_base_loss():
    loss = CCPLoss(num_classes=3, embedding_size=4, base="contrastive_cosine", proxies_per_class=2, pool_rounds=4)
    base = get_registry().build("loss", "contrastive_cosine")
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(9, 4, generator=g) * 2, torch.arange(9) % 3
    x = unit_ball(emb)
    p = unit_ball(loss.proxies.detach().reshape(-1, 4))
    expected = 0.1 * base(x, labels) + 1.0 * base(x, labels, p, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert float(loss(emb, labels).detach()) == pytest.approx(float(expected), abs=1e-6)


def test_proximal_term_changes_gradients_by_exactly_lambda_times_the_offset():
    model = torch.nn.Linear(4, 3)
    loss = CCPLoss(num_classes=2, embedding_size=3, lam=0.05)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    anchor = {n: p.detach() + torch.randn_like(p) for n, p in model.named_parameters()}
    loss.state["anchor"] = anchor
    loss.on_after_backward(SimpleNamespace(model=model))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n] + 0.05 * (p.detach() - anchor[n]))
    # no anchor (first instance): gradients untouched
    loss.state["anchor"] = {}
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.on_after_backward(SimpleNamespace(model=model))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[n])


def test_wrapping_a_proxy_loss_or_itself_is_refused():
    from dmlkit.errors import OptionError

    with pytest.raises(OptionError, match="has parameters of its own"):
        CCPLoss(num_classes=2, embedding_size=3, base="proxynca")
    with pytest.raises(OptionError, match="cannot wrap itself"):
        CCPLoss(num_classes=2, embedding_size=3, base="ccp")


def test_ccp_run_on_digits_reinitialises_on_plateau(cli, tmp_path):
    args = [
        "--loss",
        "ccp",
        "--loss-opt",
        "patience=1",
        "--loss-opt",
        "proxies_per_class=4",
        "--loss-opt",
        "base=multi_similarity",
        "--set",
        "val_fraction=0.4",
        "--set",
        "batch_size=48",
        "--set",
        "normalize_embeddings=false",
        "--epochs",
        "6",
    ]
    code, out, err = cli("train", *args, "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["ccp_instance"] == 1 and rows[0]["ccp_pool_size"] == 3 * 12
    reinit = [r for r in rows[1:] if "ccp_instance" in r]
    assert reinit, "the plateau rule never fired"
    # it fired exactly when val MAP@R had not improved for `patience` (=1) evaluation
    best = rows[0]["val_map_at_r"]
    for r in rows[1:]:
        fired = "ccp_instance" in r
        assert fired == (r["val_map_at_r"] <= best + 1e-5), r["epoch"]
        best = -1.0 if fired else max(best, r["val_map_at_r"])
    assert reinit[0]["ccp_selection_s"] >= 0 and reinit[0]["ccp_mean_min_distance"] > 0


def test_plateau_schedule_needs_a_validation_split(cli, tmp_path):
    code, _, err = cli("train", "--loss", "ccp", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "needs a validation split" in err and "val_fraction" in err


def test_proxynca_can_start_from_class_means_of_embedded_samples(tmp_path):
    from dmlkit.config import resolve
    from dmlkit.train import Trainer
    from dmlkit_plugins.proxies import embed_pool

    cfg, _ = resolve({"loss": {"name": "proxynca", "proxy_init": "class_means", "pool_rounds": 6}}, get_registry())
    trainer = Trainer(cfg, get_registry(), tmp_path)
    trainer.emit("on_train_start")
    means = embed_pool(trainer, 6, seed=0).mean(1)  # the same pool: same seed, inference mode
    torch.testing.assert_close(trainer.loss.proxies.detach(), means, atol=0.05, rtol=0)
