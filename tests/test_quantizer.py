"""FakeQuantizer: ONNX-exact numerics (numpy reference, onnxruntime), modes, gradients, bad input."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fxq.backends.session import session_options
from fxq.errors import InputError
from fxq.quant import FakeQuantizer, QSpec

# ---------------------------------------------------------------------------------------------------------
# Independent references


def int_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_qdq(x, scale, zp, qmin, qmax, axis):
    """ONNX QuantizeLinear->DequantizeLinear in float64 numpy, rounding to float32 where ONNX computes in it.

    float64 holds a float32 quotient or product exactly enough that casting it to float32 gives the
    correctly rounded float32 result (53 >= 2*24 + 2 bits), so this reproduces float32 arithmetic.
    """
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    s = np.asarray(scale, np.float32).astype(np.float64).reshape(shape)
    z = np.asarray(zp, np.float64).reshape(shape)
    v = (x.astype(np.float64) / s).astype(np.float32).astype(np.float64)
    q = np.clip(np.round(v) + z, qmin, qmax)
    return ((q - z) * s).astype(np.float32)


_ZP_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (4, True): TensorProto.INT4,
             (4, False): TensorProto.UINT4, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}


def ort_qdq(x, scale, zp, bits, signed, axis):
    """Run onnxruntime's QuantizeLinear -> DequantizeLinear (opset 21) on x."""
    shape = list(x.shape)
    zp_list = np.asarray(zp).astype(np.int64).ravel().tolist()
    inits = [
        numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
        helper.make_tensor("z", _ZP_TYPES[bits, signed], list(np.shape(zp)), zp_list),
    ]
    kw = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads=1),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def ours(x, scale, zp, bits, symmetric, axis, signed=None):
    fq = FakeQuantizer(bits, symmetric=symmetric, signed=signed, axis=axis)
    fq.set_qparams(torch.as_tensor(np.asarray(scale, np.float32)), torch.as_tensor(np.asarray(zp, np.float32)))
    with torch.no_grad():
        return fq(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------------------------------------------------
# Numerics vs the numpy reference (hypothesis)


@st.composite
def qdq_cases(draw):
    bits = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16]))
    symmetric = draw(st.booleans())
    qmin, qmax = int_range(bits, signed=symmetric)
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.one_of(st.none(), st.integers(0, ndim - 1)))
    channels = 1 if axis is None else shape[axis]
    power_of_two = st.integers(-10, 3).map(lambda k: 2.0**k)  # makes (k + 0.5) * s an exact half step
    any_scale = st.floats(1e-4, 10.0).map(lambda s: float(np.float32(s)))
    scales = draw(st.lists(st.one_of(power_of_two, any_scale), min_size=channels, max_size=channels))
    zps = [0] * channels if symmetric else draw(st.lists(st.integers(qmin, qmax), min_size=channels,
                                                              max_size=channels))
    seed = draw(st.integers(0, 2**31))
    return bits, symmetric, shape, axis, np.array(scales, np.float32), np.array(zps), seed


def _stress_values(shape, axis, scales, zps, qmin, qmax, rng):
    """Random, exact-half-step and saturating values, each per its channel's scale and zero-point."""
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = scales.astype(np.float64).reshape(bshape)
    z = zps.astype(np.float64).reshape(bshape)
    k = rng.integers(qmin - 3, qmax + 3, size=shape) - z  # integer steps, some beyond the range
    kind = rng.integers(0, 4, size=shape)
    values = np.select(
        [kind == 0, kind == 1, kind == 2],
        [(k + 0.5) * s, (k + rng.uniform(-1, 1, size=shape)) * s, (k + 0.5) * s * (1 + 1e-7)],
        rng.choice([-1.0, 1.0], size=shape) * (qmax - qmin + 10) * s * rng.uniform(1, 100, size=shape),
    )
    return values.astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(qdq_cases())
def test_matches_numpy_reference(case):
    bits, symmetric, shape, axis, scales, zps, seed = case
    qmin, qmax = int_range(bits, signed=symmetric)
    x = _stress_values(shape, axis, scales, zps, qmin, qmax, np.random.default_rng(seed))
    scale = scales if axis is not None else scales[0]
    zp = zps if axis is not None else zps[0]
    np.testing.assert_array_equal(ours(x, scale, zp, bits, symmetric, axis), ref_qdq(x, scale, zp, qmin, qmax, axis))


def test_half_steps_round_to_even_and_saturate():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 100.0, -100.0], np.float32)
    y = ours(x, 1.0, 0, 4, True, None)  # int4: [-8, 7]
    np.testing.assert_array_equal(y, np.array([0, 2, 2, 0, -2, -2, 7, -8], np.float32))
    y = ours(x, 1.0, 0, 2, True, None)  # 2 bits keep their own range [-2, 1], not int4's
    np.testing.assert_array_equal(y, np.array([0, 1, 1, 0, -2, -2, 1, -2], np.float32))


# ---------------------------------------------------------------------------------------------------------
# Bit-exact against onnxruntime


