"""The one Q step and the one int32 bias rounding against independent float64 references of ONNX.

Every user of the shared numerics is checked on the same values: :func:`fake_quantize` (the graph),
:func:`quantize_linear` (the step itself), :meth:`QuantPoint.quantize` (the integers the lowering stores),
and for biases :class:`BiasQuantizer` (the graph) and :func:`quantize_conv_biases` (the stored int32).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fxq.backends.quant_points import QuantPoint
from fxq.backends.runtime_rewrite import quantize_conv_biases
from fxq.passes.runtime_prep import BiasQuantizer
from fxq.quant import FakeQuantizer
from fxq.quant.numerics import IntRange, fake_quantize, int32_bias, quantize_linear

# ---------------------------------------------------------------------------------------------------------
# Independent references (float64 numpy; float32 only where ONNX computes in float32)


def ref_round_half_even(v: np.ndarray) -> np.ndarray:
    """Round half to even by floor and a parity fix, without np.round / torch.round."""
    f = np.floor(v)
    frac = v - f  # exact: v holds a float32 value
    up = (frac > 0.5) | ((frac == 0.5) & (np.mod(f, 2) == 1))
    return f + up


def f32_quotient(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The float32 quotient x / s as a float64 array (float64 division rounded once to float32 is the correctly
    rounded float32 quotient: 53 >= 2·24 + 2 bits)."""
    return (x.astype(np.float64) / s.astype(np.float64)).astype(np.float32).astype(np.float64)


