"""The space-to-depth rewrite of strided few-channel convs: same integers out of ORT, at any input size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from fxq.backends.session import session_options
from fxq.backends.space_to_depth import _rearranged, space_to_depth_convs


def _qdq_conv(channels: int, kernel: int, stride: int, pad: int, seed: int = 0, int4: bool = False) -> onnx.ModelProto:
    """x (dynamic H, W) → Q(u8) → DQ → Conv(DQ(s8 per-channel weight), int32 bias) → Q → DQ; with ``int4`` the
    weight is stored int4 and cast to int8 before its DequantizeLinear (as the runtime-aware lowering does)."""
    rng = np.random.default_rng(seed)
    out = 16
    shape = (out, channels, kernel, kernel)
    weight = (helper.make_tensor("w_int4", TensorProto.INT4, shape, rng.integers(-8, 8, shape).flatten().tolist())
              if int4 else numpy_helper.from_array(rng.integers(-127, 128, shape).astype(np.int8), "w"))
    inits = [
        weight,
        numpy_helper.from_array((rng.random(out).astype(np.float32) + 0.5) * 1e-2, "ws"),
        numpy_helper.from_array(np.zeros(out, np.int8), "wz"),
        numpy_helper.from_array(rng.integers(-500, 500, out).astype(np.int32), "b"),
        numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.uint8(120), "xz"),
        numpy_helper.from_array(np.float32(0.3), "ys"), numpy_helper.from_array(np.uint8(100), "yz"),
    ]
    inits.append(numpy_helper.from_array((numpy_helper.to_array(inits[1]) * 0.02).astype(np.float32), "bs"))
    inits.append(numpy_helper.from_array(np.zeros(out, np.int32), "bz"))
    cast = [helper.make_node("Cast", ["w_int4"], ["w"], name="w_cast", to=TensorProto.INT8)] if int4 else []
    nodes = cast + [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xd"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wd", axis=0),
        helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], name="bd", axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="stem", kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=[pad] * 4),
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"], name="yq"),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"], name="out"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, channels, "h", "w"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out, "oh", "ow"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), session_options(threads=1),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kernel, stride, pad, int4", [(7, 2, 3, False), (3, 2, 1, False), (5, 2, 0, False),
                                                      (7, 3, 2, False), (7, 2, 3, True)])
def test_rewritten_conv_gives_the_same_integers_at_any_size(kernel, stride, pad, int4):
    original = _qdq_conv(3, kernel, stride, pad, int4=int4)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    changes = space_to_depth_convs(rewritten)
    onnx.checker.check_model(rewritten, full_check=True)
    assert list(changes) == ["stem"] and "space-to-depth" in changes["stem"][0]
    stored = {t.name: t.data_type for t in rewritten.graph.initializer}
    assert stored["w_int4" if int4 else "w"] == (TensorProto.INT4 if int4 else TensorProto.INT8)
    before, after = _session(original), _session(rewritten)
    rng = np.random.default_rng(1)
    for h, w in [(32, 32), (33, 47), (20, 19), (64, 40)]:
        x = (rng.standard_normal((1, 3, h, w)) * 2).astype(np.float32)
        a, b = before.run(None, {"x": x})[0], after.run(None, {"x": x})[0]
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_rewritten_stem_runs_qlinearconv(tmp_path):
    model = _qdq_conv(3, 7, 2, 3)
    space_to_depth_convs(model)
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QLinearConv"] == 1 and ops["SpaceToDepth"] == 1 and ops["Conv"] == 0


@pytest.mark.parametrize("channels, kernel, stride, pad", [(3, 7, 1, 3), (8, 7, 2, 3), (3, 4, 2, 1)],
                         ids=["stride-1", "many-channels", "even-kernel"])
def test_ineligible_convs_are_left_alone(channels, kernel, stride, pad):
    model = _qdq_conv(channels, kernel, stride, pad)
    before = model.SerializeToString()
    assert space_to_depth_convs(model) == {}
    assert model.SerializeToString() == before


def test_rearranged_kernel_against_explicit_sums():
    """float64: conv(x, w, stride s, pad p) equals a stride-1 conv of SpaceToDepth(pad(x)) (ONNX channel
    order, built here by explicit indexing) with the rearranged kernel."""
    rng = np.random.default_rng(2)
    s, k, p, c = 2, 7, 3, 3
    x = rng.standard_normal((1, c, 21, 18))
    w = rng.standard_normal((5, c, k, k))
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=s, padding=p)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p + 1), (p, p)))  # 21 + 7 = 28 and 18 + 6 = 24: multiples of s
    d = np.zeros((1, s * s * c, xp.shape[2] // s, xp.shape[3] // s))
    for b in range(s):
        for b2 in range(s):
            for ch in range(c):
                d[0, (b * s + b2) * c + ch] = xp[0, ch, b::s, b2::s]
    got = F.conv2d(torch.from_numpy(d), torch.from_numpy(_rearranged(w, s)))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def _integer_reference(model: onnx.ModelProto, x: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """The QDQ conv of :func:`_qdq_conv` in int64 / float64: quantize, integer conv + int32 bias, requantize."""
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    xq = np.clip(np.round(x / t["xs"]) + t["xz"], 0, 255) - t["xz"]
    acc = F.conv2d(torch.from_numpy(xq), torch.from_numpy(t["w"]), torch.from_numpy(t["b"]), stride, pad).numpy()
    y = acc * (t["xs"] * t["ws"])[None, :, None, None]
    return (np.clip(np.round(y / t["ys"]) + t["yz"], 0, 255) - t["yz"]) * t["ys"]


def test_integer_kernels_with_full_range_int8_weights_compute_exact_integers():
    """ORT's u8×s8 kernels saturate int16 pair sums on x86 CPUs without VNNI (VPMADDUBSW); with the session options
    fxq uses, weights in [-127, 127] and activations in [0, 255] give the int64 reference's output steps."""
    model = _qdq_conv(8, 3, 1, 1, seed=3)
    session = _session(model)
    x = (np.random.default_rng(2).standard_normal((1, 8, 24, 24)) * 2.5).astype(np.float32)
    got = session.run(None, {"x": x})[0].astype(np.float64)
    ref = _integer_reference(model, x.astype(np.float64), 1, 1)
    steps = np.abs(got - ref) / 0.3
    assert steps.max() <= 1 + 1e-6 and (steps > 0.5).mean() < 1e-3  # at most a requantization tie, rarely
