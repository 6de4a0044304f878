"""Frames for fuzzing the hub: random ones, and mutations of every valid frame a gateway
or an agent sends.  Everything comes from the ``random.Random`` passed in, so a seed
reproduces a run.

A frame is a ``str`` (a WebSocket text frame) or ``bytes`` (a binary one).  Text is
always valid Unicode that encodes to UTF-8, as it is after the WebSocket layer decoded
it; lone surrogates and other oddities appear only as JSON ``\\u`` escapes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: every frame type a client may send, every type Control sends, and near misses
FRAME_TYPES = (
    "auth",
    "heartbeat",
    "status",
    "certificate_obtained",
    "share_link_used",
    "stats",
    "config",
    "auth_success",
    "auth_error",
    "error",
    "tunnel_create",
    "tunnel_update",
    "tunnel_delete",
    "Auth",
    "HEARTBEAT",
    "heartbeat ",
    "",
    "status\u0000",
)
STRANGE_STRINGS = (
    "",
    " ",
    "\u0000",
    "\ud800",  # lone surrogates: valid JSON escapes, not encodable as UTF-8
    "\udfff",
    "\ud83d",
    "\u202e\u0644\u0627",  # right-to-left override, Arabic
    "e\u0301" * 40,  # combining marks
    "\U0001f600" * 10,
    "\uff11\uff12\uff13",  # full-width digits
    "\u0663",  # Arabic-Indic digit three
    "xn--caf-dma.example.com",
    "xn--zz.example.com",
    "caf\u00e9.example.com",
    "../../etc/passwd",
    "%00%ff",
    "'; DROP TABLE agents; --",
    "-----BEGIN CERTIFICATE-----",
    "PRIVATE KEY-----",
    "agt_" + "A" * 43,
    "gtw_",
    "NaN",
    "1e999",
    "\\",
    '"',
    "\n\r\t",
)
HUGE_NUMBERS: tuple[Any, ...] = (
    2**31,
    2**62,
    2**62 + 1,
    2**63,
    -(2**63),
    2**64,
    10**19,
    10**20 - 1,
    -(10**20 - 1),
    0,
    -1,
    65536,
    1.0e308,
    -1.0e308,
    5e-324,
    -0.0,
    True,
    False,
)
#: JSON text spliced in where a value goes (json.dumps cannot write these)
RAW_VALUES = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1" * 25,
    "-" + "9" * 5000,
    "0." + "0" * 100 + "1",
    "1" + "0" * 70 + ".5",
    "00",
    "01",
    "+1",
    ".5",
    "0x10",
    "undefined",
    "None",
    "'single'",
    '"\\ud800"',
    '"\\ud800\\udc00"',
    '"\\u0000"',
    '"\\x41"',
    '"unterminated',
    "[" * 3000 + "]" * 3000,
    '{"a":' * 1500 + "1" + "}" * 1500,
)


@dataclass
class ValidFrames:
    """What valid frames need from a running Control: real keys, ids and a cert."""

    agent_key: str
    gateway_key: str
    tunnel_ids: list[str]
    domain: str
    certificate: str
    private_key: str
    public_key: str
    config_version: Callable[[], int]

    def agent_frames(self, rng: random.Random) -> dict[str, dict[str, Any]]:
        return {
            "auth": {
                "type": "auth",
                "data": {
                    "apiKey": self.agent_key,
                    "clientType": "agent",
                    "publicKey": self.public_key,
                    "version": "fuzz/1",
                },
            },
            "heartbeat": self._heartbeat(rng),
            "status": {
                "type": "status",
                "data": {
                    "tunnels": [
                        {
                            "tunnelId": rng.choice(self.tunnel_ids),
                            "health": rng.choice(("healthy", "unhealthy", "unknown")),
                            "detail": rng.choice(("", "connect refused", "HTTP 502")),
                        }
                        for _ in range(rng.randint(0, 3))
                    ]
                },
            },
            "stats": {"type": "stats", "data": {"peers": self._peers(rng)}},
        }

    def gateway_frames(self, rng: random.Random) -> dict[str, dict[str, Any]]:
        return {
            "auth": {
                "type": "auth",
                "data": {
                    "apiKey": self.gateway_key,
                    "clientType": "gateway",
                    "publicKey": self.public_key,
                    "version": "fuzz/1",
                    "publicIp": rng.choice(("203.0.113.9", "2001:db8::9")),
                    "wireguardPort": rng.choice((51820, 1, 65535)),
                },
            },
            "heartbeat": self._heartbeat(rng),
            "certificate_obtained": {
                "type": "certificate_obtained",
                "data": {
                    "domain": self.domain,
                    "certificate": self.certificate,
                    "privateKey": self.private_key,
                    "notAfter": 1.9e9,
                },
            },
            "share_link_used": {
                "type": "share_link_used",
                "data": {"tunnelId": rng.choice(self.tunnel_ids), "linkId": "no-such-link"},
            },
            "stats": self._stats(rng),
        }

    def _stats(self, rng: random.Random) -> dict[str, Any]:
        return {
            "type": "stats",
            "data": {
                "tunnels": [
                    {
                        "tunnelId": rng.choice((*self.tunnel_ids, "no-such-tunnel")),
                        "requests": rng.choice((0, 1, 2**53)),
                        "errors": rng.choice((0, 7)),
                        "bytesIn": rng.randint(0, 10**9),
                        "bytesOut": rng.randint(0, 10**9),
                    }
                    for _ in range(rng.randint(0, 3))
                ],
                "peers": self._peers(rng),
            },
        }

    def _peers(self, rng: random.Random) -> list[dict[str, Any]]:
        return [
            {"publicKey": self.public_key, "handshakeAge": rng.choice((None, 0, 3.5, 1e9))}
            for _ in range(rng.randint(0, 2))
        ]

    def _heartbeat(self, rng: random.Random) -> dict[str, Any]:
        version = self.config_version() if rng.random() < 0.7 else rng.choice((0, 1, 2**40))
        return {"type": "heartbeat", "data": {"timestamp": 1.7e9, "configVersion": version}}


# -- random values ---------------------------------------------------------------------


def random_text(rng: random.Random, max_len: int = 40) -> str:
    """Any Unicode scalar values (no surrogates: those cannot reach the hub raw)."""
    length = rng.randint(0, max_len)
    alphabet = rng.choice(_ALPHABETS)
    if alphabet is not None:
        return "".join(rng.choices(alphabet, k=length))
    top = rng.choice((0x80, 0x800, 0x10000, 0x110000))
    points = (int(rng.random() * top) for _ in range(length))
    return "".join(chr(0xFFFD if 0xD800 <= c <= 0xDFFF else c) for c in points)


_ALPHABETS = ("abcdefghijklmnopqrstuvwxyz_-.:", '{}[]":,0123456789 \\ntrue false null', None)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.55:
        return rng.choice(
            (
                lambda: None,
                lambda: rng.random() < 0.5,
                lambda: rng.randint(-(2**70), 2**70),
                lambda: rng.choice(HUGE_NUMBERS),
                lambda: rng.uniform(-1e10, 1e10),
                lambda: random_text(rng),
                lambda: rng.choice(STRANGE_STRINGS),
            )
        )()
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 12): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_frame(rng: random.Random) -> str | bytes:
    """One frame of any shape at all."""
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randint(0, 64))
    if roll < 0.25:
        return random_text(rng, 200)
    if roll < 0.45:
        return _dumps(rng, random_value(rng))
    frame: dict[str, Any] = {
        "type": rng.choice(FRAME_TYPES) if rng.random() < 0.8 else random_value(rng)
    }
    if rng.random() < 0.9:
        frame["data"] = random_value(rng) if rng.random() < 0.3 else _random_object(rng)
    if rng.random() < 0.2:
        frame["configVersion"] = random_value(rng)
    return _dumps(rng, frame)


#: every key a gateway's or an agent's frame may carry (random objects mostly use these)
FRAME_KEYS = (
    "apiKey",
    "clientType",
    "publicKey",
    "version",
    "publicIp",
    "wireguardPort",
    "timestamp",
    "configVersion",
    "tunnels",
    "domain",
    "certificate",
    "privateKey",
    "notAfter",
    "tunnelId",
    "linkId",
)


def _random_object(rng: random.Random) -> dict[str, Any]:
    return {
        (rng.choice(FRAME_KEYS) if rng.random() < 0.8 else random_text(rng, 10)): random_value(rng)
        for _ in range(rng.randint(0, 6))
    }


def _dumps(rng: random.Random, value: Any) -> str:
    """JSON text, with non-ASCII written raw or escaped; lone surrogates always escaped
    (raw they are not Unicode text a WebSocket frame could carry)."""
    if rng.random() < 0.5:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        try:
            text.encode()
        except UnicodeEncodeError:
            pass
        else:
            return text
    return json.dumps(value, allow_nan=False)


# -- mutations of valid frames ---------------------------------------------------------


Place = tuple[Any, Any, Any]  # (container, key or index, value)


def _places(root: Any) -> list[Place]:
    """Every value below the root with where it sits (walked without recursion)."""
    found: list[Place] = []
    stack = [root] if isinstance(root, dict | list) else []
    while stack:
        container = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, child in items:
            found.append((container, key, child))
            if isinstance(child, dict | list):
                stack.append(child)
    return found


def _containers(root: Any, kinds: type | tuple[type, ...] = (dict, list)) -> list[Any]:
    return [root] + [v for _, _, v in _places(root) if isinstance(v, kinds)]


def _replace(rng: random.Random, root: Any, new: Any, places: list[Place] | None = None) -> Any:
    places = _places(root) if places is None else places
    if places:
        container, key, _ = rng.choice(places)
        container[key] = new
    return root


def _drop_key(rng: random.Random, frame: Any) -> Any:
    dicts = [d for d in _containers(frame, dict) if d]
    if dicts:
        target = rng.choice(dicts)
        del target[rng.choice(list(target))]
    return frame


def _add_key(rng: random.Random, frame: Any) -> Any:
    target = rng.choice(_containers(frame))
    if isinstance(target, dict):
        key = (
            rng.choice(("type", "data", "configVersion", "__proto__", ""))
            if rng.random() < 0.3
            else random_text(rng, 10)
        )
        target[key] = random_value(rng)
    else:
        target.insert(rng.randint(0, len(target)), random_value(rng))
    return frame


def _wrong_type(rng: random.Random, frame: Any) -> Any:
    return _replace(rng, frame, random_value(rng))


def _huge_number(rng: random.Random, frame: Any) -> Any:
    return _replace(rng, frame, rng.choice(HUGE_NUMBERS))


def _deep_nesting(rng: random.Random, frame: Any) -> Any:
    # deeper than this the tree itself is awkward in Python; the text mutations nest
    # to thousands of levels
    depth = rng.choice((10, 100, 200))
    value: Any = rng.choice((1, "x", None))
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return _replace(rng, frame, value)


def _strange_string(rng: random.Random, frame: Any) -> Any:
    places = _places(frame)
    strings = [place for place in places if isinstance(place[2], str)]
    if not strings:
        return _replace(rng, frame, rng.choice(STRANGE_STRINGS), places)
    container, key, old = rng.choice(strings)
    odd = rng.choice(STRANGE_STRINGS)
    if rng.random() < 0.5:  # spliced into the real value
        at = rng.randint(0, len(old))
        odd = old[:at] + odd + old[at:]
    container[key] = odd
    return frame


def _oversize_string(rng: random.Random, frame: Any, limit: int) -> Any:
    size = rng.choice((257, 1025, 4097, 16 * 1024 + 1, 64 * 1024 + 1) * 2 + (limit,))
    # past every field's bound in characters; the large ones in ASCII (an escaped
    # emoji is 12 bytes of JSON: encoding megabytes of them is the fuzzer's time)
    char = rng.choice("aé😀") if size <= 1025 else "a"
    return _replace(rng, frame, char * size)


def _change_type(rng: random.Random, frame: Any) -> Any:
    if isinstance(frame, dict):
        frame["type"] = rng.choice(FRAME_TYPES)
    return frame


MUTATIONS = (
    _drop_key,
    _add_key,
    _wrong_type,
    _huge_number,
    _deep_nesting,
    _strange_string,
    _change_type,
)


def _text_mutation(rng: random.Random, text: str) -> str | bytes:
    """Mutations of the encoded frame: what a tree cannot hold."""
    roll = rng.randrange(9)
    if roll == 0:  # truncated
        return text[: rng.randint(0, max(0, len(text) - 1))]
    if roll == 1:  # a value replaced by raw JSON text json.dumps would not write
        at = text.find(":", rng.randrange(len(text))) + 1 or text.find(":") + 1
        if at <= 0:
            return text
        ends = [e for e in (text.find(",", at), text.find("}", at), text.find("]", at)) if e >= 0]
        end = min(ends, default=len(text))  # the end of a scalar; of a container, roughly
        return text[:at] + rng.choice(RAW_VALUES) + text[end:]
    if roll == 2:  # a binary frame holding the same JSON
        return text.encode()
    if roll == 3:  # characters flipped
        for _ in range(rng.randint(1, 4)):
            if text:
                at = rng.randrange(len(text))
                text = text[:at] + chr(rng.randint(0x20, 0x7E)) + text[at + 1 :]
        return text
    if roll == 4:  # a duplicate key: the later one wins in json.loads
        return (
            text[:-1] + ', "type": ' + json.dumps(rng.choice(FRAME_TYPES)) + "}"
            if text.endswith("}")
            else text
        )
    if roll == 5:  # a byte-order mark or whitespace around it
        return rng.choice(("\ufeff", " ", "\n", "\t\r\n")) + text + rng.choice(("", " ", "\n"))
    if roll == 6:  # junk after the document
        return text + rng.choice(("x", "}", "{}", ",", "\u0000"))
    if roll == 7:  # the whole frame nested deeply
        depth = rng.choice((900, 1100, 20_000))
        return "[" * depth + text + "]" * depth
    return text.replace('"', "'", 1)  # single quotes are not JSON


def mutate(rng: random.Random, frame: dict[str, Any], max_string: int) -> str | bytes:
    """A valid frame with one to three mutations of its tree, its text, or both."""
    tree = json.loads(json.dumps(frame))  # a deep copy
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if rng.random() < 0.08:
            tree = _oversize_string(rng, tree, max_string)
        else:
            tree = rng.choice(MUTATIONS)(rng, tree)
    text = _dumps(rng, tree)
    if rng.random() < 0.3:
        return _text_mutation(rng, text)
    return text
