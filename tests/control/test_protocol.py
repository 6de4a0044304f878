"""The shared protocol module: valid frames parse, anything else is a ProtocolError."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol as p
from tests.control.hubfuzz import FRAME_KEYS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
PARSERS = [p.parse_auth, p.parse_heartbeat, p.parse_status, p.parse_certificate_obtained]


def test_round_trip() -> None:
    text = p.encode("config", {"a": 1}, 7)
    frame = p.decode(text)
    assert frame == p.Frame("config", {"a": 1}, 7)
    assert json.loads(text) == {"type": "config", "data": {"a": 1}, "configVersion": 7}


def test_auth_parsing() -> None:
    key = "A" * 43 + "="
    agent = p.parse_auth(
        {"apiKey": "agt_x", "clientType": "agent", "publicKey": key, "version": "1"}
    )
    assert agent.public_ip is None and agent.client_type == "agent"
    gw = p.parse_auth(
        {
            "apiKey": "gtw_x",
            "clientType": "gateway",
            "publicKey": key,
            "publicIp": "2001:DB8::1",
            "wireguardPort": 51820,
        }
    )
    assert gw.public_ip == "2001:db8::1" and gw.wireguard_port == 51820
    with pytest.raises(p.ProtocolError):
        p.parse_auth({"apiKey": "gtw_x", "clientType": "gateway", "publicKey": key})


def test_lone_surrogates_are_invalid_fields() -> None:
    # JSON can escape a lone surrogate; Python decodes it, but no database, log or
    # UTF-8 encoder takes it, so it is refused where strings are parsed
    frame = p.decode('{"type": "auth", "data": {"version": "\\ud800", "apiKey": "agt_\\udfff"}}')
    assert frame.data["version"] == "\ud800"
    with pytest.raises(p.ProtocolError, match="'apiKey' is not valid Unicode"):
        p.parse_auth(frame.data)
    entry = {"tunnelId": "x", "health": "healthy", "detail": "ok \U0001f600 \ud83d"}
    with pytest.raises(p.ProtocolError, match="'detail' is not valid Unicode"):
        p.parse_status({"tunnels": [entry]})
    entry["detail"] = "ok \U0001f600 café"  # anything else non-ASCII is fine
    assert p.parse_status({"tunnels": [entry]})[0].detail == "ok \U0001f600 café"


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=50), json_values.map(json.dumps)))
def test_decode_never_raises_anything_else(raw: Any) -> None:
    try:
        p.decode(raw)
    except p.ProtocolError as exc:
        assert exc.code and exc.message


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(FRAME_KEYS),
        json_values,
        max_size=8,
    ),
    st.sampled_from(PARSERS),
)
def test_parsers_never_raise_anything_else(data: dict[str, Any], parser: Any) -> None:
    with contextlib.suppress(p.ProtocolError):
        parser(data)
