"""Export-time markers: each fake quantizer of a graph replaced by an identity that the ONNX export records
as one custom node ``fxq::QMark`` (attribute ``name`` = the quantizer node's name), so that the lowering can
place QuantizeLinear/DequantizeLinear exactly where the graph's quantizers are.

Outside ONNX export a marker is the identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.fx
from torch import nn

from fxq.backends.quant_points import QuantPoint
from fxq.roles import quantizer_nodes

MARKER_DOMAIN = "fxq"
MARKER_OP = "QMark"


class _Mark(torch.autograd.Function):
    """Identity whose ONNX symbolic is ``fxq::QMark(x, name=...)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str):
        return g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, name_s=name).setType(x.type())


class Marker(nn.Module):
    """Stands in for one quantizer during export."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return _Mark.apply(x, self.name)
        return x


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextmanager
def markers_installed(gm: torch.fx.GraphModule, points: Mapping[str, QuantPoint]) -> Iterator[None]:
    """Within the block every enabled quantizer of ``gm`` is a Marker (disabled ones an identity); restored after."""
    saved: dict[str, nn.Module] = {}
    try:
        for node in quantizer_nodes(gm):
            parent, _, leaf = node.target.rpartition(".")
            owner = gm.get_submodule(parent)
            saved[node.target] = owner._modules[leaf]
            owner._modules[leaf] = Marker(node.name) if points[node.name].enabled else _Identity()
        yield
    finally:
        for target, module in saved.items():
            parent, _, leaf = target.rpartition(".")
            gm.get_submodule(parent)._modules[leaf] = module
