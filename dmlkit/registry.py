"""The component registry: one name per component, with its factory, defaults and owner."""

from __future__ import annotations

import collections.abc
import contextlib
import contextvars
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dmlkit.errors import ClashError, DmlkitError, OptionError, UnknownComponentError

#: Component kinds and the hook through which plugins register them.
KINDS: dict[str, str] = {
    "loss": "register_losses",
    "miner": "register_miners",
    "proxy_initializer": "register_proxy_initializers",
    "sampler": "register_samplers",
    "evaluator": "register_evaluators",
    "dataset": "register_datasets",
    "backbone": "register_backbones",
    "callback": "register_callbacks",
}


@dataclass(frozen=True)
class ComponentSpec:
    """What a plugin registers: a named factory with its description and defaults.

    ``defaults`` override the factory's own keyword defaults; ``replaces`` names an
    existing component this one deliberately takes over (otherwise a clash is an error).
    ``recommends`` holds run settings that suit the component, as a partial config
    (``{"train": {"freeze_bn": True}}``), or a function of the component's resolved options
    that returns one; a run that picks the component starts from them, and the user's own
    settings win. ``plugin`` and ``distribution`` are filled in by the registry, and so is
    ``replaced_plugin``: the plugin whose component this one replaced (shown by ``dmlkit plugins``,
    ``list``, ``show``, the train banner and, as a comment, the run's config.toml).
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    replaces: str | None = None
    recommends: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] = field(default_factory=dict)
    plugin: str = ""
    distribution: str = ""
    replaced_plugin: str = ""

    @property
    def summary(self) -> str:
        """The first line of the description (or of the factory's docstring)."""
        text = self.description or inspect.getdoc(self.factory) or ""
        return text.strip().splitlines()[0] if text.strip() else ""

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The factory's keyword parameters (``**kwargs`` excluded)."""
        return {
            name: p
            for name, p in _signature(self.factory).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def accepts_any_option(self) -> bool:
        """True when the factory takes ``**kwargs`` and so accepts any option."""
        return any(p.kind is p.VAR_KEYWORD for p in _signature(self.factory).parameters.values())

    def resolved_defaults(self) -> dict[str, Any]:
        """The factory's keyword defaults overridden by ``defaults``."""
        out = {n: p.default for n, p in self.parameters().items() if p.default is not p.empty}
        out.update(self.defaults)
        return out

    def option_types(self) -> dict[str, str]:
        """Each option's annotation as text (``int``, ``str | None``), "" where there is none."""
        hints = _type_hints(self.factory)
        return {n: _type_text(hints[n]) if n in hints else "" for n in self.parameters()}

    def option_help(self) -> dict[str, str]:
        """Each option's help from the factory's docstring: its entry under ``Args:`` (Google),
        ``Parameters`` (NumPy) or ``:param name:`` (Sphinx), else the first sentence that names it
        as ``name`` in backquotes; "" when the docstring says nothing of it."""
        return option_help(inspect.getdoc(self.factory) or "", list(self.parameters()))

    def nested(self) -> dict[str, tuple[str, str | None]]:
        """Options that hold a nested component's options: ``{option: (kind, name_option)}`` from
        the factory's ``nested_options`` attribute; ``name_option`` is the option naming the
        component, or None when the option itself holds a name or ``{name = ..., options}``."""
        return dict(getattr(self.factory, "nested_options", {}) or {})

    def default_problems(self) -> dict[str, str]:
        """``{option: line}`` for each default that its option's annotation rejects (``samples: int =
        "three"``), the line naming component, plugin, option, annotation and default; ``None``
        defaults (unset) pass."""
        hints = _type_hints(self.factory)
        out = {}
        for key, value in self.resolved_defaults().items():
            types = _expected_types(hints.get(key), inspect.Parameter.empty) if key in hints else None
            if value is None or types is None:
                continue
            try:
                _coerce("", key, value, types)
            except OptionError:
                wanted = " or ".join(sorted({t.__name__ for t in types}))
                out[key] = (
                    f"'{self.name}' (plugin '{self.plugin or '?'}'): the default of option '{key}' is {value!r} "
                    f"({type(value).__name__}) but its annotation says {wanted}; fix the default or the annotation"
                )
        return out

    def recommended(self, options: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
        """The settings this component recommends, given its resolved ``options`` and, to a
        ``recommends`` function that takes a second argument, the run's config as the user set it
        (defaults filled in): a recommendation may depend on the dataset, say."""
        try:
            if callable(self.recommends):
                takes_config = len(inspect.signature(self.recommends).parameters) >= 2
                rec = self.recommends(options, config or {}) if takes_config else self.recommends(options)
            else:
                rec = self.recommends
            if not isinstance(rec, Mapping) or not all(isinstance(v, Mapping) for v in rec.values()):
                raise TypeError(f"expected {{section: {{key: value}}}}, got {rec!r}")
        except DmlkitError:
            raise
        except Exception as exc:
            raise DmlkitError(
                f"'{self.name}' (plugin '{self.plugin or '?'}') failed to give its recommended settings: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return {k: dict(v) for k, v in rec.items()}


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    if inspect.isclass(factory):  # drop self
        params = list(sig.parameters.values())[1:]
        sig = sig.replace(parameters=params)
    return sig


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        return {}


def _expected_types(hint: Any, default: Any) -> tuple[type, ...] | None:
    """The plain types an option may take, or None when anything goes."""
    if hint is not None:
        args = typing.get_args(hint)
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            flat: list[type] = []
            for a in args:
                t = _expected_types(a, inspect.Parameter.empty)
                if t is None:
                    return None
                flat.extend(t)
            return tuple(flat)
        if hint is type(None):
            return (type(None),)
        if hint in (int, float, bool, str):
            return (hint,)
        if origin in _SEQUENCES or hint in _SEQUENCES:
            return (list, tuple)
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int | float | str):
        return (type(default),)
    if isinstance(default, list | tuple):
        return (list, tuple)
    return None


#: Annotations whose values are lists (TOML arrays): list[int], tuple, Sequence[int] ...
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence, collections.abc.Collection,
              collections.abc.Iterable)  # fmt: skip


def _element_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a sequence annotation's items may take (``Sequence[int]`` -> (int,)), or None."""
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for a in args:
            if typing.get_origin(a) in _SEQUENCES or a in _SEQUENCES:
                return _element_types(a)
        return None
    if len(set(args)) != 1:
        return None
    return _expected_types(args[0], inspect.Parameter.empty)


def _coerce(where: str, option: str, value: Any, types: tuple[type, ...] | None) -> Any:
    """``value`` checked against ``types`` (an int is accepted as a float); ``where`` starts the error."""
    if types is None or value is None and type(None) in types:
        return value
    if isinstance(value, bool):
        if bool in types:
            return value
    elif isinstance(value, int) and (int in types or float in types):
        return value if int in types else float(value)
    elif isinstance(value, float) and float in types:
        return value
    elif isinstance(value, tuple(t for t in types if t not in (int, float, bool))):
        return value
    wanted = " or ".join(sorted({t.__name__ for t in types}))
    raise OptionError(f"{where} '{option}' must be {wanted}, got {value!r} ({type(value).__name__})")


#: The registry that is building a component (or checking a config) right now: nested components
#: (CCP's base loss, a combination's terms, a bank's initializer) are built from it, so a run or
#: ``check_plugin`` given its own registry never falls back to the process-wide one.
_ACTIVE: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("dmlkit_active_registry", default=None)


def active_registry() -> Registry | None:
    """The registry building a component or checking a config right now, or None."""
    return _ACTIVE.get()


class Registry:
    """Components by kind and name, as registered by the loaded plugins."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        self._aliases: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._clashes: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._replaced: dict[str, dict[str, str]] = {k: {} for k in KINDS}  # old name -> the new one
        self.broken: dict[str, str] = {}  # plugins that failed to load -> their first error

    @contextlib.contextmanager
    def active(self) -> Iterator[Registry]:
        """Within the block, :func:`dmlkit.get_registry` returns this registry: components built
        inside it build their nested components from it."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    # -- registration -------------------------------------------------------------------
    def add(self, kind: str, spec: ComponentSpec, plugin: str = "", distribution: str = "") -> None:
        """Register ``spec`` under ``kind`` for ``plugin``; a second claim on a name is a clash."""
        self._check_kind(kind)
        if not isinstance(spec, ComponentSpec):
            raise DmlkitError(
                f"plugin '{plugin}' registered a {type(spec).__name__} as a {kind}; "
                "pass dmlkit.ComponentSpec(name=..., factory=...)"
            )
        if not spec.name or not spec.name.replace("_", "").replace("-", "").isalnum():
            raise DmlkitError(f"plugin '{plugin}': invalid {kind} name {spec.name!r} (letters, digits, _ and -)")
        spec = replace(spec, plugin=plugin, distribution=distribution, replaced_plugin="")
        specs, aliases = self._specs[kind], self._aliases[kind]
        if spec.replaces is not None:
            old = specs.get(spec.replaces)
            if old is None:
                raise DmlkitError(
                    f"plugin '{plugin}': {kind} '{spec.name}' replaces '{spec.replaces}', which no plugin registered"
                )
            spec = replace(spec, replaced_plugin=old.plugin)
            if spec.name != spec.replaces:
                self._replaced[kind][spec.replaces] = spec.name
            del specs[spec.replaces]
            for a in [a for a, n in aliases.items() if n == spec.replaces]:
                del aliases[a]
        for key in (spec.name, *spec.aliases):
            owner = specs.get(key) or specs.get(aliases.get(key, ""))
            if owner is not None:
                raise ClashError(
                    f"{kind} '{key}' is registered by both plugin '{owner.plugin}' and plugin '{plugin}'; "
                    f"uninstall one, or set replaces='{owner.name}' in the newer one's ComponentSpec"
                )
        specs[spec.name] = spec
        for a in spec.aliases:
            aliases[a] = spec.name

    def mark_clash(self, kind: str, name: str, message: str) -> None:
        """Make ``name`` unusable: two plugins claim it and neither said it replaces the other."""
        self._clashes[kind][name] = message

    # -- lookup -------------------------------------------------------------------------
    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind '{kind}'{_suggest(kind, KINDS)}")

    def names(self, kind: str) -> list[str]:
        """Sorted component names of ``kind`` (aliases excluded)."""
        self._check_kind(kind)
        return sorted(self._specs[kind])

    def specs(self, kind: str) -> list[ComponentSpec]:
        return [self._specs[kind][n] for n in self.names(kind)]

    def __iter__(self) -> Iterator[tuple[str, ComponentSpec]]:
        for kind in KINDS:
            for spec in self.specs(kind):
                yield kind, spec

    def __contains__(self, item: tuple[str, str]) -> bool:
        kind, name = item
        return kind in KINDS and isinstance(name, str) and (name in self._specs[kind] or name in self._aliases[kind])

    def get(self, kind: str, name: str) -> ComponentSpec:
        """The spec for ``name`` (or an alias); unknown names fail with the closest valid ones."""
        self._check_kind(kind)
        if not isinstance(name, str):
            raise UnknownComponentError(f"a {kind} name must be a string; got {name!r}")
        name = self._aliases[kind].get(name, name)
        if name in self._clashes[kind]:
            raise ClashError(self._clashes[kind][name])
        try:
            return self._specs[kind][name]
        except KeyError:
            new = self._replaced[kind].get(name)
            if new in self._specs[kind]:
                spec = self._specs[kind][new]
                raise UnknownComponentError(
                    f"{kind} '{name}' was replaced by {kind} '{new}' of plugin '{spec.plugin}'; use '{new}'"
                ) from None
            valid = list(self._specs[kind]) + list(self._aliases[kind])
            broken = "".join(
                f"; note: plugin '{p}' failed to load ({err}), see `dmlkit plugins`"
                for p, err in sorted(self.broken.items())[:2]
            )
            raise UnknownComponentError(
                f"unknown {kind} '{name}'{_suggest(name, valid)}; `dmlkit list {kind}` shows all{broken}"
            ) from None

    # -- building -----------------------------------------------------------------------
    def resolve_options(self, kind: str, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``options``, each checked against the factory's signature."""
        spec = self.get(kind, name)
        params = spec.parameters()
        hints = _type_hints(spec.factory)
        if not spec.accepts_any_option():
            unknown = [k for k in options if k not in params]
            if unknown:
                valid = sorted(params)
                raise OptionError(
                    f"{kind} '{spec.name}' has no option '{unknown[0]}'{_suggest(unknown[0], valid)} "
                    f"(valid options: {', '.join(valid) or 'none'})"
                )
        merged = spec.resolved_defaults()
        bad = [line for key, line in spec.default_problems().items() if key not in options]
        if bad:  # a wrong default fails here, before any data loads, not deep inside training
            raise OptionError(f"{kind} {bad[0]}")
        for key, value in options.items():
            p = params.get(key)
            default = p.default if p is not None else inspect.Parameter.empty
            where = f"{kind} '{spec.name}': option"
            expected = _expected_types(hints.get(key), default)
            if expected and list in expected and isinstance(value, str) and str not in expected:
                raise OptionError(f"{where} '{key}' is a list: write {key}=[{value}] (TOML array); got {value!r}")
            merged[key] = _coerce(where, key, value, expected)
            items = _element_types(hints.get(key)) if isinstance(value, list | tuple) else None
            for i, item in enumerate(value if items else ()):
                _coerce(where, f"{key}[{i}]", item, items)
        return merged

    def build(self, kind: str, name: str, context: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Build component ``name`` of ``kind`` from its defaults and ``options``.

        ``context`` holds values the caller supplies at run time (``num_classes``,
        ``embedding_size`` ...); each is passed when the factory takes it and the options do
        not set it, in place of the factory's default.
        """
        spec = self.get(kind, name)
        merged = self.resolve_options(kind, name, options)
        params = spec.parameters()
        for key, value in (context or {}).items():
            if key in params and key not in options:  # run-time values beat defaults, not explicit options
                merged[key] = value
        missing = [n for n, p in params.items() if p.default is p.empty and n not in merged]
        if missing:
            raise OptionError(f"{kind} '{spec.name}' needs option '{missing[0]}' (set {missing[0]}=...)")
        try:
            with self.active():  # nested components come from this registry
                return spec.factory(**merged)
        except DmlkitError:
            raise
        except Exception as exc:
            owner = f" (plugin '{spec.plugin}')" if spec.plugin else ""
            hint = ""
            if "Module.__init__() call" in str(exc) or "_modules" in str(exc) or "_parameters" in str(exc):
                hint = "; a torch.nn.Module (losses and miners are) must call super().__init__() first in __init__"
            raise DmlkitError(
                f"{kind} '{spec.name}'{owner} failed to build: {type(exc).__name__}: {exc}{hint}"
            ) from exc


def _type_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Options|Keyword Args)\s*:?\s*$")


def option_help(doc: str, names: list[str]) -> dict[str, str]:
    """See :meth:`ComponentSpec.option_help`."""
    found: dict[str, str] = {}
    lines = doc.splitlines()
    for i, line in enumerate(lines):  # Google / NumPy sections
        if not _SECTION.match(line.strip()):
            continue
        j = i + 1
        numpy_style = j < len(lines) and set(lines[j].strip()) == {"-"}  # "name : type", help below
        j += numpy_style
        current = None
        while j < len(lines) and (lines[j].strip() == "" or lines[j].startswith((" ", "\t")) or current is None):
            text = lines[j].strip()
            m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", text)
            indent = len(lines[j]) - len(lines[j].lstrip())
            if m and m.group(1) in names and indent <= 4:  # an entry; deeper lines continue it
                current = m.group(1)
                found[current] = "" if numpy_style else m.group(3)
            elif text and current is not None:
                found[current] = (found[current] + " " + text).strip()
            elif not text and current is None:
                break
            j += 1
    for m in re.finditer(r":param\s+(?:[\w\[\], |]+\s+)?(\w+):\s*(.*)", doc):  # Sphinx
        found.setdefault(m.group(1), m.group(2).strip())
    flat = " ".join(doc.split())
    sentences = re.split(r"(?<=[.;])\s+(?=[A-Z`(])", flat)
    patterns = {n: re.compile(rf"``{re.escape(n)}``|(?<!`)`{re.escape(n)}`(?!`)") for n in names}
    for name in names:
        if name in found:
            continue
        # a sentence that names this option and no other (one that names several helps none of them)
        hit = next((s for s in sentences if [n for n, p in patterns.items() if p.search(s)] == [name]), "")
        found[name] = hit
    return {n: found.get(n, "") for n in names}


def _suggest(word: str, valid: Any) -> str:
    close = difflib.get_close_matches(word, list(valid), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
