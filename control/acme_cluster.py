"""Shared ACME across Control replicas: the claim on a domain, the others' responses.

``control/acme.py``'s coordinator decides, within one replica, which of its gateways
orders which certificate and what every gateway serves.  With several replicas on
one database two things must hold across them, and this module holds what they need:

*One order per domain* (:class:`Claims`).  A replica grants a domain to one of its
gateways only while it holds the database lease ``acme:<domain>``
(``control/db/leases.py``; a name too long for the column is hashed), renewed while
the order lives (and through a failed order's back-off, so that the back-off holds
for every replica) and released when it ends, so that another replica may take the
domain over at once; after a certificate arrived it is left to lapse instead
(:meth:`Claims.forget`).  A replica that dies stops renewing: its claim lapses after
``claim_ttl`` seconds and another replica's next pass takes it.  Times are the
database's, so replicas with skewed clocks agree.

*Every gateway serves every response* (:class:`Replicas`).  Pending HTTP-01
responses travel over the cluster's change feed in notes
(:class:`~control.cluster.changes.AcmeNote`) rather than through a table: a response
lives for the seconds of one validation, belongs to a replica's live order and dies
with it, and the feed already carries, in commit order, everything replicas tell
each other.  What makes the feed enough:

* a note says the whole state of one lease (``set``: its domain, gateway and every
  response it needs), never a delta, so a repeated or re-sent note changes nothing;
* notes may be lost (a feed re-opened, a gap in batch numbers): the replica that may
  have missed some asks (``sync``), and every replica answers with ``reset`` and a
  ``set`` per live lease; a replica starting asks the same way;
* the leases of a replica that stops answering its heartbeat are forgotten with it
  (its claims lapse, its orders are taken over), and one that stops cleanly says
  ``reset`` with nothing after it;
* a ``set`` carrying responses is acknowledged (``ack``, cumulative per announcing
  replica) once every gateway of the receiving replica serves them, so the orderer
  tells the CA to validate only when gateways on every live replica answer (or
  ``publish_wait`` passed, as within one replica).

*Who can prove what, anywhere* (``Replicas.ready``).  Each gateway's ``acme_ready`` is
told to the others in a ``ready`` note (one with no challenges when it leaves), kept
per origin, forgotten with the origin's ``reset`` or death and re-sent on ``sync``
like the leases: a wildcard tunnel created through one replica is allowed when a
gateway on any live replica can prove it with DNS-01 (that replica's own pass then
claims and orders it; a replica never grants to another's gateway).  A failed order's
error and back-off travel the same way (``failing``), so ``GET /api/acme`` on any
replica shows a domain failing wherever it failed.

A table with NOTIFY would survive what the feed recovers by re-announcing, at the
price of a migration, writes per validation and clean-up of rows left by dead
replicas; the feed recovers it for free from the replicas that hold the orders.
A replica that joins is waited for from the orderer's next heartbeat on (it asked for
everything when it started, so only a response published in between may reach its
gateways after ``acme_published``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from common import protocol as p
from common.logs import kv
from control.cluster.changes import (
    MAX_NOTE_ERROR,
    MAX_NOTE_TOKENS,
    MAX_NOTE_ZONES,
    AcmeListener,
    AcmeNote,
    Change,
)
from control.db.leases import MAX_NAME

log = logging.getLogger("control.acme")

#: the lease holder's id when Control runs alone (stable across restarts, so a Control
#: restarted on the same database renews its own claims instead of waiting for them)
ALONE = "control"
CLAIM_PREFIX = "acme:"


def claim_name(domain: str) -> str:
    """The database lease of ``domain``'s order: ``acme:<domain>``, hashed if too long."""
    name = CLAIM_PREFIX + domain
    if len(name) <= MAX_NAME:
        return name
    return CLAIM_PREFIX + "#" + hashlib.sha256(domain.encode()).hexdigest()


class LeaseStore(Protocol):
    """Database leases as :class:`Claims` use them (``control.db.leases.Leases``)."""

    async def acquire(self, name: str, holder: str, ttl: float) -> int | None: ...

    async def release(self, name: str, holder: str) -> bool: ...


@runtime_checkable
class ReplicaFeed(Protocol):
    """The change feed between replicas (``control.cluster.postgres.PostgresCluster``)."""

    replica_id: str

    def publish(self, change: Change) -> None: ...

    def attach_acme(self, listener: AcmeListener) -> None: ...


