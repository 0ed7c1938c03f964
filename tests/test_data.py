"""COCO data set, transforms, padding collate and category groups (fxq.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fxq.data import (
    CocoDetection,
    Compose,
    Normalize,
    PadCollate,
    RandomHorizontalFlip,
    RandomSizeCrop,
    Resize,
    collate,
    eval_transforms,
    find_split,
    resolve_categories,
    train_transforms,
)
from fxq.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop, hflip, resized_shape
from fxq.errors import InputError
from fxq.objectives import box_cxcywh_to_xyxy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
FIXTURE = DATA / "coco-val2017-fixture"
SUBSET = DATA / "coco-val2017-subset158"
INSTANCES = FIXTURE / "annotations" / "instances_val2017.json"
PANOPTIC = FIXTURE / "annotations" / "panoptic_val2017.json"

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared COCO fixture not present")


def _check_item(
    image: torch.Tensor, target: dict, info: dict, n_boxes: int | None, cat_ids: set[int]
) -> None:
    assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
    assert target["size"].tolist() == list(image.shape[-2:])
    assert target["orig_size"].tolist() == [info["height"], info["width"]]
    assert target["orig_size"].dtype == torch.int64 and target["size"].dtype == torch.int64
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert boxes.shape == (len(labels), 4)
    if n_boxes is not None:
        assert len(labels) == n_boxes
    xyxy = box_cxcywh_to_xyxy(boxes)
    assert torch.all(xyxy >= -1e-5) and torch.all(xyxy <= 1 + 1e-5), "boxes leave the image"
    assert torch.all(boxes[:, 2:] > 0)
    assert set(labels.tolist()) <= cat_ids
    assert torch.all(target["iscrowd"] == 0)


@pytest.mark.parametrize("root", [FIXTURE, SUBSET], ids=["fixture", "subset158"])
def test_loads_every_image_eval(root: Path) -> None:
    ds = CocoDetection.from_folder(root, transforms=eval_transforms(192))
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert len(ds) == len(data["images"])
    infos = {im["id"]: im for im in data["images"]}
    non_crowd = {}
    for ann in data["annotations"]:
        if not ann["iscrowd"] and ann["bbox"][2] > 0 and ann["bbox"][3] > 0:
            non_crowd[ann["image_id"]] = non_crowd.get(ann["image_id"], 0) + 1
    cat_ids = {c["id"] for c in data["categories"]}
    for i in range(len(ds)):
        image, target = ds[i]
        info = infos[target["image_id"]]
        _check_item(image, target, info, non_crowd.get(info["id"], 0), cat_ids)
        short, long = sorted(image.shape[-2:])
        assert long <= 320 and (short == 192 or long >= 316)
    assert ds.num_classes == 91


def test_training_transforms_keep_boxes_inside() -> None:
    ds = CocoDetection.from_folder(SUBSET, transforms=train_transforms(160), seed=3)
    infos = {im["id"]: im for im in ds.coco.dataset["images"]}
    cat_ids = set(ds.coco.cats)
    for i in range(0, len(ds), 2):
        image, target = ds[i]
        _check_item(image, target, infos[target["image_id"]], None, cat_ids)
        assert max(image.shape[-2:]) <= round(160 * 1333 / 800)


def test_augmentation_is_seeded_per_item_and_epoch() -> None:
    def item(seed: int, epoch: int, index: int):
        ds = CocoDetection.from_folder(FIXTURE, transforms=train_transforms(128), seed=seed)
        ds.set_epoch(epoch)
        return ds[index]

    a, b = item(0, 0, 3), item(0, 0, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    others = [item(0, e, 3) for e in (1, 2, 3)] + [item(1, 0, 3)]
    assert any(o[0].shape != a[0].shape or not torch.equal(o[0], a[0]) for o in others)


# --- transforms against an independent computation: boxes of coloured rectangles found in the pixels ---

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _painted(seed: int, width: int = 120, height: int = 90) -> tuple[Image.Image, dict]:
    """Black image with non-overlapping solid rectangles; label i has colour COLOURS[i]."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    boxes = []
    for i in range(len(COLOURS)):
        col, row = i % 3, i // 3
        cw, ch = width // 3, height // 2
        w, h = int(rng.integers(6, cw - 2)), int(rng.integers(6, ch - 2))
        x0, y0 = col * cw + int(rng.integers(0, cw - w)), row * ch + int(rng.integers(0, ch - h))
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=COLOURS[i])
        boxes.append([x0, y0, x0 + w, y0 + h])
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.arange(len(COLOURS)),
        "area": torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=torch.float32),
        "iscrowd": torch.zeros(len(COLOURS), dtype=torch.int64),
        "image_id": 1,
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }
    return image, target


