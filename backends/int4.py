"""ONNX's 4-bit integer layout (INT4 / UINT4, opset 21): two values per byte, the first in the low nibble.

Elements are packed in row-major order; an odd count leaves the high nibble of the last byte zero.
Signed values are stored in two's complement within their nibble.
"""

from __future__ import annotations

import numpy as np

from fxq.errors import InputError

INT4_RANGE = (-8, 7)
UINT4_RANGE = (0, 15)


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
