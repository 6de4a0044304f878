"""The WebSocket hub: authenticates gateways and agents and keeps them configured.

Theory of operation
-------------------
A client connects to ``/ws`` and must send ``auth`` within ``auth_timeout`` seconds
(default ``AUTH_TIMEOUT``).  Until then it is *pending*, and each remote address may
hold only so many pending connections (``control.ws.admission``): one more gets HTTP
429 instead of the upgrade.  Authenticated connections are not counted.
A valid key yields ``auth_success`` and a full ``config``; the client's public key (and
a gateway's endpoint) are stored, and if they changed, the other side is sent a fresh
``config`` so it can update its WireGuard peers.  A second connection with the same
credentials replaces the first (close code ``CLOSE_REPLACED``).  A disabled client's key
stays valid, but its ``auth`` is answered ``auth_error`` (code ``disabled``) and close
code ``CLOSE_DISABLED`` (4008), a connected one is closed with it when an admin
disables it, and no other client's config names it (``configs.py``).

Each connection owns a bounded send queue drained by its own writer task: a slow
client never delays a broadcast to the others, and one whose queue overflows is
closed (``CLOSE_TOO_SLOW``) and re-syncs with a full config when it returns.

Every frame to a client carries a ``configVersion`` from one counter per process,
started at ``epoch << 32`` where the epoch grows on every start (stored in the
database): versions only grow for every client, across restarts, without a database
write per push, and a broadcast is encoded once for all its recipients.  A heartbeat
reporting a version other than the last one sent gets a full ``config``.  Configs
are built from a snapshot cache keyed on the store's write generation.

Ordering: ``lock`` is held from a change's commit until its broadcast is queued, and
from building a config until it is queued (and, for a new connection, until the
connection is registered).  So a client sees every change either inside a config or
as a ``tunnel_*`` frame after it, never a config that predates a change it missed.  ``last_seen`` is kept in memory and flushed in
batches by the monitor, which also closes clients silent for ``offline_after``
seconds; a closed connection marks its client offline.

Several Control replicas on one PostgreSQL database (``control.cluster``): every change
pushed here is also published for the other replicas (``_publish``), which build the
same push for their own clients from the database (``apply_change``; a gap in the
feed or a dead replica makes them re-sync everybody), and ``presence`` counts a client
connected to another replica as online.  Alone (SQLite), the cluster does nothing.

Bad frames (malformed JSON, wrong types, unknown types, binary frames) are answered
with an ``error`` frame; they never raise out of the handler.  Oversized frames are
refused by the WebSocket layer with close code 1009.  A refused or missing ``auth`` is
logged once per address (IPv6: /64) per ``AUTH_LOG_INTERVAL`` with the number not
logged since, so a flood of bad keys costs a line a minute per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from common import protocol as p
from common.logs import OncePer, kv
from control import certs
from control.access import policy_spec
from control.acme import AcmeCoordinator
from control.acme_cluster import ReplicaFeed
from control.api.errors import error_response
from control.cluster import Cluster, SingleControl
from control.cluster.changes import Change, config_change, tunnel_change
from control.db.leases import Leases
from control.db.store import ClientKind, NotFound, Row, Store
from control.events import EventBus
from control.traffic import Traffic
from control.ws import intake
from control.ws.admission import DEFAULT_PER_ADDRESS, PendingAuth, address_key
from control.ws.configs import (
    AgentTunnels,
    GatewayCommon,
    agent_config,
    tunnel_agents,
    tunnel_wire,
)

log = logging.getLogger("control.hub")

#: set while the hub replays another replica's change: nothing is published back
_replaying: contextvars.ContextVar[bool] = contextvars.ContextVar("replaying", default=False)


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Pushes made inside stay on this replica (a replayed change, a client's own
    re-sync)."""
    token = _replaying.set(True)
    try:
        yield
    finally:
        _replaying.reset(token)


SEND_QUEUE_FRAMES = 256
#: bad frames a client may send in a burst, and how fast its allowance refills (per
#: second); past it the connection is closed with CLOSE_BAD_FRAMES
BAD_FRAME_BURST = 40
BAD_FRAME_REFILL = 0.5
#: a connection's bad frames are logged once per code per this many seconds
BAD_FRAME_LOG_INTERVAL = 60.0
#: failed and timed-out authentications are logged once per address per this many
#: seconds, with the number not logged since the previous line
AUTH_LOG_INTERVAL = 60.0
#: addresses those lines are tracked for (past it, stale ones are forgotten)
AUTH_LOG_ADDRESSES = 4096
CLOSE_TIMEOUT = 2.0


@dataclass(eq=False)
class Connection:
    """One authenticated client and its writer task."""

    ws: WebSocket
    kind: ClientKind
    client_id: str
    name: str
    config_version: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_wall: float = field(default_factory=time.time)
    queue: asyncio.Queue[str | None] = field(
        default_factory=lambda: asyncio.Queue(SEND_QUEUE_FRAMES)
    )
    writer: asyncio.Task[None] | None = None
    closing: bool = False
    #: the bad-frame allowance (a token bucket) and when it was last refilled
    bad_allowance: float = BAD_FRAME_BURST
    bad_refilled: float = field(default_factory=time.monotonic)
    #: bad frames logged once per code per interval; the client's own error reports too
    bad_log: OncePer = field(default_factory=lambda: OncePer(BAD_FRAME_LOG_INTERVAL))
    reported_log: OncePer = field(default_factory=lambda: OncePer(BAD_FRAME_LOG_INTERVAL))

    def spend_bad_frame(self, now: float) -> bool:
        """Count one bad frame; False once the allowance is used up."""
        self.bad_allowance = min(
            BAD_FRAME_BURST, self.bad_allowance + (now - self.bad_refilled) * BAD_FRAME_REFILL
        )
        self.bad_refilled = now
        self.bad_allowance -= 1
        return self.bad_allowance >= 0

    def enqueue(self, frame: str) -> bool:
        if self.closing:
            return False
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True


