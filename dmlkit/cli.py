"""The ``dmlkit`` command line: plugins, list, show, train, evaluate, embed."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dmlkit.errors import DmlkitError
from dmlkit.plugins import get_host
from dmlkit.registry import KINDS

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
_state = {"debug": False}

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
    """List loaded plugins, their hooks, components and load errors."""
    host = get_host()
    infos = list(host.plugins.values())
    if as_json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    table = Table(title="dmlkit plugins")
    for col in ("plugin", "distribution", "version", "hooks", "components", "errors"):
        table.add_column(col)
    for i in infos:
        hooks = ", ".join(h.removeprefix("register_") for h in i.hooks)
        errors = "\n".join(i.errors)
        table.add_row(
            i.name, i.distribution or "-", i.version or "-", hooks, str(i.components), f"[red]{errors}[/red]" if errors else ""
        )
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
            table.add_row(r["name"], ", ".join(r["aliases"]), r["plugin"], r["description"])
        console.print(table)


def show_cmd(
    kind: Annotated[str, typer.Argument(help="Component kind.")],
    name: Annotated[str, typer.Argument(help="Component name or alias.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one component: signature, defaults, description, owning plugin."""
    host = get_host()
    kind = normalise_kind(kind)
    spec = host.registry.get(kind, name)
    params = spec.parameters()
    defaults = spec.resolved_defaults()
    doc = inspect.getdoc(spec.factory) or ""
    if as_json:
        out = {
            "kind": kind,
            "name": spec.name,
            "aliases": list(spec.aliases),
            "plugin": spec.plugin,
            "distribution": spec.distribution,
            "description": spec.description,
            "options": {n: defaults.get(n, None) for n in params},
            "required": [n for n in params if n not in defaults],
            "doc": doc,
        }
        print(json.dumps(out, indent=2, default=repr))
        return
    console.print(f"[bold]{kind} {spec.name}[/bold]  (plugin [cyan]{spec.plugin}[/cyan], distribution {spec.distribution or '-'})")
    if spec.aliases:
        console.print(f"aliases: {', '.join(spec.aliases)}")
    if spec.description:
        console.print(spec.description)
    table = Table(show_header=True)
    table.add_column("option")
    table.add_column("default")
    for n in params:
        table.add_row(n, repr(defaults[n]) if n in defaults else "[yellow](supplied at run time)[/yellow]")
    console.print(table)
    if doc and doc != spec.description:
        console.print(doc, soft_wrap=True)


def build_app() -> typer.Typer:
    """The Typer app: the core commands plus those the loaded plugins add."""
    app = typer.Typer(
        name="dmlkit",
        help="Deep metric learning from components that plugins provide.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.callback()(_root)
    app.command("plugins")(plugins_cmd)
    app.command("list")(list_cmd)
    app.command("show")(show_cmd)
    get_host().add_commands(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and a non-zero exit (``--debug`` shows tracebacks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        build_app()(args=argv, prog_name="dmlkit", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("[red]error: aborted[/red]")
        sys.exit(130)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `dmlkit`: show the help
            print(exc.format_message())
            sys.exit(0)
        err_console.print(f"[red]error: {exc.format_message()}[/red] (see --help)", soft_wrap=True)
        sys.exit(2)
    except DmlkitError as exc:
        if debug:
            raise
        err_console.print(f"[red]error: {exc}[/red]", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[red]error: interrupted[/red]")
        sys.exit(130)


