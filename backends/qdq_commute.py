"""Move activation Q/DQ pairs below the data-movement ops between them and the weighted op that reads them, so
that QuantizeLinear → DequantizeLinear sits directly on the Conv / MatMul / Gemm input.

``x → Q → DQ → Transpose → MatMul`` becomes ``x → Transpose → Q → DQ → MatMul`` (likewise Reshape, Squeeze,
Unsqueeze, Flatten): per-tensor quantization commutes with ops that only move data, so the integers and the
numerics are unchanged. TensorRT's placement recommendations put Q/DQ on the inputs of weighted ops
(:mod:`fxq.backends.tensorrt_rules`), and onnxruntime 1.32 CPU cannot load the other form in signed int8 at
optimization level "extended" or above: its QDQ propagation copies the pair past the Transpose with
``output_dtype`` INT8, then its s8→u8 rewrite makes the zero-point uint8 ("output_dtype INT8 does not match
y_zero_point type UINT8").
"""

from __future__ import annotations

import onnx

from fxq.backends.node_map import COMPUTE_OPS, consumers

#: Ops that only move data (per-tensor Q/DQ commutes with them).
MOVEMENT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")

Changes = dict[str, list[str]]


def _scalar(inits: dict[str, onnx.TensorProto], name: str) -> bool:
    tensor = inits.get(name)
    return tensor is not None and list(tensor.dims) in ([], [1])


def _movable(dq: onnx.NodeProto, producers: dict, users: dict,
             inits: dict) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(Q, movement op) when ``dq``'s pair can move below its one reader, a movement op feeding a weighted op."""
    q = producers.get(dq.input[0])
    readers = users.get(dq.output[0], [])
    if q is None or q.op_type != "QuantizeLinear" or len(users.get(q.output[0], [])) != 1 or len(readers) != 1:
        return None
    move = readers[0]
    if move.op_type not in MOVEMENT_OPS or move.input[0] != dq.output[0] or not _scalar(inits, q.input[1]):
        return None
    if not all(u.op_type in COMPUTE_OPS for u in users.get(move.output[0], [])):
        return None
    return q, move


def sink_qdq_below_movement(model: onnx.ModelProto) -> Changes:
    """Move every per-tensor activation Q/DQ pair whose one reader is a movement op feeding weighted ops below
    that op; returns {weighted op name: [change]}."""
    graph, changes = model.graph, {}
    inits = {t.name: t for t in graph.initializer}
    moved = True
    while moved:
        moved = False
        producers = {o: n for n in graph.node for o in n.output}
        users = consumers(graph)
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
            found = _movable(dq, producers, users, inits)
            if found is None:
                continue
            q, move = found
            source, moved_out = q.input[0], move.output[0]
            readers = users.get(moved_out, [])
            move.input[0] = source
            q.input[0] = moved_out
            for reader in readers:
                for i, name in enumerate(reader.input):
                    if name == moved_out:
                        reader.input[i] = dq.output[0]
            _reorder(graph, move, q)
            for reader in readers:
                changes.setdefault(reader.name, []).append(f"Q/DQ {q.name.rsplit('/', 1)[0]} moved below "
                                                           f"{move.op_type} onto its input (same integers)")
            moved = True
            break
    return changes


def _reorder(graph: onnx.GraphProto, move: onnx.NodeProto, q: onnx.NodeProto) -> None:
    """Put ``move`` right before ``q`` so the node list stays topologically sorted."""
    nodes = list(graph.node)
    nodes.remove(move)
    nodes.insert(nodes.index(q), move)
    del graph.node[:]
    graph.node.extend(nodes)
