"""The WebSocket hub with real ``websockets`` clients against a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import protocol
from tests.control.test_api import _self_signed
from tests.controlserver import Peer, RunningControl, connect_client, create, public_key


async def closed_with(peer: Peer, code: int, timeout: float = 8.0) -> str:
    """Drain until the server closes; return the close reason."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(timeout):
            while True:
                await peer.recv(timeout)
    assert info.value.rcvd is not None, "closed without a close frame"
    assert info.value.rcvd.code == code, (info.value.rcvd.code, info.value.rcvd.reason)
    return info.value.rcvd.reason


def _all_strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _all_strings(v)] + [str(k) for k in value]
    if isinstance(value, list):
        return [s for v in value for s in _all_strings(v)]
    return [value] if isinstance(value, str) else []


async def test_agent_and_gateway_auth_and_config(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "laptop")
    gateway = await create(api, "gateway", "edge")
    tunnel = (
        await api.post(
            "/api/tunnels",
            json={"domain": "app.example.com", "target": "127.0.0.1:8080", "agent": "laptop"},
        )
    ).json()
    gw = await connect_client(control, gateway["apiKey"], "gateway", 1, "203.0.113.7", 51820)
    auth_ok, gw_config = gw.frames
    assert auth_ok["data"]["id"] == gateway["id"] and auth_ok["data"]["clientType"] == "gateway"
    assert gw_config["configVersion"] >= 1
    # No agent key yet: the gateway has no peers.
    assert gw_config["data"]["agents"] == []
    assert gw_config["data"]["tunnels"][0]["id"] == tunnel["id"]

    ag = await connect_client(control, agent["apiKey"], "agent", 2)
    config = ag.frames[1]["data"]
    assert config["agent"] == {
        "id": agent["id"],
        "name": "laptop",
        "subnet": "100.64.0.0/24",
        "virtualIp": "100.64.0.100",
    }
    assert config["gateways"] == [
        {
            "id": gateway["id"],
            "name": "edge",
            "publicKey": public_key(1),
            "endpoint": "203.0.113.7:51820",
            "virtualIp": "100.64.0.1",
            "allowedIps": ["100.64.0.1/32"],
            "streamEndpoint": None,  # the gateway reported no HTTPS port
        }
    ]
    assert [t["id"] for t in config["tunnels"]] == [tunnel["id"]]
    assert config["tunnels"][0]["agentIp"] == "100.64.0.100"

    # The agent's new public key reaches the gateway as a fresh config.
    fresh = (await gw.expect("config"))["data"]
    assert fresh["agents"] == [
        {
            "id": agent["id"],
            "name": "laptop",
            "publicKey": public_key(2),
            "subnet": "100.64.0.0/24",
            "virtualIp": "100.64.0.100",
            "allowedIps": ["100.64.0.100/32"],
            "gatewayIp": "100.64.0.1",
        }
    ]
    assert fresh["gateway"]["addresses"] == ["100.64.0.1/24"]
    # Public keys and state are stored; nothing private travels.
    stored = (await api.get("/api/agents/laptop")).json()
    assert stored["publicKey"] == public_key(2) and stored["online"] is True
    gw_row = (await api.get("/api/gateways/edge")).json()
    assert (gw_row["publicIp"], gw_row["wireguardPort"], gw_row["online"]) == (
        "203.0.113.7",
        51820,
        True,
    )
    # every frame Control sent parses as the typed message the client reads
    assert protocol.parse_gateway_config(fresh).agents[0].gateway_ip == "100.64.0.1"
    assert protocol.parse_agent_config(config).gateways[0].endpoint == "203.0.113.7:51820"
    assert protocol.parse_auth_success(auth_ok["data"]).client_type == "gateway"
    for frame in gw.frames + ag.frames:
        for text in _all_strings(frame):
            assert "PRIVATE" not in text and not text.startswith(("agt_", "gtw_"))
            assert text != "privateKey" or frame["data"].get("certificates")
    await ag.close()
    await gw.close()


