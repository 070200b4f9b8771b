"""The declared contract between the core and components (dmlkit.contract), its documentation, and
the six ways components misbehaved silently under 0.1's implicit contract (issue 24)."""

import json
import re
import types

import numpy as np
import pytest
import torch
from conftest import ROOT

import dmlkit
from dmlkit.config import merge, parse_assignments, resolve
from dmlkit.contract import ATTRIBUTES, EVALUATOR_ARGUMENTS, EVENTS, MEMBERS, RunContext
from dmlkit.errors import DmlkitDeprecationWarning, DmlkitError, OptionError
from dmlkit.losses import MetricLoss
from dmlkit.plugins import get_host
from dmlkit.testing import check_plugin, stub_run

HOOKS = (ROOT / "docs" / "hooks.md").read_text()


def table_rows(heading: str) -> list[str]:
    """The first-column names of the markdown table under ``heading`` in hooks.md."""
    section = HOOKS.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        m = re.match(r"^\| `(\w+)`", line)
        if m:
            rows.append(m.group(1))
    return rows


def plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, dmlkit.hookimpl(fn))
    get_host().add_plugin(module, name)
    return module


# -- the documented contract is the declared one -------------------------------------------------
def test_hooks_page_lists_every_event_in_order():
    assert table_rows("### Events") == list(EVENTS)


def test_hooks_page_lists_every_run_context_member():
    assert table_rows("### The run context") == list(MEMBERS)


def test_hooks_page_lists_every_optional_attribute():
    assert table_rows("### Optional class attributes") == list(ATTRIBUTES)


def test_hooks_page_lists_every_evaluator_argument():
    assert table_rows("### Evaluator arguments") == list(EVALUATOR_ARGUMENTS)


def test_the_trainer_implements_every_member(tmp_path):
    from dmlkit.train import Trainer

    cfg, _ = resolve({"train": {"epochs": 1}}, get_host().registry)
    trainer = Trainer(cfg, get_host().registry, tmp_path / "r")
    missing = [m for m in MEMBERS if not hasattr(trainer, m)]
    assert not missing


def test_run_context_exposes_members_and_warns_on_internals():
    run = stub_run()
    assert run.epoch == 1 and run.settings.lr == 1e-3 and run.val_split is not None
    run.stop_requested = True
    assert run.stop_requested is True
    with pytest.raises(AttributeError, match="cannot be set"):
        run.epoch = 3
    with pytest.raises(AttributeError):
        _ = run.cfg  # the stub has nothing beyond the contract

    class Legacy:
        cfg = {"x": 1}
        epoch = 2

    with pytest.warns(DmlkitDeprecationWarning, match="'cfg' is not part of dmlkit's run context"):
        assert RunContext(Legacy()).cfg == {"x": 1}


def hooks_block(marker: str) -> str:
    return next(b for b in re.findall(r"^```python\n(.*?)^```", HOOKS, re.S | re.M) if marker in b)


