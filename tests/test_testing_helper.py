import sys
import types

import pytest

import dmlkit
from dmlkit.errors import DmlkitError
from dmlkit.testing import check_plugin

sys.path.insert(0, str(__import__("conftest").ROOT / "tests" / "fixtures" / "dmlkit-hello"))
import dmlkit_hello  # noqa: E402


def test_check_plugin_accepts_a_good_plugin():
    report = check_plugin(dmlkit_hello, name="hello")
    assert report.components == {"loss": ["hello_center"]}
    assert set(report.hooks) == {"register_losses", "register_commands"}


def test_check_plugin_reports_clashes_and_broken_factories():
    clash = types.ModuleType("clash")

    @dmlkit.hookimpl
    def register_losses(register):
        register(dmlkit.ComponentSpec("triplet", lambda: None))

    clash.register_losses = register_losses
    with pytest.raises(DmlkitError, match="registered by both plugin 'losses' and plugin 'clash'"):
        check_plugin(clash)

    nan = types.ModuleType("nanloss")

    @dmlkit.hookimpl
    def register_losses2(register):
        import torch

        register(dmlkit.ComponentSpec("nan_loss", lambda: lambda e, y: torch.tensor(float("nan"))))

    nan.register_losses = register_losses2
    with pytest.raises(DmlkitError, match="must return a finite scalar"):
        check_plugin(nan)
