"""Detection transforms that move boxes with the image (facebookresearch/detr's recipe, scaled to any size).

Every transform is called as ``t(image, target, generator) -> (image, target)``. Until :class:`Normalize`,
``image`` is a PIL image and ``target["boxes"]`` holds absolute (x0, y0, x1, y1) pixels of the current image;
:class:`Normalize` turns the image into an ImageNet-normalised float tensor and the boxes into (cx, cy, w, h)
relative to the image's width and height. Random choices draw only from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fxq.objectives.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict
Transform = Callable[[Image.Image, Target, torch.Generator | None], tuple]


def resized_shape(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) with the shorter side at ``size`` unless the longer side would pass ``max_size``.

    As facebookresearch/detr's ``get_size_with_aspect_ratio``, except that the capped shorter side is rounded
    down rather than to nearest, so the longer side never exceeds ``max_size`` (DETR's can by one pixel).
    """
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(max_size * short / long)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator).item())


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


class Compose:
    """Apply transforms in order, sharing one generator."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Resize:
    """Aspect-preserving resize: shorter side to ``size``, longer side at most ``max_size``."""

    def __init__(self, size: int, max_size: int | None = None):
        self.size, self.max_size = size, max_size

    def __call__(self, image: Image.Image, target: Target, generator: torch.Generator | None = None):
        return resize(image, target, self.size, self.max_size)

    def __repr__(self) -> str:
        return f"Resize({self.size}, max_size={self.max_size})"


def resize(image: Image.Image, target: Target, size: int, max_size: int | None = None):
    """Resize ``image`` (bilinear) and scale its boxes and areas."""
    h, w = resized_shape(image.width, image.height, size, max_size)
    rw, rh = w / image.width, h / image.height
    out = image.resize((w, h), Image.BILINEAR) if (w, h) != image.size else image
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([h, w], dtype=torch.int64)
    return out, target


class RandomResize:
    """Resize with the shorter side drawn uniformly from ``sizes``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image: Image.Image, target: Target, generator: torch.Generator | None = None):
        size = self.sizes[_randint(0, len(self.sizes) - 1, generator)]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize({self.sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, target: Target, generator: torch.Generator | None = None):
        if _rand(generator) >= self.p:
            return image, target
        return hflip(image, target)


def hflip(image: Image.Image, target: Target):
    """Mirror ``image`` left-right and its boxes with it."""
    w = image.width
    target = dict(target)
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    target["boxes"] = torch.stack([w - x1, y0, w - x0, y1], dim=-1)
    return image.transpose(Image.FLIP_LEFT_RIGHT), target


class RandomSizeCrop:
    """Crop a region whose width and height are drawn from [min_size, max_size] at a random position."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Image.Image, target: Target, generator: torch.Generator | None = None):
        W, H = image.size
        w = _randint(min(self.min_size, W), min(W, self.max_size), generator)
        h = _randint(min(self.min_size, H), min(H, self.max_size), generator)
        top, left = _randint(0, H - h, generator), _randint(0, W - w, generator)
        return crop(image, target, top, left, h, w)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int):
    """Cut the region out of ``image``; boxes are clipped to it and those left empty are dropped."""
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.minimum(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32))
    boxes = boxes.clamp(min=0)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    wh = boxes[:, 1, :] - boxes[:, 0, :]
    target["boxes"] = boxes.reshape(-1, 4)[keep]
    if "area" in target:
        target["area"] = (wh[:, 0] * wh[:, 1])[keep]
    for key in ("labels", "iscrowd"):
        if key in target:
            target[key] = target[key][keep]
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image.crop((left, top, left + width, top + height)), target


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Image.Image, target: Target, generator: torch.Generator | None = None):
        chosen = self.first if _rand(generator) < self.p else self.second
        return chosen(image, target, generator)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first}, {self.second}, p={self.p})"


class Normalize:
    """PIL image -> ImageNet-normalised float tensor [3, H, W]; boxes -> (cx, cy, w, h) in [0, 1]."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image: Image.Image, target: Target, generator: torch.Generator | None = None):
        # numpy, not torch: small torch ops were 15x slower here (thread hand-off on a busy 2-core CPU)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
        array = (pixels - self.mean) / self.std
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        h, w = tensor.shape[-2:]
        target = dict(target)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        target["boxes"] = (box_xyxy_to_cxcywh(target["boxes"]) / scale).to(torch.float32)
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        return tensor, target

    def __repr__(self) -> str:
        return "Normalize()"


def default_scales(size: int) -> list[int]:
    """DETR's training scales (480..800 step 32 at size 800), in proportion for any size."""
    return sorted({int(round(size * f)) for f in np.linspace(0.6, 1.0, 11)})


def default_max_size(size: int) -> int:
    """DETR's longer-side cap (1333 at size 800), in proportion."""
    return int(round(size * 1333 / 800))


def train_transforms(size: int = 800, max_size: int | None = None, flip_p: float = 0.5) -> Compose:
    """DETR's training augmentation at any scale: flip, then either a multi-scale resize or a random crop
    followed by a multi-scale resize (at size 800: resize 400/500/600, crop 384..600, resize 480..800)."""
    max_size = default_max_size(size) if max_size is None else max_size
    scales = default_scales(size)
    pre = [int(round(size * f)) for f in (0.5, 0.625, 0.75)]
    crop_step = Compose(
        [
            RandomResize(pre),
            RandomSizeCrop(int(round(size * 0.48)), int(round(size * 0.75))),
            RandomResize(scales, max_size),
        ]
    )
    return Compose(
        [
            RandomHorizontalFlip(flip_p),
            RandomSelect(RandomResize(scales, max_size), crop_step),
            Normalize(),
        ]
    )


def eval_transforms(size: int | None = 800, max_size: int | None = None) -> Compose:
    """Deterministic evaluation pipeline: aspect-preserving resize (none if ``size`` is None), normalise."""
    if size is None:
        return Compose([Normalize()])
    max_size = default_max_size(size) if max_size is None else max_size
    return Compose([Resize(size, max_size), Normalize()])