async def test_tunnel_changes_reach_the_right_clients(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    a = await create(api, "agent", "a")
    b = await create(api, "agent", "b")
    g1 = await create(api, "gateway", "g1")
    g2 = await create(api, "gateway", "g2")
    peer_a = await connect_client(control, a["apiKey"], "agent", 10)
    peer_b = await connect_client(control, b["apiKey"], "agent", 11)
    gw1 = await connect_client(control, g1["apiKey"], "gateway", 12)
    gw2 = await connect_client(control, g2["apiKey"], "gateway", 13, "198.51.100.2")
    await asyncio.sleep(0.3)  # let peer-change configs settle
    for peer in (peer_a, peer_b, gw1, gw2):
        peer.frames.clear()
        with pytest.raises(TimeoutError):
            while True:
                await peer.recv(0.3)
        peer.frames.clear()

    created = (
        await api.post(
            "/api/tunnels", json={"domain": "x.example.com", "target": "127.0.0.1:1", "agent": "a"}
        )
    ).json()
    for peer in (peer_a, gw1, gw2):
        frame = await peer.expect("tunnel_create")
        assert frame["data"]["id"] == created["id"] and frame["data"]["agentIp"] == "100.64.0.100"
    await peer_b.nothing()

    await api.patch(f"/api/tunnels/{created['id']}", json={"target": "127.0.0.1:2"})
    for peer in (peer_a, gw1, gw2):
        assert (await peer.expect("tunnel_update"))["data"]["target"] == "127.0.0.1:2"
    await peer_b.nothing()

    # Moving the tunnel: delete at the old agent, create at the new one.
    await api.patch(f"/api/tunnels/{created['id']}", json={"agent": "b"})
    assert (await peer_a.expect("tunnel_delete"))["data"]["id"] == created["id"]
    assert (await peer_b.expect("tunnel_create"))["data"]["agentIp"] == "100.64.1.100"
    for gw in (gw1, gw2):
        assert (await gw.expect("tunnel_update"))["data"]["agentId"] == b["id"]

    await api.delete(f"/api/tunnels/{created['id']}")
    assert (await peer_b.expect("tunnel_delete"))["data"] == {
        "id": created["id"],
        "agentId": b["id"],
    }
    for gw in (gw1, gw2):
        await gw.expect("tunnel_delete")
    await peer_a.nothing()

    # Versions only grow, per client.
    for peer in (peer_a, peer_b, gw1, gw2):
        versions = [f["configVersion"] for f in peer.frames]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)

    # Deleting an agent: the gateways get a config without it; its socket is closed.
    await api.delete("/api/agents/a")
    assert await closed_with(peer_a, protocol.CLOSE_REVOKED)
    for gw in (gw1, gw2):
        agents = (await gw.expect("config"))["data"]["agents"]
        assert [x["name"] for x in agents] == ["b"]
    # A gateway deleted: agents get a config without it.
    await api.delete("/api/gateways/g2")
    assert await closed_with(gw2, protocol.CLOSE_REVOKED)
    remaining = (await peer_b.expect("config"))["data"]["gateways"]
    assert [g["name"] for g in remaining] == ["g1"]
    for peer in (peer_b, gw1):
        await peer.close()


async def test_gateway_endpoint_change_pushes_to_agents(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "a")
    gateway = await create(api, "gateway", "g")
    peer = await connect_client(control, agent["apiKey"], "agent", 20)
    gw = await connect_client(control, gateway["apiKey"], "gateway", 21, "192.0.2.1", 51820)
    assert (await peer.expect("config"))["data"]["gateways"][0]["endpoint"] == "192.0.2.1:51820"
    # Same gateway reconnects from a new address: replacement + agents told.
    gw_new = await connect_client(control, gateway["apiKey"], "gateway", 21, "2001:db8::1", 443)
    assert "replaced" in await closed_with(gw, protocol.CLOSE_REPLACED)
    assert (await peer.expect("config"))["data"]["gateways"][0]["endpoint"] == "[2001:db8::1]:443"
    # Its HTTPS port (the stream transport for agents without UDP) reaches them too.
    gw_https = await connect_client(
        control, gateway["apiKey"], "gateway", 21, "2001:db8::1", 443, https_port=8443
    )
    await closed_with(gw_new, protocol.CLOSE_REPLACED)
    gateways = (await peer.expect("config"))["data"]["gateways"]
    assert gateways[0]["streamEndpoint"] == "[2001:db8::1]:8443"
    assert gateways[0]["endpoint"] == "[2001:db8::1]:443"
    # Reconnecting with nothing changed tells nobody.
    gw_same = await connect_client(
        control, gateway["apiKey"], "gateway", 21, "2001:db8::1", 443, https_port=8443
    )
    await closed_with(gw_https, protocol.CLOSE_REPLACED)
    await peer.nothing(0.5)
    assert (await api.get("/healthz")).json()["connections"] == 2
    await gw_same.close()
    await peer.close()


