"""Several Control replicas on one PostgreSQL database.

Theory of operation
-------------------
Each replica gets a random id at start and registers in ``control_replicas``; a
heartbeat renews its row every ``timeout / 4`` seconds.  A replica whose row is older
than ``timeout`` is dead.

*Changes.*  The hub publishes a :class:`~control.cluster.changes.Change` for everything
its clients were told of, right after the commit.  A publisher task sends them in
order, packed into batches, with ``pg_notify`` on one dedicated asyncpg connection;
the same connection ``LISTEN``s, and every replica applies the batches of the others
in the order PostgreSQL delivers them (commit order), re-reading the database for each
(its caches dropped first).  So a change made on any replica reaches the clients of
every replica, each replica building its own clients' views.

*Nothing lost.*  A batch number that skips (batches dropped), a feed connection that
had to be re-opened (notifications sent meanwhile are not queued for us) or a replica
that died (it may have committed a change and died before publishing it) make every
replica send all its clients a full config: the database is the truth, and a full
config carries all of it.

*Presence.*  Which replica each client is connected to is kept in ``presence``,
written in batches (a reconnect storm costs a statement per batch, not per client)
followed by a ``presence`` change; the others re-read it (at most every
``PRESENCE_REFRESH`` seconds) and tell the hub, whose ``presence()`` answers online for
a client connected anywhere.  Rows of dead replicas do not count and are deleted by
the once-only jobs.

*Once-only jobs* run on the replica holding the ``control-jobs`` lease
(``control.db.leases``), renewed with the heartbeat; when its holder dies the lease
lapses after ``timeout`` seconds and another replica takes it over (a new fence).

*Shared ACME.*  The feed also carries the ACME coordinator's notes between replicas
(``acme`` changes, ``control/acme_cluster.py``): they go to the coordinator attached
with :meth:`PostgresCluster.attach_acme`, never to the hub; whenever this replica
re-syncs (notes may have been lost) the coordinator hears of it too, and after every
heartbeat it learns which replicas are alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from common.logs import kv
from control.cluster import DEFAULT_TIMEOUT, ChangeSink
from control.cluster.changes import AcmeListener, BadChange, Batch, Change, pack, parse_batch
from control.db.leases import Leases, db_now
from control.db.schema import admin_sessions, control_replicas, presence

log = logging.getLogger("control.cluster")

CHANNEL = "kakuremichi_changes"
#: the once-only jobs' lease
JOBS_LEASE = "control-jobs"
#: presence is written at most this often (seconds), in one batch
PRESENCE_FLUSH = 0.2
#: presence of the other replicas is re-read at most this often after a change
PRESENCE_REFRESH = 0.5
#: ... and at least this often
PRESENCE_FULL_REFRESH = 30.0
#: changes waiting for the feed connection; past it they are dropped for a resync
MAX_QUEUED = 10_000
#: the once-only jobs run this often on the lease holder
JOBS_INTERVAL = 30.0
#: rows of replicas dead for this long are deleted (with their presence)
FORGET_AFTER = 300.0


def asyncpg_dsn(engine: AsyncEngine) -> str:
    """The engine's URL as asyncpg takes it (``postgresql://``)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresCluster:
    """This replica's part in a cluster of Controls sharing one PostgreSQL database."""

    def __init__(self, engine: AsyncEngine, name: str = "", timeout: float = DEFAULT_TIMEOUT):
        self.engine = engine
        self.replica_id = str(uuid.uuid4())
        self.name = (name or socket.gethostname())[:255]
        self.timeout = timeout
        self.heartbeat = timeout / 4
        self.leases = Leases(engine)
        self.holds_jobs = False
        self.jobs_fence: int | None = None
        self._now = db_now("postgresql")
        self._sink: ChangeSink | None = None
        self._conn: asyncpg.Connection[Any] | None = None
        self._outbox: list[Change] = []
        self._outbox_ready = asyncio.Event()
        #: held while notifications go out: leaving waits for one in flight rather than
        #: cancel it half-way (which may send it anyway, then again under the same
        #: number, and leaves the feed connection unusable)
        self._send_lock = asyncio.Lock()
        self._overflowed = False
        self._seq = 0
        self._seen: dict[str, int] = {}
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._presence_pending: dict[tuple[str, str], float | None] = {}
        self._presence_ready = asyncio.Event()
        self._remote: set[tuple[str, str]] = set()
        self._refresh_wanted = asyncio.Event()
        self._live: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._acme: AcmeListener | None = None

    def attach_acme(self, listener: AcmeListener) -> None:
        """Hand ``acme`` changes, re-syncs and the live replicas to ``listener``."""
        self._acme = listener

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, sink: ChangeSink) -> None:
        self._sink = sink
        async with self.engine.begin() as conn:
            await conn.execute(
                control_replicas.insert().values(
                    id=self.replica_id,
                    name=self.name,
                    started_at=sa.select(self._now).scalar_subquery(),
                    heartbeat_at=sa.select(self._now).scalar_subquery(),
                )
            )
        await self._connect_feed()
        await self._refresh_presence()
        await self._beat()
        loop = asyncio.get_running_loop()
        for name, coro in (
            ("publisher", self._publisher()),
            ("receiver", self._receiver()),
            ("heartbeat", self._heartbeat_loop()),
            ("presence-writer", self._presence_writer()),
            ("presence-reader", self._presence_reader()),
        ):
            self._tasks.append(loop.create_task(coro, name=f"cluster-{name}"))
        log.info(
            "joined the Control cluster",
            extra=kv(replica=self.replica_id, name=self.name, replicas=len(self._live)),
        )

    async def close(self) -> None:
        """Leave: the last presence written, what is queued published, this replica's
        rows gone, the lease released (so another replica takes the jobs at once), the
        feed closed.  Where publishing fails the rows stay, to go stale: the others
        then take this replica for dead and re-sync their clients.  Once: a second
        call (the server's shutdown and the app's lifespan both close) does nothing."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_presence(), 5)
        sending = False
        with contextlib.suppress(TimeoutError):  # a notification in flight finishes
            sending = await asyncio.wait_for(self._send_lock.acquire(), 5)
        try:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            if sending:
                self._send_lock.release()
        self._tasks.clear()
        try:
            async with asyncio.timeout(5):
                # what is still queued goes out first: the others must not see this
                # replica gone (and skip their re-sync) before they saw its last changes
                await self._send_outbox()
                async with self.engine.begin() as conn:
                    await conn.execute(
                        presence.delete().where(presence.c.replica_id == self.replica_id)
                    )
                    await conn.execute(
                        control_replicas.delete().where(control_replicas.c.id == self.replica_id)
                    )
                if self.holds_jobs:
                    await self.leases.release(JOBS_LEASE, self.replica_id)
                self.publish(Change("presence"))
                await self._send_outbox()
        except Exception as exc:
            log.warning("leaving the cluster uncleanly", extra=kv(error=str(exc)[:200]))
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 5)
            self._conn = None

    # -- the feed ---------------------------------------------------------------------

    async def _connect_feed(self) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(self.engine), timeout=10)
        await conn.add_listener(CHANNEL, self._notified)
        self._conn = conn

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._inbox.put_nowait(payload)

    def publish(self, change: Change) -> None:
        """Queue ``change`` for the other replicas (never waits)."""
        if len(self._outbox) >= MAX_QUEUED:
            self._overflowed = True
            self._outbox.clear()
        self._outbox.append(change)
        self._outbox_ready.set()

    async def _send_outbox(self) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            raise ConnectionError("feed connection closed")
        if self._overflowed:
            self._overflowed = False
            self._outbox = [Change("resync")]
        while self._outbox:
            changes, self._outbox = self._outbox, []
            batches = pack(self.replica_id, self._seq + 1, changes)
            for index, batch in enumerate(batches):
                try:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, batch.encode())
                except BaseException:
                    # not sent: back to the front of the queue, in order
                    self._outbox = [c for b in batches[index:] for c in b.changes] + self._outbox
                    raise
                self._seq = batch.seq

    async def _publisher(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            try:
                async with self._send_lock:
                    await self._send_outbox()
            except Exception as exc:
                log.warning(
                    "change feed lost; reconnecting",
                    extra=kv(error=f"{type(exc).__name__}: {str(exc)[:200]}"),
                )
                await self._reconnect_feed()

    async def _reconnect_feed(self) -> None:
        """Open the feed again (retrying), then re-sync: notifications sent while it was
        closed are gone, and ours may have been lost with it."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()
            self._conn = None
        delay = 0.2
        while self._conn is None:
            try:
                await self._connect_feed()
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning(
                    "cannot reach the database for the change feed", extra=kv(error=str(exc)[:200])
                )
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        log.info("change feed back; re-syncing every client")
        self._outbox.insert(0, Change("resync"))
        self._outbox_ready.set()
        await self._resync()

    async def _receiver(self) -> None:
        while True:
            payload = await self._inbox.get()
            try:
                batch = parse_batch(payload)
            except BadChange as exc:
                log.warning("unreadable change from another replica", extra=kv(error=str(exc)))
                continue
            if batch.origin == self.replica_id:
                continue
            try:
                await self._apply(batch)
            except Exception:
                log.exception("applying a change from another replica failed; re-syncing")
                await self._resync()

    async def _apply(self, batch: Batch) -> None:
        last = self._seen.get(batch.origin)
        self._seen[batch.origin] = batch.seq
        if last is not None and batch.seq != last + 1:
            log.warning(
                "changes from another replica were lost; re-syncing every client",
                extra=kv(replica=batch.origin, expected=last + 1, got=batch.seq),
            )
            await self._resync()
            return
        assert self._sink is not None
        for change in batch.changes:
            if change.what == "presence":
                self._refresh_wanted.set()
            elif change.what == "acme":
                if self._acme is not None and change.acme is not None:
                    self._acme.acme_note(batch.origin, change.acme)
            elif change.what == "resync":
                await self._resync()
            else:
                await self._sink.apply_change(change)

    async def _resync(self) -> None:
        if self._acme is not None and not self._closing:
            self._acme.acme_resync()
        if self._sink is not None and not self._closing:
            await self._sink.resync()
        self._refresh_wanted.set()

    # -- heartbeat, dead replicas, the lease ------------------------------------------

    async def _beat(self) -> None:
        async with self.engine.begin() as conn:
            updated = await conn.execute(
                control_replicas.update()
                .where(control_replicas.c.id == self.replica_id)
                .values(heartbeat_at=self._now)
            )
            if not updated.rowcount:  # deleted as dead after a long pause: back again
                await conn.execute(
                    control_replicas.insert().values(
                        id=self.replica_id,
                        name=self.name,
                        started_at=sa.select(self._now).scalar_subquery(),
                        heartbeat_at=sa.select(self._now).scalar_subquery(),
                    )
                )
            # every row, and whether it beat recently: a replica that left cleanly
            # deleted its row after publishing all it had; one that died keeps its
            # row (stale) until the jobs forget it
            fresh = (control_replicas.c.heartbeat_at > self._now - self.timeout).label("fresh")
            rows = (await conn.execute(sa.select(control_replicas.c.id, fresh))).all()
        live = {row.id for row in rows if row.fresh}
        present = {row.id for row in rows}
        gone = self._live - live
        died, left = gone & present, gone - present
        self._live = live
        if self._acme is not None:
            self._acme.replicas_alive(live)
        if left:
            log.info(
                "a Control replica left; its clients will reconnect elsewhere",
                extra=kv(replicas=sorted(left), alive=len(live)),
            )
        if died:
            log.warning(
                "a Control replica stopped answering; its clients will reconnect elsewhere",
                extra=kv(replicas=sorted(died), alive=len(live)),
            )
            # it may have committed a change it never published
            await self._resync()
        fence = await self.leases.acquire(JOBS_LEASE, self.replica_id, self.timeout)
        if fence is not None and not self.holds_jobs:
            log.info("holding the lease for once-only jobs", extra=kv(fence=fence))
        elif fence is None and self.holds_jobs:
            log.warning("lost the lease for once-only jobs")
        self.holds_jobs = fence is not None
        self.jobs_fence = fence

    async def _heartbeat_loop(self) -> None:
        last_jobs = 0.0
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat()
                if self._conn is None or self._conn.is_closed():
                    await self._reconnect_feed()
                if self.holds_jobs and time.monotonic() - last_jobs >= JOBS_INTERVAL:
                    last_jobs = time.monotonic()
                    await self._run_jobs()
            except Exception as exc:
                log.warning(
                    "cluster heartbeat failed", extra=kv(error=f"{type(exc).__name__}: {exc}"[:200])
                )

    async def _run_jobs(self) -> None:
        """The once-only jobs: forget replicas long dead (their presence with them) and
        sessions that ended."""
        async with self.engine.begin() as conn:
            dead = (
                await conn.scalars(
                    sa.select(control_replicas.c.id).where(
                        control_replicas.c.heartbeat_at < self._now - FORGET_AFTER
                    )
                )
            ).all()
            if dead:
                await conn.execute(presence.delete().where(presence.c.replica_id.in_(dead)))
                await conn.execute(control_replicas.delete().where(control_replicas.c.id.in_(dead)))
            await conn.execute(
                admin_sessions.delete().where(admin_sessions.c.expires_at <= time.time())
            )
        if dead:
            log.info("forgot dead Control replicas", extra=kv(replicas=len(dead)))

    # -- presence ---------------------------------------------------------------------

    def connected(self, kind: str, client_id: str) -> None:
        self._presence_pending[(kind, client_id)] = time.time()
        self._presence_ready.set()

    def disconnected(self, kind: str, client_id: str) -> None:
        self._presence_pending[(kind, client_id)] = None
        self._presence_ready.set()

    def remote_online(self, kind: str, client_id: str) -> bool:
        return (kind, client_id) in self._remote

    async def _presence_writer(self) -> None:
        while True:
            await self._presence_ready.wait()
            await asyncio.sleep(PRESENCE_FLUSH)  # gather a batch
            self._presence_ready.clear()
            try:
                await self._flush_presence()
            except Exception as exc:
                log.warning("presence not written", extra=kv(error=str(exc)[:200]))
                await asyncio.sleep(1.0)
                self._presence_ready.set()

    async def _flush_presence(self) -> None:
        pending, self._presence_pending = self._presence_pending, {}
        if not pending:
            return
        ups = [
            {"kind": k, "client_id": c, "replica_id": self.replica_id, "connected_at": at}
            for (k, c), at in pending.items()
            if at is not None
        ]
        downs = [{"b_kind": k, "b_id": c} for (k, c), at in pending.items() if at is None]
        try:
            async with self.engine.begin() as conn:
                if ups:
                    statement = pg_insert(presence)
                    await conn.execute(
                        statement.on_conflict_do_update(
                            index_elements=[presence.c.kind, presence.c.client_id],
                            set_={
                                "replica_id": statement.excluded.replica_id,
                                "connected_at": statement.excluded.connected_at,
                            },
                        ),
                        ups,
                    )
                if downs:
                    await conn.execute(
                        presence.delete().where(
                            presence.c.kind == sa.bindparam("b_kind"),
                            presence.c.client_id == sa.bindparam("b_id"),
                            presence.c.replica_id == self.replica_id,
                        ),
                        downs,
                    )
        except BaseException:
            # not written: keep what is newer, put the rest back
            for key, value in pending.items():
                self._presence_pending.setdefault(key, value)
            raise
        self.publish(Change("presence"))

    async def _presence_reader(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_wanted.wait(), PRESENCE_FULL_REFRESH)
            self._refresh_wanted.clear()
            try:
                await self._refresh_presence()
            except Exception as exc:
                log.warning("presence not read", extra=kv(error=str(exc)[:200]))
            await asyncio.sleep(PRESENCE_REFRESH)

    async def _refresh_presence(self) -> None:
        query = (
            sa.select(presence.c.kind, presence.c.client_id)
            .join(control_replicas, control_replicas.c.id == presence.c.replica_id)
            .where(
                presence.c.replica_id != self.replica_id,
                control_replicas.c.heartbeat_at > self._now - self.timeout,
            )
        )
        async with self.engine.connect() as conn:
            remote = {(row.kind, row.client_id) for row in await conn.execute(query)}
        before, self._remote = self._remote, remote
        if self._sink is not None:
            for kind, client_id in remote - before:
                self._sink.remote_presence(kind, client_id, True)
            for kind, client_id in before - remote:
                self._sink.remote_presence(kind, client_id, False)