@dataclass
class _Claim:
    fence: int
    renewed: float


class Claims:
    """The ``acme:<domain>`` leases this replica holds (None store: Control alone
    without a database to share, every claim granted)."""

    def __init__(self, store: LeaseStore | None, holder: str, ttl: float) -> None:
        self.store = store
        self.holder = holder
        self.ttl = ttl
        self.held: dict[str, _Claim] = {}

    def holds(self, domain: str) -> bool:
        return domain in self.held

    async def take(self, domain: str, now: float) -> bool:
        """Hold ``domain`` now (already held, or taken); False if another replica does."""
        if domain in self.held:
            return True
        fence = 0
        if self.store is not None:
            taken = await self.store.acquire(claim_name(domain), self.holder, self.ttl)
            if taken is None:
                return False
            fence = taken
        self.held[domain] = _Claim(fence, now)
        return True

    async def renew(self, domain: str, now: float) -> bool:
        """Keep ``domain`` (renewed once a third of its time is gone); False: lost."""
        claim = self.held.get(domain)
        if claim is None:
            return False
        if self.store is None or now - claim.renewed < self.ttl / 3:
            return True
        fence = await self.store.acquire(claim_name(domain), self.holder, self.ttl)
        if fence is None:  # lapsed while we paused, and another replica took it
            del self.held[domain]
            return False
        claim.fence, claim.renewed = fence, now
        return True

    async def release(self, domain: str) -> None:
        """Give ``domain`` up at once (another replica may order it now)."""
        if self.held.pop(domain, None) is not None and self.store is not None:
            await self.store.release(claim_name(domain), self.holder)

    def forget(self, domain: str) -> None:
        """Stop renewing ``domain`` without releasing it: it lapses in ``ttl`` seconds
        (after a certificate arrived, so that a replica that has not yet heard of it
        cannot start a second order in between)."""
        self.held.pop(domain, None)

    async def release_all(self) -> None:
        for domain in list(self.held):
            await self.release(domain)


@dataclass
class RemoteLease:
    """A lease of another replica, as its last ``set`` note told."""

    origin: str
    id: str
    domain: str | None
    gateway: str | None
    expires: float | None
    tokens: dict[str, str] = field(default_factory=dict)


