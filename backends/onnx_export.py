"""Export the float computation of a GraphModule to ONNX, each enabled quantizer left as an ``fxq::QMark``.

Markers: within :func:`markers_installed` each fake quantizer of the graph is replaced by an identity that the
ONNX export records as one custom node ``fxq::QMark`` (attribute ``name`` = the quantizer node's name), so that
the lowering can place QuantizeLinear/DequantizeLinear exactly where the graph's quantizers are. Outside ONNX
export a marker is the identity.

Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), which supports custom symbolics
and dynamic batch/height/width on fxq's traced graphs; its highest opset is 20, so the result is converted
with ``onnx.version_converter`` when a later opset is asked for (int4 needs 21). Outputs are the graph's
tensor outputs (for detectors ``pred_logits``, ``pred_boxes``; auxiliary outputs are dropped).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import onnx
import torch
import torch.fx
from onnx import version_converter
from torch import nn

from fxq.backends.quant_points import QuantPoint
from fxq.errors import InputError, LoweringError
from fxq.roles import quantizer_nodes

MARKER_DOMAIN = "fxq"
MARKER_OP = "QMark"
TORCHSCRIPT_MAX_OPSET = 20
MIN_OPSET = 16
#: int4 / int16 Q/DQ need 21; later opsets add nothing the lowering uses.
MAX_OPSET = 21


class _TensorOutputs(nn.Module):
    """``gm`` returning a tuple of its tensor outputs (dict values in key order, or a single tensor)."""

    def __init__(self, gm: torch.fx.GraphModule, names: list[str]) -> None:
        super().__init__()
        self.gm, self.names = gm, names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(images)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out[k] for k in self.names)


def output_names(gm: torch.fx.GraphModule) -> list[str]:
    """The ONNX output names of a graph: the keys of its output dict that hold one node, or ``["output"]``."""
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(outputs, torch.fx.Node):
        return ["output"]
    if isinstance(outputs, Mapping):
        names = [k for k, v in outputs.items() if isinstance(v, torch.fx.Node)]
        if names:
            return names
    raise InputError(f"the graph returns {type(outputs).__name__}; lowering needs a tensor or a dict of tensors "
                     "(a detector's {'pred_logits', 'pred_boxes'})")


def _dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    axes = {"images": {0: "batch", 2: "height", 3: "width"}}
    axes.update({name: {0: "batch"} for name in names})
    return axes


def _op_of(exc: BaseException) -> str | None:
    match = re.search(r"aten::(\w+)", str(exc))
    return match.group(1) if match else None


def _node_named_by(gm: torch.fx.GraphModule, op: str) -> torch.fx.Node | None:
    """The first FX node whose target is the aten operator ``op`` (function, method or module class)."""
    wanted = op.strip("_").lower()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            name = node.target
        elif node.op == "call_module":
            name = type(modules[node.target]).__name__
        else:
            continue
        if name.strip("_").lower() == wanted:
            return node
    return None


def unmappable(gm: torch.fx.GraphModule, exc: BaseException, opset: int) -> LoweringError:
    """The LoweringError for an export failure, naming the FX node whose operator has no ONNX form."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    op = _op_of(exc)
    node = _node_named_by(gm, op) if op else None
    if node is not None:
        target = getattr(node.target, "__name__", node.target)
        where = f"FX node {node.name!r} ({node.op} {target}, module {node.meta.get('fxq.module') or 'root'!r})"
        return LoweringError(f"cannot lower {where} to ONNX (opset {opset}): {reason}. Replace that operation by "
                             "ONNX-exportable ones, or move it out of the graph (e.g. into post-processing)")
    return LoweringError(f"cannot lower the graph to ONNX (opset {opset}): {reason}. No FX node could be matched "
                         "to the failing operator; check the model for operations without an ONNX form")


def export_marked(gm: torch.fx.GraphModule, images: torch.Tensor, names: list[str], opset: int,
                  dynamic: bool, marked: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``gm`` (markers installed, if ``marked``) at ``opset``, input ``images``, outputs
    ``names``."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _TensorOutputs(gm, names).eval(), (images,), buffer, dynamo=False,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET), input_names=["images"], output_names=names,
                dynamic_axes=_dynamic_axes(names) if dynamic else None,
                custom_opsets={MARKER_DOMAIN: 1} if marked else None, do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; each becomes one LoweringError
        raise unmappable(gm, exc, opset) from exc
    model = onnx.load_from_string(buffer.getvalue())
    if opset > TORCHSCRIPT_MAX_OPSET:
        model = version_converter.convert_version(model, opset)
    return model


class _Mark(torch.autograd.Function):
    """Identity whose ONNX symbolic is ``fxq::QMark(x, name=...)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str):
        return g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, name_s=name).setType(x.type())


class Marker(nn.Module):
    """Stands in for one quantizer during export (``point``: its exported parameters)."""

    def __init__(self, name: str, point: QuantPoint | None = None) -> None:
        super().__init__()
        self.name, self.point = name, point

    def uint8_qparams(self) -> tuple[float, int] | None:
        """As :meth:`fxq.quant.FakeQuantizer.uint8_qparams`, from the exported point."""
        p = self.point
        if p is None or not p.enabled or p.axis is not None or p.bits > 8:
            return None
        return float(p.scale.reshape(-1)[0]), int(p.zero_point.reshape(-1)[0]) - p.qrange.qmin

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
            owner._modules[leaf] = Marker(node.name, points[node.name]) if points[node.name].enabled else _Identity()
        yield
    finally:
        for target, module in saved.items():
            parent, _, leaf = target.rpartition(".")
            gm.get_submodule(parent)._modules[leaf] = module
