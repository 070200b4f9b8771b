"""CCP: the ccp-dml formulas re-implemented independently, greedy k-center against brute force,
the proximal term, both schedules, wrapping proxy losses and third-party losses, and runs on digits."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dmlkit
from dmlkit import get_registry
from dmlkit.config import resolve
from dmlkit.errors import OptionError
from dmlkit.losses import MetricLoss
from dmlkit.proxies import ProxyBank, embed_pool
from dmlkit.train import Trainer
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


def test_previous_proxies_steer_the_picks_away():
    pool = torch.tensor([[[1.0, 0.0], [1.1, 0.0], [-1.0, 0.0]]])
    previous = torch.tensor([[[1.0, 0.0]]])  # the class already has a proxy at (1, 0)
    picks, _ = greedy_kcenter(pool, previous, 1)
    assert picks[0, 0].tolist() == [-1.0, 0.0]


def test_unit_ball_projection():
    v = torch.tensor([[0.3, 0.4], [3.0, 4.0]])
    torch.testing.assert_close(unit_ball(v), torch.tensor([[0.3, 0.4], [0.6, 0.8]]))


# -- the ccp-dml formulas, written out pair by pair (an independent reference) ---------------------
def ball(v):
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n > 1, v / n, v)


def pairs(labels, ref_labels, exclude_self):
    pos, neg = [], []
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            if exclude_self and i == j:
                continue
            (pos if labels[i] == ref_labels[j] else neg).append((i, j))
    return pos, neg


def ref_c1(x, y, labels, ref_labels, exclude_self, m=0.5):
    """[sum_pos (1 - x.y) + sum_neg [x.y - m]+] / n, raw dot products (losses/contrastive_loss.py)."""
    pos, neg = pairs(labels, ref_labels, exclude_self)
    total = sum((1 - x[i] @ y[j]) for i, j in pos) + sum(torch.relu(x[i] @ y[j] - m) for i, j in neg)
    return total / len(x)


def ref_c2(x, y, labels, ref_labels, exclude_self, mp=0.0, mn=0.5):
    """Mean over non-zero positive hinges of (d - m+) plus mean over non-zero negative hinges of (m- - d),
    d Euclidean (not squared)."""
    pos, neg = pairs(labels, ref_labels, exclude_self)
    lp = [torch.relu((x[i] - y[j]).norm() - mp) for i, j in pos]
    ln = [torch.relu(mn - (x[i] - y[j]).norm()) for i, j in neg]
    return sum(lp) / max(1, sum(float(v > 0) for v in lp)) + sum(ln) / max(1, sum(float(v > 0) for v in ln))


def ref_ms(x, y, labels, ref_labels, exclude_self, a=2.0, b=50.0, lam=0.5):
    """Mean over anchors of 1/a log(1 + sum_pos e^{-a(s - lam)}) + 1/b log(1 + sum_neg e^{b(s - lam)}), s = x.y."""
    pos, neg = pairs(labels, ref_labels, exclude_self)
    rows = []
    for i in range(len(x)):
        sp = [x[i] @ y[j] for a_, j in pos if a_ == i]
        sn = [x[i] @ y[j] for a_, j in neg if a_ == i]
        tp = torch.log1p(sum(torch.exp(-a * (s - lam)) for s in sp)) / a if sp else torch.zeros(())
        tn = torch.log1p(sum(torch.exp(b * (s - lam)) for s in sn)) / b if sn else torch.zeros(())
        rows.append(tp + tn)
    return sum(rows) / len(rows)


def ref_triplet(x, y, labels, ref_labels, exclude_self, m=0.05):
    """Every (a, p, n): [d(a,p) - d(a,n) + m]+, Euclidean d, mean over the non-zero terms."""
    pos, neg = pairs(labels, ref_labels, exclude_self)
    terms = [torch.relu((x[a] - y[p]).norm() - (x[a] - y[n]).norm() + m) for a, p in pos for a2, n in neg if a2 == a]
    nonzero = sum(float(t > 0) for t in terms)
    return sum(terms) / max(1, nonzero)


REFERENCES = {"contrastive_cosine": ref_c1, "contrastive": ref_c2, "multi_similarity": ref_ms, "triplet": ref_triplet}


@pytest.mark.parametrize("base", list(REFERENCES))
def test_ccp_loss_equals_the_ccp_dml_formulas_on_the_unit_ball(base):
    """0.1 base(batch, batch) + 1.0 base(batch, proxies), on unit-ball vectors, values and gradients."""
    torch.manual_seed(0)
    loss = CCPLoss(num_classes=3, embedding_size=5, base=base, proxies_per_class=2, pool_rounds=4)
    # norms from 0.2 to 3: some vectors inside the ball, some projected onto the sphere
    emb = (torch.randn(9, 5) * torch.linspace(0.05, 1.5, 9)[:, None]).requires_grad_()
    with torch.no_grad():
        loss.proxy_bank.vectors.copy_(torch.randn(3, 2, 5) * torch.linspace(0.1, 1.0, 6).reshape(3, 2, 1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    proxies = loss.proxy_bank.vectors
    got = loss(emb, labels)
    got_grads = torch.autograd.grad(got, [emb, proxies])

    ref = REFERENCES[base]
    x, p = ball(emb), ball(proxies.reshape(-1, 5))
    p_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = 0.1 * ref(x, x, labels, labels, True) + 1.0 * ref(x, p, labels, p_labels, False)
    exp_grads = torch.autograd.grad(expected, [emb, proxies])
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    for g, e in zip(got_grads, exp_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_inside_the_ball_the_scale_of_an_embedding_matters():
    """On the sphere e and 0.5 e would give the same loss; on the ball they do not."""
    loss = CCPLoss(num_classes=2, embedding_size=4, base="contrastive", proxies_per_class=1, pool_rounds=2)
    emb, labels = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    emb = 0.9 * emb / emb.norm(dim=1, keepdim=True)
    assert abs(float(loss(emb, labels)) - float(loss(0.5 * emb, labels))) > 1e-3


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
    loss.state["anchor"] = {}  # no anchor (first instance): gradients untouched
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.on_after_backward(SimpleNamespace(model=model))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[n])


# -- wrapping ---------------------------------------------------------------------------------------
class BetaMargin(MetricLoss):
    """A test-only third-party pair loss with a learnable parameter: [alpha + y (d - beta)]+."""

    def __init__(self, beta: float = 0.6, alpha: float = 0.2):
        super().__init__()
        self.beta, self.alpha = nn.Parameter(torch.tensor(beta)), alpha

    def compute(self, emb, labels, ref, ref_labels, indices):
        other, other_labels = (emb, labels) if ref is None else (ref, ref_labels)
        d = torch.cdist(emb, other)
        y = (labels[:, None] == other_labels[None, :]).float() * 2 - 1
        return torch.relu(self.alpha + y * (d - self.beta)).mean()


class NormSoftmax(MetricLoss):
    """A test-only third-party proxy loss on the core proxy service, as docs/tutorial.md shows."""

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.1, proxies_per_class: int = 1):
        super().__init__()
        self.temperature = temperature
        self.bank = ProxyBank(num_classes, proxies_per_class, embedding_size, lr_multiplier=10.0)

    def compute(self, emb, labels, ref, ref_labels, indices):
        proxies, proxy_labels = self.bank.reference() if ref is None else (ref, ref_labels)
        logits = nn.functional.normalize(emb, dim=1) @ nn.functional.normalize(proxies, dim=1).T / self.temperature
        same = labels[:, None] == proxy_labels[None, :]
        pos = logits.masked_fill(~same, -torch.inf).logsumexp(1)
        return (logits.logsumexp(1) - pos).mean()


class NoReference(nn.Module):
    """A loss that cannot be handed a reference set."""

    def forward(self, embeddings, labels):
        return embeddings.sum() * 0


@pytest.fixture
def third_party():
    reg = get_registry()
    reg.add("loss", dmlkit.ComponentSpec("beta_margin", BetaMargin), plugin="test")
    reg.add("loss", dmlkit.ComponentSpec("norm_softmax", NormSoftmax), plugin="test")
    reg.add("loss", dmlkit.ComponentSpec("no_reference", NoReference), plugin="test")
    return reg


def trainer_for(tmp_path, loss: dict, **train):
    cfg, _ = resolve({"loss": {"name": "ccp", **loss}, "train": {"epochs": 2, **train}}, get_registry())
    return Trainer(cfg, get_registry(), tmp_path)


def optimised(trainer, tensor) -> bool:
    return any(p is tensor for g in trainer.optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("base", ["proxynca", "proxy_anchor", "norm_softmax"])
def test_ccp_drives_the_bank_of_a_proxy_loss(base, third_party, tmp_path):
    trainer = trainer_for(tmp_path, {"base": base, "proxies_per_class": 3, "pool_rounds": 5})
    ccp = trainer.loss
    bank = ccp.base.bank
    assert ccp.driven == [bank] and not ccp.pair_based
    assert bank.vectors.shape == (trainer.train_split.num_classes, 3, trainer.embedding_size)
    assert optimised(trainer, bank.vectors)  # the proxies CCP sets are the ones the optimizer trains
    trainer.emit("on_train_start")
    pool = embed_pool(trainer, 5, seed=1)  # CCP's first pool: seed + instance
    torch.testing.assert_close(bank.vectors.detach(), greedy_kcenter(pool, None, 3)[0])
    before = bank.vectors.detach().clone()
    x, y = next(iter(trainer.loader(trainer.train_split, train=True)))
    trainer.train_step(x, y)
    assert not torch.equal(bank.vectors.detach(), before)  # ... and the loss trains them


def test_ccp_wraps_a_pair_loss_with_a_learnable_parameter(third_party, tmp_path):
    trainer = trainer_for(tmp_path, {"base": "beta_margin", "proxies_per_class": 2, "pool_rounds": 4})
    ccp = trainer.loss
    assert ccp.pair_based and optimised(trainer, ccp.base.beta) and optimised(trainer, ccp.proxy_bank.vectors)
    trainer.emit("on_train_start")
    beta = float(ccp.base.beta)
    x, y = next(iter(trainer.loader(trainer.train_split, train=True)))
    trainer.train_step(x, y)
    assert float(ccp.base.beta) != beta


def test_losses_that_cannot_be_wrapped_are_refused_before_data_loads(third_party):
    for base, message in (("ccp", "cannot wrap itself"), ("no_reference", "takes no reference set")):
        with pytest.raises(OptionError, match=message):
            resolve({"loss": {"name": "ccp", "base": base}}, get_registry())
    with pytest.raises(OptionError, match="has no option 'margn'"):
        resolve({"loss": {"name": "ccp", "base": "triplet", "base_options": {"margn": 0.1}}}, get_registry())


def test_initializer_options_reach_the_initializer(cli, tmp_path):
    loss = CCPLoss(num_classes=2, embedding_size=3, initializer={"name": "class_means", "noise": 0.5})
    assert loss.init.noise == 0.5
    cfg, _ = resolve(
        {"loss": {"name": "proxynca", "proxy_init": {"name": "class_means", "noise": 0.25}}}, get_registry()
    )
    trainer = Trainer(cfg, get_registry(), tmp_path / "t")
    assert trainer.loss.bank.initializer.noise == 0.25
    # the command-line form: dotted options
    code, _, err = cli(
        "train",
        *("--loss-opt", "proxy_init.name=class_means", "--loss-opt", "proxy_init.noise=0.25", "--epochs", "1"),
        *("--run-dir", str(tmp_path / "r")),
    )
    assert code == 0, err
    assert 'proxy_init = {name = "class_means", noise = 0.25}' in (tmp_path / "r" / "config.toml").read_text()
    with pytest.raises(OptionError, match="has no option 'nois'"):
        resolve({"loss": {"name": "proxynca", "proxy_init": {"name": "class_means", "nois": 1}}}, get_registry())


def test_proxynca_can_start_from_class_means_of_embedded_samples(tmp_path):
    cfg, _ = resolve(
        {"loss": {"name": "proxynca", "proxy_init": {"name": "class_means", "noise": 0.0}, "pool_rounds": 6}},
        get_registry(),
    )
    trainer = Trainer(cfg, get_registry(), tmp_path)
    trainer.emit("on_train_start")
    means = embed_pool(trainer, 6, seed=0).mean(1)  # the same pool: same seed, inference mode
    torch.testing.assert_close(trainer.loss.proxies.detach(), means)


# -- schedules and runs ------------------------------------------------------------------------------
def test_first_kcenter_pick_on_a_raw_pool_is_the_farthest_point(tmp_path):
    trainer = trainer_for(tmp_path, {"base": "contrastive", "proxies_per_class": 2, "pool_rounds": 6})
    assert trainer.settings["normalize_embeddings"] is False  # CCP recommends raw network outputs
    trainer.emit("on_train_start")
    pool = embed_pool(trainer, 6, seed=1)
    norms = pool.norm(dim=2)
    assert norms.std() > 1e-3  # not on the sphere: a tie would fall to index 0
    farthest = pool[torch.arange(len(pool)), norms.argmax(1)]
    torch.testing.assert_close(trainer.loss.proxy_bank.vectors.detach()[:, 0], farthest)


def read(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def ccp_events(rows):
    return [e for r in rows for e in r.get("events", []) if e["event"] == "ccp_instance"]


@pytest.mark.parametrize("interval, epochs, expected", [(1, 3, [1, 2]), (2, 5, [2, 4])])
def test_fixed_schedule_fires_after_every_interval_epochs(interval, epochs, expected, tmp_path):
    trainer = trainer_for(
        tmp_path, {"schedule": "fixed", "interval": interval, "proxies_per_class": 2, "pool_rounds": 3}, epochs=epochs
    )
    trainer.fit()
    events = ccp_events(read(tmp_path))
    assert [e["instance"] for e in events] == list(range(1, len(expected) + 2))  # one entry per instance
    assert events[0]["reason"] == "start" and events[0]["step"] == 0
    assert [e["reason"] for e in events[1:]] == [f"fixed schedule, after epoch {n}" for n in expected]
    assert [e["epoch"] for e in events[1:]] == [n + 1 for n in expected]  # logged with the epoch it starts


def validations(rows):
    """Every validation in step order (step-wise ones and the epoch-end ones), each once."""
    seen = {}
    for r in rows:
        for v in r.get("val_steps", []):
            seen[v["step"]] = v["val_map_at_r"]
        seen.setdefault(r["step"], r["val_map_at_r"])
    return sorted(seen.items())


def plateau_reference(vals, patience, min_delta=1e-5):
    """The plateau rule written out: where it must start a new instance, and the step of the best
    validation of each instance it ends (the weights and proxies the new one starts from)."""
    best, best_step, bad, fired, restarts = -1.0, None, 0, [], []
    for step, v in vals:
        if v > best + min_delta:
            best, best_step, bad = v, step, 0
            continue
        bad += 1
        if bad >= patience:
            fired.append(step)
            restarts.append(best_step)
            best, bad = -1.0, 0
    return fired, restarts


def plateau_steps(vals, patience, min_delta=1e-5):
    return plateau_reference(vals, patience, min_delta)[0]


class StubTrainer:
    """What CCP's plateau rule reads from a trainer: the model's weights, the step, a console and
    the event log (the pool embedding is replaced by a stub bank's reinitialise)."""

    def __init__(self):
        from io import StringIO

        from rich.console import Console

        self.model = nn.Linear(2, 1, bias=False)
        self.step = 0
        self.console = Console(file=StringIO())
        self.events = []
        self.settings = {"val_every_steps": 0}  # each validation counts

    def log_event(self, **event):
        self.events.append({**event, "step": self.step})


def plateau_loss(monkeypatch, patience=3, min_delta=1e-5):
    """A CCP loss whose banks record each re-initialisation instead of embedding a pool."""
    loss = CCPLoss(num_classes=3, embedding_size=2, patience=patience, min_delta=min_delta, proxies_per_class=1)
    starts = []

    def reinitialise(trainer, init, *, rounds, seed, previous, **_):
        starts.append(previous.clone())
        return {"pool_size": 3, "selection_s": 0.0, "mean_min_distance": 1.0}

    for bank in loss.driven:
        monkeypatch.setattr(bank, "reinitialise", reinitialise)
    return loss, starts


SEQUENCES = {
    "rises-then-flat": [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.4, 0.5],
    "falls": [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01],
    "within-min-delta": [0.5, 0.500005, 0.500009, 0.5000099, 0.6, 0.6000001, 0.6, 0.6],
    "noisy": [0.3, 0.35, 0.34, 0.36, 0.33, 0.32, 0.31, 0.37, 0.2, 0.2, 0.2, 0.2, 0.2],
    "random": [round(float(v), 6) for v in torch.rand(40, generator=torch.Generator().manual_seed(0))],
}


@pytest.mark.parametrize("patience", [1, 3])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_the_plateau_rule_fires_where_the_brute_force_rule_does(name, patience, monkeypatch):
    """Chosen validation values (not a training run's): a new instance exactly after `patience`
    validations without an improvement of more than min_delta, counted from the last instance;
    it restarts from the weights and proxies of the best validation since then."""
    loss, starts = plateau_loss(monkeypatch, patience=patience)
    trainer = StubTrainer()
    values = SEQUENCES[name]
    for step, value in enumerate(values, start=1):
        trainer.step = step
        with torch.no_grad():
            trainer.model.weight.fill_(step)  # the weights tell the step they were seen at
            for bank in loss.driven:
                bank.vectors.fill_(step)
        loss.on_validation_end(trainer, {"val_map_at_r": value, "val_precision_at_1": 1.0})
    fired = [e["step"] for e in trainer.events if e["reason"] == "val_map_at_r plateau"]
    want_fired, want_restarts = plateau_reference(list(enumerate(values, start=1)), patience)
    assert fired == want_fired
    assert [e["instance"] for e in trainer.events] == list(range(1, len(fired) + 1))
    # each new instance starts from the proxies and (as the proximal anchor) the weights of the best validation
    assert [float(p.flatten()[0]) for p in starts] == want_restarts
    if want_restarts:
        assert float(loss.state["anchor"]["weight"].flatten()[0]) == want_restarts[-1]


def test_the_plateau_rule_ignores_missing_values_and_the_fixed_schedule(monkeypatch):
    loss, starts = plateau_loss(monkeypatch, patience=1)
    trainer = StubTrainer()
    for _ in range(5):
        loss.on_validation_end(trainer, {"val_precision_at_1": 0.5})  # its metric is not there
    assert not starts and loss.state["bad"] == 0
    loss.schedule = "fixed"
    for v in (0.5, 0.4, 0.3):
        loss.on_validation_end(trainer, {"val_map_at_r": v})
    assert not starts


@pytest.mark.parametrize("extra", [[], ["--loss-opt", "base=proxynca"]])
def test_ccp_with_its_name_alone_validates_every_25_steps_and_logs_its_instances(extra, cli, tmp_path):
    """`dmlkit train --loss ccp` (and with a proxy-loss base) on the default dataset: the paper's
    settings are recommended (validation every 25 steps on held-out images), the first instance
    starts at step 0, and every later one is the plateau rule's answer to the logged validations.
    Whether the rule fires in so short a run depends on float rounding (thread count, BLAS), so
    that is asserted above on chosen values, not here."""
    run = tmp_path / "run"
    code, out, err = cli("train", "--loss", "ccp", *extra, "--epochs", "3", "--run-dir", str(run))
    assert code == 0, err
    assert "train.val_every_steps=25" in out
    rows = read(run)
    assert any(r.get("val_steps") for r in rows)  # step-wise validations happened
    events = ccp_events(rows)
    assert events[0]["reason"] == "start" and events[0]["step"] == 0
    assert [e["instance"] for e in events] == list(range(1, len(events) + 1))
    plateau = [e for e in events if e["reason"] == "val_map_at_r plateau"]
    assert len(plateau) == len(events) - 1
    assert [e["step"] for e in plateau] == plateau_steps(validations(rows), patience=3)
    assert all(e["selection_s"] >= 0 and e["mean_min_distance"] > 0 for e in events)


def test_plateau_schedule_needs_validation_data(cli, tmp_path):
    code, _, err = cli(
        "train", "--loss", "ccp", "--set", "val_fraction=0", "--epochs", "1", "--run-dir", str(tmp_path / "r")
    )
    assert code == 1 and "needs validation data" in err and "val_fraction" in err


def test_fixed_class_vectors_cannot_be_driven():
    with pytest.raises(OptionError, match="its proxies are fixed"):
        CCPLoss(num_classes=3, embedding_size=4, base="devise", base_options={"vector_size": 4})
