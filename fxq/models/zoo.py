"""The named model configurations of fxq and their constructors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fxq.models.detr import DETR

TINY_DETR = dict(backbone_name="resnet18", dilation=True, base_width=24, hidden_dim=128, nheads=4, enc_layers=2,
                 dec_layers=3, dim_feedforward=512, num_queries=16, num_classes=25, backbone_norm="bn",
                 head="sigmoid")
TINY_DEFORMABLE = dict(backbone_name="resnet18", base_width=24, hidden_dim=128, nheads=4, enc_layers=2,
                       dec_layers=3, dim_feedforward=512, num_queries=40, num_classes=25, num_feature_levels=3,
                       with_box_refine=True, backbone_norm="bn")

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "detr_r50": ("detr", {}),
    "detr_r50_dc5": ("detr", {"dilation": True}),
    "detr_r101": ("detr", {"backbone_name": "resnet101"}),
    "detr_tiny": ("detr", TINY_DETR),
    "deformable_detr_r50": ("deformable_detr", {}),
    "deformable_detr_r50_box_refine": ("deformable_detr", {"with_box_refine": True}),
    "deformable_detr_r50_two_stage": ("deformable_detr", {"with_box_refine": True, "two_stage": True}),
    "deformable_detr_tiny": ("deformable_detr", TINY_DEFORMABLE),
    # issue 15's harder synthetic set: fxq data synth --variant fine64 (64 categories, ids 1..64)
    "deformable_detr_tiny_fine64": ("deformable_detr", {**TINY_DEFORMABLE, "num_classes": 65}),
}


def _deformable_detr(**kwargs: Any) -> nn.Module:
    from fxq.models.deformable_detr import DeformableDETR

    return DeformableDETR(**kwargs)


FAMILIES: dict[str, Callable[..., nn.Module]] = {"detr": DETR, "deformable_detr": _deformable_detr}


def model_names() -> list[str]:
    """Every name :func:`fxq.models.build` accepts."""
    return sorted(CONFIGS)


def config_of(name: str) -> tuple[str, dict[str, Any]]:
    """(family, constructor keywords) of a named model; unknown names raise InputError listing the known ones."""
    from fxq.errors import InputError

    if name not in CONFIGS:
        import difflib

        close = difflib.get_close_matches(name, CONFIGS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown model {name!r}.{hint} Known models: {', '.join(model_names())}.")
    family, kwargs = CONFIGS[name]
    return family, dict(kwargs)


def construct(name: str, **overrides: Any) -> nn.Module:
    """A randomly initialised model of the named configuration, with keyword overrides."""
    family, kwargs = config_of(name)
    kwargs.update(overrides)
    return FAMILIES[family](**kwargs)
