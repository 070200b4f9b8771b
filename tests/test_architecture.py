"""The core's dependencies point one way: leaves, then contracts and data, then services, then
orchestration, then the interfaces. Every import counts, those inside functions too."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "dmlkit"

#: Each module of dmlkit/ and its layer; a module may import its own layer and those below.
LAYERS = {
    "leaves": ["errors", "fileio", "console", "runtime", "hookspecs", "distributed", "interrupts"],
    "contracts and data": [
        "registry", "settings", "contract", "compat", "config", "data", "model", "losses", "evaluation", "decisions",
        "plugins",
        "__init__",
    ],
    "services": [
        "checkpoint", "embedding", "selection", "splits", "plots", "features", "proxies", "rundir", "finite",
        "components",
    ],
    "orchestration": ["train", "folds", "testing"],
    "interfaces": ["cli", "report", "report_data", "report_html", "scaffold", "mlrc", "__main__"],
}  # fmt: skip
RANK = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}
#: The only modules that may import the trainer.
TRAINER_USERS = {"cli", "folds", "testing"}


def imports(path: Path) -> set[str]:
    """The dmlkit modules that ``path`` imports anywhere in it (``from dmlkit import x`` counts as the
    package, ``__init__``, unless x is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "dmlkit":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out |= {a.name if (CORE / f"{a.name}.py").exists() else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dmlkit.")}
    return {m for m in out if m != path.stem}


GRAPH = {p.stem: imports(p) for p in sorted(CORE.glob("*.py"))}


def test_every_core_module_has_a_layer():
    assert set(GRAPH) == set(RANK), "place new modules of dmlkit/ in a layer of tests/test_architecture.py"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module):
    upward = [dep for dep in GRAPH[module] if RANK.get(dep, 99) > RANK[module]]
    assert not upward, f"dmlkit.{module} imports {upward}, from a higher layer"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in GRAPH.get(module, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_only_the_cli_folds_and_testing_kit_import_the_trainer():
    users = {m for m, deps in GRAPH.items() if "train" in deps}
    assert users <= TRAINER_USERS, users - TRAINER_USERS


def test_the_trainer_module_stays_small():
    lines = len((CORE / "train.py").read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"dmlkit/train.py has {lines} lines; move a service out of it"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The test above would miss a cycle hidden by an import inside a function if the parser skipped them."""
    (tmp_path / "x.py").write_text("def f():\n    from dmlkit.train import Trainer\n    import dmlkit.cli\n")
    assert imports(tmp_path / "x.py") == {"train", "cli"}
