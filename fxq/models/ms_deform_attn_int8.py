"""Multi-scale deformable attention's sampling core on an 8-bit value table: one uint8 Gather, one integer MatMul.

:func:`ms_deform_attn_core_int8` is the sampling core with its two operands quantized: the value per tensor
(uint8, the caller's scale s_v and zero-point z_v) and the corner weights w (bilinear corner weight × attention
weight, ≥ 0) to uint8 per (query, head) row with scale s_w = the row's largest weight / 255. It computes

    out = s_v · s_w · Σ_{level, point, corner} w_q · (v_q − z_v),   v_q = clamp(round(v / s_v) + z_v, 0, 255),
                                                                     w_q = round(w / s_w),

the Gather form of :mod:`fxq.models.ms_deform_attn_fast` in integers. Its ONNX export (opset ≥ 13) is
QuantizeLinear on the value, ReduceMax / Div / Round / Cast on the corner weights, data movement in uint8, one
Gather of uint8 rows, MatMulInteger (int32 sums, exact) and one Mul: standard ops, no contrib domain.

The table holds, for every pixel of every (zero-point-padded) level map, the D channels of its whole bilinear
footprint (the pixel, its right, lower and lower-right neighbours: 4·D bytes), so each sampling point reads one
row instead of four: on Deformable DETR-R50 encoder shapes at 512² (1 thread) four times fewer Gather indices
made the uint8 Gather 2× faster, while a float32 Gather of the same rows did not get faster (it is bound by the
bytes it moves, four times as many).

Tolerance against the float core (:func:`fxq.models.ms_deform_attn.ms_deform_attn_core`) on the same float
value: the value's rounding (≤ s_v / 2 per sample; the weights sum to 1 per query and head) plus the corner
weights' (≤ s_w / 2 each, times |v|). On unit-normal values at Deformable DETR-R50 encoder shapes (min-max s_v ≈
0.037) the output's RMS error is 0.0028 (the value's rounding alone: 0.0025) on outputs of RMS 0.23; a fixed
weight scale of 1/255 instead gave 0.0084. Against its own definition above evaluated in float64: float32
rounding only (the integer sums are exact: 64 products below 255 · 255 stay under 2²⁴).

In a quantized graph: :func:`quantized_sampling_core` is the FX node that
:func:`fxq.passes.sampling_values.quantize_sampling_values` puts in place of the float core for a runtime whose
profile says ``int8_sampling_core`` (ORT CPU), its value input read through an ordinary fake quantizer of the
graph (calibrated, learnable in QAT, exported as Q/DQ with the learned scale). In PyTorch that node computes
the Gather form in float with the value as the quantizer gives it and the corner weights fake-quantized per
row exactly as above (straight-through gradient), so the fake-quant graph is the reference of the exported
integer core up to float32 rounding. ``benchmarks/deform_attn_speed.py --parts core`` measures the core
against the float Gather form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.onnx import symbolic_helper

from fxq.models import ms_deform_attn_fast as fast
from fxq.models.ms_deform_attn_fast import SpatialShapes

WEIGHT_LEVELS = 255
"""The corner weights' integer range: uint8, each (query, head) row's largest weight at 255."""


@torch.library.custom_op("fxq::quantize_u8", mutates_args=())
def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 ``clamp(round(x / scale) + zero_point, 0, 255)`` (round half to even); ONNX QuantizeLinear."""
    return (torch.round(x / scale) + zero_point).clamp(0, 255).to(torch.uint8)


@quantize_u8.register_fake
def _(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op("fxq::matmul_integer", mutates_args=())
def matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero: int, b_zero: int) -> torch.Tensor:
    """int32 ``(a − a_zero) @ (b − b_zero)`` of uint8 ``a``, ``b`` (batched as torch.matmul); ONNX MatMulInteger."""
    return torch.matmul(a.double() - a_zero, b.double() - b_zero).to(torch.int32)


@matmul_integer.register_fake
def _(a: torch.Tensor, b: torch.Tensor, a_zero: int, b_zero: int) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                       dtype=torch.int32)


def _uint8(g, value: int):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.uint8))


def _quantize_symbolic(g, x, scale, zero_point):
    s = g.op("Constant", value_t=torch.tensor(symbolic_helper._maybe_get_const(scale, "f"), dtype=torch.float32))
    return g.op("QuantizeLinear", x, s, _uint8(g, symbolic_helper._maybe_get_const(zero_point, "i")))


def _matmul_integer_symbolic(g, a, b, a_zero, b_zero):
    za, zb = (_uint8(g, symbolic_helper._maybe_get_const(z, "i")) for z in (a_zero, b_zero))
    return g.op("MatMulInteger", a, b, za, zb)


torch.onnx.register_custom_op_symbolic("fxq::quantize_u8", _quantize_symbolic, 13)
torch.onnx.register_custom_op_symbolic("fxq::matmul_integer", _matmul_integer_symbolic, 13)


def fake_quantized_rows(weights: torch.Tensor) -> torch.Tensor:
    """``round(w / s) · s`` per last-axis row (s as :func:`row_quantized`), gradient straight through to w."""
    scale = (weights.detach().amax(-1, keepdim=True) / WEIGHT_LEVELS).clamp(min=1e-12)
    return weights + (torch.round(weights.detach() / scale) * scale - weights.detach())


