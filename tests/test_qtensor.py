"""Storage of integer tensors (backends/qtensor.py): the ONNX element type of each integer range, int4 packing,
int4 / int32 initializers as ONNX and onnxruntime read them back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import fxq
from fxq.backends import pack_int4, unpack_int4
from fxq.backends.qtensor import integer_tensor, onnx_type, storage_bits, type_name
from fxq.quant.numerics import INT32, SUPPORTED_BITS, IntRange

# -- int4 packing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("count", [1, 2, 7, 16, 33])
def test_int4_pack_unpack_round_trip(signed, count):
    rng = np.random.default_rng(count)
    low, high = (-8, 7) if signed else (0, 15)
    values = rng.integers(low, high + 1, size=count)
    values[0] = low
    packed = pack_int4(values, signed)
    assert len(packed) == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, count, signed), values)


def test_int4_layout_low_nibble_first():
    assert pack_int4(np.array([1, -2, 7]), signed=True) == bytes([0xE1, 0x07])
    assert pack_int4(np.array([15, 0, 3]), signed=False) == bytes([0x0F, 0x03])
    with pytest.raises(fxq.InputError, match="do not fit int4"):
        pack_int4(np.array([8]), signed=True)


@pytest.mark.parametrize("signed", [True, False])
def test_int4_initializer_reads_back_with_onnx(signed):
    qrange = IntRange.of(4, signed)
    values = np.random.default_rng(0).integers(qrange.qmin, qrange.qmax + 1, size=(3, 5))
    tensor = integer_tensor("w", values, qrange)
    assert tensor.data_type == (TensorProto.INT4 if signed else TensorProto.UINT4)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor).astype(np.int64), values)


@pytest.mark.parametrize("bits, signed", [(4, True), (4, False), (3, True), (2, True), (8, True)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_ort_dequantizes_packed_int4_initializer(bits, signed, per_channel):
    qrange = IntRange.of(bits, signed)
    rng = np.random.default_rng(bits)
    values = rng.integers(qrange.qmin, qrange.qmax + 1, size=(3, 5))  # 15 values: odd count
    values[0, 0] = qrange.qmin
    scale = np.array([0.5, 0.25, 2.0], np.float32) if per_channel else np.array(0.125, np.float32)
    zp = np.zeros(scale.shape, np.int64) if signed else np.full(scale.shape, qrange.qmax // 2)
    inits = [integer_tensor("w", values, qrange), onnx.numpy_helper.from_array(scale, "s"),
             integer_tensor("z", zp, qrange)]
    attrs = {"axis": 0} if per_channel else {}
    node = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {})[0]
    expected = (values - zp.reshape(-1, 1)) * scale.reshape(-1, 1)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


# -- storage types -----------------------------------------------------------------------------------------

_INT_TYPES = [TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
              TensorProto.UINT16, TensorProto.INT32]


def _width_and_range(data_type: int) -> tuple[int, int, int]:
    """(bits, min, max) of an ONNX integer element type, from ONNX's spec (4-bit) and numpy's iinfo."""
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (4, -8, 7) if data_type == TensorProto.INT4 else (4, 0, 15)
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(data_type))
    return info.bits, int(info.min), int(info.max)


@pytest.mark.parametrize("min_bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_storage_type_is_the_narrowest_onnx_type_holding_the_range(bits, signed, min_bits):
    qrange = IntRange.of(bits, signed)
    chosen = onnx_type(qrange, min_bits)
    width, low, high = _width_and_range(chosen)
    assert low <= qrange.qmin and qrange.qmax <= high and width >= min_bits
    assert (low < 0) == signed
    narrower = [t for t in _INT_TYPES if (_width_and_range(t)[1] < 0) == signed
                and min_bits <= _width_and_range(t)[0] < width]
    assert not [t for t in narrower if _width_and_range(t)[1] <= qrange.qmin and qrange.qmax <= _width_and_range(t)[2]]
    assert storage_bits(qrange, min_bits) == width
    assert type_name(qrange, min_bits) == TensorProto.DataType.Name(chosen).lower()


def test_int32_bias_range_is_stored_int32():
    values = np.array([INT32.qmin, -1, 0, 7, INT32.qmax])
    tensor = integer_tensor("b", values, INT32)
    assert tensor.data_type == TensorProto.INT32
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), values)
    with pytest.raises(fxq.InputError, match="no ONNX integer type stores unsigned 16-bit values at 32 bits"):
        storage_bits(IntRange.of(16, False), min_bits=32)