async def test_heartbeat_and_stale_version(control: RunningControl, api: httpx.AsyncClient) -> None:
    agent = await create(api, "agent", "a")
    peer = await connect_client(control, agent["apiKey"], "agent", 30)
    current = peer.version
    await peer.heartbeat(current)
    await peer.nothing(0.5)  # up to date: no answer needed
    await peer.heartbeat(current - 1)
    resent = await peer.expect("config")
    assert resent["configVersion"] > current
    await peer.heartbeat()
    await peer.nothing(0.3)
    await peer.close()


async def test_offline_after_silence_and_on_disconnect(tmp_path: Path) -> None:
    server = RunningControl(tmp_path / "c.db", offline_after=1.0)
    await server.start()
    try:
        async with server.api() as api:
            a = await create(api, "agent", "quiet")
            b = await create(api, "agent", "chatty")
            quiet = await connect_client(server, a["apiKey"], "agent", 40)
            chatty = await connect_client(server, b["apiKey"], "agent", 41)
            for _ in range(8):
                await chatty.heartbeat()
                await asyncio.sleep(0.25)
            assert "heartbeat" in await closed_with(quiet, protocol.CLOSE_HEARTBEAT_TIMEOUT, 3)
            assert (await api.get("/api/agents/quiet")).json()["online"] is False
            assert (await api.get("/api/agents/chatty")).json()["online"] is True
            await chatty.close()
            for _ in range(50):
                if (await api.get("/api/agents/chatty")).json()["online"] is False:
                    break
                await asyncio.sleep(0.05)
            body = (await api.get("/api/agents/chatty")).json()
            assert body["online"] is False
    finally:
        await server.stop()
    with sqlite3.connect(tmp_path / "c.db") as db:
        (seen,) = db.execute("select last_seen from agents where name='chatty'").fetchone()
    assert seen is not None  # flushed on shutdown


