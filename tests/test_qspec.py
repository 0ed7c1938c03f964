"""QSpec validation and JSON round trip; policy strings."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.errors import InputError
from fxq.quant import QSpec, format_policy, parse_policy

weight_bits = st.one_of(st.none(), st.integers(2, 8))
act_bits = st.one_of(st.none(), st.integers(2, 8), st.just(16))
observers = st.sampled_from(["minmax", "mse", "percentile", "percentile:99.9", "lp:2.4", "lp:1", "lsq"])


@st.composite
def qspecs(draw):
    return QSpec(
        w_bits=draw(weight_bits), a_bits=draw(act_bits), attn_bits=draw(act_bits),
        w_granularity=draw(st.sampled_from(["per_channel", "per_tensor"])), w_axis=draw(st.integers(-4, 4)),
        w_symmetric=draw(st.booleans()), a_symmetric=draw(st.booleans()),
        w_observer=draw(observers), a_observer=draw(observers),
    )


@settings(max_examples=100, deadline=None)
@given(qspecs())
def test_json_round_trip(spec):
    text = json.dumps(spec.to_dict())
    assert QSpec.from_dict(json.loads(text)) == spec


def test_to_dict_lists_every_field():
    spec = QSpec(w_bits=4, a_bits=16, attn_bits=None, w_granularity="per_tensor", a_observer="lp:3")
    assert spec.to_dict() == {
        "w_bits": 4, "a_bits": 16, "attn_bits": None, "w_granularity": "per_tensor", "w_axis": 0,
        "w_symmetric": True, "a_symmetric": False, "w_observer": "minmax", "a_observer": "lp:3",
    }


def test_from_dict_fills_defaults_and_refuses_unknown_fields():
    assert QSpec.from_dict({"w_bits": 4}) == QSpec(w_bits=4)
    with pytest.raises(InputError, match="unknown fields.*wbits"):
        QSpec.from_dict({"wbits": 4})
    with pytest.raises(InputError, match="mapping"):
        QSpec.from_dict([("w_bits", 4)])


@pytest.mark.parametrize("field", ["w_bits", "a_bits", "attn_bits"])
@pytest.mark.parametrize("bits", [1, 9, 0, -8])
def test_bits_out_of_range_name_field_and_range(field, bits):
    with pytest.raises(InputError, match=rf"QSpec\.{field}={bits} is out of range; allowed: 2–8"):
        QSpec(**{field: bits})


def test_sixteen_bits_for_activations_only():
    assert QSpec(a_bits=16, attn_bits=16).a_bits == 16
    with pytest.raises(InputError, match="w_bits=16"):
        QSpec(w_bits=16)


@pytest.mark.parametrize("value", [True, 8.0, "8"])
def test_bits_must_be_int(value):
    with pytest.raises(InputError, match="w_bits"):
        QSpec(w_bits=value)


@pytest.mark.parametrize(
    "changes,field",
    [({"w_granularity": "per_row"}, "w_granularity"), ({"w_axis": 1.0}, "w_axis"),
     ({"w_symmetric": 1}, "w_symmetric"), ({"a_symmetric": "no"}, "a_symmetric"),
     ({"w_observer": "histogram"}, "w_observer"), ({"a_observer": "lp"}, "a_observer"),
     ({"a_observer": "lp:-1"}, "a_observer"), ({"a_observer": "percentile:0"}, "a_observer"),
     ({"a_observer": "mse:2"}, "a_observer")],
)
def test_bad_fields_name_the_field(changes, field):
    with pytest.raises(InputError, match=field):
        QSpec(**changes)


def test_frozen_hashable_and_replace_revalidates():
    spec = QSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.w_bits = 4
    assert len({spec, QSpec(), spec.replace(w_bits=4)}) == 2
    with pytest.raises(InputError, match="w_bits"):
        spec.replace(w_bits=9)


def test_per_channel_axis_and_float():
    assert QSpec(w_axis=1).w_per_channel_axis == 1
    assert QSpec(w_granularity="per_tensor").w_per_channel_axis is None
    assert QSpec(w_bits=None, a_bits=None, attn_bits=None).is_float and not QSpec().is_float


# ---------------------------------------------------------------------------------------------------------
# Policy strings


@pytest.mark.parametrize(
    "text,bits",
    [("W8A8", (8, 8, 8)), ("W4A8", (4, 8, 8)), ("W4A4", (4, 4, 4)), ("4-4-8", (4, 4, 8)), ("w2a4", (2, 4, 4)),
     ("W4A4Att8", (4, 4, 8)), ("W4A4-att16", (4, 4, 16)), ("2-4-8", (2, 4, 8)), ("8-8", (8, 8, 8)),
     ("W4A32", (4, None, None)), ("W4AFP", (4, None, None)), ("32-8-8", (None, 8, 8)), ("fp32", (None,) * 3),
     (" W 4 A 8 ", (4, 8, 8))],
)
def test_parse_policy(text, bits):
    spec = parse_policy(text)
    assert (spec.w_bits, spec.a_bits, spec.attn_bits) == bits


def test_parse_policy_overrides_other_fields():
    spec = parse_policy("4-4-8", a_observer="mse", w_granularity="per_tensor")
    assert (spec.a_observer, spec.w_granularity, spec.w_bits) == ("mse", "per_tensor", 4)


@pytest.mark.parametrize("text", ["W8", "A8W8", "8", "W4A4Att", "4_4_8", "", "W4.5A8", "int8"])
def test_parse_policy_refuses_unknown_forms(text):
    with pytest.raises(InputError, match="not understood.*4-4-8"):
        parse_policy(text)


@pytest.mark.parametrize("text,field", [("W9A8", "w_bits"), ("W1A8", "w_bits"), ("W8A9", "a_bits"),
                                        ("4-4-9", "attn_bits"), ("16-8-8", "w_bits")])
def test_parse_policy_out_of_range_names_field(text, field):
    with pytest.raises(InputError, match=field):
        parse_policy(text)


@settings(max_examples=100, deadline=None)
@given(weight_bits, act_bits, act_bits, st.sampled_from(["wa", "qdetr"]))
def test_policy_round_trip(w, a, att, notation):
    spec = QSpec(w_bits=w, a_bits=a, attn_bits=att)
    assert parse_policy(format_policy(spec, notation)) == spec


def test_format_policy_examples():
    assert format_policy(parse_policy("W4A8")) == "W4A8"
    assert format_policy(parse_policy("4-4-8")) == "W4A4Att8"
    assert format_policy(parse_policy("W4A4Att8"), "qdetr") == "4-4-8"
    assert format_policy(parse_policy("fp32")) == "fp32"
    with pytest.raises(InputError, match="notation"):
        format_policy(QSpec(), "latex")
