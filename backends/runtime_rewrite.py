"""QDQ-model rewrites that put each quantized node on a fast ORT CPU kernel at the same numerics.

Applied to a lowered model (:func:`fxq.backends.lower_qdq.build_qdq_model`) whose compute nodes carry FX
names (:mod:`fxq.backends.node_map`):

- **narrow weights read by an integer kernel**: a 2–4-bit weight stored int4 / uint4 with quantized
  activations gets a ``Cast`` to int8 / uint8 before its DequantizeLinear (zero-point stored int8 / uint8).
  The file keeps the 4-bit storage; onnxruntime folds the Cast at load and fuses the int8 pattern into
  QLinearConv / MatMulIntegerToFloat / QLinearMatMul. The integers, scales and zero-points are unchanged:
  same numerics.
- **narrow weight-only MatMul weights** (float activations): the per-channel int4 DequantizeLinear becomes a
  blocked one (axis 0, ``block_size`` a power of two ≥ 16 dividing K, each column's scale repeated per block),
  which onnxruntime fuses into MatMulNBits (fp32 compute at the session's accuracy level 1): same numerics,
  and the weight is no longer dequantized on every run.
- **conv bias**: a float bias of a Conv whose input and weight are dequantized becomes an int32
  DequantizeLinear with scale s_x·s_w and round-half-even integers — what onnxruntime would compute itself
  when fusing, made explicit (and exact w.r.t. a reference run through :func:`fxq.passes.runtime_prep.quantize_biases`).

Each rewrite returns {FX node name: [change, ...]} for the report.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fxq.backends.node_map import COMPUTE_OPS, consumers
from fxq.backends.qtensor import float_tensor, integer_tensor, onnx_type
from fxq.quant.numerics import INT32, IntRange, bias_scale, int32_bias

#: 4-bit weight type → the type an 8-bit kernel reads it as (its range stored at 8 bits or more).
_NARROW = {t: onnx_type(IntRange.of(4, signed), min_bits=8)
           for t, signed in ((TensorProto.INT4, True), (TensorProto.UINT4, False))}
MIN_BLOCK, MAX_BLOCK = 16, 256

Changes = dict[str, list[str]]


class GraphIndex:
    """Lookups over one graph: initializers, producers and consumers by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.users = consumers(self.graph)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def dequantized_activation(self, name: str) -> bool:
        """Whether tensor ``name`` is the output of a DequantizeLinear of an activation (not a constant)."""
        node = self.producers.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Squeeze", "Unsqueeze"):
            node = self.producers.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in self.inits

    def weight_dq(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing ``name`` from a constant (initializer, possibly through a Cast)."""
        node = self.producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        source = self.producers.get(node.input[0])
        constant = node.input[0] in self.inits or (source is not None and source.op_type == "Cast"
                                                   and source.input[0] in self.inits)
        return node if constant else None

    def replace_initializer(self, tensor: TensorProto) -> None:
        old = self.inits[tensor.name]
        self.graph.initializer.remove(old)
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor


def _weight_readers(g: GraphIndex) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(weight DequantizeLinear, compute node reading it) for every quantized weight."""
    pairs = []
    for node in g.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in g.inits:
            readers = [u for u in g.users.get(node.output[0], []) if u.op_type in COMPUTE_OPS]
            if len(readers) == 1:
                pairs.append((node, readers[0]))
    return pairs


def _narrow_type(g: GraphIndex, dq: onnx.NodeProto) -> int | None:
    data_type = g.inits[dq.input[0]].data_type
    return data_type if data_type in _NARROW else None


def _cast_to_int8(g: GraphIndex, dq: onnx.NodeProto, wide: int) -> None:
    prefix = dq.name.rsplit("/", 1)[0]
    cast = helper.make_node("Cast", [dq.input[0]], [f"{prefix}/int8"], name=f"{prefix}/Cast", to=wide)
    g.graph.node.insert(list(g.graph.node).index(dq), cast)
    dq.input[0] = cast.output[0]
    if len(dq.input) > 2:
        zp = g.array(dq.input[2]).astype(helper.tensor_dtype_to_np_dtype(wide))
        g.replace_initializer(numpy_helper.from_array(zp, dq.input[2]))


def _block_size(k: int) -> int | None:
    block = MAX_BLOCK
    while block >= MIN_BLOCK and k % block:
        block //= 2
    return block if block >= MIN_BLOCK else None


def _axis(dq: onnx.NodeProto) -> int | None:
    return next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), None)


