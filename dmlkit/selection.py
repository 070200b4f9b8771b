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


class Selection:
    """A run's choice of its best epoch, and its early stop.

    ``best`` is the selection (metric, split, mode, in words) with the best value and epoch so far.
    With ``train.patience`` > 0 the run stops once ``patience`` evaluated epochs in a row have not
    improved the metric by more than ``train.min_delta`` over the value that last did (the best
    epoch itself is still the best value, however small its gain).
    """

    def __init__(self, settings: Any, evaluator: Any, has_validation: bool):
        self.best: dict[str, Any] = {"value": None, "epoch": None, **selection(settings, evaluator, has_validation)}
        self.patience, self.min_delta = settings["patience"], settings["min_delta"]
        self.stale = 0  # evaluated epochs since the metric last improved by more than min_delta
        self._reference: float | None = None
        self._validations: list[float] = []

    def observe(self, record: dict[str, Any]) -> bool:
        """Take an epoch's record; whether it is the best so far (and so saved as best.pt)."""
        key = record_key(self.best)
        value = record.get(key) if key else None
        chosen = self.best["split"] == "last" or (value is not None and is_better(self.best, value))
        if chosen:
            self.best = {**self.best, "value": value, "epoch": record["epoch"]}
        if value is not None and math.isfinite(value):
            gain = math.inf if self._reference is None else value - self._reference
            if self.best["mode"] == "min":
                gain = -gain
            if gain > self.min_delta:
                self._reference, self.stale = value, 0
            else:
                self.stale += 1
        return chosen

    def stop(self) -> bool:
        """Whether patience has run out."""
        return self.patience > 0 and self.stale >= self.patience

    def restore(self, best: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """The selection of a resumed run: its recorded best, and its patience replayed from its log."""
        kept = {k: v for k, v in self.best.items() if k not in ("value", "epoch")}
        for record in history:
            self.observe(record)
        if best.get("value") is not None and not math.isfinite(best["value"]):  # written by dmlkit < 0.2
            best = {**best, "value": None, "epoch": None}
        self.best = {**kept, **{k: v for k, v in best.items() if k in ("value", "epoch")}}

    def validation_warning(self, metrics: dict[str, Any]) -> str | None:
        """A warning when the selection metric has been the same at the first three validations."""
        key = f"val_{self.best['metric']}"
        if key in metrics:
            self._validations.append(metrics[key])
            v = self._validations
            if len(v) == 3 and max(v) - min(v) < 1e-9:
                return (
                    f"{key} is {metrics[key]:.4f} at every validation so far: the validation split tells the models "
                    "apart poorly (too few classes or images?)"
                )
        return None
