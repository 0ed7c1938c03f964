"""Sine positional encoding of DETR and Deformable DETR, computed from a padding mask or the feature shape."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding over normalised pixel coordinates (``num_pos_feats`` channels per axis).

    ``offset`` is 0 for DETR and -0.5 for Deformable DETR. With ``mask=None`` the encoding depends only on the
    feature map's shape, so a traced graph stays valid at other input sizes.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, offset: float = 0.0,
                 scale: float = 2 * math.pi, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.offset, self.scale, self.eps = offset, scale, eps

    def forward(self, feature: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoding [B, 2·num_pos_feats, H, W] for ``feature`` [B, C, H, W]; ``mask`` is True at padding."""
        if mask is None:
            not_mask = torch.ones_like(feature[:, 0], dtype=torch.float32)
        else:
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=feature.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[:, :, :, None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[:, :, :, None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _interleave_sin_cos(t: torch.Tensor) -> torch.Tensor:
    return torch.stack((t[:, :, :, 0::2].sin(), t[:, :, :, 1::2].cos()), dim=4).flatten(3)
