"""Run configuration: defaults < TOML file < command-line options, validated before any work starts."""

from __future__ import annotations

import copy
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from dmlkit import settings as settings_module
from dmlkit.errors import DmlkitError, OptionError
from dmlkit.registry import Registry, _coerce, _expected_types, _suggest

#: Trainer settings and their defaults; each is declared once, with its type, bounds and help, in
#: :mod:`dmlkit.settings`.
TRAIN_DEFAULTS: dict[str, Any] = settings_module.defaults()
CHOICES = {s.name: s.choices for s in settings_module.SETTINGS if s.choices}

#: Component sections (each named after the kind it builds) and their default component ("" = none).
SECTIONS: dict[str, str] = {
    "dataset": "digits",
    "backbone": "smallcnn",
    "loss": "proxynca",
    "miner": "",
    "sampler": "m_per_class",
    "evaluator": "retrieval",
}
#: Options the trainer supplies to components; a config may not set them.
RUNTIME_OPTIONS = {
    "dataset": {"input_spec"},
    "loss": {"num_classes", "embedding_size"},
    "miner": {"num_classes", "embedding_size"},
    "sampler": {"labels", "batch_size", "seed", "rank", "world_size"},
}


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (1, 0.5, true, [1, 2], "x"); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(pairs: list[str], where: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, with a clear error for a pair without '='.

    A dotted key sets an option of a nested component: ``proxy_init.name=greedy_kcenter``
    gives ``{"proxy_init": {"name": "greedy_kcenter"}}`` (as the TOML inline table would).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise OptionError(f"{where}: expected key=value, got {pair!r} (a.b=value sets an option of a nested table)")
        target = out
        for i, part in enumerate(parts[:-1]):
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise OptionError(f"{where}: {'.'.join(parts[: i + 1])} is set to a value and to a table in {pair!r}")
            target = node
        target[parts[-1]] = parse_value(value.strip())
    return out


def parse_callback(text: str) -> dict[str, Any]:
    """``--callback`` text, ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``, as a ``[[callbacks]]`` table.

    A comma starts a new option only before ``KEY=``, so values may hold commas (``[1, 2]``)
    and colons (``tracking_uri=sqlite:///runs/mlflow.db``).
    """
    name, _, opts = text.partition(":")
    if not name.strip():
        raise OptionError(f"--callback: expected NAME or NAME:KEY=VALUE,..., got {text!r}")
    pairs = [p for p in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", opts) if p.strip()] if opts.strip() else []
    return {"name": name.strip(), **parse_assignments(pairs, f"--callback {name.strip()}")}


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"config file not found: {p}")
    try:
        cfg = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"config file {p} is not valid TOML: {exc}") from None
    except RecursionError:
        cfg = None
    if cfg is None or _depth(cfg) > MAX_DEPTH:  # later merges and copies recurse through it
        raise OptionError(f"config file {p} nests tables or arrays more than {MAX_DEPTH} deep; no dmlkit config does")
    check_tables(cfg)  # before command-line options are merged over it
    return cfg


#: The deepest nesting of tables and arrays a config file may have.
MAX_DEPTH = 32