class Replicas:
    """The other replicas as one coordinator knows them: their live leases and
    HTTP-01 responses, and how far each has acknowledged this replica's own."""

    def __init__(self, feed: ReplicaFeed | None) -> None:
        self.feed = feed
        self.replica_id = feed.replica_id if feed is not None else ""
        #: other replicas alive at the last heartbeat
        self.alive: set[str] = set()
        self.leases: dict[str, dict[str, RemoteLease]] = {}  # origin → lease id → lease
        #: origin → gateway id → what that gateway of theirs can prove (``ready``)
        self.ready: dict[str, dict[str, p.AcmeReady]] = {}
        #: origin → domain → (error, next try) of their failed orders backing off
        self.failing: dict[str, dict[str, tuple[str, float]]] = {}
        #: replica → the highest of our announcement numbers its gateways serve
        self.acked: dict[str, int] = {}
        self.number = 0  # our last announcement's number

    # -- what the others hold -----------------------------------------------------------

    def tokens(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for leases in self.leases.values():
            for lease in leases.values():
                found.update(lease.tokens)
        return found

    def ordering(self, domain: str, now: float) -> RemoteLease | None:
        """Another replica's live order of ``domain`` (a hint: the claim decides)."""
        for leases in self.leases.values():
            for lease in leases.values():
                if lease.domain == domain and (lease.expires is None or lease.expires > now):
                    return lease
        return None

    def remote_ready(self) -> list[p.AcmeReady]:
        """What the other replicas' gateways can prove (one entry per gateway)."""
        return [ready for gateways in self.ready.values() for ready in gateways.values()]

    def failure(self, domain: str) -> tuple[str, float] | None:
        """Another replica's failed order of ``domain`` backing off: (error, next try)."""
        for failures in self.failing.values():
            if domain in failures:
                return failures[domain]
        return None

    def waiting(self, number: int) -> set[str]:
        """Live replicas whose gateways do not yet serve our announcement ``number``."""
        return {r for r in self.alive if self.acked.get(r, 0) < number}

    # -- what they tell us --------------------------------------------------------------

    def apply(self, origin: str, note: AcmeNote) -> bool:
        """Take ``origin``'s ``set``, ``end`` or ``reset`` in; True if the responses
        every gateway must serve changed."""
        before = self.tokens()
        if note.op == "reset":
            self.leases.pop(origin, None)
            self.ready.pop(origin, None)
            self.failing.pop(origin, None)
        elif note.op == "failing" and note.domain is not None:
            if note.error is not None:
                next_try = note.expires if note.expires is not None else 0.0
                self.failing.setdefault(origin, {})[note.domain] = (note.error, next_try)
            else:
                self.failing.get(origin, {}).pop(note.domain, None)
        elif note.op == "ready" and note.gateway is not None:
            if note.challenges:
                self.ready.setdefault(origin, {})[note.gateway] = p.AcmeReady(
                    note.challenges, note.zones
                )
            else:
                self.ready.get(origin, {}).pop(note.gateway, None)
        elif note.op == "end" and note.lease is not None:
            self.leases.get(origin, {}).pop(note.lease, None)
        elif note.op == "set" and note.lease is not None:
            self.leases.setdefault(origin, {})[note.lease] = RemoteLease(
                origin, note.lease, note.domain, note.gateway, note.expires, dict(note.tokens)
            )
        elif note.op == "ack" and note.to == self.replica_id:
            self.acked[origin] = max(self.acked.get(origin, 0), note.n)
        return self.tokens() != before

    def keep_alive(self, replica_ids: set[str]) -> tuple[bool, bool]:
        """Only these replicas live: forget the others' leases.  (responses changed,
        some lease was forgotten)"""
        self.alive = replica_ids - {self.replica_id}
        for origin in [o for o in self.ready if o not in replica_ids]:
            del self.ready[origin]  # its gateways went with it
        for origin in [o for o in self.failing if o not in replica_ids]:
            del self.failing[origin]  # its back-offs lapse with its claims
        gone = [origin for origin in self.leases if origin not in replica_ids]
        if not gone:
            return False, False
        before = self.tokens()
        for origin in gone:
            log.warning(
                "a Control replica holding ACME orders is gone; its domains will be taken over",
                extra=kv(replica=origin, leases=len(self.leases[origin])),
            )
            del self.leases[origin]
            self.acked.pop(origin, None)
        return self.tokens() != before, True

    # -- what we tell them --------------------------------------------------------------

    def _send(self, note: AcmeNote) -> None:
        if self.feed is not None:
            self.feed.publish(Change("acme", acme=note))

    def _next(self) -> int:
        self.number += 1
        return self.number

    def announce(
        self,
        lease: str,
        domain: str | None,
        gateway: str | None,
        expires: float | None,
        tokens: dict[str, str],
    ) -> int:
        """One of our leases as it stands now; its number (0 with no other replicas)."""
        if self.feed is None:
            return 0
        number = self._next()
        # a lease needs one response per name; past the note's room the newest win
        pairs = tuple(tokens.items())[-MAX_NOTE_TOKENS:]
        self._send(AcmeNote("set", number, lease, domain, gateway, expires, tokens=pairs))
        return number

    def end(self, lease: str) -> None:
        if self.feed is not None:
            self._send(AcmeNote("end", self._next(), lease))

    def reset(self) -> None:
        if self.feed is not None:
            self._send(AcmeNote("reset", self._next()))

    def tell_ready(self, gateway_id: str, ready: p.AcmeReady | None) -> None:
        """Our gateway ``gateway_id`` orders certificates so (None: no longer)."""
        if self.feed is None:
            return
        if ready is None:
            self._send(AcmeNote("ready", gateway=gateway_id))
        else:
            zones = ready.dns_zones[:MAX_NOTE_ZONES]
            self._send(
                AcmeNote("ready", gateway=gateway_id, challenges=ready.challenges, zones=zones)
            )

    def tell_failing(self, domain: str, failure: tuple[str, float] | None) -> None:
        """Our order of ``domain`` failed: (error, next try); None: no longer failing."""
        if self.feed is None:
            return
        if failure is None:
            self._send(AcmeNote("failing", domain=domain))
        else:
            error, next_try = failure
            self._send(
                AcmeNote("failing", domain=domain, expires=next_try, error=error[:MAX_NOTE_ERROR])
            )

    def ask(self) -> None:
        """Every replica, tell us all your leases again."""
        self._send(AcmeNote("sync"))

    def ack(self, origin: str, number: int) -> None:
        self._send(AcmeNote("ack", number, to=origin))