async def test_status_and_certificate_obtained(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "a")
    other = await create(api, "agent", "b")
    gateway = await create(api, "gateway", "g")
    t = (
        await api.post(
            "/api/tunnels", json={"domain": "app.example.com", "target": "h:1", "agent": "a"}
        )
    ).json()
    foreign = (
        await api.post(
            "/api/tunnels", json={"domain": "b.example.com", "target": "h:1", "agent": "b"}
        )
    ).json()
    peer = await connect_client(control, agent["apiKey"], "agent", 50)
    await peer.send(
        "status",
        {
            "tunnels": [
                {"tunnelId": t["id"], "health": "unhealthy", "detail": "connection refused"},
                {"tunnelId": foreign["id"], "health": "healthy"},  # not its tunnel: ignored
            ]
        },
    )
    await peer.heartbeat()
    await asyncio.sleep(0.3)
    mine = (await api.get(f"/api/tunnels/{t['id']}")).json()
    assert (mine["health"], mine["healthDetail"]) == ("unhealthy", "connection refused")
    assert (await api.get(f"/api/tunnels/{foreign['id']}")).json()["health"] is None
    del other

    gw = await connect_client(control, gateway["apiKey"], "gateway", 51)
    gw2_row = await create(api, "gateway", "g2")
    gw2 = await connect_client(control, gw2_row["apiKey"], "gateway", 52)
    cert, key = _self_signed("app.example.com")
    # the notAfter claimed is ignored: what is stored and pushed is the leaf's own
    not_after = x509.load_pem_x509_certificate(cert.encode()).not_valid_after_utc.timestamp()
    await gw.send(
        "certificate_obtained",
        {"domain": "app.example.com", "certificate": cert, "privateKey": key, "notAfter": 1e300},
    )
    for g in (gw, gw2):
        certs = (await g.expect("config"))["data"]["certificates"]
        assert certs == [
            {
                "domain": "app.example.com",
                "certificate": cert,
                "privateKey": key,
                "notAfter": not_after,
            }
        ]
    listed = (await api.get("/api/certificates")).json()["items"]
    assert listed[0]["source"] == "acme" and "privateKey" not in listed[0]
    # a chain that does not parse, or whose key is another one, is refused and the good
    # certificate stays (it used to be stored over it and pushed to every gateway)
    _, other_key = _self_signed("app.example.com")
    broken = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    for bad_cert, bad_key in ((broken, key), (cert, other_key)):
        await gw.send(
            "certificate_obtained",
            {
                "domain": "app.example.com",
                "certificate": bad_cert,
                "privateKey": bad_key,
                "notAfter": 1.9e9,
            },
        )
        assert (await gw.expect("error"))["data"]["code"] == "invalid_certificate"
    stored = (await api.get("/api/certificates")).json()["items"]
    assert [(c["domain"], c["certificate"]) for c in stored] == [("app.example.com", cert)]
    # Agents never receive certificates; and a domain without a tunnel is refused.
    assert all("certificates" not in f["data"] for f in peer.frames if f["type"] == "config")
    await gw.send(
        "certificate_obtained",
        {"domain": "evil.example.com", "certificate": cert, "privateKey": key, "notAfter": 1.9e9},
    )
    assert (await gw.expect("error"))["data"]["code"] == "unknown_domain"
    # An agent may not send gateway messages.
    await peer.send("certificate_obtained", {"domain": "app.example.com"})
    assert (await peer.expect("error"))["data"]["code"] == "unexpected_type"
    for p in (peer, gw, gw2):
        await p.close()


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{not json", "malformed_json"),
    ("[]", "malformed_frame"),
    ('"text"', "malformed_frame"),
    ('{"data": {}}', "malformed_frame"),
    ('{"type": 5}', "malformed_frame"),
    ('{"type": "heartbeat", "data": []}', "malformed_frame"),
    ('{"type": "heartbeat", "data": {"timestamp": "x", "configVersion": 1}}', "invalid_field"),
    ('{"type": "heartbeat", "data": {"timestamp": 1, "configVersion": -1}}', "invalid_field"),
    ('{"type": "heartbeat", "data": {"timestamp": 1, "configVersion": true}}', "invalid_field"),
    # numbers no field can hold are refused by the parser, naming the field
    # (common/jsonsafe.py); NaN is not JSON
    ('{"type": "heartbeat", "data": {"timestamp": 1e999, "configVersion": 1}}', "invalid_field"),
    ('{"type": "heartbeat", "data": {"timestamp": NaN, "configVersion": 1}}', "malformed_json"),
    ('{"type": "heartbeat", "configVersion": 1' + "0" * 5000 + ', "data": {}}', "invalid_field"),
    (
        '{"type": "heartbeat", "data": {"timestamp": 1, "configVersion": -' + "9" * 4400 + "}}",
        "invalid_field",
    ),
    # ones that parse but fit no counter are invalid fields, not crashes
    (
        '{"type": "heartbeat", "data": {"timestamp": 1, "configVersion": 99999999999999999999}}',
        "invalid_field",
    ),
    ('{"type": "heartbeat", "configVersion": 99999999999999999999, "data": {}}', "malformed_frame"),
    ('{"type": "heartbeat", "configVersion": "1", "data": {}}', "malformed_frame"),
    ('{"type": "status", "data": {"tunnels": "all"}}', "invalid_field"),
    (
        '{"type": "status", "data": {"tunnels": [{"tunnelId": 1, "health": "healthy"}]}}',
        "invalid_field",
    ),
    (
        '{"type": "status", "data": {"tunnels": [{"tunnelId": "x", "health": "great"}]}}',
        "invalid_field",
    ),
    # a lone surrogate (valid as a JSON escape) cannot be stored or logged: it was a 1011
    (
        '{"type": "status", "data": {"tunnels": [{"tunnelId": "x", "health": "healthy", '
        '"detail": "\\udfff"}]}}',
        "invalid_field",
    ),
    ('{"type": "auth", "data": {}}', "unexpected_type"),
    ('{"type": "launch_missiles", "data": {}}', "unknown_type"),
    ("[" * 5000 + "]" * 5000, "malformed_json"),
    (b"\x00\x01binary", "binary_frame"),
]


