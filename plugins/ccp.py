"""CCP: Deep Metric Learning with Chance Constraints (Gurbuz, Can, Alatan; code yetigurbuz/ccp-dml).

Written against public hooks only: the loss wraps any registered pair-based loss and acts
during training through the trainer's events (on_train_start, on_after_backward,
on_validation_end, on_epoch_end). The trainer does not know CCP.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

import dmlkit
from dmlkit.errors import DmlkitError, OptionError
from dmlkit.losses import MetricLoss
from dmlkit_plugins.proxies import GreedyKCenter, embed_pool, greedy_kcenter


def unit_ball(v: Tensor) -> Tensor:
    """N(v) = v if |v| <= 1 else v / |v|, row-wise."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1.0)


class CCPLoss(MetricLoss):
    """0.1 x base(batch, batch) + 1.0 x base(batch, all proxies) with K proxies per class,
    re-initialised by greedy k-center selection each time validation MAP@R plateaus, and a
    proximal term lambda (theta - theta_anchor) on the network's gradients after the first
    instance. Embeddings and proxies are projected onto the unit ball.

    ``schedule``: ``plateau`` (needs ``train.val_fraction`` > 0: a new instance when
    val MAP@R has not improved by more than ``min_delta`` for ``patience`` evaluations) or
    ``fixed`` (every ``interval`` epochs).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        base: str = "contrastive",
        base_options: dict | None = None,
        proxies_per_class: int = 8,
        pool_rounds: int = 12,
        batch_weight: float = 0.1,
        proxy_weight: float = 1.0,
        lam: float = 2e-4,
        schedule: str = "plateau",
        patience: int = 3,
        min_delta: float = 1e-5,
        interval: int = 10,
        initializer: str = "greedy_kcenter",
        seed: int = 0,
    ):
        super().__init__()
        if base == "ccp":
            raise OptionError(
                "ccp cannot wrap itself; choose a pair-based base loss (contrastive, multi_similarity, ...)"
            )
        if schedule not in ("plateau", "fixed"):
            raise OptionError(f"schedule must be plateau or fixed; got {schedule!r}")
        if proxies_per_class < 1 or pool_rounds < proxies_per_class:
            raise OptionError(f"need 1 <= proxies_per_class <= pool_rounds; got {proxies_per_class}, {pool_rounds}")
        if lam < 0 or patience < 1 or interval < 1:
            raise OptionError("need lam >= 0, patience >= 1, interval >= 1")
        registry = dmlkit.get_registry()
        ctx = {"num_classes": num_classes, "embedding_size": embedding_size}
        self.base = registry.build("loss", base, context=ctx, **(base_options or {}))
        if any(True for _ in self.base.parameters()):
            raise OptionError(f"ccp wraps pair-based losses; '{base}' has parameters of its own (a proxy loss?)")
        self.init = registry.build("proxy_initializer", initializer)
        self.k, self.rounds, self.num_classes = proxies_per_class, pool_rounds, num_classes
        self.batch_weight, self.proxy_weight, self.lam = batch_weight, proxy_weight, lam
        self.schedule, self.patience, self.min_delta, self.interval, self.seed = (
            schedule,
            patience,
            min_delta,
            interval,
            seed,
        )
        self.proxies = nn.Parameter(torch.randn(num_classes, proxies_per_class, embedding_size) * 0.1)
        self.register_buffer("proxy_labels", torch.arange(num_classes).repeat_interleave(proxies_per_class))
        self.lr_multipliers = {"proxies": 1.0}  # the paper: base learning rate, no multiplier
        self._pending: dict[str, Any] = {}
        self.state: dict[str, Any] = {
            "instance": 0,
            "best": -float("inf"),
            "bad": 0,
            "anchor": {},
            "best_proxies": None,
            "best_weights": {},
        }

    # -- the loss ------------------------------------------------------------------------
    def compute(self, emb, labels, ref, ref_labels, indices):
        x = unit_ball(emb)
        if ref is not None:  # an explicit reference set replaces the proxies
            return self.base(x, labels, unit_ball(ref), ref_labels)
        p = unit_ball(self.proxies.float().reshape(-1, self.proxies.shape[-1]))
        return self.batch_weight * self.base(x, labels, indices=indices) + self.proxy_weight * self.base(
            x, labels, p, self.proxy_labels
        )

    # -- resumable state (saved with the loss's state_dict) ------------------------------
    def get_extra_state(self) -> dict:
        return dict(self.state)

    def set_extra_state(self, state: dict) -> None:
        self.state = dict(state)

    # -- training events -----------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.schedule == "plateau" and trainer.val_split is None:
            raise DmlkitError(
                "ccp's plateau schedule needs a validation split of training classes: "
                "set train.val_fraction (e.g. --set val_fraction=0.2), or schedule=fixed"
            )
        self.reinitialise(trainer, record=None)

    def on_after_backward(self, trainer) -> None:
        """Proximal term: grad += lam (theta - theta_anchor) for the network's weights."""
        anchor = self.state["anchor"]
        if not anchor or self.lam == 0:
            return
        for name, p in trainer.model.named_parameters():
            if p.grad is not None and name in anchor:
                p.grad.add_(p.detach() - anchor[name].to(p.device), alpha=self.lam)

    def on_validation_end(self, trainer, metrics: dict) -> None:
        if self.schedule != "plateau":
            return
        value = metrics.get("val_map_at_r")
        if value is None:
            return
        if value > self.state["best"] + self.min_delta:
            self.state.update(
                best=value,
                bad=0,
                best_proxies=self.proxies.detach().clone(),
                best_weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            )
            return
        self.state["bad"] += 1
        if self.state["bad"] >= self.patience:
            self.state["anchor"] = self.state["best_weights"]
            self.reinitialise(trainer, record=metrics, seed_proxies=self.state["best_proxies"])

    def on_epoch_end(self, trainer, record: dict) -> None:
        if self._pending:
            record.update(self._pending)
            self._pending = {}
        if (
            self.schedule == "fixed"
            and trainer.epoch + 1 < trainer.settings["epochs"]
            and (trainer.epoch + 1) % self.interval == 0
        ):
            self.state["anchor"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            self.reinitialise(trainer, record=record, seed_proxies=self.proxies.detach().clone())

    def reinitialise(self, trainer, record: dict | None, seed_proxies: Tensor | None = None) -> None:
        """A new instance: new proxies picked from a freshly embedded pool."""
        instance = self.state["instance"] + 1
        pool = (
            embed_pool(trainer, self.rounds, self.seed + instance) if getattr(self.init, "needs_pool", True) else None
        )
        if pool is not None and pool.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        previous = None if seed_proxies is None else seed_proxies.to(self.proxies.device)
        if isinstance(self.init, GreedyKCenter):
            picks, gaps = greedy_kcenter(pool, previous, self.k)
            mean_gap = float(gaps.mean())
        else:
            picks, mean_gap = self.init(pool, self.proxies.detach() if previous is None else previous, self.k), None
        if pool is not None and pool.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            self.proxies.copy_(picks.to(self.proxies))
        state = trainer.optimizer.state.get(self.proxies)
        if state:  # stale optimizer moments belong to the old proxies
            trainer.optimizer.state[self.proxies] = {}
        self.state.update(instance=instance, best=-float("inf"), bad=0)
        info = {
            "ccp_instance": instance,
            "ccp_pool_size": int(pool.shape[0] * pool.shape[1]) if pool is not None else 0,
            "ccp_selection_s": seconds,
            "ccp_mean_min_distance": mean_gap,
        }
        if record is not None:
            record.update(info)
        else:  # before the first epoch: logged with its record
            self._pending = info
        trainer.console.print(
            f"ccp: instance {instance}: {self.k} proxies per class from a pool of {info['ccp_pool_size']} in "
            f"{seconds * 1000:.1f} ms" + (f", mean min-distance {mean_gap:.4f}" if mean_gap is not None else "")
        )


@dmlkit.hookimpl
def register_losses(register):
    register(
        dmlkit.ComponentSpec(
            "ccp", CCPLoss, "CCP multi-proxy wrapper with k-center re-initialisation (Gurbuz, Can, Alatan)"
        )
    )