def row_quantized(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 ``round(w / s)``, s) per last-axis row of the non-negative ``weights``, s = the row's max / 255
    (at least 1e-12), so each row's largest weight is exact (exported as ReduceMax, Div, Round, Cast)."""
    scale = (weights.amax(-1, keepdim=True) / WEIGHT_LEVELS).clamp(min=1e-12)
    return torch.round(weights / scale).to(torch.uint8), scale


def footprint_table(value_q: torch.Tensor, spatial_shapes: SpatialShapes, zero_point: int) -> torch.Tensor:
    """Rows [N·M·S', 4·D] (uint8) of ``value_q`` [N, S, M, D]: for image n, head m and each pixel of each level's
    map padded by one pixel (value ``zero_point``, i.e. 0.0), the D channels of that pixel, its right, lower and
    lower-right neighbours; levels one after the other, S' = Σ (H+2)(W+2), as in
    :func:`fxq.models.ms_deform_attn_fast.padded_value_table`."""
    batch, heads, head_dim = value_q.shape[0], value_q.shape[2], value_q.shape[3]
    maps = value_q.transpose(1, 2).split([h * w for h, w in spatial_shapes], dim=2)
    levels = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid = maps[level].reshape(batch * heads, h, w, head_dim)
        grid = F.pad(grid, (0, 0, 1, 2, 1, 2), value=zero_point)  # one pixel before, two after: room for +1 shifts
        quads = [grid[:, dy:dy + h + 2, dx:dx + w + 2] for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))]
        levels.append(torch.cat(quads, -1).flatten(1, 2))
    return torch.cat(levels, 1).reshape(-1, 4 * head_dim)


def ms_deform_attn_core_int8(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor, value_scale: float,
                             value_zero_point: int) -> torch.Tensor:
    """Attention-weighted sum of bilinear samples with the value quantized to uint8 (``value_scale``,
    ``value_zero_point``) and the corner weights to 1/255 steps (module docstring: formula and tolerance).

    Arguments and result as :func:`fxq.models.ms_deform_attn_fast.ms_deform_attn_core_fast`: ``value``
    [N, S, M, D], ``sampling_locations`` [N, Lq, M, L, P, 2], ``attention_weights`` [N, Lq, M, L, P]; returns
    [N, Lq, M·D] (float32).
    """
    batch, heads, head_dim = value.shape[0], value.shape[2], value.shape[3]
    queries = sampling_locations.shape[1]
    locations = sampling_locations.transpose(1, 2)
    corner, frac = fast.top_left_corners(locations, fast.level_sizes(spatial_shapes, locations, locations.shape[4]))
    rows = fast.top_left_rows(spatial_shapes, corner, batch * heads)  # the footprint's row
    weights = fast.bilinear_weights(frac, attention_weights.transpose(1, 2), corner_dim=-1)  # [.., L, P, 4]
    weights_q, weight_scale = row_quantized(weights.reshape(batch, heads, queries, 1, -1))
    table = footprint_table(quantize_u8(value, value_scale, value_zero_point), spatial_shapes, value_zero_point)
    gathered = table.index_select(0, rows.flatten()).reshape(batch, heads, queries, -1, head_dim)
    sums = matmul_integer(weights_q, gathered, 0, value_zero_point)
    out = sums.to(torch.float32) * (weight_scale * value_scale)
    return out.reshape(batch, heads, queries, head_dim).transpose(1, 2).reshape(batch, queries, heads * head_dim)


def value_qparams(value: torch.Tensor) -> tuple[float, int]:
    """uint8 (scale, zero-point) of ``value``'s min/max range widened to hold 0 (a min-max calibration)."""
    low, high = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
    scale = max(high - low, 1e-8) / 255
    return scale, int(min(max(round(-low / scale), 0), 255))


@torch.fx.wrap
def quantized_sampling_core(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor, value_quantizer: torch.nn.Module) -> torch.Tensor:
    """The sampling core of a graph whose ``value`` comes from ``value_quantizer`` (module docstring).

    ``value_quantizer`` is the graph's quantizer module of ``value`` (a FakeQuantizer, or the lowering's stand-in
    for it during export); its ``uint8_qparams()`` gives (scale, unsigned zero-point), or None while it observes
    or is disabled, when the float core runs. Same arguments and result as
    :func:`fxq.models.ms_deform_attn_fast.sampling_core` otherwise; one FX node (``torch.fx.wrap``). A quantized
    core always exports in the int8 form (``ms_deform_attn_fast.export_form`` chooses among float forms).
    """
    qparams = getattr(value_quantizer, "uint8_qparams", lambda: None)()
    if qparams is None:
        return fast.sampling_core(value, spatial_shapes, sampling_locations, attention_weights)
    if torch.onnx.is_in_onnx_export():
        return ms_deform_attn_core_int8(value, spatial_shapes, sampling_locations, attention_weights, *qparams)
    return fast.ms_deform_attn_core_fast(value, spatial_shapes, sampling_locations, attention_weights,
                                         corner_weights=fake_quantized_rows)
