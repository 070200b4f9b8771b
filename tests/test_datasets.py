"""Every dataset layout, built tiny in tmp_path, plus the real data in ../shared/data when present."""

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from dmlkit import get_registry
from dmlkit.errors import DataError

SPEC = {"channels": 3, "image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def img(path, size=(40, 40), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30)).save(path)
    return path


def build(name, **opts):
    return get_registry().build("dataset", name, context={"input_spec": SPEC}, **opts)


def make_cub(root, classes=(1, 2, 101, 150), per=3):
    lines, labels = [], []
    n = 0
    for c in classes:
        for k in range(per):
            n += 1
            rel = f"{c:03d}.Bird_{c}/img_{k}.jpg"
            img(root / "images" / rel)
            lines.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def test_cub200_layout_with_non_contiguous_class_ids(tmp_path):
    data = build("cub200", root=str(make_cub(tmp_path / "CUB_200_2011")))
    assert len(data.train) == 6 and len(data.test) == 6
    assert data.train.num_classes == 2 and data.test.num_classes == 2
    assert data.test.class_names == ["101", "150"]
    x, y = data.test[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_cub200_errors_name_the_file(tmp_path):
    root = make_cub(tmp_path / "cub")
    (root / "images" / "001.Bird_1" / "img_0.jpg").unlink()
    with pytest.raises(DataError, match=r"images.txt line 1: listed image .*img_0.jpg does not exist"):
        build("cub200", root=str(root))
    root = make_cub(tmp_path / "cub2")
    (root / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(DataError, match=r"image_class_labels.txt line 2: expected 2 fields"):
        build("cub200", root=str(root))
    with pytest.raises(DataError, match=r"index file not found: expected .*images.txt"):
        build("cub200", root=str(tmp_path))


def test_skip_bad_skips_and_counts(tmp_path):
    root = make_cub(tmp_path / "cub")
    (root / "images" / "001.Bird_1" / "img_0.jpg").unlink()  # missing
    (root / "images" / "101.Bird_101" / "img_1.jpg").write_bytes(b"\xff\xd8 truncated")  # unreadable
    lines = (root / "images.txt").read_text().splitlines()
    (root / "images.txt").write_text("\n".join([*lines[:-1], "12"]) + "\n")  # a bad line
    with pytest.raises(DataError, match="images.txt line 12: expected 2 fields"):
        build("cub200", root=str(root))
    data = build("cub200", root=str(root), skip_bad=True)
    assert data.skipped == {"bad index lines": 1, "missing images": 1, "unreadable images": 1}
    assert len(data.train) == 5 and len(data.test) == 4
    for i in range(len(data.test)):
        data.test[i]  # every kept image loads


def test_unreadable_image_names_its_path(tmp_path):
    root = make_cub(tmp_path / "cub")
    bad = root / "images" / "101.Bird_101" / "img_0.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    data = build("cub200", root=str(root))
    with pytest.raises(DataError, match=r"cannot read image .*101.Bird_101/img_0.jpg"):
        data.test[0]


def test_omniglot_layout(tmp_path):
    base = tmp_path / "omniglot-py"
    for part, alph in (("images_background", "Latin"), ("images_evaluation", "Greek")):
        for c in (1, 2):
            for d in (1, 2):
                img(base / part / alph / f"character{c:02d}" / f"{c:04d}_{d:02d}.png", (105, 105), "L")
    data = get_registry().build("dataset", "omniglot", root=str(tmp_path))
    assert len(data.train) == 4 and data.train.num_classes == 2 and data.test.num_classes == 2
    x, _ = data.train[0]
    assert x.shape == (1, 56, 56)
    with pytest.raises(DataError, match="images_background"):
        build("omniglot", root=str(tmp_path / "omniglot-py" / "images_background"))


def test_imagefolder_and_csv(tmp_path):
    for part in ("train", "test"):
        for c in ("a", "b"):
            for k in range(2):
                img(tmp_path / "f" / part / f"{part}{c}" / f"{k}.png")
    data = build("imagefolder", root=str(tmp_path / "f"))
    assert len(data.train) == 4 and data.test.class_names == ["testa", "testb"]
    rows = ["label,path,split,is_query,is_gallery"]
    for i, (split, q, g) in enumerate(
        [("train", "", ""), ("train", "", ""), ("validation", 1, 0), ("validation", 0, 1), ("validation", 1, 1)]
    ):
        img(tmp_path / "c" / f"{i}.jpg")
        rows.append(f"{i % 2},{i}.jpg,{split},{q},{g}")
    (tmp_path / "c" / "t.csv").write_text("\n".join(rows) + "\n")
    data = build("csv", path=str(tmp_path / "c" / "t.csv"))
    assert len(data.train) == 2 and len(data.test) == 3
    assert data.test.query_mask.tolist() == [True, False, True]
    assert data.test.gallery_mask.tolist() == [False, True, True]
    (tmp_path / "c" / "t.csv").write_text("label,path,split\n0,9.jpg,train\n0,0.jpg,validation\n")
    with pytest.raises(DataError, match=r"t.csv line 2: image .*9.jpg does not exist"):
        build("csv", path=str(tmp_path / "c" / "t.csv"))
    (tmp_path / "c" / "t.csv").write_text("label,file\n")
    with pytest.raises(DataError, match="missing column"):
        build("csv", path=str(tmp_path / "c" / "t.csv"))


def test_sop_and_inshop_layouts(tmp_path):
    sop = tmp_path / "Stanford_Online_Products"
    for name, classes in (("Ebay_train.txt", (1, 2)), ("Ebay_test.txt", (3, 4))):
        lines = ["image_id class_id super_class_id path"]
        for i, c in enumerate(classes * 2):
            rel = f"bike_final/{c}_{i}.JPG"
            img(sop / rel)
            lines.append(f"{i + 1} {c} 1 {rel}")
        (sop / name).write_text("\n".join(lines) + "\n")
    data = build("sop", root=str(tmp_path))
    assert len(data.train) == 4 and data.test.num_classes == 2
    shop = tmp_path / "inshop"
    rows = [
        ("img/a/1.jpg", "id_1", "train"),
        ("img/a/2.jpg", "id_1", "train"),
        ("img/b/1.jpg", "id_2", "query"),
        ("img/b/2.jpg", "id_2", "gallery"),
        ("img/c/1.jpg", "id_3", "gallery"),
    ]
    for r in rows:
        img(shop / r[0])
    (shop / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(" ".join(r) for r in rows) + "\n"
    )
    data = build("inshop", root=str(shop))
    assert len(data.train) == 2 and len(data.test) == 3
    assert data.test.query_mask.tolist() == [True, False, False]
    assert data.test.gallery_mask.tolist() == [False, True, True]


def test_cars196_devkit_layout(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "cars"
    for folder, mat, classes in (
        ("cars_train", root / "devkit" / "cars_train_annos.mat", (1, 98)),
        ("cars_test", root / "cars_test_annos_withlabels.mat", (99, 196)),
    ):
        recs = []
        for i, c in enumerate(classes * 2):
            name = f"{i:05d}.jpg"
            img(root / folder / name)
            recs.append((1, 1, 10, 10, c, name))
        arr = np.array(
            recs,
            dtype=[
                ("bbox_x1", "O"),
                ("bbox_y1", "O"),
                ("bbox_x2", "O"),
                ("bbox_y2", "O"),
                ("class", "O"),
                ("fname", "O"),
            ],
        )
        mat.parent.mkdir(parents=True, exist_ok=True)
        savemat(mat, {"annotations": arr})
    data = build("cars196", root=str(root))
    assert len(data.train) == 4 and len(data.test) == 4
    assert data.train.class_names == ["1", "98"] and data.test.class_names == ["99", "196"]


def test_digits_zero_shot_split():
    data = get_registry().build("dataset", "digits")
    assert data.train.num_classes == 5 and data.test.num_classes == 5
    assert len(data.train) + len(data.test) == 1797


@pytest.mark.skipif(not (SHARED_DATA / "CUB_200_2011").is_dir(), reason="../shared/data/CUB_200_2011 not present")
def test_real_cub_subset():
    data = build("cub200", root=str(SHARED_DATA / "CUB_200_2011"))
    assert (len(data.train), data.train.num_classes) == (3428, 58)
    assert (len(data.test), data.test.num_classes) == (2474, 42)
    x, _ = data.train[0]
    assert x.shape == (3, 32, 32)


@pytest.mark.skipif(not (SHARED_DATA / "omniglot").is_dir(), reason="../shared/data/omniglot not present")
def test_real_omniglot():
    data = get_registry().build("dataset", "omniglot", root=str(SHARED_DATA / "omniglot"))
    assert (len(data.train), data.train.num_classes) == (19280, 964)
    assert (len(data.test), data.test.num_classes) == (13180, 659)