async def test_bad_frames_get_errors_and_harm_nobody(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    a = await create(api, "agent", "a")
    b = await create(api, "agent", "b")
    victim = await connect_client(control, a["apiKey"], "agent", 60)
    bystander = await connect_client(control, b["apiKey"], "agent", 61)
    for raw, code in BAD_FRAMES:
        await victim.ws.send(raw)
        error = await victim.expect("error")
        assert error["data"]["code"] == code, (raw[:60], error)
    # Still connected and working, and so is the other client.
    await victim.heartbeat(0)
    await victim.expect("config")
    await bystander.heartbeat(0)
    await bystander.expect("config")
    # An oversized frame is refused by the WebSocket layer with 1009, nothing else breaks.
    await victim.ws.send("x" * (protocol.MAX_FRAME_BYTES + 10))
    await closed_with(victim, 1009)
    await bystander.heartbeat(0)
    await bystander.expect("config")
    await bystander.close()


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "heartbeat", "data": {"timestamp": 1, "configVersion": 0}}, "auth_required"),
        (
            {
                "type": "auth",
                "data": {"apiKey": "agt_wrong", "clientType": "agent", "publicKey": public_key(1)},
            },
            "invalid_key",
        ),
        (
            {
                "type": "auth",
                "data": {"apiKey": "x", "clientType": "robot", "publicKey": public_key(1)},
            },
            "invalid_field",
        ),
        (
            {
                "type": "auth",
                "data": {"apiKey": "agt_x", "clientType": "agent", "publicKey": "short"},
            },
            "invalid_field",
        ),
        (  # a lone surrogate in any string (here the version) was an exception, no reply
            {
                "type": "auth",
                "data": {
                    "apiKey": "agt_x",
                    "clientType": "agent",
                    "publicKey": public_key(1),
                    "version": "1.0\ud800",
                },
            },
            "invalid_field",
        ),
        (
            {
                "type": "auth",
                "data": {
                    "apiKey": "gtw_x",
                    "clientType": "gateway",
                    "publicKey": public_key(1),
                    "publicIp": "not-ip",
                    "wireguardPort": 1,
                },
            },
            "invalid_field",
        ),
        (
            {
                "type": "auth",
                "data": {
                    "apiKey": "gtw_x",
                    "clientType": "gateway",
                    "publicKey": public_key(1),
                    "publicIp": "192.0.2.1",
                    "wireguardPort": 70000,
                },
            },
            "invalid_field",
        ),
    ],
)
async def test_bad_auth_is_refused(
    control: RunningControl, first: dict[str, Any], code: str
) -> None:
    async with connect(control.ws_url) as ws:
        await ws.send(json.dumps(first))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "auth_error" and reply["data"]["code"] == code
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == protocol.CLOSE_AUTH_FAILED


async def test_wrong_kind_of_key_is_refused(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "a")
    async with connect(control.ws_url) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "auth",
                    "data": {
                        "apiKey": agent["apiKey"],
                        "clientType": "gateway",
                        "publicKey": public_key(1),
                        "publicIp": "192.0.2.1",
                        "wireguardPort": 51820,
                    },
                }
            )
        )
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "auth_error"


