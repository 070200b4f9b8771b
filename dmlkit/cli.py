"""The ``dmlkit`` command line: plugins, list, show, train, evaluate, embed."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dmlkit.console import make_console
from dmlkit.errors import DmlkitError
from dmlkit.plugins import get_host
from dmlkit.registry import KINDS

console = make_console()
err_console = make_console(stderr=True)
_state: dict[str, Any] = {"debug": False}

_PLURALS = {"losses": "loss", "proxy_initializers": "proxy_initializer", "proxy-initializers": "proxy_initializer"}


def normalise_kind(kind: str) -> str:
    """Accept ``loss``, ``losses``, ``proxy-initializer`` ... for a component kind."""
    k = kind.strip().lower()
    k = _PLURALS.get(k, k).replace("-", "_")
    if k not in KINDS and k.endswith("s") and k[:-1] in KINDS:
        k = k[:-1]
    return k


def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


def plugins_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List loaded plugins, the components and commands each provides, and load errors."""
    host = get_host()
    provided: dict[str, dict[str, list[str]]] = {}
    for kind, spec in host.registry:
        provided.setdefault(spec.plugin, {}).setdefault(kind, []).append(spec.name)
    infos = list(host.plugins.values())
    if as_json:
        print(json.dumps([{**i.as_dict(), "provides": provided.get(i.name, {})} for i in infos], indent=2))
        return
    table = Table(title="dmlkit plugins", show_lines=True)
    for col in ("plugin", "from", "provides", "notes"):
        table.add_column(col, overflow="fold")
    for i in infos:
        lines = [f"{kind}: {', '.join(names)}" for kind, names in provided.get(i.name, {}).items()]
        if i.commands:
            lines.append(f"commands: {', '.join(i.commands)}")
        notes = [f"[yellow]replaces {escape(r)}[/yellow]" for r in i.replaces]
        notes += [f"[red]{escape(e)}[/red]" for e in i.errors]
        source = f"{i.distribution} {i.version}".strip() or i.module
        table.add_row(i.name, escape(source), escape("\n".join(lines)) or "-", "\n".join(notes))
    console.print(table)


