"""A synthetic COCO-format detection set of coloured shapes on cluttered backgrounds, written
deterministically.

24 categories in 5 supercategories. The supercategory names (``person``, ``vehicle``, ``animal``, ``sign``,
``food``) are themed labels over shape families so that critical sets read naturally (``--critical person
sign``); the category names say what is drawn. Fine-grained pairs differ in one attribute: colour (red vs
orange circle), fill (blue square vs blue hollow square), orientation (orange triangle vs orange inverted
triangle, green cross vs green x). Object sizes span COCO's small (< 32²), medium (< 96²) and large areas;
``area`` is the box area. Objects may partly overlap (at most 35 % of the smaller box); larger ones are drawn
first. Background clutter (grey gradient, texture, lines, rings, pixel noise) is achromatic and never
annotated.

The ``fine64`` variant (issue 15's harder set) has 64 categories: every colour of :data:`COLOURS` × 8 shapes
in 4 shape-family supercategories (``person``: circle, ring; ``vehicle``: square, hollow square; ``sign``:
triangle, inverted triangle; ``animal``: cross, x). Every category has a sibling that differs in one shape
attribute (fill or orientation) and seven that differ in colour, among them near colours (red / orange /
magenta, blue / cyan / purple), so fine-grained groups are the rule rather than a few pairs.

Layout: ``annotations/instances_{train,val}.json`` and ``{train,val}/000001.png ...``; image and annotation
ids start at 1, category ids are 1..N (N = 24, or 64 for ``fine64``). The same seed and variant give
byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fxq.errors import InputError

COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 210, 25),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "cyan": (20, 190, 210),
    "purple": (125, 55, 190),
    "magenta": (225, 50, 170),
}


@dataclass(frozen=True)
class ShapeClass:
    """One synthetic category: what is drawn and how it is named."""

    name: str
    supercategory: str
    shape: str
    colour: str
    hollow: bool = False


CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("red circle", "person", "circle", "red"),
    ShapeClass("orange circle", "person", "circle", "orange"),
    ShapeClass("red ring", "person", "circle", "red", hollow=True),
    ShapeClass("blue circle", "person", "circle", "blue"),
    ShapeClass("green circle", "person", "circle", "green"),
    ShapeClass("blue square", "vehicle", "square", "blue"),
    ShapeClass("blue hollow square", "vehicle", "square", "blue", hollow=True),
    ShapeClass("yellow square", "vehicle", "square", "yellow"),
    ShapeClass("green square", "vehicle", "square", "green"),
    ShapeClass("purple bar", "vehicle", "bar", "purple"),
    ShapeClass("green cross", "animal", "cross", "green"),
    ShapeClass("green x", "animal", "x", "green"),
    ShapeClass("magenta cross", "animal", "cross", "magenta"),
    ShapeClass("yellow star", "animal", "star", "yellow"),
    ShapeClass("cyan star", "animal", "star", "cyan"),
    ShapeClass("red triangle", "sign", "triangle", "red"),
    ShapeClass("orange triangle", "sign", "triangle", "orange"),
    ShapeClass("red hollow triangle", "sign", "triangle", "red", hollow=True),
    ShapeClass("orange inverted triangle", "sign", "inverted triangle", "orange"),
    ShapeClass("blue diamond", "sign", "diamond", "blue"),
    ShapeClass("cyan hexagon", "food", "hexagon", "cyan"),
    ShapeClass("purple hexagon", "food", "hexagon", "purple"),
    ShapeClass("orange semicircle", "food", "semicircle", "orange"),
    ShapeClass("magenta semicircle", "food", "semicircle", "magenta"),
)

FINE64_SHAPES = (("circle", "circle", False, "person"), ("ring", "circle", True, "person"),
                 ("square", "square", False, "vehicle"), ("hollow square", "square", True, "vehicle"),
                 ("triangle", "triangle", False, "sign"), ("inverted triangle", "inverted triangle", False, "sign"),
                 ("cross", "cross", False, "animal"), ("x", "x", False, "animal"))
FINE64: tuple[ShapeClass, ...] = tuple(
    ShapeClass(f"{colour} {name}", supercategory, shape, colour, hollow)
    for name, shape, hollow, supercategory in FINE64_SHAPES for colour in COLOURS)
#: The category lists ``fxq data synth --variant`` writes.
VARIANTS: dict[str, tuple[ShapeClass, ...]] = {"shapes24": CLASSES, "fine64": FINE64}

ASPECT = {"bar": 2.5, "semicircle": 2.0}  # width / height; 1 otherwise
SIZE_BUCKETS = (("small", 0.4, 10, 30), ("medium", 0.4, 34, 90), ("large", 0.2, 98, 150))
MAX_COVER = 0.35  # largest share of the smaller box another box may cover
SPLITS = {"train": 1, "val": 2}  # split -> stream id of the random generator


def synth_categories(variant: str = "shapes24") -> list[dict]:
    """COCO ``categories`` of the synthetic set's ``variant`` (ids 1..N)."""
    return [
        {"id": i, "name": c.name, "supercategory": c.supercategory}
        for i, c in enumerate(variant_classes(variant), start=1)
    ]