async def test_a_store_error_while_authenticating_closes_1011_and_the_next_try_works(
    control: RunningControl,
    api: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing database costs the one connection: a close frame 1011 (the client
    retries, as it does any failure), one log line with the error, and nothing left
    counted as pending or admitted -- not an abnormal drop of the socket (1006) after
    an "Exception in ASGI application"."""
    agent = await create(api, "agent", "a")
    store, hub = control.app.state.store, control.app.state.hub
    real = store.clients_by_key_hashes

    async def database_gone(*args: Any) -> list[dict[str, Any]]:
        raise OSError("database gone")

    monkeypatch.setattr(store, "clients_by_key_hashes", database_gone)
    with caplog.at_level("ERROR", logger="control.hub"):
        async with connect(control.ws_url) as ws:
            await send_agent_auth(ws, agent["apiKey"])
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None, "dropped without a close frame"
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "internal error")
    failed = [r for r in caplog.records if r.getMessage() == "authenticating a connection failed"]
    assert len(failed) == 1 and "database gone" in caplog.text
    assert hub.admission.admitted == 0 and hub.pending.total() == 0
    monkeypatch.setattr(store, "clients_by_key_hashes", real)
    peer = await connect_client(control, agent["apiKey"], "agent", 5)
    await peer.close()

    # failing after the connection was registered: unregistered again, not left behind
    def bug(*args: Any) -> None:
        raise RuntimeError("a bug")

    await until_gone(hub, agent["id"])
    monkeypatch.setattr(hub.cluster, "connected", bug)
    async with connect(control.ws_url) as ws:
        await send_agent_auth(ws, agent["apiKey"])
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    assert ("agent", agent["id"]) not in hub.connections
    assert hub.admission.admitted == 0 and hub.pending.total() == 0


async def send_agent_auth(ws: Any, api_key: str) -> None:
    data = {"apiKey": api_key, "clientType": "agent", "publicKey": public_key(5)}
    await ws.send(json.dumps({"type": "auth", "data": data}))


async def until_gone(hub: Any, agent_id: str) -> None:
    async with asyncio.timeout(5):
        while ("agent", agent_id) in hub.connections:
            await asyncio.sleep(0.01)


async def test_silent_client_is_closed_after_auth_timeout(control: RunningControl) -> None:
    loop = asyncio.get_running_loop()
    async with connect(control.ws_url) as ws:
        started = loop.time()
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        elapsed = loop.time() - started
    assert info.value.rcvd is not None and info.value.rcvd.code == protocol.CLOSE_AUTH_TIMEOUT
    assert 4.5 <= elapsed <= 8.0


async def test_rotated_key_closes_connection_and_old_key_fails(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "a")
    peer = await connect_client(control, agent["apiKey"], "agent", 70)
    new_key = (await api.post("/api/agents/a/rotate-key")).json()["apiKey"]
    await closed_with(peer, protocol.CLOSE_REVOKED)
    with pytest.raises(AssertionError):
        await connect_client(control, agent["apiKey"], "agent", 70)
    fresh = await connect_client(control, new_key, "agent", 70)
    await fresh.close()


async def test_a_flood_of_bad_frames_is_logged_once_and_closed_with_4007(
    control: RunningControl, api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from control.ws.hub import BAD_FRAME_BURST

    a = await create(api, "agent", "flooder")
    b = await create(api, "agent", "calm")
    flooder = await connect_client(control, a["apiKey"], "agent", 70)
    calm = await connect_client(control, b["apiKey"], "agent", 71)
    caplog.set_level("INFO", logger="control.hub")
    for _ in range(BAD_FRAME_BURST * 3):  # far past the allowance, as fast as it goes
        with contextlib.suppress(ConnectionClosed):
            await flooder.ws.send("{not json")
    assert "too many bad frames" in await closed_with(flooder, protocol.CLOSE_BAD_FRAMES)
    bad_lines = [r for r in caplog.records if r.getMessage() == "bad frame from client"]
    assert len(bad_lines) == 1  # one line per code per interval, not one per frame
    closing = [r for r in caplog.records if "too many bad frames" in r.getMessage()]
    assert len(closing) == 1
    # gone from the registry at once; the other client is untouched
    health = (await api.get("/api/agents/flooder")).json()
    assert health["online"] is False
    await calm.heartbeat(0)
    await calm.expect("config")
    await calm.close()


async def test_a_client_closed_as_too_slow_is_offline_at_once(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    hub = control.app.state.hub
    a = await create(api, "agent", "slowpoke")
    peer = await connect_client(control, a["apiKey"], "agent", 72)
    conn = hub.connections[("agent", a["id"])]
    hub._too_slow(conn)  # what a full send queue does
    await asyncio.sleep(0)
    assert ("agent", a["id"]) not in hub.connections
    assert (await api.get("/api/agents/slowpoke")).json()["online"] is False
    await closed_with(peer, protocol.CLOSE_TOO_SLOW)
    again = await connect_client(control, a["apiKey"], "agent", 72)  # and it may come back
    assert (await api.get("/api/agents/slowpoke")).json()["online"] is True
    await again.close()


async def test_a_clients_error_reports_are_logged_once_and_change_nothing(
    control: RunningControl, api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that cannot use what Control sent says so with an ``error`` frame:
    Control logs it once per code per interval, answers nothing, keeps the session;
    Control's own error frames carry no configVersion (they change nothing held)."""
    a = await create(api, "agent", "reporter")
    client = await connect_client(control, a["apiKey"], "agent", 72)
    caplog.set_level("INFO", logger="control.hub")
    report = protocol.ErrorReport("invalid_field", "'agentIp' must be an IP address")
    for _ in range(5):
        await client.ws.send(protocol.encode("error", report.to_wire()))
    await client.nothing()
    lines = [r for r in caplog.records if r.getMessage() == "client reports an error"]
    assert len(lines) == 1 and lines[0].fields["code"] == "invalid_field"  # type: ignore[attr-defined]
    await client.ws.send('{"type": "error", "data": {"code": 5}}')  # a bad report is bad
    error = await client.expect("error")
    assert error["data"]["code"] == "invalid_field" and "configVersion" not in error
    await client.heartbeat(0)
    await client.expect("config")
    await client.close()
