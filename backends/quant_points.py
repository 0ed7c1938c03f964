"""The quantizers of a graph as the lowering sees them: where they are and their calibrated parameters.

A :class:`QuantPoint` per quantizer node of a quantized GraphModule (role ``quantize``, ``fxq.quantizer``
meta written by :mod:`fxq.passes.insert_quant`), in graph order, with scale and zero-point exactly as
QuantizeLinear uses them (:meth:`fxq.quant.FakeQuantizer.qparams`). How its integers are stored is
:func:`fxq.backends.qtensor.storage_bits` of its range and ``min_storage_bits`` (which a runtime lowering
raises for the activations its kernels read only as 8-bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from fxq.backends.qtensor import storage_bits
from fxq.errors import InputError
from fxq.quant import FakeQuantizer, QuantMode
from fxq.quant.numerics import IntRange, normalize_axis, quantize_linear
from fxq.roles import quantizer_nodes


@dataclass(frozen=True)
class QuantPoint:
    """One quantizer node: its kind, integer range, channel axis, calibrated (scale, zero-point) and the
    narrowest storage width the lowering allows it."""

    name: str
    kind: str
    of: str
    qrange: IntRange
    axis: int | None
    scale: np.ndarray
    zero_point: np.ndarray
    enabled: bool
    min_storage_bits: int = 4

    @property
    def bits(self) -> int:
        """The declared bit-width."""
        return self.qrange.bits

    @property
    def storage_bits(self) -> int:
        """Width of the ONNX integer type that stores its integers (and its zero-point)."""
        return storage_bits(self.qrange, self.min_storage_bits)

    def quantize(self, x: torch.Tensor) -> np.ndarray:
        """The integers QuantizeLinear produces for ``x`` (x / scale, round half to even, saturate)."""
        shape = [1] * x.dim()
        if self.axis is not None:
            shape[normalize_axis(self.axis, x.shape, self.name)] = -1
        scale = torch.from_numpy(self.scale).reshape(shape if self.axis is not None else ())
        zp = torch.from_numpy(self.zero_point.astype(np.float32)).reshape(scale.shape)
        return quantize_linear(x.detach().float().cpu(), scale, zp, self.qrange).numpy().astype(np.int64)


def _point(node: torch.fx.Node, q: FakeQuantizer) -> QuantPoint:
    info = node.meta.get("fxq.quantizer", {})
    enabled = q.mode is QuantMode.QUANTIZE
    scale = zp = np.zeros(0)
    if enabled:
        s, z = q.qparams()
        scale = s.detach().cpu().to(torch.float32).numpy()
        zp = z.detach().cpu().to(torch.int64).numpy()
    return QuantPoint(node.name, info.get("kind", "activation"), info.get("of", ""), q.qrange, q.axis, scale, zp,
                      enabled)


def collect_points(gm: torch.fx.GraphModule) -> dict[str, QuantPoint]:
    """Every quantizer of ``gm`` by node name; InputError for the first one not ready to be exported."""
    points = {}
    for node in quantizer_nodes(gm):
        q = gm.get_submodule(node.target)
        if not isinstance(q, FakeQuantizer):
            raise InputError(f"quantizer node {node.name!r} runs a {type(q).__name__}, not an fxq FakeQuantizer; "
                             "insert quantizers with fxq.passes.insert_quant.insert_quantizers")
        if q.mode is QuantMode.OBSERVE:
            raise InputError(f"quantizer node {node.name!r} is still observing: finish calibration with "
                             "fxq.passes.calibrate.calibrate(gm, loader) (or call its calibrate()) before lowering")
        if q.mode is QuantMode.QUANTIZE and not q.is_calibrated:
            raise InputError(f"quantizer node {node.name!r} is not calibrated: run "
                             "fxq.passes.calibrate.calibrate(gm, loader) (or set_qparams on it) before lowering")
        points[node.name] = _point(node, q)
    return points
