"""Freeze the first stages of a detector's ResNet backbone (DETR trains its backbone from ``layer2`` on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fxq.errors import InputError

if TYPE_CHECKING:
    from torch import nn

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
_BODY = "backbone.0.body."


def freeze_backbone(model: nn.Module, through: str) -> int:
    """Stop gradients to the backbone's stem and every stage up to ``through`` (one of :data:`STAGES`); returns how
    many parameter tensors were frozen. Their BatchNorm statistics still update in training mode. InputError for an
    unknown stage or a model without fxq's ResNet backbone."""
    if through not in STAGES:
        raise InputError(f"unknown backbone stage {through!r} to freeze through; choose one of {', '.join(STAGES)}")
    prefixes = [_BODY + name + "." for name in ("conv1", "bn1")]
    prefixes += [_BODY + stage + "." for stage in STAGES[1:STAGES.index(through) + 1]]
    frozen = [p for name, p in model.named_parameters() if name.startswith(tuple(prefixes))]
    if not frozen:
        raise InputError(f"{type(model).__name__} has no parameters under {_BODY!r}: --freeze-backbone needs one of "
                         "fxq's DETR or Deformable DETR models")
    for param in frozen:
        param.requires_grad_(False)
    return len(frozen)
