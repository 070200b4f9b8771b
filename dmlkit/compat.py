"""Names that moved in dmlkit 0.2: still importable from their 0.1 module, with a DeprecationWarning
(shown by the CLI and by ``check_plugin``), until 0.3. docs/hooks.md's migration note lists them."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

from dmlkit.errors import DmlkitDeprecationWarning

#: old module -> {old name: "new.module" or "new.module:new_name"}
MOVED: dict[str, dict[str, str]] = {
    "dmlkit.train": {
        "EVENTS": "dmlkit.contract",
        "fmt": "dmlkit.console",
        "progress_bar": "dmlkit.console",
        "SHORT_NAMES": "dmlkit.console",
        "seed_everything": "dmlkit.runtime",
        "resolve_device": "dmlkit.runtime",
        "load_checkpoint": "dmlkit.checkpoint:load",
        "CHECKPOINT_VERSION": "dmlkit.checkpoint:VERSION",
        "CHECKPOINT_KEYS": "dmlkit.checkpoint:KEYS",
        "atomic_save": "dmlkit.fileio:save_torch",
        "write_json": "dmlkit.fileio",
        "declared_metrics": "dmlkit.selection",
        "metric_direction": "dmlkit.selection",
        "check_metrics": "dmlkit.selection",
        "check_splits": "dmlkit.splits",
        "sample_disjoint_split": "dmlkit.splits",
        "sample_disjoint_index": "dmlkit.splits",
        "class_disjoint_split": "dmlkit.splits",
        "class_disjoint_index": "dmlkit.splits",
        "plot_history": "dmlkit.plots",
    },
}


def moved(old_module: str, name: str) -> Any:
    """The object ``old_module.name`` now is, with a DeprecationWarning that says where it lives."""
    target = MOVED.get(old_module, {}).get(name)
    if target is None:
        raise AttributeError(f"module '{old_module}' has no attribute '{name}'")
    module, _, attr = target.partition(":")
    warnings.warn(
        f"{old_module}.{name} moved to {module}.{attr or name} in dmlkit 0.2; import it from there "
        "(the old name goes in 0.3)",
        DmlkitDeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(module), attr or name)


def moved_names(old_module: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``old_module`` that serves its moved names."""

    def __getattr__(name: str) -> Any:
        return moved(old_module, name)

    return __getattr__
