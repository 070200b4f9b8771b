"""Open-set search on real images: an index carries the threshold calibrated on its run's validation
classes, and answers "unknown" for images of a class it never saw (Omniglot, /work/shared/data)."""

import json
import shutil

import pytest
from conftest import SHARED_DATA

OMNIGLOT = SHARED_DATA / "omniglot" / "omniglot-py"


@pytest.fixture(scope="module")
def omniglot_index(tmp_path_factory):
    """A run trained 2 epochs on 5 background alphabets (val_fraction 0.3: about 40 held-out
    characters calibrate the threshold), and an index of 12 evaluation characters, 10 drawers each."""
    if not (OMNIGLOT / "images_background").is_dir():
        pytest.skip(f"Omniglot is not at {OMNIGLOT} (../shared/data, see its README.md)")
    from dmlkit.cli import main

    tmp = tmp_path_factory.mktemp("openset")
    for folder in ("om/train", "om/test"):
        (tmp / folder).mkdir(parents=True)
    alphabets = sorted(p for p in (OMNIGLOT / "images_background").iterdir() if p.is_dir())[:5]
    for a in alphabets:
        for ch in sorted(a.iterdir()):
            (tmp / "om" / "train" / f"{a.name}-{ch.name}").symlink_to(ch)
    test_alphabet = sorted(p for p in (OMNIGLOT / "images_evaluation").iterdir() if p.is_dir())[0]
    chars = sorted(test_alphabet.iterdir())
    for ch in chars:
        (tmp / "om" / "test" / ch.name).symlink_to(ch)
    seen, unseen = chars[:12], chars[12:]
    for ch in seen:
        (tmp / "gallery" / ch.name).mkdir(parents=True)
        for f in sorted(ch.glob("*.png"))[:10]:
            shutil.copy(f, tmp / "gallery" / ch.name / f.name)
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(tmp / "om"), "--backbone-opt", "in_channels=1",
            "--backbone-opt", "image_size=28", "--backbone-opt", "channels=16", "--epochs", "2", "--batch-size", "32",
            "--set", "val_fraction=0.3", "--run-dir", str(tmp / "run")]  # fmt: skip
    for args in (argv, ["index", str(tmp / "run"), "--images", str(tmp / "gallery"), "--out", str(tmp / "idx")]):
        try:
            main(args)
        except SystemExit as exc:
            pytest.fail(f"dmlkit {args[0]} failed ({exc.code})")
    return tmp, seen, unseen


def search(cli, index, files, *extra):
    code, out, err = cli("search", str(index), *map(str, files), "-k", "5", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_search_answers_unknown_for_a_class_the_index_never_saw(omniglot_index, cli):
    tmp, seen, unseen = omniglot_index
    meta = json.loads((tmp / "idx" / "index.json").read_text())
    point = meta["operating_point"]
    assert point["fmr_target"] == 1e-3 and point["calibrated_on"].startswith("validation split")
    assert json.loads((tmp / "idx" / "export.json").read_text())["operating_point"] == point
    # the indexed images themselves: each finds itself at distance 0, a match
    indexed = sorted((tmp / "gallery").rglob("*.png"))[::7]
    assert all(r["decision"] == "match" and r["results"][0]["match"] for r in search(cli, tmp / "idx", indexed))
    # other drawings of the indexed characters, and drawings of characters never indexed
    others = [f for ch in seen for f in sorted(ch.glob("*.png"))[10:]]
    new = [f for ch in unseen for f in sorted(ch.glob("*.png"))]
    unknown_new = [r["decision"] for r in search(cli, tmp / "idx", new)].count("unknown") / len(new)
    unknown_others = [r["decision"] for r in search(cli, tmp / "idx", others)].count("unknown") / len(others)
    # measured 0.86 and 0.88 (1 and 2 threads; other drawings of indexed characters: 0.50, 0.43): the 5 nearest of
    # a query are the most similar indexed drawings, so each is a match more often than a random impostor pair
    assert unknown_new >= 0.75
    assert unknown_new > unknown_others + 0.2  # not a threshold that rejects everything
    results = search(cli, tmp / "idx", new[:5], "--threshold", "0")
    assert all(r["decision"] == "unknown" and r["threshold_from"] == "--threshold" for r in results)
    results = search(cli, tmp / "idx", new[:5], "--fmr", "0.01")
    wanted = next(r["threshold"] for r in point["thresholds"] if r["fmr_target"] == 0.01)
    assert all(r["threshold"] == wanted for r in results)
    assert all(h["match"] == (h["distance"] <= wanted) for r in results for h in r["results"])


def test_search_threshold_refusals_and_table(omniglot_index, cli):
    tmp, _, unseen = omniglot_index
    query = str(sorted(unseen[0].glob("*.png"))[0])
    code, out, err = cli("search", str(tmp / "idx"), query, "--fmr", "0.003")
    assert code != 0 and "--fmr 0.003 is not among the FMRs" in err and "0.001" in err
    code, out, err = cli("search", str(tmp / "idx"), query, "--fmr", "0.01", "--threshold", "0.5")
    assert code != 0 and "not both" in err
    code, out, err = cli("search", str(tmp / "idx"), query, "--threshold", "-1")
    assert code != 0 and "--threshold must be a distance >= 0" in err
    code, out, err = cli("search", str(tmp / "idx"), query, "--threshold", "0")
    assert code == 0 and "unknown" in out and "match" in out


def test_export_carries_the_operating_point(omniglot_index, cli):
    tmp, _, _ = omniglot_index
    code, out, err = cli(
        "export", str(tmp / "run"), "--format", "torchscript", "--out", str(tmp / "exp"), "--fmr", "1e-2"
    )
    assert code == 0, err
    point = json.loads((tmp / "exp" / "export.json").read_text())["operating_point"]
    assert point["fmr_target"] == 1e-2 and point["fmr"] <= 1e-2 and "test" in point
    assert "match threshold" in out
    code, _, err = cli("export", str(tmp / "run"), "--out", str(tmp / "exp2"), "--fmr", "2")
    assert code != 0 and "--fmr must lie between 0 and 1" in err
