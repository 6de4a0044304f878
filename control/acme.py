"""Shared ACME: which gateway orders which certificate, and every gateway answering.

Theory of operation
-------------------
Gateways order certificates (they run the ACME client); Control decides who orders
what, so that a domain is ordered once however many gateways there are, and so that
any gateway the CA reaches can answer its HTTP-01 challenge.

*Who can order.*  A gateway with ACME says so after each ``auth`` (``acme_ready``:
``http-01``, and ``dns-01`` with the DNS zones its provider can change).  Only
connected gateways that said so get orders.

*What is needed.*  Every enabled http tunnel's domain that has no stored certificate
valid for more than ``renew_before`` (a renewal is the same order), where a name is
also covered by a certificate for ``*.<parent>``.  A name under a wildcard tunnel
(``www.apps.example.com`` beside ``*.apps.example.com``) waits for the wildcard's
certificate rather than ordering its own.  A wildcard domain can only be proven with
DNS-01, so it goes only to a gateway whose DNS zones cover it.

*Leases.*  :meth:`AcmeCoordinator.tick` (on every change of tunnels, certificates or
gateways, and every ``TICK_INTERVAL``) grants each needed domain without a live lease
to one capable gateway, the one holding the fewest leases (then by name, so tests and
operators can predict it), with ``acme_order``: a lease id, the domain and the names,
and a time to live (``lease_ttl``, longer than an order may take).  One lease per
domain at a time.  It ends when the certificate arrives (``certificate_obtained``,
stored and pushed to every gateway by the hub), when the order fails (``acme_failed``:
the domain then waits 1 min, doubling to 6 h, and the error is shown in
``GET /api/acme``), when its gateway disconnects (the domain goes at once to another
gateway: that is the take-over of an order whose gateway died) or when it expires (a
gateway that is connected but stuck: the domain goes to another one if there is one).
A certificate that comes back under a lease that has ended is still stored if it
passes the checks (``control/certs.py``): a certificate is a certificate.

*HTTP-01 everywhere.*  The ordering gateway sends each challenge's token and key
authorisation (``acme_challenge``); Control adds it to the pending set, numbers the
set (``serial``) and sends it whole to every gateway (``acme_challenges``), which
serve exactly that set and answer ``acme_challenges_applied`` with the serial.  When
every gateway connected at that moment has applied it (or left, or
``publish_wait`` seconds passed), the orderer gets ``acme_published`` and only then
tells the CA to validate: whichever gateway the CA reaches has the answer.  A lease
that ends takes its tokens with it.  Control's own certificate (``--acme-domain``,
``control/selfacme.py``) publishes its tokens the same way (:meth:`publish_local`),
so gateways answer for Control's name too when it points at them.

*Several replicas* (``control/acme_cluster.py``).  A replica grants a domain only
while it holds the database lease ``acme:<domain>`` (its *claim*), renewed on each
pass while the order lives, and through a failure's back-off (so the back-off holds
for the whole cluster), released when the order ends otherwise (so another replica
whose gateway can order takes it over at once), left to lapse after a certificate
arrived.  A replica that dies stops renewing; its claims lapse after ``claim_ttl``
and another replica's pass takes the domains over (a replica that finds its claim
taken, having paused longer than that, ends its lease: ``claim lost``).  Leases, responses and endings
go to the other replicas over the cluster's change feed: every replica's gateways
serve the responses of every replica's orders, and ``acme_published`` waits for the
gateways of every live replica (each acknowledges over the feed) or
``publish_wait``.  Alone (SQLite, one Control) the claims are taken all the same
(``control.db.leases`` works on SQLite too) under a fixed holder name, and there is
nobody to tell.

State other than the claims is in memory: after a Control restart gateways
reconnect, say ``acme_ready`` again, and orders are granted afresh (an order cut short
is simply made again).  ``GET /api/acme`` shows this replica's failures and history,
and the live orders of every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common import protocol as p
from common.logs import kv
from control.acme_cluster import ALONE, Claims, LeaseStore, ReplicaFeed, Replicas
from control.cluster.changes import AcmeNote

log = logging.getLogger("control.acme")

LEASE_TTL = 600.0
#: a replica's claim on a domain lapses this long after its last renewal (renewed at
#: a third of it: keep ``TICK_INTERVAL`` well below a third)
CLAIM_TTL = 30.0
PUBLISH_WAIT = 5.0
TICK_INTERVAL = 10.0
RENEW_BEFORE = 30 * 86400.0
BACKOFF_FIRST = 60.0
BACKOFF_MAX = 6 * 3600.0
#: ended leases kept for ``GET /api/acme``
RECENT = 100
#: the lease id of Control's own order (``--acme-domain``)
CONTROL_LEASE = "control"

Row = dict[str, Any]


def parent_wildcard(name: str) -> str | None:
    """``*.example.com`` for ``app.example.com``; None for a wildcard or a bare label."""
    if name.startswith("*."):
        return None
    _, dot, parent = name.partition(".")
    return f"*.{parent}" if dot and "." in parent else None


def _under(name: str, zone: str) -> bool:
    name = name[2:] if name.startswith("*.") else name
    return name == zone or name.endswith("." + zone)


def _proves(ready: p.AcmeReady, domain: str) -> bool:
    """Whether a gateway that said ``ready`` can prove ``domain`` (a wildcard only with
    DNS-01 under one of its zones)."""
    if "dns-01" in ready.challenges and any(_under(domain, z) for z in ready.dns_zones):
        return True
    return "http-01" in ready.challenges and not domain.startswith("*.")


@dataclass
class Lease:
    """One domain being ordered by one gateway."""

    id: str
    domain: str
    names: tuple[str, ...]
    gateway_id: str
    gateway_name: str
    granted: float
    expires: float
    tokens: dict[str, str] = field(default_factory=dict)


@dataclass
class _Publication:
    """Responses waiting until every gateway serves them: this replica's gateways the
    set numbered ``serial``, the other replicas our announcement ``number``."""

    serial: int
    waiting: set[str]  # gateways yet to apply ``serial``
    number: int  # 0: no other replica to wait for
    replicas: set[str]  # replicas yet to acknowledge ``number``
    label: str  # the lease, for the log
    then: Callable[[], None]  # once served everywhere (or timed out)
    done: asyncio.Future[None]


@dataclass
class _Failure:
    next_try: float
    delay: float
    error: str


class AcmeCoordinator:
    """The leases, the pending HTTP-01 responses and who has applied them.

    ``claims``: the database leases (``control.db.leases.Leases``; None: no claims,
    for one process with nothing to share); ``feed``: the other replicas (None: alone).
    """

    def __init__(
        self,
        send: Callable[[str, str, dict[str, Any]], bool],
        gateways: Callable[[], dict[str, str]],
        rows: Callable[[], Awaitable[tuple[list[Row], list[Row]]]],
        *,
        claims: LeaseStore | None = None,
        feed: ReplicaFeed | None = None,
        renew_before: float = RENEW_BEFORE,
        lease_ttl: float = LEASE_TTL,
        claim_ttl: float = CLAIM_TTL,
        publish_wait: float = PUBLISH_WAIT,
        tick_interval: float = TICK_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._send = send  # (gateway id, type, data) → queued?
        self._gateways = gateways  # connected gateways: id → name
        self._rows = rows  # (tunnels, certificates)
        self.renew_before = renew_before
        self.lease_ttl = lease_ttl
        self.publish_wait = publish_wait
        self.tick_interval = tick_interval
        self.clock = clock
        self.capable: dict[str, p.AcmeReady] = {}
        self.leases: dict[str, Lease] = {}  # domain → its live lease
        self.failures: dict[str, _Failure] = {}
        #: every lease ever granted per domain (how many times an order was handed out)
        self.granted: dict[str, int] = {}
        #: the last leases that ended: domain, gateway, outcome (obtained, failed,
        #: gateway left, expired), when granted and ended
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.serial = 0
        self._local: dict[str, str] = {}  # Control's own tokens
        self._applied: dict[str, int] = {}  # gateway id → serial it serves
        self._publications: list[_Publication] = []
        self._tick_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._avoid: dict[str, str] = {}  # domain → gateway whose lease expired
        #: the other replicas: their leases and responses, their acknowledgements
        self.replicas = Replicas(feed)
        #: the ``acme:<domain>`` database leases this replica holds
        self.claims = Claims(claims, self.replicas.replica_id or ALONE, claim_ttl)
        self._stopped = False
        if feed is not None:
            feed.attach_acme(self)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.replicas.ask()  # the other replicas' orders in flight

    @property
    def claim_ttl(self) -> float:
        return self.claims.ttl

    @claim_ttl.setter
    def claim_ttl(self, value: float) -> None:
        self.claims.ttl = value

    async def stop(self) -> None:
        """Stop coordinating: claims released and the other replicas told, so that
        they take the domains over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._tick_lock:  # never between a claim taken and its grant
            self._stopped = True
            self.replicas.reset()
            try:
                async with asyncio.timeout(5):
                    await self.claims.release_all()
            except Exception as exc:  # they lapse by themselves
                log.warning("ACME claims not released", extra=kv(error=str(exc)[:200]))
        for publication in self._publications:
            if not publication.done.done():
                publication.done.cancel()
        self._publications.clear()

    def wake(self) -> None:
        """Something changed (tunnels, certificates, gateways): look again soon."""
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.tick_interval)
            self._wakeup.clear()
            try:
                await self.tick()
            except Exception:  # a bug must not end the coordination for good
                log.exception("acme coordination pass failed")

    # -- what is pending ----------------------------------------------------------------

    def pending(self) -> dict[str, str]:
        """Every HTTP-01 response gateways must serve now (token → key authorisation)."""
        tokens = self.replicas.tokens()
        tokens.update(self._local)
        for lease in self.leases.values():
            tokens.update(lease.tokens)
        return tokens

    def _challenges_frame(self) -> dict[str, Any]:
        return p.AcmeChallenges(self.serial, tuple(sorted(self.pending().items()))).to_wire()

    def _broadcast_challenges(self) -> None:
        """A new numbered set to every gateway; publications wait for their acks."""
        self.serial += 1
        frame = self._challenges_frame()
        for gateway_id in self._gateways():
            self._send(gateway_id, "acme_challenges", frame)

    def _settle(self) -> None:
        """Finish the publications every gateway has applied (or left) and every
        other replica has acknowledged (or died)."""
        connected = set(self._gateways())
        alive = self.replicas.alive
        for publication in list(self._publications):
            publication.waiting = {
                g
                for g in publication.waiting
                if g in connected and self._applied.get(g, -1) < publication.serial
            }
            publication.replicas = {
                r
                for r in publication.replicas
                if r in alive and self.replicas.acked.get(r, 0) < publication.number
            }
            if not publication.waiting and not publication.replicas:
                self._finish(publication, False)

    def _finish(self, publication: _Publication, timed_out: bool) -> None:
        if publication not in self._publications:
            return
        self._publications.remove(publication)
        if timed_out:
            log.warning(
                "not every gateway confirmed an http-01 response in time; validating anyway",
                extra=kv(
                    lease=publication.label,
                    waiting=",".join(sorted(publication.waiting)) or None,
                    replicas=",".join(sorted(publication.replicas)) or None,
                ),
            )
        publication.then()
        if not publication.done.done():
            publication.done.set_result(None)

    def _track(self, number: int, label: str, then: Callable[[], None]) -> asyncio.Future[None]:
        """Call ``then`` once every gateway serves the current set and every replica
        our announcement ``number`` (or after ``publish_wait``)."""
        loop = asyncio.get_running_loop()
        publication = _Publication(
            self.serial,
            set(self._gateways()),
            number,
            self.replicas.waiting(number) if number else set(),
            label,
            then,
            loop.create_future(),
        )
        self._publications.append(publication)
        loop.call_later(self.publish_wait, self._finish, publication, True)
        self._settle()
        return publication.done

    def _publish(self, lease: str, token: str, holder: str, number: int) -> asyncio.Future[None]:
        self._broadcast_challenges()

        def published() -> None:
            if holder:
                self._send(holder, "acme_published", p.AcmePublished(lease, token).to_wire())

        return self._track(number, lease, published)

    def _announce(self, lease: Lease) -> int:
        """Tell the other replicas how ``lease`` stands; the announcement's number."""
        return self.replicas.announce(
            lease.id, lease.domain, lease.gateway_name, lease.expires, lease.tokens
        )

    def _announce_local(self) -> int:
        return self.replicas.announce(CONTROL_LEASE, None, None, None, self._local)

    # -- Control's own order (control/selfacme.py) --------------------------------------

    async def publish_local(self, token: str, validation: str) -> None:
        """Serve one of Control's own HTTP-01 responses from every gateway."""
        self._local[token] = validation
        await self._publish(CONTROL_LEASE, token, "", self._announce_local())

    async def withdraw_local(self, token: str) -> None:
        if self._local.pop(token, None) is not None:
            self._broadcast_challenges()
            self._announce_local()

    # -- frames from gateways -----------------------------------------------------------

    async def handle(self, gateway_id: str, name: str, frame: p.Frame) -> None:
        """One ``acme_*`` frame from a gateway (ProtocolError for a bad one)."""
        if frame.type == "acme_ready":
            self.ready(gateway_id, name, p.parse_acme_ready(frame.data))
        elif frame.type == "acme_challenge":
            challenge = p.parse_acme_challenge(frame.data)
            lease = self._lease_of(gateway_id, challenge.lease)
            lease.tokens[challenge.token] = challenge.key_authorization
            self._publish(lease.id, challenge.token, gateway_id, self._announce(lease))
        elif frame.type == "acme_withdraw":
            challenge = p.parse_acme_challenge(frame.data, withdraw=True)
            lease = self._lease_of(gateway_id, challenge.lease, missing_ok=True)
            if lease is not None and lease.tokens.pop(challenge.token, None) is not None:
                self._broadcast_challenges()
                self._announce(lease)
        elif frame.type == "acme_challenges_applied":
            serial = p.parse_acme_serial(frame.data)
            self._applied[gateway_id] = max(self._applied.get(gateway_id, 0), serial)
            self._settle()
        elif frame.type == "acme_failed":
            failed = p.parse_acme_failed(frame.data)
            lease = self._lease_of(gateway_id, failed.lease, missing_ok=True)
            if lease is not None:
                self.failed(lease, failed.error or "no reason given")
        else:
            raise p.ProtocolError("unknown_type", f"unknown frame type {frame.type[:64]!r}")

    def _lease_of(self, gateway_id: str, lease_id: str, *, missing_ok: bool = False) -> Any:
        for lease in self.leases.values():
            if lease.id == lease_id and lease.gateway_id == gateway_id:
                return lease
        if missing_ok:
            return None  # ended meanwhile (expired, taken over): nothing to do
        raise p.ProtocolError("unknown_lease", "no live ACME lease of this gateway has that id")

    def ready(self, gateway_id: str, name: str, ready: p.AcmeReady) -> None:
        self.capable[gateway_id] = ready
        self.replicas.tell_ready(gateway_id, ready)  # for the others' wildcard checks
        log.info(
            "gateway orders certificates",
            extra=kv(
                gateway=name,
                challenges=",".join(ready.challenges),
                dns_zones=",".join(ready.dns_zones) or None,
            ),
        )
        # what it must serve already (an order of another gateway in flight)
        self._send(gateway_id, "acme_challenges", self._challenges_frame())
        self.wake()

    def gateway_gone(self, gateway_id: str) -> None:
        """A gateway disconnected: its leases end (others take their domains over)."""
        if self.capable.pop(gateway_id, None) is not None:
            self.replicas.tell_ready(gateway_id, None)
        self._applied.pop(gateway_id, None)
        ended = [lease for lease in self.leases.values() if lease.gateway_id == gateway_id]
        for lease in ended:
            log.warning(
                "gateway holding an ACME lease left; the order goes to another gateway",
                extra=kv(domain=lease.domain, gateway=lease.gateway_name),
            )
            self._end(lease, "gateway left")
        self._settle()
        self.wake()

    def failed(self, lease: Lease, error: str) -> None:
        previous = self.failures.get(lease.domain)
        delay = BACKOFF_FIRST if previous is None else min(BACKOFF_MAX, previous.delay * 2)
        failure = self.failures[lease.domain] = _Failure(self.clock() + delay, delay, error[:300])
        self.replicas.tell_failing(lease.domain, (failure.error, failure.next_try))
        log.error(
            "certificate order failed",
            extra=kv(
                domain=lease.domain, gateway=lease.gateway_name, error=error[:300], retry_in_s=delay
            ),
        )
        self._end(lease, "failed")

    def obtained(self, gateway_id: str, domain: str, lease_id: str | None) -> None:
        """A certificate for ``domain`` was stored: its order is over."""
        if self.failures.pop(domain, None) is not None:
            self.replicas.tell_failing(domain, None)
        self._avoid.pop(domain, None)
        lease = self.leases.get(domain)
        if lease is not None and (lease_id is None or lease.id == lease_id):
            self._end(lease, "obtained")
            self.claims.forget(domain)  # lapses: see control/acme_cluster.py
        self.wake()

    def _end(self, lease: Lease, outcome: str) -> None:
        if self.leases.get(lease.domain) is lease:
            del self.leases[lease.domain]
            self.recent.append(
                {
                    "domain": lease.domain,
                    "gateway": lease.gateway_name,
                    "outcome": outcome,
                    "grantedAt": lease.granted,
                    "endedAt": self.clock(),
                }
            )
            self.replicas.end(lease.id)
        if lease.tokens:
            lease.tokens.clear()
            self._broadcast_challenges()
        self.wake()  # its claim: kept for a back-off or another gateway, else released

    # -- granting -------------------------------------------------------------------------

    def needed(self, tunnels: list[Row], certificates: list[Row], now: float) -> list[str]:
        """Tunnel domains that need a certificate ordered (see the module docstring)."""
        valid = {c["domain"] for c in certificates if c["not_after"] - now > self.renew_before}
        domains = {
            t["domain"] for t in tunnels if t["protocol"] == "http" and t["enabled"] and t["domain"]
        }
        wildcards = {d for d in domains if d.startswith("*.")}
        wanted = []
        for domain in sorted(domains):
            parent = parent_wildcard(domain)
            if domain in valid or (parent is not None and parent in valid):
                continue
            if parent is not None and parent in wildcards:
                continue  # the wildcard's certificate will cover it
            wanted.append(domain)
        return wanted

    def eligible(self, domain: str) -> list[tuple[str, str]]:
        """Connected gateways that can prove ``domain``, (id, name), best first."""
        names = self._gateways()
        held: dict[str, int] = {}
        for lease in self.leases.values():
            held[lease.gateway_id] = held.get(lease.gateway_id, 0) + 1
        result = []
        for gateway_id, ready in self.capable.items():
            if gateway_id not in names:
                continue
            if _proves(ready, domain):
                result.append((gateway_id, names[gateway_id]))
        result.sort(key=lambda g: (held.get(g[0], 0), g[1], g[0]))
        avoid = self._avoid.get(domain)
        if avoid is not None and len(result) > 1:
            result = [g for g in result if g[0] != avoid] + [g for g in result if g[0] == avoid]
        return result

    def can_prove(self, domain: str) -> bool:
        """Whether a connected gateway, of this replica or of another one, could order a
        certificate for ``domain`` now (the other replica's own pass then orders it)."""
        return bool(self.eligible(domain)) or any(
            _proves(ready, domain) for ready in self.replicas.remote_ready()
        )

    async def tick(self) -> None:
        async with self._tick_lock:
            now = self.clock()
            for lease in list(self.leases.values()):
                if lease.expires <= now:
                    log.warning(
                        "ACME lease expired without a result; the order goes to another gateway",
                        extra=kv(domain=lease.domain, gateway=lease.gateway_name),
                    )
                    self._avoid[lease.domain] = lease.gateway_id
                    self._end(lease, "expired")
            if self._stopped or (not self.capable and not self.claims.held):
                return
            tunnels, certificates = await self._rows()
            wanted = self.needed(tunnels, certificates, now)
            for domain in list(self.failures):
                if domain not in wanted:
                    del self.failures[domain]
                    self.replicas.tell_failing(domain, None)
            for domain in wanted:
                if domain in self.leases or self._backing_off(domain, now):
                    continue
                if self.replicas.ordering(domain, now) is not None:
                    continue  # another replica's gateway orders it
                if not self.eligible(domain) or not await self.claims.take(domain, now):
                    continue
                candidates = self.eligible(domain)  # again: the claim took a moment
                if candidates:
                    self._grant(domain, *candidates[0], now)
            await self._keep_claims(set(wanted), now)

    def _backing_off(self, domain: str, now: float) -> bool:
        failure = self.failures.get(domain)
        return failure is not None and now < failure.next_try

    async def _keep_claims(self, wanted: set[str], now: float) -> None:
        """Renew the claims of live orders and back-offs; release the others."""
        for domain in list(self.claims.held):
            if domain in self.leases or (domain in wanted and self._backing_off(domain, now)):
                if not await self.claims.renew(domain, now):
                    log.warning(
                        "lost the claim on an ACME order to another Control replica",
                        extra=kv(domain=domain),
                    )
                    lease = self.leases.get(domain)
                    if lease is not None:
                        self._end(lease, "claim lost")
            else:
                await self.claims.release(domain)

    def _grant(self, domain: str, gateway_id: str, name: str, now: float) -> None:
        lease = Lease(
            secrets.token_hex(8), domain, (domain,), gateway_id, name, now, now + self.lease_ttl
        )
        order = p.AcmeOrder(lease.id, domain, lease.names, self.lease_ttl)
        if not self._send(gateway_id, "acme_order", order.to_wire()):
            return
        self.leases[domain] = lease
        self.granted[domain] = self.granted.get(domain, 0) + 1
        self._announce(lease)
        log.info("certificate order leased", extra=kv(domain=domain, gateway=name))

    # -- the other replicas (control/acme_cluster.py) -------------------------------------

    def acme_note(self, origin: str, note: AcmeNote) -> None:
        """A note from replica ``origin`` (the change feed's receiver calls this)."""
        if self._stopped:
            return
        if note.op == "sync":
            self._announce_all()
            return
        changed = self.replicas.apply(origin, note)
        if note.op == "ack":
            self._settle()
            return
        if changed:
            self._broadcast_challenges()
        if note.op == "set" and note.tokens:
            # acknowledged once this replica's gateways serve them
            number = note.n
            self._track(0, f"{origin}/{note.lease}", lambda: self.replicas.ack(origin, number))
        if note.op in ("end", "reset"):
            self.wake()  # a domain may be free to order here now

    def acme_resync(self) -> None:
        """Notes may have been lost: ask every replica for its leases again."""
        if not self._stopped:
            self.replicas.ask()

    def replicas_alive(self, replica_ids: set[str]) -> None:
        """The live replicas: the leases of the others are forgotten (their claims
        lapse and their domains are taken over), nobody waits for their acks."""
        changed, forgot = self.replicas.keep_alive(replica_ids)
        if self._stopped:
            return
        if changed:
            self._broadcast_challenges()
        self._settle()
        if forgot:
            self.wake()

    def _announce_all(self) -> None:
        """Every live lease of ours, after a ``reset`` (another replica asked)."""
        self.replicas.reset()
        for lease in self.leases.values():
            self._announce(lease)
        for gateway_id, ready in self.capable.items():
            self.replicas.tell_ready(gateway_id, ready)
        for domain, failure in self.failures.items():
            self.replicas.tell_failing(domain, (failure.error, failure.next_try))
        if self._local:
            self._announce_local()

    # -- what the API shows ---------------------------------------------------------------

    def status(self, tunnels: list[Row], certificates: list[Row]) -> list[dict[str, Any]]:
        """Each domain being ordered or failing, for ``GET /api/acme``."""
        now = self.clock()
        wanted = set(self.needed(tunnels, certificates, now)) | set(self.leases)
        out = []
        for domain in sorted(wanted):
            lease = self.leases.get(domain)
            own = self.failures.get(domain)
            # this replica's failure, else another replica's (None: failing nowhere)
            failure = (
                (own.error, own.next_try) if own is not None else self.replicas.failure(domain)
            )
            gateway: str | None = None
            expires: float | None = None
            ordering = True
            if lease is not None:
                gateway, expires = lease.gateway_name, lease.expires
            elif (remote := self.replicas.ordering(domain, now)) is not None:
                gateway, expires = remote.gateway, remote.expires  # at another replica
            else:
                ordering = False
            if ordering:
                state = "ordering"
            elif failure is not None:
                state = "failing"
            elif not self.can_prove(domain):
                state = "no_gateway"
            else:
                state = "waiting"
            out.append(
                {
                    "domain": domain,
                    "state": state,
                    "gateway": gateway,
                    "leaseExpiresAt": expires,
                    "lastError": failure[0] if failure else None,
                    "nextTryAt": failure[1] if failure else None,
                    "ordersGranted": self.granted.get(domain, 0),
                }
            )
        return out
