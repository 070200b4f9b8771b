"""dmlkit: deep metric learning with components from plugins."""

from typing import Any

from dmlkit.errors import DmlkitError
from dmlkit.hookspecs import hookimpl
from dmlkit.registry import KINDS, ComponentSpec, Registry

__version__ = "0.2.0"
__all__ = ["KINDS", "ComponentSpec", "DmlkitError", "Registry", "build", "get_registry", "hookimpl"]


def get_registry() -> Registry:
    """The registry in use: while a registry builds a component or checks a config (a run's, or
    ``check_plugin``'s), that one; otherwise the one filled by every loaded plugin. A component
    that builds nested components calls this inside its factory or ``validate_options``."""
    from dmlkit.plugins import get_host
    from dmlkit.registry import active_registry

    return active_registry() or get_host().registry


def build(kind: str, name: str, **options: Any) -> Any:
    """Build a registered component by kind and name, e.g. ``build("loss", "triplet", margin=0.1)``."""
    return get_registry().build(kind, name, **options)
