"""CCP: Deep Metric Learning with Chance Constraints (Gurbuz, Can, Alatan; code yetigurbuz/ccp-dml).

Written against public hooks and the core proxy service only: the loss wraps any registered
loss and acts during training through the trainer's events (on_train_start,
on_after_backward, on_validation_end, on_epoch_end). The trainer does not know CCP.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

import dmlkit
from dmlkit.errors import DmlkitError, OptionError
from dmlkit.losses import MetricLoss
from dmlkit.proxies import ProxyBank, banks, build_initializer, check_initializer, check_pool_size

#: ccp-dml's settings of the base losses it wraps (its code defaults), applied where the base
#: takes the option and the user's base_options do not set it. Every base computes on the
#: unit-ball vectors as they are (``normalize=False``: dot products, Euclidean distances).
PAPER_BASE_OPTIONS: dict[str, dict[str, Any]] = {
    "triplet": {"margin": 0.05, "squared": False, "reduction": "mean_nonzero"},
    "contrastive": {"pos_margin": 0.0, "neg_margin": 0.5},
    "contrastive_cosine": {"margin": 0.5},
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
}


_NO_REFERENCE = (
    "ccp cannot wrap loss '{base}': its forward takes no reference set (ref_embeddings, ref_labels) to compare "
    "the batch with the proxies; subclass dmlkit.losses.MetricLoss, or hold its proxies in a dmlkit.proxies.ProxyBank"
)


def _base_options(spec: Any, base_options: dict | None, proxies_per_class: int) -> dict[str, Any]:
    """The options CCP builds its base loss with: ccp-dml's settings where the base takes them, the
    unit ball (``normalize=False``), K proxies per class, then the user's ``base_options``."""
    params = spec.parameters()
    options = {k: v for k, v in PAPER_BASE_OPTIONS.get(spec.name, {}).items() if k in params}
    if "normalize" in params:
        options["normalize"] = False  # the unit ball, not the sphere
    if "proxies_per_class" in params:
        options["proxies_per_class"] = proxies_per_class
    options.update(base_options or {})
    return options


def check_uses_reference(base: torch.nn.Module, name: str) -> None:
    """A base without a ProxyBank gets CCP's proxies as its reference set: its value must depend on
    them, or the proxies never train. Checked by autograd on a few tiny random batches (one with a
    non-zero gradient with respect to the reference set is enough)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8) % 4
    for scale in (1.0, 0.3, 3.0):
        x = torch.randn(8, 8, generator=g) * scale
        ref = (torch.randn(8, 8, generator=g) * scale).requires_grad_(True)
        try:
            value = base(x, labels, ref, labels.clone())
        except Exception as exc:
            raise OptionError(
                f"ccp cannot wrap loss '{name}': it fails on a batch and a reference set ({exc})"
            ) from None
        if not isinstance(value, Tensor) or not value.requires_grad:
            continue
        (grad,) = torch.autograd.grad(value, ref, allow_unused=True)
        if grad is not None and bool(grad.abs().sum() > 0):
            return
    raise OptionError(
        f"ccp cannot wrap loss '{name}': its value does not depend on the reference set it is given "
        "(ref_embeddings), so CCP's proxies would never train; compare the batch with ref_embeddings, or hold the "
        "loss's own proxies in a dmlkit.proxies.ProxyBank, which CCP then drives"
    )


def unit_ball(v: Tensor) -> Tensor:
    """N(v) = v if |v| <= 1 else v / |v|, row-wise."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1.0)