def _random_case(rng, shape, axis, bits, signed, affine):
    """Normal values, a quarter of them moved next to half steps, where rounding is most fragile."""
    qmin, qmax = int_range(bits, signed)
    channels = 1 if axis is None else shape[axis]
    scales = rng.uniform(0.002, 0.05, size=channels).astype(np.float32)
    zps = rng.integers(qmin, qmax + 1, size=channels) if affine else np.zeros(channels, np.int64)
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = scales.astype(np.float64).reshape(bshape)
    near_half = (rng.integers(-200, 200, size=shape) + 0.5) * s * (1 + rng.uniform(-3e-7, 3e-7, size=shape))
    x = np.where(rng.random(shape) < 0.25, near_half, rng.standard_normal(shape) * rng.uniform(0.1, 3.0))
    x = x.astype(np.float32)
    if axis is None:
        return x, scales[0], zps[0]
    return x, scales, zps


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("signed,affine", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_bit_exact_with_onnxruntime(bits, signed, affine, axis):
    rng = np.random.default_rng(bits * 100 + signed * 10 + (axis or 0))
    x, scale, zp = _random_case(rng, (6, 7, 300), axis, bits, signed, affine)
    expected = ort_qdq(x, scale, zp, bits, signed, axis)
    got = ours(x, scale, zp, bits, symmetric=not affine, axis=axis, signed=signed)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, x)  # the case really quantizes


def _reciprocal_disagreements(n=200_000, seed=0):
    """Scale and inputs near half steps, keeping those where x*(1/s) and x/s round differently (float32)."""
    rng = np.random.default_rng(seed)
    s = np.float32(0.0123)
    k = rng.integers(-100, 100, size=n)
    x = ((k + 0.5) * np.float64(s) * (1 + rng.uniform(-3e-7, 3e-7, size=n))).astype(np.float32)
    by_div = np.round((x / s).astype(np.float32))
    by_mul = np.round((x * (np.float32(1) / s)).astype(np.float32))
    return s, x, by_div != by_mul


def test_torch_fake_quantize_differs_from_onnxruntime_ours_does_not():
    s, x, differ = _reciprocal_disagreements()
    assert differ.sum() >= 1, "the search found no input where x*(1/s) and x/s round differently"
    expected = ort_qdq(x, s, 128, 8, False, None)
    torch_y = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(s), 128, 0, 255).numpy()
    assert not np.array_equal(torch_y, expected)
    assert np.any(torch_y[differ] != expected[differ])
    np.testing.assert_array_equal(ours(x, s, 128, 8, False, None), expected)


# ---------------------------------------------------------------------------------------------------------
# Modes


def _calibrated(bits=4, symmetric=True, axis=None, learnable=False, scale=0.25, zp=0, name="q"):
    fq = FakeQuantizer(bits, symmetric=symmetric, axis=axis, learnable=learnable, name=name)
    fq.set_qparams(torch.as_tensor(scale), torch.as_tensor(zp))
    return fq


def test_disabled_is_identity():
    fq = _calibrated().disable()
    x = torch.randn(4, 5) * 10
    y = fq(x)
    assert y is x and torch.equal(y, x)


def test_observe_passes_through_then_calibrate_quantizes():
    fq = FakeQuantizer(8, symmetric=False, name="act").start_observing()
    x = torch.randn(3, 50)
    assert torch.equal(fq(x), x)
    fq.calibrate()
    assert fq.mode == "quantize" and fq.is_calibrated
    y = fq(x)
    assert not torch.equal(y, x)
    assert (y - x).abs().max() <= fq.scale / 2 + 1e-7  # min-max range: nothing clips


