"""Quantized integer tensors as ONNX initializers: the ONNX element type of a bit range and its encoding.

2–3-bit values are stored in int4 / uint4, 5–7-bit values in int8 / uint8 (the narrower range is kept by
the values themselves, or by a Clip before QuantizeLinear for activations).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from fxq.backends.int4 import pack_int4
from fxq.errors import InputError
from fxq.quant.numerics import IntRange

_TYPES: dict[tuple[int, bool], tuple[int, type]] = {
    (4, True): (TensorProto.INT4, np.int8),
    (4, False): (TensorProto.UINT4, np.uint8),
    (8, True): (TensorProto.INT8, np.int8),
    (8, False): (TensorProto.UINT8, np.uint8),
    (16, True): (TensorProto.INT16, np.int16),
    (16, False): (TensorProto.UINT16, np.uint16),
}


def onnx_type(qrange: IntRange) -> int:
    """The ONNX element type (TensorProto.INT4, UINT8, ...) that stores values of ``qrange``."""
    try:
        return _TYPES[(qrange.storage_bits, qrange.signed)][0]
    except KeyError:
        raise InputError(f"no ONNX integer type stores {qrange.bits}-bit values") from None


def type_name(qrange: IntRange) -> str:
    """"int8", "uint4", ... for the storage type of ``qrange``."""
    return TensorProto.DataType.Name(onnx_type(qrange)).lower()


def integer_tensor(name: str, values: np.ndarray, qrange: IntRange) -> TensorProto:
    """An initializer holding integer ``values`` (already inside ``qrange``) in its ONNX storage type."""
    values = np.asarray(values)
    if values.size and (values.min() < qrange.qmin or values.max() > qrange.qmax):
        raise InputError(
            f"initializer {name!r}: values in [{values.min()}, {values.max()}] exceed the "
            f"{qrange.bits}-bit range [{qrange.qmin}, {qrange.qmax}]"
        )
    elem, np_type = _TYPES[(qrange.storage_bits, qrange.signed)]
    tensor = TensorProto(name=name, data_type=elem, dims=list(values.shape))
    if qrange.storage_bits == 4:
        tensor.raw_data = pack_int4(values, qrange.signed)
    else:
        tensor.raw_data = np.ascontiguousarray(values.astype(np.dtype(np_type).newbyteorder("<"))).tobytes()
    return tensor


def float_tensor(name: str, values: np.ndarray | float) -> TensorProto:
    """A float32 initializer."""
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)
