"""Policy strings: "W8A8", "W4A8", "W4A4Att8" and Q-DETR's weight-activation-attention "4-4-8".

A number is a bit-width; "32", "fp" and "fp32" mean float. Without an attention part the attention
operands take the activation bit-width ("W4A8" == "4-8-8"). "fp32" alone is the float policy.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fxq.errors import InputError
from fxq.quant.qspec import QSpec

_BITS = r"(\d+|FP32|FP)"
_WA = re.compile(rf"W{_BITS}A{_BITS}(?:[-_]?ATT{_BITS})?")
_DASHED = re.compile(rf"{_BITS}-{_BITS}(?:-{_BITS})?")
_FORMS = '"W8A8", "W4A8", "W4A4Att8", "4-4-8" (weights-activations-attention) or "fp32"'


def _bits(token: str | None) -> int | None:
    return None if token in ("32", "FP", "FP32") else int(token)


def parse_policy(text: str, **overrides: Any) -> QSpec:
    """The QSpec a policy string names; ``overrides`` set the other QSpec fields (e.g. a_observer="mse")."""
    if not isinstance(text, str):
        raise InputError(f"policy {text!r} is not a string; use {_FORMS}")
    key = re.sub(r"\s+", "", text).upper()
    if key in ("FP", "FP32", "FLOAT"):
        return QSpec(w_bits=None, a_bits=None, attn_bits=None, **overrides)
    match = _WA.fullmatch(key) or _DASHED.fullmatch(key)
    if match is None:
        raise InputError(f"policy {text!r} is not understood; use {_FORMS}")
    w, a, att = match.groups()
    a_bits = _bits(a)
    att_bits = a_bits if att is None else _bits(att)
    try:
        return QSpec(w_bits=_bits(w), a_bits=a_bits, attn_bits=att_bits, **overrides)
    except InputError as err:
        raise InputError(f"policy {text!r}: {err}") from None


def format_policy(spec: QSpec, notation: Literal["wa", "qdetr"] = "wa") -> str:
    """The policy string of a QSpec: "W4A8" ("W4A4Att8" when attention differs) or Q-DETR's "4-4-8"."""

    def show(bits: int | None) -> str:
        return "32" if bits is None else str(bits)

    if notation == "qdetr":
        return f"{show(spec.w_bits)}-{show(spec.a_bits)}-{show(spec.attn_bits)}"
    if notation != "wa":
        raise InputError(f'policy notation {notation!r} is unknown; use "wa" or "qdetr"')
    if spec.is_float:
        return "fp32"
    text = f"W{show(spec.w_bits)}A{show(spec.a_bits)}"
    return text if spec.attn_bits == spec.a_bits else f"{text}Att{show(spec.attn_bits)}"
