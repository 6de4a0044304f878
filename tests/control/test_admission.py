"""The cap on unauthenticated WebSocket connections per address, and the auth deadline:
the counting rules on their own, then a real Control over real sockets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from common import protocol
from common.config import ConfigError, add_settings, resolve
from control.main import SETTINGS, settings_from
from control.ws.admission import DEFAULT_PER_ADDRESS, PendingAuth, address_key
from tests.controlserver import RunningControl, connect_client, create, public_key

CAP = 3
REFUSED_LINE = "refusing connections over the per-address cap on unauthenticated ones"

# -- the counting rules (sans-IO) ------------------------------------------------------


def test_address_key_counts_ipv6_per_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key(None) == "?" and address_key("testclient") == "testclient"


def test_pending_slots_are_taken_and_given_back() -> None:
    gate = PendingAuth(2)
    assert gate.enter("a") and gate.enter("a")
    assert not gate.enter("a")  # a refusal takes nothing
    assert gate.enter("b")  # other addresses are counted on their own
    assert gate.pending("a") == 2 and gate.total() == 3
    gate.leave("a")
    assert gate.enter("a")
    for _ in range(2):
        gate.leave("a")
    gate.leave("b")
    assert gate.total() == 0 and gate._pending == {}  # nothing left behind per address
    with pytest.raises(ValueError):
        PendingAuth(0)


def test_refusals_are_logged_once_per_address_per_interval() -> None:
    gate = PendingAuth(1, log_interval=60.0)
    assert gate.refused("a", 100.0) == 1  # the first is logged at once
    assert [gate.refused("a", 100.0 + i) for i in range(1, 6)] == [None] * 5
    assert gate.refused("b", 101.0) == 1  # per address
    assert gate.refused("a", 160.0) == 6  # next line: this one plus the 5 unlogged
    assert gate.refused("a", 161.0) is None


# -- the setting ----------------------------------------------------------------------


def _values(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_settings(parser, SETTINGS)
    return resolve(parser.parse_args(argv), SETTINGS, env)


def test_the_cap_is_a_flag_an_env_var_and_a_config_key(tmp_path: Path) -> None:
    env = {"KAKUREMICHI_DATA_DIR": str(tmp_path)}
    settings, _ = settings_from(_values([], env))
    assert settings.max_unauthenticated_per_address == DEFAULT_PER_ADDRESS == 16
    config = tmp_path / "c.toml"
    config.write_text("max-unauthenticated-per-address = 4\n")
    settings, _ = settings_from(_values([], {**env, "KAKUREMICHI_CONFIG": str(config)}))
    assert settings.max_unauthenticated_per_address == 4
    env["KAKUREMICHI_MAX_UNAUTHENTICATED_PER_ADDRESS"] = "8"
    assert _values([], env)["max_unauthenticated_per_address"] == 8
    argv = ["--max-unauthenticated-per-address", "2"]
    assert _values(argv, env)["max_unauthenticated_per_address"] == 2
    for bad in ("0", "-1", "x", "1.5", "٣"):
        with pytest.raises(ConfigError, match="--max-unauthenticated-per-address"):
            _values(["--max-unauthenticated-per-address", bad], {})


# -- a real Control -------------------------------------------------------------------


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[RunningControl]:
    server = RunningControl(
        tmp_path / "control.db", max_unauthenticated_per_address=CAP, auth_timeout=30.0
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _pending(control: RunningControl, count: int) -> list[ClientConnection]:
    """Open ``count`` WebSocket connections that do not authenticate (yet)."""
    sockets = [await connect(control.ws_url) for _ in range(count)]
    await _until(lambda: control.app.state.hub.pending.pending("127.0.0.1") >= count)
    return sockets


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _refused(control: RunningControl) -> dict[str, Any]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(control.ws_url):
            pass
    response = info.value.response
    assert response.status_code == 429, response.status_code
    assert response.headers.get("Retry-After") == "5"
    body: dict[str, Any] = json.loads(response.body)
    assert body["error"]["code"] == "too_many_pending"
    return body


async def _auth(ws: ClientConnection, api_key: str, seed: int) -> dict[str, Any]:
    data = {"apiKey": api_key, "clientType": "agent", "publicKey": public_key(seed)}
    await ws.send(json.dumps({"type": "auth", "data": data}))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return reply


async def _close_all(sockets: list[ClientConnection]) -> None:
    for ws in sockets:
        with contextlib.suppress(Exception):
            await ws.close()


async def test_over_the_cap_is_refused_with_429_before_the_upgrade(
    capped: RunningControl,
) -> None:
    sockets = await _pending(capped, CAP)
    await _refused(capped)
    await _refused(capped)
    # the refused ones took no slot; the pending ones are still open and can authenticate
    assert capped.app.state.hub.pending.pending("127.0.0.1") == CAP
    async with capped.api() as api:
        agent = await create(api, "agent", "late")
    assert (await _auth(sockets[0], agent["apiKey"], 1))["type"] == "auth_success"
    await _close_all(sockets)


async def test_authenticated_connections_do_not_count(capped: RunningControl) -> None:
    async with capped.api() as api:
        agents = [await create(api, "agent", f"a{i}") for i in range(CAP + 2)]
    peers = [await connect_client(capped, a["apiKey"], "agent", i) for i, a in enumerate(agents)]
    assert capped.app.state.hub.pending.total() == 0
    sockets = await _pending(capped, CAP)  # the whole cap is still there
    await _refused(capped)
    for peer in peers:  # and the authenticated ones never noticed
        await peer.heartbeat(0)
        await peer.expect("config")
        await peer.close()
    await _close_all(sockets)


async def test_slots_are_freed_by_authentication_failure_and_close(
    capped: RunningControl,
) -> None:
    hub = capped.app.state.hub
    async with capped.api() as api:
        agent = await create(api, "agent", "a")
    sockets = await _pending(capped, CAP)
    await _refused(capped)
    # authenticated: its slot is free at once
    assert (await _auth(sockets[0], agent["apiKey"], 1))["type"] == "auth_success"
    assert hub.pending.pending("127.0.0.1") == CAP - 1
    sockets.append(await connect(capped.ws_url))
    await _until(lambda: hub.pending.pending("127.0.0.1") == CAP)
    await _refused(capped)
    # refused authentication: freed once the hub has closed it (4001)
    assert (await _auth(sockets[1], "agt_wrong", 2))["type"] == "auth_error"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(sockets[1].recv(), 5)
    await _until(lambda: hub.pending.pending("127.0.0.1") == CAP - 1)
    # the client going away before authenticating frees its slot too
    await sockets[2].close()
    await _until(lambda: hub.pending.pending("127.0.0.1") == CAP - 2)
    await _close_all(sockets)
    await _until(lambda: hub.pending.total() == 0)
    fresh = await _pending(capped, CAP)
    await _close_all(fresh)


async def test_silent_connections_are_closed_at_the_deadline_and_free_their_slots(
    tmp_path: Path,
) -> None:
    control = RunningControl(
        tmp_path / "control.db", max_unauthenticated_per_address=CAP, auth_timeout=0.5
    )
    await control.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sockets = await _pending(control, CAP)
        await _refused(control)
        for ws in sockets:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == protocol.CLOSE_AUTH_TIMEOUT
        assert 0.4 <= loop.time() - started <= 3.0
        await _until(lambda: control.app.state.hub.pending.total() == 0)
        again = await _pending(control, CAP)  # the cap is whole again
        await _close_all(again)
    finally:
        await control.stop()


async def test_refusals_are_logged_once_per_address(
    capped: RunningControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control.hub")
    sockets = await _pending(capped, CAP)
    for _ in range(6):
        await _refused(capped)
    lines = [r for r in caplog.records if r.getMessage() == REFUSED_LINE]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields == {"address": "127.0.0.1", "cap": CAP, "refused": 1}
    await _close_all(sockets)
