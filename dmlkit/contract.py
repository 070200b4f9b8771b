"""The contract between the core and the components of a run, declared in one place.

- :data:`EVENTS`: the training events, when each fires and what it passes. A run's callbacks,
  its loss (and the loss's proxy banks), its miner and its sampler receive every event they
  define as a method, in :data:`DISPATCH_ORDER`.
- :class:`RunContext`: what a component may read and call during a run. Events receive it as
  their first argument (named ``trainer`` in 0.1 plugins; the name does not matter).
- :data:`ATTRIBUTES`: the optional class attributes a component may declare, with their meaning
  and default.
- :data:`EVALUATOR_ARGUMENTS`: the optional keyword arguments of an evaluator's call, passed only to
  an evaluator whose ``__call__`` names them (:func:`evaluator_arguments`).

``docs/hooks.md`` documents each event, member and attribute; ``tests/test_contract.py`` fails
when the page and this module disagree, and ``dmlkit.testing.check_plugin`` checks components
against it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmlkit.errors import DmlkitDeprecationWarning, DmlkitError, OptionError


@dataclass(frozen=True)
class Event:
    name: str
    when: str
    arguments: str = ""


#: The training events, in the order they first fire in a run.
EVENTS: dict[str, Event] = {
    e.name: e
    for e in (
        Event("on_train_start", "before the first epoch of a new run (not when resuming)"),
        Event("on_epoch_start", "before each epoch's first step"),
        Event("on_after_backward", "after `loss.backward()`, before clipping and the optimizer step"),
        Event("on_after_optimizer_step", "after each optimizer step (the step count already includes it)"),
        Event(
            "on_before_validation",
            "before each validation (each evaluated epoch, every `train.val_every_steps` steps, epoch 0)",
        ),
        Event(
            "on_validation_end",
            "after each validation",
            "`metrics`: the `val_*` metrics and the `step`",
        ),
        Event(
            "on_epoch_end",
            "after an epoch's steps, before its validation",
            "`record`: the epoch's log record (mutable)",
        ),
        Event(
            "on_epoch_logged",
            "after an epoch's record is complete (validation included) and written to metrics.jsonl; "
            "the epoch-0 evaluation too",
            "`record`: the record, as metrics.jsonl holds it",
        ),
        Event("on_train_end", "after the last epoch (or a stop), before the test set is read"),
        Event("on_test_end", "after the final test, results.json written", "`results`: results.json's contents"),
    )
}

#: Who receives an event, in this order.
DISPATCH_ORDER = ("callbacks", "loss", "the loss's proxy banks", "miner", "sampler")


@dataclass(frozen=True)
class Member:
    name: str
    doc: str
    settable: bool = False


#: What a component may read (and, where marked, set) or call on the run context.
MEMBERS: dict[str, Member] = {
    m.name: m
    for m in (
        Member("config", "the run's resolved configuration (a dict of sections, as config.toml holds it); read-only"),
        Member("settings", "the `[train]` settings, read-only (`settings.lr` or `settings['lr']`)"),
        Member("run_dir", "the run directory (a `pathlib.Path`)"),
        Member("rank", "this process's rank (0 without torchrun); only rank 0 writes files"),
        Member("world_size", "the number of processes (1 without torchrun)"),
        Member("device", "the `torch.device` the run computes on"),
        Member("epoch", "epochs completed (0 before the first ends)"),
        Member("step", "optimizer steps taken"),
        Member(
            "model",
            "the embedding model (`model.backbone`, `model.head`); a component may read its parameters, and "
            "change them in place in `on_after_optimizer_step` or around a validation (an average of weights)",
        ),
        Member("optimizer", "the `torch.optim.Optimizer` (a proxy bank drops the state of re-initialised vectors)"),
        Member("train_split", "the training split (`dmlkit.data.Split`), validation items excluded"),
        Member("val_split", "the validation split, or `None` when the run does not validate"),
        Member("test_split", "the test split: read it only in `on_test_end` (the test set is read once, at the end)"),
        Member("history", "the log records of the epochs done so far (a list of dicts, as metrics.jsonl holds them)"),
        Member("best", "how the best epoch is chosen and the best so far: `metric`, `mode`, `value`, `epoch`"),
        Member("console", "a `rich.console.Console` to print to (quiet on ranks other than 0)"),
        Member("extra_state", "a dict saved in checkpoints and restored on resume, for a component's own state"),
        Member("stop_requested", "set it to `True` to end the run after the current epoch", settable=True),
        Member("log_event", "`log_event(**info)`: an entry, with epoch and step, in the epoch's `events` list"),
        Member(
            "embed", "`embed(split, what='...')`: `(embeddings, labels)` NumPy arrays of a split, model in eval mode"
        ),
        Member(
            "embed_pool",
            "`embed_pool(rounds, seed, class_ids=None)`: `[C, rounds, D]` embeddings of random training images per "
            "class, with training augmentation, model in eval mode",
        ),
        Member("autocast", "`autocast()`: the run's autocast context (bf16 on a GPU when `train.amp`)"),
    )
}


@dataclass(frozen=True)
class Attribute:
    name: str
    kinds: str
    default: Any
    doc: str


#: Optional class attributes of components, read by the core.
ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute(
            "validate_options",
            "any",
            None,
            "a static method `validate_options(options)` raising `OptionError`; runs with the config, before any "
            "data loads",
        ),
        Attribute(
            "nested_options",
            "any",
            {},
            "`{option: (kind, name_option)}`: options holding a nested component's options, which `dmlkit show` "
            "lists under dotted names",
        ),
        Attribute(
            "reads_metrics_from",
            "loss, miner, sampler, callback",
            (),
            "names of options that hold a validation metric name; each is checked against the evaluator's "
            "`metrics` before data loads",
        ),
        Attribute(
            "lr_multipliers",
            "loss, miner",
            {},
            "`{parameter name or dotted prefix: multiplier}` of the base learning rate (proxy banks carry their own)",
        ),
        Attribute(
            "metrics",
            "evaluator",
            None,
            '`{metric: "max" | "min"}`: what the evaluator reports and in which direction it is better; required '
            "for selection on validation",
        ),
        Attribute(
            "batch_views",
            "loss, sampler",
            1,
            "a sampler's: copies of each image in its batches, laid out `[copy 1; copy 2; ...]` (two_views: 2); a "
            "loss's: the copies it needs (self_supervised: 2), checked against the sampler's once both are built, "
            "before any image is embedded; with `train.feature_cache` each copy takes another cached view",
        ),
        Attribute("needs_pool", "proxy_initializer", True, "`False` when it needs no embedded pool (`pool` is None)"),
        Attribute(
            "combines_terms", "loss", False, "`True` on the loss that `--loss a+0.5*b` builds (one per registry)"
        ),
        Attribute(
            "similarity",
            "loss",
            None,
            "a method `similarity(x, y)`: `[n, m]` learned scores of every pair of rows of two embedding tensors, "
            "higher = more alike (the siamese loss's weighted L1 + sigmoid); evaluators get it as `similarity=`",
        ),
        Attribute(
            "requires",
            "evaluator",
            {},
            "`{argument: the option that asks for it}`: evaluator arguments it cannot do without as configured; a "
            "run whose loss class has no `similarity` is refused before data loads, one whose dataset has no "
            "`groups` once the dataset is read",
        ),
    )
}

#: Optional keyword arguments of an evaluator's call, beyond ``(embeddings, labels, query_mask,
#: gallery_mask)``: the trainer and ``dmlkit evaluate`` pass each one to an evaluator whose
#: ``__call__`` names it as a parameter (not through ``**kwargs``), and to no other.
EVALUATOR_ARGUMENTS: dict[str, str] = {
    "groups": "a NumPy array with the group of each evaluated item (`Split.groups`: Omniglot's alphabet of each "
    "character; a group holds whole classes), or `None` when the split has none",
    "similarity": "`similarity(x, y)`: the run loss's `similarity` on NumPy arrays `[n, D]`, `[m, D]` -> `[n, m]` "
    "(no gradients, on the loss's device, in the inputs' float precision), or `None` when the loss has none",
}


def loss_similarity(loss: Any) -> Callable[[Any, Any], Any] | None:
    """The ``similarity`` argument for a run whose loss is ``loss``: its ``similarity`` method on
    NumPy arrays (float64 stays float64, anything else is float32), or None when it has none."""
    method = getattr(loss, "similarity", None)
    if not callable(method):
        return None
    import numpy as np
    import torch

    device = next((p.device for p in loss.parameters()), torch.device("cpu"))

    def similarity(x: Any, y: Any) -> Any:
        dtype = torch.float64 if np.asarray(x).dtype == np.float64 else torch.float32
        with torch.no_grad():
            out = method(torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(y, dtype=dtype, device=device))
        return out.to(dtype).cpu().numpy()

    return similarity


def evaluator_arguments(evaluator: Any, split: Any = None, loss: Any = None) -> dict[str, Any]:
    """The :data:`EVALUATOR_ARGUMENTS` that ``evaluator``'s ``__call__`` names, for ``split`` evaluated in a
    run whose loss is ``loss``."""
    try:
        params = inspect.signature(evaluator).parameters
    except (TypeError, ValueError):
        return {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    out: dict[str, Any] = {}
    if "groups" in named:
        out["groups"] = getattr(split, "groups", None)
    if "similarity" in named:
        out["similarity"] = loss_similarity(loss)
    return out


def check_requirements(cfg: dict[str, Any], registry: Any, evaluator: Any, data: Any = None) -> None:
    """Refuses a run that cannot give its evaluator an argument it ``requires``: the loss's
    ``similarity`` (read on the loss's class, before data loads; a loss built by a function is checked
    when the evaluator is called) and, given ``data`` (the dataset's splits), groups in both splits."""
    required = dict(getattr(evaluator, "requires", None) or {})
    name = cfg["evaluator"]["name"]
    unknown = sorted(set(required) - set(EVALUATOR_ARGUMENTS))
    if unknown:
        raise DmlkitError(
            f"evaluator '{name}' requires {', '.join(unknown)}, which no run provides; evaluator arguments: "
            + ", ".join(EVALUATOR_ARGUMENTS)
        )
    loss = cfg["loss"]["name"]
    factory = registry.get("loss", loss).factory
    if data is None and "similarity" in required and isinstance(factory, type):
        if not callable(getattr(factory, "similarity", None)):
            raise OptionError(
                f"evaluator '{name}' ({required['similarity']}) scores with the loss's learned similarity, and loss "
                f"'{loss}' has none (siamese has one); pick such a loss or change that evaluator option"
            )
    if data is not None and "groups" in required:
        bare = [part for part in ("train", "test") if getattr(data, part).groups is None]
        if bare:
            raise OptionError(
                f"evaluator '{name}' ({required['groups']}) needs groups of classes, and dataset "
                f"'{cfg['dataset']['name']}' gives none for its {' and '.join(bare)} split (omniglot gives its "
                "alphabets); change that evaluator option"
            )


def check_views(cfg: dict[str, Any], registry: Any, loss: Any, sampler: Any, settings: Any) -> None:
    """Refuses, once loss and sampler are built and before any image is embedded, a run whose loss
    (or a part of it) needs each batch as ``batch_views`` copies of its images that its sampler does
    not give, and a feature-cache run with fewer cached views than the sampler's copies of an image."""
    modules = loss.modules() if hasattr(loss, "modules") else [loss]
    needs = {getattr(m, "batch_views", 1) for m in modules} - {1}
    gives = getattr(sampler, "batch_views", 1)
    sampler_name, loss_name = cfg["sampler"]["name"], cfg["loss"]["name"]
    if needs and needs != {gives}:
        need = max(needs)
        raise OptionError(
            f"loss '{loss_name}' needs each batch as {need} views of the same images ([view1; view2], row i and "
            f"row i + n/2 one image), and sampler '{sampler_name}' gives "
            + (f"{gives}" if gives != 1 else "each image once")
            + (
                f"; use --sampler two_views (--sampler-opt base={sampler_name} keeps its batches)"
                if need == 2 and ("sampler", "two_views") in registry
                else ""
            )
        )
    if settings["feature_cache"] and gives > settings["cache_views"]:
        raise OptionError(
            f"sampler '{sampler_name}' gives {gives} copies of each image in a batch, each to take another cached "
            f"view, and train.cache_views is {settings['cache_views']}; set train.cache_views >= {gives}"
        )


class RunContext:
    """The run as a component sees it: the members of :data:`MEMBERS`, nothing else.

    Reading another attribute of the trainer still works in 0.2, with a ``DeprecationWarning``
    that names the attribute (it will fail in 0.3).
    """

    __slots__ = ("_trainer",)

    def __init__(self, trainer: Any):
        object.__setattr__(self, "_trainer", trainer)

    def __getattr__(self, name: str) -> Any:
        trainer = object.__getattribute__(self, "_trainer")
        if name in MEMBERS:
            return getattr(trainer, name)
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(trainer, name)  # AttributeError as usual for a name the trainer lacks too
        warnings.warn(
            f"run context: '{name}' is not part of dmlkit's run context (docs/hooks.md lists it); reading the "
            "trainer's internals works in 0.2 and fails in 0.3",
            DmlkitDeprecationWarning,
            stacklevel=2,
        )
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        member = MEMBERS.get(name)
        if member is None or not member.settable:
            raise AttributeError(f"run context: '{name}' cannot be set; settable: stop_requested")
        setattr(object.__getattribute__(self, "_trainer"), name, value)

    def __dir__(self) -> list[str]:
        return sorted(MEMBERS)

    def __repr__(self) -> str:
        return f"RunContext(epoch={self.epoch}, step={self.step})"
