"""Bounded JSON parsing (common/jsonsafe.py): what plain json.loads lets through or
fails on with the wrong exception."""

from __future__ import annotations

import json

import pytest

from common import jsonsafe


def test_ordinary_json_parses_as_json_loads_does() -> None:
    text = (
        '{"a": [1, -2, 3.5, -0.0, 1e300, true, null, "\\u00e9"], "b": {"c": 18446744073709551615}}'
    )
    assert jsonsafe.loads(text) == json.loads(text)
    assert jsonsafe.loads(text.encode()) == json.loads(text)
    assert jsonsafe.loads("-" + "9" * jsonsafe.MAX_INT_DIGITS) == -int(
        "9" * jsonsafe.MAX_INT_DIGITS
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1" + "0" * jsonsafe.MAX_INT_DIGITS, "digits"),
        ('{"n": -' + "9" * 5000 + "}", "5000 digits"),  # json.loads: plain ValueError
        ("[" + "1" * 100_000 + "]", "digits"),
        ("1e400", "out of range"),
        ("-1e400", "out of range"),
        ("NaN", "not a JSON number"),
        ('{"x": Infinity}', "not a JSON number"),
        ("-Infinity", "not a JSON number"),
        ("0." + "1" * 100, "64 characters"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),  # too deep or cut off: either way a JsonError
        (b"\xff\xfe", "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_what_no_field_can_hold_is_a_json_error(text: str | bytes, says: str) -> None:
    with pytest.raises(jsonsafe.JsonError, match=says) as caught:
        jsonsafe.loads(text)
    assert isinstance(caught.value, ValueError)
    assert len(str(caught.value)) < 200  # the input is never echoed back


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"port": 1' + "0" * 30 + "}", "port"),
        ('{"a": [1, {"b": -' + "9" * 5000 + "}]}", "a[1].b"),
        ('{"x": 1, "y": [0, 0, 1e999]}', "y[2]"),
        ("1e400", ""),
        ('{"' + "k" * 65 + '": 1e400}', "?"),  # not a name of ours: never echoed
        ('{"a b": {"\u202e\u0644": [1e400]}}', "?.?[0]"),
        ('{"x-y_z": {"AZ09": 1e400}}', "x-y_z.AZ09"),
        ('[[[[{"deep": 1' + "0" * 40 + "}]]]]", "[0][0][0][0].deep"),
    ],
)
def test_a_number_out_of_bounds_names_its_field(text: str, field: str) -> None:
    with pytest.raises(jsonsafe.JsonNumberError) as caught:
        jsonsafe.loads(text)
    assert caught.value.field == field
    assert str(caught.value).startswith(field or "the value")
    assert len(str(caught.value)) < 200
