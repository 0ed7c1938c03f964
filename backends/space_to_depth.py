"""Space-to-depth rewrite of strided convolutions on few channels (the ResNet stem) for ORT CPU.

ORT's QLinearConv runs a 7×7 stride-2 conv on 3 input channels (the ResNet stem) at a fraction of the speed
of the other convolutions: its reduction is short and oddly shaped. The same integer sums come out of a
stride-1 conv on the space-to-depth rearranged input::

    y[o, i, j] = Σ_{c,u,v} w[o, c, u, v] · xp[c, s·i + u, s·j + v]                       (xp: x padded by p)
               = Σ_{c,b,b',a,a'} w'[o, (b·s + b')·C + c, a, a'] · d[(b·s + b')·C + c, i + a, j + a']

with u = s·a + b, d = SpaceToDepth(xp, s) and w' the kernel zero-padded to s·⌈k/s⌉ and rearranged the same
way. The 4×4 conv on 12 channels that replaces a 7×7/2 conv on 3 runs about twice as fast.

Numerics are unchanged: the padding is float 0, which quantizes to the zero-point (the value the original conv
pads with); the rearranged input is quantized with the original scale and zero-point; weight integers, scales
and the bias are the same, and each output sums the same products (plus products with zero weights).

Applies to a Conv whose input is a dequantized activation and whose weight a dequantized int8 or int4 constant
(possibly through the int4→int8 Cast of :mod:`fxq.backends.runtime_rewrite`), with
group 1, dilation 1, equal strides s ≥ 2, kernel sizes k ≡ 1 (mod s) (so that the output size is unchanged),
symmetric pads and at most :data:`MAX_INPUT_CHANNELS` input channels. The padding is computed from the input's
shape at run time (dynamic-shape models), rounding the padded size up to a multiple of s.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxq.backends.runtime_rewrite import GraphIndex

MAX_INPUT_CHANNELS = 4
_INTEGER_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)

Changes = dict[str, list[str]]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _stride(conv: onnx.NodeProto, kernel: tuple[int, int]) -> int | None:
    """The conv's stride s when the rewrite applies to its attributes, else None."""
    a = _attrs(conv)
    strides = list(a.get("strides", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    s = strides[0]
    ok = (a.get("group", 1) == 1 and list(a.get("dilations", [1, 1])) == [1, 1] and a.get("auto_pad", b"NOTSET")
          in (b"NOTSET", "NOTSET") and len(strides) == 2 and strides[1] == s and s >= 2
          and all(k % s == 1 for k in kernel) and pads[:2] == pads[2:])
    return s if ok else None


def _rearranged(w: np.ndarray, s: int) -> np.ndarray:
    """w [O, C, kh, kw] → w' [O, s·s·C, ⌈kh/s⌉, ⌈kw/s⌉] in SpaceToDepth's channel order (b, b', c)."""
    o, c, kh, kw = w.shape
    ah, aw = -(-kh // s), -(-kw // s)
    padded = np.zeros((o, c, ah * s, aw * s), dtype=w.dtype)
    padded[:, :, :kh, :kw] = w
    return padded.reshape(o, c, ah, s, aw, s).transpose(0, 3, 5, 1, 2, 4).reshape(o, s * s * c, ah, aw)


def _pad_nodes(x: str, prefix: str, s: int, pads: list[int], inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """Nodes computing Pad(x) with (p_h, p_w) before and p + e after, e rounding H + 2p, W + 2p up to s."""
    ph, pw = pads[0], pads[1]
    consts = {"two_p": np.array([2 * ph, 2 * pw], np.int64), "s": np.array([s, s], np.int64),
              "p": np.array([ph, pw], np.int64), "begin": np.array([0, 0, ph, pw, 0, 0], np.int64),
              "start": np.array([2], np.int64), "end": np.array([4], np.int64)}
    for key, value in consts.items():
        inits.append(numpy_helper.from_array(value, f"{prefix}/{key}"))
    c = {key: f"{prefix}/{key}" for key in consts}
    n = f"{prefix}/"
    return [
        helper.make_node("Shape", [x], [n + "shape"], name=n + "Shape"),
        helper.make_node("Slice", [n + "shape", c["start"], c["end"]], [n + "hw"], name=n + "Slice"),
        helper.make_node("Add", [n + "hw", c["two_p"]], [n + "padded"], name=n + "AddPads"),
        helper.make_node("Mod", [n + "padded", c["s"]], [n + "rem"], name=n + "Mod"),
        helper.make_node("Sub", [c["s"], n + "rem"], [n + "short"], name=n + "Sub"),
        helper.make_node("Mod", [n + "short", c["s"]], [n + "extra"], name=n + "ModExtra"),
        helper.make_node("Add", [n + "extra", c["p"]], [n + "end_pads"], name=n + "AddEnd"),
        helper.make_node("Concat", [c["begin"], n + "end_pads"], [n + "pads"], name=n + "Concat", axis=0),
        helper.make_node("Pad", [x, n + "pads"], [n + "x_padded"], name=n + "Pad"),
        helper.make_node("SpaceToDepth", [n + "x_padded"], [n + "x_s2d"], name=n + "SpaceToDepth", blocksize=s),
    ]


def space_to_depth_convs(model: onnx.ModelProto) -> Changes:
    """Rewrite every eligible strided conv (see the module docstring) in place; {conv name: [change]}."""
    g = GraphIndex(model)
    changes: Changes = {}
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        x_dq, w_dq = g.producers.get(conv.input[0]), g.producers.get(conv.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        x_q = g.producers.get(x_dq.input[0])
        w_init = _weight_initializer(w_dq, g)
        if x_q is None or x_q.op_type != "QuantizeLinear" or w_init is None \
                or len(g.users.get(w_dq.output[0], [])) != 1:
            continue
        w = numpy_helper.to_array(w_init)
        if w.ndim != 4 or w.shape[1] > MAX_INPUT_CHANNELS:
            continue
        stride = _stride(conv, (w.shape[2], w.shape[3]))
        if stride is None:
            continue
        _rewrite(g.graph, conv, x_q, x_dq, w_init, w, stride)
        new = _rearranged(w, stride).shape
        changes.setdefault(conv.name, []).append(
            f"{w.shape[2]}×{w.shape[3]}/{stride} conv on {w.shape[1]} channels run as space-to-depth({stride}) + "
            f"{new[2]}×{new[3]}/1 conv on {new[1]} channels (same integer sums)")
    return changes


def _weight_initializer(w_dq: onnx.NodeProto, g: GraphIndex) -> TensorProto | None:
    """The integer initializer the weight DequantizeLinear reads (directly or through the int4→int8 Cast), when
    nothing else reads it; else None."""
    name = w_dq.input[0]
    cast = g.producers.get(name)
    if cast is not None and cast.op_type == "Cast":
        if len(g.users.get(name, [])) != 1:
            return None
        name = cast.input[0]
    init = g.inits.get(name)
    if init is None or init.data_type not in _INTEGER_TYPES or len(g.users.get(name, [])) != 1:
        return None
    return init


def _rewrite(graph: onnx.GraphProto, conv: onnx.NodeProto, x_q: onnx.NodeProto, x_dq: onnx.NodeProto,
             w_init: TensorProto, w: np.ndarray, s: int) -> None:
    prefix = f"{conv.name}/space_to_depth"
    pads = list(_attrs(conv).get("pads", [0, 0, 0, 0]))
    new_inits: list[TensorProto] = []
    nodes = _pad_nodes(x_q.input[0], prefix, s, pads, new_inits)
    q = helper.make_node("QuantizeLinear", [nodes[-1].output[0], *x_q.input[1:]], [f"{prefix}/x_q"],
                         name=f"{prefix}/QuantizeLinear")
    q.attribute.extend(x_q.attribute)
    dq = helper.make_node("DequantizeLinear", [q.output[0], *x_dq.input[1:]], [f"{prefix}/x_dq"],
                          name=f"{prefix}/DequantizeLinear")
    dq.attribute.extend(x_dq.attribute)
    position = list(graph.node).index(conv)
    for offset, node in enumerate([*nodes, q, dq]):
        graph.node.insert(position + offset, node)
    graph.initializer.extend(new_inits)
    w_init.CopyFrom(numpy_helper.from_array(_rearranged(w, s), w_init.name))
    conv.input[0] = dq.output[0]
    kept = [a for a in conv.attribute if a.name not in ("strides", "pads", "kernel_shape")]
    del conv.attribute[:]
    conv.attribute.extend(kept)
    ah, aw = -(-w.shape[2] // s), -(-w.shape[3] // s)
    conv.attribute.extend([helper.make_attribute("strides", [1, 1]), helper.make_attribute("pads", [0, 0, 0, 0]),
                           helper.make_attribute("kernel_shape", [ah, aw])])
