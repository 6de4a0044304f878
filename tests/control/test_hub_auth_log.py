"""A flood of failed or missing hub authentications costs a log line per address per
interval, with the count of the ones not logged; and the per-key limiter this uses
(``common.logs.OncePer``) stays bounded when the keys are addresses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import protocol
from common.logs import OncePer
from tests.controlserver import RunningControl, public_key

FAILED_LINE = "authentication failed"
TIMEOUT_LINE = "closing client that did not authenticate in time"
BURST = 25

# -- OncePer with many keys -----------------------------------------------------------


def test_once_per_key_and_interval_with_the_count() -> None:
    once = OncePer(60.0, max_keys=8)
    assert once.due("a", 0.0) == (True, 0)
    assert [once.due("a", float(t)) for t in range(1, 6)] == [(False, 0)] * 5
    assert once.due("b", 1.0) == (True, 0)
    assert once.due("a", 60.0) == (True, 5)
    assert once.due("a", 61.0) == (False, 0)


def test_stale_keys_make_room_for_new_ones() -> None:
    once = OncePer(60.0, max_keys=3)
    for i, key in enumerate("abc"):
        assert once.due(key, float(i)) == (True, 0)
    # full of fresh keys: a new one shares "(other)"
    assert once.due("d", 10.0) == (True, 0)
    assert once.due("e", 11.0) == (False, 0)
    assert once.pending() == {"(other)": 1}
    # a minute after "a" was logged, it is forgotten and "f" gets a line of its own
    assert once.due("f", 60.0) == (True, 0)
    assert once.due("f", 61.0) == (False, 0)
    assert once.pending() == {"(other)": 1, "f": 1}
    assert once.due("g", 61.0) == (True, 0)  # "b" (logged at 1) made room
    assert once.due("h", 61.5) == (False, 0)  # "c" (logged at 2) is not stale yet


def test_a_key_logged_again_is_not_the_oldest() -> None:
    once = OncePer(60.0, max_keys=3)
    for i, key in enumerate("xyz"):
        assert once.due(key, float(i)) == (True, 0)
    assert once.due("x", 60.0) == (True, 0)
    # "y" and "z" are stale behind a fresh "x": a new key still finds room
    assert once.due("w", 70.0) == (True, 0)
    assert once.due("v", 70.0) == (True, 0)
    # x, w, v: full and fresh, so "u" and "t" share "(other)"
    assert once.due("u", 70.0) == (True, 0) and once.due("t", 70.0) == (False, 0)
    assert once.pending() == {"(other)": 1}


# -- the hub --------------------------------------------------------------------------


@pytest.fixture
async def hub_control(tmp_path: Path) -> AsyncIterator[RunningControl]:
    server = RunningControl(tmp_path / "control.db", auth_timeout=0.3)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _bad_auth(control: RunningControl, seed: int) -> None:
    async with connect(control.ws_url) as ws:
        data = {"apiKey": f"agt_not-a-key-{seed:08d}", "clientType": "agent"}
        await ws.send(json.dumps({"type": "auth", "data": data | {"publicKey": public_key(1)}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "auth_error"
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == protocol.CLOSE_AUTH_FAILED


async def test_a_burst_of_failed_auths_is_one_line_with_the_count(
    hub_control: RunningControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control.hub")
    for seed in range(BURST):
        await _bad_auth(hub_control, seed)
    lines = [r for r in caplog.records if r.getMessage() == FAILED_LINE]
    assert len(lines) == 1, [r.fields for r in lines]  # type: ignore[attr-defined]
    first = lines[0].fields  # type: ignore[attr-defined]
    assert first["address"] == "127.0.0.1" and first["reason"] == "invalid_key"
    assert first["since_last_logged"] == 0
    # the next line, once due, carries the number of failures not logged
    hub_control.app.state.hub.auth_failures.interval = 0.0
    await _bad_auth(hub_control, BURST)
    lines = [r for r in caplog.records if r.getMessage() == FAILED_LINE]
    assert [r.fields["since_last_logged"] for r in lines] == [0, BURST - 1]  # type: ignore[attr-defined]
    for record in caplog.records:  # and never a key
        assert "not-a-key" not in record.getMessage() + repr(getattr(record, "fields", ""))


async def _silent(control: RunningControl) -> None:
    async with connect(control.ws_url) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == protocol.CLOSE_AUTH_TIMEOUT


async def test_a_burst_of_auth_timeouts_is_one_line_with_the_count(
    hub_control: RunningControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control.hub")
    await asyncio.gather(*(_silent(hub_control) for _ in range(8)))
    lines = [r for r in caplog.records if r.getMessage() == TIMEOUT_LINE]
    assert len(lines) == 1
    hub_control.app.state.hub.auth_timeouts.interval = 0.0
    await _silent(hub_control)
    lines = [r for r in caplog.records if r.getMessage() == TIMEOUT_LINE]
    assert [r.fields["since_last_logged"] for r in lines] == [0, 7]  # type: ignore[attr-defined]
    assert lines[-1].fields["address"] == "127.0.0.1"  # type: ignore[attr-defined]
