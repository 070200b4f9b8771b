import sys
import types

import pytest
import torch

import dmlkit
from dmlkit.errors import DmlkitError
from dmlkit.losses import Miner
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
        class Nan(torch.nn.Module):
            def forward(self, e, y):
                return torch.tensor(float("nan"))

        register(dmlkit.ComponentSpec("nan_loss", Nan))

    nan.register_losses = register_losses2
    with pytest.raises(DmlkitError, match="must return a finite scalar"):
        check_plugin(nan)


def plugin_module(hook: str, *specs) -> types.ModuleType:
    """A plugin module registering ``specs`` through ``hook``."""
    mod = types.ModuleType("thirdparty_check")

    def register_all(register):
        for spec in specs:
            register(spec)

    register_all.__name__ = hook
    setattr(mod, hook, dmlkit.hookimpl(register_all))
    return mod


@pytest.mark.parametrize(
    "plugin", ["losses", "miners", "samplers", "evaluators", "proxies", "backbones", "ccp", "reading_list", "trackers", "timm_backbone"]
)  # fmt: skip
def test_every_builtin_plugin_passes_check_plugin(plugin):
    import importlib

    module = importlib.import_module(f"dmlkit_plugins.{plugin}")
    no_download = {"pretrained": False}
    # nested components come from check_plugin's own registry: the plugins a default nests are loaded beside
    needs = {"ccp": "losses,proxies", "losses": False}
    report = check_plugin(
        module, name=f"copy_of_{plugin}", with_builtins=needs.get(plugin, False),
        options={"timm": {**no_download, "model": "resnet10t"}, "efficientnet_lite0": no_download,
                 "resnet18": no_download, "resnet50": no_download,
                 "combined": {"terms": ["triplet", "contrastive"]}},
    )  # fmt: skip
    assert report.components and all(
        report.built[f"{k}:{n}"] is not None for k, ns in report.components.items() for n in ns
    )


def test_every_example_in_the_hook_reference_passes_check_plugin():
    """The docs' own examples (a miner, an initializer, a sampler, an evaluator, a backbone, a
    callback, ...) are plugins check_plugin accepts, each checked for its kind."""
    import re

    text = (__import__("conftest").ROOT / "docs" / "hooks.md").read_text()
    checked = set()
    for body in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M):
        hooks = set(re.findall(r"def (register_\w+)\(", body)) - {"register_datasets", "register_commands"}
        if not hooks or "# not run by the tests" in body:
            continue
        mod = types.ModuleType("thirdparty_doc_example")
        exec(compile(body, "hooks.md", "exec"), mod.__dict__)
        report = check_plugin(mod, name="doc_example")
        checked |= set(report.components)
    assert {"loss", "miner", "proxy_initializer", "sampler", "evaluator", "backbone", "callback"} <= checked


