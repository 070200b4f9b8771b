"""The docs are the interface: their hooks, commands, code and site are checked here."""

import inspect
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT, pip_install

from dmlkit import hookspecs
from dmlkit.config import default_config, merge, validate
from dmlkit.registry import KINDS

DOCS = ROOT / "docs"
NOT_RUN = "# not run by the tests"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(path, lang):
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def run_dmlkit_lines(path, cli):
    """Run every `dmlkit ...` line of the file's bash blocks, in order (continuation lines joined)."""
    return sum(run_bash_block(body, path.name, cli) for body in blocks(path, "bash") if not body.startswith(NOT_RUN))


def run_bash_block(body, name, cli):
    """Run a bash block's `dmlkit ...` lines (continuation lines joined); how many ran."""
    ran = 0
    for line in body.replace("\\\n", " ").splitlines():
        if line.startswith("dmlkit "):
            code, out, err = cli(*shlex.split(line, comments=True)[1:])
            assert code == 0, f"{name}: `{line}` failed: {err}"
            ran += 1
    return ran


def hookspec_signatures():
    return {
        name: f"{name}({', '.join(inspect.signature(fn).parameters)})"
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "dmlkit_spec")
    }


def test_every_hook_is_documented_with_its_exact_signature():
    documented = re.findall(r"^## `(\w+\([^)]*\))`", (DOCS / "hooks.md").read_text(), re.M)
    specs = hookspec_signatures()
    assert len(specs) == 9
    assert sorted(documented) == sorted(specs.values())


def test_every_component_kind_has_a_generated_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for kind in KINDS:
        page = DOCS / "components" / f"{kind}.md"
        assert f"<!-- dmlkit:components {kind} -->" in page.read_text()
        assert f"components/{kind}.md" in nav


def test_generated_component_pages_list_every_builtin_with_defaults():
    sys.path.insert(0, str(DOCS))
    import gen

    text = gen.expand("<!-- dmlkit:components loss -->")
    for name in (
        "proxynca",
        "triplet",
        "contrastive",
        "contrastive_cosine",
        "multi_similarity",
        "ranked_list",
        "proxy_anchor",
    ):
        assert f"## `{name}`" in text
    assert "| `margin` | `0.2` |" in text and "| `num_classes` | supplied at run time |" in text
    assert "--loss-opt" in gen.expand("<!-- dmlkit:cli train -->")


@pytest.mark.parametrize("page", ["hooks.md", "tutorial.md", "index.md", "api.md"])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(DOCS / "examples" / "dmlkit-circle"))
    namespace = {"__name__": f"doc_{page}"}
    ran = 0
    for body in blocks(DOCS / page, "python"):
        if body.startswith(NOT_RUN) or body.lstrip().startswith("--8<--"):
            continue
        exec(compile(body, f"{page} block", "exec"), namespace)
        ran += 1
    assert ran >= {"api.md": 7, "hooks.md": 1, "tutorial.md": 1}.get(page, 0)
    if page == "api.md":  # the page's run exists and its files are those of a CLI run
        assert {"best.pt", "last.pt", "results.json", "metrics.jsonl"} <= {
            p.name for p in (tmp_path / "runs" / "api-example").iterdir()
        }


@pytest.mark.parametrize("page", ["deploy.md", "tune.md", "decisions.md"])
def test_pages_run_in_order(page, cli, tmp_path, monkeypatch):
    """Python blocks, `dmlkit` lines and `# file: NAME` TOML blocks, in the page's order, in one folder."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"doc_{page}"}
    ran = []
    for kind, body in FENCE.findall((DOCS / page).read_text()):
        if body.startswith(NOT_RUN):
            continue
        if kind == "python":
            exec(compile(body, f"{page} block", "exec"), namespace)
        elif kind == "toml" and body.startswith("# file: "):
            (tmp_path / body.split("\n", 1)[0].removeprefix("# file: ").strip()).write_text(body)
        elif kind == "bash":
            run_bash_block(body, page, cli)
        ran.append(kind)
    assert ran.count("bash") >= 2
    if page == "deploy.md":
        assert {"model.ts", "model.onnx", "model.pt2", "preprocessing.json"} <= {
            p.name for p in (tmp_path / "runs" / "shapes" / "export").iterdir()
        }
        assert (tmp_path / "runs" / "search.png").is_file()
    elif page == "decisions.md":
        assert ran.count("python") >= 2
    else:
        assert (tmp_path / "runs" / "tuned" / "results.json").is_file()


def test_toml_blocks_are_valid_run_configs():
    for page in ("index.md",):
        for body in blocks(DOCS / page, "toml"):
            from dmlkit import get_registry

            validate(merge(default_config(), tomllib.loads(body)), get_registry())


def test_index_and_readme_commands_run(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_dmlkit_lines(DOCS / "index.md", cli) >= 8
    # the README tour, in a fresh folder
    (tmp_path / "readme").mkdir()
    monkeypatch.chdir(tmp_path / "readme")
    assert run_dmlkit_lines(ROOT / "README.md", cli) >= 5


def test_tutorial_plugin_installs_and_trains(cli, tmp_path, add_site, monkeypatch):
    site = pip_install(DOCS / "examples" / "dmlkit-circle", tmp_path / "site")
    add_site(site)
    monkeypatch.chdir(tmp_path)
    assert run_dmlkit_lines(DOCS / "tutorial.md", cli) == 4
    code, out, _ = cli("plugins", "--json")
    import json

    circle = next(p for p in json.loads(out) if p["name"] == "circle")
    assert circle["distribution"] == "dmlkit-circle" and circle["components"] == 1 and not circle["errors"]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "circle" / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "runs" / "circle" / "results.json").read_text())
    assert len(rows) == 2 and results["test_last"]["precision_at_1"] > 0.8


def test_circle_loss_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    import torch

    sys.path.insert(0, str(DOCS / "examples" / "dmlkit-circle"))
    from dmlkit_circle import CircleLoss

    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(32, 8, generator=g), torch.arange(32) % 5
    ours = CircleLoss(m=0.4, gamma=80)(emb, labels)
    theirs = pml.CircleLoss(m=0.4, gamma=80)(emb, labels)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4)


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs not installed (pip install -e '.[test]')")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    html = (tmp_path / "site" / "components" / "loss" / "index.html").read_text()
    assert "proxynca" in html and "semihard" in (tmp_path / "site" / "components" / "miner" / "index.html").read_text()
    assert "CircleLoss" in (tmp_path / "site" / "tutorial" / "index.html").read_text()
