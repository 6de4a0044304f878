"""The hub's front door for a reconnect storm: a bounded number of authentications at
once, their API-key look-ups and ``auth`` writes batched.

After a Control restart (or a replica's death) thousands of gateways and agents
reconnect within seconds.  Three things keep that fast and bounded:

* **Admission.**  A connection is *admitted* from its upgrade request until it is
  registered (or refused); at most ``limit`` are admitted at once.  One more is
  refused before the upgrade with HTTP 503 and ``Retry-After: N`` (where the server
  cannot answer before the upgrade: accepted and closed with ``CLOSE_TRY_AGAIN``
  (1013) and ``retry after N``), N its slot on :class:`Admission`'s schedule.  A
  refusal so costs a fraction of a connection.  Clients wait N plus a little jitter
  (``common.controlclient``), so a crowd turned away comes back spread over the time
  the hub needs for it instead of all at once.
* **Batched look-ups and writes.**  Concurrent ``auth`` frames wait for one query
  (``WHERE api_key_hash IN (...)``, at most ``BATCH`` keys) instead of one query each;
  the next batch gathers while a query runs.  What they report that changed (a new
  WireGuard key, a gateway's endpoint) is written the same way (:class:`AuthRecorder`).

* **A relaxed garbage collector** (:func:`relax_gc`): the default thresholds cost a
  third of Control's CPU in a storm.

Sans-IO where it can be: :class:`Admission` takes the current time from its caller.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections import deque
from typing import Any, Generic, Literal, TypeVar

from common.protocol import Auth
from control.db.store import ClientKind, Row, Store, auth_changes, hash_key

#: default cap on connections authenticating at once (``--auth-queue``).  A refusal
#: costs nearly what an admission does (TCP and HTTP handshakes on both sides) and the
#: refused come back anyway, so the cap is for a crowd beyond a whole large fleet, not
#: for pacing: 10,000 agents after a restart, all admitted, had their configs within
#: 10.3 s on a 2-core machine, none waiting more than 3.5 s from ``auth`` to its
#: answer (clients give up after 10 s); refusing 9,000 of them took three times as
#: long.  An admitted connection holds about 33 KiB.
DEFAULT_LIMIT = 10_000
#: keys per look-up query
BATCH = 500
#: how far back the finishing rate is measured (seconds)
RATE_WINDOW = 2.0
#: the rate assumed while none has been measured yet (authentications a second): a
#: crowd arriving at a fresh start is spread as if the hub managed this many
ASSUMED_RATE = 500.0
#: the lowest rate a wait is estimated from: a stalled second must not send a whole
#: crowd away for the longest wait
FLOOR_RATE = 50.0
#: authentications finished in the window before their rate is believed
MIN_SAMPLES = 8
#: the longest wait a refusal asks for (seconds)
MAX_RETRY_AFTER = 30


class Admission:
    """Counts connections being authenticated; says how long a refused one should wait.

    Waits are handed out as slots on a schedule: the first refused client is told the
    time the admitted ones take to finish, each further one ``1 / rate`` later, so a
    crowd refused at one instant is told 1, 1, ..., 2, 2, ..., N seconds and comes back
    spread over the time the hub needs for it, not all at the end of the longest wait.
    The rate is the one measured over the last ``RATE_WINDOW`` seconds (over the time
    since the hub got busy, when that is shorter), never below ``FLOOR_RATE``; while
    fewer than ``MIN_SAMPLES`` finished in that window (a fresh start, a stall), the
    last rate measured, else ``ASSUMED_RATE``.  Never a blanket longest wait.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT, assumed_rate: float = ASSUMED_RATE) -> None:
        if limit < 1:
            raise ValueError("the authentication queue must hold at least 1")
        if assumed_rate <= 0:
            raise ValueError("the assumed rate must be positive")
        self.limit = limit
        self.admitted = 0
        #: connections refused since start (for /metrics and logs)
        self.refused = 0
        #: the rate waits are estimated from while there is no measurement
        self.assumed_rate = assumed_rate
        self._finished: deque[float] = deque()
        #: when the hub last went from idle to busy (rates are measured since then)
        self._busy_since: float | None = None
        #: when the last client given a wait is expected to be taken in
        self._horizon = 0.0

    def enter(self, now: float | None = None) -> bool:
        """Admit one more connection; False (nothing taken) when ``limit`` are in.
        ``now`` (optional) marks the start of a busy period for the rate estimate."""
        if self.admitted >= self.limit:
            self.refused += 1
            return False
        if self.admitted == 0 and now is not None and not self._recent(now):
            self._busy_since = now
        self.admitted += 1
        return True

    def leave(self, now: float) -> None:
        """An admitted connection is registered, refused or gone."""
        self.admitted = max(0, self.admitted - 1)
        self._finished.append(now)
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._finished and now - self._finished[0] > RATE_WINDOW:
            self._finished.popleft()

    def _recent(self, now: float) -> bool:
        self._expire(now)
        return bool(self._finished)

    def rate(self, now: float) -> float:
        """Authentications a second to plan with (at least ``FLOOR_RATE``)."""
        self._expire(now)
        if len(self._finished) < MIN_SAMPLES:
            return self.assumed_rate
        since = self._busy_since if self._busy_since is not None else self._finished[0]
        span = min(RATE_WINDOW, max(now - since, RATE_WINDOW / 8))
        # remembered: the next storm (nothing finished lately) starts from it
        self.assumed_rate = max(FLOOR_RATE, len(self._finished) / span)
        return self.assumed_rate

    def retry_after(self, now: float) -> int:
        """Seconds a refused client should wait (1 .. ``MAX_RETRY_AFTER``): its slot
        after the admitted ones and the clients refused before it."""
        rate = self.rate(now)
        slot = max(self._horizon, now + self.admitted / rate) + 1 / rate
        self._horizon = min(slot, now + MAX_RETRY_AFTER)
        return max(1, min(MAX_RETRY_AFTER, math.ceil(slot - now)))


