"""A run's parts, built from its validated config and the registry it was given: evaluator,
backbone, dataset and its validation split, the embedding model, loss, miner, sampler, callbacks.

Everything here is checked before the first step (and before any file is written): a component
that breaks its kind's contract is named with its plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dmlkit.contract import check_requirements, check_views
from dmlkit.data import DatasetSplits, Split
from dmlkit.errors import DmlkitError
from dmlkit.model import EmbeddingHead, EmbeddingModel, feature_size, input_spec
from dmlkit.proxies import ProxyBank, banks
from dmlkit.registry import Registry
from dmlkit.selection import check_metrics
from dmlkit.splits import Validation, check_splits, hold_out


def options(section: dict[str, Any]) -> dict[str, Any]:
    """A config section's options (its ``name`` left out)."""
    return {k: v for k, v in section.items() if k != "name"}


def describe(registry: Registry, kind: str, name: str) -> str:
    """``kind 'name' (plugin 'p')`` for messages."""
    plugin = registry.get(kind, name).plugin if (kind, name) in registry else "?"
    return f"{kind} '{name}' (plugin '{plugin}')"


@dataclass
class Parts:
    """What a run is made of."""

    evaluator: Any
    backbone: nn.Module
    train: Split  # the dataset's whole training split
    test: Split
    validation: Validation
    model: EmbeddingModel
    loss: nn.Module
    miner: nn.Module | None
    sampler: Any
    callbacks: list[Any]
    banks: list[ProxyBank]
    warnings: list[str] = field(default_factory=list)
    #: id(component) -> (kind, name): whom an error in an event names
    owners: dict[int, tuple[str, str]] = field(default_factory=dict)


def build_data(
    cfg: dict[str, Any], registry: Registry, settings: Any
) -> tuple[Any, nn.Module, DatasetSplits, list[str]]:
    """The evaluator (checked against the metrics the run reads), the backbone, and the dataset
    built for the backbone's input; returns them with the warnings found."""
    evaluator = registry.build("evaluator", cfg["evaluator"]["name"], **options(cfg["evaluator"]))
    warnings = check_metrics(cfg, registry, evaluator)
    check_requirements(cfg, registry, evaluator)  # e.g. a loss similarity it scores with, before data loads
    backbone = registry.build("backbone", cfg["backbone"]["name"], **options(cfg["backbone"]))
    data = registry.build(
        "dataset", cfg["dataset"]["name"], context={"input_spec": input_spec(backbone)}, **options(cfg["dataset"])
    )
    if not isinstance(data, DatasetSplits):
        raise DmlkitError(
            f"{describe(registry, 'dataset', cfg['dataset']['name'])} returned a {type(data).__name__}; a dataset "
            "must return dmlkit.data.DatasetSplits(train, test)"
        )
    warnings += [f"dataset skipped {count} {what} (skip_bad=true)" for what, count in data.skipped.items()]
    warnings += check_splits(cfg["dataset"]["name"], data.train, data.test)
    check_requirements(cfg, registry, evaluator, data)  # e.g. groups it draws episodes within
    return evaluator, backbone, data, warnings


def build_model(backbone: nn.Module, settings: Any, device: torch.device) -> EmbeddingModel:
    """Backbone + embedding head on ``device``; an embedding too large for the machine is one line."""
    t = settings
    try:
        head = EmbeddingHead(
            feature_size(backbone),
            t["embedding_size"],
            t["pooling"],
            t["head_norm"],
            t["normalize_embeddings"],
            t["head_init"],
        )
        model = EmbeddingModel(backbone, head, freeze_bn=t["freeze_bn"]).to(device)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        raise DmlkitError(
            f"not enough memory to build the model with embedding_size {t['embedding_size']}; use a smaller one"
        ) from None
    if t["freeze_backbone"] is True:
        model.freeze_backbone()
    elif t["freeze_backbone"] is not False:  # a stage: the backbone is frozen up to it
        model.freeze_prefix(t["freeze_backbone"])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_parts(
    cfg: dict[str, Any], registry: Registry, settings: Any, device: torch.device, rank: int, world: int
) -> Parts:
    """Every part of a run, in the order that lets each check run before the expensive ones."""
    evaluator, backbone, data, warnings = build_data(cfg, registry, settings)
    validation = hold_out(data.train, data.test.transform, settings)
    warnings += validation.warnings
    model = build_model(backbone, settings, device)
    train = validation.train
    ctx = {"num_classes": train.num_classes, "embedding_size": model.head.out_features}
    loss = module(
        registry,
        "loss",
        cfg["loss"]["name"],
        registry.build("loss", cfg["loss"]["name"], context=ctx, **options(cfg["loss"])),
        device,
    )
    miner = None
    if cfg["miner"]["name"]:
        built = registry.build("miner", cfg["miner"]["name"], context=ctx, **options(cfg["miner"]))
        miner = module(registry, "miner", cfg["miner"]["name"], built, device)
    sampler_ctx = {"labels": train.labels, "batch_size": settings["batch_size"], "seed": settings["seed"]}
    sampler = registry.build(
        "sampler",
        cfg["sampler"]["name"],
        context={**sampler_ctx, "rank": rank, "world_size": world},
        **options(cfg["sampler"]),
    )
    check_views(cfg, registry, loss, sampler, settings)  # two views of each image, before any is embedded
    callbacks = [registry.build("callback", cb["name"], **options(cb)) for cb in cfg["callbacks"]]
    parts = Parts(
        evaluator,
        backbone,
        data.train,
        data.test,
        validation,
        model,
        loss,
        miner,
        sampler,
        callbacks,
        banks(loss),
        warnings,
    )
    parts.owners = {
        id(loss): ("loss", cfg["loss"]["name"]),
        id(sampler): ("sampler", cfg["sampler"]["name"]),
        **{id(b): ("loss", cfg["loss"]["name"]) for b in parts.banks},
        **{id(c): ("callback", cb["name"]) for c, cb in zip(callbacks, cfg["callbacks"])},
    }
    if miner is not None:
        parts.owners[id(miner)] = ("miner", cfg["miner"]["name"])
    return parts


