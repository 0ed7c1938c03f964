"""TensorRT's explicit-quantization rules for an ONNX QDQ file, checked structurally (no TensorRT needed).

TensorRT builds an explicitly quantized engine from QuantizeLinear / DequantizeLinear nodes and honours their
placement. The rules below are those of NVIDIA's TensorRT developer guide and operator reference:

- "Working with Quantized Types" — TensorRT's quantization is symmetric; INT8 is signed; INT4 is weight-only
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html);
- "Explicit Quantization", with its "Q/DQ Layer-Placement Recommendations" — quantize all inputs of weighted
  operations (Convolution, Deconvolution, GEMM/MatMul), pre-quantized weights go through a DequantizeLayer into
  the linear operator that uses them, activations are quantized per tensor and weights per tensor or per channel
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html);
- IQuantizeLayer / IDequantizeLayer and the "Quantize" operator page — zero-points must be all zero (only
  symmetric quantization is supported), scales float32 build-time constants, strictly positive, a scalar
  (per-tensor) or a 1-D tensor as long as the quantization axis (per-channel); the quantized type is int8
  (https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvinfer1_1_1_i_quantize_layer.html,
  https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html).

As checked here (:data:`RULES`), for int8 explicit quantization: every Q/DQ is int8 with zero-point 0 and
positive float32 constant scales (``int8_symmetric``); activation Q/DQ are per-tensor (``per_tensor_activations``)
and each QuantizeLinear feeds DequantizeLinear nodes only (``q_then_dq``); a weight DequantizeLinear reads a
constant int8 initializer directly — no Cast, no int32 bias DequantizeLinear, no blocks — per tensor or per
channel on the output-channel axis of its reader (Conv: 0; MatMul with a [K, N] weight: 1; Gemm: 0 with
``transB``, else 1) (``weights_per_output_channel``); a dequantized tensor is read only by Conv / ConvTranspose /
MatMul / Gemm, directly or through data-movement ops TensorRT moves Q/DQ across (Transpose, Reshape, …)
(``qdq_only_into_weighted_ops``); and a weighted op with a dequantized weight has a dequantized activation input
too (``all_inputs_quantized``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxq.errors import LoweringError

#: The rule names and what each requires (the message of a violation).
RULES: dict[str, str] = {
    "int8_symmetric": "Q/DQ must be int8 with zero-point 0 and positive float32 constant scales (TensorRT quantizes "
                      "symmetrically in signed int8)",
    "per_tensor_activations": "activation Q/DQ must be per-tensor (one scale)",
    "q_then_dq": "a QuantizeLinear's output must feed DequantizeLinear nodes only",
    "weights_per_output_channel": "a weight DequantizeLinear must read a constant int8 initializer directly, per "
                                  "tensor or per channel on its reader's output-channel axis (no Cast, no int32 "
                                  "bias, no blocks)",
    "qdq_only_into_weighted_ops": "dequantized tensors may only be read by Conv / ConvTranspose / MatMul / Gemm "
                                  "(directly or through data-movement ops)",
    "all_inputs_quantized": "a weighted op with a dequantized weight must have a dequantized activation input",
}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: Ops TensorRT moves Q/DQ across (they only move or select data).
DATA_MOVEMENT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather",
                     "Split", "Concat", "MaxPool")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Violation:
    """One node that breaks one rule."""

    node: str
    op: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}) breaks TensorRT rule {self.rule} ({RULES[self.rule]}): {self.detail}"


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.inits = {t.name: t for t in model.graph.initializer}
        constants = {n.output[0]: n for n in self.nodes if n.op_type == "Constant"}
        self.constants = {name: numpy_helper.to_array(n.attribute[0].t) for name, n in constants.items()
                          if n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
        self.producers = {o: n for n in self.nodes for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.constants.get(name)

    def data_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        value = self.constants.get(name)
        return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)


def _attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _check_qparams(g: _Graph, node: onnx.NodeProto) -> Iterator[Violation]:
    scale = g.constant(node.input[1])
    if scale is None or scale.dtype != np.float32 or not (scale > 0).all():
        yield Violation(_label(node), node.op_type, "int8_symmetric", "its scale is not a positive float32 constant")
    zero_point = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2]:
        zp_type = g.data_type(node.input[2])
        if zp_type != TensorProto.INT8 or zero_point is None or np.any(zero_point != 0):
            kind = TensorProto.DataType.Name(zp_type).lower() if zp_type is not None else "non-constant"
            yield Violation(_label(node), node.op_type, "int8_symmetric", f"its zero-point is {kind} "
                            f"{'with nonzero values' if zero_point is not None and np.any(zero_point != 0) else ''}"
                            .strip())
    elif node.op_type == "DequantizeLinear" and g.data_type(node.input[0]) not in (None, TensorProto.INT8):
        yield Violation(_label(node), node.op_type, "int8_symmetric", "it dequantizes a non-int8 tensor")


def _output_axis(reader: onnx.NodeProto, rank: int) -> int:
    if reader.op_type == "Gemm":
        return 0 if _attr(reader, "transB", 0) else 1
    if reader.op_type == "MatMul":
        return rank - 1
    if reader.op_type == "ConvTranspose":
        return 1
    return 0


def _check_weight(g: _Graph, dq: onnx.NodeProto) -> Iterator[Violation]:
    values = g.inits.get(dq.input[0])
    if values is None or values.data_type != TensorProto.INT8 or _attr(dq, "block_size"):
        what = "a blocked" if _attr(dq, "block_size") else (
            TensorProto.DataType.Name(values.data_type).lower() if values is not None else "a non-initializer")
        yield Violation(_label(dq), dq.op_type, "weights_per_output_channel", f"it reads {what} weight")
        return
    scale = g.constant(dq.input[1])
    if scale is None or scale.size == 1:
        return
    readers = [u for u in g.users.get(dq.output[0], []) if u.op_type in WEIGHTED_OPS]
    rank, axis = len(values.dims), _attr(dq, "axis", 1)
    axis = axis + rank if axis is not None and axis < 0 else axis
    for reader in readers:
        wanted = _output_axis(reader, rank)
        if axis != wanted or scale.size != values.dims[wanted]:
            yield Violation(_label(dq), dq.op_type, "weights_per_output_channel",
                            f"per-channel on axis {axis} of {reader.op_type} {_label(reader)!r}'s weight; its output "
                            f"channels are axis {wanted}")


def _weighted_readers(g: _Graph, tensor: str, seen: frozenset[str] = frozenset()) -> Iterator[onnx.NodeProto]:
    """The readers of ``tensor`` that are not weighted ops, looking through data-movement ops."""
    for user in g.users.get(tensor, []):
        if user.op_type in WEIGHTED_OPS:
            continue
        if user.op_type in DATA_MOVEMENT_OPS and _label(user) not in seen:
            for out in user.output:
                yield from _weighted_readers(g, out, seen | {_label(user)})
        else:
            yield user


def _check_dq_readers(g: _Graph, dq: onnx.NodeProto) -> Iterator[Violation]:
    for user in _weighted_readers(g, dq.output[0]):
        yield Violation(_label(dq), dq.op_type, "qdq_only_into_weighted_ops",
                        f"its output is read by {user.op_type} {_label(user)!r}")


def _dequantized(g: _Graph, tensor: str) -> bool:
    node = g.producers.get(tensor)
    while node is not None and node.op_type in DATA_MOVEMENT_OPS:
        node = g.producers.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def _check_weighted(g: _Graph, node: onnx.NodeProto) -> Iterator[Violation]:
    if len(node.input) < 2:
        return
    weight = g.producers.get(node.input[1])
    if weight is not None and weight.op_type == "DequantizeLinear" and not _dequantized(g, node.input[0]):
        yield Violation(_label(node), node.op_type, "all_inputs_quantized",
                        "its weight is dequantized but its activation input is float")


def _check_node(g: _Graph, node: onnx.NodeProto) -> Iterator[Violation]:
    if node.op_type in _QDQ:
        yield from _check_qparams(g, node)
    if node.op_type == "QuantizeLinear":
        scale = g.constant(node.input[1])
        if scale is not None and scale.size != 1:
            yield Violation(_label(node), node.op_type, "per_tensor_activations", f"it has {scale.size} scales")
        for user in g.users.get(node.output[0], []):
            if user.op_type != "DequantizeLinear":
                yield Violation(_label(node), node.op_type, "q_then_dq", f"{user.op_type} {_label(user)!r} reads it")
    elif node.op_type == "DequantizeLinear":
        if node.input[0] in g.inits or g.producers.get(node.input[0]) is None:
            yield from _check_weight(g, node)
        elif g.producers[node.input[0]].op_type != "QuantizeLinear":
            source = g.producers[node.input[0]]
            yield Violation(_label(node), node.op_type, "weights_per_output_channel",
                            f"it reads the output of {source.op_type} {_label(source)!r}, not an int8 initializer")
        yield from _check_dq_readers(g, node)
    elif node.op_type in WEIGHTED_OPS:
        yield from _check_weighted(g, node)


def tensorrt_violations(model: onnx.ModelProto | str | os.PathLike) -> list[Violation]:
    """Every violation of :data:`RULES` in ``model`` (a model or a path), in graph order."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    g = _Graph(proto)
    return [v for node in g.nodes for v in _check_node(g, node)]


def check_tensorrt(model: onnx.ModelProto | str | os.PathLike) -> None:
    """LoweringError naming the first node that breaks a TensorRT rule, and the rule (and how many break any)."""
    violations = tensorrt_violations(model)
    if violations:
        more = f" ({len(violations) - 1} more violation(s))" if len(violations) > 1 else ""
        raise LoweringError(f"{violations[0]}{more}; lower with runtime='tensorrt' (fxq export --runtime tensorrt)")
