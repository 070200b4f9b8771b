"""Choosing a run's best epoch: which metric, read on which split, in which direction.

By default a run keeps the epoch with the best *validation* value of ``train.best_metric``
(``best.pt``); ``selection = "last"`` keeps the last epoch, and ``"test_set_biased"`` picks on the
test set (loud: its numbers are optimistic). Every metric a setting or a component names is checked
against what the evaluator declares before any data loads.
"""

from __future__ import annotations

import math
from typing import Any

from dmlkit.errors import DmlkitError
from dmlkit.registry import Registry


def declared_metrics(evaluator: Any) -> dict[str, str] | None:
    """``{metric: "max" | "min"}`` that an evaluator declares (its ``metrics`` attribute), or None."""
    declared = getattr(evaluator, "metrics", None)
    return dict(declared) if isinstance(declared, dict) else None


def metric_direction(evaluator: Any, metric: str) -> str:
    """ "max" or "min" for ``metric``: as the evaluator declares it (undeclared: higher is better)."""
    return (declared_metrics(evaluator) or {}).get(metric, "max")


def metric_readers(cfg: dict[str, Any], registry: Registry) -> list[tuple[str, Any]]:
    """``(where, metric)`` for ``train.best_metric`` and every option a component of the run names
    in its ``reads_metrics_from`` class attribute (loss, miner, sampler, callbacks)."""
    wanted: list[tuple[str, Any]] = [("train.best_metric", cfg["train"]["best_metric"])]
    sections = [(s, cfg[s]) for s in ("loss", "miner", "sampler")] + [("callback", cb) for cb in cfg["callbacks"]]
    for kind, section in sections:
        name = section.get("name")
        if not name:
            continue
        factory = registry.get(kind, name).factory
        for option in getattr(factory, "reads_metrics_from", ()) or ():
            wanted.append((f"{kind} '{name}' option {option}", section.get(option)))
    return wanted


def check_metrics(cfg: dict[str, Any], registry: Registry, evaluator: Any) -> list[str]:
    """Every metric the run reads must be one the evaluator declares. An evaluator that declares
    nothing cannot be checked: the returned warning says so, and the first validation then checks
    that the metric is there."""
    declared = declared_metrics(evaluator)
    name = cfg["evaluator"]["name"]
    if declared is None:
        if cfg["train"]["best_metric"] == "loss" or cfg["train"]["selection"] == "last":
            return []
        return [
            f"evaluator '{name}' declares no `metrics`, so train.best_metric = {cfg['train']['best_metric']!r} cannot "
            "be checked before training; the first validation stops the run if the evaluator does not report it "
            '(declare metrics = {"name": "max" | "min"} on the evaluator)'
        ]
    for where, metric in metric_readers(cfg, registry):
        if metric == "loss" and where == "train.best_metric":
            continue
        if metric not in declared:
            raise DmlkitError(
                f"{where} = {metric!r} is not a metric of evaluator '{name}'; valid: {', '.join(sorted(declared))}"
                + (", loss" if where == "train.best_metric" else "")
            )
    return []


def selection(settings: Any, evaluator: Any, has_validation: bool) -> dict[str, Any]:
    """How a run picks its best epoch: metric, the split it is read on (``val``, ``test``,
    ``train`` for the loss, ``last``), direction, and in words."""
    metric = settings["best_metric"]
    if metric == "loss":
        return {"metric": "loss", "split": "train", "mode": "min", "selected_by": "best = lowest training loss"}
    mode = metric_direction(evaluator, metric)
    if settings["selection"] == "last" or (settings["selection"] == "validation" and not has_validation):
        return {"metric": metric, "split": "last", "mode": mode, "selected_by": "best = last epoch"}
    if settings["selection"] == "test_set_biased":
        return {"metric": metric, "split": "test", "mode": mode, "selected_by": f"best by TEST {metric} (biased)"}
    return {"metric": metric, "split": "val", "mode": mode, "selected_by": f"best by validation {metric}"}


def record_key(best: dict[str, Any]) -> str | None:
    """The key of an epoch's record that holds the selection metric (None: the last epoch wins)."""
    return {"val": f"val_{best['metric']}", "test": best["metric"], "train": "loss"}.get(best["split"])


def is_better(best: dict[str, Any], value: float) -> bool:
    """Whether ``value`` beats the best so far (a non-finite value never does)."""
    if not math.isfinite(value):
        return False
    if best["value"] is None:
        return True
    return value < best["value"] if best["mode"] == "min" else value > best["value"]