def test_weight_average_callback_from_the_docs_validates_with_the_average(cli, tmp_path):
    """The page's EMA callback, written against the contract alone: each validation sees exactly the
    exponential average of the weights after each step (recomputed here from the live weights), and
    training goes on with the live weights."""
    namespace: dict = {}
    exec(hooks_block("class WeightAverage"), namespace)
    seen = {"live": [], "checks": 0}

    class Spy:  # runs after weight_average (callbacks are called in config order)
        def on_after_optimizer_step(self, run):
            seen["live"].append([p.detach().clone() for p in run.model.parameters()])

        def on_before_validation(self, run):
            if not seen["live"]:
                return
            expected = [w.clone() for w in seen["live"][0]]
            for weights in seen["live"][1:]:
                for e, w in zip(expected, weights):
                    e.mul_(0.5).add_(w, alpha=0.5)
            for p, e in zip(run.model.parameters(), expected):
                torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
            seen["checks"] += 1

        def on_validation_end(self, run, metrics):
            if seen["live"]:
                for p, w in zip(run.model.parameters(), seen["live"][-1]):
                    assert torch.equal(p.detach(), w)

    def register_callbacks(register):
        namespace["register_callbacks"](register)  # the page's weight_average and early_stopping
        register(dmlkit.ComponentSpec("spy", Spy))

    plugin("docs_callbacks", register_callbacks=register_callbacks)
    code, out, err = cli(
        "train", "--epochs", "2", "--callback", "weight_average:decay=0.5", "--callback", "spy",
        "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    assert seen["checks"] == 2 and len(seen["live"]) > 2


def test_early_stopping_callback_from_the_docs_stops_where_its_rule_says(cli, tmp_path):
    namespace: dict = {}
    exec(hooks_block("class EarlyStopping"), namespace)
    stopper = namespace["EarlyStopping"](patience=2)
    run = stub_run()
    for value in (0.5, 0.6, 0.55):
        stopper.on_validation_end(run, {"val_map_at_r": value})
        assert not run.stop_requested
    stopper.on_validation_end(run, {"val_map_at_r": 0.59})  # two validations since the best
    assert run.stop_requested
    # in a real run: it ends at the first epoch where the rule fires on the logged values
    plugin("docs_stop", register_callbacks=namespace["register_callbacks"])
    code, _, err = cli(
        "train", "--epochs", "6", "--lr", "0.05", "--callback", "early_stopping:patience=1",
        "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    values = [json.loads(x)["val_map_at_r"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    since_best = [i - values.index(max(values[: i + 1])) for i in range(len(values))]
    fired = next((i + 1 for i, n in enumerate(since_best) if n >= 1), 6)
    assert len(values) == fired


# -- case 1: CCP with a base loss that ignores the reference set -----------------------------------
class PlainParameterProxies(MetricLoss):
    """0.1-docs style: proxies in a plain nn.Parameter, the reference set ignored."""

    def __init__(self, num_classes: int, embedding_size: int):
        super().__init__()
        self.proxies = torch.nn.Parameter(torch.randn(num_classes, embedding_size))

    def compute(self, emb, labels, ref, ref_labels, indices):
        logits = emb @ self.proxies.T
        return torch.nn.functional.cross_entropy(logits, labels)


def test_ccp_refuses_a_base_that_ignores_its_reference_set_before_data_loads():
    plugin(
        "plainproxies", register_losses=lambda register: register(dmlkit.ComponentSpec("plain", PlainParameterProxies))
    )
    with pytest.raises(OptionError, match="does not depend on the reference set.*ProxyBank"):
        resolve({"loss": {"name": "ccp", "base": "plain"}}, get_host().registry)
    # the built-in pair and proxy losses are accepted
    for base in ("contrastive", "multi_similarity", "proxynca", "proxy_anchor"):
        resolve({"loss": {"name": "ccp", "base": base}}, get_host().registry)


# -- case 2: an evaluator that declares no metrics ---------------------------------------------------
def undeclared_evaluator(returns: str):
    class Undeclared:
        def __call__(self, embeddings, labels, query_mask=None, gallery_mask=None):
            from dmlkit.evaluation import retrieval_metrics

            m = retrieval_metrics(embeddings, labels, query_mask=query_mask, gallery_mask=gallery_mask)
            return {returns: m["map_at_r"]}

    return Undeclared


def test_an_evaluator_without_metrics_is_warned_about_and_cannot_fake_a_selection(cli, tmp_path):
    plugin("undeclared", register_evaluators=lambda register: register(
        dmlkit.ComponentSpec("quiet", undeclared_evaluator("score"))))  # fmt: skip
    code, out, err = cli("train", "--epochs", "2", "--evaluator", "quiet", "--run-dir", str(tmp_path / "r"))
    assert "declares no `metrics`" in out
    assert code == 1 and "did not report 'map_at_r'" in err and "score" in err
    assert not (tmp_path / "r").exists()  # stopped before its first checkpoint: nothing left
    # a 0.1 evaluator that reports the metric still selects, and says so truthfully
    code, out, err = cli(
        "train", "--epochs", "2", "--evaluator", "quiet", "--set", "best_metric=score", "--run-dir", str(tmp_path / "s")
    )
    assert code == 0, err
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["selected_by"] == "best by validation score" and results["best_value"] is not None


# -- case 3: nested options merged at every depth -----------------------------------------------------
def test_two_options_of_one_nested_table_both_survive():
    from dmlkit_plugins.tune import with_params

    cfg = with_params(
        {"loss": {"name": "ccp"}}, {"loss.base_options.pos_margin": 0.1, "loss.base_options.neg_margin": 0.7}
    )
    assert cfg["loss"]["base_options"] == {"pos_margin": 0.1, "neg_margin": 0.7}
    both = merge(
        parse_assignments(["base_options.pos_margin=0.1"], "x"), parse_assignments(["base_options.neg_margin=0.7"], "x")
    )
    assert both == {"base_options": {"pos_margin": 0.1, "neg_margin": 0.7}}
    resolved, _ = resolve({"loss": {"name": "ccp", **both}}, get_host().registry)
    assert resolved["loss"]["base_options"] == {"pos_margin": 0.1, "neg_margin": 0.7}
    # a table naming another component still replaces the old one's options
    assert merge({"loss": {"name": "triplet", "margin": 0.3}}, {"loss": {"name": "contrastive"}}) == {
        "loss": {"name": "contrastive"}
    }


# -- case 4: what is documented as logged is logged ---------------------------------------------------
def test_miner_stats_and_initializer_stats_are_logged(cli, tmp_path):
    code, _, err = cli(
        "train", "--epochs", "1", "--loss", "proxynca", "--loss-opt", "proxy_init=greedy_kcenter", "--miner",
        "batch_all", "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["miner"]["mined"] > 0
    (init,) = [e for e in record["events"] if e["event"] == "proxy_init"]
    assert init["step"] == 0 and init["pool_size"] > 0 and "mean_min_distance" in init  # greedy_kcenter's stats()


def test_callbacks_reads_metrics_from_is_checked_before_data_loads(cli, tmp_path):
    class Watch:
        reads_metrics_from = ("metric",)

        def __init__(self, metric: str = "map_at_r"):
            self.metric = metric

    plugin("watch", register_callbacks=lambda register: register(dmlkit.ComponentSpec("watch", Watch)))
    code, _, err = cli("train", "--callback", "watch:metric=bogus", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "callback 'watch' option metric = 'bogus' is not a metric of evaluator 'retrieval'" in err


# -- case 5: option types, show, messages -------------------------------------------------------------
def test_a_list_option_given_as_text_is_a_one_line_error(cli, tmp_path):
    code, _, err = cli("train", "--evaluator-opt", "ks=1,3", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "write ks=[1,3]" in err and "internal error" not in err
    code, _, err = cli("train", "--evaluator-opt", "ks=[1,'x']", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "'ks[1]' must be int" in err


def test_show_names_flags_that_exist(cli):
    _, out, _ = cli("show", "callback", "tensorboard")
    assert "--callback tensorboard:" in out and "--callback-opt" not in out
    _, out, _ = cli("show", "proxy_initializer", "greedy_kcenter")
    assert "--loss-opt proxy_init.name=greedy_kcenter" in out and "--proxy-initializer-opt" not in out
    code, out, _ = cli("show", "train", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["lr"]["bounds"] == "> 0, <= 10" and rows["lr"]["help"]
    assert set(rows) == set(dmlkit.config.TRAIN_DEFAULTS)


def test_help_from_a_sentence_naming_several_options_goes_to_none_of_them():
    from dmlkit.registry import option_help

    doc = "A loss.\n\nThe ``alpha`` and ``beta`` scales are learned. ``gamma`` is the margin."
    assert option_help(doc, ["alpha", "beta", "gamma"]) == {
        "alpha": "",
        "beta": "",
        "gamma": "``gamma`` is the margin.",
    }


def test_a_dmlkit_error_in_an_event_names_component_plugin_and_event(cli, tmp_path):
    class Refuses:
        def on_epoch_start(self, run):
            raise DmlkitError("not today")

    plugin("refuser", register_callbacks=lambda register: register(dmlkit.ComponentSpec("refuses", Refuses)))
    code, _, err = cli("train", "--callback", "refuses", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "callback 'refuses' (plugin 'refuser') failed in on_epoch_start: not today" in err


# -- case 6: check_plugin, hook specs, version ---------------------------------------------------------
def test_check_plugin_builds_datasets_given_options_and_checks_their_splits():
    from dmlkit.data import DatasetSplits, make_split

    def blobs(classes: int = 4, overlap: bool = False):
        x = list(torch.randn(40, 1, 4, 4))
        labels = np.arange(40) % classes
        train = make_split(x[:20], labels[:20], mode="array")
        test = make_split(x[20:], labels[20:] + (0 if overlap else classes), mode="array")
        return DatasetSplits(train, test)

    module = types.ModuleType("blobs_plugin")
    module.register_datasets = dmlkit.hookimpl(lambda register: register(dmlkit.ComponentSpec("blobs", blobs)))
    report = check_plugin(module, with_builtins=False)
    assert report.skipped and "blobs" in report.skipped[0]
    report = check_plugin(module, with_builtins=False, options={"blobs": {"classes": 4}})
    assert "dataset:blobs" in report.built
    with pytest.raises(DmlkitError, match="overlap"):
        check_plugin(module, with_builtins=False, options={"blobs": {"overlap": True}})


def test_check_plugin_accepts_a_wrapper_that_nests_its_own_component():
    """The nested component exists only in the plugin under test (not installed anywhere): it must
    be built from check_plugin's registry, not the process-wide one."""
    from dmlkit.losses import MetricLoss

    class Inner(MetricLoss):
        def compute(self, emb, labels, ref, ref_labels, indices):
            return emb.square().mean()

    class Wrapper(MetricLoss):
        def __init__(self, inner: str = "only_here_inner"):
            super().__init__()
            self.inner = dmlkit.get_registry().build("loss", inner)

        def compute(self, emb, labels, ref, ref_labels, indices):
            return 2 * self.inner(emb, labels)

    def register_losses(register):
        register(dmlkit.ComponentSpec("only_here_inner", Inner))
        register(dmlkit.ComponentSpec("only_here_wrapper", Wrapper))

    module = types.ModuleType("nesting")
    module.register_losses = dmlkit.hookimpl(register_losses)
    report = check_plugin(module)
    assert report.components == {"loss": ["only_here_inner", "only_here_wrapper"]}
    assert ("loss", "only_here_inner") not in get_host().registry  # never installed


def test_check_plugin_lists_deprecations_a_callback_causes():
    class Legacy:
        def on_train_start(self, trainer):
            trainer.log_event(event="x")

        def on_epoch_end(self, trainer, record):
            record["seed"] = trainer.settings["seed"]

    module = types.ModuleType("legacy_cb")
    module.register_callbacks = dmlkit.hookimpl(lambda register: register(dmlkit.ComponentSpec("legacy", Legacy)))
    assert check_plugin(module, with_builtins=False).deprecations == []

    class ReadsInternals:
        def on_epoch_start(self, trainer):
            _ = trainer.net  # not in the contract

    module = types.ModuleType("internals_cb")
    module.register_callbacks = dmlkit.hookimpl(
        lambda register: register(dmlkit.ComponentSpec("internals", ReadsInternals))
    )
    with pytest.raises(DmlkitError, match="on_epoch_start read something the run context does not have"):
        check_plugin(module, with_builtins=False)


def test_a_callback_reading_trainer_internals_still_works_with_a_visible_warning(cli, tmp_path):
    class Old:
        def on_train_start(self, trainer):
            assert trainer.cfg["train"]["epochs"] == 1

    plugin("oldcb", register_callbacks=lambda register: register(dmlkit.ComponentSpec("old", Old)))
    code, _, err = cli("train", "--epochs", "1", "--callback", "old", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "warning: run context: 'cfg' is not part of dmlkit's run context" in err


def test_moved_names_import_with_a_deprecation_warning():
    with pytest.warns(DmlkitDeprecationWarning, match=r"dmlkit.train.load_checkpoint moved to dmlkit.checkpoint.load"):
        from dmlkit.train import load_checkpoint  # noqa: F401
    with pytest.warns(DmlkitDeprecationWarning, match="dmlkit.splits"):
        from dmlkit.train import class_disjoint_split  # noqa: F401


def test_hookspecs_point_at_modules_that_exist():
    import importlib

    from dmlkit import hookspecs

    for module in re.findall(r":mod:`([\w.]+)`", hookspecs.__doc__):
        importlib.import_module(module)


def test_version_is_0_2_and_the_changelog_says_so():
    assert dmlkit.__version__ == "0.2.0"
    from importlib.metadata import version

    assert version("dmlkit") == "0.2.0"
    assert "## 0.2.0" in (ROOT / "CHANGELOG.md").read_text()


def test_a_newer_checkpoint_format_is_refused(tmp_path):
    from dmlkit import checkpoint

    torch.save({"format": "dmlkit", "version": checkpoint.VERSION + 1, "config": {}}, tmp_path / "x.pt")
    with pytest.raises(DmlkitError, match="newer than this dmlkit reads.*upgrade dmlkit"):
        checkpoint.load(tmp_path / "x.pt")
