"""dmlkit export / index / search: exported models reproduce the run, an index finds its own images."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dmlkit.data import load_image
from dmlkit.train import load_run
from dmlkit_plugins.deploy import MANIFEST, stored_vectors

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (200, 40, 200), (40, 200, 200)]


def shapes(root, seed=0):
    """A tiny imagefolder: 4 training and 2 test classes of coloured shapes, 6 images each."""
    rng = np.random.default_rng(seed)
    for part, classes in (("train", range(4)), ("test", range(4, 6))):
        for c in classes:
            d = root / part / f"c{c}"
            d.mkdir(parents=True)
            for i in range(6):
                img = Image.new("RGB", (40, 48), tuple(int(v) for v in rng.integers(0, 80, 3)))
                x, y = (int(v) for v in rng.integers(2, 14, 2))
                draw = ImageDraw.Draw(img)
                (draw.ellipse if c % 2 else draw.rectangle)([x, y, x + 20, y + 24], fill=COLOURS[c])
                img.save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run trained for one epoch on the shapes folder (RGB, resize + centre crop + normalise)."""
    from dmlkit.cli import main

    tmp = tmp_path_factory.mktemp("deploy")
    data = shapes(tmp / "shapes")
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(data), "--backbone-opt", "in_channels=3",
            "--backbone-opt", "image_size=32", "--backbone-opt", "channels=16", "--epochs", "1",
            "--batch-size", "8", "--set", "val_fraction=0.5", "--run-dir", str(tmp / "run")]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        pytest.fail(f"training the fixture run failed ({exc.code})")
    return tmp / "run", data


def run_embeddings(run):
    trainer = load_run(run)
    emb, _ = trainer.embed(trainer.test_split)
    return trainer, emb


def test_exported_models_reproduce_the_runs_embeddings(image_run, cli, tmp_path):
    """Each exported file, loaded on its own and fed through preprocessing.json's steps from the
    image files, gives the run's embeddings of its whole test set to 1e-5."""
    import onnxruntime

    from dmlkit_plugins.deploy import build_transform

    run, _ = image_run
    code, out, err = cli("export", str(run), "--format", "torchscript,onnx,pt2", "--out", str(tmp_path / "exp"))
    assert code == 0, err
    trainer, reference = run_embeddings(run)
    prep = json.loads((tmp_path / "exp" / "preprocessing.json").read_text())
    assert prep["input"] == "image" and prep["color_mode"] == "RGB"
    assert [s["op"] for s in prep["steps"]] == ["resize", "center_crop", "to_tensor", "normalize"]
    assert prep["input_shape"] == ["batch", 3, 32, 32] and prep["embedding_size"] == reference.shape[1]
    transform = build_transform(prep["steps"])
    x = torch.stack([transform(load_image(p, prep["color_mode"])) for p in trainer.test_split.items])

    scripted = torch.jit.load(str(tmp_path / "exp" / "model.ts"))
    program = torch.export.load(str(tmp_path / "exp" / "model.pt2")).module()
    session = onnxruntime.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        outputs = {
            "torchscript": scripted(x).numpy(),
            "pt2": program(x).numpy(),
            "onnx": session.run(["embeddings"], {"images": x.numpy()})[0],
        }
    for fmt, emb in outputs.items():
        assert emb.shape == reference.shape, fmt
        assert np.abs(emb - reference).max() <= 1e-5, fmt
    record = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert set(record["files"]) == {"torchscript", "onnx", "pt2"}
    assert all(f["max_abs_diff"] <= 1e-5 for f in record["files"].values())
    assert record["epoch"] == trainer.epoch
    # a second export into the same folder is refused, --overwrite replaces it
    code, _, err = cli("export", str(run), "--format", "pt2", "--out", str(tmp_path / "exp"))
    assert code == 1 and "--overwrite" in err
    code, _, err = cli("export", str(run), "--format", "pt2", "--out", str(tmp_path / "exp"), "--overwrite")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {
        "model.pt2",
        "preprocessing.json",
        "export.json",
        MANIFEST,
    }


def test_export_default_folder_and_bad_formats(image_run, cli, monkeypatch):
    run, _ = image_run
    code, _, err = cli("export", str(run), "--format", "torchscript,tflite")
    assert code == 1 and "torchscript, onnx, pt2" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the onnx extra is not installed
    code, _, err = cli("export", str(run), "--format", "onnx")
    assert code == 1 and "pip install 'dmlkit[onnx]'" in err
    assert not (run / "export").exists()  # nothing half-written
    code, _, err = cli("export", str(run), "--format", "torchscript")
    assert code == 0, err
    assert (run / "export" / "model.ts").is_file()