class Hub:
    """Registry of live connections plus everything that pushes to them."""

    def __init__(
        self,
        store: Store,
        offline_after: float = 60.0,
        coalesce_delay: float = 0.05,
        *,
        auth_timeout: float = p.AUTH_TIMEOUT,
        pending_per_address: int = DEFAULT_PER_ADDRESS,
        events: EventBus | None = None,
        traffic: Traffic | None = None,
        cluster: Cluster | None = None,
        auth_queue: int = intake.DEFAULT_LIMIT,
    ) -> None:
        self.store = store
        #: connections authenticating at once, bounded (``control.ws.intake``)
        self.admission = intake.Admission(auth_queue)
        #: API-key look-ups, batched
        self.keys = intake.KeyLookup(store)
        #: what clients report at ``auth``, written in batches
        self.auth_records = intake.AuthRecorder(store)
        #: when ending connections were last seen, written in batches
        self.seen_writer = intake.SeenWriter(store)
        #: the other Control replicas (``control.cluster``); alone: nothing to share
        self.cluster: Cluster = cluster if cluster is not None else SingleControl()
        #: what the dashboard's live pages hear about (presence, health, traffic)
        self.events = events if events is not None else EventBus()
        #: per-tunnel traffic and handshake ages from ``stats`` frames
        self.traffic = traffic if traffic is not None else Traffic()
        self.auth_timeout = auth_timeout
        #: connections not yet authenticated, counted per remote address
        self.pending = PendingAuth(pending_per_address)
        #: a flood of bad or missing ``auth`` frames costs a log line per address per
        #: interval, not one per connection
        self.auth_failures = OncePer(AUTH_LOG_INTERVAL, AUTH_LOG_ADDRESSES)
        self.auth_timeouts = OncePer(AUTH_LOG_INTERVAL, AUTH_LOG_ADDRESSES)
        #: disabled clients retrying: a line per client per interval
        self.disabled_refusals = OncePer(AUTH_LOG_INTERVAL, AUTH_LOG_ADDRESSES)
        self.offline_after = offline_after
        self.coalesce_delay = coalesce_delay
        self._pending_push: set[ClientKind] = set()
        self._version = 0
        self._cache: dict[str, tuple[int, list[Row]]] = {}
        self._policy_cache: tuple[int, tuple[p.AccessPolicy, ...]] | None = None
        self._keys: tuple[p.SessionKey, ...] | None = None
        #: what many views share, built once per snapshot of the rows (``configs.py``)
        self._agent_tunnels: AgentTunnels | None = None
        self._gateway_common: GatewayCommon | None = None
        self.lock = asyncio.Lock()
        self.connections: dict[tuple[ClientKind, str], Connection] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._shutting_down = False
        #: agents whose replicas' presence is still to be stored (``_replica_presence``)
        self._presence_wanted: dict[str, bool] = {}
        self._presence_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: who orders which certificate, and the HTTP-01 responses every gateway serves
        #: (one order per domain across replicas: database claims, notes on the feed)
        self.acme = AcmeCoordinator(
            self._send_unversioned,
            self._gateway_names,
            self._acme_rows,
            claims=Leases(store.engine),
            feed=self.cluster if isinstance(self.cluster, ReplicaFeed) else None,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        intake.relax_gc()  # a storm's allocations must not cost a third of the CPU
        self._version = (await self.store.next_epoch()) << 32
        await self.cluster.start(self)
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())
        self.acme.start()

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    async def _snapshot(self, name: str) -> list[Row]:
        """All rows of one kind, reloaded only after a write that could change configs."""
        generation = self.store.generation
        cached = self._cache.get(name)
        if cached is not None and cached[0] == generation:
            return cached[1]
        if name == "agents":
            rows = await self.store.all_clients("agent")
        elif name == "gateways":
            rows = await self.store.all_clients("gateway")
        elif name == "tunnels":
            rows = await self.store.all_tunnels()
        else:
            rows = await self.store.all_certificates()
        self._cache[name] = (generation, rows)
        return rows

    async def close_all(
        self, code: int = p.CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Close every connection (SIGTERM path): clients see ``1001 going away``."""
        self._shutting_down = True
        self.events.close()  # the dashboard's live streams end too
        await self.acme.stop()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await asyncio.gather(
            *(self._close(conn, code, reason) for conn in list(self.connections.values()))
        )
        await self._flush_last_seen()
        await self.cluster.close()

    # -- the endpoint -----------------------------------------------------------------

    async def endpoint(self, ws: WebSocket) -> None:
        key = address_key(ws.client.host if ws.client else None)
        if not self.pending.enter(key):
            await self._refuse_pending(ws, key)
            return
        try:
            if not self.admission.enter(time.monotonic()):  # a storm: come back later
                await self._refuse_busy(ws)
                return
            try:
                await ws.accept()
                if self._shutting_down:
                    await ws.close(p.CLOSE_GOING_AWAY, "server shutting down")
                    return
                conn = await self._authenticate(ws)
            except WebSocketDisconnect:
                return
            except Exception:  # a bug or a store error must cost one connection only
                log.exception("authenticating a connection failed")
                # registered before the failure: unregistered like any other that ends
                conn = next((c for c in self.connections.values() if c.ws is ws), None)
                if conn is None:
                    await self._safe_close(ws, 1011, "internal error")
                    return
                await self._close(conn, 1011, "internal error")
                await self._unregister(conn)
                return
            finally:
                self.admission.leave(time.monotonic())
        finally:
            self.pending.leave(key)  # authenticated, refused or gone: no longer pending
        if conn is None:
            return
        try:
            await self._serve(conn)
        except WebSocketDisconnect:
            pass
        except Exception:  # a bug must cost one connection, never the server
            log.exception("connection handler failed", extra=kv(client=conn.name, kind=conn.kind))
            await self._close(conn, 1011, "internal error")
        finally:
            await self._unregister(conn)

    async def _refuse_busy(self, ws: WebSocket) -> None:
        """The authentication queue is full: HTTP 503 with ``Retry-After`` instead of
        the upgrade (no WebSocket handshake, no close handshake: a refusal costs a
        fraction of a connection), or, where the server cannot answer before the
        upgrade, the upgrade and a close with ``CLOSE_TRY_AGAIN`` naming the wait."""
        wait = self.admission.retry_after(time.monotonic())
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            with contextlib.suppress(Exception):  # the client may be gone already
                await ws.send_denial_response(
                    error_response(
                        503,
                        "busy",
                        "Control is taking a crowd of connections; retry later",
                        headers={"Retry-After": str(wait)},
                    )
                )
            return
        with contextlib.suppress(Exception):
            await ws.accept()
        await self._safe_close(ws, p.CLOSE_TRY_AGAIN, p.retry_after_reason(wait))

    async def _refuse_pending(self, ws: WebSocket, key: str) -> None:
        """Over the per-address cap: HTTP 429 instead of the upgrade (a close before
        the upgrade, which uvicorn answers with 403, where the server cannot)."""
        refused = self.pending.refused(key, time.monotonic())
        if refused is not None:
            log.warning(
                "refusing connections over the per-address cap on unauthenticated ones",
                extra=kv(address=key, cap=self.pending.per_address, refused=refused),
            )
        with contextlib.suppress(Exception):  # the client may be gone already
            if "websocket.http.response" in ws.scope.get("extensions", {}):
                await ws.send_denial_response(
                    error_response(
                        429,
                        "too_many_pending",
                        f"more than {self.pending.per_address} unauthenticated connections "
                        "from this address; authenticate or retry later",
                        headers={"Retry-After": "5"},
                    )
                )
            else:
                await ws.close(p.CLOSE_POLICY, "too many unauthenticated connections")

    async def _authenticate(self, ws: WebSocket) -> Connection | None:
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        try:
            message = await asyncio.wait_for(ws.receive(), self.auth_timeout)
        except TimeoutError:
            address = address_key(ws.client.host if ws.client else None)
            due, unlogged = self.auth_timeouts.due(address)
            if due:
                log.info(
                    "closing client that did not authenticate in time",
                    extra=kv(peer=peer, address=address, since_last_logged=unlogged),
                )
            await self._safe_close(ws, p.CLOSE_AUTH_TIMEOUT, "auth timeout")
            return None
        if message["type"] == "websocket.disconnect":
            return None
        return await self.authenticate_message(ws, message, peer)

    async def authenticate_message(
        self, ws: WebSocket, message: Message, peer: str
    ) -> Connection | None:
        """Handle a connection's first ASGI ``websocket.receive`` message: the ``auth``
        frame.  Registers and returns the connection, or answers ``auth_error`` and
        closes (4001).  Called once per connection, and directly by the frame fuzzer."""
        try:
            text = message.get("text")
            frame = p.decode(text if text is not None else bytes(message.get("bytes") or b""))
            if frame.type != "auth":
                raise p.ProtocolError("auth_required", "the first frame must be 'auth'")
            auth = p.parse_auth(frame.data)
        except p.ProtocolError as exc:
            await self._reject(ws, exc.message, peer, exc.code)
            return None
        expected_prefix = "agt_" if auth.client_type == "agent" else "gtw_"
        row = None
        # rows read now are current under the lock below while no write came between
        # but clients' own auth reports (each touches only its own row, and this
        # client's own report is applied to its copy)
        generation = self.store.generation - self.store.auth_writes
        if auth.api_key.startswith(expected_prefix):
            row = await self.keys.lookup(auth.client_type, auth.api_key)  # type: ignore[arg-type]
        if row is None:
            await self._reject(ws, "invalid API key", peer, "invalid_key")
            return None
        kind: ClientKind = "agent" if auth.client_type == "agent" else "gateway"
        if not row["enabled"]:
            await self._refuse_disabled(ws, kind, row, peer)
            return None
        changed = await self.auth_records.record(kind, row, auth)
        conn = Connection(ws, kind, row["id"], row["name"])
        async with self.lock:
            unchanged = self.store.generation - self.store.auth_writes == generation
            fresh = {row["id"]: row} if unchanged else None
            config = await self._build_configs(kind, [conn], fresh)
            if conn not in config:
                old = None
            else:
                old = self.connections.get((kind, row["id"]))
                self.connections[(kind, row["id"])] = conn
                conn.writer = asyncio.get_running_loop().create_task(self._write_loop(conn))
                conn.config_version = self._next_version()
                conn.enqueue(
                    p.encode(
                        "auth_success",
                        p.AuthSuccess(row["id"], row["name"], kind, p.HEARTBEAT_INTERVAL).to_wire(),
                        conn.config_version,
                    )
                )
                conn.enqueue(p.encode("config", config[conn], conn.config_version))
        if conn not in config:
            try:
                current = await self.store.get_client(kind, row["id"])
            except NotFound:
                await self._reject(ws, f"{kind} was deleted", peer, "invalid_key")
            else:  # disabled meanwhile
                await self._refuse_disabled(ws, kind, current, peer)
            return None
        if old is not None:
            log.info("replacing previous connection", extra=kv(kind=kind, client=row["name"]))
            await self._close(old, p.CLOSE_REPLACED, "replaced by a newer connection")
        self.cluster.connected(kind, row["id"])
        log.info(
            "client connected",
            extra=kv(kind=kind, client=row["name"], peer=peer, version=auth.version or "?"),
        )
        self.events.publish("presence", kind=kind, id=row["id"], online=True)
        if kind == "agent":
            self._replica_presence(row["id"], True)
        if changed:
            self.schedule_config_push("gateway" if kind == "agent" else "agent")
        return conn

    async def _reject(self, ws: WebSocket, message: str, peer: str, code: str) -> None:
        address = address_key(ws.client.host if ws.client else None)
        due, unlogged = self.auth_failures.due(address)
        if due:
            log.warning(
                "authentication failed",
                extra=kv(peer=peer, address=address, reason=code, since_last_logged=unlogged),
            )
        with contextlib.suppress(Exception):
            await ws.send_text(p.encode("auth_error", p.ErrorReport(code, message).to_wire()))
        await self._safe_close(ws, p.CLOSE_AUTH_FAILED, message[:120])

    async def _refuse_disabled(self, ws: WebSocket, kind: ClientKind, row: Row, peer: str) -> None:
        """A disabled client's key is valid but it may not connect: ``auth_error``
        (code ``disabled``) and close code 4008, logged once per client per interval
        (it keeps retrying on its back-off until enabled)."""
        due, unlogged = self.disabled_refusals.due(row["id"])
        if due:
            log.info(
                "refusing a disabled client",
                extra=kv(kind=kind, client=row["name"], peer=peer, since_last_logged=unlogged),
            )
        message = f"this {kind} is disabled; an admin can enable it again"
        with contextlib.suppress(Exception):
            await ws.send_text(
                p.encode("auth_error", p.ErrorReport(p.AUTH_DISABLED, message).to_wire())
            )
        await self._safe_close(ws, p.CLOSE_DISABLED, f"{kind} disabled")

    async def _serve(self, conn: Connection) -> None:
        while not conn.closing:  # closed by the hub (too slow, bad frames): stop reading
            message = await conn.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self.handle_message(conn, message)

    async def handle_message(self, conn: Connection, message: Message) -> None:
        """Handle one ASGI ``websocket.receive`` message from an authenticated client:
        dispatch its frame, or answer a bad one by the bad-frame policy.  Raises only
        for a bug.  Called by the read loop, and directly by the frame fuzzer."""
        conn.last_seen = time.monotonic()
        conn.last_seen_wall = time.time()
        try:
            text = message.get("text")
            if text is None:
                raise p.ProtocolError("binary_frame", "frames must be JSON text frames")
            frame = p.decode(text)
            await self._dispatch(conn, frame)
        except p.ProtocolError as exc:
            await self._bad_frame(conn, exc)

    async def _bad_frame(self, conn: Connection, exc: p.ProtocolError) -> None:
        """One policy for a bad frame: answer an ``error`` frame and keep the session;
        log once per code per interval; close (4007) a client past its allowance."""
        now = time.monotonic()
        if not conn.spend_bad_frame(now):
            counts = conn.bad_log.pending()
            counts[exc.code] = counts.get(exc.code, 0) + 1
            log.warning(
                "closing client that sends too many bad frames",
                extra=kv(kind=conn.kind, client=conn.name, unlogged=counts),
            )
            await self._close(conn, p.CLOSE_BAD_FRAMES, "too many bad frames")
            return
        # no configVersion: an error changes nothing the client holds
        if not conn.enqueue(p.encode("error", p.ErrorReport(exc.code, exc.message).to_wire())):
            self._too_slow(conn)
        due, unlogged = conn.bad_log.due(exc.code, now)
        if due:
            log.info(
                "bad frame from client",
                extra=kv(
                    kind=conn.kind,
                    client=conn.name,
                    code=exc.code,
                    reason=exc.message,
                    since_last_logged=unlogged,
                ),
            )

    async def _dispatch(self, conn: Connection, frame: p.Frame) -> None:
        if frame.type == "heartbeat":
            beat = p.parse_heartbeat(frame.data)
            if beat.config_version != conn.config_version:
                log.info(
                    "client config is stale, resending",
                    extra=kv(client=conn.name, have=beat.config_version, want=conn.config_version),
                )
                with replaying():  # its own config only: nothing for the other replicas
                    await self.push_config(conn.kind, [conn.client_id])
        elif frame.type == "status" and conn.kind == "agent":
            entries = p.parse_status(frame.data)
            await self.store.record_health(
                conn.client_id, [(e.tunnel_id, e.health, e.detail) for e in entries]
            )
            for e in entries:
                self.events.publish("health", id=e.tunnel_id, health=e.health, detail=e.detail)
            changed = await self.store.record_replica_health(
                conn.client_id, [(e.tunnel_id, e.health, e.detail) for e in entries]
            )
            if changed:
                await self._push_replicas(changed)
        elif frame.type == "stats":
            stats = p.parse_stats(frame.data)
            now = time.time()
            self.traffic.handshakes(stats.peers, now)
            if conn.kind == "gateway" and stats.tunnels:
                known = {t["id"] for t in await self._snapshot("tunnels")}
                for tunnel_id in self.traffic.record(stats.tunnels, known, now):
                    totals = self.traffic.totals(tunnel_id, now)
                    self.events.publish(
                        "traffic",
                        id=tunnel_id,
                        requests=totals.requests,
                        errors=totals.errors,
                        bytes_in=totals.bytes_in,
                        bytes_out=totals.bytes_out,
                    )
        elif frame.type == "certificate_obtained" and conn.kind == "gateway":
            cert = p.parse_certificate_obtained(frame.data)
            tunnels = await self.store.all_tunnels()
            if not any(t["domain"] == cert.domain for t in tunnels):
                raise p.ProtocolError("unknown_domain", f"no tunnel uses {cert.domain!r}")
            try:
                # checked as an upload is (a bad one must not replace a good one and go
                # out to every gateway); the expiry stored is the leaf's own
                not_after = certs.verify(cert.domain, cert.certificate, cert.private_key)
            except certs.CertificateError as exc:
                raise p.ProtocolError("invalid_certificate", str(exc)) from None
            async with self.lock:
                await self.store.upsert_certificate(
                    cert.domain, cert.certificate, cert.private_key, not_after, "acme"
                )
                # its order is over from the moment it is stored (before the push)
                self.acme.obtained(conn.client_id, cert.domain, cert.lease)
                await self.push_config_locked("gateway")
            log.info("certificate stored", extra=kv(domain=cert.domain, gateway=conn.name))
        elif frame.type.startswith("acme_") and conn.kind == "gateway":
            await self.acme.handle(conn.client_id, conn.name, frame)
        elif frame.type == "error":
            # the client could not use something we sent (it keeps its last good view)
            report = p.parse_error(frame.data)
            due, unlogged = conn.reported_log.due(report.code)
            if due:
                log.warning(
                    "client reports an error",
                    extra=kv(
                        kind=conn.kind,
                        client=conn.name,
                        code=report.code,
                        reason=report.message,
                        since_last_logged=unlogged,
                    ),
                )
        elif frame.type == "share_link_used" and conn.kind == "gateway":
            used = p.parse_share_link_used(frame.data)
            async with self.lock:
                link = await self.store.use_share_link(used.tunnel_id, used.link_id)
                if link is not None and link["max_uses"] is not None:
                    # the link's remaining uses go to every gateway
                    await self.push_config_locked("gateway")
        elif frame.type in ("status", "certificate_obtained", "share_link_used", "auth"):
            raise p.ProtocolError(
                "unexpected_type", f"'{frame.type}' is not accepted from this {conn.kind} now"
            )
        else:
            raise p.ProtocolError("unknown_type", f"unknown frame type {frame.type[:64]!r}")

    # -- sending ----------------------------------------------------------------------

    async def _write_loop(self, conn: Connection) -> None:
        try:
            while True:
                frame = await conn.queue.get()
                if frame is None:
                    return
                await conn.ws.send_text(frame)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the reader side notices and cleans up
        except Exception:
            log.exception("writer failed", extra=kv(client=conn.name))

    def _send(self, conn: Connection, type_: str, data: object) -> None:
        """Send one frame to one client under a fresh version."""
        conn.config_version = self._next_version()
        if not conn.enqueue(p.encode(type_, data, conn.config_version)):
            self._too_slow(conn)

    def _send_unversioned(self, gateway_id: str, type_: str, data: dict[str, Any]) -> bool:
        """An ``acme_*`` frame to one gateway: no configVersion (it changes nothing of
        the configuration a heartbeat compares); False if it is not connected."""
        conn = self.connections.get(("gateway", gateway_id))
        if conn is None or conn.closing:
            return False
        if not conn.enqueue(p.encode(type_, data)):
            self._too_slow(conn)
            return False
        return True

    def _gateway_names(self) -> dict[str, str]:
        return {c.client_id: c.name for c in self.connected("gateway")}

    async def _acme_rows(self) -> tuple[list[Row], list[Row]]:
        return await self._snapshot("tunnels"), await self._snapshot("certificates")

    def _broadcast(self, conns: list[Connection], type_: str, data: object) -> None:
        """Send the same frame to many clients: one version, one encoding."""
        if not conns:
            return
        version = self._next_version()
        frame = p.encode(type_, data, version)
        for conn in conns:
            conn.config_version = version
            if not conn.enqueue(frame):
                self._too_slow(conn)

    def _too_slow(self, conn: Connection) -> None:
        if conn.closing:
            return
        log.warning("client too slow, closing", extra=kv(kind=conn.kind, client=conn.name))
        task = asyncio.get_running_loop().create_task(
            self._close(conn, p.CLOSE_TOO_SLOW, "client too slow; reconnect to re-sync")
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _safe_close(self, ws: WebSocket, code: int, reason: str) -> None:
        # a close reason holds at most 123 bytes of UTF-8 (RFC 6455 5.5): cut by bytes
        reason = reason.encode()[:123].decode("utf-8", "ignore")
        if ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT)

    async def _close(self, conn: Connection, code: int, reason: str) -> None:
        if conn.closing:
            return
        # out of the registry at once: a client told it is too slow (or closed for
        # bad frames) is offline now, gets no pushes, and a reconnect is not "replacing"
        await self._unregister(conn)
        if conn.writer is not None:
            conn.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.writer
        await self._safe_close(conn.ws, code, reason)

    async def _unregister(self, conn: Connection) -> None:
        conn.closing = True
        if conn.writer is not None and not conn.writer.done():
            conn.writer.cancel()
        if self.connections.get((conn.kind, conn.client_id)) is conn:
            del self.connections[(conn.kind, conn.client_id)]
            self.cluster.disconnected(conn.kind, conn.client_id)
            with contextlib.suppress(Exception):  # the client may have been deleted
                await self.seen_writer.touch(conn.kind, conn.client_id, conn.last_seen_wall)
            log.info("client disconnected", extra=kv(kind=conn.kind, client=conn.name))
            if conn.kind == "gateway":
                self.acme.gateway_gone(conn.client_id)
            self.events.publish("presence", kind=conn.kind, id=conn.client_id, online=False)
            if conn.kind == "agent" and not self._shutting_down:
                self._replica_presence(conn.client_id, False)

    # -- pushes -----------------------------------------------------------------------

    def presence(self, kind: ClientKind, client_id: str) -> tuple[bool, float | None]:
        """(online, last seen wall time) as the hub knows it right now."""
        conn = self.connections.get((kind, client_id))
        if conn is None or conn.closing:
            # connected to another replica: online, last seen as stored
            return self.cluster.remote_online(kind, client_id), None
        return True, conn.last_seen_wall

    def connected(self, kind: ClientKind, ids: Iterable[str] | None = None) -> list[Connection]:
        if ids is None:
            return [c for (k, _), c in self.connections.items() if k == kind and not c.closing]
        found = (self.connections.get((kind, i)) for i in ids)
        return [c for c in found if c is not None and not c.closing]

    async def _build_configs(
        self, kind: ClientKind, conns: list[Connection], known: dict[str, Row] | None = None
    ) -> dict[Connection, dict[str, Any]]:
        """Each connection's full config.  ``known``: the agents' rows, read since the
        store's last write (an authentication's own look-up), so none is read again."""
        gateways = await self._snapshot("gateways")
        tunnels = await self._snapshot("tunnels")
        if kind == "agent":
            if known is not None and all(c.client_id in known for c in conns):
                rows = known
            elif len(conns) > 8:
                rows = {r["id"]: r for r in await self._snapshot("agents")}
            else:
                ids = [c.client_id for c in conns]
                rows = {r["id"]: r for r in await self.store.clients_by_id(kind, ids)}
            if self._agent_tunnels is None or self._agent_tunnels.tunnels is not tunnels:
                self._agent_tunnels = AgentTunnels(tunnels)
            served = self._agent_tunnels
            return {
                conn: agent_config(
                    self.store, rows[conn.client_id], gateways, served.of(conn.client_id)
                ).to_wire()
                for conn in conns
                if conn.client_id in rows and rows[conn.client_id]["enabled"]
            }
        agents = await self._snapshot("agents")
        certificates = await self._snapshot("certificates")
        policies = await self._policies()
        keys = await self._session_keys()
        common = self._gateway_common
        if common is None or not common.same(tunnels, certificates, policies, keys):
            common = self._gateway_common = GatewayCommon(tunnels, certificates, policies, keys)
        gateway_rows = {r["id"]: r for r in gateways}
        return {
            conn: common.gateway_wire(self.store, gateway_rows[conn.client_id], agents)
            for conn in conns
            if conn.client_id in gateway_rows and gateway_rows[conn.client_id]["enabled"]
        }

    async def _policies(self) -> tuple[p.AccessPolicy, ...]:
        """Every tunnel's access policy as gateways get it (``control/access.py``).  A
        stored policy that does not build is sent as one that refuses everybody: a
        gateway must never take a broken policy for no policy (fail closed)."""
        generation = self.store.generation
        cached = self._policy_cache
        if cached is not None and cached[0] == generation:
            return cached[1]
        links: dict[str, list[Row]] = {}
        for link in await self.store.share_links():
            links.setdefault(link["tunnel_id"], []).append(link)
        policies = []
        for row in await self.store.all_access():
            try:
                policies.append(policy_spec(row, links.get(row["tunnel_id"], [])))
            except (p.ProtocolError, ValueError, KeyError, TypeError) as exc:
                log.error(
                    "stored access policy does not build; its tunnel refuses everybody",
                    extra=kv(tunnel=row["tunnel_id"], error=str(exc)[:200]),
                )
                policies.append(
                    p.AccessPolicy(row["tunnel_id"], row["epoch"], ip_deny=("0.0.0.0/0", "::/0"))
                )
        result = tuple(policies)
        self._policy_cache = (generation, result)
        return result

    async def _session_keys(self) -> tuple[p.SessionKey, ...]:
        if self._keys is None:
            self._keys = tuple(p.SessionKey(i, s) for i, s in await self.store.session_keys())
        return self._keys

    async def push_config(self, kind: ClientKind, ids: Iterable[str] | None = None) -> int:
        """Send a fresh full ``config`` to connected clients of one kind."""
        async with self.lock:
            return await self.push_config_locked(kind, ids)

    async def push_config_locked(self, kind: ClientKind, ids: Iterable[str] | None = None) -> int:
        """``push_config`` for a caller that already holds ``lock``."""
        assert self.lock.locked()
        ids = None if ids is None else list(ids)
        self._publish(config_change(kind, ids))
        conns = self.connected(kind, ids)
        if not conns:
            return 0
        configs = await self._build_configs(kind, conns)
        for conn, config in configs.items():
            if not conn.closing:
                self._send(conn, "config", config)
        return len(configs)

    def schedule_config_push(self, kind: ClientKind) -> None:
        """Coalesce peer-change pushes: many agents registering at once (a Control
        restart, a fleet roll-out) cost each gateway one config, not one per agent."""
        if kind in self._pending_push:
            return
        self._pending_push.add(kind)

        async def later() -> None:
            await asyncio.sleep(self.coalesce_delay)
            self._pending_push.discard(kind)
            try:
                await self.push_config(kind)
            except Exception:
                log.exception("config push failed", extra=kv(kind=kind))

        task = asyncio.get_running_loop().create_task(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def tunnel_event(self, type_: str, tunnel: Row, agent_ids: Iterable[str]) -> None:
        """Push ``tunnel_create/update/delete`` to the owning agent(s) and every gateway.

        Call with ``lock`` held, right after the change committed."""
        agent_ids = list(agent_ids)
        self._publish(tunnel_change(type_, tunnel["id"], tunnel["agent_id"], agent_ids))
        if type_ == "tunnel_delete":
            data: dict[str, Any] = p.TunnelDelete(tunnel["id"], tunnel["agent_id"]).to_wire()
        else:
            data = tunnel_wire(tunnel)
        self._broadcast(self.connected("agent", agent_ids) + self.connected("gateway"), type_, data)
        self.acme.wake()  # a domain may need a certificate now

    def tunnel_changed(self, before: Row, after: Row) -> None:
        """A tunnel was updated: ``tunnel_delete`` to the agents that no longer serve it,
        ``tunnel_create`` to those that now do, ``tunnel_update`` to the others and
        every gateway.  Call with ``lock`` held, right after the change committed."""
        old, new = tunnel_agents(before), tunnel_agents(after)
        if len(old) == 1 and len(new) == 1 and old != new:
            self.agent_moved_tunnel(before, after)
            return
        gone = [a for a in old if a not in new]
        if gone:
            data = p.TunnelDelete(after["id"], after["agent_id"]).to_wire()
            self._broadcast(self.connected("agent", gone), "tunnel_delete", data)
        added = [a for a in new if a not in old]
        if added:
            self._broadcast(self.connected("agent", added), "tunnel_create", tunnel_wire(after))
        if gone or added:  # those connected to another Control replica: a full config there
            self._publish(config_change("agent", gone + added))
        self.tunnel_event("tunnel_update", after, [a for a in new if a in old])

    def _replica_presence(self, agent_id: str, online: bool) -> None:
        """An agent connected or left: its replicas' health (``offline`` while it is
        away) is stored and pushed to the gateways, in the background in the order the
        events came (the latest one wins for an agent that came and went meanwhile)."""
        self._presence_wanted[agent_id] = online
        if self._presence_task is None or self._presence_task.done():
            self._presence_task = asyncio.get_running_loop().create_task(self._presence_loop())
            self._background.add(self._presence_task)
            self._presence_task.add_done_callback(self._background.discard)

    async def _presence_loop(self) -> None:
        while self._presence_wanted:
            # everything wanted so far in one go (a storm: thousands of agents)
            wanted, self._presence_wanted = self._presence_wanted, {}
            for online in (True, False):
                agents = [a for a, o in wanted.items() if o is online]
                if not agents:
                    continue
                try:
                    changed = await self.store.set_replica_presence(agents, online)
                    if changed:
                        await self._push_replicas(changed)
                except Exception:
                    log.exception(
                        "storing replicas' presence failed",
                        extra=kv(agents=len(agents), first=agents[0], online=online),
                    )

    async def _push_replicas(self, tunnel_ids: Iterable[str]) -> None:
        """Tell the gateways about tunnels whose replicas' health changed."""
        async with self.lock:
            for tunnel_id in tunnel_ids:
                try:
                    row = await self.store.get_tunnel(tunnel_id)
                except NotFound:
                    continue
                self.tunnel_event("tunnel_update", row, [])
                for replica in row["replicas"]:
                    self.events.publish(
                        "replica",
                        id=tunnel_id,
                        agent=replica["agent_id"],
                        health=replica["health"] or "unknown",
                        draining=bool(replica["draining"]),
                    )

    def agent_moved_tunnel(self, before: Row, after: Row) -> None:
        """A tunnel changed owner: delete at the old agent, create at the new one."""
        self._publish(
            tunnel_change(
                "tunnel_update",
                after["id"],
                after["agent_id"],
                [before["agent_id"], after["agent_id"]],
            )
        )
        self._broadcast(
            self.connected("agent", [before["agent_id"]]),
            "tunnel_delete",
            p.TunnelDelete(before["id"], before["agent_id"]).to_wire(),
        )
        self._broadcast(
            self.connected("agent", [after["agent_id"]]), "tunnel_create", tunnel_wire(after)
        )
        self._broadcast(self.connected("gateway"), "tunnel_update", tunnel_wire(after))

    async def client_disabled(self, kind: ClientKind, client_id: str) -> None:
        """After an agent or gateway was disabled (committed): close its connection with
        4008 first, so it stops serving before its peers drop it, then send the other
        side configs without it (a gateway's: a disabled agent's tunnels as disabled)."""
        await self.disconnect(kind, client_id, p.CLOSE_DISABLED, f"{kind} disabled")
        await self.push_config("gateway" if kind == "agent" else "agent")

    async def disconnect(self, kind: ClientKind, client_id: str, code: int, reason: str) -> None:
        """Close a client's connection (deleted, or its key rotated), at whichever
        replica it is connected to."""
        self._publish(
            Change("disconnect", kind=kind, ids=(client_id,), code=code, reason=reason[:120])
        )
        conn = self.connections.get((kind, client_id))
        if conn is not None:
            await self._close(conn, code, reason)

    # -- changes committed by another replica (control.cluster) -------------------------

    def _publish(self, change: Change) -> None:
        """Tell the other replicas, unless this is one of their changes being replayed."""
        if not _replaying.get():
            self.cluster.publish(change)

    async def apply_change(self, change: Change) -> None:
        """Tell this replica's clients what another replica's clients were told, built
        from the database: tunnels are re-read (whatever order changes arrive in, the
        last one applied shows the committed state) and the agents concerned get a
        full config (it holds their tunnels, whoever serves them now)."""
        self.store.generation += 1  # the other replica wrote: cached rows are stale
        with replaying():
            async with self.lock:
                if change.what == "config" and change.kind in ("agent", "gateway"):
                    kind: ClientKind = "agent" if change.kind == "agent" else "gateway"
                    await self.push_config_locked(kind, change.ids)
                elif change.what == "disconnect" and change.kind in ("agent", "gateway"):
                    assert change.ids and change.code is not None
                    kind = "agent" if change.kind == "agent" else "gateway"
                    await self.disconnect(kind, change.ids[0], change.code, change.reason or "")
                elif change.what == "tunnel" and change.tunnel_id is not None:
                    row = await self.store.find_tunnel(change.tunnel_id)
                    gateways = self.connected("gateway")
                    if row is None:  # deleted (by this change or a later one)
                        owner = change.agent_id or ""
                        data = p.TunnelDelete(change.tunnel_id, owner).to_wire()
                        self._broadcast(gateways, "tunnel_delete", data)
                    else:
                        self._broadcast(gateways, change.event or "tunnel_update", tunnel_wire(row))
                    await self.push_config_locked("agent", change.ids)

    async def resync(self) -> None:
        """Every client of this replica gets a full config built from the database."""
        self.store.generation += 1
        async with self.lock:
            with replaying():
                await self.push_config_locked("gateway")
                await self.push_config_locked("agent")

    def remote_presence(self, kind: str, client_id: str, online: bool) -> None:
        """A client connected to, or left, another replica (for the dashboard's pages)."""
        if (kind, client_id) not in self.connections:
            self.events.publish("presence", kind=kind, id=client_id, online=online)

    # -- liveness ---------------------------------------------------------------------

    async def _flush_last_seen(self) -> None:
        kinds: tuple[ClientKind, ...] = ("agent", "gateway")
        for kind in kinds:
            seen = [(c.client_id, c.last_seen_wall) for c in self.connected(kind)]
            if seen:
                await self.store.touch_many(kind, seen)

    async def _monitor_loop(self) -> None:
        interval = max(0.05, min(5.0, self.offline_after / 4))
        flush_every = 10.0
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                now = time.monotonic()
                for conn in list(self.connections.values()):
                    if not conn.closing and now - conn.last_seen > self.offline_after:
                        log.warning(
                            "no heartbeat, marking offline",
                            extra=kv(
                                kind=conn.kind,
                                client=conn.name,
                                silent_s=round(now - conn.last_seen, 1),
                            ),
                        )
                        await self._close(conn, p.CLOSE_HEARTBEAT_TIMEOUT, "no heartbeat")
                        await self._unregister(conn)
                if now - last_flush >= flush_every:
                    last_flush = now
                    await self._flush_last_seen()
            except Exception:
                log.exception("monitor pass failed")
