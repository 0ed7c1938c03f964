"""Data: COCO-format detection sets, DETR transforms, padding collate, category groups, the synthetic set."""

from fxq.data.categories import category_names, load_categories, resolve_categories
from fxq.data.coco import CocoDetection, coco_from_dict, find_split, load_coco
from fxq.data.collate import PadCollate, collate, pad_images
from fxq.data.synth import synth_categories, write_synthetic
from fxq.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    Resize,
    eval_transforms,
    train_transforms,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CocoDetection",
    "Compose",
    "Normalize",
    "PadCollate",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "Resize",
    "category_names",
    "coco_from_dict",
    "collate",
    "eval_transforms",
    "find_split",
    "load_categories",
    "load_coco",
    "pad_images",
    "resolve_categories",
    "synth_categories",
    "train_transforms",
    "write_synthetic",
]
