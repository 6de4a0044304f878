"""Shared ACME across Control replicas (control/acme_cluster.py) without a network:
two AcmeCoordinators, each with its own gateways, share one lease store (a SQLite
file, control/db/leases.py) and talk over an in-memory change feed that carries the
same payloads PostgreSQL's NOTIFY would (encoded, packed and parsed strictly).  The
same with real replicas on PostgreSQL: tests/control/test_acme_cluster_pg.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from common import protocol as p
from control.acme import AcmeCoordinator
from control.acme_cluster import ALONE, claim_name
from control.cluster.changes import (
    MAX_NOTE_TOKENS,
    AcmeListener,
    AcmeNote,
    BadChange,
    Change,
    pack,
    parse_batch,
    parse_change,
)
from control.db.engine import create_engine, migrate
from control.db.leases import MAX_NAME as MAX_LEASE_NAME
from control.db.leases import Leases

DOMAIN = "app.example.com"
TOKEN = "tok-A_1"
KEY_AUTH = TOKEN + ".thumb"


class Feed:
    """One replica's end of an in-memory change feed shared by several replicas."""

    def __init__(self, bus: Bus, replica_id: str) -> None:
        self.bus = bus
        self.replica_id = replica_id
        self.listener: AcmeListener | None = None
        self.seq = 0

    def publish(self, change: Change) -> None:
        # as PostgresCluster sends it: packed into a NOTIFY payload, parsed at the other end
        [batch] = pack(self.replica_id, self.seq + 1, [change])
        self.seq = batch.seq
        self.bus.sent.append((self.replica_id, batch.encode()))
        if self.bus.connected:
            asyncio.get_running_loop().call_soon(self.bus.deliver, self.replica_id, batch.encode())

    def attach_acme(self, listener: AcmeListener) -> None:
        self.listener = listener


class Bus:
    """Every replica's feed; ``connected`` False drops what is sent (a lost feed)."""

    def __init__(self) -> None:
        self.feeds: list[Feed] = []
        self.sent: list[tuple[str, str]] = []
        self.connected = True

    def feed(self, replica_id: str) -> Feed:
        feed = Feed(self, replica_id)
        self.feeds.append(feed)
        return feed

    def deliver(self, origin: str, payload: str) -> None:
        batch = parse_batch(payload)
        for feed in self.feeds:
            if feed.replica_id != origin and feed.listener is not None:
                for change in batch.changes:
                    assert change.acme is not None
                    feed.listener.acme_note(origin, change.acme)

    def alive(self, *replica_ids: str) -> None:
        """A heartbeat: these replicas live (as PostgresCluster tells after each beat)."""
        for feed in self.feeds:
            if feed.replica_id in replica_ids and feed.listener is not None:
                feed.listener.replicas_alive(set(replica_ids))


class Replica:
    """One Control replica's coordinator and the gateways connected to it."""

    def __init__(
        self, bus: Bus, leases: Leases, replica_id: str, gateways: dict[str, str], **kw: Any
    ) -> None:
        self.id = replica_id
        self.gateways = gateways
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.tunnels = [{"domain": DOMAIN, "protocol": "http", "enabled": True}]
        self.certificates: list[dict[str, Any]] = []
        self.acme = AcmeCoordinator(
            self.send,
            lambda: dict(self.gateways),
            self.rows,
            claims=leases,
            feed=bus.feed(replica_id),
            **kw,
        )
        for gateway_id, name in gateways.items():
            self.acme.ready(gateway_id, name, p.AcmeReady(("http-01",)))

    def send(self, gateway_id: str, type_: str, data: dict[str, Any]) -> bool:
        if gateway_id not in self.gateways:
            return False
        self.sent.append((gateway_id, type_, data))
        return True

    async def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return self.tunnels, self.certificates

    def orders(self) -> list[tuple[str, str]]:
        return [(g, d["domain"]) for g, t, d in self.sent if t == "acme_order"]

    def served(self, gateway_id: str) -> dict[str, str]:
        """The last HTTP-01 set sent to ``gateway_id``."""
        sets = [d for g, t, d in self.sent if g == gateway_id and t == "acme_challenges"]
        return {c["token"]: c["keyAuthorization"] for c in sets[-1]["challenges"]}

    def serial(self, gateway_id: str) -> int:
        sets = [d for g, t, d in self.sent if g == gateway_id and t == "acme_challenges"]
        return int(sets[-1]["serial"])

    async def apply(self, gateway_id: str) -> None:
        """``gateway_id`` confirms the last set it was sent."""
        frame = p.Frame("acme_challenges_applied", {"serial": self.serial(gateway_id)})
        await self.acme.handle(gateway_id, self.gateways[gateway_id], frame)

    def published(self) -> list[str]:
        return [d["token"] for _, t, d in self.sent if t == "acme_published"]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'leases.db'}")
    await migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def bus() -> Bus:
    return Bus()


