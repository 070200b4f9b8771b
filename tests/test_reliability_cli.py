"""The CLI's contract with its dependencies: exit codes and error lines that a new typer, rich or
pluggy release could change silently. pyproject.toml bounds these packages to the versions this
file was run with; each behaviour of typer that ``dmlkit.cli.main`` relies on or works around is
asserted here on its own, and so is each exit code a user's script can see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from packaging.requirements import Requirement

import dmlkit
from dmlkit import interrupts
from dmlkit.plugins import get_host

ROOT = Path(__file__).resolve().parents[1]
BOUNDED = ("typer", "rich", "pluggy")


def test_the_installed_cli_dependencies_are_within_the_bounds_this_suite_covers():
    """An upper bound on each (pyproject.toml), and the installed version inside it: the bound is
    the version this file last passed with, so raising it means running this file again."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {r.name: r for r in map(Requirement, deps)}
    for name in BOUNDED:
        spec = reqs[name].specifier
        assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name} has no upper bound"
        assert spec.contains(version(name)), (name, version(name), str(spec))


# --- what typer does under standalone_mode=False (dmlkit.cli.main runs it that way) ---------------
def _typer_app() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True)  # as dmlkit's

    @app.command()
    def ctrl_c() -> None:
        raise KeyboardInterrupt

    @app.command()
    def exit3() -> None:
        raise typer.Exit(3)

    @app.command()
    def ours() -> None:
        raise interrupts.Interrupted(15)

    @app.command()
    def fine() -> None:
        pass

    return app


def _typer_main(*args: str):
    command = typer.main.get_command(_typer_app())
    return command.main(args=list(args), prog_name="x", standalone_mode=False)


def test_typer_returns_130_for_a_keyboard_interrupt_instead_of_raising_it():
    """Why main installs its own handler: typer turns KeyboardInterrupt into a *returned* 130,
    which a caller that ignores the return value reports as success (issue 25)."""
    assert _typer_main("ctrl-c") == 130


def test_typer_returns_the_status_of_typer_exit_and_0_for_help(capsys):
    assert _typer_main("exit3") == 3
    assert _typer_main("--help") == 0
    assert _typer_main("fine", "--help") == 0
    assert _typer_main("fine") is None
    capsys.readouterr()


def test_typer_lets_dmlkits_interrupt_and_usage_errors_through():
    with pytest.raises(interrupts.Interrupted):
        _typer_main("ours")
    with pytest.raises(typer.TyperException) as info:
        _typer_main("nope")
    assert info.value.exit_code == 2 and "No such command" in info.value.format_message()
    with pytest.raises(typer.TyperException) as info:
        _typer_main()
    assert type(info.value).__name__ == "NoArgsIsHelpError"  # main prints the help for it


# --- the exit codes a user sees --------------------------------------------------------------------
def add_commands(code: str) -> None:
    """A plugin module whose register_commands runs ``code`` (with ``app`` and ``typer`` in scope)."""
    plugin = types.ModuleType("plugin_commands")
    namespace = {"typer": typer, "interrupts": interrupts}
    exec(code, namespace)
    plugin.register_commands = dmlkit.hookimpl(namespace["register_commands"])
    get_host().add_plugin(plugin, "plugin_commands")


COMMANDS = """
def register_commands(app):
    @app.command("exit-3")
    def exit3():
        raise typer.Exit(3)

    @app.command("ctrl-c")
    def ctrl_c():
        raise KeyboardInterrupt

    @app.command("sigterm")
    def sigterm():
        interrupts.hint("do this")
        raise interrupts.Interrupted(15)

    @app.command("sys-exit")
    def sys_exit():
        raise SystemExit("gave up")

    @app.command("bug")
    def bug():
        raise ZeroDivisionError("division by zero")
"""


@pytest.mark.parametrize(
    "argv, code, line",
    [
        (["--bogus"], 2, "error: No such option: --bogus (see --help)"),
        (["frobnicate"], 2, "error: No such command 'frobnicate'. (see --help)"),
        (["list", "--json", "extra", "args"], 2, "error: Got unexpected extra argument(s) (args) (see --help)"),
        (["exit-3"], 3, None),
        (["ctrl-c"], 130, "error: interrupted"),
        (["sigterm"], 143, "error: terminated; do this"),
        (["sys-exit"], 1, "error: gave up"),
        (["bug"], 1, "error: internal error: ZeroDivisionError: division by zero (rerun with --debug for the "
                     "traceback and report it)"),
    ],
)  # fmt: skip
def test_exit_codes_and_lines(argv, code, line, cli):
    add_commands(COMMANDS)
    got, out, err = cli(*argv)
    assert got == code, (argv, got, err)
    assert err.strip() == (line or ""), argv


@pytest.mark.parametrize("argv", [["--help"], [], ["train", "--help"], ["list", "--json"]])
def test_success_and_help_exit_0(argv, cli):
    code, out, err = cli(*argv)
    assert code == 0 and err == ""
    assert ("Usage" in out) if argv != ["list", "--json"] else json.loads(out)


def test_the_handlers_are_given_back_after_an_in_process_call(cli):
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cli("list", "--json")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_real_entry_point_exits_2_on_a_usage_error_and_0_on_help(tmp_path):
    """The console script, as a shell sees it (the signals' 130/143 are in test_reliability_signals.py)."""
    env = {**os.environ, "DMLKIT_PLUGINS": "builtin"}
    usage = subprocess.run([sys.executable, "-m", "dmlkit", "train", "--zzz"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and usage.stderr.strip() == "error: No such option: --zzz (see --help)"
    helped = subprocess.run([sys.executable, "-m", "dmlkit", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "Usage" in helped.stdout and helped.stderr == ""


def test_an_in_process_command_gives_the_warning_display_back(cli):
    """`dmlkit.cli.main([...])` called from Python (a notebook, a test) shows dmlkit's deprecations
    while the command runs and gives warnings.showwarning and the filters back when it returns, so
    a later warning of the caller's is not printed by dmlkit's hook (it went to stderr before)."""
    import warnings

    before_show, before_filters = warnings.showwarning, list(warnings.filters)
    code, _, err = cli("list", "loss")
    assert code == 0, err
    assert warnings.showwarning is before_show and warnings.filters == before_filters
