"""Two Control replicas on one PostgreSQL database (issue 19, control/cluster): a change
made through either replica's REST API reaches the clients of both; presence is merged;
the once-only jobs' lease is held by one replica and moves when it leaves or dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from common import protocol
from common.config import ConfigError
from control.cluster.changes import (
    MAX_IDS,
    BadChange,
    Change,
    config_change,
    pack,
    parse_batch,
    tunnel_change,
)
from control.main import database_url
from tests.control.test_hub import closed_with
from tests.controlserver import RunningControl, connect_client, control_replicas, create
from tests.pgserver import PostgresServer, postgres

__all__ = ["postgres"]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


@pytest.fixture
async def pair(
    tmp_path: Path, postgres: PostgresServer
) -> AsyncIterator[tuple[RunningControl, RunningControl]]:
    async with control_replicas(tmp_path, postgres.database()) as replicas:
        yield replicas


async def jobs(server: RunningControl) -> bool:
    async with server.api(token=None) as client:
        body = (await client.get("/healthz")).json()
    assert body["replica"], body
    return bool(body["jobs"])


async def test_changes_and_presence_reach_every_replica(
    pair: tuple[RunningControl, RunningControl],
) -> None:
    a, b = pair
    async with a.api() as api_a, b.api() as api_b:
        agent = await create(api_a, "agent", "laptop")
        gateway = await create(api_b, "gateway", "edge")
        peer = await connect_client(a, agent["apiKey"], "agent", 1)
        gw = await connect_client(b, gateway["apiKey"], "gateway", 2)
        # the agent (on A) hears of the gateway that connected to B, and vice versa
        config = await peer.expect("config", 3)
        assert [g["name"] for g in config["data"]["gateways"]] == ["edge"]

        async def agent_online_at_b() -> bool:
            return bool((await api_b.get("/api/agents/laptop")).json()["online"])

        await until(agent_online_at_b, 3)

        # a tunnel created through B reaches the agent on A; one through A the gateway on B
        created = await api_b.post(
            "/api/tunnels",
            json={"domain": "x.example.com", "target": "127.0.0.1:1", "agent": "laptop"},
        )
        assert created.status_code == 201, created.text
        tunnel = created.json()
        assert (await gw.expect("tunnel_create", 1))["data"]["id"] == tunnel["id"]
        agent_frame = await peer.expect("config", 1)
        assert [t["id"] for t in agent_frame["data"]["tunnels"]] == [tunnel["id"]]
        changed = await api_a.patch(f"/api/tunnels/{tunnel['id']}", json={"target": "h:2"})
        assert changed.status_code == 200, changed.text
        assert (await gw.expect("tunnel_update", 1))["data"]["target"] == "h:2"
        assert (await api_a.delete(f"/api/tunnels/{tunnel['id']}")).status_code == 204
        assert (await gw.expect("tunnel_delete", 1))["data"]["id"] == tunnel["id"]

        # a key rotated through A closes the gateway's connection on B
        assert (await api_a.post("/api/gateways/edge/rotate-key")).status_code == 200
        await closed_with(gw, protocol.CLOSE_REVOKED, 3)

        # the agent leaves A: B sees it offline
        await peer.close()

        async def agent_offline_at_b() -> bool:
            return not (await api_b.get("/api/agents/laptop")).json()["online"]

        await until(agent_offline_at_b, 3)


async def test_agents_created_through_both_replicas_get_distinct_subnets(
    pair: tuple[RunningControl, RunningControl],
) -> None:
    """Each replica keeps the subnets in use in memory: one the other replica took
    meanwhile is a conflict on the unique column, read afresh and tried again, never a
    409 nor a duplicate; a name taken through the other replica is still refused."""
    a, b = pair
    async with a.api() as api_a, b.api() as api_b:
        # both replicas load their sets, then each takes subnets the other does not know of
        await create(api_a, "agent", "first-a")
        await create(api_b, "agent", "first-b")
        responses = await asyncio.gather(
            *(
                (api_a if i % 2 else api_b).post("/api/agents", json={"name": f"n{i}"})
                for i in range(24)
            )
        )
        refused = [(r.status_code, r.text) for r in responses if r.status_code != 201]
        assert not refused, refused
        listed = (await api_a.get("/api/agents", params={"limit": 100})).json()
        subnets = [agent["subnet"] for agent in listed["items"]]
        assert len(subnets) == 26 and len(set(subnets)) == 26, subnets
        # a subnet freed through A is A's lowest free one: its next agent takes it
        assert (await api_a.delete("/api/agents/n3")).status_code == 204
        freed = next(r.json()["subnet"] for r in responses if r.json()["name"] == "n3")
        assert (await create(api_a, "agent", "again"))["subnet"] == freed
        taken = await api_b.post("/api/agents", json={"name": "first-a"})
        assert taken.status_code == 409 and "already exists" in taken.text, taken.text


async def test_the_jobs_lease_is_held_once_and_moves(
    pair: tuple[RunningControl, RunningControl],
) -> None:
    a, b = pair

    async def exactly_one() -> bool:
        return [await jobs(a), await jobs(b)].count(True) == 1

    await until(exactly_one, 5)
    holder, other = (a, b) if await jobs(a) else (b, a)
    await holder.stop()  # leaving releases the lease: the other takes it at its next beat
    await until(lambda: jobs(other), 3)


async def test_a_dead_replicas_lease_lapses_and_moves(
    pair: tuple[RunningControl, RunningControl],
) -> None:
    """Like ``kill -9``: the holder stops beating without a goodbye; after the replica
    timeout (2 s here) the other replica takes the lease over with a new fence."""
    a, b = pair

    async def exactly_one() -> bool:
        return [await jobs(a), await jobs(b)].count(True) == 1

    await until(exactly_one, 5)
    holder, other = (a, b) if await jobs(a) else (b, a)
    cluster = holder.app.state.hub.cluster
    fence = cluster.jobs_fence
    for task in cluster._tasks:  # its heartbeat and feed stop, nothing released
        task.cancel()
    await until(lambda: jobs(other), 6)
    assert other.app.state.hub.cluster.jobs_fence > fence


def test_changes_pack_into_notify_payloads_and_parse_strictly() -> None:
    changes = [tunnel_change("tunnel_update", f"t{i}", "a", ["a", "b"]) for i in range(300)]
    changes.append(config_change("gateway", [f"g{i}" for i in range(MAX_IDS + 1)]))
    batches = pack("replica-1", 7, changes)
    assert len(batches) > 1 and [b.seq for b in batches] == list(range(7, 7 + len(batches)))
    assert all(len(b.encode()) < 8000 for b in batches)
    parsed = [c for b in batches for c in parse_batch(b.encode()).changes]
    assert parsed == changes and parsed[-1].ids is None  # too many ids: everybody
    for bad in (
        "",
        "[]",
        '{"o":"r","s":1,"c":[]}',
        '{"o":"r","s":0,"c":[{"w":"resync"}]}',
        '{"o":"r","s":1,"c":[{"w":"drop tables"}]}',
        '{"o":"r","s":1,"c":[{"w":"config"}]}',
        '{"o":"r","s":1,"c":[{"w":"disconnect","k":"agent","i":["x"],"c":99}]}',
        '{"o":"r","s":true,"c":[{"w":"resync"}]}',
    ):
        with pytest.raises(BadChange):
            parse_batch(bad)
    assert parse_batch('{"o":"r","s":1,"c":[{"w":"resync"}]}').changes == (Change("resync"),)


def test_database_urls() -> None:
    assert database_url("postgres://u:p@db/k") == "postgresql+asyncpg://u:p@db/k"
    assert database_url("postgresql://db/k") == "postgresql+asyncpg://db/k"
    assert database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    for bad in ("mysql://db/k", "db.example.com", "postgresql://"):
        with pytest.raises(ConfigError, match="--database-url") as info:
            database_url(bad)
        assert "p@" not in str(info.value)


async def test_a_replica_leaving_with_clients_connected_leaves_cleanly(
    pair: tuple[RunningControl, RunningControl], caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping a replica closes its clients (each a presence change to publish) and
    then leaves the cluster: a notification in flight is let finish, not cancelled
    half-way (which broke the feed connection, so the replica left "uncleanly" without
    telling the others, and could send the same batch twice: the other replica then
    saw a batch "lost" and re-synced every client for nothing)."""
    a, b = pair
    async with a.api() as api_a:
        agents = [await create(api_a, "agent", f"a{i}") for i in range(12)]
        gateways = [await create(api_a, "gateway", f"g{i}") for i in range(12)]
    peers = [
        await connect_client(b, g["apiKey"], "gateway", 100 + i) for i, g in enumerate(gateways)
    ]
    peers += [await connect_client(a, x["apiKey"], "agent", i) for i, x in enumerate(agents)]
    with caplog.at_level("WARNING", logger="control.cluster"):
        await a.stop()
        await asyncio.sleep(0.5)  # b reads what a sent last
    troubles = [
        (r.getMessage(), getattr(r, "fields", None))
        for r in caplog.records
        if r.name == "control.cluster"
    ]
    assert not troubles, troubles
    for peer in peers:
        await peer.close()
