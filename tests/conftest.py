import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from dmlkit.plugins import reset_host

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def fresh_host():
    """Every test starts and ends with plugins loaded anew from entry points."""
    reset_host()
    yield
    reset_host()


def make_distribution(
    site: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.0"
) -> Path:
    """A minimal installed distribution (dist-info + modules) in ``site``, as pip would leave it."""
    site.mkdir(parents=True, exist_ok=True)
    for mod, code in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "[dmlkit]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    return site


def pip_install(package: Path, site: Path) -> Path:
    """A real, offline pip install of a local package into ``site``."""
    import subprocess

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
    )
    return site


@pytest.fixture
def add_site(monkeypatch):
    """Put a folder on sys.path so importlib.metadata finds the distributions in it."""

    def add(site: Path) -> None:
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()

    yield add
    for name in [m for m in sys.modules if m.startswith("thirdparty_")]:
        del sys.modules[name]


@pytest.fixture
def cli(capsys):
    """Run the dmlkit CLI in-process: returns (exit code, stdout, stderr)."""
    from dmlkit.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = 0
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
