"""Plugin loading: entry points of group ``dmlkit``, each loaded in isolation.

``DMLKIT_PLUGINS`` restricts what is loaded: ``all`` (default), ``builtin`` (only the
plugins of the dmlkit distribution), ``none``, or a comma-separated list of plugin names.
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from dmlkit import hookspecs
from dmlkit.errors import ClashError, DmlkitError
from dmlkit.registry import KINDS, ComponentSpec, Registry

GROUP = "dmlkit"
ENV_VAR = "DMLKIT_PLUGINS"
BUILTIN_DISTRIBUTION = "dmlkit"


@dataclass
class PluginInfo:
    """What ``dmlkit plugins`` shows for one plugin."""

    name: str
    module: str
    distribution: str = ""
    version: str = ""
    hooks: list[str] = field(default_factory=list)
    components: int = 0
    errors: list[str] = field(default_factory=list)
    replaces: list[str] = field(default_factory=list)  # "loss 'x' of plugin 'p'": built-ins it took over
    commands: list[str] = field(default_factory=list)  # CLI subcommands it added

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "components": self.components,
            "errors": self.errors,
            "replaces": self.replaces,
            "commands": self.commands,
        }


class PluginHost:
    """A pluggy manager, the registry its plugins filled, and what happened while loading."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self, selection: str | None = None) -> None:
        """Load every entry point of group ``dmlkit`` allowed by ``selection`` (or ``$DMLKIT_PLUGINS``)."""
        selection = (selection if selection is not None else os.environ.get(ENV_VAR, "all")).strip()
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist else ""
            if not _selected(selection, ep.name, dist):
                continue
            info = PluginInfo(
                name=ep.name, module=ep.value, distribution=dist, version=ep.dist.version if ep.dist else ""
            )
            if ep.name in self.plugins:
                other = self.plugins[ep.name]
                info.errors.append(
                    f"plugin name '{ep.name}' is already used by distribution '{other.distribution}'; not loaded"
                )
                self.plugins[f"{ep.name} ({dist})"] = info
                continue
            try:
                obj = _quietly(ep.load)
            except (Exception, SystemExit) as exc:  # a broken plugin must not break dmlkit (argparse exits)
                info.errors.append(f"import failed: {_one_line(exc)}")
                self.plugins[ep.name] = info
                continue
            self._register(obj, info)
        self._collect_components()
        self.registry.broken = {n: i.errors[0] for n, i in self.plugins.items() if i.errors}

    def add_plugin(self, obj: Any, name: str, distribution: str = "", version: str = "") -> PluginInfo:
        """Register a module or object as a plugin directly (tests, notebooks)."""
        info = PluginInfo(
            name=name, module=getattr(obj, "__name__", repr(obj)), distribution=distribution, version=version
        )
        self._register(obj, info)
        self._collect_components(only=name)
        if info.errors:
            self.registry.broken[name] = info.errors[0]
        return info

    def _register(self, obj: Any, info: PluginInfo) -> None:
        self.plugins[info.name] = info
        try:
            self.pm.register(obj, name=info.name)
        except Exception as exc:
            info.errors.append(f"registration failed: {_one_line(exc)}")
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=info.name)
            info.errors.append(f"unknown hook: {_one_line(exc)}")
            return
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(obj) or [])

    def _collect_components(self, only: str | None = None) -> None:
        """Call every register_* hook of each plugin on its own, so one failure stays local."""
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if only is not None and impl.plugin_name != only:
                    continue
                info = self.plugins[impl.plugin_name]
                specs: list[ComponentSpec] = []
                try:
                    _quietly(impl.function, **_args(impl, register=specs.append))
                except (Exception, SystemExit) as exc:
                    info.errors.append(f"{hook_name} raised {_one_line(exc)}")
                    continue
                for spec in specs:
                    try:
                        self.registry.add(kind, spec, plugin=info.name, distribution=info.distribution)
                        info.components += 1
                        added = self.registry.get(kind, spec.name)
                        if added.replaced_plugin:
                            info.replaces.append(f"{kind} '{added.replaces}' of plugin '{added.replaced_plugin}'")
                    except ClashError as exc:
                        self.registry.mark_clash(kind, spec.name, str(exc))
                        info.errors.append(str(exc))
                    except DmlkitError as exc:
                        info.errors.append(str(exc))

    def add_commands(self, app: Any) -> None:
        """Let each plugin add its CLI subcommands. A plugin cannot take a name that a built-in
        command or an earlier plugin has (the later registration is dropped and recorded on the
        plugin, so that `dmlkit plugins` shows it), nor remove or change what was registered
        before it; a failure is recorded on that plugin."""
        builtin = {_entry_name(entry) for entry in [*app.registered_commands, *app.registered_groups]}
        owners: dict[str, str] = {}  # command -> the plugin that added it to this app
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            commands, groups = list(app.registered_commands), list(app.registered_groups)
            before = [_fingerprint(entry) for entry in [*commands, *groups]]
            callback = app.registered_callback
            try:
                _quietly(impl.function, **_args(impl, app=app))
            except (Exception, SystemExit) as exc:
                _note(info, f"register_commands raised {_one_line(exc)}")
            now = [*app.registered_commands[: len(commands)], *app.registered_groups[: len(groups)]]
            if [_fingerprint(entry) for entry in now] != before or app.registered_callback is not callback:
                _note(info, "register_commands changed or removed commands registered before it; undone")
                for entry, (_, name, function) in zip([*commands, *groups], before):
                    entry.name, entry.callback = name, function
                app.registered_callback = callback
            taken = {name: "it is a built-in command" for name in builtin}
            taken.update({c: f"it is a command of plugin '{p}'" for c, p in owners.items()})
            kept_commands, kept_groups, added = list(commands), list(groups), []
            for entry, into in [
                *((c, kept_commands) for c in app.registered_commands[len(commands) :]),
                *((g, kept_groups) for g in app.registered_groups[len(groups) :]),
            ]:
                name = _entry_name(entry)
                if name in taken or name in added:
                    why = taken.get(name, "this plugin registers it twice")
                    _note(info, f"command '{name}' not added: {why}")
                    continue
                into.append(entry)
                added.append(name)
            app.registered_commands[:] = kept_commands
            app.registered_groups[:] = kept_groups
            info.commands = added
            owners.update(dict.fromkeys(added, impl.plugin_name))

    def plugin_of(self, kind: str, name: str) -> PluginInfo | None:
        return self.plugins.get(self.registry.get(kind, name).plugin)


