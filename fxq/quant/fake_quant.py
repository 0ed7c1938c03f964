"""FakeQuantizer: an nn.Module whose forward equals ONNX QuantizeLinear -> DequantizeLinear.

Numerics: :func:`fxq.quant.numerics.fake_quantize` (x / scale, round half to even, saturate into the
declared bit-width's range, even for 2–3 bits that the lowering stores in int4).

Modes (``quantizer.mode``):
- ``"disabled"``: exact identity (returns the input tensor itself);
- ``"observe"``: records the input in ``quantizer.observer`` and returns it unchanged (NaN/inf refused);
- ``"quantize"``: fake-quantizes; InputError when no scale has been calibrated or set.

Parameters: ``scale`` (shape () per-tensor, (C,) per-channel) and ``zero_point`` (same shape, integer
valued, float32) are buffers, or ``nn.Parameter`` when ``learnable`` (LSQ / LSQ+). Symmetric quantizers have
zero-point 0 and, unless ``signed=False``, the signed range.

Learning (x̂ = (clamp(round(x/s) + z, qmin, qmax) − z)·s, round straight-through, z rounded straight-through):

    ∂x̂/∂s = round(x/s) − x/s inside the range,  qmin − z below it,  qmax − z above it      (LSQ)
    ∂x̂/∂z = 0 inside the range,  −s outside it                         (LSQ+, with offset β = −z·s)

both multiplied by LSQ's gradient scale g = 1/sqrt(N·Qp), Qp = qmax, N = ``grad_scale_numel`` when set, else
the number of input elements sharing one scale (for activations that counts the whole batch;
:func:`fxq.passes.prepare_qat.prepare_qat` sets the per-image count). The zero-point is learnable for affine
quantizers only. Second-order gradients flow: the backward passes of the straight-through round and of the
gradient scaling are differentiable torch ops, so ``torch.autograd.grad(..., create_graph=True)`` works
through a quantizer (the Fisher-trace regularizer needs it). An optimiser step can leave the scale ≤ 0 or the
zero-point outside the range: :meth:`FakeQuantizer.project_` puts them back (the forward also clamps the scale
at :data:`MIN_LEARNABLE_SCALE`).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal

import torch
from torch import nn

from fxq.errors import InputError
from fxq.quant.numerics import IntRange, fake_quantize
from fxq.quant.observers import Observer, make_observer
from fxq.quant.qspec import QSpec

#: Smallest scale a learnable quantizer uses, so an optimiser step cannot make it zero or negative.
MIN_LEARNABLE_SCALE = 1e-8


class QuantMode(StrEnum):
    """What a FakeQuantizer's forward does."""

    DISABLED = "disabled"
    OBSERVE = "observe"
    QUANTIZE = "quantize"


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return v.view_as(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class FakeQuantizer(nn.Module):
    """Fake quantizer with ONNX-exact numerics, observation/calibration, and optional LSQ learning."""

    def __init__(
        self,
        bits: int,
        *,
        symmetric: bool = True,
        axis: int | None = None,
        signed: bool | None = None,
        observer: str = "minmax",
        learnable: bool = False,
        name: str = "",
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.qrange = IntRange.of(bits, symmetric if signed is None else signed)
        self.symmetric = symmetric
        self.axis = axis
        self.method = observer
        self.observer: Observer = make_observer(observer, self.qrange, symmetric, axis, **observer_kwargs)
        self.learnable = learnable
        self._mode = QuantMode.QUANTIZE
        self._observed_device = torch.device("cpu")
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.name = name
        #: Elements sharing one scale in LSQ's gradient scale 1/sqrt(N·Qp); None: counted on each input.
        self.grad_scale_numel: int | None = None

    @classmethod
    def from_qspec(
        cls,
        spec: QSpec,
        kind: Literal["weight", "activation", "attention"],
        *,
        name: str = "",
        learnable: bool = False,
        **observer_kwargs: Any,
    ) -> FakeQuantizer:
        """The quantizer a QSpec prescribes for a node's weight, activation or attention operand."""
        if kind == "weight":
            bits, symmetric, axis, method = spec.w_bits, spec.w_symmetric, spec.w_per_channel_axis, spec.w_observer
        elif kind in ("activation", "attention"):
            bits = spec.a_bits if kind == "activation" else spec.attn_bits
            symmetric, axis, method = spec.a_symmetric, None, spec.a_observer
        else:
            raise InputError(f'quantizer kind {kind!r} is unknown; use "weight", "activation" or "attention"')
        if bits is None:
            raise InputError(f"QSpec keeps the {kind} of {name or 'this node'} float; it needs no quantizer")
        return cls(
            bits, symmetric=symmetric, axis=axis, observer=method, learnable=learnable, name=name,
            **observer_kwargs,
        )

    # -- naming and modes ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The quantizer's name in error messages (the FX node name once inserted in a graph)."""
        return self.observer.name

    @name.setter
    def name(self, value: str) -> None:
        self.observer.name = value

    @property
    def bits(self) -> int:
        """The declared bit-width."""
        return self.qrange.bits

    @property
    def mode(self) -> QuantMode:
        """"disabled", "observe" or "quantize"."""
        return self._mode

    @mode.setter
    def mode(self, value: QuantMode | str) -> None:
        try:
            self._mode = QuantMode(value)
        except ValueError:
            raise InputError(
                f"{self.observer.who}: mode {value!r} is unknown; use one of {[m.value for m in QuantMode]}"
            ) from None

    def enable(self) -> FakeQuantizer:
        """Fake-quantize in the forward pass."""
        self.mode = QuantMode.QUANTIZE
        return self

    def disable(self) -> FakeQuantizer:
        """Make the forward pass the identity."""
        self.mode = QuantMode.DISABLED
        return self

    def start_observing(self, reset: bool = True) -> FakeQuantizer:
        """Record inputs (forgetting earlier ones unless ``reset=False``) and pass them through."""
        if reset:
            self.observer.reset()
        self.mode = QuantMode.OBSERVE
        return self

    def calibrate(self) -> FakeQuantizer:
        """Set scale and zero-point from the observations and switch to fake-quantizing."""
        scale, zp = self.observer.compute()
        self.set_qparams(scale.to(self._observed_device), zp.to(self._observed_device))
        return self.enable()

    # -- parameters ------------------------------------------------------------------------------

    @property
    def is_calibrated(self) -> bool:
        """Whether a scale and zero-point are set."""
        return self.scale is not None

    def set_qparams(self, scale: torch.Tensor | float, zero_point: torch.Tensor | float | None = None) -> None:
        """Set scale (> 0, finite) and zero-point (in range; 0 if omitted; must be 0 when symmetric)."""
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        zp = torch.zeros_like(scale) if zero_point is None else torch.as_tensor(zero_point).detach()
        zp = zp.to(device=scale.device, dtype=torch.float32).clone()
        self._check_qparams(scale, zp)
        if self.axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        self._store("scale", scale, self.learnable)
        self._store("zero_point", zp, self.learnable and not self.symmetric)

    def _check_qparams(self, scale: torch.Tensor, zp: torch.Tensor) -> None:
        who = self.observer.who
        expected = "one value" if self.axis is None else "a 1-D tensor (one value per channel)"
        if (scale.numel() != 1 if self.axis is None else scale.dim() != 1) or zp.shape != scale.shape:
            raise InputError(
                f"{who}: scale {tuple(scale.shape)} / zero_point {tuple(zp.shape)} must each be {expected}"
            )
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise InputError(f"{who}: scales must be finite and > 0, got {scale.tolist()}")
        if not (torch.isfinite(zp).all() and (zp >= self.qrange.qmin).all() and (zp <= self.qrange.qmax).all()):
            raise InputError(
                f"{who}: zero-points must lie in [{self.qrange.qmin}, {self.qrange.qmax}], got {zp.tolist()}"
            )
        if self.symmetric and (zp != 0).any():
            raise InputError(f"{who}: a symmetric quantizer's zero-point is 0, got {zp.tolist()}")

    def _store(self, key: str, value: torch.Tensor, as_parameter: bool) -> None:
        current = getattr(self, key)
        if current is not None and current.shape == value.shape and isinstance(current, nn.Parameter) == as_parameter:
            with torch.no_grad():
                current.copy_(value)
            return
        self._parameters.pop(key, None)
        self._buffers.pop(key, None)
        if as_parameter:
            self.register_parameter(key, nn.Parameter(value))
        else:
            self.register_buffer(key, value)

    def set_learnable(self, learnable: bool = True) -> FakeQuantizer:
        """Make scale (and an affine zero-point) ``nn.Parameter``s, or buffers again."""
        self.learnable = learnable
        if self.is_calibrated:
            self._store("scale", self.scale.detach().clone(), learnable)
            self._store("zero_point", self.zero_point.detach().clone(), learnable and not self.symmetric)
        return self

    @torch.no_grad()
    def project_(self) -> FakeQuantizer:
        """Clamp the scale to >= MIN_LEARNABLE_SCALE and the zero-point into [qmin, qmax], in place."""
        if self.is_calibrated:
            self.scale.clamp_(min=MIN_LEARNABLE_SCALE)
            self.zero_point.clamp_(self.qrange.qmin, self.qrange.qmax)
        return self

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as the exported QuantizeLinear uses them (zero-point rounded into range)."""
        self._require_calibrated()
        zp = torch.round(self.zero_point.detach()).clamp(self.qrange.qmin, self.qrange.qmax)
        return self.scale.detach().clone(), zp

    def uint8_qparams(self) -> tuple[float, int] | None:
        """(scale, zero-point) of this quantizer's integers shifted into [0, 255] (q − qmin), for a kernel that
        reads them as uint8; None unless it quantizes per tensor on at most 8 bits."""
        if self._mode is not QuantMode.QUANTIZE or self.axis is not None or self.qrange.bits > 8:
            return None
        scale, zp = self.qparams()
        return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]) - self.qrange.qmin

    def _require_calibrated(self) -> None:
        if not self.is_calibrated:
            raise InputError(
                f"{self.observer.who}: fake-quantizing before calibration; observe data and call "
                f"calibrate(), call set_qparams(), or disable() the quantizer"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if prefix + "scale" in state_dict:
            self.set_qparams(state_dict[prefix + "scale"], state_dict.get(prefix + "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode is QuantMode.DISABLED:
            return x
        if self._mode is QuantMode.OBSERVE:
            self.observer.update(x)
            self._observed_device = x.device
            return x
        self._require_calibrated()
        scale, zp = self.scale, self.zero_point
        if self.learnable:
            numel = self.grad_scale_numel or x.numel() / scale.numel()
            factor = 1.0 / math.sqrt(numel * self.qrange.qmax)
            scale = _GradScale.apply(scale, factor).clamp_min(MIN_LEARNABLE_SCALE)
            zp = _GradScale.apply(zp, factor) if zp.requires_grad else zp
        return fake_quantize(x, scale, zp, self.qrange, self.axis, self.observer.who)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "affine"
        where = "per-tensor" if self.axis is None else f"per-channel axis={self.axis}"
        return (
            f"name={self.name!r}, bits={self.bits}, {kind}, range=[{self.qrange.qmin}, {self.qrange.qmax}], "
            f"{where}, observer={self.method!r}, learnable={self.learnable}, mode={self._mode.value}"
        )