def _to_blocked(g: GraphIndex, dq: onnx.NodeProto, reader: onnx.NodeProto) -> bool:
    values = g.array(dq.input[0])
    axis = _axis(dq)
    if reader.op_type != "MatMul" or reader.input[1] != dq.output[0] or values.ndim != 2 \
            or (axis is not None and axis != 1):
        return False
    k, n = values.shape
    block = _block_size(k)
    if block is None:
        return False
    tile = (k // block, 1) if axis == 1 else (k // block, n)
    scale = np.tile(g.array(dq.input[1]).reshape(1, -1), tile).astype(np.float32)
    g.replace_initializer(numpy_helper.from_array(scale, dq.input[1]))
    if len(dq.input) > 2:
        zp_tensor = g.inits[dq.input[2]]
        zp = np.tile(g.array(dq.input[2]).astype(np.int64).reshape(1, -1), tile)
        g.replace_initializer(helper.make_tensor(dq.input[2], zp_tensor.data_type, zp.shape, zp.flatten().tolist()))
    del dq.attribute[:]
    dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
    return True


def narrow_weights(model: onnx.ModelProto) -> Changes:
    """Cast 2–4-bit weights read with quantized activations to int8; block weight-only MatMul weights."""
    g, changes = GraphIndex(model), {}
    for dq, reader in _weight_readers(g):
        narrow = _narrow_type(g, dq)
        if narrow is None:
            continue
        stored = TensorProto.DataType.Name(narrow).lower()
        if g.dequantized_activation(reader.input[0]):
            _cast_to_int8(g, dq, _NARROW[narrow])
            wide = TensorProto.DataType.Name(_NARROW[narrow]).lower()
            changes.setdefault(reader.name, []).append(f"weight stored {stored}, cast to {wide} at load for the "
                                                       f"{wide} kernel (same integers)")
        elif _to_blocked(g, dq, reader):
            changes.setdefault(reader.name, []).append(f"weight-only {stored} MatMul weight in blocks of "
                                                       f"{_axis_block(dq)} for MatMulNBits (same scales)")
    return changes


def _axis_block(dq: onnx.NodeProto) -> int:
    return next(helper.get_attribute_value(a) for a in dq.attribute if a.name == "block_size")


def _scale(g: GraphIndex, dq: onnx.NodeProto) -> np.ndarray:
    return g.array(dq.input[1]).astype(np.float32).reshape(-1)


def quantize_conv_biases(model: onnx.ModelProto, bias_values: dict[str, np.ndarray] | None = None) -> Changes:
    """Give every Conv with dequantized input and weight an int32 bias (scale s_x·s_w, round half to even).

    The float bias is the Conv's bias initializer, or ``bias_values[conv name]`` (a bias the exporter left as
    a computation, e.g. that of :class:`fxq.passes.runtime_prep.BiasQuantizer`).
    """
    g, changes, bias_values = GraphIndex(model), {}, bias_values or {}
    for conv in [n for n in g.graph.node if n.op_type == "Conv" and len(n.input) > 2]:
        w_dq = g.weight_dq(conv.input[1])
        x_dq = g.producers.get(conv.input[0])
        known = conv.input[2] in g.inits or conv.name in bias_values
        if not known or w_dq is None or x_dq is None or x_dq.op_type != "DequantizeLinear" \
                or x_dq.input[0] in g.inits:
            continue
        given = bias_values.get(conv.name)
        bias = (np.asarray(given) if given is not None else g.array(conv.input[2])).astype(np.float32)
        scale = torch.broadcast_to(bias_scale(torch.from_numpy(_scale(g, x_dq)), torch.from_numpy(_scale(g, w_dq))),
                                   bias.shape)
        q = int32_bias(torch.from_numpy(bias), scale).numpy().astype(np.int32)
        names = [f"{conv.name}/bias_quantized", f"{conv.name}/bias_scale", f"{conv.name}/bias_zero_point"]
        g.graph.initializer.extend([integer_tensor(names[0], q, INT32), float_tensor(names[1], scale.numpy()),
                                    integer_tensor(names[2], np.zeros_like(q), INT32)])
        dq = helper.make_node("DequantizeLinear", names, [f"{conv.name}/bias"], name=f"{conv.name}/bias/Dequantize",
                              axis=0)
        g.graph.node.insert(list(g.graph.node).index(conv), dq)
        conv.input[2] = dq.output[0]
        changes.setdefault(conv.name, []).append("bias stored int32 with scale s_x·s_w")
    return changes