def test_index_and_search_find_each_image_first(image_run, cli, tmp_path):
    run, data = image_run
    code, out, err = cli("index", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "idx"))
    assert code == 0, err
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    files = sorted((data / "test").rglob("*.png"))
    assert meta["count"] == len(files) == 12
    code, out, err = cli("search", str(tmp_path / "idx"), str(data / "test"), "-k", "3", "--json",
                         "--grid", str(tmp_path / "grid.png"))  # fmt: skip
    assert code == 0, err
    results = json.loads(out)
    assert [r["query"] for r in results] == [str(f.resolve()) for f in files]
    for r in results:
        assert [h["rank"] for h in r["results"]] == [1, 2, 3]
        assert r["results"][0]["path"] == r["query"] and r["results"][0]["distance"] < 1e-3
        assert r["results"][1]["distance"] > r["results"][0]["distance"]
    # the distances are the run's: Euclidean between its embeddings of the two files
    trainer, emb = run_embeddings(run)
    order = {str(p): i for i, p in enumerate(trainer.test_split.items)}
    q, hit = results[0]["query"], results[0]["results"][1]
    rel = lambda p: str(data / "test" / p.split("/test/")[1])  # noqa: E731
    want = np.linalg.norm(emb[order[rel(q)]] - emb[order[rel(hit["path"])]])
    assert hit["distance"] == pytest.approx(want, abs=1e-4)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 200 and grid.height > 100 * len(results) / 2
    # an indexed file moved away since: the search still answers, the grid marks it missing
    moved = tmp_path / files[1].name
    files[1].rename(moved)
    try:
        code, _, err = cli("search", str(tmp_path / "idx"), str(files[0]), "--grid", str(tmp_path / "g2.png"))
    finally:
        moved.rename(files[1])
    assert code == 0 and (tmp_path / "g2.png").is_file(), err
    code, out, _ = cli("search", str(tmp_path / "idx"), str(files[0]), "-k", "50")
    assert code == 0 and out.count(".png") == 12 + 1  # every indexed image once, and the title
    # --batch-size and --device change how it is embedded, not what: the same vectors
    code, _, err = cli("index", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "idx2"),
                       "--batch-size", "5", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    import faiss

    a, b = (faiss.read_index(str(tmp_path / d / "index.faiss")) for d in ("idx", "idx2"))
    np.testing.assert_allclose(stored_vectors(a, "Flat"), stored_vectors(b, "Flat"), atol=1e-5)
    code, _, err = cli("index", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "idx3"),
                       "--device", "tpu")  # fmt: skip
    assert code == 1 and "unknown device 'tpu'" in err and not (tmp_path / "idx3").exists()


def test_index_of_a_feature_cache_run_embeds_only_what_the_run_has_not_cached(image_run, cli, tmp_path, monkeypatch):
    """A run trained on cached frozen features already holds its validation and test images'
    features: `dmlkit index` over the whole folder embeds only the other (training) images, and
    its vectors equal the run's whole model applied to every image (no cache)."""
    import faiss

    from dmlkit.features import FeatureCache

    _, data = image_run
    run = tmp_path / "cached-run"
    code, _, err = cli("train", "--dataset", "imagefolder", "--data-root", str(data), "--backbone-opt", "in_channels=3",
                       "--backbone-opt", "image_size=32", "--backbone-opt", "channels=16", "--epochs", "1",
                       "--batch-size", "8", "--set", "val_fraction=0.5", "--set", "freeze_backbone=true",
                       "--set", "feature_cache=true", "--set", f"cache_dir={tmp_path / 'cache'}",
                       "--run-dir", str(run))  # fmt: skip
    assert code == 0, err
    computed = []
    compute = FeatureCache._compute
    monkeypatch.setattr(FeatureCache, "_compute", lambda self, split, *a: computed.append(list(split.items))
                        or compute(self, split, *a))  # fmt: skip
    code, out, err = cli("index", str(run), "--images", str(data), "--out", str(tmp_path / "idx"))
    assert code == 0, err
    trainer = load_run(run)
    evaluated = {str(Path(p).resolve()) for s in (trainer.val_split, trainer.test_split) for p in s.items}
    files = sorted(data.rglob("*.png"))
    assert len(evaluated) == 24 and len(files) == 36
    # only the 12 training images went through the backbone; the 24 others came from the run's cache
    assert [sorted(str(Path(p).resolve()) for p in c) for c in computed] == [
        sorted(str(f.resolve()) for f in files if str(f.resolve()) not in evaluated)
    ]
    assert "24 of 36 images already cached" in " ".join(out.split())
    # the same vectors as the whole model (backbone + head) on every image, without any cache
    items = json.loads((tmp_path / "idx" / "items.json").read_text())
    paths = [str(Path(items["root"]) / p) for p in items["paths"]]
    split = trainer.test_split.__class__(paths, np.zeros(len(paths), np.int64), trainer.test_split.transform)
    trainer.features, trainer.net = None, trainer.model  # the uncached path: every image through the backbone
    want, _ = trainer.embed(split)
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    np.testing.assert_allclose(stored_vectors(index, "Flat"), want, atol=1e-5)
    # a second index of the same folder embeds nothing: the folder's features are cached now
    computed.clear()
    code, _, err = cli("index", str(run), "--images", str(data), "--out", str(tmp_path / "idx2"))
    assert code == 0 and computed == [], err


