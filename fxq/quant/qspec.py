"""QSpec: how one graph node is quantized; stored in ``node.meta["fxq.qspec"]``.

A bit-width of ``None`` means float. Weights take 2–8 bits; activations and attention operands
(q, k, v and the attention map, Q-DETR's third number in "4-4-8") take 2–8 or 16 bits.
Symmetric quantizers use the signed range with zero-point 0; affine ones the unsigned range with an
integer zero-point. JSON round trip: ``QSpec.from_dict(json.loads(json.dumps(spec.to_dict())))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fxq.errors import InputError
from fxq.quant.observers import parse_method

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACTIVATION_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
GRANULARITIES = ("per_channel", "per_tensor")

Granularity = Literal["per_channel", "per_tensor"]


def _check_bits(field: str, value: Any, allowed: tuple[int, ...]) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value in allowed):
        return
    shown = f"{allowed[0]}–{allowed[-1]}" if allowed == WEIGHT_BITS else "2–8 or 16"
    raise InputError(f"QSpec.{field}={value!r} is out of range; allowed: {shown}, or None for float")


def _check_type(field: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"QSpec.{field}={value!r} must be of type {kind.__name__}")


@dataclass(frozen=True)
class QSpec:
    """Quantization of one node: bit-widths, weight granularity, symmetry, calibration methods."""

    w_bits: int | None = 8
    a_bits: int | None = 8
    attn_bits: int | None = 8
    w_granularity: Granularity = "per_channel"
    w_axis: int = 0
    w_symmetric: bool = True
    a_symmetric: bool = False
    w_observer: str = "minmax"
    a_observer: str = "minmax"

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits, WEIGHT_BITS)
        _check_bits("a_bits", self.a_bits, ACTIVATION_BITS)
        _check_bits("attn_bits", self.attn_bits, ACTIVATION_BITS)
        if self.w_granularity not in GRANULARITIES:
            raise InputError(f"QSpec.w_granularity={self.w_granularity!r}; use one of {GRANULARITIES}")
        _check_type("w_axis", self.w_axis, int)
        _check_type("w_symmetric", self.w_symmetric, bool)
        _check_type("a_symmetric", self.a_symmetric, bool)
        for field in ("w_observer", "a_observer"):
            try:
                parse_method(getattr(self, field))
            except InputError as err:
                raise InputError(f"QSpec.{field}: {err}") from None

    @property
    def is_float(self) -> bool:
        """True when nothing is quantized."""
        return self.w_bits is None and self.a_bits is None and self.attn_bits is None

    @property
    def w_per_channel_axis(self) -> int | None:
        """The weight quantizer's channel axis, or None when per-tensor."""
        return self.w_axis if self.w_granularity == "per_channel" else None

    def replace(self, **changes: Any) -> QSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QSpec:
        """The QSpec of a ``to_dict`` result; missing fields take their defaults, unknown ones are refused."""
        if not isinstance(data, Mapping):
            raise InputError(f"QSpec.from_dict needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"QSpec.from_dict: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)