def _pixel_box(array: np.ndarray, colour: tuple, tol: float = 60) -> list[int] | None:
    """Bounding box (x0, y0, x1, y1), x1/y1 exclusive, of the pixels close to ``colour``."""
    close = np.abs(array.astype(np.float32) - np.array(colour, dtype=np.float32)).max(-1) < tol
    ys, xs = np.nonzero(close)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_hflip_matches_pixels() -> None:
    image, target = _painted(0)
    flipped, out = hflip(image, target)
    array = np.asarray(flipped)
    for label, box in zip(out["labels"].tolist(), out["boxes"].tolist(), strict=True):
        assert _pixel_box(array, COLOURS[label]) == [round(v) for v in box]


@pytest.mark.parametrize("seed", range(6))
def test_crop_matches_pixels_and_drops_empty_boxes(seed: int) -> None:
    image, target = _painted(seed)
    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(20, 80)), int(rng.integers(20, 110))
    top, left = int(rng.integers(0, 90 - h)), int(rng.integers(0, 120 - w))
    cropped, out = crop(image, target, top, left, h, w)
    assert cropped.size == (w, h) and out["size"].tolist() == [h, w]
    array = np.asarray(cropped)
    kept = dict(zip(out["labels"].tolist(), out["boxes"].tolist(), strict=True))
    for label, colour in enumerate(COLOURS):
        found = _pixel_box(array, colour)
        if label in kept:
            assert found == [round(v) for v in kept[label]]
            x0, y0, x1, y1 = kept[label]
            assert out["area"][list(kept).index(label)] == pytest.approx((x1 - x0) * (y1 - y0))
        else:
            assert found is None, f"label {label} visible in the crop but dropped from the target"


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_matches_pixels(seed: int) -> None:
    image, target = _painted(seed, 200, 150)
    pipeline = train_transforms(size=96)
    tensor, out = pipeline(image, target, torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    array = ((tensor * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    h, w = tensor.shape[-2:]
    boxes = box_cxcywh_to_xyxy(out["boxes"]) * torch.tensor([w, h, w, h])
    for label, box in zip(out["labels"].tolist(), boxes.tolist(), strict=True):
        found = _pixel_box(array, COLOURS[label], tol=100)
        if found is None:  # a sliver thinner than a pixel after downscaling
            assert min(box[2] - box[0], box[3] - box[1]) < 2.5
            continue
        assert np.allclose(found, box, atol=2.0), (label, found, box)


def test_resize_keeps_aspect_and_caps_longer_side() -> None:
    assert resized_shape(640, 480, 800, 1333) == (800, 1066)
    assert resized_shape(640, 200, 800, 1333) == (416, 1331)  # DETR's rounding gives 1334 > 1333
    assert resized_shape(100, 200, 50) == (100, 50)
    image, target = _painted(1)
    out_image, out = Resize(60)(image, target)
    assert out_image.size == (80, 60)
    assert torch.allclose(out["boxes"], target["boxes"] * 60 / 90)
    assert torch.allclose(out["area"], target["area"] * (60 / 90) ** 2)


def test_flip_probability_uses_the_generator() -> None:
    image, target = _painted(2)
    flip = RandomHorizontalFlip(0.5)
    flips = [
        not torch.equal(flip(image, target, torch.Generator().manual_seed(s))[1]["boxes"], target["boxes"])
        for s in range(40)
    ]
    assert 5 < sum(flips) < 35
    crop_t = Compose([RandomSizeCrop(20, 60), Normalize()])
    a = crop_t(image, target, torch.Generator().manual_seed(7))
    b = crop_t(image, target, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0])


# --- image modes, errors ---


def _write_set(root: Path, modes: list[str], annotations: list[dict] | None = None) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images = []
    for i, mode in enumerate(modes, start=1):
        Image.new(mode, (40, 30)).save(root / "val" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 30})
    anns = (
        annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
        ]
    )
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "thing", "supercategory": "x"}],
    }
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps(data))
    return path


