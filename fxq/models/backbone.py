"""DETR's ``backbone`` container: ``backbone.0`` is the ResNet body, ``backbone.1`` the positional encoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxq.models.position_encoding import PositionEmbeddingSine
from fxq.models.resnet import ResNetBody


class Backbone(nn.Module):
    """Holds the ResNet under ``body`` so state_dict keys read ``backbone.0.body.*``."""

    def __init__(self, body: ResNetBody) -> None:
        super().__init__()
        self.body = body
        self.num_channels = [body.channels[name] for name in body.return_layers]
        self.strides = [{"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[n] for n in body.return_layers]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body(images)


class Joiner(nn.Sequential):
    """Backbone features with their padding masks and positional encodings."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]:
        """Per returned stage: feature [B, C, h, w], mask [B, h, w] (None when no mask was given), position."""
        features = self[0](images)
        masks = [downsample_mask(mask, f) for f in features]
        pos = [self[1](f, m) for f, m in zip(features, masks, strict=True)]
        return features, masks, pos


def downsample_mask(mask: torch.Tensor | None, feature: torch.Tensor) -> torch.Tensor | None:
    """The padding mask resized (nearest) to ``feature``'s spatial size, as DETR does."""
    if mask is None:
        return None
    return F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
