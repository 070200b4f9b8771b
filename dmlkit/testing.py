"""Helpers for plugin authors' own tests.

from dmlkit.testing import check_plugin
import my_plugin

def test_my_plugin():
    report = check_plugin(my_plugin)
    assert report.components == {"loss": ["circle"]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

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


def check_plugin(module: ModuleType | Any, name: str | None = None, with_builtins: bool = True) -> PluginReport:
    """Register ``module`` beside the built-ins and check it cleanly registers and builds.

    Raises :class:`~dmlkit.errors.DmlkitError` naming the problem when the plugin fails to
    register, clashes with another plugin, or a component fails to build with its defaults.
    Losses are also called on :func:`tiny_batch` and must give a finite value that
    back-propagates.
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
        if kind == "dataset":  # datasets need data on disk: the author tests them with a fixture
            continue
        obj = host.registry.build(kind, spec.name, context=CONTEXT)
        report.built[f"{kind}:{spec.name}"] = obj
        if kind == "loss":
            emb, labels = tiny_batch(dim=CONTEXT["embedding_size"], classes=CONTEXT["num_classes"])
            emb.requires_grad_(True)
            value = obj(emb, labels)
            if not (isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value)):
                raise DmlkitError(f"loss '{spec.name}' must return a finite scalar tensor; got {value!r}")
            value.backward()
            if emb.grad is None:
                raise DmlkitError(f"loss '{spec.name}' does not back-propagate to the embeddings")
    if not report.components and "register_commands" not in info.hooks:
        raise DmlkitError(f"plugin '{name}' registered no component")
    return report
