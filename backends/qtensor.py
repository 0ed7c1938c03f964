"""Quantized integer tensors as ONNX initializers: which ONNX element type stores an integer range, and the
encoding of its values.

:func:`storage_bits` is the one place that decides the storage: the narrowest of the 4-, 8-, 16- and 32-bit
integer types (signedness kept) that holds the range and is at least as wide as the ``min_bits`` a lowering
asks for (a runtime without 4-bit activation kernels asks for 8). 2–3-bit values are thus stored in int4 /
uint4, 5–7-bit values in int8 / uint8 (the narrower range is kept by the values themselves, or by a Clip
before QuantizeLinear for activations), int32 biases in int32.

ONNX's 4-bit layout (INT4 / UINT4, opset 21, :func:`pack_int4`): two values per byte, the first in the low
nibble, elements in row-major order; an odd count leaves the high nibble of the last byte zero. Signed values
are stored in two's complement within their nibble.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from fxq.errors import InputError
from fxq.quant.numerics import IntRange

#: Widths of the ONNX integer element types, narrowest first.
STORAGE_WIDTHS = (4, 8, 16, 32)
#: Value ranges of ONNX's INT4 and UINT4.
INT4_RANGE = (-8, 7)
UINT4_RANGE = (0, 15)

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


def pack_int4(values: np.ndarray, signed: bool) -> bytes:
    """The packed bytes of integer ``values`` (any shape, row-major) in ONNX's int4 / uint4 layout."""
    flat = np.asarray(values).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise InputError(f"pack_int4 needs integer values, got dtype {flat.dtype}; round them first")
    low, high = INT4_RANGE if signed else UINT4_RANGE
    if flat.size and (flat.min() < low or flat.max() > high):
        raise InputError(
            f"values in [{flat.min()}, {flat.max()}] do not fit {'int4' if signed else 'uint4'} [{low}, {high}]"
        )
    nibbles = (flat.astype(np.int64) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int, signed: bool) -> np.ndarray:
    """The ``count`` integers (int8 array) stored in int4 / uint4 layout in ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != (count + 1) // 2:
        raise InputError(f"{raw.size} bytes cannot hold exactly {count} packed 4-bit values")
    nibbles = np.empty(raw.size * 2, dtype=np.int16)
    nibbles[0::2], nibbles[1::2] = raw & 0x0F, raw >> 4
    values = nibbles[:count]
    if signed:
        values = np.where(values >= 8, values - 16, values)
    return values.astype(np.int8)
