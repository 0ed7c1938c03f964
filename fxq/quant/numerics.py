"""Quantize-dequantize numerics identical to ONNX QuantizeLinear -> DequantizeLinear.

    q = saturate(round_half_to_even(x / scale) + zero_point)    into [qmin, qmax]
    y = (q - zero_point) * scale

The one implementation used by the fake quantizer, by every calibration search and by the lowering's
integer weights (:func:`quantize_linear`), so that a scale chosen by a search is judged with the numerics the
exported model will run. The int32 rounding of a bias with scale s_x·s_w (:func:`int32_bias`) is shared in
the same way by the graph pass that fake-quantizes biases and the lowering that stores them.
``x / scale`` is a true division (torch's fake_quantize ops compute ``x * (1 / scale)``, which
differs from ONNX Runtime by one step on a few elements per million — docs/METHODS.md, "Runtime facts").
Exact parity with ONNX Runtime holds for float32 inputs and float32 scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fxq.errors import InputError

#: Bit-widths a quantizer accepts; 2–3 bit values are later stored in int4 with the narrower range kept.
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


#: Bounds of int32, the type of a bias stored with scale s_x·s_w.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class IntRange:
    """The integer range [qmin, qmax] of a bit-width, signed or unsigned (how it is stored is the backends')."""

    bits: int
    signed: bool
    qmin: int
    qmax: int

    @classmethod
    def of(cls, bits: int, signed: bool) -> IntRange:
        """Signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1] for a supported bit-width."""
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise InputError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
        if signed:
            return cls(bits, True, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return cls(bits, False, 0, 2**bits - 1)


#: The range of an int32 bias (not a quantizer's bit-width, so not from :meth:`IntRange.of`).
INT32 = IntRange(32, True, INT32_MIN, INT32_MAX)


def normalize_axis(axis: int, shape: tuple[int, ...] | torch.Size, who: str = "quantizer") -> int:
    """The non-negative form of a per-channel ``axis`` of a tensor of ``shape``."""
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise InputError(
            f"{who}: per-channel axis {axis} does not exist in a tensor of shape {tuple(shape)}; "
            f"use an axis in [{-ndim}, {ndim - 1}] or per-tensor granularity (axis=None)"
        )
    return axis % ndim


def channel_view(x: torch.Tensor, axis: int | None, who: str = "quantizer") -> torch.Tensor:
    """``x`` as a (channels, elements) matrix: one row per channel, or a single row when per-tensor."""
    if axis is None:
        return x.reshape(1, -1)
    axis = normalize_axis(axis, x.shape, who)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class _RoundSTE(torch.autograd.Function):
    """Round half to even; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass (straight-through)."""
    return _RoundSTE.apply(v)


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None, who: str) -> torch.Tensor:
    if axis is None:
        if param.numel() != 1:
            raise InputError(f"{who}: a per-tensor quantizer needs one scale, got shape {tuple(param.shape)}")
        return param.reshape(())
    axis = normalize_axis(axis, x.shape, who)
    if param.numel() != x.shape[axis]:
        raise InputError(
            f"{who}: {param.numel()} per-channel parameters do not fit axis {axis} of a tensor of shape "
            f"{tuple(x.shape)}; calibrate the quantizer on tensors of this shape"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qrange: IntRange,
    axis: int | None = None,
    who: str = "quantizer",
) -> torch.Tensor:
    """QuantizeLinear followed by DequantizeLinear, bit-exact with ONNX; straight-through gradients.

    ``scale``/``zero_point`` hold one value (per-tensor, ``axis=None``) or one per channel along ``axis``.
    The zero-point is rounded and clamped into the range (a no-op for calibrated integer zero-points).
    """
    s = _broadcast(scale, x, axis, who).to(device=x.device, dtype=x.dtype)
    z = _broadcast(zero_point, x, axis, who).to(device=x.device, dtype=x.dtype)
    z = torch.clamp(round_ste(z), qrange.qmin, qrange.qmax)
    return (quantize_linear(x, s, z, qrange) - z) * s


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qrange: IntRange) -> torch.Tensor:
    """ONNX QuantizeLinear into ``qrange``: ``saturate(round_half_to_even(x / scale) + zero_point)``.

    ``scale`` and ``zero_point`` (integer-valued) broadcast against ``x``; the integers come back as floats of
    ``x``'s dtype. The rounding's gradient passes straight through (zero outside the range).
    """
    return torch.clamp(round_ste(x / scale) + zero_point, qrange.qmin, qrange.qmax)


def bias_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The scale s_x·s_w of an int32 bias, in float32 as ONNX Runtime computes it: one per output channel
    (a single one when both are per-tensor)."""
    return input_scale.float().reshape(-1) * weight_scale.float().reshape(-1)


def int32_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integers of ``bias`` stored int32 with ``scale`` (:func:`bias_scale`): round half to even of
    ``bias / scale``, saturated to the int32 values that the division's dtype represents.

    Returned as floats of that dtype (integer-valued); the rounding is straight-through (as in fake
    quantization), so biases keep training in QAT graphs prepared for runtimes with int32 biases.
    """
    q = round_ste(bias / scale)
    return torch.clamp(q, INT32_MIN, _largest_at_most(INT32_MAX, q.dtype))


@functools.cache
def _largest_at_most(bound: int, dtype: torch.dtype) -> float:
    """The largest value of float ``dtype`` that is at most ``bound`` (2**31 - 1 is 2**31 in float32)."""
    value = torch.tensor(float(bound), dtype=torch.float64).to(dtype)
    if value.item() > bound:
        value = torch.nextafter(value, torch.zeros((), dtype=dtype))
    return value.item()