def test_index_unreadable_images_and_refusals(image_run, cli, tmp_path):
    run, data = image_run
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((data / "test" / "c4" / "0.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    code, _, err = cli("index", str(run), "--images", str(folder), "--out", str(tmp_path / "idx"))
    assert code == 1 and "broken.png" in err and "--skip-bad" in err
    assert not (tmp_path / "idx").exists()
    code, _, err = cli("index", str(run), "--images", str(folder), "--out", str(tmp_path / "idx"), "--skip-bad")
    assert code == 0, err
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["skipped"] == 1
    code, _, err = cli("index", str(run), "--images", str(folder), "--out", str(tmp_path / "idx"))
    assert code == 1 and "--overwrite" in err
    code, _, err = cli("index", str(run), "--images", str(tmp_path / "nowhere"))
    assert code == 1 and "not a folder" in err
    code, _, err = cli("index", str(run), "--images", str(folder), "--out", str(tmp_path / "i2"), "--factory", "Nope9")
    assert code == 1 and "index_factory" in err
    # a damaged index: one line naming the fix
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    code, _, err = cli("search", str(tmp_path / "idx"), str(folder / "good.png"))
    assert code == 1 and "rebuild it with dmlkit index" in err
    code, _, err = cli("search", str(tmp_path), str(folder / "good.png"))
    assert code == 1 and "not a dmlkit index" in err
    # a folder of symlinks to images elsewhere: indexed under the links' names, found by search
    links = tmp_path / "links"
    links.mkdir()
    (links / "linked.png").symlink_to(data / "test" / "c4" / "1.png")
    code, _, err = cli("index", str(run), "--images", str(links), "--out", str(tmp_path / "idx4"))
    assert code == 0, err
    code, out, err = cli("search", str(tmp_path / "idx4"), str(links / "linked.png"), "--json")
    assert code == 0, err
    assert json.loads(out)[0]["results"][0]["path"].endswith("links/linked.png")


def test_a_run_on_tensors_exports_but_does_not_index(cli, tmp_path):
    code, _, err = cli("train", "--epochs", "1", "--run-dir", str(tmp_path / "digits"))
    assert code == 0, err
    code, _, err = cli("export", str(tmp_path / "digits"), "--format", "torchscript")
    assert code == 0, err
    prep = json.loads((tmp_path / "digits" / "export" / "preprocessing.json").read_text())
    assert prep["input"] == "tensor" and prep["input_shape"] == ["batch", 1, 8, 8]
    trainer, reference = run_embeddings(tmp_path / "digits")
    x = torch.stack([trainer.test_split[i][0] for i in range(len(trainer.test_split))])
    emb = torch.jit.load(str(tmp_path / "digits" / "export" / "model.ts"))(x).detach().numpy()
    assert np.abs(emb - reference).max() <= 1e-5
    shapes(tmp_path / "imgs")
    code, _, err = cli("index", str(tmp_path / "digits"), "--images", str(tmp_path / "imgs"))
    assert code == 1 and "tensors, not image files" in err


def test_faiss_patched_by_torch_utils_still_gives_arrays():
    """pytorch-metric-learning imports faiss.contrib.torch_utils, after which faiss returns torch
    tensors where no array goes in (reconstruct_n): dmlkit's index vectors and retrieval metrics
    stay numpy and unchanged in such a process (a fresh one: the patch is process-wide)."""
    import subprocess

    script = """
import numpy as np, faiss
from dmlkit.evaluation import retrieval_metrics
from dmlkit_plugins.deploy import stored_vectors
rng = np.random.default_rng(0)
x, y = rng.standard_normal((60, 8)).astype(np.float32), np.repeat(np.arange(6), 10)
before = retrieval_metrics(x, y)
import faiss.contrib.torch_utils
index = faiss.IndexFlatL2(8)
index.add(x)
assert not isinstance(index.reconstruct_n(0, 60), np.ndarray)  # the patch is in effect
v = stored_vectors(index, "Flat")
assert type(v) is np.ndarray and np.array_equal(v, x), type(v)
assert retrieval_metrics(x, y) == before
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