#: allocations between young-generation collections while the hub runs (CPython's
#: default is 700); see :func:`relax_gc`
GC_YOUNG_THRESHOLD = 50_000
_gc_relaxed = False


def relax_gc() -> None:
    """Make the cyclic garbage collector cheap enough for a reconnect storm.

    Profiling a storm of 2,000 connections (``bench/test_hub_cluster_bench.py``) showed
    a third of Control's CPU in collections: each connection allocates thousands of
    objects (protocol, transport, tasks, headers), so CPython's default thresholds
    (700, 10, 10) run a young collection every few connections and a full one, over
    every object of every import and connection, every few hundred.  Once per process:
    collect, then freeze what exists (the modules and the app, alive for good) so full
    collections skip it, and collect the young generation every ``GC_YOUNG_THRESHOLD``
    allocations.  Reference counting still frees nearly everything at once; only
    cycles wait a little longer.
    """
    global _gc_relaxed
    if _gc_relaxed:
        return
    _gc_relaxed = True
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, max(middle, 20), max(old, 10))


T = TypeVar("T")


def _fail(futures: list[asyncio.Future[Any]], exc: BaseException) -> None:
    """A batch's query failed: every waiter gets the error (a cancellation of the
    worker is passed to them as an error and raised on)."""
    for future in futures:
        if not future.done():
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
    if not isinstance(exc, Exception):
        raise exc


class KeyLookup:
    """API key -> client row, many keys per query."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiting: dict[ClientKind, dict[str, list[asyncio.Future[Row | None]]]] = {
            "agent": {},
            "gateway": {},
        }
        self._worker: asyncio.Task[None] | None = None
        #: queries run and keys looked up (the ratio is the batching)
        self.queries = 0
        self.keys = 0

    async def lookup(self, kind: Literal["agent", "gateway"], key: str) -> Row | None:
        future: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        self._waiting[kind].setdefault(hash_key(key), []).append(future)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return await future

    async def _work(self) -> None:
        while any(self._waiting.values()):
            for kind in ("agent", "gateway"):
                waiting = self._waiting[kind]
                if not waiting:
                    continue
                hashes = list(waiting)[:BATCH]
                batch = {h: waiting.pop(h) for h in hashes}
                try:
                    rows = await self.store.clients_by_key_hashes(kind, hashes)
                except BaseException as exc:
                    _fail([f for futures in batch.values() for f in futures], exc)
                    continue
                self.queries += 1
                self.keys += len(hashes)
                found = {row["api_key_hash"]: row for row in rows}
                for digest, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            # each waiter its own copy: callers may change theirs
                            row = found.get(digest)
                            future.set_result(None if row is None else dict(row))


class _Batched(Generic[T]):
    """Items written for many callers at once: those arriving while a write runs are
    written together by the next one (at most ``BATCH`` per write), instead of one
    transaction each queued behind the store's write lock.  Each caller returns once
    its own item is written, or gets the write's error."""

    def __init__(self) -> None:
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._worker: asyncio.Task[None] | None = None
        #: transactions run and items written (the ratio is the batching)
        self.writes = 0
        self.rows = 0

    async def _submit(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        await future

    async def _write(self, items: list[T]) -> None:
        raise NotImplementedError

    async def _work(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:BATCH], self._waiting[BATCH:]
            try:
                await self._write([item for item, _ in batch])
            except BaseException as exc:
                _fail([future for _, future in batch], exc)
                continue
            self.writes += 1
            self.rows += len(batch)
            for _, future in batch:
                if not future.done():
                    future.set_result(None)


class AuthRecorder(_Batched[tuple[ClientKind, str, Row, bool]]):
    """What clients report at ``auth`` (their WireGuard key, a gateway's endpoint, the
    version), written for many clients per transaction.

    A client that reconnects as it was costs nothing here (``auth_changes`` finds
    nothing to write).  A new fleet's first connections each change their row: those
    arriving while a write runs are written together by the next one.
    """

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    async def record(self, kind: ClientKind, row: Row, auth: Auth) -> bool:
        """``Store.record_auth``, batched: True if the client's peers must be told.
        ``row`` (the caller's own copy) is updated to what was written."""
        values, peers_affected = auth_changes(kind, row, auth)
        if not values:
            return False
        await self._submit((kind, row["id"], values, peers_affected))
        row.update(values)
        return peers_affected

    async def _write(self, items: list[tuple[ClientKind, str, Row, bool]]) -> None:
        await self.store.record_auths(
            [(kind, client_id, values) for kind, client_id, values, _ in items],
            invalidates=any(affected for *_, affected in items),
        )


class SeenWriter(_Batched[tuple[ClientKind, str, float]]):
    """When each ending connection was last seen (``Store.touch_many``), written for
    many at once: connections end in crowds too (a network blip, a load balancer
    restarting), and one statement each queued them all behind the write lock."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    async def touch(self, kind: ClientKind, client_id: str, seen: float) -> None:
        await self._submit((kind, client_id, seen))

    async def _write(self, items: list[tuple[ClientKind, str, float]]) -> None:
        by_kind: dict[ClientKind, list[tuple[str, float]]] = {}
        for kind, client_id, seen in items:
            by_kind.setdefault(kind, []).append((client_id, seen))
        for kind, rows in by_kind.items():
            await self.store.touch_many(kind, rows)
