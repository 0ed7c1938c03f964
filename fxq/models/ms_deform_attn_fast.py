"""Multi-scale deformable attention's sampling core in a form ONNX Runtime CPU runs fast: one Gather, one MatMul.

:func:`ms_deform_attn_core_fast` computes what :func:`fxq.models.ms_deform_attn.ms_deform_attn_core` (and the
official ``ms_deform_attn_core_pytorch``) computes: for every query and head, the sum over levels and points of
attention weight × the bilinear sample of that level's value map at the sampling location (zero padding,
``align_corners=False``). Its ONNX export has no GridSample and no concatenation of sampled values:

- the value maps of all levels, head-major and zero-padded by one pixel on every side, form one table whose rows
  are the D channels of one head at one pixel;
- every sampling location becomes the (int32) table rows of its four bilinear corners and four weights (corner
  weight × attention weight); a location whose corners fall off the map reads the zero padding, so no mask is
  needed; the corners' rows come from one broadcast Add;
- one Gather reads all rows, one batched MatMul [.., 1, 4·L·P] @ [.., 4·L·P, D] sums them per query and head.

It holds N·M·Lq·4·L·P·D gathered floats at once (356 MB for a Deformable DETR-R50 encoder layer at 512²): 4× the
reference's stacked samples, which the reference holds about three times over (per level, stacked, weighted). In
eager PyTorch it is slower than the reference (``F.grid_sample`` is one fused kernel there; 1.5–3× slower forward
and backward at deformable_detr_tiny's training shapes), so :func:`sampling_core` (what ``MSDeformAttn`` calls) runs the
reference in PyTorch and this form only while ``torch.onnx.export`` traces the model. :func:`export_form` chooses
the reference's GridSample form for an export instead (for a runtime with a fast GridSample kernel).

Measured with ``benchmarks/deform_attn_speed.py`` (ORT 1.32, 1 thread, Deformable DETR-R50 shapes at 512²): the
encoder's core 1.5× faster, the decoder's 1.1×, the whole float model 1.10× (1.19× with the location helper below).
OpenVINO 2026.4 runs both forms at the same speed; every tensor stays at most 6-D because it computed a 7-D
broadcast Mul wrongly.

Tolerance: float32 rounding of the same arithmetic in another order. On unit-normal values with attention
weights summing to 1 per query and head, the output is within 1e-5 (absolute) of a float64 evaluation of the
definition and of the reference core, for locations inside and outside [0, 1] (``tests/test_ms_deform_attn_fast.py``).

:func:`sampling_locations_from_points_fast` is the location helper of the same module with one Div over a per-level
size tensor instead of two Slices, two Divs and a Concat per level; it is bit-identical to
:func:`fxq.models.ms_deform_attn.sampling_locations_from_points`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx
import torch.nn.functional as F

SpatialShapes = Sequence[tuple[int, int]]
"""``(H, W)`` of every level (ints, or FX proxies when traced), as in :mod:`fxq.models.ms_deform_attn`."""

EXPORT_FORMS = ("gather", "grid_sample")
"""What an ONNX export of the sampling core contains: this module's Gather + MatMul, or the reference's GridSample."""

_export = {"form": "gather"}


@contextlib.contextmanager
def export_form(form: str) -> Iterator[None]:
    """ONNX exports made within the block lower the sampling core in ``form`` (one of :data:`EXPORT_FORMS`;
    "gather" outside any block). PyTorch execution is the same either way."""
    if form not in EXPORT_FORMS:
        raise ValueError(f"unknown export form {form!r}: choose one of {', '.join(EXPORT_FORMS)}")
    before, _export["form"] = _export["form"], form
    try:
        yield
    finally:
        _export["form"] = before


def _per_level(values: Sequence[int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor [L] of ``values`` on ``like``'s device (``like``'s dtype unless given); stays shape-dynamic when
    the values are traced sizes."""
    one = like.new_ones((), dtype=dtype)
    return torch.stack([one * v for v in values])