def test_grey_rgba_palette_images_become_rgb(tmp_path: Path) -> None:
    _write_set(tmp_path, ["L", "RGBA", "P", "RGB"])
    ds = CocoDetection.from_folder(tmp_path)
    for i in range(4):
        image, target = ds[i]
        assert image.shape == (3, 30, 40)
    assert ds[0][1]["labels"].tolist() == [3], "crowd box must be dropped"
    assert torch.allclose(ds[0][1]["boxes"], torch.tensor([[0.25, 10 / 30, 0.25, 1 / 3]]))
    assert ds.num_classes == 4


def test_missing_image_names_file_and_annotations(tmp_path: Path) -> None:
    ann = _write_set(tmp_path, ["RGB", "RGB"])
    (tmp_path / "val" / "2.png").unlink()
    with pytest.raises(InputError, match=r"2\.png.*instances_val\.json"):
        CocoDetection(tmp_path / "val", ann)


def test_unknown_category_names_annotation_and_category(tmp_path: Path) -> None:
    bad = [{"id": 17, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    ann = _write_set(tmp_path, ["RGB"], bad)
    with pytest.raises(InputError, match=r"annotation 17 .*category_id 99"):
        CocoDetection(tmp_path / "val", ann)


def test_empty_and_wrong_files(tmp_path: Path) -> None:
    ann = _write_set(tmp_path / "a", [], [])
    with pytest.raises(InputError, match="no images"):
        CocoDetection(tmp_path / "a" / "val", ann)
    with pytest.raises(InputError, match="panoptic"):
        CocoDetection(FIXTURE / "val2017", PANOPTIC)
    with pytest.raises(InputError, match="does not exist"):
        CocoDetection(FIXTURE / "val2017", tmp_path / "nope.json")
    with pytest.raises(InputError, match="available splits"):
        find_split(FIXTURE, "train2017")


# --- collate ---


def test_collate_pads_and_masks() -> None:
    sizes = [(20, 30), (25, 10), (7, 33)]
    batch = [(torch.rand(3, h, w) + 1, {"i": i}) for i, (h, w) in enumerate(sizes)]
    images, mask, targets = collate(batch)
    assert images.shape == (3, 3, 25, 33) and mask.shape == (3, 25, 33) and mask.dtype == torch.bool
    assert [t["i"] for t in targets] == [0, 1, 2]
    for i, (h, w) in enumerate(sizes):
        expected = torch.ones(25, 33, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(mask[i], expected)
        assert torch.equal(images[i, :, :h, :w], batch[i][0])
        assert torch.all(images[i][:, mask[i]] == 0)
    images, mask, _ = PadCollate(32)(batch)
    assert images.shape[-2:] == (32, 64) and mask[:, 25:, :].all() and mask[:, :, 33:].all()


def test_dataloader_batches_real_images() -> None:
    ds = CocoDetection.from_folder(FIXTURE, transforms=eval_transforms(128))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    images, mask, targets = next(iter(loader))
    for i, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert not mask[i, :h, :w].any() and mask[i].sum() == mask.shape[1] * mask.shape[2] - h * w


# --- category groups ---


def test_resolve_names_ids_supercategories_instances() -> None:
    assert resolve_categories(INSTANCES, ["person", "vehicle"]) == list(range(1, 10))
    assert resolve_categories(INSTANCES, ["Dog", 1, "3"]) == [1, 3, 18]
    data = json.loads(INSTANCES.read_text())
    animals = sorted(c["id"] for c in data["categories"] if c["supercategory"] == "animal")
    assert resolve_categories(INSTANCES, ["animal"]) == animals


def test_resolve_panoptic_including_stuff() -> None:
    data = json.loads(PANOPTIC.read_text())
    walls = sorted(c["id"] for c in data["categories"] if c["supercategory"] == "wall")
    assert len(walls) >= 2
    assert resolve_categories(PANOPTIC, ["wall"]) == walls
    assert resolve_categories(PANOPTIC, ["sky-other-merged", "person"]) == sorted(
        [1] + [c["id"] for c in data["categories"] if c["name"] == "sky-other-merged"]
    )


def test_unknown_category_suggests_close_names() -> None:
    with pytest.raises(InputError, match=r"'persn'.*did you mean 'person'"):
        resolve_categories(INSTANCES, ["persn"])
    with pytest.raises(InputError, match=r"'vehicel'.*'vehicle'"):
        resolve_categories(PANOPTIC, ["vehicel"])
    with pytest.raises(InputError, match="category id 12 is not in"):
        resolve_categories(INSTANCES, [12])
