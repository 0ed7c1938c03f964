"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, FX-traceable and ONNX-exportable.

Parameter names and initialisation are those of fundamentalvision/Deformable-DETR's ``MSDeformAttn``; the
sampling core computes what its ``ms_deform_attn_core_pytorch`` computes (``F.grid_sample``, bilinear, zero
padding, ``align_corners=False``). In PyTorch it runs that form; an ONNX export gets the Gather + MatMul form of
:mod:`fxq.models.ms_deform_attn_fast` (fast on ONNX Runtime CPU; same numerics within 1e-5), and the sampling
locations come from that module's one-Div helper (bit-identical to :func:`sampling_locations_from_points`).

Deviation from the official signature: the level sizes are passed as a list of ``(H, W)`` pairs read from the
feature maps' shapes (FX proxies when traced) instead of a ``spatial_shapes`` tensor and a
``level_start_index`` tensor, so that a traced graph stays valid at other input sizes; the start indices follow
from the sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxq.models import ms_deform_attn_fast

SpatialShapes = Sequence[tuple[int, int]]
"""``(H, W)`` of every level, in the order the levels are flattened into the value sequence."""


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Attention-weighted sum of bilinear samples of ``value`` over levels and points.

    ``value`` [N, S, M, D] (S = Σ H·W, levels flattened row-major one after the other), ``sampling_locations``
    [N, Lq, M, L, P, 2] as (x, y) in [0, 1] of each level (samples outside read zeros), ``attention_weights``
    [N, Lq, M, L, P]. Returns [N, Lq, M·D].
    """
    batch, heads, head_dim = value.shape[0], value.shape[2], value.shape[3]
    queries = sampling_locations.shape[1]
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = values[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, -1)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.reshape(batch, heads * head_dim, queries).transpose(1, 2)


def sampling_locations_from_points(reference_points: torch.Tensor, offsets: torch.Tensor,
                                   spatial_shapes: SpatialShapes) -> torch.Tensor:
    """Locations [N, Lq, M, L, P, 2] = reference (x, y) + offsets measured in pixels of each level.

    ``reference_points`` [N, Lq, L or 1, 2] normalised to [0, 1]; ``offsets`` [N, Lq, M, L, P, 2].
    """
    per_level = []
    for level, (h, w) in enumerate(spatial_shapes):
        off = offsets[:, :, :, level]
        per_level.append(torch.cat((off[..., :1] / w, off[..., 1:] / h), dim=-1))
    return reference_points[:, :, None, :, None, :] + torch.stack(per_level, dim=3)


def sampling_locations_from_boxes(reference_boxes: torch.Tensor, offsets: torch.Tensor, n_points: int
                                  ) -> torch.Tensor:
    """Locations [N, Lq, M, L, P, 2] = box centre + offsets / P · box size / 2.

    ``reference_boxes`` [N, Lq, L or 1, 4] as normalised (cx, cy, w, h); ``offsets`` [N, Lq, M, L, P, 2].
    """
    boxes = reference_boxes[:, :, None, :, None, :]
    return boxes[..., :2] + offsets / n_points * boxes[..., 2:] * 0.5


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: every query attends to ``n_points`` learned locations per head and level
    around its reference point."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.head_dim = d_model // n_heads
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: offsets start on a ring of directions (one per head), uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(direction_grid(self.n_heads, self.n_levels, self.n_points).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: SpatialShapes, padding_mask: torch.Tensor | None = None,
                box_reference: bool = False) -> torch.Tensor:
        """Output [N, Lq, d_model] for ``query`` [N, Lq, d_model] and ``value_input`` [N, S, d_model].

        ``reference_points`` [N, Lq, L or 1, 2] (x, y), or [N, Lq, L or 1, 4] boxes when ``box_reference``;
        ``padding_mask`` [N, S] is True at padded positions, whose values are zeroed.
        """
        batch, queries = query.shape[0], query.shape[1]
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.reshape(batch, -1, self.n_heads, self.head_dim)
        offsets = self.sampling_offsets(query).reshape(
            batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).reshape(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).reshape(batch, queries, self.n_heads, self.n_levels, self.n_points)
        if box_reference:
            locations = sampling_locations_from_boxes(reference_points, offsets, self.n_points)
        else:
            locations = ms_deform_attn_fast.sampling_locations_from_points_fast(reference_points, offsets,
                                                                                spatial_shapes)
        return self.output_proj(ms_deform_attn_fast.sampling_core(value, spatial_shapes, locations, weights))


def direction_grid(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """Initial offsets [n_heads, n_levels, n_points, 2]: head h points along angle 2πh/n_heads (scaled so the larger
    coordinate is ±1), point p at distance p + 1."""
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack((thetas.cos(), thetas.sin()), -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    scale = torch.arange(1, n_points + 1, dtype=torch.float32)
    return grid[:, None, None, :].repeat(1, n_levels, n_points, 1) * scale[None, None, :, None]