def ref_quantize_linear(x, scale, zp, qmin, qmax, axis):
    """ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point) into [qmin, qmax], as int64."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    s = np.asarray(scale, np.float32).reshape(shape)
    z = np.asarray(zp, np.float64).reshape(shape)
    return np.clip(ref_round_half_even(f32_quotient(x, s)) + z, qmin, qmax).astype(np.int64)


def ref_dequantize(q, scale, zp, axis):
    """ONNX DequantizeLinear in float32: (q - zp) · scale, one rounding (an int times a float32 is exact in float64)."""
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    s = np.asarray(scale, np.float32).astype(np.float64).reshape(shape)
    return ((q - np.asarray(zp, np.float64).reshape(shape)) * s).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Values: exact ties, near ties, random, saturating


def exact_ties(scale: float, ks: np.ndarray) -> np.ndarray:
    """float32 x with x / scale exactly k + 0.5 in float32 (those k for which such an x = fl((k + 0.5)·s) exists)."""
    s = np.float32(scale)
    x = ((ks + 0.5) * np.float64(s)).astype(np.float32)
    return x[f32_quotient(x, np.asarray(s)) == ks + 0.5]


def stress_values(qmin, qmax, scale, zp, n, rng) -> np.ndarray:
    """n float32 values for one channel: a quarter exact ties, the rest near ties, random and saturating."""
    ks = np.arange(qmin - zp - 3, qmax - zp + 3)
    ties = exact_ties(scale, np.resize(ks, n // 4))
    s = np.float64(np.float32(scale))
    rest = n - ties.size
    k = rng.integers(qmin - zp - 3, qmax - zp + 3, size=rest)
    kind = rng.integers(0, 4, size=rest)
    values = np.select(
        [kind == 0, kind == 1, kind == 2],
        [(k + 0.5) * s * (1 + rng.choice([-1e-7, 1e-7], size=rest)), (k + rng.uniform(-1, 1, size=rest)) * s,
         rng.standard_normal(rest) * (qmax - qmin) * s],
        rng.choice([-1.0, 1.0], size=rest) * (qmax - qmin + 10) * s * rng.uniform(1, 1e6, size=rest),
    )
    return np.concatenate([ties, values.astype(np.float32)])


BITS = [(bits, signed) for bits in (2, 4, 8) for signed in (True, False)]
SCALES = [0.125, 0.0371, 3.7]


def _case(bits, signed, axis, seed, n=380):
    """(x [3, 4, n] float32, scale, zero-point), per-tensor or per-channel along axis 1; affine when unsigned."""
    qrange = IntRange.of(bits, signed)
    rng = np.random.default_rng(seed)
    channels = 1 if axis is None else 4
    scales = np.array(SCALES * 2, np.float32)[:channels]
    zps = np.zeros(channels, np.int64) if signed else rng.integers(qrange.qmin, qrange.qmax + 1, size=channels)
    per = 3 * 4 * n // channels
    cols = [stress_values(qrange.qmin, qrange.qmax, scales[c], zps[c], per, rng) for c in range(channels)]
    if axis is None:
        return qrange, cols[0].reshape(3, 4, n), scales[0], zps[0]
    return qrange, np.stack([c.reshape(3, n) for c in cols], axis=1), scales, zps


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("bits, signed", BITS)
def test_every_q_step_matches_the_float64_quantize_linear(bits, signed, axis):
    qrange, x, scale, zp = _case(bits, signed, axis, seed=bits * 10 + signed + (axis or 0))
    expected = ref_quantize_linear(x, scale, zp, qrange.qmin, qrange.qmax, axis)
    assert (expected == qrange.qmin).any() and (expected == qrange.qmax).any()  # saturation is exercised
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    tensor = torch.from_numpy(x)
    s_t = torch.from_numpy(np.asarray(scale, np.float32)).reshape(shape)
    z_t = torch.from_numpy(np.asarray(zp, np.float32)).reshape(shape)

    step = quantize_linear(tensor, s_t, z_t, qrange)
    np.testing.assert_array_equal(step.numpy().astype(np.int64), expected)

    flat = -1 if axis is not None else ()
    point = QuantPoint("q", "weight", "w", qrange, axis, np.asarray(scale, np.float32).reshape(flat),
                       np.asarray(zp, np.int64).reshape(flat), True)
    np.testing.assert_array_equal(point.quantize(tensor), expected)

    dequantized = fake_quantize(tensor, torch.as_tensor(scale), torch.as_tensor(zp, dtype=torch.float32), qrange, axis)
    np.testing.assert_array_equal(dequantized.numpy(), ref_dequantize(expected, scale, zp, axis))


def test_ties_round_to_even_in_every_q_step():
    qrange = IntRange.of(8, True)
    x = exact_ties(0.0371, np.arange(-20, 20))
    assert x.size >= 20
    k = np.floor(f32_quotient(x, np.asarray(np.float32(0.0371))))
    even = np.where(k % 2 == 0, k, k + 1).astype(np.int64)  # of k and k + 1, the even one
    got = quantize_linear(torch.from_numpy(x), torch.tensor(0.0371), torch.tensor(0.0), qrange)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), even)
    point = QuantPoint("q", "weight", "w", qrange, None, np.array(0.0371, np.float32), np.array(0), True)
    np.testing.assert_array_equal(point.quantize(torch.from_numpy(x)), even)


def _ort_quantize_linear(x, scale, zp, signed):
    zp_type = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", zp_type, list(x.shape))],
        [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), helper.make_tensor("z", zp_type, [], [int(zp)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.int64)


@pytest.mark.parametrize("signed", [True, False])
def test_the_reference_is_onnxruntime_quantize_linear(signed):
    """The float64 reference itself agrees with onnxruntime's QuantizeLinear (8 bits: its integers are the
    output), so the tests above compare against ONNX, not against a guess."""
    qrange, x, scale, zp = _case(8, signed, None, seed=7)
    expected = ref_quantize_linear(x, scale, zp, qrange.qmin, qrange.qmax, None)
    np.testing.assert_array_equal(_ort_quantize_linear(x, scale, zp, signed), expected)


def test_q_step_passes_gradients_straight_through_inside_the_range():
    qrange = IntRange.of(4, True)
    x = torch.tensor([0.3, 1.2, -0.7, 100.0, -100.0], requires_grad=True)
    quantize_linear(x, torch.tensor(0.5), torch.tensor(0.0), qrange).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.array([2.0, 2.0, 2.0, 0.0, 0.0], np.float32))


# ---------------------------------------------------------------------------------------------------------
# int32 bias: one rounding for the graph (BiasQuantizer) and the stored initializer (quantize_conv_biases)

INT32_MIN = -(2**31)
INT32_MAX_F32 = 2**31 - 2 ** (31 - 24)  # the largest float32 below 2^31: float32 keeps 24 significant bits


def ref_int32_bias(bias, s_x, s_w):
    """round_half_even(bias / (s_x·s_w)) with float32 scale and quotient, saturated to int32 (float32-held)."""
    scale = (np.float64(np.float32(s_x)) * s_w.astype(np.float32).astype(np.float64)).astype(np.float32)
    return np.clip(ref_round_half_even(f32_quotient(bias, scale)), INT32_MIN, INT32_MAX_F32).astype(np.int64)


def _bias_case(seed):
    rng = np.random.default_rng(seed)
    s_x = np.float32(0.0213)
    s_w = np.concatenate([[2.0**-7, 0.25], rng.uniform(1e-3, 0.1, size=10)]).astype(np.float32)
    scale = (s_x * s_w).astype(np.float32)
    bias = (rng.standard_normal(12) * 50 * scale).astype(np.float32)
    ties = [exact_ties(float(scale[c]), np.arange(-6, 6)) for c in range(12)]
    c = next(i for i, t in enumerate(ties) if t.size)
    bias[c] = ties[c][0]
    bias[-2:] = [3e30, -3e30]  # saturate both ends
    return bias, s_x, s_w, c


def test_int32_bias_matches_the_float64_reference_ties_and_saturation():
    bias, s_x, s_w, tie = _bias_case(0)
    expected = ref_int32_bias(bias, s_x, s_w)
    assert expected[-2] == INT32_MAX_F32 and expected[-1] == INT32_MIN
    scale = torch.from_numpy((s_x * s_w).astype(np.float32))
    got = int32_bias(torch.from_numpy(bias), scale)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), expected)
    assert expected[tie] % 2 == 0


def _conv_model(bias: np.ndarray, s_x: np.float32, s_w: np.ndarray) -> onnx.ModelProto:
    """x → Q → DQ → Conv(DQ(int8 per-channel weight), float bias)."""
    out = bias.size
    inits = [numpy_helper.from_array(np.asarray(s_x, np.float32), "sx"),
             numpy_helper.from_array(np.asarray(128, np.uint8), "zx"),
             numpy_helper.from_array(np.ones((out, 2, 1, 1), np.int8), "w"),
             numpy_helper.from_array(s_w, "sw"), numpy_helper.from_array(np.zeros(out, np.int8), "zw"),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out, 3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_graph_and_stored_int32_bias_are_the_same_integers():
    bias, s_x, s_w, _ = _bias_case(1)
    expected = ref_int32_bias(bias, s_x, s_w)

    model = _conv_model(bias, s_x, s_w)
    assert quantize_conv_biases(model) == {"conv": ["bias stored int32 with scale s_x·s_w"]}
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["conv/bias_quantized"].data_type == TensorProto.INT32
    stored = numpy_helper.to_array(inits["conv/bias_quantized"]).astype(np.int64)
    np.testing.assert_array_equal(stored, expected)

    x_q, w_q = FakeQuantizer(8, symmetric=False), FakeQuantizer(8, symmetric=True, axis=0)
    x_q.set_qparams(torch.tensor(s_x), torch.tensor(128.0))
    w_q.set_qparams(torch.from_numpy(s_w), None)
    module = BiasQuantizer(x_q, w_q)
    graph_bias = module(torch.from_numpy(bias))
    scale = numpy_helper.to_array(inits["conv/bias_scale"])
    np.testing.assert_array_equal(module.scale().numpy(), scale)
    np.testing.assert_array_equal(graph_bias.numpy(), (stored * scale.astype(np.float64)).astype(np.float32))
