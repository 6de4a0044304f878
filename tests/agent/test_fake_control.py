"""The agent against a fake Control that sends garbage: it logs, skips and keeps going;
plus the config → WireGuard/forwarding mapping in isolation."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from agent.device import gateways_from_config, parse_endpoint
from agent.runtime import Agent, AgentSettings
from common import protocol as p
from netstack.wireguard.crypto import private_key_from_bytes, public_key_of


def gateway_key(seed: int) -> str:
    return base64.b64encode(public_key_of(private_key_from_bytes(bytes([seed]) * 32))).decode()


GOOD_CONFIG = {
    "type": "config",
    "configVersion": 7,
    "data": {
        "agent": {
            "id": "a1",
            "name": "laptop",
            "subnet": "100.64.0.0/24",
            "virtualIp": "100.64.0.100",
        },
        "gateways": [
            {
                "id": "g1",
                "name": "edge",
                "publicKey": gateway_key(5),
                "endpoint": "127.0.0.1:9",
                "virtualIp": "100.64.0.1",
                "allowedIps": ["100.64.0.1/32"],
            }
        ],
        "tunnels": [
            {
                "id": "t1",
                "protocol": "http",
                "domain": "app.example.com",
                "publicPort": None,
                "target": "http://127.0.0.1:8000/base",
                "agentId": "a1",
                "agentIp": "100.64.0.100",
                "enabled": True,
            }
        ],
    },
}

GARBAGE: list[str | bytes] = [
    b"\x00\x01 binary frame",
    "not json at all",
    "[1, 2, 3]",
    '{"type": 5}',
    '{"type": "config", "data": "nope"}',
    '{"type": "config", "data": {"agent": 1, "gateways": [], "tunnels": []}}',
    '{"type": "config", "data": {"agent": {}, "gateways": {}, "tunnels": []}}',
    '{"type": "config", "data": {"agent": {}, "gateways": [], "tunnels": [{"no": "id"}]}}',
    '{"type": "tunnel_create", "data": {"domain": "x.example.com"}}',
    '{"type": "tunnel_delete", "data": {"id": 12}}',
    '{"type": "config", "configVersion": "high", "data": {}}',
    '{"type": "surprise", "data": {}}',
    "[" * 100_000 + "]" * 100_000,
    json.dumps({"type": "error", "data": {"code": "x" * 5000, "message": None}}),
    # a config that decodes but whose entries are nonsense: refused whole
    json.dumps(
        {
            "type": "config",
            "data": {
                "agent": {"virtualIp": "not-an-ip"},
                "gateways": [
                    "string",
                    {"publicKey": "short"},
                    {"publicKey": gateway_key(6), "allowedIps": "100.64.0.2/32"},
                    {"publicKey": gateway_key(7), "allowedIps": ["nonsense"]},
                    {"publicKey": gateway_key(8), "allowedIps": [], "endpoint": "nowhere"},
                    {"publicKey": base64.b64encode(bytes(32)).decode(), "allowedIps": []},
                ],
                "tunnels": [
                    {"id": "bad1", "protocol": "gopher", "agentIp": "100.64.0.100"},
                    {"id": "bad2", "protocol": "http", "domain": "a.example.com", "agentIp": "x"},
                    {"id": "bad3", "protocol": "tcp", "publicPort": 0, "agentIp": "100.64.0.100"},
                    {
                        "id": "bad4",
                        "protocol": "http",
                        "domain": "b.example.com",
                        "agentIp": "100.64.0.100",
                        "target": "ftp://x",
                    },
                ],
            },
        }
    ),
]


async def test_garbage_from_control_never_stops_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def fake_control(ws: ServerConnection) -> None:
        received.append(json.loads(await ws.recv()))
        await ws.send(p.encode("auth_success", p.AuthSuccess("a1", "laptop", "agent", 1).to_wire()))
        for frame in GARBAGE:
            await ws.send(frame)
        await ws.send(json.dumps(GOOD_CONFIG))
        async for raw in ws:  # heartbeats and status reports
            received.append(json.loads(raw))
            if sum(1 for f in received if f["type"] == "heartbeat") >= 1:
                done.set()

    caplog.set_level(logging.INFO)
    async with serve(fake_control, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        agent = Agent(
            AgentSettings(
                control_url=f"http://127.0.0.1:{port}",
                api_key="agt_fake",
                data_dir=tmp_path,
                wireguard_host="127.0.0.1",
                health_interval=0.2,
            )
        )
        await agent.start()
        try:
            async with asyncio.timeout(15):
                while agent.data_plane.address != "100.64.0.100":
                    await asyncio.sleep(0.02)
                await done.wait()
            supervisor = agent.runtime.supervisor
            restarts = {n: supervisor.restarts(n) for n in supervisor.names}
            assert {"control", "reconcile", "target-health", "wireguard-watch"} <= set(restarts)
            assert set(restarts.values()) == {0}, f"a task of the agent died: {restarts}"
            assert agent.client.view.config_version == 7
            route = agent.forwarder.router.lookup_host("app.example.com")
            assert route is not None and (
                route.upstream_host,
                route.upstream_port,
                route.path_prefix,
            ) == ("127.0.0.1", 8000, "/base")
            assert list(agent.data_plane.gateways) == [gateway_key(5)]
            assert received[0]["type"] == "auth" and received[0]["data"]["clientType"] == "agent"
            assert "apiKey" in received[0]["data"]
        finally:
            await agent.stop()
    assert "malformed frame from control" in caplog.text
    assert "agt_fake" not in caplog.text


def test_gateways_from_config_and_endpoints() -> None:
    assert parse_endpoint("192.0.2.1:51820") == ("192.0.2.1", 51820)
    assert parse_endpoint("[2001:db8::1]:51820") == ("2001:db8::1", 51820)
    for bad in ("192.0.2.1", "host.example.com:1", "192.0.2.1:0", "[::1]:99999", ":1"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    good = {
        "id": "g1",
        "name": "a",
        "publicKey": gateway_key(1),
        "endpoint": None,
        "virtualIp": "100.64.0.1",
        "allowedIps": ["100.64.0.1/32"],
    }
    config = {"agent": GOOD_CONFIG["data"]["agent"], "tunnels": []}
    parsed = p.parse_agent_config(
        {**config, "gateways": [good, {**good, "id": "g2", "endpoint": "[2001:db8::1]:7"}]}
    )
    peers = gateways_from_config(parsed.gateways)
    assert [(g.id, g.endpoint, g.allowed_ips) for g in peers] == [
        ("g1", None, ("100.64.0.1/32",)),
        ("g2", ("2001:db8::1", 7), ("100.64.0.1/32",)),
    ]
    # a gateway Control could not have sent spoils the config before the agent sees it
    for bad in ({**good, "endpoint": "bad"}, {**good, "allowedIps": ["x"]}, 7):
        with pytest.raises(p.ProtocolError):
            p.parse_agent_config({**config, "gateways": [good, bad]})


async def test_device_follows_gateway_changes(tmp_path: Path) -> None:
    from agent.device import AgentDataPlane, GatewayPeer
    from common.keys import load_or_create

    device = AgentDataPlane(load_or_create(tmp_path), "127.0.0.1")
    await device.start()
    try:
        one = GatewayPeer("g1", "edge1", gateway_key(1), ("127.0.0.1", 9), ("100.64.0.1/32",))
        two = GatewayPeer("g2", "edge2", gateway_key(2), None, ("100.64.0.2/32",))
        assert device.apply("100.64.0.100", [one, two])
        assert not device.apply("100.64.0.100", [one, two])  # idempotent
        peers = device.tunnel.device.peers
        assert set(device.tunnel.peer_keys()) == {one.public_key, two.public_key}
        before = {k: p for k, p in peers.items()}
        moved = GatewayPeer("g1", "edge1", gateway_key(1), ("127.0.0.1", 10), ("100.64.0.1/32",))
        assert device.apply("100.64.0.100", [moved, two])
        # the other gateway's peer object (and its session) is untouched
        assert all(peers[k] is before[k] for k in peers)
        assert device.apply("100.64.0.100", [moved])
        assert device.tunnel.peer_keys() == {one.public_key}
    finally:
        device.close()
