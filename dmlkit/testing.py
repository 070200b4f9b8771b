"""Helpers for plugin authors' own tests.

from dmlkit.testing import check_plugin
import my_plugin

def test_my_plugin():
    report = check_plugin(my_plugin)
    assert report.components == {"loss": ["circle"]}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from dmlkit.errors import DmlkitError
from dmlkit.plugins import PluginHost

#: Values the trainer supplies at run time, used to build components with their defaults.
CONTEXT: dict[str, Any] = {"num_classes": 4, "embedding_size": 16}


@dataclass
class PluginReport:
    name: str
    hooks: list[str]
    components: dict[str, list[str]] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)


def tiny_batch(n: int = 16, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch of random embeddings with every class present at least twice."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.arange(n) % classes


def check_plugin(
    module: ModuleType | Any,
    name: str | None = None,
    with_builtins: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PluginReport:
    """Register ``module`` beside the built-ins, then build and call each of its components on tiny
    data with the context the trainer gives that kind.

    Raises :class:`~dmlkit.errors.DmlkitError` naming the plugin, kind, component and what to fix
    when the plugin fails to register or clashes with another, an option's default does not fit its
    annotation, or a component fails to build with its defaults or breaks its kind's contract:

    - loss: an ``nn.Module`` returning a finite scalar that back-propagates to the embeddings;
    - miner: an ``nn.Module`` returning 3 (triplets) or 4 (pairs) index tensors of equal length
      within the batch, which a built-in loss accepts;
    - sampler: ``len()`` batches of dataset indices after ``set_epoch``, the same number on every
      rank (ranks that disagree hang a distributed run);
    - evaluator: a dict of numbers holding every metric it declares in ``metrics``, each with a
      direction "max" or "min";
    - proxy_initializer: ``[C, k, D]`` finite proxies from a pool (``None`` when ``needs_pool`` is
      false);
    - backbone: a forward pass on its ``input_spec`` giving ``out_features`` channels;
    - callback: every ``on_*`` method is a training event (a typo is never called).

    Components are built with their defaults, or with ``options[component_name]`` when given
    (e.g. ``{"my_backbone": {"pretrained": False}}`` for one whose default needs weights on disk).
    Datasets need data on disk: test them with a fixture of your own.
    """
    host = PluginHost()
    if with_builtins:
        host.load_entry_points("builtin")
    name = name or getattr(module, "__name__", "plugin")
    info = host.add_plugin(module, name)
    if info.errors:
        raise DmlkitError(f"plugin '{name}' did not register cleanly: {'; '.join(info.errors)}")
    report = PluginReport(name=name, hooks=info.hooks)
    for kind, spec in host.registry:
        if spec.plugin != name:
            continue
        report.components.setdefault(kind, []).append(spec.name)
        problems = spec.default_problems()
        if problems:
            raise DmlkitError(f"{kind} {next(iter(problems.values()))}")
        if kind == "dataset":  # datasets need data on disk: the author tests them with a fixture
            continue
        where = f"{kind} '{spec.name}' (plugin '{name}')"
        opts = dict((options or {}).get(spec.name, {}))
        obj = host.registry.build(kind, spec.name, context=_context(kind), **opts)
        report.built[f"{kind}:{spec.name}"] = obj
        try:
            _CHECKS[kind](obj, host, spec, opts)
        except DmlkitError as exc:
            raise DmlkitError(f"{where}: {exc}") from None
        except Exception as exc:
            raise DmlkitError(f"{where} failed when called: {type(exc).__name__}: {exc}") from exc
    if not report.components and "register_commands" not in info.hooks:
        raise DmlkitError(f"plugin '{name}' registered no component")
    return report


def _context(kind: str, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """What the trainer passes when it builds a component of ``kind``."""
    if kind == "sampler":
        return {"labels": SAMPLER_LABELS, "batch_size": 16, "seed": 0, "rank": rank, "world_size": world_size}
    return dict(CONTEXT)


#: Training labels a sampler is checked on: 32 classes of 8 items.
SAMPLER_LABELS = np.repeat(np.arange(32), 8)


def _module(kind: str, obj: Any, base: str) -> None:
    if not isinstance(obj, nn.Module) or "_modules" not in vars(obj):
        raise DmlkitError(
            f"must be a torch.nn.Module (the trainer moves it to the device and saves its state); "
            f"subclass {base} and call super().__init__() first in __init__"
        )


def _check_loss(loss: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    _module("loss", loss, "dmlkit.losses.MetricLoss")
    emb, labels = tiny_batch(dim=CONTEXT["embedding_size"], classes=CONTEXT["num_classes"])
    emb.requires_grad_(True)
    calls = {"loss(embeddings, labels)": lambda: loss(emb, labels)}
    if ("miner", "batch_all") in host.registry:  # as the trainer calls it with a miner
        mined = host.registry.build("miner", "batch_all")(emb, labels)
        calls["loss(embeddings, labels, indices=mined)"] = lambda: loss(emb, labels, indices=mined)
    for call, fn in calls.items():
        emb.grad = None
        value = fn()
        if not (isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value)):
            raise DmlkitError(f"{call} must return a finite scalar tensor; got {value!r}")
        value.backward()
        if emb.grad is None:
            raise DmlkitError(f"{call} does not back-propagate to the embeddings")


def _check_miner(miner: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    _module("miner", miner, "dmlkit.losses.Miner")
    emb, labels = tiny_batch(dim=CONTEXT["embedding_size"], classes=CONTEXT["num_classes"])
    out = miner(emb, labels)
    if not isinstance(out, tuple | list) or len(out) not in (3, 4):
        raise DmlkitError(
            "must return (anchor, positive, negative) or (anchor1, positive, anchor2, negative) index tensors; "
            f"got {type(out).__name__}"
        )
    for t in out:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.ndim != 1:
            raise DmlkitError(f"must return 1-d int64 index tensors; got {t!r}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(labels)):
            raise DmlkitError(f"returned an index outside the batch of {len(labels)}")
    sizes = [len(out[0]), len(out[1])] if len(out) == 4 else [len(t) for t in out]
    if len(set(sizes)) != 1 or (len(out) == 4 and len(out[2]) != len(out[3])):
        raise DmlkitError(f"returned index tensors of different lengths: {[len(t) for t in out]}")
    if ("loss", "contrastive") in host.registry:  # the trainer hands the indices to a loss
        value = host.registry.build("loss", "contrastive")(emb, labels, tuple(out))
        if not torch.isfinite(value):
            raise DmlkitError("its indices give a non-finite contrastive loss")
    stats = miner.stats() if hasattr(miner, "stats") else {}
    if not isinstance(stats, dict):
        raise DmlkitError(f"stats() must return a dict; got {type(stats).__name__}")


def _check_sampler(sampler: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    n = len(SAMPLER_LABELS)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(1)
    batches = list(sampler)
    if len(batches) != len(sampler):
        raise DmlkitError(f"len() says {len(sampler)} batches but iterating gave {len(batches)}")
    if not batches:
        raise DmlkitError(f"gave no batch for {n} training items and batch_size 16")
    for b in batches:
        if not len(b) or not all(isinstance(i, int | np.integer) and 0 <= int(i) < n for i in b):
            raise DmlkitError(f"each batch must be a non-empty list of dataset indices in [0, {n}); got {list(b)[:8]}")
    lengths = []
    for rank in (0, 1):
        other = host.registry.build("sampler", spec.name, context=_context("sampler", rank, 2), **opts)
        if hasattr(other, "set_epoch"):
            other.set_epoch(1)
        lengths.append(len(other))
    if lengths[0] != lengths[1]:
        raise DmlkitError(f"ranks 0 and 1 of 2 get {lengths[0]} and {lengths[1]} batches; every rank needs the same")


def _check_evaluator(evaluator: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    emb, labels = tiny_batch(n=128, dim=8, classes=32)  # enough classes for a 20-way episode
    out = evaluator(emb.numpy(), labels.numpy(), None, None)
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise DmlkitError(f"must return a dict of metrics by name; got {type(out).__name__}")
    declared = getattr(evaluator, "metrics", None)
    if declared is None:
        return
    if not isinstance(declared, dict) or not all(v in ("max", "min") for v in declared.values()):
        raise DmlkitError(f'metrics must be {{name: "max" | "min"}}; got {declared!r}')
    missing = [m for m in declared if m not in out]
    if missing:
        raise DmlkitError(f"declares metric '{missing[0]}' but did not return it (returned: {', '.join(out)})")
    bad = [m for m in declared if not isinstance(out[m], int | float) or not np.isfinite(out[m])]
    if bad:
        raise DmlkitError(f"metric '{bad[0]}' must be a finite number; got {out[bad[0]]!r}")


def _check_proxy_initializer(init: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(4, 6, 16, generator=g) if getattr(init, "needs_pool", True) else None
    out = init(pool, torch.randn(4, 2, 16, generator=g), 3)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (4, 3, 16) or not torch.isfinite(out).all():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DmlkitError(f"must return finite proxies [C, k, D] = (4, 3, 16) for k=3; got {shape}")


def _check_backbone(backbone: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    from dmlkit.model import feature_size, input_spec

    _module("backbone", backbone, "torch.nn.Module")
    s = input_spec(backbone)
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, s["channels"], s["image_size"], s["image_size"]))
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, 4) or out.shape[0] != 2:
        raise DmlkitError("must map [B, C, H, W] images to feature maps [B, C', h, w] or vectors [B, C']")
    if out.shape[1] != feature_size(backbone):
        raise DmlkitError(f"out_features is {feature_size(backbone)} but the output has {out.shape[1]} channels")


def _check_callback(callback: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    from dmlkit.train import EVENTS

    for attr in dir(callback):
        if attr.startswith("on_") and callable(getattr(callback, attr)) and attr not in EVENTS:
            raise DmlkitError(f"'{attr}' is not a training event and would never be called; events: {', '.join(EVENTS)}")


_CHECKS = {
    "loss": _check_loss,
    "miner": _check_miner,
    "sampler": _check_sampler,
    "evaluator": _check_evaluator,
    "proxy_initializer": _check_proxy_initializer,
    "backbone": _check_backbone,
    "callback": _check_callback,
}