def variant_classes(variant: str) -> tuple[ShapeClass, ...]:
    """The categories of ``variant``; InputError naming the known variants."""
    if variant not in VARIANTS:
        raise InputError(f"synthetic variant {variant!r} is unknown; the variants are {sorted(VARIANTS)}")
    return VARIANTS[variant]


def write_synthetic(
    out: str | os.PathLike,
    seed: int = 0,
    train: int = 1000,
    val: int = 200,
    size: int = 160,
    max_objects: int = 6,
    overwrite: bool = False,
    variant: str = "shapes24",
) -> dict[str, Path]:
    """Write the synthetic set to ``out``; returns ``{split: annotation file}``.

    The folder appears complete or not at all (built beside it, then renamed). An existing non-empty ``out``
    is replaced only with ``overwrite=True``.
    """
    out = Path(out)
    variant_classes(variant)
    _check_args(out, seed, train, val, size, max_objects, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, count in (("train", train), ("val", val)):
            write_split(staging, split, seed, count, size, max_objects, variant)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {split: out / "annotations" / f"instances_{split}.json" for split in ("train", "val")}


def write_split(root: Path, split: str, seed: int, count: int, size: int, max_objects: int = 6,
                variant: str = "shapes24") -> Path:
    """Write ``count`` images of ``split`` under ``root`` and their annotation file; returns the file."""
    classes = variant_classes(variant)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        rng = np.random.default_rng([int(seed), SPLITS[split], image_id])
        image, objects = render_image(rng, size, max_objects, classes)
        file_name = f"{image_id:06d}.png"
        image.save(root / split / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category_id, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x0, y0, w, h],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
    info = {"description": "fxq synthetic shapes", "version": "1", "seed": int(seed), "split": split}
    if variant != "shapes24":  # the default set's files stay byte-identical to those written before variants
        info["variant"] = variant
    data = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": synth_categories(variant),
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return path


def render_image(rng: np.random.Generator, size: int, max_objects: int = 6,
                 classes: tuple[ShapeClass, ...] = CLASSES) -> tuple[Image.Image, list]:
    """One RGB image and its objects ``[(category_id, (x0, y0, x1, y1)), ...]`` (x1, y1 exclusive)."""
    image = Image.fromarray(_background(rng, size))
    placed = _place_objects(rng, size, max_objects, classes)
    objects = []
    for category_id, box in sorted(placed, key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1])):
        cls = classes[category_id - 1]
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), cls, box)
        bbox = mask.getbbox()
        if bbox is None:
            continue
        colour = np.clip(np.array(COLOURS[cls.colour]) + rng.integers(-12, 13, size=3), 0, 255)
        image.paste(tuple(int(c) for c in colour), (0, 0, size, size), mask)
        objects.append((category_id, tuple(int(v) for v in bbox)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 4.0, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Achromatic clutter: gradient, blurred texture, lines and rings."""
    base = rng.uniform(85, 175)
    ramp = np.linspace(-1.0, 1.0, size)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0, 30) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    coarse = rng.normal(0, 1, size=(max(2, size // 16),) * 2).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    grey = np.clip(base + gradient + rng.uniform(4, 14) * texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        level = int(np.clip(base + rng.choice([-1, 1]) * rng.uniform(30, 70), 0, 255))
        xy = [float(v) for v in rng.uniform(-0.1 * size, 1.1 * size, size=4)]
        draw.line(xy, fill=(level,) * 3, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 3))):
        level = int(np.clip(base + rng.choice([-1, 1]) * rng.uniform(25, 50), 0, 255))
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, size / 5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(level,) * 3, width=1)
    return np.asarray(image.filter(ImageFilter.SMOOTH))


def _place_objects(rng: np.random.Generator, size: int, max_objects: int,
                   classes: tuple[ShapeClass, ...]) -> list[tuple[int, tuple]]:
    """Random categories and boxes, each box overlapping any other by at most MAX_COVER of the smaller one."""
    count = int(rng.integers(1, max_objects + 1))
    boxes: list[tuple[int, tuple]] = []
    for _ in range(count):
        category_id = int(rng.integers(1, len(classes) + 1))
        aspect = ASPECT.get(classes[category_id - 1].shape, 1.0)
        for _attempt in range(20):
            side = _side(rng, size)
            w = min(size - 2.0, side * math.sqrt(aspect))
            h = min(size - 2.0, side / math.sqrt(aspect))
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_cover(box, other) <= MAX_COVER for _, other in boxes):
                boxes.append((category_id, box))
                break
    return boxes


def _side(rng: np.random.Generator, size: int) -> float:
    """Square root of the box area, from COCO's small/medium/large buckets that fit the image."""
    buckets = [(p, lo, min(hi, 0.85 * size)) for _, p, lo, hi in SIZE_BUCKETS if lo <= 0.85 * size]
    probs = np.array([b[0] for b in buckets]) / sum(b[0] for b in buckets)
    _, lo, hi = buckets[int(rng.choice(len(buckets), p=probs))]
    return float(rng.uniform(lo, hi))


def _cover(a: tuple, b: tuple) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _draw_shape(draw: ImageDraw.ImageDraw, cls: ShapeClass, box: tuple) -> None:
    """Draw ``cls`` filling ``box`` (x0, y0, x1, y1) on a mask with value 255."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    stroke = max(2, round(min(w, h) * 0.15))
    fill, outline = (None, 255) if cls.hollow else (255, None)
    if cls.shape in ("circle",):
        draw.ellipse(box, fill=fill, outline=outline, width=stroke)
    elif cls.shape in ("square", "bar"):
        draw.rectangle(box, fill=fill, outline=outline, width=stroke)
    elif cls.shape == "semicircle":
        draw.pieslice((x0, y0, x1, y0 + 2 * h), 180, 360, fill=255)
    elif cls.shape == "cross":
        t = max(2.0, 0.3 * w)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=255)
        draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=255)
    elif cls.shape == "x":
        t = max(2.0, 0.22 * w)
        draw.polygon([(x0, y0 + t), (x0 + t, y0), (x1, y1 - t), (x1 - t, y1)], fill=255)
        draw.polygon([(x1 - t, y0), (x1, y0 + t), (x0 + t, y1), (x0, y1 - t)], fill=255)
    else:
        points = _polygon(cls.shape, x0, y0, x1, y1)
        if cls.hollow:
            draw.polygon(points, outline=255, width=stroke)
        else:
            draw.polygon(points, fill=255)


def _polygon(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "triangle":
        return [(x0, y1), (x1, y1), (cx, y0)]
    if shape == "inverted triangle":
        return [(x0, y0), (x1, y0), (cx, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
    if shape == "star":
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
        angles = [-np.pi / 2 + k * np.pi / 5 for k in range(10)]
        return [
            (cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)) for r, a in zip(radii, angles, strict=True)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _check_args(
    out: Path, seed: int, train: int, val: int, size: int, max_objects: int, overwrite: bool
) -> None:
    if train < 1 or val < 1:
        raise InputError(f"--train and --val must be at least 1 (got {train}, {val})")
    if not 64 <= size <= 1024:
        raise InputError(f"--size must lie in 64..1024 pixels (got {size})")
    if max_objects < 1:
        raise InputError(f"max_objects must be at least 1 (got {max_objects})")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer (got {seed})")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty: choose another --out or pass --overwrite")


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``, replacing an old ``out`` once all is written."""
    os.chmod(staging, 0o755)
    if not out.exists():
        os.replace(staging, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / "old")
    os.replace(staging, out)
    shutil.rmtree(trash, ignore_errors=True)
