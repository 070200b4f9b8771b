import json

from conftest import ROOT, make_distribution, pip_install

from dmlkit.plugins import PluginHost

BUILTINS = {"losses", "miners", "samplers", "evaluators", "datasets", "backbones", "proxies", "ccp"}


def test_builtins_come_through_entry_points():
    host = PluginHost()
    host.load_entry_points("all")
    builtin = {n for n, i in host.plugins.items() if i.builtin}
    assert BUILTINS <= builtin
    assert all(not host.plugins[n].errors for n in BUILTINS)
    assert host.registry.get("loss", "proxynca").plugin == "losses"
    assert host.registry.get("loss", "proxynca").distribution == "dmlkit"


def test_installed_third_party_plugin_is_listed_and_usable(tmp_path, add_site, cli):
    """A real install (pip, no network) of the tiny package in tests/fixtures."""

    site = pip_install(ROOT / "tests" / "fixtures" / "dmlkit-hello", tmp_path / "site")
    add_site(site)
    code, out, _ = cli("plugins", "--json")
    assert code == 0
    hello = next(p for p in json.loads(out) if p["name"] == "hello")
    assert hello["distribution"] == "dmlkit-hello" and hello["version"] == "0.3.0"
    assert hello["components"] == 1 and not hello["errors"] and not hello["builtin"]
    assert set(hello["hooks"]) == {"register_losses", "register_commands"}
    code, out, _ = cli("list", "loss", "--json")
    names = {c["name"]: c for c in json.loads(out)["loss"]}
    assert names["hello_center"]["plugin"] == "hello"
    code, out, _ = cli("hello", "--name", "dml")  # the plugin's own CLI command
    assert code == 0 and out.strip() == "hello dml"


def test_plugins_lists_what_each_plugin_provides(tmp_path, add_site, cli, monkeypatch):
    import dmlkit.cli

    monkeypatch.setattr(dmlkit.cli.console, "width", 250)
    add_site(pip_install(ROOT / "tests" / "fixtures" / "dmlkit-hello", tmp_path / "site"))
    code, out, _ = cli("plugins", "--json")
    by_name = {p["name"]: p for p in json.loads(out)}
    assert by_name["hello"]["provides"] == {"loss": ["hello_center"]}
    assert by_name["hello"]["commands"] == ["hello"]
    # every registered component appears under exactly the plugin that registered it
    code, listed, _ = cli("list", "--json")
    for kind, rows in json.loads(listed).items():
        for row in rows:
            assert row["name"] in by_name[row["plugin"]]["provides"][kind]
    code, out, _ = cli("plugins")
    row = next(line for line in out.splitlines() if "hello" in line and "dmlkit-hello" in line)
    assert "loss: hello_center" in row and "commands: hello" in out
    assert (
        "miner: angular, batch_all, batch_easy_hard, batch_hard, distance_weighted, hdc, multi_similarity, "
        "pair_margin, semihard, triplet_margin, uniform_histogram" in out
    )


def test_broken_plugin_is_reported_and_builtins_still_work(tmp_path, add_site, cli, monkeypatch):
    import dmlkit.cli

    monkeypatch.setattr(dmlkit.cli.console, "width", 250)  # the table un-wrapped, whatever the terminal
    add_site(
        make_distribution(
            tmp_path,
            "acme-broken",
            {"thirdparty_broken": "raise ImportError('no acme here')"},
            {"broken": "thirdparty_broken"},
        )
    )
    code, out, _ = cli("plugins", "--json")
    assert code == 0
    broken = next(p for p in json.loads(out) if p["name"] == "broken")
    assert broken["distribution"] == "acme-broken"
    assert broken["errors"] and "import failed: ImportError: no acme here" in broken["errors"][0]
    code, out, _ = cli("list", "--json")
    data = json.loads(out)
    assert {"proxynca", "triplet", "multi_similarity", "proxy_anchor"} <= {c["name"] for c in data["loss"]}
    assert {"digits", "cub200"} <= {c["name"] for c in data["dataset"]}
    # the human table shows the error too
    code, out, _ = cli("plugins")
    assert "broken" in out and "ImportError" in out