class CCPLoss(MetricLoss):
    """0.1 x base(batch, batch) + 1.0 x base(batch, all proxies) with K proxies per class,
    re-initialised by greedy k-center selection each time validation MAP@R plateaus, and a
    proximal term lam (theta - theta_anchor) on the network's gradients after the first
    instance. Embeddings and proxies are projected onto the unit ball, and the base loss
    computes on them as they are (its ``normalize`` option is turned off).

    ``base`` is any registered loss. A pair-based one (with or without parameters of its own)
    gets CCP's proxies as its reference set. A proxy-based one (its proxies in a
    ``dmlkit.proxies.ProxyBank``: ProxyNCA, Proxy Anchor, a third party's) keeps its own loss
    on its own bank, which CCP resizes to K per class and drives (k-center re-initialisation,
    proximal term); the batch term is then left out.

    ``schedule``: ``plateau`` (validation ``metric`` has not improved by more than
    ``min_delta`` for ``patience`` validations; validation runs every ``train.val_every_steps``
    steps, or each epoch) or ``fixed`` (a new instance after every ``interval`` epochs).
    ``initializer``: a proxy initializer name or ``{name = ..., option = ...}``.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        base: the wrapped loss, any registered loss name.
        base_options: options of the base loss (``--loss-opt base_options.margin=0.5``).
        proxies_per_class: K, proxies kept per class.
        pool_rounds: training samples embedded per class to pick the K proxies from.
        batch_weight: weight of the base loss within the batch.
        proxy_weight: weight of the base loss between the batch and all proxies.
        lam: strength of the proximal term that holds the network near its last anchor.
        schedule: ``plateau`` or ``fixed``: when a new instance (proxy re-initialisation) starts.
        patience: validations without improvement before a plateau instance.
        min_delta: the improvement in ``metric`` that counts.
        interval: epochs between instances with ``schedule = "fixed"``.
        metric: the validation metric the plateau rule watches.
        initializer: the proxy initializer, a name or ``{name = ..., options}``.
        seed: seed of the initializer's random choices.
        keep_optimizer_state: keep the optimizer's moments of the proxies across a re-initialisation
            (ccp-dml's behaviour); false drops them, as for a new parameter.
        preset: ``paper``: the paper's settings for the run's dataset (cub200, cars196, sop, inshop): the
            base loss's margins from the supplement, K and b, and the run protocol (Adam 1e-5, batch 32 = 8
            classes x 4, 128-d, an epoch of 25 steps (250 on SOP/In-shop) validated each time, early stop
            after 60 validations without gain, weight decay and clipping as ccp-dml). ``auto`` (default):
            ``paper`` on those four datasets, ``none`` on others. ``none``: dmlkit's lighter recommendation
            (Adam, weight decay, clipping; ccp-dml's code defaults for the base loss). ``dmlkit train
            --dry-run`` shows each setting and where it comes from; your own settings win.
    """

    nested_options = {"base_options": ("loss", "base"), "initializer": ("proxy_initializer", None)}

    reads_metrics_from = ("metric",)

    @staticmethod
    def validate_options(options: dict[str, Any]) -> None:
        """Checked with the run's config, before any data loads: the base loss exists, is not CCP,
        takes its options, and can be given a reference set."""
        registry = dmlkit.get_registry()
        base = options.get("base", "contrastive")
        spec = registry.get("loss", base)
        if spec.factory is CCPLoss:
            raise OptionError(
                "ccp cannot wrap itself; choose a base loss (contrastive, multi_similarity, proxynca, ...)"
            )
        base_options = options.get("base_options") or {}
        if not isinstance(base_options, dict):
            raise OptionError(f"ccp base_options must be a table of the base loss's options; got {base_options!r}")
        registry.resolve_options("loss", spec.name, base_options)
        check_initializer(options.get("initializer", "greedy_kcenter"))
        forward = getattr(spec.factory, "forward", None)
        if inspect.isclass(spec.factory) and forward is not None:
            takes = inspect.signature(forward).parameters
            if "ref_embeddings" not in takes and not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
                raise OptionError(_NO_REFERENCE.format(base=base))
        # a tiny instance of the base, built as CCP builds it: a pair loss must depend on the reference set
        k = options.get("proxies_per_class", 8)
        tiny = registry.build(
            "loss", spec.name, context={"num_classes": 4, "embedding_size": 8}, **_base_options(spec, base_options, k)
        )
        if not banks(tiny):
            check_uses_reference(tiny, spec.name)

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
        metric: str = "map_at_r",
        initializer: str | dict = "greedy_kcenter",
        seed: int = 0,
        keep_optimizer_state: bool = False,
        preset: str = "auto",
    ):
        super().__init__()
        registry = dmlkit.get_registry()
        if ("loss", base) in registry and registry.get("loss", base).factory is CCPLoss:
            raise OptionError(
                "ccp cannot wrap itself; choose a base loss (contrastive, multi_similarity, proxynca, ...)"
            )
        if schedule not in ("plateau", "fixed"):
            raise OptionError(f"schedule must be plateau or fixed; got {schedule!r}")
        if proxies_per_class < 1 or pool_rounds < proxies_per_class:
            raise OptionError(f"need 1 <= proxies_per_class <= pool_rounds; got {proxies_per_class}, {pool_rounds}")
        if lam < 0 or patience < 1 or interval < 1:
            raise OptionError("need lam >= 0, patience >= 1, interval >= 1")
        if preset not in PRESETS:
            raise OptionError(f"ccp preset must be one of {', '.join(repr(p) for p in PRESETS)}; got {preset!r}")
        spec = registry.get("loss", base)
        ctx = {"num_classes": num_classes, "embedding_size": embedding_size}
        self.base = registry.build("loss", base, context=ctx, **_base_options(spec, base_options, proxies_per_class))
        self.base_name = spec.name
        self.driven = banks(self.base)
        self.pair_based = not self.driven
        if self.driven:  # a proxy-based base: CCP drives its banks
            for bank in self.driven:
                if not bank.vectors.requires_grad:
                    raise OptionError(
                        f"ccp cannot drive loss '{base}': its proxies are fixed (a ProxyBank with trainable=False, "
                        "e.g. DeViSE's class vectors), so they cannot be re-initialised from the data"
                    )
                bank.resize(proxies_per_class)
        else:
            takes = inspect.signature(self.base.forward).parameters
            if "ref_embeddings" not in takes and not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
                raise OptionError(_NO_REFERENCE.format(base=base))
            self.proxy_bank = ProxyBank(num_classes, proxies_per_class, embedding_size, init="normal", std=0.1)
            self.driven = [self.proxy_bank]
        for bank in self.driven:
            bank.driven_by = "ccp"
            bank.transform = unit_ball
        check_pool_size(num_classes, pool_rounds, proxies_per_class, embedding_size)  # before any allocation
        self.init = build_initializer(initializer)
        if self.init is None:
            raise OptionError("ccp needs a proxy initializer (initializer=greedy_kcenter)")
        self.k, self.rounds, self.num_classes = proxies_per_class, pool_rounds, num_classes
        self.batch_weight, self.proxy_weight, self.lam = batch_weight, proxy_weight, lam
        self.schedule, self.patience, self.min_delta, self.interval = schedule, patience, min_delta, interval
        self.metric, self.seed, self.keep_optimizer_state = metric, seed, keep_optimizer_state
        self.state: dict[str, Any] = {
            "instance": 0,
            "best": -float("inf"),
            "bad": 0,
            "anchor": {},
            "best_proxies": [],
            "best_weights": {},
        }

    # -- the loss ------------------------------------------------------------------------
    def compute(self, emb, labels, ref, ref_labels, indices):
        x = unit_ball(emb)
        if ref is not None:  # an explicit reference set replaces the proxies
            return self.base(x, labels, unit_ball(ref), ref_labels)
        if not self.pair_based:  # a proxy loss on its own (CCP-driven) bank
            return self.proxy_weight * self.base(x, labels, indices=indices)
        p, p_labels = self.proxy_bank.reference()  # unit-ball projected
        return self.batch_weight * self.base(x, labels, indices=indices) + self.proxy_weight * self.base(
            x, labels, p, p_labels
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
                "ccp's plateau schedule needs validation data: set train.val_fraction > 0 "
                "(e.g. --set val_fraction=0.25), or --loss-opt schedule=fixed"
            )
        # the very first instance: min-distances seeded from the origin (the first pick is the largest norm)
        zeros = [torch.zeros(b.num_classes, 1, b.dim, device=b.vectors.device) for b in self.driven]
        self.reinitialise(trainer, zeros)

    def on_after_backward(self, trainer) -> None:
        """Proximal term: grad += lam (theta - theta_anchor) for the network's weights."""
        anchor = self.state["anchor"]
        if not anchor or self.lam == 0:
            return
        for name, p in trainer.model.named_parameters():
            if p.grad is not None and name in anchor:
                if anchor[name].device != p.device:  # e.g. restored from a checkpoint on the CPU: move once
                    anchor[name] = anchor[name].to(p.device)
                p.grad.add_(p.detach() - anchor[name], alpha=self.lam)

    def on_validation_end(self, trainer, metrics: dict) -> None:
        """The plateau rule counts one kind of validation: with ``train.val_every_steps`` the periodic
        ones (as ccp-dml), else each epoch's."""
        if self.schedule != "plateau":
            return
        value = metrics.get(f"val_{self.metric}")
        every = trainer.settings["val_every_steps"]
        if value is None or (every and metrics.get("step", 0) % every):
            return
        if value > self.state["best"] + self.min_delta:
            self.state.update(
                best=value,
                bad=0,
                best_proxies=[b.vectors.detach().clone() for b in self.driven],
                best_weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            )
            return
        self.state["bad"] += 1
        if self.state["bad"] >= self.patience:
            self.state["anchor"] = self.state["best_weights"]
            self.reinitialise(trainer, self.state["best_proxies"], reason=f"val_{self.metric} plateau")

    def on_epoch_start(self, trainer) -> None:
        """The fixed schedule: a new instance after epochs interval, 2 interval, ... (decided when the
        next epoch starts, so never after the last one, and the same whether or not the run was resumed)."""
        done = trainer.epoch  # epochs completed
        if self.schedule == "fixed" and done > 0 and done % self.interval == 0:
            self.state["anchor"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            previous = [b.vectors.detach().clone() for b in self.driven]
            self.reinitialise(trainer, previous, reason=f"fixed schedule, after epoch {done}")

    def reinitialise(self, trainer, previous: list[Tensor], reason: str = "start") -> None:
        """A new instance: each driven bank gets new proxies picked from a freshly embedded pool."""
        instance = self.state["instance"] + 1
        info: dict[str, Any] = {}
        for bank, prev in zip(self.driven, previous):
            got = bank.reinitialise(
                trainer,
                self.init,
                rounds=self.rounds,
                seed=self.seed + instance,
                previous=prev,
                keep_optimizer_state=self.keep_optimizer_state,
            )
            for k, v in got.items():
                info[k] = info.get(k, 0) + v if k != "mean_min_distance" else v
        self.state.update(instance=instance, best=-float("inf"), bad=0)
        trainer.log_event(event="ccp_instance", instance=instance, reason=reason, **info)
        gap = info.get("mean_min_distance")
        trainer.console.print(
            f"ccp: instance {instance} ({reason}, step {trainer.step}): {self.k} proxies per class from a pool of "
            f"{info.get('pool_size', 0)} in {info.get('selection_s', 0.0) * 1000:.1f} ms"
            + (f", mean min-distance {gap:.4f}" if gap is not None else "")
        )


#: The presets: "paper" (the paper's settings per dataset), "none" (dmlkit's lighter recommendation),
#: "auto" (paper on the paper's datasets, else none).
PRESETS = ("auto", "paper", "none")

#: The supplement's per-dataset settings of the base losses (C2 margins, triplet margin, MS alpha,
#: beta, lambda): the values behind the paper's tables, where its code defaults differ.
PAPER_DATASET_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "contrastive": {
        "cub200": {"pos_margin": 0.0, "neg_margin": 0.3841},
        "cars196": {"pos_margin": 0.2652, "neg_margin": 0.5409},
        "sop": {"pos_margin": 0.2858, "neg_margin": 0.5130},
        "inshop": {"pos_margin": 0.2858, "neg_margin": 0.5130},
    },
    "triplet": {
        "cub200": {"margin": 0.0961},
        "cars196": {"margin": 0.1190},
        "sop": {"margin": 0.0451},
        "inshop": {"margin": 0.0451},
    },
    "multi_similarity": {
        "cub200": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        "cars196": {"alpha": 14.35, "beta": 75.83, "base": 0.66},
        "sop": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        "inshop": {"alpha": 8.49, "beta": 57.38, "base": 0.41},
    },
}
#: K proxies per class, b pool rounds, and steps per validation ("epoch") per dataset.
PAPER_SCALE = {
    "cub200": (8, 12, 25),
    "cars196": (8, 12, 25),
    "sop": (4, 7, 250),
    "inshop": (4, 7, 250),
}


