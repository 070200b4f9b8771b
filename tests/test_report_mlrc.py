import json

import numpy as np
import pytest
from PIL import Image

from dmlkit.evaluation import l2_normalise, retrieval_metrics


def test_report_compares_runs_and_draws_figures(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--epochs", "2", "--run-dir", "a")[0] == 0
    assert cli("train", "--epochs", "2", "--loss", "triplet", "--miner", "semihard", "--run-dir", "b")[0] == 0
    code, out, err = cli("report", "a", "b", "--out", "rep", "--queries", "3", "--top-k", "4")
    assert code == 0, err
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["run"] for r in rows] == ["a", "b"] and [r["loss"] for r in rows] == ["proxynca", "triplet"]
    # each run at the epoch its validation chose, with the test metrics read there (results.json)
    results_b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert rows[1]["map_at_r"] == results_b["test"]["map_at_r"] and rows[1]["best_epoch"] == results_b["best_epoch"]
    assert rows[1]["selected_by"] == "best by validation map_at_r"
    assert cli("report", "a", "--best-metric", "map_at_r", "--no-grid")[0] == 1  # test-set selection is gone
    for name in ("metric_curves.png", "recall_at_k.png", "retrieval_a.png", "retrieval_b.png"):
        with Image.open(tmp_path / "rep" / name) as img:
            assert img.size[0] > 200 and img.size[1] > 150
    # the grid has 3 query rows of 1 + 4 pictures: it is wider than tall by about 5:3
    with Image.open(tmp_path / "rep" / "retrieval_a.png") as img:
        assert 1.3 < img.size[0] / img.size[1] < 2.5


def test_report_refuses_a_folder_that_is_not_a_run(cli, tmp_path):
    code, _, err = cli("report", str(tmp_path))
    assert code == 1 and "is not a run directory: it has no metrics.jsonl" in err


def test_mlrc_protocol_trains_four_fold_models_and_concatenates(cli, tmp_path):
    run = tmp_path / "mlrc"
    code, out, err = cli(
        "train", "--protocol", "mlrc", "--dataset-opt", "train_classes=8", "--epochs", "2", "--set", "batch_size=48",
        "--run-dir", str(run),
    )  # fmt: skip
    assert code == 0, err
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
