"""Trainer settings (the ``[train]`` section), each declared once: type, default, bounds and help.

``dmlkit show train`` prints this table; :func:`dmlkit.config.validate` checks a config against it;
the trainer reads a run's settings as attributes of :class:`Settings` (``settings.lr``), and
components read them as a mapping (``settings["seed"]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dmlkit.errors import OptionError


@dataclass(frozen=True)
class Setting:
    """One trainer setting. ``minimum``/``maximum`` bound numbers (``above`` makes the minimum
    exclusive); ``choices`` lists the allowed strings."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    #: the types a value may have, when more than the default's
    types: tuple[type, ...] = ()

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def type_name(self) -> str:
        return " | ".join(t.__name__ for t in self.types) if self.types else self.type.__name__

    def bounds(self) -> str:
        """The allowed values in words: ``> 0``, ``0 to 1024``, ``one of adam, adamw, sgd``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low = (
            None if self.minimum is None else (f"> {_num(self.minimum)}" if self.above else f">= {_num(self.minimum)}")
        )
        high = None if self.maximum is None else f"<= {_num(self.maximum)}"
        return ", ".join(x for x in (low, high) if x)

    def check(self, value: Any) -> None:
        """Refuse a value outside the bounds (the type is checked by the config's coercion)."""
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"train setting '{self.name}' must be a finite number; got {value}")
        if self.choices and value not in self.choices:
            raise OptionError(f"train setting '{self.name}' must be one of {', '.join(self.choices)}; got {value!r}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if self.minimum is not None and (value <= self.minimum if self.above else value < self.minimum):
            raise OptionError(f"train setting '{self.name}' must be {self.bounds().split(',')[0]}; got {value}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"train setting '{self.name}' must be <= {_num(self.maximum)}; got {value}")


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


SETTINGS: tuple[Setting, ...] = (
    # the schedule
    Setting("epochs", 20, "Training epochs.", minimum=0, above=True, maximum=1_000_000),
    Setting("batch_size", 64, "Items per training batch.", minimum=0, above=True, maximum=2**20),
    Setting(
        "lr",
        1e-3,
        "Base learning rate; each parameter group multiplies it by its multiplier.",
        minimum=0,
        above=True,
        maximum=10.0,
    ),
    Setting("optimizer", "adam", "The optimizer (sgd with momentum 0.9).", choices=("adam", "adamw", "sgd")),
    Setting("weight_decay", 0.0, "Weight decay of the optimizer.", minimum=0),
    Setting(
        "weight_decay_norms",
        True,
        "Apply weight decay to the normalisation layers' parameters too (BatchNorm, LayerNorm); false: exempt them.",
    ),
    Setting(
        "weight_decay_before_clip",
        False,
        "Add weight decay to the network's gradients before clipping, as an L2 term (ccp-dml's order), instead of "
        "in the optimizer's step (where it reaches the proxies too).",
    ),
    Setting(
        "scheduler",
        "cosine",
        "Learning rate over the epochs: constant, cosine to 0, or x0.1 at each third.",
        choices=("none", "cosine", "step"),
    ),
    Setting("warmup_epochs", 0, "First epochs in which the backbone is frozen (head and loss train).", minimum=0),
    Setting("backbone_lr_multiplier", 1.0, "Learning-rate multiplier of the backbone.", minimum=0),
    Setting("head_lr_multiplier", 1.0, "Learning-rate multiplier of the embedding head.", minimum=0),
    Setting("grad_clip", 0.0, "Clip the gradient norm to this value (0: no clipping).", minimum=0),
    Setting(
        "grad_clip_value", 0.0, "Clip each gradient element to [-value, value], after the norm (0: off).", minimum=0
    ),
    # the model
    Setting(
        "embedding_size",
        128,
        "Embedding dimension (0: the pooled backbone features, no linear layer).",
        minimum=0,
        maximum=65536,
    ),
    Setting("pooling", "avg", "Pooling of the backbone's feature map.", choices=("avg", "max", "avgmax")),
    Setting("head_norm", "none", "Normalisation before the linear layer.", choices=("none", "layernorm", "batchnorm")),
    Setting(
        "head_init",
        "random",
        "Linear layer start: random, or the identity (embedding_size = features).",
        choices=("random", "identity"),
    ),
    Setting("normalize_embeddings", True, "L2-normalise the embeddings the head outputs."),
    Setting("freeze_bn", False, "Keep the backbone's BatchNorm statistics and affine parameters fixed."),
    Setting(
        "freeze_backbone",
        False,
        "Freeze the backbone for the run: true (all of it: only head and loss train), or up to a stage, by name "
        "(`dmlkit show backbone NAME` lists them): the later stages, head and loss train.",
        types=(bool, str),
    ),
    Setting(
        "feature_cache", False, "With freeze_backbone: compute the backbone's pooled features once and cache them."
    ),
    Setting(
        "cache_views",
        1,
        "Augmented views of each training image kept in the feature cache.",
        minimum=0,
        above=True,
        maximum=1024,
    ),
    Setting("cache_dir", "", "Feature cache folder (default $DMLKIT_CACHE, else ~/.cache/dmlkit/features)."),
    # where and how
    Setting(
        "seed",
        0,
        "Random seed of the run (batches, augmentation, initialisation, splits).",
        minimum=0,
        maximum=2**32 - 1,
    ),
    Setting("device", "auto", "auto, cpu, cuda or cuda:N."),
    Setting("amp", True, "bf16 autocast on a GPU (no effect on a CPU)."),
    Setting(
        "num_workers",
        -1,
        "Data-loader processes (-1: none for in-memory arrays, up to 8 for image files).",
        minimum=-1,
        maximum=1024,
    ),
    Setting(
        "nonfinite", "stop", "A non-finite loss or gradient stops the run, or skips the step.", choices=("stop", "skip")
    ),
    Setting(
        "sync_every",
        25,
        "On a GPU, read the device-side finiteness check every this many steps.",
        minimum=0,
        above=True,
    ),
    # evaluation and model selection
    Setting("eval_every", 1, "Validate every this many epochs (and after the last).", minimum=0, above=True),
    Setting("eval_at_start", False, "Also validate the untrained model (logged as epoch 0)."),
    Setting(
        "patience",
        0,
        "Stop once the validation metric has not improved by more than min_delta for this many evaluated epochs "
        "(0: train all epochs); the test reads the best epoch as always.",
        minimum=0,
    ),
    Setting("min_delta", 0.0, "The improvement of the validation metric that resets patience.", minimum=0),
    Setting(
        "eval_batch_size", 256, "Items per batch when embedding for evaluation.", minimum=0, above=True, maximum=2**20
    ),
    Setting("best_metric", "map_at_r", "Validation metric that chooses the best epoch ('loss': lowest training loss)."),
    Setting(
        "selection",
        "validation",
        "How the best epoch is chosen: on validation data, the last epoch, or on the "
        "test set (biased, for comparison with such papers only).",
        choices=("validation", "last", "test_set_biased"),
    ),
    Setting("test_every_epoch", False, "Also log test metrics every epoch (never used for selection)."),
    Setting(
        "val_fraction", 0.2, "Share of the training classes (or images) held out for validation, in [0, 1).", minimum=0
    ),
    Setting(
        "val_split",
        "classes",
        "Validation on held-out training classes, or held-out images of them.",
        choices=("classes", "samples"),
    ),
    Setting("val_every_steps", 0, "Also validate every this many steps (0: once per epoch).", minimum=0),
    Setting(
        "folds", 0, "Class-disjoint validation folds of the training classes (0: val_fraction instead).", minimum=0
    ),
    Setting("fold", 0, "Which fold validates, 0 to folds-1.", minimum=0),
    Setting("run_dir", "", "Run directory (default runs/<time>-<dataset>-<loss>)."),
)

#: The settings by name.
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def defaults() -> dict[str, Any]:
    """Every setting at its default."""
    return {s.name: s.default for s in SETTINGS}


class Settings(Mapping[str, Any]):
    """A run's resolved ``[train]`` section: read-only, as attributes or as a mapping."""

    def __init__(self, values: Mapping[str, Any]):
        unknown = set(values) - set(BY_NAME)
        if unknown:
            raise OptionError(f"unknown train setting '{sorted(unknown)[0]}'")
        object.__setattr__(self, "_values", {**defaults(), **values})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no train setting '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a run's settings are read-only; set them in the config")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        raise TypeError(
            f"a run's settings are read-only; make a changed copy: settings = settings.replace({name}={value!r})"
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (each checked against its declared bounds)."""
        for name, value in changes.items():
            if name not in BY_NAME:
                raise OptionError(f"unknown train setting '{name}'")
            BY_NAME[name].check(value)
        return Settings({**self._values, **changes})

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"
