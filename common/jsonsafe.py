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

__all__ = ["MAX_INT_DIGITS", "JsonError", "loads"]

#: enough for any 64-bit value (19 digits) with room; far below what costs time
MAX_INT_DIGITS = 20


class JsonError(ValueError):
    """The text is not JSON we accept; the message says why (no input echoed)."""


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise JsonError(f"an integer has {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise JsonError("a number is written with more than 64 characters")
    value = float(text)
    if not math.isfinite(value):
        raise JsonError("a number is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise JsonError(f"{name} is not a JSON number")


def loads(raw: str | bytes) -> Any:
    """Parse JSON text (bytes must be UTF-8); raises :class:`JsonError` for anything
    malformed, too deeply nested, or holding a number out of bounds."""
    try:
        return json.loads(
            raw,
            parse_int=_parse_int,
            parse_float=_parse_float,
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
