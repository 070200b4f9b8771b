"""new-plugin and plugin commands fed bad input, and paths full of rich markup in every command of
the deploy and tune plugins and in new-plugin.

new-plugin refuses (one line, a name to pick instead, nothing written) every name whose package
would shadow a module (dmlkit's own, the standard library's, any installed one) or clash with a
plugin or a loss; a plugin cannot take, change or remove a built-in's or another plugin's command
(the registration is dropped, recorded on the plugin and shown by ``dmlkit plugins``); and a path
such as ``out[/]`` or ``[bold]x[/bold]`` is printed as it is, the work not reported as failed.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_distribution
from reliability_helpers import image_run, one_error_line, unchanged
from test_fuzz import snapshot

NAMES = {
    "plugins": "would shadow the module 'plugins' (dmlkit's own)",
    "dmlkit": "would shadow the module 'dmlkit' (dmlkit's own)",
    "os": "would shadow the module 'os' (a standard library module)",
    "json": "a standard library module",
    "typing": "a standard library module",
    "asyncio": "a standard library module",
    "torch": "would shadow the installed module 'torch'",
    "numpy": "would shadow the installed module 'numpy'",
    "pytest": "would shadow the installed module 'pytest'",
    "optuna": "would shadow the installed module 'optuna'",
    "triplet": "is taken by the loss 'triplet' of plugin 'losses'",
    "contrastive": "is taken by the loss 'contrastive'",
    "ms": "is taken by the loss 'multi_similarity'",
    "proxynca": "is taken by the loss 'proxynca'",
    "losses": "is the name of the plugin from dmlkit",
    "deploy": "is the name of the plugin from dmlkit",
    "tune": "is the name of the plugin from dmlkit",
    "Triplet": "must be a lower-case Python identifier",
    "1loss": "must be a lower-case Python identifier",
    "my-loss": "must be a lower-case Python identifier",
    "my loss": "must be a lower-case Python identifier",
    "_hidden": "must be a lower-case Python identifier",
    "class": "must be a lower-case Python identifier",
    "lambda": "must be a lower-case Python identifier",
    "caf\u00e9": "must be a lower-case Python identifier",
    "a.b": "must be a lower-case Python identifier",
    "../x": "must be a lower-case Python identifier",
    "": "must be a lower-case Python identifier",
    "x" * 61: "at most 60 characters",
}


@pytest.mark.parametrize("name", list(NAMES), ids=[n[:20] or "empty" for n in NAMES])
def test_new_plugin_refuses_a_name_that_shadows_or_clashes(name, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = cli("new-plugin", name, "--dir", str(tmp_path / "w"))
    line = one_error_line(code, out, err, NAMES[name], name)
    unchanged(tmp_path, before, name)
    assert "pick another name, e.g. " in line
    code, out, err = cli("new-plugin", line.rsplit("e.g. ", 1)[1], "--dir", str(tmp_path / "w"))
    assert code == 0, err  # what it suggests works


def test_new_plugin_module_name_is_checked_too(cli, tmp_path, add_site):
    """A name whose package module dmlkit_NAME is already installed (here: by another package)."""
    site = make_distribution(tmp_path / "site", "dmlkit-circle", {"dmlkit_circle": "X = 1\n"}, {})
    add_site(site)
    code, out, err = cli("new-plugin", "circle", "--dir", str(tmp_path / "w"))
    one_error_line(code, out, err, "would shadow the installed module 'dmlkit_circle'")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("where", ["file", "existing", "too-long"])
def test_new_plugin_refuses_where_it_cannot_write(where, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("a file")
    (tmp_path / "dmlkit-mine").mkdir()
    (tmp_path / "dmlkit-mine" / "notes.txt").write_text("mine")
    folder = {"file": tmp_path / "f", "existing": tmp_path, "too-long": tmp_path / ("x" * 300)}[where]
    before = snapshot(tmp_path)
    code, out, err = cli("new-plugin", "mine", "--dir", str(folder))
    match = {"file": "is a file", "existing": "already exists", "too-long": "too long"}[where]
    one_error_line(code, out, err, match, where)
    unchanged(tmp_path, before, where)


# --- plugins cannot take commands -------------------------------------------------------------------
TAKER = """
import typer
import dmlkit

def mine():
    print("mine ran")

def theirs():
    print("HIJACKED")

@dmlkit.hookimpl
def register_commands(app):
    app.command("train")(theirs)
    app.command("list")(theirs)
    app.add_typer(typer.Typer(), name="tune")
    app.command("mine")(mine)
    app.command("mine")(theirs)
"""
SECOND = """
import dmlkit

@dmlkit.hookimpl
def register_commands(app):
    app.command("mine")(lambda: print("HIJACKED"))
    app.command("export")(lambda: print("HIJACKED"))