def level_sizes(spatial_shapes: SpatialShapes, like: torch.Tensor, points: int) -> torch.Tensor:
    """(W, H) of every level, [L, P, 2] (repeated over the ``points``, so broadcasting against
    [.., L, P, 2] runs over whole rows)."""
    widths = _per_level([w for _, w in spatial_shapes], like)
    heights = _per_level([h for h, _ in spatial_shapes], like)
    return torch.stack((widths, heights), -1)[:, None].expand(len(spatial_shapes), points, 2)


def padded_value_table(value: torch.Tensor, spatial_shapes: SpatialShapes) -> torch.Tensor:
    """Rows [N·M·S', D] of ``value`` [N, S, M, D]: image n, head m, then each level's (H+2)×(W+2) map zero-padded
    by one pixel, levels one after the other (S' = Σ (H+2)(W+2))."""
    batch, heads, head_dim = value.shape[0], value.shape[2], value.shape[3]
    maps = value.transpose(1, 2).split([h * w for h, w in spatial_shapes], dim=2)
    padded = [F.pad(maps[level].reshape(batch, heads, h, w, head_dim), (0, 0, 1, 1, 1, 1)).flatten(2, 3)
              for level, (h, w) in enumerate(spatial_shapes)]
    return torch.cat(padded, 2).reshape(-1, head_dim)


def top_left_corners(locations: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, y0) of the bilinear footprint in pixels of each level, and the fractions (fx, fy) in [0, 1].

    ``locations`` [.., L, P, 2] normalised (x, y); ``sizes`` [L, P, 2] (W, H). A footprint that misses the map is
    moved to the nearest place where all its weight falls on the one-pixel padding ring (x0 ∈ [-1, W-1]), so it
    reads zeros as grid_sample's zero padding does.
    """
    pixels = torch.min((locations * sizes - 0.5).clamp(min=-1), sizes)
    corner = torch.min(pixels.floor(), sizes - 1)
    return corner, pixels - corner


def top_left_rows(spatial_shapes: SpatialShapes, corner: torch.Tensor, table_batch: int) -> torch.Tensor:
    """Table rows [N, M, Lq, L, P] (int32) of the top-left corner of every footprint whose top-left corner in
    pixels is ``corner`` [N, M, Lq, L, P, 2] (x0, y0); ``table_batch`` = N·M."""
    levels, points = corner.shape[3], corner.shape[4]
    starts, plane = [], 0
    for h, w in spatial_shapes:
        starts.append(plane)
        plane = plane + (h + 2) * (w + 2)
    row = _row_lengths(spatial_shapes, corner, points)
    start = _per_level(starts, corner, torch.int32)[:, None].expand(levels, points)
    image_head = torch.arange(table_batch, dtype=torch.int32, device=corner.device)
    image_head = image_head.view(corner.shape[0], corner.shape[1], 1, 1, 1) * plane
    padded = (corner + 1).to(torch.int32)
    return padded[..., 1] * row + padded[..., 0] + (start + image_head)


def _row_lengths(spatial_shapes: SpatialShapes, like: torch.Tensor, points: int) -> torch.Tensor:
    """[L, P] (int32): the padded row length W + 2 of each level, per point."""
    return _per_level([w + 2 for _, w in spatial_shapes], like, torch.int32)[:, None].expand(len(spatial_shapes),
                                                                                                 points)


def corner_rows(spatial_shapes: SpatialShapes, corner: torch.Tensor, table_batch: int) -> torch.Tensor:
    """Table rows [N, M, Lq, 4, L, P] (int32) of the four corners (top-left, top-right, bottom-left,
    bottom-right) of every footprint whose top-left corner in pixels is ``corner`` [N, M, Lq, L, P, 2] (x0, y0);
    ``table_batch`` = N·M."""
    top_left = top_left_rows(spatial_shapes, corner, table_batch)
    row = _row_lengths(spatial_shapes, corner, corner.shape[4])
    zero = torch.zeros_like(row)
    return top_left[:, :, :, None] + torch.stack((zero, zero + 1, row, row + 1))


def bilinear_weights(frac: torch.Tensor, attention_weights: torch.Tensor, corner_dim: int = 3) -> torch.Tensor:
    """Corner weights × attention weight [N, M, Lq, 4, L, P] (``corner_dim`` -1: [N, M, Lq, L, P, 4]), corners
    in :func:`corner_rows`' order, for the fractions ``frac`` [N, M, Lq, L, P, 2] (fx, fy) and
    ``attention_weights`` [N, M, Lq, L, P]."""
    fx, fy = frac[..., 0], frac[..., 1]
    left, right = (1 - fx) * attention_weights, fx * attention_weights
    upper = 1 - fy
    return torch.stack((left * upper, right * upper, left * fy, right * fy), corner_dim)


def ms_deform_attn_core_fast(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor,
                             corner_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Attention-weighted sum of bilinear samples of ``value`` over levels and points (module docstring: form
    and tolerance); same arguments and result as ``ms_deform_attn_core``.

    ``value`` [N, S, M, D] (S = Σ H·W, levels flattened row-major one after the other), ``sampling_locations``
    [N, Lq, M, L, P, 2] as (x, y) in [0, 1] of each level (samples outside read zeros), ``attention_weights``
    [N, Lq, M, L, P]. Returns [N, Lq, M·D]. ``corner_weights``, if given, maps the corner weights
    [N, M, Lq, 1, 4·L·P] (one row per query and head) to the ones used (e.g. fake-quantized).
    """
    batch, heads, head_dim = value.shape[0], value.shape[2], value.shape[3]
    queries = sampling_locations.shape[1]
    locations = sampling_locations.transpose(1, 2)
    corner, frac = top_left_corners(locations, level_sizes(spatial_shapes, locations, locations.shape[4]))
    rows = corner_rows(spatial_shapes, corner, batch * heads)
    weights = bilinear_weights(frac, attention_weights.transpose(1, 2))
    gathered = padded_value_table(value, spatial_shapes).index_select(0, rows.flatten())
    gathered = gathered.reshape(batch, heads, queries, -1, head_dim)
    weights = weights.reshape(batch, heads, queries, 1, -1)
    out = torch.matmul(weights if corner_weights is None else corner_weights(weights), gathered)
    return out.reshape(batch, heads, queries, head_dim).transpose(1, 2).reshape(batch, queries, heads * head_dim)


