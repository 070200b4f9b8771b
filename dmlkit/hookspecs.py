"""The hooks a dmlkit plugin can implement.

Each ``register_*`` hook receives ``register``, a callable bound to the calling plugin:
call ``register(ComponentSpec(...))`` once per component. Training events are not
pluggy hooks: they go to the run's components, as :mod:`dmlkit.contract` declares.
"""

import pluggy

hookspec = pluggy.HookspecMarker("dmlkit")
hookimpl = pluggy.HookimplMarker("dmlkit")


@hookspec
def register_losses(register):
    """Register loss functions: ``register(ComponentSpec(name, factory, ...))``."""


@hookspec
def register_miners(register):
    """Register miners, which pick pairs or triplets from a batch for a loss."""


@hookspec
def register_proxy_initializers(register):
    """Register proxy initializers, which set the proxies of proxy-based losses."""


@hookspec
def register_samplers(register):
    """Register batch samplers (how a training epoch is cut into batches)."""


@hookspec
def register_evaluators(register):
    """Register evaluators, which turn test embeddings into metrics."""


@hookspec
def register_datasets(register):
    """Register datasets (train and test splits with class labels)."""


@hookspec
def register_backbones(register):
    """Register backbones (networks mapping images to feature vectors)."""


@hookspec
def register_callbacks(register):
    """Register callbacks, which receive training events."""


@hookspec
def register_commands(app):
    """Add subcommands to the ``dmlkit`` Typer app: ``app.command()(fn)`` or ``app.add_typer(...)``."""
