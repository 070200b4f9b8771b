"""Bugs that fuzzing the commands found in the core (dmlkit/train.py, rundir.py and the core
commands of cli.py): paths holding rich markup printed as they are, a FIFO in place of the lock
file or among a dataset's images refused instead of waited on, an unfinished MLRC run refused
with advice that works."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
from test_fuzz import TINY

from dmlkit.errors import DmlkitError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_fuzz import _main

    path = tmp_path_factory.mktemp("core") / "run"
    code, _, err = _main("train", *TINY, "--run-dir", str(path))
    assert code == 0, err
    return path


def test_train_into_a_folder_with_a_closing_tag_in_its_name(cli, tmp_path):
    folder = tmp_path / "runs[" / "]x"
    code, out, err = cli("train", *TINY, "--run-dir", str(folder))
    assert code == 0, err
    assert (folder / "last.pt").is_file()


def test_train_prints_a_run_directory_with_markup_as_it_is(cli, tmp_path):
    folder = tmp_path / "[bold]b[" / "bold]"
    code, out, err = cli("train", *TINY, "--run-dir", str(folder))
    assert code == 0, err
    assert f"run directory: {folder}" in out.replace("\n", "")


def test_resume_a_run_with_a_closing_tag_in_its_path(cli, run, tmp_path):
    folder = tmp_path / "runs[" / "]x"
    shutil.copytree(run, folder)
    code, out, err = cli("train", "--resume", str(folder), "--epochs", "2")
    assert code == 0, err


def test_embed_into_a_folder_with_a_closing_tag(cli, run, tmp_path):
    out = tmp_path / "emb[" / "]x"
    code, _, err = cli("embed", str(run), "--out", str(out))
    assert (out / "embeddings.npy").is_file()
    assert code == 0, err


def test_report_into_a_folder_with_a_closing_tag(cli, run, tmp_path):
    out = tmp_path / "rep[" / "]x"
    code, _, err = cli("report", str(run), "--no-grid", "--out", str(out))
    assert (out / "report.json").is_file()
    assert code == 0, err


def test_a_fifo_in_place_of_the_lock_file_is_refused_not_waited_on(tmp_path):
    from dmlkit.rundir import RunLock

    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / ".lock")
    result: dict[str, object] = {}

    def take() -> None:
        try:
            with RunLock(folder):
                result["locked"] = True
        except DmlkitError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(10)  # a check of the file type takes microseconds
    waited = thread.is_alive()
    if waited:  # let it go: a reader on the FIFO unblocks its open()
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_NONBLOCK)
        thread.join(30)
        os.close(fd)
    assert not waited, "RunLock waited on a FIFO"
    assert "error" in result


def test_an_interrupted_mlrc_run_is_refused_with_advice_that_works(cli, run, tmp_path):
    folder = tmp_path / "m"
    (folder / "fold0").mkdir(parents=True)
    shutil.copy(run / "last.pt", folder / "fold0" / "last.pt")  # what Ctrl-C in fold 0's second epoch leaves
    code, _, err = cli("train", "--protocol", "mlrc", "--run-dir", str(folder))
    assert code == 1
    assert "--resume" not in err, err


def test_imagefolder_lists_only_regular_files(tmp_path):
    import numpy as np
    from PIL import Image

    from dmlkit.plugins import get_host

    root = tmp_path / "imgs"
    for part, classes in (("train", "ab"), ("test", "cd")):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / part / c / f"{i}.png")
    os.mkfifo(root / "train" / "a" / "fifo.png")
    try:
        data = get_host().registry.build("dataset", "imagefolder", root=str(root))
    except DmlkitError as exc:  # refusing the folder in one line is as good
        assert "fifo.png" in str(exc)
        return
    assert not any(str(item).endswith("fifo.png") for item in data.train.items)