@pytest.fixture
def pair(engine: AsyncEngine, bus: Bus) -> Callable[..., tuple[Replica, Replica]]:
    def make(**kw: Any) -> tuple[Replica, Replica]:
        leases = Leases(engine)
        a = Replica(bus, leases, "replica-a", {"g1": "gw-a"}, **kw)
        b = Replica(bus, leases, "replica-b", {"g2": "gw-b"}, **kw)
        bus.alive("replica-a", "replica-b")
        return a, b

    return make


async def settle() -> None:
    """Let the feed's deliveries (scheduled with call_soon) run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_order_per_domain_across_replicas(
    pair: Callable[..., tuple[Replica, Replica]], engine: AsyncEngine
) -> None:
    a, b = pair()
    await asyncio.gather(a.acme.tick(), b.acme.tick())  # both want the domain at once
    await settle()
    orders = a.orders() + b.orders()
    assert len(orders) == 1, orders
    holder, other = (a, b) if a.orders() else (b, a)
    state = await Leases(engine).get(claim_name(DOMAIN))
    assert state is not None and state.holder == holder.id and state.held
    # the other replica knows it is ordered elsewhere, and never orders it meanwhile
    for _ in range(3):
        await other.acme.tick()
    assert other.orders() == []
    [status] = other.acme.status(other.tunnels, other.certificates)
    assert (status["state"], status["gateway"]) == (
        "ordering",
        holder.acme.leases[DOMAIN].gateway_name,
    )


async def test_a_token_is_served_by_every_replicas_gateways_before_validation(
    pair: Callable[..., tuple[Replica, Replica]],
) -> None:
    a, b = pair()
    await a.acme.tick()  # a first: it orders
    await settle()
    await b.acme.tick()
    assert a.orders() == [("g1", DOMAIN)] and b.orders() == []
    lease = a.acme.leases[DOMAIN]
    challenge = p.AcmeChallenge(lease.id, TOKEN, KEY_AUTH).to_wire()
    await a.acme.handle("g1", "gw-a", p.Frame("acme_challenge", challenge))
    await settle()
    # gw-b, connected to the other replica, serves the token too
    assert a.served("g1") == {TOKEN: KEY_AUTH}
    assert b.served("g2") == {TOKEN: KEY_AUTH}
    await a.apply("g1")
    await settle()
    assert a.published() == []  # the other replica's gateway has not confirmed yet
    await b.apply("g2")  # it has: replica b acknowledges over the feed
    await settle()
    assert a.published() == [TOKEN]
    # the certificate arrives: the token leaves every replica's gateways
    a.acme.obtained("g1", DOMAIN, lease.id)
    await settle()
    assert a.served("g1") == {} and b.served("g2") == {}
    # a gateway connecting to b later is sent what is pending then: nothing
    assert b.acme.pending() == {}


async def test_validation_does_not_wait_for_a_dead_replica(
    pair: Callable[..., tuple[Replica, Replica]], bus: Bus
) -> None:
    a, b = pair()
    await a.acme.tick()
    await settle()
    lease = a.acme.leases[DOMAIN]
    bus.connected = False  # b hears nothing any more
    challenge = p.AcmeChallenge(lease.id, TOKEN, KEY_AUTH).to_wire()
    await a.acme.handle("g1", "gw-a", p.Frame("acme_challenge", challenge))
    await a.apply("g1")
    await settle()
    assert a.published() == [] and b.acme.pending() == {}  # b cannot acknowledge
    bus.alive("replica-a")  # b missed its heartbeats: dead
    assert a.published() == [TOKEN]


async def test_holder_replica_stopping_hands_the_domain_over_at_once(
    pair: Callable[..., tuple[Replica, Replica]],
) -> None:
    a, b = pair()
    await a.acme.tick()
    await settle()
    assert a.orders() == [("g1", DOMAIN)]
    await b.acme.tick()
    assert b.orders() == []
    a.acme.start()
    await a.acme.stop()  # a clean stop: claims released, the others told (reset)
    await settle()
    assert b.acme.replicas.leases == {}
    await b.acme.tick()
    assert b.orders() == [("g2", DOMAIN)]


async def test_dead_holder_replicas_claim_lapses_then_another_takes_over(
    pair: Callable[..., tuple[Replica, Replica]], engine: AsyncEngine, bus: Bus
) -> None:
    a, b = pair(claim_ttl=0.6)
    await a.acme.tick()
    await settle()
    fence = (await Leases(engine).get(claim_name(DOMAIN))).fence  # type: ignore[union-attr]
    lease = a.acme.leases[DOMAIN]
    challenge = p.AcmeChallenge(lease.id, TOKEN, KEY_AUTH).to_wire()
    await a.acme.handle("g1", "gw-a", p.Frame("acme_challenge", challenge))
    await settle()
    assert b.served("g2") == {TOKEN: KEY_AUTH}
    # a dies (kill -9): no more ticks, no goodbye; b's heartbeat finds it gone
    bus.alive("replica-b")
    assert b.served("g2") == {}  # a's token went with it
    await b.acme.tick()
    assert b.orders() == []  # a's claim has not lapsed yet
    await asyncio.sleep(0.7)
    await b.acme.tick()
    assert b.orders() == [("g2", DOMAIN)]
    state = await Leases(engine).get(claim_name(DOMAIN))
    assert state is not None and state.holder == "replica-b" and state.fence == fence + 1


async def test_claims_are_renewed_while_the_order_lives(
    pair: Callable[..., tuple[Replica, Replica]],
) -> None:
    a, b = pair(claim_ttl=0.6)
    await a.acme.tick()
    await settle()
    for _ in range(6):  # 1.2 s: twice the claim's time, renewed by a's passes
        await asyncio.sleep(0.2)
        await a.acme.tick()
        await b.acme.tick()
    assert b.orders() == []
    assert a.acme.claims.holds(DOMAIN)


async def test_gateway_leaving_moves_the_order_to_another_replica(
    pair: Callable[..., tuple[Replica, Replica]],
) -> None:
    a, b = pair()
    await a.acme.tick()
    await settle()
    assert a.orders() == [("g1", DOMAIN)]
    del a.gateways["g1"]
    a.acme.gateway_gone("g1")  # a's only gateway: nobody left there to order
    await a.acme.tick()  # the claim is released
    await settle()
    assert b.acme.replicas.ordering(DOMAIN, b.acme.clock()) is None
    await b.acme.tick()
    assert b.orders() == [("g2", DOMAIN)]


async def test_a_failures_back_off_holds_across_replicas(
    pair: Callable[..., tuple[Replica, Replica]],
) -> None:
    a, b = pair()
    await a.acme.tick()
    await settle()
    lease = a.acme.leases[DOMAIN]
    failed = p.Frame("acme_failed", {"lease": lease.id, "error": "rate limited"})
    await a.acme.handle("g1", "gw-a", failed)
    await a.acme.tick()  # backing off: a keeps the claim
    await settle()
    await b.acme.tick()
    assert b.orders() == []
    assert a.acme.claims.holds(DOMAIN)
    # GET /api/acme on b shows the failure at a, with a's error and back-off
    [status] = b.acme.status(b.tunnels, b.certificates)
    assert (status["state"], status["lastError"]) == ("failing", "rate limited")
    assert status["nextTryAt"] == a.acme.failures[DOMAIN].next_try
    # once a's back-off is over and it no longer wants the domain, the claim goes
    a.tunnels.clear()
    await a.acme.tick()
    await settle()
    assert not a.acme.claims.holds(DOMAIN)
    assert b.acme.replicas.failure(DOMAIN) is None
    await b.acme.tick()
    assert b.orders() == [("g2", DOMAIN)]
    [status] = b.acme.status(b.tunnels, b.certificates)
    assert (status["state"], status["lastError"]) == ("ordering", None)


async def test_notes_lost_on_the_feed_are_asked_for_again(
    pair: Callable[..., tuple[Replica, Replica]], bus: Bus
) -> None:
    a, b = pair()
    bus.connected = False
    await a.acme.tick()
    lease = a.acme.leases[DOMAIN]
    challenge = p.AcmeChallenge(lease.id, TOKEN, KEY_AUTH).to_wire()
    await a.acme.handle("g1", "gw-a", p.Frame("acme_challenge", challenge))
    assert b.acme.pending() == {}  # lost
    bus.connected = True
    b.acme.acme_resync()  # b's feed came back (or saw a gap): it asks
    await settle()
    assert b.served("g2") == {TOKEN: KEY_AUTH}
    assert b.acme.replicas.ordering(DOMAIN, b.acme.clock()) is not None
    # asked twice, the answer is the same (a reset, then every lease whole)
    b.acme.acme_resync()
    await settle()
    assert b.acme.pending() == {TOKEN: KEY_AUTH}


async def test_controls_own_tokens_reach_every_replica(
    pair: Callable[..., tuple[Replica, Replica]],
) -> None:
    a, b = pair()
    published = asyncio.ensure_future(a.acme.publish_local("own", "own.thumb"))
    await settle()
    assert b.served("g2") == {"own": "own.thumb"}
    await a.apply("g1")
    await b.apply("g2")
    await settle()
    await asyncio.wait_for(published, 1)
    await a.acme.withdraw_local("own")
    await settle()
    assert b.served("g2") == {}


async def test_alone_on_sqlite_claims_survive_a_restart(engine: AsyncEngine) -> None:
    """One Control (no feed): claims are taken under a fixed holder name, so a Control
    restarted while its claim is still live orders again at once."""
    sent: list[tuple[str, str]] = []

    def coordinator() -> AcmeCoordinator:
        def send(gateway_id: str, type_: str, data: dict[str, Any]) -> bool:
            sent.append((gateway_id, type_))
            return True

        async def rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return [{"domain": DOMAIN, "protocol": "http", "enabled": True}], []

        acme = AcmeCoordinator(send, lambda: {"g1": "gw-a"}, rows, claims=Leases(engine))
        acme.ready("g1", "gw-a", p.AcmeReady(("http-01",)))
        return acme

    await coordinator().tick()  # ordered, then "killed"
    await coordinator().tick()
    assert [t for _, t in sent].count("acme_order") == 2
    state = await Leases(engine).get(claim_name(DOMAIN))
    assert state is not None and state.holder == ALONE and state.fence == 1


async def test_a_gateway_on_another_replica_can_prove_a_wildcard(
    pair: Callable[..., tuple[Replica, Replica]], bus: Bus
) -> None:
    """The REST check for a wildcard tunnel (``can_prove``) counts a DNS-01 gateway
    connected to any live replica; that replica's own pass orders the certificate."""
    a, b = pair()
    wildcard = "*.apps.example.com"
    dns = p.AcmeReady(("dns-01", "http-01"), ("example.com",))
    assert not a.acme.can_prove(wildcard)
    b.gateways["g3"] = "gw-dns"
    b.acme.ready("g3", "gw-dns", dns)
    await settle()
    assert a.acme.can_prove(wildcard)
    assert not a.acme.can_prove("*.apps.example.org")  # not under its zone
    assert a.acme.eligible(wildcard) == []  # a never grants it to a gateway of b's
    a.tunnels.append({"domain": wildcard, "protocol": "http", "enabled": True})
    b.tunnels.append({"domain": wildcard, "protocol": "http", "enabled": True})
    states = {s["domain"]: s["state"] for s in a.acme.status(a.tunnels, a.certificates)}
    assert states[wildcard] == "waiting"  # not "no_gateway": one can, elsewhere
    await b.acme.tick()
    assert ("g3", wildcard) in b.orders()
    await a.acme.tick()
    assert all(domain != wildcard for _, domain in a.orders())
    # the gateway leaves: it no longer counts
    del b.gateways["g3"]
    b.acme.gateway_gone("g3")
    await settle()
    assert not a.acme.can_prove(wildcard)
    # a note lost on the feed comes back when a asks; a dead replica's gateways go
    bus.connected = False
    b.gateways["g3"] = "gw-dns"
    b.acme.ready("g3", "gw-dns", dns)
    bus.connected = True
    assert not a.acme.can_prove(wildcard)
    a.acme.acme_resync()
    await settle()
    assert a.acme.can_prove(wildcard)
    bus.alive("replica-a")  # b stopped beating
    assert not a.acme.can_prove(wildcard)