def _entry_name(info: Any) -> str:
    """The name a user types for one of a Typer app's registered commands or command groups."""
    name = info.name or (getattr(info, "typer_instance", None) and info.typer_instance.info.name)
    if not name and getattr(info, "callback", None) is not None:
        name = info.callback.__name__.replace("_", "-")
    return str(name)


def _note(info: PluginInfo, error: str) -> None:
    """Record an error on a plugin once (the app is built again for each in-process command)."""
    if error not in info.errors:
        info.errors.append(error)


def _fingerprint(entry: Any) -> tuple[int, Any, Any]:
    return id(entry), entry.name, getattr(entry, "callback", None)


def _quietly(fn: Any, **kwargs: Any) -> Any:
    """Call plugin code with its prints held back: what a plugin writes while loading (argparse's
    usage text before it exits, say) must not end up in the output of every dmlkit command."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(**kwargs)


def _args(impl: Any, **available: Any) -> dict[str, Any]:
    return {name: available[name] for name in impl.argnames}


def _entry_points() -> list[EntryPoint]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for ep in entry_points(group=GROUP):
        key = (ep.name, ep.value, ep.dist.name if ep.dist else "")
        if key not in seen:  # the same distribution found twice on sys.path
            seen.add(key)
            out.append(ep)
    # built-ins first, so that a third party can replace one of them
    return sorted(out, key=lambda ep: ((ep.dist.name if ep.dist else "") != BUILTIN_DISTRIBUTION, ep.name))


def _selected(selection: str, name: str, dist: str) -> bool:
    if selection in ("", "all"):
        return True
    if selection == "none":
        return False
    if selection == "builtin":
        return dist == BUILTIN_DISTRIBUTION
    return name in {s.strip() for s in selection.split(",")}


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)
    loc = f" ({where[-1].filename.rsplit('/', 1)[-1]}:{where[-1].lineno})" if where else ""
    return (text[0] if text else type(exc).__name__) + loc


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded from entry points on first use."""
    global _HOST
    if _HOST is None:
        host = PluginHost()
        host.load_entry_points()
        _HOST = host
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins; the next :func:`get_host` loads them again."""
    global _HOST
    _HOST = None
