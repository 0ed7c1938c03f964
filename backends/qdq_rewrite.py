"""Rewrite the ``fxq::QMark`` markers of an exported model into ONNX QDQ form.

- activation / attention marker -> QuantizeLinear -> DequantizeLinear (per-tensor, u8/u4/u16 or signed as
  calibrated). When the declared range is narrower than the storage type (2, 3, 5, 6, 7 bits) a Clip to
  [(qmin - zp)·s, (qmax - zp)·s] keeps it, exactly: in front of QuantizeLinear for 8-bit storage (the
  Q→DQ→consumer pattern ORT fuses stays intact), after DequantizeLinear for int4 storage (ORT 1.32's
  Clip→QuantizeLinear fusion fails on int4 zero-points; no ORT kernel fuses int4 activations anyway);
- weight marker -> integer initializer (int8 / int4 / ...) -> DequantizeLinear (``axis`` when per-channel);
  a Transpose right after it is folded into the initializer (MatMul reads the transposed weight directly).

Then dead nodes and initializers (the float weights) are removed, the ``fxq`` domain dropped, and the
intermediate shape annotations (``value_info``) cleared: the exporter invents symbolic dims for the markers'
outputs and propagates them to tensors of other sizes (ORT then warns "Shape mismatch attempting to re-use
buffer" at a new input size); onnxruntime infers shapes itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper

from fxq.backends.onnx_export import MARKER_DOMAIN, MARKER_OP
from fxq.backends.qtensor import float_tensor, integer_tensor, type_name
from fxq.backends.quant_points import QuantPoint
from fxq.errors import LoweringError
from fxq.quant.numerics import normalize_axis


@dataclass
class RewriteCounts:
    """What the rewrite produced: Q/DQ pairs by bit-width, weights by storage type, clips."""

    qdq_pairs: Counter = field(default_factory=Counter)
    weights: Counter = field(default_factory=Counter)
    clips: int = 0


@dataclass
class _Weight:
    values: np.ndarray
    point: QuantPoint
    dq: onnx.NodeProto
    axis: int | None


def _marker_name(node: onnx.NodeProto) -> str:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "name").decode()


def _qparams(point: QuantPoint, inits: list[onnx.TensorProto]) -> list[str]:
    names = [f"{point.name}/scale", f"{point.name}/zero_point"]
    inits.append(float_tensor(names[0], point.scale))
    inits.append(integer_tensor(names[1], point.zero_point, point.qrange, point.min_storage_bits))
    return names


def _clip_bounds(point: QuantPoint) -> tuple[np.float32, np.float32]:
    scale, zp = np.float32(point.scale), np.float32(point.zero_point)
    return (np.float32(point.qrange.qmin) - zp) * scale, (np.float32(point.qrange.qmax) - zp) * scale


def _clip(point: QuantPoint, source: str, output: str, inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    lo, hi = _clip_bounds(point)
    inits += [float_tensor(f"{point.name}/clip_min", lo), float_tensor(f"{point.name}/clip_max", hi)]
    return helper.make_node("Clip", [source, f"{point.name}/clip_min", f"{point.name}/clip_max"], [output],
                            name=f"{point.name}/Clip")


def _activation_nodes(node: onnx.NodeProto, point: QuantPoint, inits: list[onnx.TensorProto],
                      counts: RewriteCounts) -> list[onnx.NodeProto]:
    if point.axis is not None:
        raise LoweringError(f"quantizer node {point.name!r}: per-channel activation quantizers are not lowered; "
                            "use per-tensor activations (QSpec default)")
    scale, zp = _qparams(point, inits)
    name, source, output = point.name, node.input[0], node.output[0]
    narrow = point.bits != point.storage_bits
    clip_after = narrow and point.storage_bits == 4
    nodes = []
    if narrow and not clip_after:
        nodes.append(_clip(point, source, f"{name}/clipped", inits))
        source = f"{name}/clipped"
    nodes.append(helper.make_node("QuantizeLinear", [source, scale, zp], [f"{name}/quantized"],
                                  name=f"{name}/QuantizeLinear"))
    dequantized = f"{name}/dequantized" if clip_after else output
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}/quantized", scale, zp], [dequantized],
                                  name=f"{name}/DequantizeLinear"))
    if clip_after:
        nodes.append(_clip(point, dequantized, output, inits))
    counts.clips += narrow
    counts.qdq_pairs[point.bits] += 1
    return nodes


def _weight_node(node: onnx.NodeProto, point: QuantPoint, weight: torch.Tensor | None,
                 inits: list[onnx.TensorProto], weights: dict[str, _Weight]) -> onnx.NodeProto:
    if not isinstance(weight, torch.Tensor):
        raise LoweringError(f"weight quantizer node {point.name!r} reads {type(weight).__name__}, not a tensor; "
                            "weight quantizers must read a parameter (get_attr) of the graph")
    axis = None if point.axis is None else normalize_axis(point.axis, weight.shape, point.name)
    scale, zp = _qparams(point, inits)
    dq = helper.make_node("DequantizeLinear", [f"{point.name}/quantized", scale, zp], [node.output[0]],
                          name=f"{point.name}/DequantizeLinear")
    weights[point.name] = _Weight(point.quantize(weight), point, dq, axis)
    return dq


def _fold_transposes(nodes: list[onnx.NodeProto], outputs: set[str], weights: dict[str, _Weight]) -> None:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for w in weights.values():
        users = consumers.get(w.dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose" or w.dq.output[0] in outputs:
            continue
        transpose = users[0]
        perm = next((list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"),
                    list(reversed(range(w.values.ndim))))
        w.values = np.ascontiguousarray(w.values.transpose(perm))
        w.axis = None if w.axis is None else perm.index(w.axis)
        w.dq.output[0] = transpose.output[0]
        nodes.remove(transpose)


def _materialize(graph: onnx.GraphProto, weights: dict[str, _Weight], counts: RewriteCounts) -> None:
    for name, w in weights.items():
        graph.initializer.append(integer_tensor(f"{name}/quantized", w.values, w.point.qrange,
                                                w.point.min_storage_bits))
        if w.axis is not None:
            w.dq.attribute.append(helper.make_attribute("axis", w.axis))
        counts.weights[type_name(w.point.qrange, w.point.min_storage_bits)] += 1


def prune(graph: onnx.GraphProto) -> None:
    """Remove nodes no graph output depends on, then initializers no node reads."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                    needed.update(i for n in sub.node for i in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def rewrite_markers(model: onnx.ModelProto, points: Mapping[str, QuantPoint],
                    weights: Mapping[str, torch.Tensor | None]) -> RewriteCounts:
    """Replace every marker of ``model`` (in place) by its QDQ form; returns what was produced."""
    graph, counts = model.graph, RewriteCounts()
    inits: list[onnx.TensorProto] = []
    pending: dict[str, _Weight] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != MARKER_DOMAIN or node.op_type != MARKER_OP:
            nodes.append(node)
            continue
        point = points[_marker_name(node)]
        if point.kind == "weight":
            nodes.append(_weight_node(node, point, weights.get(point.name), inits, pending))
        else:
            nodes.extend(_activation_nodes(node, point, inits, counts))
    _fold_transposes(nodes, {o.name for o in graph.output}, pending)
    _materialize(graph, pending, counts)  # before the nodes are copied into the graph: it edits them
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    prune(graph)
    del graph.value_info[:]
    kept = [op for op in model.opset_import if op.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return counts