def _depth(value: Any) -> int:
    """How deep tables and arrays nest in ``value`` (a loop, not recursion: it may be very deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_tables(cfg: dict[str, Any]) -> None:
    """``train`` and every component section must be a table (``[loss]``, not ``loss = "x"``)."""
    for key in ("train", *SECTIONS):
        if key in cfg and not isinstance(cfg[key], dict):
            example = 'name = "..."' if key in SECTIONS else "epochs = 20"
            got = "an array of tables ([[...]])" if isinstance(cfg[key], list) else f"{cfg[key]!r}"
            raise OptionError(f"'{key}' must be a table: write [{key}] and then {example} under it; got {got}")


def default_config() -> dict[str, Any]:
    cfg: dict[str, Any] = {"train": dict(TRAIN_DEFAULTS)}
    for section, name in SECTIONS.items():
        cfg[section] = {"name": name}
    cfg["callbacks"] = []
    return cfg


def recommendations(
    cfg: dict[str, Any], registry: Registry, sources: dict[tuple[str, ...], str] | None = None
) -> dict[str, Any]:
    """The settings that the components chosen in ``cfg`` recommend, merged in section order
    (``sources``, when given, gets who recommended each setting, by its path).

    A component whose name or options are wrong recommends nothing: :func:`validate` reports it.
    """
    out: dict[str, Any] = {}
    for section in SECTIONS:
        sec = cfg.get(section)
        if not isinstance(sec, dict) or not sec.get("name") or (section, sec["name"]) not in registry:
            continue
        opts = {k: v for k, v in sec.items() if k != "name" and k not in RUNTIME_OPTIONS.get(section, ())}
        try:
            resolved = registry.resolve_options(section, sec["name"], opts)
        except OptionError:
            continue
        with registry.active():
            rec = registry.get(section, sec["name"]).recommended(resolved, cfg)
        if sources is not None:
            for path in leaves(rec):
                sources[path] = f"recommended by {section} '{sec['name']}'"
        out = merge(out, rec)
    return out


def leaves(cfg: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{("loss", "base_options", "pos_margin"): 0.1, ...}``: every value of a nested config by its path
    (a component's ``name`` included; lists, as callbacks, are values)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def resolve(
    user: dict[str, Any], registry: Registry, sources: dict[tuple[str, ...], str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """defaults < what the chosen components recommend < ``user`` (a TOML file and command-line options).

    Returns the validated config and the recommended settings that took effect (``{section: {key: value}}``:
    those the user did not set themselves). A recommended option that the chosen component does not
    have is dropped: a backbone may recommend a loss and its ``proxy_init``, and a user who picks
    another loss keeps ``proxy_init`` if that loss takes one. ``sources``, when given, gets who
    recommended each recommended setting, by its path.
    """
    user = copy.deepcopy(user)
    loss = user.get("loss")
    if isinstance(loss, dict) and isinstance(loss.get("name"), str) and "+" in loss["name"]:
        user["loss"] = {**loss, **parse_combination(loss["name"], registry)}
    for section in SECTIONS:  # aliases to names, so that a recommendation meets the user's choice
        name = user.get(section, {}).get("name") if isinstance(user.get(section), dict) else None
        if isinstance(name, str) and name and (section, name) in registry:
            user[section]["name"] = registry.get(section, name).name
    recs = recommendations(merge(default_config(), user), registry, sources)
    applied: dict[str, Any] = {}
    for section, body in list(recs.items()):
        mine = user.get(section, {})
        if not isinstance(body, dict) or not isinstance(mine, dict):
            continue
        if "name" in mine and body.get("name", mine["name"]) != mine["name"]:
            # the user picked another component: it gets the recommended options it takes
            body = recs[section] = {k: v for k, v in body.items() if k != "name"}
        if section in SECTIONS:  # an option the chosen component does not have is not recommended to it
            name = mine["name"] if "name" in mine else body.get("name", SECTIONS[section])
            if not name:  # no component in this section (e.g. miner 'none'): nothing to recommend to
                recs.pop(section)
                continue
            if (section, name) in registry and not registry.get(section, name).accepts_any_option():
                params = registry.get(section, name).parameters()
                body = recs[section] = {k: v for k, v in body.items() if k == "name" or k in params}
            if "name" in mine:  # the user's component keeps the options recommended to it
                recs[section] = {**body, "name": mine["name"]}
        default_name = SECTIONS.get(section)
        kept = {k: v for k, v in body.items() if k not in mine and not (k == "name" and v == default_name)}
        if kept:
            applied[section] = kept
    return validate(merge(merge(default_config(), recs), user), registry), applied


def explain(
    cfg: dict[str, Any], given: list[tuple[str, dict[str, Any]]], recommended: dict[tuple[str, ...], str]
) -> list[tuple[str, Any, str]]:
    """Each value of a resolved ``cfg`` with where it comes from: the first of ``given`` (``(source,
    partial config)`` pairs, the command line before a config file) that sets it, else the component
    that recommended it, else ``default``. Returns ``(dotted path, value, source)`` rows."""
    given_paths = [(source, leaves(partial)) for source, partial in given]
    rows = []
    for path, value in leaves(cfg).items():
        source = next((s for s, paths in given_paths if path in paths), None)
        if source is None:
            source = recommended.get(path, "default")
        rows.append((".".join(path), value, source))
    return rows


def parse_combination(text: str, registry: Registry | None = None) -> dict[str, Any]:
    """A loss name with '+', ``"triplet+0.5*softmax"``, is shorthand for the loss that declares
    ``combines_terms = True`` (the built-in ``combined``):
    ``{"name": "combined", "terms": ["triplet", "softmax"], "weights": [1.0, 0.5]}``."""
    terms, weights = [], []
    for part in text.split("+"):
        weight, star, name = part.strip().rpartition("*")
        try:
            w = float(weight) if star else 1.0
        except ValueError:
            raise OptionError(f"loss {text!r}: {weight!r} is not a weight; write e.g. triplet+0.5*softmax") from None
        if not name.strip():
            raise OptionError(f"loss {text!r}: a term has no loss name; write e.g. triplet+0.5*softmax")
        terms.append(name.strip())
        weights.append(w)
    return {"name": combiner(registry) if registry is not None else "combined", "terms": terms, "weights": weights}


def combiner(registry: Registry) -> str:
    """The name of the loss that combines terms (its factory declares ``combines_terms = True``)."""
    names = [spec.name for spec in registry.specs("loss") if getattr(spec.factory, "combines_terms", False) is True]
    if len(names) != 1:
        found = f"{len(names)} losses do ({', '.join(names)})" if names else "none does"
        raise OptionError(
            f"a loss written with '+' needs exactly one installed loss that combines terms; {found}: name the "
            "combining loss and its terms in [loss] instead"
        )
    return names[0]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, table by table at every depth (``loss.base_options.a`` and
    ``loss.base_options.b`` both survive); a table that names another component (``name``) replaces
    the old one, whose options would not fit the new component."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name"):
            out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(cfg: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """Check every key, type and range; returns the resolved config (component defaults filled in).
    Components' own checks (``validate_options``) see ``registry`` as :func:`dmlkit.get_registry`."""
    with registry.active():
        return _validate(cfg, registry)


