"""Tracker callbacks: what TensorBoard and MLflow hold is what the run directory holds."""

import json
import sys

import pytest
from conftest import ROOT
from test_docs import run_dmlkit_lines

from dmlkit.config import parse_callback
from dmlkit_plugins.trackers import epoch_scalars, flatten, param_text, step_scalars


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """What the mlflow callback sets for the process is unset again after each test."""
    for name in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(cli, run, *extra):
    code, out, err = cli(
        "train", "--epochs", "2", "--set", "eval_at_start=true", "--set", "val_every_steps=5",
        "--run-dir", str(run), *extra,
    )  # fmt: skip
    assert code == 0, err
    return rows(run), json.loads((run / "results.json").read_text())


def test_callback_option_parsing():
    assert parse_callback("tensorboard") == {"name": "tensorboard"}
    assert parse_callback("mlflow:tracking_uri=sqlite:///runs/m.db,experiment=digits") == {
        "name": "mlflow",
        "tracking_uri": "sqlite:///runs/m.db",
        "experiment": "digits",
    }
    assert parse_callback("x:ks=[1, 2],n=3,flag=true") == {"name": "x", "ks": [1, 2], "n": 3, "flag": True}
    assert flatten({"train": {"lr": 0.1}, "loss": {"name": "a", "proxy_init": {"name": "b"}}, "callbacks": []}) == {
        "train.lr": 0.1,
        "loss.name": "a",
        "loss.proxy_init.name": "b",
        "callbacks": [],
    }


def test_tensorboard_holds_the_metrics_the_settings_and_the_test_embeddings(cli, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'dmlkit[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    history, results = train(cli, run, "--callback", "tensorboard:embedding_points=50")
    assert [r["epoch"] for r in history] == [0, 1, 2] and any("val_steps" in r for r in history)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected: dict[str, dict[int, float]] = {}
    for record in history:
        for key, value in epoch_scalars(record).items():
            expected.setdefault(key, {})[record["epoch"]] = value
        for step, values in step_scalars(record):
            for key, value in values.items():
                expected.setdefault(key, {})[step] = value
    assert {"loss", "lr", "images_per_s", "val_map_at_r", "val_precision_at_1", "val_steps/val_map_at_r"} <= set(
        expected
    )
    for key, by_step in expected.items():
        assert logged[key] == pytest.approx(by_step, rel=1e-6), key
    best = results["best_epoch"]
    for metric in ("precision_at_1", "map_at_r"):
        assert logged[f"test/{metric}"] == pytest.approx({best: results["test"][metric]}, rel=1e-6)
    assert set(logged) == set(expected) | {f"test/{k}" for k in results["test"]}
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab
    # the projector: 50 test embeddings with their labels
    folder = run / "tensorboard" / f"{best:05d}" / "test"
    assert 'tensor_path: "' in (run / "tensorboard" / "projector_config.pbtxt").read_text()
    vectors = (folder / "tensors.tsv").read_text().splitlines()
    labels = (folder / "metadata.tsv").read_text().splitlines()
    assert len(vectors) == len(labels) == 50 and len(vectors[0].split("\t")) == 128
    assert set(labels) <= {str(c) for c in range(5, 10)}  # the test classes of digits


def test_mlflow_holds_params_metrics_and_files_and_a_resumed_run_continues(cli, tmp_path):
    pytest.importorskip("mlflow", reason="pip install 'dmlkit[mlflow]'")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    history, results = train(cli, run, "--callback", "mlflow")
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("dmlkit")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    cfg_text = (run / "config.toml").read_text()
    params = found.data.params
    assert params["backbone.name"] == "smallcnn" and params["loss.name"] in cfg_text
    assert float(params["train.lr"]) == 1e-3 and params["train.eval_at_start"] == "true"
    assert params["callbacks.0.name"] == "mlflow" and params["sampler.m"] == "16"
    for key in ("loss", "lr", "val_map_at_r", "images_per_s", "val_steps/val_map_at_r"):
        logged = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        expected = {}
        for record in history:
            if key in epoch_scalars(record):
                expected[record["epoch"]] = epoch_scalars(record)[key]
            for step, values in step_scalars(record):
                if key in values:
                    expected[step] = values[key]
        assert expected and logged == pytest.approx(expected), key
    test = client.get_metric_history(found.info.run_id, "test/map_at_r")
    assert [(m.step, m.value) for m in test] == [(results["best_epoch"], pytest.approx(results["test"]["map_at_r"]))]
    files = {f.path for f in client.list_artifacts(found.info.run_id)}
    assert {"config.toml", "metrics.jsonl", "results.json", "loss.png"} <= files
    # --resume continues the same MLflow run
    code, _, err = cli("train", "--resume", str(run), "--epochs", "3")
    assert code == 0, err
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"
    losses = client.get_metric_history(found.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    assert losses[-1].value == pytest.approx(rows(run)[-1]["loss"])


def test_mlflow_takes_another_store_and_experiment(cli, tmp_path):
    pytest.importorskip("mlflow", reason="pip install 'dmlkit[mlflow]'")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    code, _, err = cli(
        "train", "--epochs", "1", "--run-dir", str(tmp_path / "r"),
        "--callback", f"mlflow:tracking_uri={store.as_uri()},experiment=digits,artifacts=false",
    )  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "r" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store.as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert client.list_artifacts(found.info.run_id) == []
    assert param_text([1, 2]) == "[1, 2]" and found.data.params["train.epochs"] == "1"


def test_missing_tracker_packages_name_their_extras(cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    for name, extra in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        code, _, err = cli("train", "--epochs", "1", "--callback", name, "--run-dir", str(tmp_path / name))
        assert code == 1 and f"pip install 'dmlkit[{extra}]'" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / name).exists()
    code, _, err = cli("train", "--callback", "tensorbord", "--run-dir", str(tmp_path / "x"))
    assert code == 1 and "did you mean 'tensorboard'" in err
    code, _, err = cli("train", "--callback", "mlflow:experimnt=x", "--run-dir", str(tmp_path / "x"))
    assert code == 1 and "did you mean 'experiment'" in err


def test_trackers_page_commands_run(cli, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="pip install 'dmlkit[tensorboard]'")
    pytest.importorskip("mlflow", reason="pip install 'dmlkit[mlflow]'")
    monkeypatch.chdir(tmp_path)
    assert run_dmlkit_lines(ROOT / "docs" / "trackers.md", cli) >= 2
    assert list((tmp_path / "runs" / "tb").glob("tensorboard/events.out.tfevents.*"))
    assert (tmp_path / "runs" / "ml" / "mlruns").is_dir()


def test_reading_a_tracked_run_needs_no_tracker(cli, monkeypatch, tmp_path):
    """evaluate and embed read a run trained with a tracker where the tracker's package is gone:
    reading trains nothing, so the run's callbacks are not built."""
    run = tmp_path / "tb"
    code, _, err = cli("train", "--epochs", "1", "--callback", "tensorboard", "--run-dir", str(run))
    assert code == 0, err
    events = sorted(p.name for p in (run / "tensorboard").rglob("*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, out, err = cli("evaluate", str(run), "--json")
    assert code == 0, err
    assert json.loads(out)["precision_at_1"] == pytest.approx(
        json.loads((run / "results.json").read_text())["test"]["precision_at_1"], abs=1e-6
    )
    assert sorted(p.name for p in (run / "tensorboard").rglob("*")) == events  # nothing logged by reading
