"""Disabling and enabling agents and gateways: the REST API, the hub's effect on real
WebSocket connections (close code 4008, refused with ``auth_error`` ``disabled`` while
disabled, left out of every other client's config, a disabled agent's tunnels sent as
disabled, the same key let in again once enabled), the real Control client marking its
view disabled, and the admin CLI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import protocol
from common.controlclient import ControlClient, ControlClientSettings, ControlView
from kakuremichi.cli import main
from tests.controlserver import (
    ADMIN_TOKEN,
    Peer,
    RunningControl,
    connect_client,
    create,
    public_key,
)


async def refused_as_disabled(control: RunningControl, api_key: str, client_type: str) -> None:
    """A connection with this (valid) key gets ``auth_error`` ``disabled`` and 4008."""
    async with connect(control.ws_url) as ws:
        peer = Peer(ws)
        data: dict[str, Any] = {
            "apiKey": api_key,
            "clientType": client_type,
            "publicKey": public_key(9),
            "version": "test/1",
        }
        if client_type == "gateway":
            data |= {"publicIp": "192.0.2.10", "wireguardPort": 51820}
        await peer.send("auth", data)
        frame = await peer.recv()
        assert frame["type"] == "auth_error", frame
        assert frame["data"]["code"] == protocol.AUTH_DISABLED
        assert "disabled" in frame["data"]["message"]
        with pytest.raises(ConnectionClosed) as info:
            await peer.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == protocol.CLOSE_DISABLED


async def closed_disabled(peer: Peer) -> None:
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(5):
            while True:
                await peer.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == protocol.CLOSE_DISABLED, info.value.rcvd


async def config_where(peer: Peer, kind: str, check: Any) -> Any:
    """The next config (agent's or gateway's, parsed) for which ``check`` holds: pushes
    coalesced from earlier changes may come first."""
    parse = protocol.parse_agent_config if kind == "agent" else protocol.parse_gateway_config
    async with asyncio.timeout(5):
        while True:
            config = parse((await peer.expect("config"))["data"])
            if check(config):
                return config


async def patch(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.patch(path, json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def test_disabling_an_agent_and_a_gateway_on_real_connections(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "laptop")
    other = await create(api, "agent", "nas")
    gateway = await create(api, "gateway", "edge")
    tunnel = (
        await api.post(
            "/api/tunnels",
            json={"domain": "app.example.com", "target": "127.0.0.1:8080", "agent": "laptop"},
        )
    ).json()
    gw = await connect_client(control, gateway["apiKey"], "gateway", 1, "203.0.113.7", 51820)
    ag = await connect_client(control, agent["apiKey"], "agent", 2)
    nas = await connect_client(control, other["apiKey"], "agent", 3)
    await config_where(gw, "gateway", lambda c: {a.name for a in c.agents} == {"laptop", "nas"})

    # -- the agent disabled: closed with 4008, gone from the gateway's peers, its
    #    tunnel sent as disabled; the other agent untouched
    shown = await patch(api, "/api/agents/laptop", {"enabled": False})
    assert shown["enabled"] is False
    await closed_disabled(ag)
    config = await config_where(gw, "gateway", lambda c: len(c.agents) == 1)
    assert [a.name for a in config.agents] == ["nas"]
    assert [(t.id, t.enabled) for t in config.tunnels] == [(tunnel["id"], False)]
    row = (await api.get("/api/agents/laptop")).json()
    assert (row["enabled"], row["online"], row["publicKey"]) == (False, False, public_key(2))
    # REST keeps the tunnel's own flag: enabling the agent brings it back as it was
    assert (await api.get(f"/api/tunnels/{tunnel['id']}")).json()["enabled"] is True
    await refused_as_disabled(control, agent["apiKey"], "agent")
    listed = {a["name"]: a["enabled"] for a in (await api.get("/api/agents")).json()["items"]}
    assert listed == {"laptop": False, "nas": True}
    # changes to a disabled agent's tunnels still reach the gateways, still disabled
    await patch(api, f"/api/tunnels/{tunnel['id']}", {"target": "127.0.0.1:8081"})
    update = protocol.parse_tunnel((await gw.expect("tunnel_update"))["data"])
    assert (update.target, update.enabled) == ("127.0.0.1:8081", False)

    # -- enabled again: the same key connects, the gateway peers with it again
    assert (await patch(api, "/api/agents/laptop", {"enabled": True}))["enabled"] is True
    config = await config_where(gw, "gateway", lambda c: len(c.agents) == 2)
    assert {a.name for a in config.agents} == {"laptop", "nas"}
    assert [t.enabled for t in config.tunnels] == [True]
    ag = await connect_client(control, agent["apiKey"], "agent", 2)
    agent_view = protocol.parse_agent_config(ag.frames[1]["data"])
    assert [g.name for g in agent_view.gateways] == ["edge"]

    # -- the gateway disabled: closed, and no agent peers with it any more
    await patch(api, f"/api/gateways/{gateway['id']}", {"enabled": False})
    await closed_disabled(gw)
    for peer in (ag, nas):
        await config_where(peer, "agent", lambda c: c.gateways == ())
    await refused_as_disabled(control, gateway["apiKey"], "gateway")
    # renaming a disabled gateway is allowed and keeps it disabled
    renamed = await patch(api, "/api/gateways/edge", {"name": "edge-2"})
    assert (renamed["name"], renamed["enabled"]) == ("edge-2", False)
    await patch(api, "/api/gateways/edge-2", {"enabled": True})
    for peer in (ag, nas):
        await config_where(peer, "agent", lambda c: [g.name for g in c.gateways] == ["edge-2"])
    gw = await connect_client(control, gateway["apiKey"], "gateway", 1, "203.0.113.7", 51820)
    assert {a.name for a in protocol.parse_gateway_config(gw.frames[1]["data"]).agents} == {
        "laptop",
        "nas",
    }
    # enabling what is enabled changes nothing and pushes nothing to the client itself
    await patch(api, "/api/agents/nas", {"enabled": True})
    for peer in (ag, nas, gw):
        await peer.close()


async def test_created_disabled_and_bad_bodies(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    response = await api.post("/api/gateways", json={"name": "spare", "enabled": False})
    assert response.status_code == 201, response.text
    spare = response.json()
    assert spare["enabled"] is False and spare["apiKey"].startswith("gtw_")
    await refused_as_disabled(control, spare["apiKey"], "gateway")
    await create(api, "agent", "laptop")
    for body, field in (
        ({}, "name or enabled"),
        ({"enabled": None}, "enabled cannot be null"),
        ({"name": None}, "name cannot be null"),
        ({"enabled": "false"}, "enabled"),
        ({"enabled": 0}, "enabled"),
        ({"enabled": True, "online": True}, "online"),
    ):
        response = await api.patch("/api/agents/laptop", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in response.text, (body, response.text)
    assert (await api.get("/api/agents/laptop")).json()["enabled"] is True
    response = await api.patch("/api/agents/nobody", json={"enabled": False})
    assert response.status_code == 404
    # the OpenAPI document says what is checked
    schema = (await api.get("/openapi.json")).json()["components"]["schemas"]
    assert schema["ClientUpdate"]["properties"]["enabled"]
    assert "enabled" in schema["AgentOut"]["required"]


async def test_the_control_client_serves_everything_disabled_until_enabled(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    """The real client of agents and gateways: told it is disabled (a live connection
    closed with 4008, then ``auth_error`` on every retry) its view serves every tunnel
    as disabled; enabled again, the next config is applied whatever it holds."""
    row = await create(api, "agent", "laptop")
    await api.post(
        "/api/tunnels",
        json={"domain": "app.example.com", "target": "127.0.0.1:8080", "agent": "laptop"},
    )
    changes: list[tuple[bool, tuple[bool, ...]]] = []

    def on_change(view: ControlView) -> None:
        config = view.agent_config()
        assert config is not None
        changes.append((view.disabled, tuple(t.enabled for t in config.tunnels)))

    settings = ControlClientSettings(
        control.url, row["apiKey"], "agent", public_key(4), "test/1", backoff_min=0.05
    )
    settings.backoff_max = 0.2
    client = ControlClient(settings, on_change=on_change)
    task = asyncio.get_running_loop().create_task(client.run())

    async def until(condition: Any) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.02)

    try:
        await until(lambda: changes and changes[-1] == (False, (True,)))
        await patch(api, "/api/agents/laptop", {"enabled": False})
        await until(lambda: client.view.disabled)
        assert changes[-1] == (True, (False,))
        config = client.view.agent_config()
        assert config is not None and [t.enabled for t in config.tunnels] == [False]
        attempts = client.attempts
        await until(lambda: client.attempts >= attempts + 2)  # refused again, still disabled
        assert client.view.disabled and "disabled" in client.last_error
        assert not client.connected.is_set()
        # the stored configuration holds the tunnels disabled too
        stored = client.view.current()
        assert stored is not None and not stored.tunnels[0].enabled
        count = len(changes)
        await patch(api, "/api/agents/laptop", {"enabled": True})
        await until(lambda: client.connected.is_set() and len(changes) > count)
        assert changes[-1] == (False, (True,)) and not client.view.disabled
    finally:
        await client.stop()
        await asyncio.wait_for(task, 5)  # run() returns once stopped


async def admin(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``kakuremichi admin …`` in this process (in a thread: the CLI is synchronous)."""

    def run() -> int:
        try:
            return main(["admin", *args])
        except SystemExit as exc:  # --help
            return int(exc.code or 0)

    code = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return code, out, err


async def test_admin_cli_disables_and_enables(
    control: RunningControl,
    api: httpx.AsyncClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAKUREMICHI_CONTROL_URL", control.url)
    monkeypatch.setenv("KAKUREMICHI_ADMIN_TOKEN", ADMIN_TOKEN)
    await create(api, "agent", "laptop")
    await create(api, "gateway", "edge")
    for kind, name in (("agent", "laptop"), ("gateway", "edge")):
        code, out, err = await admin(capsys, kind, "disable", name)
        assert code == 0, err
        assert out.strip() == f"disabled {kind} {name}"
        assert (await api.get(f"/api/{kind}s/{name}")).json()["enabled"] is False
        code, out, err = await admin(capsys, kind, "list")
        header, line = out.splitlines()[:2]
        assert "enabled" in header.split() and "False" in line.split(), out
        code, out, err = await admin(capsys, kind, "enable", name, "--json")
        assert code == 0, err
        assert json.loads(out)["enabled"] is True
    code, out, err = await admin(capsys, "agent", "disable", "nobody")
    assert code == 1 and "nobody" in err
    code, out, err = await admin(capsys, "gateway", "disable", "--help")
    assert code == 0
    assert "close code 4008" in out and "key stays valid" in out