def test_plugin_whose_hook_raises_keeps_its_error_local(tmp_path, add_site):
    code = """
    import dmlkit
    @dmlkit.hookimpl
    def register_losses(register):
        raise RuntimeError("bad registration")
    """
    add_site(make_distribution(tmp_path, "acme-raise", {"thirdparty_raise": code}, {"raiser": "thirdparty_raise"}))
    host = PluginHost()
    host.load_entry_points("all")
    assert "register_losses raised RuntimeError: bad registration" in host.plugins["raiser"].errors[0]
    assert "proxynca" in host.registry.names("loss")


def test_unknown_hook_name_is_reported(tmp_path, add_site):
    code = """
    import dmlkit
    @dmlkit.hookimpl
    def register_loses(register):
        pass
    """
    add_site(make_distribution(tmp_path, "acme-typo", {"thirdparty_typo": code}, {"typo": "thirdparty_typo"}))
    host = PluginHost()
    host.load_entry_points("all")
    assert "unknown hook" in host.plugins["typo"].errors[0] and "register_loses" in host.plugins["typo"].errors[0]


def test_clash_between_plugins_is_reported_naming_both(tmp_path, add_site, cli):
    code = """
    import dmlkit
    @dmlkit.hookimpl
    def register_losses(register):
        register(dmlkit.ComponentSpec("triplet", lambda: None, "my own triplet"))
    """
    add_site(make_distribution(tmp_path, "acme-clash", {"thirdparty_clash": code}, {"clash": "thirdparty_clash"}))
    code_, out, _ = cli("plugins", "--json")
    clash = next(p for p in json.loads(out) if p["name"] == "clash")
    assert "loss 'triplet' is registered by both plugin 'losses' and plugin 'clash'" in clash["errors"][0]
    code_, out, err = cli("show", "loss", "triplet")
    assert code_ == 1 and "registered by both plugin 'losses' and plugin 'clash'" in err


def test_replacing_a_builtin_explicitly_works(tmp_path, add_site):
    code = """
    import dmlkit
    @dmlkit.hookimpl
    def register_losses(register):
        register(dmlkit.ComponentSpec("triplet2", lambda: "mine", replaces="triplet"))
    """
    add_site(make_distribution(tmp_path, "acme-repl", {"thirdparty_repl": code}, {"repl": "thirdparty_repl"}))
    host = PluginHost()
    host.load_entry_points("all")
    assert not host.plugins["repl"].errors
    assert "triplet" not in host.registry.names("loss")
    assert host.registry.build("loss", "triplet2") == "mine"


def test_env_switch_restricts_loading(tmp_path, add_site, monkeypatch):
    add_site(
        make_distribution(
            tmp_path, "acme-broken", {"thirdparty_broken": "raise ImportError('x')"}, {"broken": "thirdparty_broken"}
        )
    )
    monkeypatch.setenv("DMLKIT_PLUGINS", "builtin")
    host = PluginHost()
    host.load_entry_points()
    assert "broken" not in host.plugins and BUILTINS <= set(host.plugins)
    host = PluginHost()
    host.load_entry_points("losses,miners")
    assert set(host.plugins) == {"losses", "miners"}
    assert host.registry.names("dataset") == []


def test_new_plugin_writes_a_package_that_installs_and_passes_its_own_tests(tmp_path, add_site, cli):
    import os
    import subprocess
    import sys

    code, out, err = cli("new-plugin", "focal_margin", "--dir", str(tmp_path))
    assert code == 0, err
    package = tmp_path / "dmlkit-focal-margin"
    assert {p.name for p in package.rglob("*") if p.is_file()} == {
        "pyproject.toml", "dmlkit_focal_margin.py", "test_plugin.py", "README.md",
    }  # fmt: skip
    site = pip_install(package, tmp_path / "site")
    # the generated tests, as the author runs them, against the installed package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout + proc.stderr
    add_site(site)
    from dmlkit.plugins import reset_host

    reset_host()  # plugins load again, as in a new process
    code, out, _ = cli("list", "loss", "--json")
    loss = next(c for c in json.loads(out)["loss"] if c["name"] == "focal_margin")
    assert loss["plugin"] == "focal_margin" and loss["defaults"] == {"margin": 0.5}
    code, _, err = cli("train", "--loss", "focal_margin", "--epochs", "1", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    # a bad name or an existing folder: one line each, nothing written
    for args, message in ((["new-plugin", "Bad-Name", "--dir", str(tmp_path)], "lower-case Python identifier"),
                          (["new-plugin", "focal_margin", "--dir", str(tmp_path)], "already exists")):  # fmt: skip
        code, _, err = cli(*args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1
