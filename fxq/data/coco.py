"""Detection data set over a standard COCO folder (``annotations/instances_<split>.json`` + ``<split>/``
images).

Items are ``(image [3, H, W] float, target)`` with facebookresearch/detr's target dict: ``boxes`` (cx, cy, w,
h) relative to the transformed image, ``labels`` = COCO category ids, ``image_id``, ``orig_size`` and ``size``
(h, w), ``area``, ``iscrowd``. Crowd annotations are left out of the targets (the evaluation reads them from
the annotation file through pycocotools). Augmentation is seeded per item from ``(seed, epoch, index)``, so an
item looks the same whatever worker or order loads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from fxq.data.transforms import Compose, eval_transforms
from fxq.errors import InputError

PathLike = str | os.PathLike


def load_coco(ann_file: PathLike) -> COCO:
    """A pycocotools ``COCO`` index of an instances file, without its prints; malformed files raise
    InputError.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise InputError(f"annotation file {path} does not exist: pass a COCO instances_*.json")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"annotation file {path} is not valid JSON ({exc}): re-create or re-download it"
        ) from exc
    return coco_from_dict(data, str(path))


def coco_from_dict(data: dict, name: str = "the annotation set") -> COCO:
    """A pycocotools ``COCO`` index of an in-memory instances dict, checked for the keys detection needs."""
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise InputError(f"{name} lacks 'images' or 'categories': pass a COCO instances_*.json")
    anns = data.setdefault("annotations", [])
    if anns and "segments_info" in anns[0]:
        raise InputError(f"{name} is a panoptic file: pass the instances_*.json of the same split")
    for ann in anns:
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        if missing:
            raise InputError(
                f"{name}: annotation {ann.get('id', '?')} lacks {missing}: fix or regenerate the file"
            )
        _check_bbox(ann, name)
    data["annotations"] = _drop_empty_boxes(anns, name)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_bbox(ann: dict, name: str) -> None:
    bbox = ann["bbox"]
    numbers = isinstance(bbox, list | tuple) and len(bbox) == 4 and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    if not numbers or not all(math.isfinite(v) for v in bbox):
        raise InputError(
            f"{name}: annotation {ann['id']} has bbox {bbox!r}; a bbox is 4 finite numbers [x, y, width, height]: "
            "fix or regenerate the file"
        )


def _drop_empty_boxes(anns: list[dict], name: str) -> list[dict]:
    """The annotations whose box has width and height > 0; a warning counts the others (they are dropped from
    training targets and from the ground truth of evaluation alike)."""
    kept = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
    dropped = [a for a in anns if not (a["bbox"][2] > 0 and a["bbox"][3] > 0)]
    if dropped:
        first = dropped[0]
        warnings.warn(
            f"{name}: dropped {len(dropped)} of {len(anns)} annotations whose box has width or height <= 0 "
            f"(first: annotation {first['id']}, bbox {first['bbox']}); fix them to keep them",
            UserWarning, stacklevel=3,
        )
    return kept


