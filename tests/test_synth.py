"""The synthetic shapes set (fxq.data.synth and ``fxq data synth``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxq.cli import main
from fxq.data import CocoDetection, resolve_categories, synth_categories, train_transforms, write_synthetic
from fxq.data.synth import CLASSES, COLOURS, FINE64
from fxq.errors import InputError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    write_synthetic(out, seed=5, train=150, val=30)
    return out


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synthetic(a, seed=11, train=6, val=3, size=128)
    write_synthetic(b, seed=11, train=6, val=3, size=128)
    write_synthetic(c, seed=12, train=6, val=3, size=128)
    files_a = _files(a)
    assert set(files_a) == {
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        *(f"train/{i:06d}.png" for i in range(1, 7)),
        *(f"val/{i:06d}.png" for i in range(1, 4)),
    }
    assert files_a == _files(b)
    assert files_a["train/000001.png"] != _files(c)["train/000001.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_categories_and_ids(synth_set: Path) -> None:
    for split in ("train", "val"):
        data = json.loads((synth_set / "annotations" / f"instances_{split}.json").read_text())
        cats = data["categories"]
        assert [c["id"] for c in cats] == list(range(1, len(cats) + 1)) and len(cats) >= 20
        assert len({c["supercategory"] for c in cats}) >= 4
        assert all(c["name"] and c["supercategory"] for c in cats)
        assert [im["id"] for im in data["images"]] == list(range(1, len(data["images"]) + 1))
        assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert cats == synth_categories()
    names = {c["name"] for c in cats}
    for pair in [
        ("red circle", "orange circle"),
        ("blue square", "blue hollow square"),
        ("red circle", "red ring"),
    ]:
        assert set(pair) <= names
    assert resolve_categories(synth_set / "annotations" / "instances_val.json", ["person"]) == [1, 2, 3, 4, 5]


def test_boxes_sizes_and_overlap(synth_set: Path) -> None:
    data = json.loads((synth_set / "annotations" / "instances_train.json").read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    areas, by_image = [], {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = size[a["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
        assert a["area"] == w * h and a["iscrowd"] == 0
        areas.append(a["area"])
        by_image.setdefault(a["image_id"], []).append((x, y, x + w, y + h))
    areas = np.array(areas)
    small, medium, large = (
        (areas < 32**2).mean(),
        ((areas >= 32**2) & (areas < 96**2)).mean(),
        (areas >= 96**2).mean(),
    )
    assert small > 0.2 and medium > 0.2 and large > 0.02, (small, medium, large)
    overlapping = 0
    for boxes in by_image.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlapping += min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
    assert overlapping >= 10
    assert len({a["category_id"] for a in data["annotations"]}) == len(CLASSES)


def test_pixels_match_annotations(synth_set: Path) -> None:
    """Filled shapes show their class colour at the box centre; outside boxes the clutter is grey."""
    _check_pixels(synth_set, CLASSES)


def _check_pixels(synth_set: Path, classes) -> None:
    data = json.loads((synth_set / "annotations" / "instances_val.json").read_text())
    hits = total = 0
    for im in data["images"]:
        array = np.asarray(Image.open(synth_set / "val" / im["file_name"]).convert("RGB")).astype(np.int32)
        outside = np.ones(array.shape[:2], dtype=bool)
        for a in [a for a in data["annotations"] if a["image_id"] == im["id"]]:
            x, y, w, h = a["bbox"]
            outside[y : y + h, x : x + w] = False
            cls = classes[a["category_id"] - 1]
            if cls.hollow:
                continue
            total += 1
            cx, cy = x + w // 2, y + h // 2 if cls.shape != "semicircle" else y + (2 * h) // 3
            hits += np.abs(array[cy, cx] - np.array(COLOURS[cls.colour])).max() <= 30
        chroma = array.max(-1) - array.min(-1)
        assert (chroma[outside] < 40).mean() > 0.99
    assert hits / total > 0.85


def test_fine64_variant_has_64_fine_grained_categories(tmp_path: Path) -> None:
    out = tmp_path / "fine"
    write_synthetic(out, seed=3, train=4, val=80, variant="fine64")
    data = json.loads((out / "annotations" / "instances_val.json").read_text())
    cats = data["categories"]
    assert len(cats) == 64 == len({c["name"] for c in cats}) and data["info"]["variant"] == "fine64"
    assert cats == synth_categories("fine64")
    for cls in FINE64:
        same_colour = [o for o in FINE64 if o.colour == cls.colour and o.supercategory == cls.supercategory]
        same_shape = [o for o in FINE64 if (o.shape, o.hollow) == (cls.shape, cls.hollow)]
        assert len(same_colour) == 2 and len(same_shape) == len(COLOURS), cls
    assert max(a["category_id"] for a in data["annotations"]) > 24
    _check_pixels(out, FINE64)
    assert resolve_categories(out / "annotations" / "instances_val.json", ["person"]) == list(range(1, 17))
    default = json.loads((tmp_path / "d" / "annotations" / "instances_val.json").read_text()
                         if write_synthetic(tmp_path / "d", seed=3, train=1, val=1) else "")
    assert "variant" not in default["info"] and len(default["categories"]) == len(CLASSES)
    with pytest.raises(InputError, match="variants are"):
        write_synthetic(tmp_path / "x", variant="fine65")
    assert not (tmp_path / "x").exists()


def test_loads_as_coco_detection(synth_set: Path) -> None:
    ds = CocoDetection.from_folder(synth_set, "train", transforms=train_transforms(160), seed=0)
    assert len(ds) == 150 and ds.num_classes == len(CLASSES) + 1
    image, target = ds[0]
    assert image.shape[0] == 3 and target["labels"].min() >= 1


def test_refuses_non_empty_output_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_synthetic(out, seed=0, train=2, val=1)
    assert (out / "keep.txt").read_text() == "mine"
    write_synthetic(out, seed=0, train=2, val=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "val" / "000001.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    with pytest.raises(InputError, match="--size"):
        write_synthetic(tmp_path / "x", size=8)
    assert not (tmp_path / "x").exists()


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert (
        main(
            ["data", "synth", "--out", str(out), "--seed", "3", "--train", "4", "--val", "2", "--size", "96"]
        )
        == 0
    )
    assert "24 categories in 5 supercategories" in capsys.readouterr().out
    assert len(list((out / "train").glob("*.png"))) == 4
    assert Image.open(out / "val" / "000002.png").size == (96, 96)
    assert main(["data", "synth", "--out", str(out), "--train", "1", "--val", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    fine = tmp_path / "fine"
    assert main(["data", "synth", "--out", str(fine), "--train", "1", "--val", "1", "--variant", "fine64"]) == 0
    assert "64 categories in 4 supercategories" in capsys.readouterr().out
