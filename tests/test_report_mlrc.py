import json
import re

import numpy as np
import pytest

from dmlkit.evaluation import l2_normalise, retrieval_metrics


@pytest.fixture(scope="module")
def mlrc_run(tmp_path_factory):
    """One --protocol mlrc run of two epochs: four fold models under fold0..fold3 and mlrc.json."""
    from dmlkit.cli import main

    run = tmp_path_factory.mktemp("mlrc") / "mlrc"
    try:
        main(["train", "--protocol", "mlrc", "--dataset-opt", "train_classes=8", "--epochs", "2", "--set",
              "batch_size=48", "--run-dir", str(run)])  # fmt: skip
    except SystemExit as exc:
        assert not exc.code, "mlrc training failed"
    return run


def test_report_refuses_a_folder_that_is_not_a_run(cli, tmp_path):
    code, _, err = cli("report", str(tmp_path))
    assert code == 1 and "is not a run directory: it has no metrics.jsonl" in err
    (tmp_path / "fold0").mkdir()  # an mlrc run killed before it wrote mlrc.json
    code, _, err = cli("report", str(tmp_path))
    assert code == 1 and "unfinished --protocol mlrc run" in err and "fold0" in err


@pytest.mark.filterwarnings("error")
def test_report_reads_an_mlrc_run(cli, mlrc_run, tmp_path):
    page = tmp_path / "page.html"
    code, out, err = cli("report", str(mlrc_run), "--out", str(tmp_path / "png"), "--html", str(page), "--queries", "2")
    assert code == 0, err
    mlrc = json.loads((mlrc_run / "mlrc.json").read_text())
    (row,) = json.loads((tmp_path / "png" / "report.json").read_text())
    assert row["protocol"] == "mlrc" and row["map_at_r"] == mlrc["concatenated"]["map_at_r"]
    assert [f["run"] for f in row["folds"]] == [f"mlrc/fold{i}" for i in range(4)]
    for fold, model in zip(row["folds"], mlrc["models"], strict=True):
        res = json.loads((mlrc_run / f"fold{model['fold']}" / "results.json").read_text())
        assert fold["best_epoch"] == model["best_epoch"] == res["best_epoch"]
        assert fold["map_at_r"] == model["map_at_r"] == res["test"]["map_at_r"]
    assert "  fold3 " in out  # the table shows each fold under the concatenation
    text = page.read_text()
    cells = dict(
        ((run, key), float(v))
        for key, run, v in re.findall(r'data-metric="(\w+)" data-run="([^"]+)" data-value="([^"]+)"', text)
    )
    for key, value in mlrc["concatenated"].items():
        if isinstance(value, float):
            assert cells[("mlrc", key)] == value
    for model in mlrc["models"]:
        assert cells[(f"mlrc/fold{model['fold']}", "map_at_r")] == model["map_at_r"]
    # the page's concatenated embeddings give mlrc.json's metrics again: no warning that they differ
    assert 'class="warn"' not in text
    # curves: one line per fold model, each with its chosen epoch starred
    from dmlkit.report import curves_figure, load_run

    fig = curves_figure([load_run(mlrc_run)])
    for ax in fig.axes:
        assert [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")] == [
            f"mlrc/fold{i}" for i in range(4)
        ]
        assert sum(ln.get_marker() == "*" for ln in ax.lines) == 4


def test_report_refuses_a_damaged_mlrc_json(cli, tmp_path):
    (tmp_path / "mlrc.json").write_text('{"protocol": "mlrc", "models": 3}')
    code, _, err = cli("report", str(tmp_path))
    assert code == 1 and "is not a dmlkit mlrc.json; the file is damaged" in err


def test_mlrc_protocol_trains_four_fold_models_and_concatenates(cli, mlrc_run, tmp_path):
    run = mlrc_run
    result = json.loads((run / "mlrc.json").read_text())
    assert [m["fold"] for m in result["models"]] == [0, 1, 2, 3]
    assert result["concatenated"]["dim"] == 4 * 128
    # each model held out a different class fold; its best epoch was chosen on validation MAP@R
    for m in result["models"]:
        rows = [json.loads(x) for x in (run / f"fold{m['fold']}" / "metrics.jsonl").read_text().splitlines()]
        assert m["val_map_at_r"] == m["val_value"] == max(r["val_map_at_r"] for r in rows)
        assert m["best_metric"] == result["best_metric"] == "map_at_r"
    # the concatenated metrics, recomputed from each fold model's saved embeddings
    parts = []
    for fold in range(4):
        assert cli("embed", str(run / f"fold{fold}"), "--out", str(tmp_path / f"e{fold}"))[0] == 0
        parts.append(l2_normalise(np.load(tmp_path / f"e{fold}" / "embeddings.npy")))
    labels = np.load(tmp_path / "e0" / "labels.npy")
    ref = retrieval_metrics(np.concatenate(parts, 1), labels)
    assert result["concatenated"]["map_at_r"] == pytest.approx(ref["map_at_r"], abs=1e-6)


def test_mlrc_refuses_folds_of_one_class_before_training(cli, tmp_path):
    code, _, err = cli("train", "--protocol", "mlrc", "--epochs", "1", "--run-dir", str(tmp_path / "m"))
    assert code == 1 and "would validate on 1 class of the 5 training classes" in err and "at least 8" in err
    assert not (tmp_path / "m").exists()


def test_folds_are_class_disjoint_and_cover_the_training_classes():
    from dmlkit import get_registry
    from dmlkit.splits import class_disjoint_split

    data = get_registry().build("dataset", "digits")
    seen = []
    for fold in range(4):
        train, val = class_disjoint_split(data.train, 0.0, seed=0, folds=4, fold=fold)
        assert len(train) + len(val) == len(data.train)
        seen.append(len(val))
    assert sum(seen) == len(data.train)  # every item is held out exactly once
