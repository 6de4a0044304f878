"""JSON from peers, parsed with bounds: one ``loads`` for REST bodies and hub frames.

``json.loads`` accepts what no field of ours can hold and fails in ways callers do not
expect: an integer of more than 4,300 digits raises a plain ``ValueError`` (not
``JSONDecodeError``), one of a few thousand digits costs quadratic time to convert,
``1e400`` becomes ``inf`` and ``NaN``/``Infinity`` are taken as numbers.  Here every
integer has at most ``MAX_INT_DIGITS`` digits, every number is finite, and every
failure is a :class:`JsonError` (a ``ValueError``) whose message says what was wrong.
Standard library only: this sits below control, gateway and agent.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_INT_DIGITS", "JsonError", "JsonNumberError", "loads"]

#: enough for any 64-bit value (19 digits) with room; far below what costs time
MAX_INT_DIGITS = 20
#: longest field path a :class:`JsonNumberError` names
MAX_FIELD_PATH = 256


class JsonError(ValueError):
    """The text is not JSON we accept; the message says why (no input echoed)."""


class JsonNumberError(JsonError):
    """Well-formed JSON holding a number no field can hold; ``field`` says where
    (``replicas[0].weight``; "" for the whole text) and ``reason`` what was wrong, so
    an API can answer 422 naming the field."""

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(f"{field or 'the value'}: {reason}")
        self.reason = reason
        self.field = field


class _OutOfBounds:
    """Stands in for a number out of bounds until its place is known."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_constant(name: str) -> float:
    raise JsonError(f"{name} is not a JSON number")


def _key_name(key: str) -> str:
    """A key as a path names it: ours are ASCII letters, digits, ``_`` and ``-``, at
    most 64; any other key is ``?`` (the peer's text is never echoed)."""
    if 0 < len(key) <= 64 and key.isascii() and key.replace("_", "a").replace("-", "a").isalnum():
        return key
    return "?"


def _path_of(value: Any, target: object) -> str:
    """Where ``target`` sits in ``value`` (keys joined by dots, list indexes in
    brackets, keys that are not names as ``?``; at most ``MAX_FIELD_PATH``)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path[:MAX_FIELD_PATH]
        if isinstance(node, dict):
            for key, child in node.items():
                name = _key_name(key)
                stack.append((child, f"{path}.{name}" if path else name))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))
    return ""


def loads(raw: str | bytes) -> Any:
    """Parse JSON text (bytes must be UTF-8); raises :class:`JsonNumberError` for a
    number out of bounds (naming its field) and :class:`JsonError` for anything
    malformed or too deeply nested."""
    bad: list[_OutOfBounds] = []

    def parse_int(text: str) -> Any:
        digits = len(text) - (text[0] == "-")
        if digits > MAX_INT_DIGITS:
            bad.append(_OutOfBounds(f"an integer has {digits} digits (at most {MAX_INT_DIGITS})"))
            return bad[-1]
        return int(text)

    def parse_float(text: str) -> Any:
        if len(text) > 64:
            bad.append(_OutOfBounds("a number is written with more than 64 characters"))
            return bad[-1]
        value = float(text)
        if not math.isfinite(value):
            bad.append(_OutOfBounds("a number is out of range"))
            return bad[-1]
        return value

    try:
        value = json.loads(
            raw,
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=_parse_constant,
        )
    except JsonError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonError(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise JsonError("not valid JSON: the text is not UTF-8") from None
    except RecursionError:
        raise JsonError("not valid JSON: nested too deeply") from None
    except ValueError as exc:  # anything else the decoder refuses
        raise JsonError(f"not valid JSON: {exc}") from None
    if bad:
        raise JsonNumberError(bad[0].reason, _path_of(value, bad[0]))
    return value