def _validate(cfg: dict[str, Any], registry: Registry) -> dict[str, Any]:
    known = {"train", "callbacks", *SECTIONS}
    if not isinstance(cfg, dict):
        raise OptionError(f"a config must be a table of sections; got {type(cfg).__name__}")
    for key in cfg:
        if key not in known:
            raise OptionError(
                f"unknown config section '{key}'{_suggest(key, known)}; sections: {', '.join(sorted(known))}"
            )
    check_tables(cfg)
    train = dict(TRAIN_DEFAULTS)
    for key, value in cfg.get("train", {}).items():
        if key == "best_metric" and isinstance(value, str) and value.startswith("val_"):
            value = value[4:]  # dmlkit < 0.2 named the split in the metric; selection now says where it is read
        if key not in TRAIN_DEFAULTS:
            raise OptionError(f"unknown train setting '{key}'{_suggest(key, TRAIN_DEFAULTS)}")
        declared = settings_module.BY_NAME[key].types or _expected_types(None, TRAIN_DEFAULTS[key])
        train[key] = _coerce("train setting", key, value, declared)
    for setting in settings_module.SETTINGS:
        setting.check(train[setting.name])
    if not 0 <= train["val_fraction"] < 1:
        raise OptionError(f"train setting 'val_fraction' must be in [0, 1); got {train['val_fraction']}")
    if train["folds"] < 0 or train["folds"] == 1 or not 0 <= train["fold"] < max(train["folds"], 1):
        raise OptionError(
            f"need folds = 0 or >= 2 and 0 <= fold < folds; got folds {train['folds']}, fold {train['fold']}"
        )
    if train["feature_cache"] and train["freeze_backbone"] is False:
        raise OptionError(
            "train.feature_cache needs a frozen backbone: set freeze_backbone=true or a stage (features of a backbone "
            "that trains change every step)"
        )
    if train["folds"]:
        train["val_fraction"] = 0.0  # the folds define the validation split (val_fraction is then not used)
    if any(isinstance(v, float) and not math.isfinite(v) for v in train.values()):
        raise OptionError("train settings must be finite numbers")
    out: dict[str, Any] = {"train": train}
    for section, default in SECTIONS.items():  # a section is named after the kind it builds
        sec = dict(cfg.get(section, {}))
        name = sec.pop("name", default)
        if not isinstance(name, str):
            raise OptionError(f"[{section}] name must be a string; got {name!r}")
        if not name:
            out[section] = {"name": ""}
            if sec:
                raise OptionError(f"[{section}] has options but no component name")
            continue
        reserved = RUNTIME_OPTIONS.get(section, set()) & set(sec)
        if reserved:
            raise OptionError(f"{section} option '{sorted(reserved)[0]}' is set by the trainer; remove it")
        resolved = registry.resolve_options(section, name, sec)
        for k in RUNTIME_OPTIONS.get(section, ()):
            resolved.pop(k, None)
        check = getattr(registry.get(section, name).factory, "validate_options", None)
        if callable(check):  # a component's own checks of its options, before any work starts
            try:
                check(dict(resolved))
            except DmlkitError:
                raise
            except Exception as exc:
                raise OptionError(f"{section} '{name}': invalid options: {type(exc).__name__}: {exc}") from exc
        out[section] = {"name": registry.get(section, name).name, **resolved}
    callbacks = cfg.get("callbacks", [])
    if not isinstance(callbacks, list):
        raise OptionError("callbacks must be a list of tables with a name")
    out["callbacks"] = []
    for cb in callbacks:
        cb = dict(cb) if isinstance(cb, dict) else {"name": cb}
        name = cb.pop("name", "")
        if not isinstance(name, str) or not name:
            raise OptionError(f'each callback needs a name (a string, as [[callbacks]] name = "..."); got {name!r}')
        out["callbacks"].append(
            {"name": registry.get("callback", name).name, **registry.resolve_options("callback", name, cb)}
        )
    return out


def toml_value(v: Any) -> str:
    """One value as TOML writes it (``true``, ``0.001``, ``"adamw"``, ``[1, 2]``, inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if v is None:
        return '""'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: dict[str, Any]) -> str:
    """Write a resolved config as TOML (tables of scalars and lists; callbacks as an array of tables)."""
    lines = []
    for section, body in cfg.items():
        if section == "callbacks":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items() if v is not None]
        lines.append("")
    for cb in cfg.get("callbacks", []):
        lines.append("[[callbacks]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in cb.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