def list_cmd(
    kind: Annotated[str | None, typer.Argument(help=f"One of: {', '.join(KINDS)}.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List components, per kind, with one-line descriptions."""
    registry = get_host().registry
    kinds = [normalise_kind(kind)] if kind else list(KINDS)
    data = {
        k: [
            {
                "name": s.name,
                "description": s.summary,
                "aliases": list(s.aliases),
                "plugin": s.plugin,
                "replaces": _replaces(k, s),
                "defaults": s.resolved_defaults(),
            }
            for s in registry.specs(k)
        ]
        for k in kinds
    }
    if as_json:
        print(json.dumps(data, indent=2, default=repr))
        return
    for k, rows in data.items():
        table = Table(title=k, title_justify="left", show_header=True)
        for col in ("name", "aliases", "plugin", "description"):
            table.add_column(col)
        for r in rows:
            plugin = r["plugin"] + (f" [yellow](replaces {escape(r['replaces'])})[/yellow]" if r["replaces"] else "")
            table.add_row(r["name"], ", ".join(r["aliases"]), plugin, r["description"])
        console.print(table)


def _replaces(kind: str, spec: Any) -> str:
    """``"loss 'x' of plugin 'p'"`` when ``spec`` replaced another plugin's component, else ""."""
    return f"{kind} '{spec.replaces}' of plugin '{spec.replaced_plugin}'" if spec.replaced_plugin else ""


def show_cmd(
    kind: Annotated[
        str,
        typer.Argument(
            help="Component kind, or 'train' for the trainer settings.",
            autocompletion=lambda incomplete: [k for k in (*KINDS, "train") if k.startswith(incomplete)],
        ),
    ],
    name: Annotated[str | None, typer.Argument(help="Component name or alias (a setting, or none, for train).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one component: its options (type, default, help), nested components' options, docstring, plugin."""
    from rich.text import Text

    host = get_host()
    kind = normalise_kind(kind)
    if kind == "train":
        return _show_settings(name or "all", as_json)
    if name is None:
        raise DmlkitError(f"name the {kind} to show: dmlkit show {kind} NAME (`dmlkit list {kind}` lists them)")
    spec = host.registry.get(kind, name)
    defaults = spec.resolved_defaults()
    doc = inspect.getdoc(spec.factory) or ""
    rows = _option_rows(spec, defaults)
    nested = _nested_rows(kind, spec, defaults)
    if as_json:
        out = {
            "kind": kind,
            "name": spec.name,
            "aliases": list(spec.aliases),
            "plugin": spec.plugin,
            "distribution": spec.distribution,
            "replaces": _replaces(kind, spec),
            "description": spec.description,
            "options": {r["name"]: r["default"] for r in rows},
            "option_info": {r["name"]: r for r in rows},
            "nested": nested,
            "required": [r["name"] for r in rows if r["required"]],
            "problems": list(spec.default_problems().values()),
            "recommends": spec.recommended(defaults),
            "doc": doc,
        }
        if kind == "backbone":
            out["stages"] = _backbone_stages(host.registry, spec, defaults)
        print(json.dumps(out, indent=2, default=repr))
        return
    console.print(
        f"[bold]{kind} {escape(spec.name)}[/bold]  (plugin [cyan]{escape(spec.plugin)}[/cyan], "
        f"distribution {escape(spec.distribution or '-')})"
    )
    if spec.replaced_plugin:
        console.print(f"[yellow]replaces the {escape(_replaces(kind, spec))}[/yellow]")
    if spec.aliases:
        console.print(f"aliases: {escape(', '.join(spec.aliases))}")
    if spec.description:
        console.print(Text(spec.description))
    for problem in spec.default_problems().values():
        console.print(Text(f"warning: {kind} {problem}", style="yellow"))
    console.print(_options_table(rows, f"options ({_how_to_set(kind, spec.name)})"))
    for group in nested:
        console.print(_options_table(group["options"], group["title"]))
    recs = spec.recommended(defaults)
    if recs:
        console.print(Text(f"recommended run settings (with these defaults; yours win): {_settings_text(recs)}"))
    stages = _backbone_stages(host.registry, spec, defaults) if kind == "backbone" else None
    if stages:
        console.print(Text(f"stages (--set freeze_backbone=NAME freezes up to one): {', '.join(stages)}"))
    if doc and doc != spec.description:
        console.print(Text(doc), soft_wrap=True)  # literally: a docstring is not rich markup


def _backbone_stages(registry: Any, spec: Any, defaults: dict[str, Any]) -> list[str] | None:
    """The names of a backbone's stages (built with its defaults, without pretrained weights); None
    when it does not declare them or cannot be built here."""
    from dmlkit.model import backbone_stages

    options = {"pretrained": False} if "pretrained" in defaults else {}
    try:
        return [name for name, _ in backbone_stages(registry.build("backbone", spec.name, **options))]
    except Exception:  # a backbone that needs an extra or declares no stages: nothing to list
        return None


def _flag_of(kind: str) -> str:
    """The ``dmlkit train`` flag that sets options of a component of ``kind``."""
    return {"callback": "--callback", "proxy_initializer": "--loss-opt proxy_init."}.get(
        kind, f"--{kind.replace('_', '-')}-opt"
    )


def _how_to_set(kind: str, name: str) -> str:
    """How a user sets this component's options, in words."""
    if kind == "callback":
        return f"--callback {name}:NAME=VALUE,NAME=VALUE"
    if kind == "proxy_initializer":
        return f"--loss-opt proxy_init.name={name} --loss-opt proxy_init.NAME=VALUE, for a loss with proxies"
    return f"{_flag_of(kind)} NAME=VALUE"


def _show_settings(name: str, as_json: bool) -> None:
    """``dmlkit show train [SETTING|all]``: the trainer settings, each with type, default, bounds and help."""
    from rich.text import Text

    from dmlkit.settings import BY_NAME, SETTINGS

    chosen = SETTINGS if name in ("all", "settings", "") else [BY_NAME.get(name) or _unknown_setting(name)]
    rows = [
        {"name": s.name, "type": s.type_name, "default": s.default, "bounds": s.bounds(), "help": s.help}
        for s in chosen
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=Text("train settings (--set NAME=VALUE, or [train] in a TOML config)"), title_justify="left")
    for col in ("setting", "type", "default", "allowed", "help"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(Text(r["name"]), Text(r["type"]), Text(repr(r["default"])), Text(r["bounds"]), Text(r["help"]))
    console.print(table)


def _unknown_setting(name: str) -> Any:
    from dmlkit.registry import _suggest
    from dmlkit.settings import BY_NAME

    raise DmlkitError(f"no train setting '{name}'{_suggest(name, BY_NAME)}; `dmlkit show train all` lists them")


def _option_rows(spec: Any, defaults: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    types, helps = spec.option_types(), spec.option_help()
    return [
        {
            "name": prefix + n,
            "type": types.get(n, ""),
            "default": defaults.get(n),
            "required": n not in defaults,
            "help": helps.get(n, ""),
        }
        for n in spec.parameters()
    ]


def _nested_rows(kind: str, spec: Any, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The options of each nested component at its default (CCP's base loss, a proxy initializer),
    named as the dotted CLI option sets them."""
    registry = get_host().registry
    out = []
    for option, (sub_kind, name_option) in spec.nested().items():
        value = defaults.get(name_option) if name_option else defaults.get(option)
        sub_name = value.get("name") if isinstance(value, dict) else value
        if not isinstance(sub_name, str) or (sub_kind, sub_name) not in registry:
            continue
        sub = registry.get(sub_kind, sub_name)
        rows = [r for r in _option_rows(sub, sub.resolved_defaults(), f"{option}.") if r["name"] != f"{option}.name"]
        flag = f"--{kind.replace('_', '-')}-opt"
        named_by = f"'{name_option}'" if name_option else f"'{option}'"
        how = (
            f"{flag} {option}.NAME=VALUE"
            if name_option
            else f"{flag} {option}.name={sub_name} {flag} {option}.NAME=VALUE"
        )
        out.append(
            {
                "option": option,
                "kind": sub_kind,
                "component": sub_name,
                "title": f"{option}.*: options of {sub_kind} '{sub_name}', named by {named_by} ({how})",
                "options": rows,
            }
        )
    return out


def _options_table(rows: list[dict[str, Any]], title: str) -> Table:
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left", show_header=True)
    for col in ("option", "type", "default", "help"):
        table.add_column(col, overflow="fold")
    for r in rows:
        default = Text("(supplied at run time)", style="yellow") if r["required"] else Text(repr(r["default"]))
        table.add_row(Text(r["name"]), Text(r["type"]), default, Text(r["help"]))
    return table


def _complete(kind: str) -> Any:
    """Shell completion of a component option: the registered names of ``kind`` (plugins included)."""

    def names(incomplete: str) -> list[str]:
        return [n for n in get_host().registry.names(kind) if n.startswith(incomplete)]

    return names


Opts = Annotated[list[str] | None, typer.Option(help="key=value, repeatable.", metavar="KEY=VALUE")]


#: ``dmlkit train`` flags that set one config value: flag -> (section, key).
TRAIN_FLAGS: dict[str, tuple[str, str]] = {
    "dataset": ("dataset", "name"),
    "data_root": ("dataset", "root"),
    "backbone": ("backbone", "name"),
    "loss": ("loss", "name"),
    "miner": ("miner", "name"),
    "sampler": ("sampler", "name"),
    "evaluator": ("evaluator", "name"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
}
#: ``--SECTION-opt KEY=VALUE`` flags.
OPTION_FLAGS = {f"{s}_opt": s for s in ("dataset", "backbone", "loss", "miner", "sampler", "evaluator")}


def train_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name (default digits).", autocompletion=_complete("dataset"))
    ] = None,
    data_root: Annotated[str | None, typer.Option(help="Dataset folder (sets the dataset's root option).")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone name (default smallcnn).", autocompletion=_complete("backbone"))
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="Loss name (default proxynca).", autocompletion=_complete("loss"))
    ] = None,
    miner: Annotated[
        str | None, typer.Option(help="Miner name; 'none' for none.", autocompletion=_complete("miner"))
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="Sampler name (default m_per_class).", autocompletion=_complete("sampler"))
    ] = None,
    evaluator: Annotated[
        str | None, typer.Option(help="Evaluator name (default retrieval).", autocompletion=_complete("evaluator"))
    ] = None,
    dataset_opt: Opts = None,
    backbone_opt: Opts = None,
    loss_opt: Opts = None,
    miner_opt: Opts = None,
    sampler_opt: Opts = None,
    evaluator_opt: Opts = None,
    callback: Annotated[
        list[str] | None,
        typer.Option(
            "--callback",
            help="Callback NAME, or NAME:KEY=VALUE,KEY=VALUE (e.g. tensorboard, mlflow); repeatable.",
            metavar="NAME[:KEY=VALUE,...]",
            autocompletion=_complete("callback"),
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Train setting key=value, repeatable (dmlkit show train lists them).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default runs/<time>-<dataset>-<loss>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    protocol: Annotated[
        str, typer.Option(help="'single', or 'mlrc': 4 models on 4 class-disjoint validation folds, then concatenated.")
    ] = "single",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the whole configuration, each value with where it comes from, build every component, and "
            "stop: nothing is trained or written.",
        ),
    ] = False,
) -> None:
    """Train an embedding model composed from registry components; with no options, the digits default."""
    flags = {k: v for k, v in locals().items() if k != "dry_run"}
    from dmlkit import checkpoint, distributed, interrupts
    from dmlkit.config import explain, load_toml, merge, resolve, validate
    from dmlkit.folds import run_mlrc
    from dmlkit.rundir import check_crash_env
    from dmlkit.train import Trainer

    check_crash_env()
    if protocol not in ("single", "mlrc"):
        raise DmlkitError(f"--protocol must be single or mlrc; got {protocol!r}")
    distributed.setup()
    host = get_host()
    ckpt, stamp = None, None
    if resume is not None:
        ignored = [k for k, v in flags.items() if k not in ("resume", "epochs", "protocol") and v not in (None, [])]
        if ignored:
            raise DmlkitError(
                f"--resume continues a run as it was configured; {_flag(ignored[0])} cannot change it "
                "(only --epochs can extend it)"
            )
        out_dir = resume if resume.is_dir() else resume.parent
        stamp = _stamp(out_dir / "last.pt")  # taken before reading: a writer in between is noticed
        ckpt = checkpoint.load(resume)
        _check_resume(resume, out_dir, ckpt, epochs)
        cfg = ckpt["config"]
        if epochs is not None:
            cfg = merge(cfg, {"train": {"epochs": epochs}})
        cfg = validate(cfg, host.registry)
        if dry_run:
            given = [("--epochs", {"train": {"epochs": epochs}} if epochs is not None else {})]
            rows = [
                (p, v, src if src != "default" else f"the run's checkpoint {resume}")
                for p, v, src in explain(cfg, given, {})
            ]
            return _dry_run(rows, cfg, out_dir, protocol)
    else:
        user, cli = load_toml(config) if config is not None else {}, command_line(flags)
        if "callbacks" in cli and isinstance(user.get("callbacks"), list):  # after the config file's [[callbacks]]
            cli["callbacks"] = [*user["callbacks"], *cli["callbacks"]]
        recommenders: dict[tuple[str, ...], str] = {}
        cfg, recommended = resolve(merge(user, cli), host.registry, recommenders)
        if recommended and distributed.is_main() and not dry_run:
            console.print(f"[dim]recommended settings in use (yours win): {escape(_settings_text(recommended))}[/dim]")
        out_dir = distributed.broadcast(run_dir or Path(cfg["train"]["run_dir"] or _default_run_dir(cfg)))
        if dry_run:
            given = [("command line", cli), (f"config file {config}", user)]
            return _dry_run(explain(cfg, given, recommenders), cfg, out_dir, protocol)
        if distributed.is_main() and _holds_run(out_dir):
            raise DmlkitError(
                f"{out_dir} already holds an MLRC run (its fold runs); remove it and run the command again, or "
                "pick another --run-dir"
                if protocol == "mlrc"
                else f"{out_dir} already holds a run; continue it with --resume {out_dir} or pick another --run-dir"
            )
    interrupts.resumable_run(out_dir, protocol)  # what `error: interrupted` tells the user to do
    if protocol == "mlrc":
        if ckpt is not None or distributed.world_size_from_env() > 1:
            raise DmlkitError("--protocol mlrc trains its own runs: it cannot resume, nor run under torchrun")
        with _writing(out_dir, new=True):
            _print_mlrc(run_mlrc(cfg, host.registry, out_dir, console), out_dir)
        return
    # everything is checked (config, data, components, the checkpoint's weights) before a file is written
    trainer = Trainer(cfg, host.registry, out_dir, console=console)
    say = trainer.console  # quiet on every rank but the first
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    with _writing(out_dir, new=ckpt is None, stamp=stamp):
        if ckpt is not None:
            say.print(escape(f"resuming {out_dir} after epoch {trainer.epoch}"), soft_wrap=True)
        say.print(escape(f"run directory: {out_dir}"), soft_wrap=True)
        trainer.fit()
    for line in done_lines(out_dir, trainer.results):
        say.print(line, soft_wrap=True)


def _dry_run(rows: list[tuple[str, Any, str]], cfg: dict[str, Any], out_dir: Path, protocol: str) -> None:
    """``train --dry-run``: the configuration with its sources, then every component built (the
    dataset's index read, no image decoded, nothing written)."""
    from rich.text import Text

    from dmlkit.config import toml_value
    from dmlkit.folds import MLRC_FOLDS, with_fold
    from dmlkit.train import Trainer

    table = Table(title=Text(f"dry run: the configuration of {out_dir} (nothing is trained or written)"))
    for col in ("setting", "value", "from"):
        table.add_column(col, overflow="fold")
    for path, value, source in rows:
        style = "" if source == "default" else "bold"
        table.add_row(Text(path), Text(toml_value(value)), Text(source, style=style))
    console.print(table)
    if protocol == "mlrc":
        cfg = with_fold(cfg, MLRC_FOLDS, 0)
    trainer = Trainer(cfg, get_host().registry, out_dir, console=console)  # builds and checks every component
    train, test = trainer.train_split, trainer.test_split
    lines = [
        f"dataset '{cfg['dataset']['name']}': {len(train):,} training items of {train.num_classes} classes, "
        f"{len(test):,} test items of {test.num_classes} classes; {trainer.val_note}",
        f"model: backbone '{cfg['backbone']['name']}', {trainer.embedding_size}-d embeddings, "
        f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters on {trainer.device}",
        f"loss '{cfg['loss']['name']}', miner '{cfg['miner']['name'] or 'none'}', sampler '{cfg['sampler']['name']}' "
        f"({len(trainer.sampler)} batches per epoch), evaluator '{cfg['evaluator']['name']}': built",
        f"{'MLRC: 4 such runs under' if protocol == 'mlrc' else 'a run would write'} {out_dir}"
        + (" (it already holds a run: --resume it or pick another --run-dir)" if _holds_run(out_dir) else ""),
    ]
    for line in lines:
        console.print(escape(line), soft_wrap=True)


def _flag(param: str) -> str:
    return {"set_": "--set", "config": "--config"}.get(param, "--" + param.replace("_", "-"))


def command_line(flags: dict[str, Any]) -> dict[str, Any]:
    """The partial config that ``dmlkit train``'s flags set (``--loss X`` -> ``{"loss": {"name": "X"}}``)."""
    from dmlkit.config import merge, parse_assignments, parse_callback

    cli: dict[str, Any] = {}
    for param, section in OPTION_FLAGS.items():
        if flags.get(param):
            cli = merge(cli, {section: parse_assignments(flags[param], _flag(param))})
    cli = merge(cli, {"train": parse_assignments(flags.get("set_") or [], "--set")})
    for param, (section, key) in TRAIN_FLAGS.items():
        value = flags.get(param)
        if value is None:
            continue
        if key == "name" and value.lower() == "none":
            value = ""
        cli.setdefault(section, {})[key] = value
    if flags.get("callback"):
        cli["callbacks"] = [parse_callback(c) for c in flags["callback"]]
    return {k: v for k, v in cli.items() if v not in ({}, [])}


def _holds_run(out_dir: Path) -> bool:
    return any((out_dir / f).exists() for f in ("last.pt", "mlrc.json", "fold0/last.pt"))


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _check_resume(resume: Path, out_dir: Path, ckpt: dict[str, Any], epochs: int | None) -> None:
    """Resuming never destroys epochs nor another run: not from a checkpoint of another run than
    the directory's own, not from one older than the run's last.pt, and not with fewer --epochs
    than the run has trained."""
    from dmlkit import checkpoint

    last = out_dir / "last.pt"
    if not resume.is_dir() and last.is_file() and resume.resolve() != last.resolve():
        try:
            mine = checkpoint.load(last)
        except DmlkitError:
            raise DmlkitError(
                f"{last} cannot be read, and resuming from {resume.name} would replace it; copy {resume.name} "
                "into a new directory and resume there"
            ) from None
        theirs_id, mine_id = checkpoint.run_id(ckpt), checkpoint.run_id(mine)
        other = theirs_id != mine_id if theirs_id and mine_id else ckpt["config"] != mine["config"]
        if other:
            raise DmlkitError(
                f"{resume} is a checkpoint of another run than {out_dir}'s, and resuming it here would replace that "
                f"run's files; copy it as last.pt into a new directory and resume that"
            )
        if mine["epoch"] > ckpt["epoch"]:
            raise DmlkitError(
                f"{resume} is epoch {ckpt['epoch']} but {last} holds epoch {mine['epoch']}: continuing from it would "
                f"overwrite epochs {ckpt['epoch'] + 1}-{mine['epoch']}; continue the run with --resume {out_dir}, or "
                f"copy {resume.name} into a new directory as last.pt and resume that"
            )
    if epochs is not None and epochs < ckpt["epoch"]:
        raise DmlkitError(
            f"the run has trained {ckpt['epoch']} epochs; --epochs {epochs} would not extend it: pass --epochs "
            f"{ckpt['epoch'] + 1} or more, or leave it out"
        )


class _writing:
    """Hold the run directory's lock while a command writes it; re-check under the lock what was
    checked before it (no run there yet, or the same last.pt), restore best.pt after a kill, and
    remove a new run's directory again if it fails before its first checkpoint."""

    def __init__(self, out_dir: Path, new: bool, stamp: int | None = None):
        from dmlkit import distributed
        from dmlkit.rundir import RunLock

        self.out_dir, self.new, self.stamp = out_dir, new, stamp
        self.lock = RunLock(out_dir) if distributed.is_main() else None

    def __enter__(self) -> None:
        from dmlkit.checkpoint import best_checkpoint

        if self.lock is None:
            return
        self.lock.__enter__()
        try:
            if self.new and _holds_run(self.out_dir):
                raise DmlkitError(
                    f"{self.out_dir} already holds a run; continue it with --resume {self.out_dir} or pick another "
                    "--run-dir"
                )
            last = self.out_dir / "last.pt"
            if not self.new and _stamp(last) != self.stamp:
                raise DmlkitError(f"{last} changed while this command started; run it again")
            if not self.new:
                best_checkpoint(self.out_dir, repair=True, console=err_console)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if self.lock is None:
            return
        if exc_type is not None:
            self.lock.discard_if_empty_run()
        self.lock.__exit__(exc_type, *rest)


#: What the summary's metrics mean (printed under it).
LEGEND = (
    "P@1: share of queries whose nearest neighbour has their class; MAP@R: mean average precision over each "
    "query's R same-class items; N-way accuracy: share of one-shot episodes answered right; all in [0, 1], higher "
    "is better"
)


#: The test metrics the end-of-run summary shows, when the evaluator reports them.
SUMMARY = {"precision_at_1": "P@1", "map_at_r": "MAP@R", "nway_accuracy": "N-way accuracy"}


def done_lines(out_dir: Path, results: dict[str, Any]) -> list[str]:
    """The end-of-run summary: how the epoch was chosen, test metrics there and at the last epoch."""
    if not results:
        return [f"[green]done[/green]: {escape(str(out_dir))} (no epoch trained)"]
    test, last = results["test"], results["test_last"]
    value = results["best_value"]
    chosen = results["selected_by"] + (f" = {value:.4f}" if isinstance(value, float) else "")

    def metrics(values: dict[str, Any]) -> str:
        shown = [f"{label} {_num(values[k])}" for k, label in SUMMARY.items() if k in values]
        return ", ".join(shown) or ", ".join(f"{k} {_num(v, k)}" for k, v in list(values.items())[:3])

    lines = [
        f"[green]done[/green]: {escape(str(out_dir))}",
        f"  epoch {results['best_epoch']} chosen ({escape(chosen)}); test there: {metrics(test)}",
    ]
    if results["last_epoch"] != results["best_epoch"]:
        lines.append(f"  last epoch {results['last_epoch']}: test {metrics(last)}")
    if results["selection_split"] == "test":
        lines.append("  [bold red]the epoch was chosen on the TEST set: these numbers are optimistic[/bold red]")
    lines.append(f"  [dim]{LEGEND}[/dim]")
    return lines


def _num(v: Any, key: str = "metric") -> str:
    """A value as printed everywhere (:func:`dmlkit.train.fmt`): metrics to 4 decimals, '-' if missing."""
    from dmlkit.console import fmt

    return fmt(key, float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def _settings_text(settings: dict[str, Any]) -> str:
    """``{"train": {"lr": 0.001}}`` -> ``train.lr=0.001`` (TOML values), comma-separated."""
    from dmlkit.config import toml_value

    return ", ".join(f"{s}.{k}={toml_value(v)}" for s, body in settings.items() for k, v in body.items())


def _print_mlrc(result: dict[str, Any], out_dir: Path) -> None:
    metric = result.get("best_metric", "map_at_r")
    keys = [k for k in ("precision_at_1", "r_precision", "map_at_r") if all(k in m for m in result["models"])]
    table = Table(title="MLRC: test metrics per fold model and concatenated")
    from dmlkit.console import SHORT_NAMES

    for col in ("model", f"val {metric}", *(SHORT_NAMES.get(k, k) for k in keys)):
        table.add_column(col, justify="right")
    for m in result["models"]:
        table.add_row(f"fold {m['fold']}", _num(m.get("val_value")), *[_num(m[k], k) for k in keys])
    c = result["concatenated"]
    table.add_row(f"concatenated ({c['dim']}-d)", "", *[_num(c.get(k), k) for k in keys])
    console.print(table)
    console.print(escape(f"wrote {out_dir / 'mlrc.json'}"), soft_wrap=True)


def _default_run_dir(cfg: dict[str, Any]) -> Path:
    import time

    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg['dataset']['name']}-{cfg['loss']['name']}"


def evaluate_cmd(
    run: Annotated[Path | None, typer.Argument(help="Run directory or checkpoint to evaluate on its test set.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Embeddings .npy [N, D].")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels .npy [N].")] = None,
    query_mask: Annotated[Path | None, typer.Option(help="Boolean .npy [N]: the queries.")] = None,
    gallery_mask: Annotated[Path | None, typer.Option(help="Boolean .npy [N]: the gallery.")] = None,
    evaluator: Annotated[
        str | None,
        typer.Option(
            help="Evaluator (default: the run's own; retrieval for --embeddings).",
            autocompletion=_complete("evaluator"),
        ),
    ] = None,
    evaluator_opt: Opts = None,
    ks: Annotated[str | None, typer.Option(help="Recall@K cut-offs, comma-separated (evaluator option ks).")] = None,
    backend: Annotated[str | None, typer.Option(help="k-NN backend: auto, faiss, torch (evaluator option).")] = None,
    clustering: Annotated[
        bool | None, typer.Option(help="Also NMI/AMI of k-means (minutes at SOP size on a CPU; evaluator option).")
    ] = None,
    per_class: Annotated[
        bool | None, typer.Option(help="Add per-class P@1, R-Precision, MAP@R, Recall@K (JSON; evaluator option).")
    ] = None,
    verification: Annotated[
        bool | None, typer.Option(help="Add ROC AUC, EER, FNMR at FMR 1e-2/1e-3/1e-4 (evaluator option).")
    ] = None,
    knn: Annotated[
        str | None, typer.Option(help="Add k-NN accuracy for these K, comma-separated, and nearest-centroid accuracy.")
    ] = None,
    ci: Annotated[
        bool | None,
        typer.Option(help="Add 95% bootstrap confidence intervals over queries (seeded; evaluator option)."),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="With a run directory: last or best.")] = "best",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Metrics of saved embeddings (--embeddings/--labels) or of a trained run's test set, by the run's
    own evaluator unless --evaluator names another."""
    from dmlkit.config import parse_assignments
    from dmlkit.contract import evaluator_arguments

    overrides = parse_assignments(evaluator_opt or [], "--evaluator-opt")
    if ks is not None:
        try:
            overrides["ks"] = [int(k) for k in ks.split(",") if k.strip()]
        except ValueError:
            raise DmlkitError(f"--ks must be comma-separated integers, e.g. 1,2,4,8; got {ks!r}") from None
    if knn is not None:
        try:
            overrides["knn"] = [int(k) for k in knn.split(",") if k.strip()]
        except ValueError:
            raise DmlkitError(f"--knn must be comma-separated integers, e.g. 1,5; got {knn!r}") from None
    for key, value in (
        ("backend", backend),
        ("clustering", clustering),
        ("per_class", per_class),
        ("verification", verification),
        ("ci", ci),
    ):
        if value is not None:
            overrides[key] = value
    if embeddings is not None:
        if run is not None:
            raise DmlkitError("give either a run directory or --embeddings/--labels, not both")
        if labels is None:
            raise DmlkitError("--embeddings needs --labels LABELS.npy")
        built = _evaluator(evaluator or "retrieval", overrides)
        emb, lab = _load_npy(embeddings, "embeddings"), _load_npy(labels, "labels")
        qm = _load_npy(query_mask, "query mask") if query_mask else None
        gm = _load_npy(gallery_mask, "gallery mask") if gallery_mask else None
        with console.status(f"evaluating {len(lab):,} embeddings"):
            metrics = built(emb, lab, qm, gm)
    elif run is not None:
        trainer = _trainer_from(run, checkpoint)
        own = trainer.cfg["evaluator"]
        name = evaluator or own["name"]
        base = {k: v for k, v in own.items() if k != "name"} if name == own["name"] else {}
        built = _evaluator(name, {**base, **overrides})
        emb, lab = trainer.embed(trainer.test_split, "embedding the test images")
        with console.status(f"evaluating {len(lab):,} test embeddings"):
            extra = evaluator_arguments(built, trainer.test_split, trainer.loss)  # groups=, similarity=
            metrics = built(emb, lab, trainer.test_split.query_mask, trainer.test_split.gallery_mask, **extra)
        chosen = {**_checkpoint_note(trainer, checkpoint), "evaluator": name}
        if as_json:
            metrics = {**metrics, "checkpoint": chosen}
        else:
            console.print(
                escape(
                    f"test metrics of {chosen['file']}: epoch {chosen['epoch']} ({chosen['selected_by']}), "
                    f"evaluator {name}"
                ),
                soft_wrap=True,
            )
    else:
        raise DmlkitError("nothing to evaluate: pass a run directory, or --embeddings X.npy --labels Y.npy")
    if as_json:
        print(json.dumps(metrics))
        return
    intervals = metrics.get("ci") if isinstance(metrics.get("ci"), dict) else {}
    metrics = {k: v for k, v in metrics.items() if k not in ("per_class", "ci")}  # the table shows the totals
    table = Table(title="metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if intervals:
        table.add_column(f"{metrics.get('ci_level', 0.95):.0%} interval", justify="right")
    for k, v in metrics.items():
        if k != "checkpoint":
            row = [k, _num(v, k) if isinstance(v, float) else escape(str(v))]
            if intervals:
                row.append(" - ".join(_num(b, k) for b in intervals[k]) if k in intervals else "")
            table.add_row(*row)
    console.print(table)
    console.print(f"[dim]{LEGEND}[/dim]", soft_wrap=True)


def _evaluator(name: str, options: dict[str, Any]) -> Any:
    """Build an evaluator; an option it does not take is refused by the registry with its valid options."""
    registry = get_host().registry
    with registry.active():
        return registry.build("evaluator", name, **options)


def embed_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint.")],
    out: Annotated[Path, typer.Option(help="Folder for embeddings.npy and labels.npy.")] = Path("embeddings"),
    split: Annotated[str, typer.Option(help="test or train.")] = "test",
    checkpoint: Annotated[str, typer.Option(help="With a run directory: last or best.")] = "best",
) -> None:
    """Write a trained model's embeddings and labels (and query/gallery masks) as .npy files."""
    from dmlkit.fileio import save_npy, writable_error

    if split not in ("test", "train"):
        raise DmlkitError(f"--split must be test or train; got {split!r}")
    if out.exists() and not out.is_dir():
        raise DmlkitError(f"--out {out} is a file; --out names a folder for embeddings.npy and labels.npy")
    trainer = _trainer_from(run, checkpoint)
    data = trainer.test_split if split == "test" else trainer.train_split.with_transform(trainer.test_split.transform)
    emb, lab = trainer.embed(data)
    arrays = {"embeddings": emb, "labels": lab}
    if data.query_mask is not None:
        arrays.update(query_mask=data.query_mask, gallery_mask=data.gallery_mask)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise writable_error(out, exc, "to folder") from None
    for name, array in arrays.items():  # each file whole, or the old one left as it was
        save_npy(out / f"{name}.npy", array)
    console.print(escape(f"wrote {len(emb)} embeddings of size {emb.shape[1]} to {out}/"), soft_wrap=True)


def report_cmd(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories to compare (a --protocol mlrc directory counts as one run).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the PNG figures and report.json [default: report, or none with --html]."),
    ] = None,
    html: Annotated[
        Path | None, typer.Option(help="Write one self-contained HTML page (opens offline) to this file.")
    ] = None,
    grid: Annotated[bool, typer.Option(help="Draw a retrieval grid PNG per run (embeds its test set).")] = True,
    queries: Annotated[int, typer.Option(help="Random queries in each retrieval grid and on the page.")] = 6,
    top_k: Annotated[int, typer.Option(help="Neighbours shown per query.")] = 5,
    worst: Annotated[int, typer.Option(help="Worst queries shown on the page.")] = 6,
    map_method: Annotated[
        str, typer.Option("--map", help="2-D map of the page: auto (umap when installed, else pca), pca, tsne, umap.")
    ] = "auto",
    map_points: Annotated[int, typer.Option(help="Test images drawn on the map (a random sample beyond).")] = 1000,
    best_metric: Annotated[
        str | None, typer.Option(help="Deprecated: each run's epoch is the one its own validation chose.")
    ] = None,
) -> None:
    """Compare runs in one table; write PNG figures (curves, Recall@K, retrieval grids) and/or an HTML page."""
    from dmlkit.report import load_run, plot_curves, plot_recall_at_k, retrieval_grid, summary

    if queries < 1 or top_k < 1:
        raise DmlkitError("--queries and --top-k must be >= 1")
    if worst < 0 or map_points < 3:
        raise DmlkitError("--worst must be >= 0 and --map-points >= 3")
    if best_metric is not None:
        raise DmlkitError(
            "--best-metric is gone: picking each run's best epoch by a test metric is selection on the test set; "
            "the report shows each run at the epoch its validation chose (train.best_metric)"
        )
    method = None
    if html is not None:
        from dmlkit.report_data import map_method as resolve_map

        method = resolve_map(map_method)
        if html.is_dir():
            raise DmlkitError(f"--html {html} is a folder; give a file name such as {html / 'report.html'}")
        if html.parent.exists() and not html.parent.is_dir():
            raise DmlkitError(f"--html {html}: {html.parent} is a file, not a folder")
        try:  # before any work: a page that cannot be written is refused at once
            html.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from dmlkit.rundir import writable_error

            raise writable_error(html, exc, "file") from None
    loaded = [load_run(r) for r in runs]
    rows = [summary(r) for r in loaded]
    pngs = out is not None or html is None
    out = out if out is not None else Path("report")
    written = []
    if pngs:
        out.mkdir(parents=True, exist_ok=True)
        written += [plot_curves(loaded, out), plot_recall_at_k(rows, out)]
    analyses = []
    if (pngs and grid) or html is not None:
        from dmlkit.report_data import embed_run, example_queries

        for run in loaded:
            data = embed_run(run, lambda run_dir: _trainer_from(run_dir, "best"))
            if pngs and grid:
                shown = example_queries(data, top_k, worst=0, random=queries)
                written.append(retrieval_grid(shown.random, data.split, out, run["name"]))
            if html is not None:
                from dmlkit.report_html import analyse

                with console.status(f"analysing {run['name']}'s test embeddings"):
                    analyses.append(analyse(run, data, method, top_k, worst, queries, map_points))
    if pngs:
        (out / "report.json").write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
        written.append(out / "report.json")
    if html is not None:
        from dmlkit.report_html import write_page

        written.append(write_page(html, loaded, rows, analyses))
        for a in analyses:
            if a["differ"]:
                err_console.print(
                    f"[yellow]warning: {escape(a['name'])}'s test metrics recomputed from its checkpoint differ from "
                    "its results file (the data, code or checkpoint changed since training); the page says so[/yellow]"
                )
    table = Table(title="runs: test metrics at the epoch each run's selection chose (on the split named)")
    names = {
        "run": "run",
        "loss": "loss",
        "miner": "miner",
        "best_epoch": "epoch",
        "selection_split": "on",
        "precision_at_1": "P@1",
        "r_precision": "R-Prec",
        "map_at_r": "MAP@R",
        "nmi": "NMI",
        "train_time_s": "train (s)",
        "wall_time_s": "wall (s)",
    }
    # an mlrc run's folds follow it with their epochs, named by fold alone so that the table stays narrow
    shown_rows = []
    for row in rows:
        folds = row.get("folds", [])
        shown_rows.append({**row, "best_epoch": ""} if folds else row)
        shown_rows += [{**f, "run": "  " + f["run"].rsplit("/", 1)[-1]} for f in folds]
    cols = [c for c in names if any(c in row for row in shown_rows)]
    for c in cols:
        text = c in ("run", "loss", "miner", "selection_split")
        table.add_column(names[c], justify="left" if text else "right", no_wrap=True)
    for row in shown_rows:
        table.add_row(*[_num(row[c], c) if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols])
    # in a log file the table keeps whole columns instead of being cut at 80 characters
    console.print(table)  # outside a terminal the console is wide: whole columns
    console.print(f"wrote {', '.join(escape(str(f)) for f in written)}", soft_wrap=True)


def _trainer_from(run: Path, which: str) -> Any:
    from dmlkit.train import load_run

    return load_run(run, which, console=console, err_console=err_console)


def _checkpoint_note(trainer: Any, which: str) -> dict[str, Any]:
    """Which checkpoint was evaluated, its epoch, and how that epoch was chosen."""
    best = trainer.best
    selected_by = best.get("selected_by", "?") if which == "best" else "the last checkpoint"
    return {
        "file": getattr(trainer, "checkpoint_file", f"{which}.pt"),
        "epoch": trainer.epoch,
        "selected_by": selected_by,
    }


def _load_npy(path: Path, what: str) -> Any:
    import numpy as np

    if not path.is_file():
        raise DmlkitError(f"{what} file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DmlkitError(f"cannot read {what} file {path} as .npy: {first}") from None
    if not isinstance(data, np.ndarray):
        data.close()
        raise DmlkitError(f"{what} file {path} is an .npz archive; save one array with np.save(path, array)")
    return data


def new_plugin_cmd(
    name: Annotated[str, typer.Argument(help="The plugin's name, a lower-case identifier (also its loss's name).")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the package folder.")] = Path("."),
) -> None:
    """Write a plugin package: a documented loss, its entry point, and tests that use check_plugin."""
    from dmlkit.scaffold import new_plugin

    target = new_plugin(name, directory)
    console.print(f"wrote {escape(str(target))}: pyproject.toml, dmlkit_{escape(name)}.py, tests/, README.md")
    console.print(f"next: cd {escape(str(target))} && pip install -e '.\\[test]' && python -m pytest", soft_wrap=True)


def build_app() -> typer.Typer:
    """The Typer app: the core commands plus those the loaded plugins add."""
    app = typer.Typer(
        name="dmlkit",
        help="Deep metric learning from components that plugins provide.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    app.callback()(_root)
    app.command("plugins")(plugins_cmd)
    app.command("list")(list_cmd)
    app.command("show")(show_cmd)
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("embed")(embed_cmd)
    app.command("report")(report_cmd)
    app.command("new-plugin")(new_plugin_cmd)
    get_host().add_commands(app)
    return app


def one_line(text: str, fallback: str = "failed") -> str:
    """An error message as one line: a DataLoader worker's re-raised traceback becomes the worker's
    own last line, and several lines are joined."""
    if "Original Traceback" in text:  # raised in a DataLoader worker process
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[\w.]*(Error|Exception)\w*: ", "", last)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or fallback


def _os_error(exc: OSError) -> str:
    """``OSError`` as one line: the reason and the file (shortened when it is very long)."""
    name = str(exc.filename) if exc.filename is not None else ""
    if len(name) > 120:
        name = name[:60] + "..." + name[-60:]
    reason = exc.strerror or one_line(str(exc), type(exc).__name__)
    return f"{reason}: {name}" if name else reason


def _plain_flags(command: Any) -> None:
    """On/off flags (``--json``, ``--help``) show no ``<bool>`` value in ``--help``: they take none."""
    import typer._click as click

    for param in [*command.params, command.get_help_option(click.Context(command))]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)


def _show_deprecations() -> None:
    """dmlkit's deprecation warnings (a plugin using a 0.1 name) are printed as yellow lines on
    stderr, each once per command; Python would hide them."""
    import warnings

    from dmlkit.errors import DmlkitDeprecationWarning

    _state["deprecations"] = set()
    if getattr(warnings.showwarning, "dmlkit", False):
        return
    default_show = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not issubclass(category, DmlkitDeprecationWarning):
            return default_show(message, category, filename, lineno, file, line)
        printed = _state.setdefault("deprecations", set())
        if str(message) not in printed:
            printed.add(str(message))
            err_console.print(f"[yellow]warning: {escape(str(message))}[/yellow]", soft_wrap=True)

    show.dmlkit = True  # type: ignore[attr-defined]
    warnings.showwarning = show
    warnings.filterwarnings("always", category=DmlkitDeprecationWarning)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and a non-zero exit (``--debug`` shows tracebacks);
    Ctrl-C and SIGTERM end with ``error: interrupted`` / ``error: terminated`` and status 130 / 143."""
    import warnings

    from dmlkit import interrupts

    in_process = argv is not None  # called from Python: give the signal handlers and warning display back afterwards
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings() if in_process else contextlib.nullcontext():
        _show_deprecations()
        interrupts.install()
        try:
            code = _run(argv, "--debug" in argv)
        except interrupts.Interrupted as exc:  # arrived just after the command returned
            interrupts.note(exc.signum)
            code = interrupts.report(_print_error)
        finally:
            interrupts.restore() if in_process else interrupts.closing()
    interrupts.leave(code, in_process)


def _run(argv: list[str], debug: bool) -> int:
    """Run the command line; the exit status (the message is printed here)."""
    from dmlkit import interrupts

    if hasattr(signal, "SIGXFSZ"):  # over the file size limit (ulimit -f): an OSError to report, not a kill
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    try:
        command = typer.main.get_command(build_app())
        _plain_flags(command)
        # standalone_mode=False: typer *returns* the status of typer.Exit (--help: 0) and of a
        # KeyboardInterrupt (130) instead of exiting; tests/test_reliability_cli.py pins this down
        returned = command.main(args=argv, prog_name="dmlkit", standalone_mode=False)
    except BaseException as exc:  # every way out of a command is reported here
        if isinstance(exc, interrupts.Interrupted):
            interrupts.note(exc.signum)
        if interrupts.received() is not None:  # whatever the signal left behind: report the signal
            if debug:
                import traceback

                traceback.print_exc()
            return interrupts.report(_print_error)
        return _failure(exc, debug)
    if returned == 130:  # a KeyboardInterrupt that typer caught (raised by code, not by our handler)
        return interrupts.report(_print_error)
    return returned if isinstance(returned, int) and not isinstance(returned, bool) else 0


def _print_error(text: str) -> None:
    err_console.print(f"[red]error: {escape(text)}[/red]", soft_wrap=True)


def _failure(exc: BaseException, debug: bool) -> int:
    """The exit status of a command that raised ``exc``, after printing its one line."""
    if isinstance(exc, typer.Exit):
        return exc.exit_code
    if isinstance(exc, SystemExit):  # sys.exit in a command or a plugin's code
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        _print_error(one_line(str(exc.code)))
        return 1
    if isinstance(exc, typer.Abort):
        _print_error("aborted")
        return 130
    if isinstance(exc, typer.TyperException):
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `dmlkit`: show the help
            print(exc.format_message())
            return 0
        err_console.print(f"[red]error: {escape(exc.format_message())}[/red] (see --help)", soft_wrap=True)
        return 2
    if debug and isinstance(exc, Exception):
        raise exc
    if isinstance(exc, DmlkitError):
        _print_error(one_line(str(exc), type(exc).__name__))
    elif isinstance(exc, KeyboardInterrupt):
        _print_error("interrupted")
        return 130
    elif isinstance(exc, OSError):  # a path too long, a full disk, a read-only folder ...
        _print_error(_os_error(exc))
    elif isinstance(exc, MemoryError):
        _print_error("out of memory; use smaller settings (batch size, model, data)")
    elif isinstance(exc, Exception):  # a bug: one line that says so; --debug shows the traceback
        text = one_line(str(exc), "")
        _print_error(
            f"internal error: {type(exc).__name__}{': ' + text if text else ''} (rerun with --debug for the "
            "traceback and report it)"
        )
    else:
        raise exc
    return 1