def _recommends(options: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Without a preset: Adam with weight decay 1e-4, gradient clipping at 10, raw (un-normalised)
    network outputs, and for the plateau schedule a class-disjoint quarter of the training
    classes validated every 25 steps; the learning rate stays the run's. With ``preset =
    "paper"``: the paper's settings for the run's dataset (see ``preset``)."""
    preset = options.get("preset", "auto")
    dataset = (config.get("dataset") or {}).get("name", "")
    if preset == "paper" or (preset == "auto" and dataset in PAPER_SCALE):
        return paper_settings(options, config)
    train: dict[str, Any] = {
        "optimizer": "adam",
        "weight_decay": 1e-4,
        "grad_clip": 10.0,
        "normalize_embeddings": False,
    }
    if options.get("schedule") == "plateau":
        train.update(val_fraction=0.25, val_every_steps=25)
    return {"train": train}


def paper_settings(options: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The paper's settings for the run's dataset and base loss."""
    dataset = (config.get("dataset") or {}).get("name", "")
    if dataset not in PAPER_SCALE:
        raise OptionError(
            f"ccp preset=paper has the paper's settings for {', '.join(PAPER_SCALE)}, not for dataset '{dataset}'; "
            "drop the preset and set the base loss's options yourself (--loss-opt base_options.NAME=VALUE)"
        )
    base = dmlkit.get_registry().get("loss", options.get("base", "contrastive")).name
    k, rounds, steps = PAPER_SCALE[dataset]
    loss: dict[str, Any] = {"proxies_per_class": k, "pool_rounds": rounds, "keep_optimizer_state": True}
    if base in PAPER_DATASET_OPTIONS:
        loss["base_options"] = dict(PAPER_DATASET_OPTIONS[base][dataset])
    return {
        "loss": loss,
        "sampler": {"name": "m_per_class", "m": 4, "batches_per_epoch": steps},
        "train": {
            "optimizer": "adam",
            "lr": 1e-5,
            "scheduler": "none",
            "batch_size": 32,
            "embedding_size": 128,
            "normalize_embeddings": False,
            "weight_decay": 1e-4,
            "weight_decay_norms": False,
            "weight_decay_before_clip": True,
            "grad_clip": 10.0,
            "grad_clip_value": 10.0,
            "freeze_bn": True,
            "val_fraction": 0.25,
            "val_split": "classes",
            "val_every_steps": 0,
            "epochs": 10_000,
            "patience": 60,
            "min_delta": 1e-5,
        },
    }


@dmlkit.hookimpl
def register_losses(register):
    register(
        dmlkit.ComponentSpec(
            "ccp",
            CCPLoss,
            "CCP multi-proxy wrapper of any loss, k-center re-initialisation (Gurbuz, Can, Alatan)",
            recommends=_recommends,
        )
    )
