"""Helpers for plugin authors' own tests.

from dmlkit.testing import check_plugin
import my_plugin

def test_my_plugin():
    report = check_plugin(my_plugin)
    assert report.components == {"loss": ["circle"]}
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from dmlkit.contract import EVALUATOR_ARGUMENTS, EVENTS, MEMBERS, RunContext
from dmlkit.errors import DmlkitError
from dmlkit.plugins import PluginHost
from dmlkit.registry import KINDS

#: Values the trainer supplies at run time, used to build components with their defaults.
CONTEXT: dict[str, Any] = {"num_classes": 4, "embedding_size": 16}


@dataclass
class PluginReport:
    name: str
    hooks: list[str]
    components: dict[str, list[str]] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)
    #: deprecation warnings the plugin's components caused (also re-issued as warnings)
    deprecations: list[str] = field(default_factory=list)
    #: what was not checked, and why (a dataset without ``options``)
    skipped: list[str] = field(default_factory=list)


def tiny_batch(n: int = 16, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch of random embeddings with every class present at least twice."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.arange(n) % classes


def check_plugin(
    module: ModuleType | Any,
    name: str | None = None,
    with_builtins: bool | str = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PluginReport:
    """Register ``module`` beside the built-ins, then build and call each of its components on tiny
    data with the context the trainer gives that kind. ``with_builtins``: all built-in plugins
    (True), none (False), or some, named as ``$DMLKIT_PLUGINS`` names them (``"losses,proxies"``).

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

    - dataset: built with ``options[name]`` (a dataset needs data on disk: without options it is
      skipped, and ``report.skipped`` says so), returning ``DatasetSplits`` whose splits pass the
      trainer's checks;
    - every kind: the optional class attributes of :data:`dmlkit.contract.ATTRIBUTES` have the
      declared form; callbacks' events are called in order with a stub run context that has only
      the members of :data:`dmlkit.contract.MEMBERS` (reading anything else fails).

    Components are built with their defaults, or with ``options[component_name]`` when given
    (e.g. ``{"my_backbone": {"pretrained": False}}`` for one whose default needs weights on disk).
    Nested components are built from the same registry (``dmlkit.get_registry()`` inside a factory
    returns it). A ``DeprecationWarning`` the plugin causes is re-issued and listed in
    ``report.deprecations``.
    """
    host = PluginHost()
    if with_builtins:
        host.load_entry_points("builtin" if with_builtins is True else str(with_builtins))
    name = name or getattr(module, "__name__", "plugin")
    info = host.add_plugin(module, name)
    if info.errors:
        raise DmlkitError(f"plugin '{name}' did not register cleanly: {'; '.join(info.errors)}")
    report = PluginReport(name=name, hooks=info.hooks)
    with warnings.catch_warnings(record=True) as caught, host.registry.active():
        warnings.simplefilter("always", DeprecationWarning)
        for kind, spec in host.registry:
            if spec.plugin == name:
                _check_component(host, kind, spec, dict((options or {}).get(spec.name, {})), report)
    for w in caught:
        if issubclass(w.category, DeprecationWarning) and str(w.message) not in report.deprecations:
            report.deprecations.append(str(w.message))
            warnings.warn(f"plugin '{name}': {w.message}", DeprecationWarning, stacklevel=2)
    if not report.components and "register_commands" not in info.hooks:
        raise DmlkitError(f"plugin '{name}' registered no component")
    return report


def _check_component(host: PluginHost, kind: str, spec: Any, opts: dict[str, Any], report: PluginReport) -> None:
    report.components.setdefault(kind, []).append(spec.name)
    problems = spec.default_problems()
    if problems:
        raise DmlkitError(f"{kind} {next(iter(problems.values()))}")
    where = f"{kind} '{spec.name}' (plugin '{report.name}')"
    try:
        _check_attributes(kind, spec)
    except DmlkitError as exc:
        raise DmlkitError(f"{where}: {exc}") from None
    if kind == "dataset" and not opts:
        report.skipped.append(f"dataset '{spec.name}': not built (pass options={{'{spec.name}': {{...}}}} to build it)")
        return
    obj = host.registry.build(kind, spec.name, context=_context(kind), **opts)
    report.built[f"{kind}:{spec.name}"] = obj
    try:
        _CHECKS[kind](obj, host, spec, opts)
    except DmlkitError as exc:
        raise DmlkitError(f"{where}: {exc}") from None
    except Exception as exc:
        raise DmlkitError(f"{where} failed when called: {type(exc).__name__}: {exc}") from exc


def _check_attributes(kind: str, spec: Any) -> None:
    """The optional class attributes of :data:`dmlkit.contract.ATTRIBUTES` have their declared form."""
    factory = spec.factory
    params = spec.parameters()
    check = getattr(factory, "validate_options", None)
    if check is not None and not callable(check):
        raise DmlkitError("validate_options must be a static method validate_options(options)")
    nested = getattr(factory, "nested_options", {}) or {}
    if not isinstance(nested, dict):
        raise DmlkitError(f"nested_options must be a dict {{option: (kind, name_option)}}; got {nested!r}")
    for option, value in nested.items():
        if not (isinstance(value, tuple | list) and len(value) == 2 and value[0] in KINDS):
            raise DmlkitError(f"nested_options['{option}'] must be (kind, name_option or None); got {value!r}")
        if option not in params and not spec.accepts_any_option():
            raise DmlkitError(f"nested_options names '{option}', which is not one of its options")
    readers = getattr(factory, "reads_metrics_from", ()) or ()
    if not isinstance(readers, tuple | list) or any(r not in params for r in readers):
        raise DmlkitError(f"reads_metrics_from must list options of the component; got {readers!r}")
    mults = getattr(factory, "lr_multipliers", {})
    if not isinstance(mults, dict) and not isinstance(mults, property):
        raise DmlkitError(f"lr_multipliers must be a dict {{parameter name: multiplier}}; got {mults!r}")
    views = getattr(factory, "batch_views", 1)
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise DmlkitError(f"batch_views must be an integer >= 1 (copies of each image in a batch); got {views!r}")
    similarity = getattr(factory, "similarity", None) if kind == "loss" else None
    if similarity is not None and not callable(similarity):
        raise DmlkitError(f"similarity must be a method similarity(x, y) -> [n, m] scores; got {similarity!r}")
    requires = getattr(factory, "requires", {}) if kind == "evaluator" else {}
    if isinstance(requires, property):  # set per instance from its options: checked when it runs
        requires = {}
    if not isinstance(requires, dict) or any(a not in EVALUATOR_ARGUMENTS for a in requires):
        raise DmlkitError(
            f"requires must be a dict {{argument: option}} with arguments among {', '.join(EVALUATOR_ARGUMENTS)}; "
            f"got {requires!r}"
        )


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
    for attr in dir(callback):
        if attr.startswith("on_") and callable(getattr(callback, attr)) and attr not in EVENTS:
            raise DmlkitError(
                f"'{attr}' is not a training event and would never be called; events: {', '.join(EVENTS)}"
            )
    run = stub_run()
    for event, kwargs in stub_events():
        fn = getattr(callback, event, None)
        if fn is None:
            continue
        try:
            fn(run, **kwargs)
        except AttributeError as exc:
            raise DmlkitError(
                f"{event} read something the run context does not have ({exc}); docs/hooks.md lists what it has"
            ) from None
        except TypeError as exc:
            raise DmlkitError(
                f"{event} must take (run, {', '.join(kwargs)}) as the contract passes them: {exc}"
            ) from None
        except DmlkitError:
            raise
        except Exception as exc:
            raise DmlkitError(f"failed in {event} on a stub run: {type(exc).__name__}: {exc}") from exc


def stub_events() -> list[tuple[str, dict[str, Any]]]:
    """Every training event once, in the order a one-epoch run fires them, with plausible arguments."""
    metrics = {"val_precision_at_1": 0.5, "val_map_at_r": 0.25, "step": 4}
    record = {"epoch": 1, "step": 4, "loss": 0.7, "lr": 1e-3, "images_per_s": 100.0}
    test = {"precision_at_1": 0.4, "map_at_r": 0.2}
    results = {
        "selected_by": "best by validation map_at_r",
        "selection_split": "val",
        "best_metric": "map_at_r",
        "best_value": 0.25,
        "best_epoch": 1,
        "last_epoch": 1,
        "test": test,
        "test_last": test,
    }
    kwargs = {
        "on_validation_end": {"metrics": metrics},
        "on_epoch_end": {"record": dict(record)},
        "on_epoch_logged": {"record": {**record, **metrics}},
        "on_test_end": {"results": results},
    }
    order = [
        "on_train_start",
        "on_epoch_start",
        "on_after_backward",
        "on_after_optimizer_step",
        "on_epoch_end",
        "on_before_validation",
        "on_validation_end",
        "on_epoch_logged",
        "on_train_end",
        "on_test_end",
    ]
    assert set(order) == set(EVENTS)
    return [(e, kwargs.get(e, {})) for e in order]


class _StubTrainer:
    """A tiny run with exactly the members of the run context (see :func:`stub_run`)."""

    def __init__(self, tmp: Path):
        from rich.console import Console

        from dmlkit.config import default_config
        from dmlkit.data import Split
        from dmlkit.model import EmbeddingHead, EmbeddingModel
        from dmlkit.settings import Settings

        g = torch.Generator().manual_seed(0)
        self.config = default_config()
        self.settings = Settings({})
        self.run_dir, self.rank, self.world_size, self.device = tmp, 0, 1, torch.device("cpu")
        self.epoch, self.step = 1, 4
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        backbone.out_features = 8
        self.model = EmbeddingModel(backbone, EmbeddingHead(8, 4))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        items = list(torch.randn(24, 1, 4, 4, generator=g))
        labels = np.arange(24) % 4
        self.train_split = Split(items[:16], labels[:16])
        self.val_split = Split(items[16:], labels[16:] % 2)
        self.test_split = Split(items[16:], labels[16:] % 2)
        self.history = [{"epoch": 1, "step": 4, "loss": 0.7}]
        self.best = {"metric": "map_at_r", "mode": "max", "split": "val", "value": 0.25, "epoch": 1}
        self.console = Console(quiet=True)
        self.extra_state: dict[str, Any] = {}
        self.stop_requested = False
        self.events: list[dict[str, Any]] = []

    def log_event(self, **info: Any) -> None:
        self.events.append(info)

    @torch.no_grad()
    def embed(self, split: Any, what: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
        x = torch.stack([torch.as_tensor(i) for i in split.items])
        was = self.model.training
        out = self.model.eval()(x).numpy()
        self.model.train(was)
        return out, np.asarray(split.labels)

    def embed_pool(self, rounds: int, seed: int, class_ids: Any = None) -> torch.Tensor:
        classes = np.unique(self.train_split.labels) if class_ids is None else class_ids
        return torch.randn(len(classes), rounds, 4, generator=torch.Generator().manual_seed(seed))

    def autocast(self) -> Any:
        return contextlib.nullcontext()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the run context has no '{name}'")


def stub_run(tmp: Path | None = None) -> RunContext:
    """A run context over a tiny stub run (a 4-d embedding model, 16 training items of 4 classes,
    8 validation and test items), for calling a component's events in a test. Its members are
    exactly those of :data:`dmlkit.contract.MEMBERS`; anything else raises ``AttributeError``."""
    import tempfile

    stub = _StubTrainer(tmp or Path(tempfile.mkdtemp(prefix="dmlkit-stub-run-")))
    missing = [m for m in MEMBERS if m not in vars(stub) and not hasattr(type(stub), m)]
    assert not missing, missing
    return RunContext(stub)


def _check_dataset(data: Any, host: PluginHost, spec: Any, opts: dict[str, Any]) -> None:
    from dmlkit.data import DatasetSplits
    from dmlkit.splits import check_splits

    if not isinstance(data, DatasetSplits):
        raise DmlkitError(f"must return dmlkit.data.DatasetSplits(train, test); got {type(data).__name__}")
    check_splits(spec.name, data.train, data.test)
    overlap = set(data.train.class_names) & set(data.test.class_names) if data.train.class_names else set()
    if overlap:
        raise DmlkitError(f"its training and test classes overlap ({sorted(overlap)[:3]}); they must be disjoint")


_CHECKS = {
    "dataset": _check_dataset,
    "loss": _check_loss,
    "miner": _check_miner,
    "sampler": _check_sampler,
    "evaluator": _check_evaluator,
    "proxy_initializer": _check_proxy_initializer,
    "backbone": _check_backbone,
    "callback": _check_callback,
}