class GoodSampler:
    def __init__(self, labels, batch_size: int = 16, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.b, self.rank, self.ws = len(labels), batch_size, rank, world_size

    def __len__(self):
        return self.n // self.b // self.ws

    def __iter__(self):
        for i in range(len(self)):
            yield list(range(i * self.b, (i + 1) * self.b))


class UnevenSampler(GoodSampler):
    def __len__(self):  # rank 0 gets one batch more than the others: a distributed run would hang
        return self.n // self.b // self.ws + (self.rank == 0 and self.ws > 1)


class LyingSampler(GoodSampler):
    def __len__(self):
        return 3

    def __iter__(self):
        for i in range(self.n // self.b):
            yield list(range(i * self.b, (i + 1) * self.b))


class WrongDefault(torch.nn.Module):
    def __init__(self, samples: int = "three"):
        super().__init__()

    def forward(self, e, y):
        return e.sum() * 0


class NoSuperMiner(Miner):
    def __init__(self, margin: float = 0.1):
        self.margin = margin  # before super().__init__(): nn.Module refuses the attribute


class OutOfBatchMiner(Miner):
    def mine(self, emb, labels, ref, ref_labels):
        idx = torch.arange(len(labels))
        return idx, idx + 1, idx


class ForgetfulEvaluator:
    metrics = {"map_at_r": "max", "precision_at_1": "max"}

    def __call__(self, embeddings, labels, query_mask=None, gallery_mask=None):
        return {"map_at_r": 0.5}


class WrongShapeInit:
    def __call__(self, pool, previous, k):
        return pool  # all b pool samples instead of k picks


class TypoCallback:
    def on_epoch_ends(self, trainer, record):
        pass


class LyingBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.out_features = 16
        self.input_spec = {"channels": 1, "image_size": 12, "mean": (0.5,), "std": (0.5,)}

    def forward(self, x):
        return self.conv(x)


class BadSimilarityLoss(dmlkit.losses.MetricLoss):
    similarity = 0.5  # not a method

    def compute(self, emb, labels, ref, ref_labels, indices):
        return emb.sum() * 0


class BadRequirementEvaluator:
    metrics = {"precision_at_1": "max"}
    requires = {"alphabet": "scoring"}  # not an evaluator argument

    def __call__(self, embeddings, labels, query_mask=None, gallery_mask=None):
        return {"precision_at_1": 1.0}


@pytest.mark.parametrize(
    "hook, factory, message",
    [
        ("register_samplers", GoodSampler, None),
        ("register_losses", BadSimilarityLoss, "similarity must be a method"),
        ("register_evaluators", BadRequirementEvaluator, "arguments among groups, similarity"),
        ("register_samplers", UnevenSampler, "ranks 0 and 1 of 2 get 9 and 8 batches"),
        ("register_samplers", LyingSampler, "len() says 3 batches but iterating gave"),
        (
            "register_losses",
            WrongDefault,
            "the default of option 'samples' is 'three' (str) but its annotation says int",
        ),
        ("register_miners", NoSuperMiner, "call super().__init__() first in __init__"),
        ("register_miners", OutOfBatchMiner, "index outside the batch of 16"),
        ("register_evaluators", ForgetfulEvaluator, "declares metric 'precision_at_1' but did not return it"),
        ("register_proxy_initializers", WrongShapeInit, "got (4, 6, 16)"),
        ("register_callbacks", TypoCallback, "'on_epoch_ends' is not a training event"),
        ("register_backbones", LyingBackbone, "out_features is 16 but the output has 8 channels"),
    ],
)
def test_check_plugin_checks_each_kind_by_calling_it(hook, factory, message):
    mod = plugin_module(hook, dmlkit.ComponentSpec("thing", factory))
    if message is None:
        assert check_plugin(mod, name="acme").components
        return
    with pytest.raises(DmlkitError) as err:
        check_plugin(mod, name="acme")
    assert message in str(err.value) and "'thing'" in str(err.value) and "acme" in str(err.value)


def test_a_wrong_default_fails_before_data_loads_in_a_run(tmp_path, cli, monkeypatch):
    from dmlkit.plugins import get_host

    get_host().add_plugin(plugin_module("register_losses", dmlkit.ComponentSpec("wrong_default", WrongDefault)), "acme")
    code, _, err = cli("train", "--loss", "wrong_default", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "option 'samples' is 'three'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    code, _, err = cli("train", "--loss", "wrong_default", "--loss-opt", "samples=3", "--epochs", "1",
                       "--run-dir", str(tmp_path / "r2"))  # fmt: skip
    assert code == 0, err  # an explicit value replaces the bad default


def test_a_miner_without_module_init_is_named_at_set_up(tmp_path, cli):
    from dmlkit.plugins import get_host

    get_host().add_plugin(plugin_module("register_miners", dmlkit.ComponentSpec("nosuper", NoSuperMiner)), "acme")
    code, _, err = cli("train", "--miner", "nosuper", "--loss", "triplet", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "miner 'nosuper' (plugin 'acme')" in err and "call super().__init__() first" in err