def test_enabled_without_calibration_raises():
    fq = FakeQuantizer(8, name="layer1.conv")
    with pytest.raises(InputError, match="layer1.conv.*calibrat"):
        fq(torch.randn(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_while_observing_names_the_quantizer(bad):
    fq = FakeQuantizer(8, symmetric=False, name="encoder_layers_0_softmax").start_observing()
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(InputError, match="encoder_layers_0_softmax.*NaN or inf"):
        fq(x)


def test_name_set_later_appears_in_errors():
    fq = FakeQuantizer(8).start_observing()
    fq.name = "conv1_output"
    with pytest.raises(InputError, match="conv1_output"):
        fq(torch.tensor([float("nan")]))


@pytest.mark.parametrize("mode", ["observe", "quantize"])
def test_missing_axis_raises_with_axis_and_shape(mode):
    fq = FakeQuantizer(8, axis=3, name="w")
    if mode == "quantize":
        fq.set_qparams(torch.ones(4), torch.zeros(4))
    fq.mode = mode
    with pytest.raises(InputError, match=r"axis 3.*\(4, 5\)"):
        fq(torch.randn(4, 5))


def test_channel_count_mismatch_raises():
    fq = _calibrated(axis=0, scale=torch.ones(3), zp=torch.zeros(3))
    with pytest.raises(InputError, match="per-channel"):
        fq(torch.randn(4, 5))


@pytest.mark.parametrize("bits", [1, 9, 0, 32])
def test_bad_bits_raise(bits):
    with pytest.raises(InputError, match=f"bits={bits}"):
        FakeQuantizer(bits)


@pytest.mark.parametrize(
    "scale,zp,match",
    [(-1.0, 0, "scale"), (0.0, 0, "scale"), (float("nan"), 0, "scale"), (1.0, 300, "zero-point"),
     (1.0, -1, "zero-point")],
)
def test_bad_qparams_raise(scale, zp, match):
    fq = FakeQuantizer(8, symmetric=False)
    with pytest.raises(InputError, match=match):
        fq.set_qparams(scale, zp)


def test_symmetric_zero_point_must_be_zero():
    with pytest.raises(InputError, match="symmetric"):
        FakeQuantizer(8, symmetric=True).set_qparams(1.0, 3)


def test_state_dict_round_trip_into_fresh_quantizer():
    src = FakeQuantizer(4, symmetric=False, axis=1).start_observing()
    x = torch.randn(2, 6, 5)
    src(x)
    src.calibrate()
    dst = FakeQuantizer(4, symmetric=False, axis=1)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    assert set(src.state_dict()) == {"scale", "zero_point"}


def test_from_qspec():
    spec = QSpec(w_bits=4, a_bits=8, attn_bits=None, w_granularity="per_channel", w_axis=0)
    w = FakeQuantizer.from_qspec(spec, "weight", name="fc")
    assert (w.bits, w.axis, w.symmetric, w.qrange.qmin, w.qrange.qmax) == (4, 0, True, -8, 7)
    a = FakeQuantizer.from_qspec(spec, "activation")
    assert (a.bits, a.axis, a.symmetric, a.qrange.qmin, a.qrange.qmax) == (8, None, False, 0, 255)
    with pytest.raises(InputError, match="attention.*float"):
        FakeQuantizer.from_qspec(spec, "attention")


# ---------------------------------------------------------------------------------------------------------
# Gradients


def test_ste_passes_gradient_inside_range_only():
    fq = _calibrated(bits=4, scale=0.5)  # representable [-4.0, 3.5]; the test is on the rounded value
    x = torch.tensor([-10.0, -4.3, -3.9, -1.3, 0.0, 0.26, 3.4, 3.9, 50.0], requires_grad=True)
    fq(x).sum().backward()
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, inside)


def _lsq_expected(x, s, z, qmin, qmax, elements):
    """LSQ/LSQ+ gradients of sum(Q(x)) w.r.t. scale and zero-point, written out per element."""
    g = 1.0 / math.sqrt(elements * qmax)
    ds = dz = 0.0
    for v in x.tolist():
        q = round(v / s) + z  # Python's round is half to even too
        if q > qmax:
            ds, dz = ds + (qmax - z), dz - s
        elif q < qmin:
            ds, dz = ds + (qmin - z), dz - s
        else:
            ds += round(v / s) - v / s
    return g * ds, g * dz


def test_lsq_scale_gradient_matches_formula():
    fq = _calibrated(bits=4, symmetric=True, learnable=True, scale=0.3)
    x = torch.tensor([-3.0, -1.04, -0.2, 0.1, 0.52, 0.8, 1.9, 2.2])
    fq(x).sum().backward()
    expected, _ = _lsq_expected(x, 0.3, 0, -8, 7, x.numel())
    assert fq.scale.grad.item() == pytest.approx(expected, rel=1e-5)
    assert isinstance(fq.scale, torch.nn.Parameter) and "zero_point" in dict(fq.named_buffers())


def test_lsq_plus_affine_gradients_per_channel():
    fq = _calibrated(bits=3, symmetric=False, axis=0, learnable=True,
                     scale=torch.tensor([0.2, 0.5]), zp=torch.tensor([2.0, 5.0]))
    x = torch.tensor([[-1.0, -0.35, 0.05, 0.33, 1.3], [-4.0, -0.7, 0.2, 1.1, 3.0]])
    fq(x).sum().backward()
    for c, (s, z) in enumerate([(0.2, 2), (0.5, 5)]):
        ds, dz = _lsq_expected(x[c], s, z, 0, 7, x.shape[1])
        assert fq.scale.grad[c].item() == pytest.approx(ds, rel=1e-5)
        assert fq.zero_point.grad[c].item() == pytest.approx(dz, rel=1e-5)


def test_learnable_forward_equals_frozen_forward():
    x = torch.randn(8, 300) * 3
    frozen = _calibrated(bits=4, symmetric=False, axis=0, scale=torch.rand(8) * 0.1 + 0.01,
                         zp=torch.randint(0, 16, (8,)).float())
    learnable = FakeQuantizer(4, symmetric=False, axis=0, learnable=True)
    learnable.load_state_dict(frozen.state_dict())
    assert isinstance(learnable.scale, torch.nn.Parameter)
    assert torch.equal(learnable(x), frozen(x))


def test_lsq_weight_init():
    w = torch.randn(4, 3, 3, 3)
    fq = FakeQuantizer(4, symmetric=True, axis=0, observer="lsq", learnable=True).start_observing()
    fq(w)
    fq.calibrate()
    expected = 2 * w.double().abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert torch.allclose(fq.scale.detach().double(), expected, rtol=1e-6, atol=0)