def find_split(root: PathLike, split: str | None = None) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of a split of a COCO folder; with no split, ``val2017``, ``val`` or
    the only ``instances_*.json`` there."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise InputError(f"data folder {root} {what}: pass a COCO folder (annotations/ + image folders), "
                         "e.g. one written by `fxq data synth --out DIR`")
    ann_dir = root / "annotations"
    available = sorted(p.name[len("instances_") : -len(".json")] for p in ann_dir.glob("instances_*.json"))
    if split is None:
        preferred = [s for s in ("val2017", "val") if s in available]
        if preferred:
            split = preferred[0]
        elif len(available) == 1:
            split = available[0]
        else:
            raise InputError(
                f"{root} has splits {available or 'none'} under annotations/: choose one with --split"
                if available
                else f"{ann_dir} holds no instances_*.json: pass a COCO folder (annotations/ + image folder)"
            )
    ann_file, image_dir = ann_dir / f"instances_{split}.json", root / split
    if not ann_file.is_file():
        raise InputError(f"{ann_file} does not exist: available splits under {ann_dir} are {available}")
    if not image_dir.is_dir():
        raise InputError(
            f"image folder {image_dir} for split {split!r} does not exist: check the COCO folder layout"
        )
    return ann_file, image_dir


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection set; ``transforms`` defaults to normalisation only (original size)."""

    def __init__(
        self,
        image_dir: PathLike,
        ann_file: PathLike,
        transforms: Compose | None = None,
        seed: int = 0,
    ):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.coco = load_coco(self.ann_file)
        self.ids = sorted(self.coco.imgs)
        self.transforms = transforms if transforms is not None else eval_transforms(None)
        self.seed, self.epoch = int(seed), 0
        self._check()

    @classmethod
    def from_folder(
        cls, root: PathLike, split: str | None = None, transforms: Compose | None = None, seed: int = 0
    ) -> CocoDetection:
        """The data set of ``split`` in a standard COCO folder (see :func:`find_split`)."""
        ann_file, image_dir = find_split(root, split)
        return cls(image_dir, ann_file, transforms=transforms, seed=seed)

    @property
    def categories(self) -> list[dict]:
        """The annotation file's categories, sorted by id."""
        return [self.coco.cats[k] for k in sorted(self.coco.cats)]

    @property
    def num_classes(self) -> int:
        """DETR's class count: largest category id + 1 (91 for COCO)."""
        return max(self.coco.cats) + 1

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.load(index)
        generator = torch.Generator().manual_seed(self._item_seed(index))
        return self.transforms(image, target, generator)

    def load(self, index: int) -> tuple[Image.Image, dict]:
        """The untransformed RGB image and its target with absolute (x0, y0, x1, y1) boxes."""
        image_id = self.ids[index]
        image = read_image(self.image_dir / self.coco.imgs[image_id]["file_name"])
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        return image, _target(anns, image_id, image.width, image.height)

    def verify_images(self, skip: bool = False) -> int:
        """Decode every image; a bad one raises InputError naming it, or with ``skip`` is left out of the set.
        Returns how many were left out."""
        bad = []
        for image_id in self.ids:
            try:
                read_image(self.image_dir / self.coco.imgs[image_id]["file_name"])
            except InputError:
                if not skip:
                    raise
                bad.append(image_id)
        if len(bad) == len(self.ids):
            raise InputError(f"none of the {len(bad)} images of {self.ann_file} could be decoded: check the "
                             "image folder")
        dropped = set(bad)
        self.ids = [i for i in self.ids if i not in dropped]
        return len(bad)

    def _item_seed(self, index: int) -> int:
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        return int(state[0]) << 31 | int(state[1]) >> 1

    def _check(self) -> None:
        if not self.ids:
            raise InputError(f"{self.ann_file} lists no images: pass a non-empty annotation file")
        for ann in self.coco.dataset["annotations"]:
            if ann["category_id"] not in self.coco.cats:
                raise InputError(
                    f"{self.ann_file}: annotation {ann['id']} has category_id {ann['category_id']}, "
                    "which is not in its 'categories': add the category or fix the annotation"
                )
            if ann["image_id"] not in self.coco.imgs:
                raise InputError(
                    f"{self.ann_file}: annotation {ann['id']} refers to image_id {ann['image_id']}, "
                    "which is not in its 'images': add the image or drop the annotation"
                )
        for image_id in self.ids:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if not path.is_file():
                raise InputError(
                    f"image file {path} (image_id {image_id} in {self.ann_file}) does not exist: "
                    "point the image folder at the split's images"
                )


def read_image(path: Path) -> Image.Image:
    """The decoded RGB image at ``path``; a file that is not a readable image raises InputError naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"image {path} cannot be decoded ({type(exc).__name__}: {exc}): replace or remove it, or pass "
            "--skip-bad-images to leave such images out"
        ) from None


def _target(anns: list[dict], image_id: int, width: int, height: int) -> dict:
    """DETR's ConvertCocoPolysToMask for boxes: xywh -> clipped xyxy, empty boxes dropped."""
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    size = torch.tensor([height, width], dtype=torch.int64)
    return {
        "boxes": boxes[keep],
        "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
        "image_id": int(image_id),
        "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)[keep],
        "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)[keep],
        "orig_size": size,
        "size": size.clone(),
    }