@torch.fx.wrap
def sampling_core(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> torch.Tensor:
    """``ms_deform_attn_core``'s result: its own grid_sample form in PyTorch, :func:`ms_deform_attn_core_fast`
    while ``torch.onnx.export`` traces (so the ONNX file gets the Gather + MatMul form, unless
    :func:`export_form` says otherwise).

    One node of an FX graph (``torch.fx.wrap``), so a traced graph keeps the choice for run time. Call it as
    ``ms_deform_attn_fast.sampling_core(...)`` (through the module) for tracing to see the wrapped name.
    """
    if torch.onnx.is_in_onnx_export() and _export["form"] == "gather":
        return ms_deform_attn_core_fast(value, spatial_shapes, sampling_locations, attention_weights)
    from fxq.models.ms_deform_attn import ms_deform_attn_core  # not at the top: that module imports this one

    return ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights)


def sampling_locations_from_points_fast(reference_points: torch.Tensor, offsets: torch.Tensor,
                                        spatial_shapes: SpatialShapes) -> torch.Tensor:
    """Locations [N, Lq, M, L, P, 2] = reference (x, y) + offsets measured in pixels of each level; bit-identical
    to ``sampling_locations_from_points``.

    ``reference_points`` [N, Lq, L or 1, 2] normalised to [0, 1]; ``offsets`` [N, Lq, M, L, P, 2].
    """
    batch, queries, levels, points = offsets.shape[0], offsets.shape[1], offsets.shape[3], offsets.shape[4]
    reference = reference_points[:, :, None, :, None, :].expand(batch, queries, 1, levels, points, 2)
    return reference + offsets / level_sizes(spatial_shapes, offsets, points)
