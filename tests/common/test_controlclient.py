"""The shared Control client against a real Control, and against a hostile fake one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from common import protocol as p
from common.controlclient import (
    ControlClient,
    ControlClientSettings,
    ControlView,
    websocket_url,
)
from tests.configframes import agent_config_data, gateway_config_data
from tests.controlserver import RunningControl, create, public_key
from tests.support import free_port


def client_for(url: str, key: str, kind: str = "agent", **extra: Any) -> ControlClient:
    settings = ControlClientSettings(
        control_url=url,
        api_key=key,
        client_type=kind,
        public_key=public_key(9),
        version="test",
        public_ip="192.0.2.5" if kind == "gateway" else None,
        wireguard_port=51820 if kind == "gateway" else None,
        backoff_min=0.05,
        backoff_max=0.3,
        **extra,
    )
    return ControlClient(settings, rng=random.Random(1))


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_websocket_url() -> None:
    assert websocket_url("http://c.example.com:7700") == "ws://c.example.com:7700/ws"
    assert websocket_url("https://c.example.com/prefix/") == "wss://c.example.com/prefix/ws"
    assert websocket_url("wss://c.example.com/ws") == "wss://c.example.com/ws"
    with pytest.raises(ValueError):
        websocket_url("ftp://x")
    with pytest.raises(ValueError):
        websocket_url("nonsense")


def test_backoff_grows_with_jitter_and_caps() -> None:
    client = client_for("http://127.0.0.1:1", "agt_x")
    client.settings.backoff_min, client.settings.backoff_max = 1.0, 60.0
    samples = [[client.backoff(n) for _ in range(200)] for n in range(10)]
    assert all(1.0 <= s <= 60.0 for row in samples for s in row)
    assert max(samples[0]) <= 2.0 and max(samples[9]) > 30.0  # grows, capped at 60
    assert len({round(s, 3) for s in samples[5]}) > 100  # jittered, not fixed


async def test_sync_pushes_and_restart(tmp_path: Path) -> None:
    server = RunningControl(tmp_path / "c.db")
    await server.start()
    port = server.port
    async with server.api() as api:
        agent = await create(api, "agent", "laptop")
        await create(api, "gateway", "edge")
        t1 = (
            await api.post(
                "/api/tunnels",
                json={"domain": "a.example.com", "target": "127.0.0.1:1", "agent": "laptop"},
            )
        ).json()
    changes: list[int] = []
    client = client_for(server.url, agent["apiKey"])
    client.on_change = lambda view: changes.append(len(view.tunnels))
    task = asyncio.create_task(client.run())
    try:
        await wait_for(lambda: client.view.has_config)
        assert set(client.view.tunnels) == {t1["id"]}
        config = client.view.agent_config()
        assert config is not None and config.agent.virtual_ip == "100.64.0.100"
        async with server.api() as api:
            t2 = (
                await api.post(
                    "/api/tunnels",
                    json={"domain": "b.example.com", "target": "127.0.0.1:2", "agent": "laptop"},
                )
            ).json()
            await wait_for(lambda: t2["id"] in client.view.tunnels)
            await api.delete(f"/api/tunnels/{t1['id']}")
            await wait_for(lambda: t1["id"] not in client.view.tunnels)
        version_before = client.view.config_version
        # Control goes away: the view stays, the client keeps trying.
        await server.stop()
        await wait_for(lambda: not client.connected.is_set())
        await asyncio.sleep(0.5)
        assert set(client.view.tunnels) == {t2["id"]}
        attempts = client.attempts
        again = RunningControl(tmp_path / "c.db")
        again.port = port
        await again.start()
        try:
            await wait_for(lambda: client.connected.is_set(), 10)
            assert client.attempts > attempts
            await wait_for(lambda: client.view.config_version > version_before)
            assert set(client.view.tunnels) == {t2["id"]}
        finally:
            await client.stop()
            await again.stop()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert changes  # on_change was called


async def test_bad_key_keeps_retrying_without_crashing(control: RunningControl) -> None:
    client = client_for(control.url, "agt_not-a-real-key-at-all")
    task = asyncio.create_task(client.run())
    try:
        await wait_for(lambda: client.attempts >= 3, 10)
        assert "refused" in client.last_error
        assert not client.view.has_config and not task.done()
    finally:
        await client.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def tunnel(tunnel_id: str, domain: str = "app.example.com") -> dict[str, Any]:
    """A tunnel as Control sends it."""
    return p.TunnelSpec(
        tunnel_id, "http", domain, None, "127.0.0.1:8080", "a", "100.64.0.100", True
    ).to_wire()


def agent_config(*tunnels: dict[str, Any]) -> dict[str, Any]:
    return agent_config_data(*tunnels, gateway_key=public_key(3))


def gateway_config(*tunnels: dict[str, Any], certificates: Any = ()) -> dict[str, Any]:
    return gateway_config_data(*tunnels, agent_key=public_key(4), certificates=certificates)


async def test_hostile_control_cannot_crash_the_client() -> None:
    """A fake Control sends garbage after auth; the client skips each bad frame whole
    (its view keeps the last good content), answers it with an ``error`` frame and
    stays connected."""
    garbage: list[str | bytes] = [
        "{nope",
        "[]",
        '{"type": 1}',
        b"\x00\xff",
        '{"type": "config", "data": {"agent": 5}}',
        json.dumps({"type": "config", "data": {**agent_config(), "tunnels": [5]}}),
        json.dumps({"type": "config", "configVersion": 4, "data": agent_config(tunnel("t0"))}),
        '{"type": "tunnel_create", "data": {"id": 7}}',
        '{"type": "tunnel_delete", "data": {}}',
        '{"type": "surprise", "data": {}}',
        '{"type": "error", "data": {"code": "x"}}',
        json.dumps({"type": "config", "configVersion": 5, "data": agent_config(tunnel("t1"))}),
        # one bad tunnel spoils the whole config: t1 stays, t9 does not arrive
        json.dumps(
            {
                "type": "config",
                "configVersion": 6,
                "data": agent_config(tunnel("t9"), {**tunnel("t8"), "agentIp": "nope"}),
            }
        ),
        json.dumps({"type": "tunnel_create", "data": {**tunnel("t3"), "domain": "a b"}}),
        json.dumps({"type": "tunnel_create", "configVersion": 6, "data": tunnel("t2")}),
        json.dumps({"type": "tunnel_create", "configVersion": 7, "data": tunnel("t2")}),
    ]
    seen: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        seen.append(json.loads(await ws.recv()))
        await ws.send(
            p.encode("auth_success", p.AuthSuccess("a", "laptop", "agent", 1).to_wire(), 1)
        )
        for item in garbage:
            await ws.send(item)
        with contextlib.suppress(Exception):
            async for message in ws:
                seen.append(json.loads(message))

    port = free_port()
    async with serve(handler, "127.0.0.1", port):
        client = client_for(f"http://127.0.0.1:{port}", "agt_whatever")
        task = asyncio.create_task(client.run())
        try:
            await wait_for(lambda: client.view.config_version == 7)
            assert set(client.view.tunnels) == {"t1", "t2"}
            assert seen[0]["type"] == "auth" and seen[0]["data"]["publicKey"] == public_key(9)
            errors = lambda: [m["data"]["code"] for m in seen if m["type"] == "error"]  # noqa: E731
            # every bad frame answered: 4 undecodable, 2 bad configs before t0's, the
            # bad tunnel_create/delete, the unknown type, the spoilt config, the bad domain
            await wait_for(lambda: len(errors()) == 11)
            assert {"malformed_json", "invalid_field", "unknown_type"} <= set(errors())
            assert client.connected.is_set() and not task.done()
        finally:
            await client.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_view_is_idempotent() -> None:
    view = ControlView()
    config = p.Frame("config", gateway_config(tunnel("t")), 3)
    assert view.apply(config, "gateway") is True
    assert view.apply(config, "gateway") is False
    create_frame = p.Frame("tunnel_create", tunnel("u", "u.example.com"), 4)
    assert view.apply(create_frame, "gateway") is True
    assert view.apply(create_frame, "gateway") is False
    delete = p.Frame("tunnel_delete", {"id": "u"}, 5)
    assert view.apply(delete, "gateway") is True
    assert view.apply(delete, "gateway") is False
    assert view.config_version == 5 and set(view.tunnels) == {"t"}
    current = view.gateway_config()
    assert current is not None and [t.id for t in current.tunnels] == ["t"]
    assert view.agent_config() is None  # a gateway's view is no agent's


def test_view_refuses_a_bad_frame_whole() -> None:
    view = ControlView()
    view.apply(p.Frame("config", agent_config(tunnel("t")), 3), "agent")
    bad = agent_config(tunnel("new"), {**tunnel("x"), "enabled": "yes"})
    with pytest.raises(p.ProtocolError):
        view.apply(p.Frame("config", bad, 4), "agent")
    with pytest.raises(p.ProtocolError):
        view.apply(p.Frame("config", gateway_config(), 4), "agent")  # another role's
    assert set(view.tunnels) == {"t"} and view.config_version == 3


def test_view_stored_and_restored_as_a_config_frame(tmp_path: Path) -> None:
    """The last good configuration survives a restart: written 0600, read back through
    the same checks as a ``config`` frame; a damaged file is refused, not half-read."""
    view = ControlView()
    certificate = {
        "domain": "app.example.com",
        "certificate": "-----BEGIN CERTIFICATE-----\n...",
        "privateKey": "-----BEGIN PRIVATE KEY-----\nsecret",
        "notAfter": 2e9,
    }
    data = gateway_config(tunnel("t1"), certificates=[certificate])
    view.apply(p.Frame("config", data, 7), "gateway")
    view.apply(p.Frame("tunnel_create", tunnel("t2", "b.example.com"), 8), "gateway")
    path = tmp_path / "last-config.json"
    path.write_text("{}")
    path.chmod(0o644)
    view.store(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = ControlView()
    assert again.restore(path, "gateway")
    assert again.current() == view.current() and set(again.tunnels) == {"t1", "t2"}
    assert again.has_config and again.config_version == 0  # Control's first config wins
    assert not ControlView().restore(tmp_path / "missing.json", "gateway")
    for damaged in ('{"gateway": {}, "agents": "x", "tunnels": []}', "[1]", "{", "1" * 30):
        path.write_text(damaged)
        fresh = ControlView()
        assert not fresh.restore(path, "gateway")
        assert not fresh.has_config and fresh.tunnels == {}