"""
WIPER = """
import dmlkit

@dmlkit.hookimpl
def register_commands(app):
    app.registered_commands[0].callback = lambda: print("HIJACKED")
    app.registered_commands.pop()
    app.callback()(lambda: print("HIJACKED"))
"""


def test_plugins_cannot_take_change_or_remove_commands(cli, tmp_path, add_site, wide):
    modules = {"thirdparty_a": TAKER, "thirdparty_b": SECOND, "thirdparty_c": WIPER}
    add_site(make_distribution(tmp_path / "site", "thirdparty-x", modules,
                               {"a_taker": "thirdparty_a", "b_second": "thirdparty_b", "c_wiper": "thirdparty_c"}))  # fmt: skip
    code, out, err = cli("plugins", "--json")
    assert code == 0, err
    info = {p["name"]: p for p in json.loads(out)}
    assert info["a_taker"]["commands"] == ["mine"]
    assert info["a_taker"]["errors"] == [
        "command 'train' not added: it is a built-in command",
        "command 'list' not added: it is a built-in command",
        "command 'mine' not added: this plugin registers it twice",
        "command 'tune' not added: it is a command of plugin 'tune'",
    ]
    assert info["b_second"]["commands"] == [] and info["b_second"]["errors"] == [
        "command 'mine' not added: it is a command of plugin 'a_taker'",
        "command 'export' not added: it is a command of plugin 'deploy'",
    ]
    assert info["c_wiper"]["errors"] == ["register_commands changed or removed commands registered before it; undone"]
    code, out, err = cli("plugins")  # the table shows it too
    assert "command 'train' not added: it is a built-in command" in out
    # every command still does its own work
    for argv, want in (
        (["mine"], "mine ran"),
        (["list", "loss", "--json"], '"triplet"'),
        (["train", "--help"], "--resume"),
    ):
        code, out, err = cli(*argv)
        assert code == 0 and want in out and "HIJACKED" not in out, (argv, out[-500:], err)
    code, out, _ = cli("--help")
    assert code == 0 and all(c in out for c in ("export", "index", "search", "tune", "new-plugin", "plugins"))


# --- markup in paths: printed as they are, and the work is not reported as failed ------------------
ODD = ["out[/]", "[bold]b[/bold]", "[red]r", "x[link=http://a]y"]


@pytest.fixture
def wide(monkeypatch):
    """Consoles wide enough that no path is wrapped (the text is compared as printed)."""
    import dmlkit.cli
    import dmlkit_plugins.deploy
    import dmlkit_plugins.tune

    for console in (dmlkit.cli.console, dmlkit.cli.err_console, dmlkit_plugins.deploy.console,
                    dmlkit_plugins.deploy.err_console, dmlkit_plugins.tune.console):  # fmt: skip
        monkeypatch.setattr(console, "width", 10_000)


@pytest.mark.parametrize("odd", ODD)
def test_paths_with_markup_print_as_they_are_in_export_index_search(odd, cli, tmp_path, wide):
    res = image_run()
    base = tmp_path / odd  # a "/" in the markup makes two folders: the path still reads as the markup
    base.mkdir(parents=True)
    images = base / "imgs"
    shutil.copytree(res["data"] / "test", images)
    code, out, err = cli("export", str(res["run"]), "--format", "torchscript", "--out", str(base / "e"))
    assert code == 0, err
    assert str(base / "e" / "preprocessing.json") in out and str(base / "e") in out
    index = base / "idx"
    code, out, err = cli("index", str(res["run"]), "--images", str(images), "--out", str(index))
    assert code == 0, err
    assert f"in {index}/" in out
    query = sorted(images.rglob("*.png"))[0]
    grid = base / "g.png"
    code, out, err = cli("search", str(index), str(query), "-k", "2", "--grid", str(grid))
    assert code == 0, err
    assert str(query.resolve()) in out and f"wrote {grid}" in out and grid.is_file()


@pytest.mark.parametrize("odd", ODD[:2])
def test_paths_with_markup_print_as_they_are_in_new_plugin_and_tune(odd, cli, tmp_path, wide, monkeypatch):
    from test_fuzz_tune import SPACE

    folder = tmp_path / odd
    code, out, err = cli("new-plugin", "mine", "--dir", str(folder))
    assert code == 0, err
    assert f"wrote {folder / 'dmlkit-mine'}" in out and "pip install -e '.[test]'" in out
    space = folder / "space.toml"
    space.write_text(SPACE)
    study = folder / "study"
    code, out, err = cli("tune", str(space), "--study", str(study))
    assert code == 0, err
    assert f"wrote {study / 'best.toml'}" in out
    assert "".join(f"{study}: best trials".split()) in "".join(out.split())  # the table wraps its title
