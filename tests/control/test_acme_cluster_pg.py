"""Shared ACME with two Control replicas on one PostgreSQL database (issue 19's "ACME
coordination under a lease in the database", issue 17's "gateways share ACME through
Control"): one fake gateway on each replica; a domain is ordered once, the token of
the order is served by both gateways before the orderer may validate, and the domain
goes to the other replica's gateway when the holder replica stops or dies.

Needs Debian's postgresql package (skips without it on a laptop; runs under CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from control.acme_cluster import claim_name
from control.db.leases import Leases
from tests.controlserver import Peer, RunningControl, connect_client, control_replicas, create
from tests.pgserver import PostgresServer, postgres

__all__ = ["postgres"]

DOMAIN = "app.example.com"
TOKEN = "tok-PG_1"


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if isinstance(result, Awaitable) else result:
                return
            await asyncio.sleep(0.05)


class FakeGateway:
    """A gateway that orders certificates as far as Control can tell: it says
    ``acme_ready``, records its orders, serves (and confirms) every HTTP-01 set."""

    def __init__(self, name: str, peer: Peer) -> None:
        self.name = name
        self.peer = peer
        self.orders: list[dict[str, Any]] = []
        self.served: dict[str, str] = {}
        self.published: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> FakeGateway:
        await self.peer.send("acme_ready", {"challenges": ["http-01"], "dnsZones": []})
        self.task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await self.peer.recv(3600)
                data = frame.get("data", {})
                if frame["type"] == "acme_order":
                    self.orders.append(data)
                elif frame["type"] == "acme_challenges":
                    self.served = {c["token"]: c["keyAuthorization"] for c in data["challenges"]}
                    await self.peer.send("acme_challenges_applied", {"serial": data["serial"]})
                elif frame["type"] == "acme_published":
                    self.published.append(data["token"])

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(Exception):
            await self.peer.close()


@pytest.fixture
async def pair(
    tmp_path: Path, postgres: PostgresServer
) -> AsyncIterator[tuple[RunningControl, RunningControl]]:
    async with control_replicas(tmp_path, postgres.database()) as replicas:
        for server in replicas:
            acme = server.app.state.hub.acme
            acme.tick_interval = 0.2  # passes often and claims short, so take-over is quick
            acme.claim_ttl = 1.5
            acme.wake()
        yield replicas


@pytest.fixture
async def gateways(
    pair: tuple[RunningControl, RunningControl],
) -> AsyncIterator[tuple[FakeGateway, FakeGateway]]:
    """gw-a connected to replica a, gw-b to b; a tunnel needing a certificate."""
    a, b = pair
    async with a.api() as api:
        gw_a = await create(api, "gateway", "gw-a")
        gw_b = await create(api, "gateway", "gw-b")
        await create(api, "agent", "app")
        created = await api.post(
            "/api/tunnels", json={"domain": DOMAIN, "target": "127.0.0.1:1", "agent": "app"}
        )
        assert created.status_code == 201, created.text
    first = await FakeGateway("gw-a", await connect_client(a, gw_a["apiKey"], "gateway", 1)).start()
    second = await FakeGateway(
        "gw-b", await connect_client(b, gw_b["apiKey"], "gateway", 2)
    ).start()
    try:
        yield first, second
    finally:
        for gateway in (first, second):
            await gateway.stop()


async def one_order(
    pair: tuple[RunningControl, RunningControl], gateways: tuple[FakeGateway, FakeGateway]
) -> tuple[int, dict[str, Any]]:
    """Wait for the domain's order; (index of the replica and gateway holding it, order)."""
    await until(lambda: any(g.orders for g in gateways))
    await asyncio.sleep(1.0)  # five passes of each replica: still one order
    counts = [len(g.orders) for g in gateways]
    assert sorted(counts) == [0, 1], counts
    index = counts.index(1)
    return index, gateways[index].orders[0]


async def test_one_order_and_the_token_served_by_both_replicas_gateways(
    pair: tuple[RunningControl, RunningControl], gateways: tuple[FakeGateway, FakeGateway]
) -> None:
    index, order = await one_order(pair, gateways)
    holder, other = pair[index], pair[1 - index]
    orderer, bystander = gateways[index], gateways[1 - index]
    assert order["domain"] == DOMAIN
    # the claim in the database is the holder replica's
    leases = Leases(holder.app.state.hub.store.engine)
    state = await leases.get(claim_name(DOMAIN))
    assert state is not None and state.held
    assert state.holder == holder.app.state.hub.cluster.replica_id
    # the other replica shows the order as running at the holder's gateway
    async with other.api() as api:
        [status] = (await api.get("/api/acme")).json()["orders"]
    assert (status["state"], status["gateway"]) == ("ordering", orderer.name)

    key_authorization = TOKEN + ".thumbprint"
    await orderer.peer.send(
        "acme_challenge",
        {"lease": order["lease"], "token": TOKEN, "keyAuthorization": key_authorization},
    )
    # acme_published only once the gateway of the other replica serves the token too
    await until(lambda: orderer.published == [TOKEN])
    assert bystander.served == {TOKEN: key_authorization}
    assert orderer.served == {TOKEN: key_authorization}

    # the order fails: the token leaves both gateways, and the failing replica keeps
    # the claim through its back-off (the other replica orders nothing meanwhile)
    await orderer.peer.send("acme_failed", {"lease": order["lease"], "error": "nope"})
    await until(lambda: bystander.served == {} and orderer.served == {})
    await asyncio.sleep(0.6)
    assert len(orderer.orders) == 1 and bystander.orders == []


async def test_the_order_moves_when_the_holder_replica_stops(
    pair: tuple[RunningControl, RunningControl], gateways: tuple[FakeGateway, FakeGateway]
) -> None:
    index, order = await one_order(pair, gateways)
    orderer, bystander = gateways[index], gateways[1 - index]
    await orderer.peer.send(
        "acme_challenge",
        {"lease": order["lease"], "token": TOKEN, "keyAuthorization": TOKEN + ".x"},
    )
    await until(lambda: TOKEN in bystander.served)
    await pair[index].stop()  # a clean stop: its claim released, the others told
    await until(lambda: bool(bystander.orders), 5)
    assert [o["domain"] for o in bystander.orders] == [DOMAIN]
    assert TOKEN not in bystander.served  # the stopped replica's order ended


async def test_the_order_moves_when_the_holder_replica_dies(
    pair: tuple[RunningControl, RunningControl], gateways: tuple[FakeGateway, FakeGateway]
) -> None:
    """Like ``kill -9``: the holder's heartbeat, feed and coordination stop without a
    goodbye; after the replica timeout (2 s) and the claim's lapse (1.5 s) the other
    replica's coordinator takes the domain over with a new fence."""
    index, _ = await one_order(pair, gateways)
    holder, other = pair[index], pair[1 - index]
    bystander = gateways[1 - index]
    leases = Leases(other.app.state.hub.store.engine)
    before = await leases.get(claim_name(DOMAIN))
    assert before is not None
    hub = holder.app.state.hub
    for task in [*hub.cluster._tasks, hub.acme._task]:
        task.cancel()
    await until(lambda: bool(bystander.orders), 10)
    assert [o["domain"] for o in bystander.orders] == [DOMAIN]
    after = await leases.get(claim_name(DOMAIN))
    assert after is not None and after.holder == other.app.state.hub.cluster.replica_id
    assert after.fence == before.fence + 1