def test_acme_notes_travel_in_changes_and_parse_strictly() -> None:
    note = AcmeNote(
        "set", 7, "lease1", DOMAIN, "gw-a", 123.5, tokens=((TOKEN, KEY_AUTH),) * MAX_NOTE_TOKENS
    )
    [batch] = pack("r1", 1, [Change("acme", acme=note)])
    assert len(batch.encode()) < 7900
    assert parse_batch(batch.encode()).changes[0].acme == note
    assert parse_change(Change("acme", acme=AcmeNote("ack", 3, to="r2")).to_wire()).acme == (
        AcmeNote("ack", 3, to="r2")
    )
    ready = AcmeNote("ready", gateway="g1", challenges=("dns-01",), zones=("example.com",))
    assert parse_change(Change("acme", acme=ready).to_wire()).acme == ready
    failing = AcmeNote("failing", domain=DOMAIN, expires=1.5e9, error="ü" * 300)
    assert parse_change(Change("acme", acme=failing).to_wire()).acme == failing
    gone = AcmeNote("ready", gateway="g1")
    assert parse_change(Change("acme", acme=gone).to_wire()).acme == gone
    many = AcmeNote("ready", gateway="g", challenges=("dns-01",), zones=("a" * 63 + ".com",) * 16)
    [batch] = pack("r1", 1, [Change("acme", acme=many)])
    assert len(batch.encode()) < 7900
    bad: list[dict[str, Any]] = [
        {"w": "acme", "x": {"op": "failing", "er": "boom"}},  # which domain?
        {"w": "acme", "x": {"op": "failing", "d": DOMAIN, "er": "x" * 301}},
        {"w": "acme", "x": {"op": "failing", "d": DOMAIN, "er": 5}},
        {"w": "acme", "x": {"op": "ready", "c": ["dns-01"]}},  # whose gateway?
        {"w": "acme", "x": {"op": "ready", "g": "g1", "c": ["tls-alpn-01"]}},
        {"w": "acme", "x": {"op": "ready", "g": "g1", "c": "dns-01"}},
        {"w": "acme", "x": {"op": "ready", "g": "g1", "c": ["dns-01"], "z": ["has space.com"]}},
        {"w": "acme", "x": {"op": "ready", "g": "g1", "c": ["dns-01"], "z": ["a.com"] * 17}},
        {"w": "acme", "x": {"op": "ready", "g": "g1", "z": {"a.com": 1}}},
        {"w": "acme"},  # no note
        {"w": "acme", "x": {"op": "nope"}},
        {"w": "acme", "x": {"op": "set", "n": 1}},  # no lease
        {"w": "acme", "x": {"op": "ack", "n": 1}},  # acknowledging whom?
        {"w": "acme", "x": {"op": "reset", "n": -1}},
        {"w": "acme", "x": {"op": "set", "n": 1, "l": "x", "tk": [["a", "b.c"]]}},  # not a's
        {"w": "acme", "x": {"op": "set", "n": 1, "l": "x", "tk": [["a/", "a/.c"]]}},
        {"w": "acme", "x": {"op": "set", "n": 1, "l": "x", "tk": [["a"]]}},
        {"w": "acme", "x": {"op": "set", "n": 1, "l": "x", "tk": [["a", "a.b"]] * 9}},
        {"w": "acme", "x": {"op": "set", "n": 1, "l": "x", "e": "soon"}},
        {"w": "acme", "x": {"op": "set", "n": True, "l": "x"}},
        {"w": "acme", "x": "set"},
    ]
    for data in bad:
        with pytest.raises(BadChange):
            parse_change(data)


def test_claim_names_fit_the_lease_column() -> None:
    assert claim_name(DOMAIN) == "acme:" + DOMAIN
    long = ".".join(["a" * 60] * 4)  # 243 characters: a valid name, too long for a lease
    assert len(claim_name(long)) <= MAX_LEASE_NAME
    assert claim_name(long) != claim_name(long[:-1] + "b")
