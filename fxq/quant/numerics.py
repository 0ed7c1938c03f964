"""Quantize-dequantize numerics identical to ONNX QuantizeLinear -> DequantizeLinear.

    q = saturate(round_half_to_even(x / scale) + zero_point)    into [qmin, qmax]
    y = (q - zero_point) * scale

The one implementation used by the fake quantizer and by every calibration search, so that a
scale chosen by a search is judged with the numerics the exported model will run.
``x / scale`` is a true division (torch's fake_quantize ops compute ``x * (1 / scale)``, which
differs from ONNX Runtime by one step on a few elements per million — DESIGN.md §4).
Exact parity with ONNX Runtime holds for float32 inputs and float32 scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxq.errors import InputError

#: Bit-widths a quantizer accepts; 2–3 bit values are later stored in int4 with the narrower range kept.
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class IntRange:
    """The integer range [qmin, qmax] of a bit-width, signed or unsigned."""

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

    @property
    def storage_bits(self) -> int:
        """Width of the ONNX integer type that holds these values (4, 8 or 16)."""
        return 4 if self.bits <= 4 else 8 if self.bits <= 8 else 16


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
    q = torch.clamp(round_ste(x / s) + z, qrange.qmin, qrange.qmax)
    return (q - z) * s
