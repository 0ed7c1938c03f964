"""Quantized integer tensors as ONNX initializers: which ONNX element type stores an integer range, and the
encoding of its values.

:func:`storage_bits` is the one place that decides the storage: the narrowest of the 4-, 8-, 16- and 32-bit
integer types (signedness kept) that holds the range and is at least as wide as the ``min_bits`` a lowering
asks for (a runtime without 4-bit activation kernels asks for 8). 2–3-bit values are thus stored in int4 /
uint4, 5–7-bit values in int8 / uint8 (the narrower range is kept by the values themselves, or by a Clip
before QuantizeLinear for activations), int32 biases in int32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from fxq.backends.int4 import pack_int4
from fxq.errors import InputError
from fxq.quant.numerics import IntRange

#: Widths of the ONNX integer element types, narrowest first.
STORAGE_WIDTHS = (4, 8, 16, 32)

_TYPES: dict[tuple[int, bool], tuple[int, type]] = {
    (4, True): (TensorProto.INT4, np.int8),
    (4, False): (TensorProto.UINT4, np.uint8),
    (8, True): (TensorProto.INT8, np.int8),
    (8, False): (TensorProto.UINT8, np.uint8),
    (16, True): (TensorProto.INT16, np.int16),
    (16, False): (TensorProto.UINT16, np.uint16),
    (32, True): (TensorProto.INT32, np.int32),
}


def storage_bits(qrange: IntRange, min_bits: int = 4) -> int:
    """Width of the ONNX integer type that stores values of ``qrange``: the narrowest of
    :data:`STORAGE_WIDTHS` holding ``qrange.bits`` and at least ``min_bits`` wide."""
    width = next((w for w in STORAGE_WIDTHS if w >= max(qrange.bits, min_bits)), None)
    if width is None or (width, qrange.signed) not in _TYPES:
        raise InputError(f"no ONNX integer type stores {'signed' if qrange.signed else 'unsigned'} "
                         f"{qrange.bits}-bit values at {min_bits} bits or more; use at most 16 bits (32 signed)")
    return width


def onnx_type(qrange: IntRange, min_bits: int = 4) -> int:
    """The ONNX element type (TensorProto.INT4, UINT8, ...) that stores values of ``qrange``."""
    return _TYPES[(storage_bits(qrange, min_bits), qrange.signed)][0]


def type_name(qrange: IntRange, min_bits: int = 4) -> str:
    """"int8", "uint4", ... for the storage type of ``qrange``."""
    return TensorProto.DataType.Name(onnx_type(qrange, min_bits)).lower()


def integer_tensor(name: str, values: np.ndarray, qrange: IntRange, min_bits: int = 4) -> TensorProto:
    """An initializer holding integer ``values`` (already inside ``qrange``) in its ONNX storage type
    (:func:`storage_bits` with ``min_bits``)."""
    values = np.asarray(values)
    if values.size and (values.min() < qrange.qmin or values.max() > qrange.qmax):
        raise InputError(
            f"initializer {name!r}: values in [{values.min()}, {values.max()}] exceed the "
            f"{qrange.bits}-bit range [{qrange.qmin}, {qrange.qmax}]"
        )
    bits = storage_bits(qrange, min_bits)
    elem, np_type = _TYPES[(bits, qrange.signed)]
    tensor = TensorProto(name=name, data_type=elem, dims=list(values.shape))
    if bits == 4:
        tensor.raw_data = pack_int4(values, qrange.signed)
    else:
        tensor.raw_data = np.ascontiguousarray(values.astype(np.dtype(np_type).newbyteorder("<"))).tobytes()
    return tensor


def float_tensor(name: str, values: np.ndarray | float) -> TensorProto:
    """A float32 initializer."""
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)
