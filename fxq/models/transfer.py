"""A detector's backbone transferred from another trained detector (the role ImageNet weights play for DETR),
and its first stages frozen (DETR trains its backbone from ``layer2`` on)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from fxq.errors import InputError
from fxq.models.checkpoint import read_state_dict
from fxq.models.embedded import embedded_weights
from fxq.models.zoo import CONFIGS

BACKBONE_PREFIX = "backbone.0."
#: The ResNet stages of a detector's backbone, in order (``stem``: conv1 and bn1).
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
_BODY = BACKBONE_PREFIX + "body."


def source_state(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict behind ``source``: a zoo name's embedded weights or a checkpoint file (InputError when
    neither)."""
    if isinstance(source, str) and source in CONFIGS:
        path = embedded_weights(source)
        if path is None:
            raise InputError(f"model {source!r} has no embedded weights to take a backbone from; pass a checkpoint "
                             "file (e.g. a finished run's model.pt) instead")
        return read_state_dict(path)
    return read_state_dict(source)


def copy_backbone(model: nn.Module, source: str | os.PathLike,
                  state: Mapping[str, torch.Tensor] | None = None) -> int:
    """Load every ``backbone.0.*`` tensor of ``model`` from ``source`` (a zoo name with embedded weights, or a
    checkpoint file; ``state``: its :func:`source_state` when already read); returns how many were copied.
    InputError, before anything is changed, when the source lacks one of them or has another shape (a different
    backbone)."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    state = source_state(source) if state is None else state
    missing = [k for k in own if k not in state]
    if missing:
        raise InputError(f"{source!s} has no {missing[0]!r} ({len(missing)} of the {len(own)} backbone tensors "
                         "missing): take the backbone from a detector with the same ResNet")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise InputError(f"{source!s}: backbone tensor {key!r} has shape {tuple(state[key].shape)}, this model "
                             f"needs {tuple(value.shape)}: take the backbone from a detector with the same ResNet")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()}, strict=False)
    return len(own)


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
