"""Views built once for a crowd (issue 19, control/ws/configs.py): the parts of a
gateway's config every gateway shares are built with the first gateway's view and
reused, the tunnels are indexed by agent once; what each client is told is exactly
what building its view alone gives."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common import protocol as p
from control.alloc import AddressPlan
from control.db.engine import create_engine, migrate
from control.db.store import Row, Store
from control.ws.configs import AgentTunnels, GatewayCommon, agent_config, gateway_config


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'views.db'}")
    await migrate(engine)
    try:
        yield Store(engine, AddressPlan("100.64.0.0/16", 24, 100))
    finally:
        await engine.dispose()


async def _fleet(store: Store) -> tuple[list[Row], list[Row], list[Row], list[Row]]:
    """Three gateways, four agents (all with keys), tunnels (one with replicas), a
    certificate."""
    for i in range(3):
        row, _ = await store.create_client("gateway", f"g{i}")
        auth = p.Auth("", "gateway", f"{i:043d}=", "1", f"192.0.2.{i + 1}", 51820)
        await store.record_auth("gateway", row, auth)
    for i in range(4):
        row, _ = await store.create_client("agent", f"a{i}")
        await store.record_auth("agent", row, p.Auth("", "agent", f"{10 + i:043d}=", "1"))
    for i in range(4):
        await store.create_tunnel(
            {
                "protocol": "http",
                "domain": f"t{i}.example.com",
                "target": "127.0.0.1:80",
                "agent": f"a{i % 2}",
            }
        )
    await store.create_tunnel(
        {
            "protocol": "http",
            "domain": "replicated.example.com",
            "target": "127.0.0.1:80",
            "replicas": [{"agent": "a2"}, {"agent": "a3", "weight": 2}],
        }
    )
    await store.upsert_certificate(
        "t0.example.com", "CERT PEM", "KEY PEM", 2_000_000_000.0, "upload"
    )
    return (
        await store.all_clients("gateway"),
        await store.all_clients("agent"),
        await store.all_tunnels(),
        await store.all_certificates(),
    )


async def test_every_gateway_gets_what_its_own_build_gives(store: Store) -> None:
    gateways, agents, tunnels, certificates = await _fleet(store)
    policies = (p.AccessPolicy("x", 1, ip_deny=("0.0.0.0/0",)),)
    keys = (p.SessionKey("k1", b"\x01" * 32),)
    common = GatewayCommon(tunnels, certificates, policies, keys)
    built = [common.gateway_wire(store, g, agents) for g in gateways]
    for gateway, wire in zip(gateways, built, strict=True):
        alone = gateway_config(
            store, gateway, agents, tunnels, certificates, policies, keys
        ).to_wire()
        assert json.dumps(wire) == json.dumps(alone)  # the same frame, byte for byte
    # the common lists are one object for all (built once), the own parts are not
    assert built[1]["tunnels"] is built[2]["tunnels"] is built[0]["tunnels"]
    assert built[1]["certificates"] is built[2]["certificates"]
    assert built[1]["gateway"] != built[2]["gateway"]
    assert built[1]["agents"] != built[2]["agents"]  # each its own address per agent
    assert len(built[0]["tunnels"]) == 5 and len(built[0]["certificates"]) == 1
    assert common.same(tunnels, certificates, policies, keys)
    assert not common.same(list(tunnels), certificates, policies, keys)  # a new snapshot


async def test_agents_get_their_tunnels_from_one_index(store: Store) -> None:
    gateways, agents, tunnels, _ = await _fleet(store)
    served = AgentTunnels(tunnels)
    for agent in agents:
        mine = [
            t
            for t in tunnels
            if agent["id"] in ([r["agent_id"] for r in t["replicas"]] or [t["agent_id"]])
        ]
        assert [t["id"] for t in served.of(agent["id"])] == [t["id"] for t in mine]
        assert (
            agent_config(store, agent, gateways, served.of(agent["id"])).to_wire()
            == agent_config(store, agent, gateways, tunnels).to_wire()
        )
    by_name = {a["name"]: a["id"] for a in agents}
    assert len(served.of(by_name["a0"])) == 2 and len(served.of(by_name["a3"])) == 1
    assert served.of("nobody") == []
