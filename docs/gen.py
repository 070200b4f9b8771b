"""mkdocs hook: pages built from the registry and the CLI, so they can never drift from the code.

Markers replaced in any page:
- ``<!-- dmlkit:components KIND -->``: every registered component of KIND with options and defaults;
- ``<!-- dmlkit:cli COMMAND -->``: the ``--help`` text of ``dmlkit COMMAND``.
"""

from __future__ import annotations

import inspect
import re

MARKER = re.compile(r"<!-- dmlkit:(components|cli) ([a-z_]*) -->")


def components_markdown(kind: str) -> str:
    from dmlkit import get_registry

    registry = get_registry()
    specs = [s for s in registry.specs(kind) if s.distribution == "dmlkit"]
    if not specs:
        return "_No built-in component of this kind yet; plugins can register them._\n"
    out = []
    for spec in specs:
        out.append(f"## `{spec.name}`\n")
        if spec.aliases:
            out.append(f"Aliases: {', '.join(f'`{a}`' for a in spec.aliases)}. ")
        out.append(f"Plugin `{spec.plugin}`.\n\n{spec.description}\n")
        doc = inspect.getdoc(spec.factory) or ""
        if doc and doc.splitlines()[0] not in spec.description:
            out.append(f"\n{doc}\n")
        defaults = spec.resolved_defaults()
        rows = ["| option | default |", "| --- | --- |"]
        for name in spec.parameters():
            value = f"`{defaults[name]!r}`" if name in defaults else "supplied at run time"
            rows.append(f"| `{name}` | {value} |")
        out.append("\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def cli_markdown(command: str) -> str:
    import contextlib
    import io
    import os

    import typer

    from dmlkit.cli import _plain_flags, build_app

    click_command = typer.main.get_command(build_app())
    _plain_flags(click_command)  # as `dmlkit --help` shows them: flags take no value
    args = [*([command] if command else []), "--help"]
    out, width = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            click_command.main(args, prog_name="dmlkit", standalone_mode=False)
    finally:
        os.environ.pop("COLUMNS") if width is None else os.environ.__setitem__("COLUMNS", width)
    return f"```text\n{out.getvalue().rstrip()}\n```\n"


def expand(markdown: str) -> str:
    def repl(m: re.Match) -> str:
        what, arg = m.groups()
        return components_markdown(arg) if what == "components" else cli_markdown(arg)

    return MARKER.sub(repl, markdown)


def on_page_markdown(markdown, page, config, files):  # mkdocs hook signature
    return expand(markdown)