def module(registry: Registry, kind: str, name: str, part: Any, device: torch.device) -> Any:
    """A built loss or miner on the run's device; one that is no initialised ``nn.Module`` is named."""
    if not isinstance(part, nn.Module) or "_modules" not in vars(part):  # .to() would fail obscurely
        raise DmlkitError(
            f"{describe(registry, kind, name)} must be a torch.nn.Module that ran nn.Module.__init__: subclass "
            f"dmlkit.losses.{'MetricLoss' if kind == 'loss' else 'Miner'} and call super().__init__() first"
        )
    return part.to(device)


def replaced_components(cfg: dict[str, Any], registry: Registry) -> list[str]:
    """One line per component of a run that a plugin put in place of another plugin's."""
    out = []
    sections = [(s, cfg[s]) for s in ("dataset", "backbone", "loss", "miner", "sampler", "evaluator")]
    for kind, section in [*sections, *(("callback", cb) for cb in cfg["callbacks"])]:
        name = section.get("name")
        if name and (kind, name) in registry:
            spec = registry.get(kind, name)
            if spec.replaced_plugin:
                out.append(
                    f"{kind} '{spec.name}' is plugin '{spec.plugin}''s replacement of the {kind} "
                    f"'{spec.replaces}' of plugin '{spec.replaced_plugin}'"
                )
    return out


def param_groups(
    model: EmbeddingModel, settings: Any, owners: list[tuple[str, nn.Module | None]]
) -> list[dict[str, Any]]:
    """Backbone, head, and every parameter a loss or miner owns, each with its lr multiplier (a
    proxy bank's own, else the owner's ``lr_multipliers`` entry for the name or a dotted prefix)
    and its weight decay: ``train.weight_decay`` in the optimizer, none for the normalisation
    layers with ``weight_decay_norms = false``, and none in the optimizer for the network when
    ``weight_decay_before_clip`` adds it to the gradients instead."""
    wd = settings["weight_decay"]
    net_wd = 0.0 if settings["weight_decay_before_clip"] else wd
    groups = []
    for name, part, mult in (
        ("backbone", model.backbone, settings["backbone_lr_multiplier"]),
        ("head", model.head, settings["head_lr_multiplier"]),
    ):
        norms = {id(p) for p in norm_parameters(part)} if not settings["weight_decay_norms"] else set()
        params = [p for p in part.parameters() if p.requires_grad]
        groups.append(
            {
                "name": name,
                "params": [p for p in params if id(p) not in norms],
                "lr_multiplier": mult,
                "weight_decay": net_wd,
            }
        )
        groups.append(
            {
                "name": f"{name}.norms",
                "params": [p for p in params if id(p) in norms],
                "lr_multiplier": mult,
                "weight_decay": 0.0,
            }
        )
    for owner_name, owner in owners:
        if owner is None:
            continue
        mults = getattr(owner, "lr_multipliers", {}) or {}
        bank_mults = {id(b.vectors): b.lr_multiplier for b in banks(owner)}
        for pname, p in owner.named_parameters():
            if p.requires_grad:
                mult = next(
                    (m for k, m in mults.items() if pname == k or pname.startswith(k + ".")), bank_mults.get(id(p), 1.0)
                )
                groups.append(
                    {"name": f"{owner_name}.{pname}", "params": [p], "lr_multiplier": float(mult), "weight_decay": wd}
                )
    return [g for g in groups if g["params"]]


def norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of the normalisation layers (BatchNorm, LayerNorm, GroupNorm ...) inside ``module``."""
    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.modules.normalization.RMSNorm)
    return [p for m in module.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)]


def decayed_before_clip(model: EmbeddingModel, settings: Any) -> list[nn.Parameter]:
    """The network's parameters that get ``weight_decay`` added to their gradients before clipping
    (``weight_decay_before_clip``): all trainable ones, less the normalisation layers' with
    ``weight_decay_norms = false``."""
    if not settings["weight_decay_before_clip"] or settings["weight_decay"] == 0:
        return []
    norms = {id(p) for p in norm_parameters(model)} if not settings["weight_decay_norms"] else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in norms]


def optimizer(groups: list[dict[str, Any]], settings: Any) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = settings["lr"] * g["lr_multiplier"]
    kind, lr, wd = settings["optimizer"], settings["lr"], settings["weight_decay"]
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)


def scheduler(opt: torch.optim.Optimizer, settings: Any) -> torch.optim.lr_scheduler.LRScheduler:
    import math

    epochs = settings["epochs"]
    if settings["scheduler"] == "cosine":
        f = lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))  # noqa: E731
    elif settings["scheduler"] == "step":
        f = lambda e: 0.1 ** (e // max(1, epochs // 3))  # noqa: E731
    else:
        f = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)
