"""The hub's front door for a reconnect storm: a bounded number of authentications at
once, and their API-key look-ups batched.

After a Control restart (or a replica's death) thousands of gateways and agents
reconnect within seconds.  Two things keep that fast and bounded:

* **Admission.**  A connection is *admitted* from its upgrade until it is registered
  (or refused); at most ``limit`` are admitted at once.  One more is accepted and at
  once closed with ``CLOSE_TRY_AGAIN`` (1013) and a reason naming the seconds to wait
  (``retry after N``), N estimated from the queue and the rate authentications finish
  at.  Clients wait that long plus jitter (``common.controlclient``), so a crowd
  turned away comes back spread out instead of all at once.
* **Batched look-ups.**  Concurrent ``auth`` frames wait for one query
  (``WHERE api_key_hash IN (...)``, at most ``BATCH`` keys) instead of one query each;
  the next batch gathers while a query runs.

Sans-IO where it can be: :class:`Admission` takes the current time from its caller.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Literal

from control.db.store import ClientKind, Row, Store, hash_key

#: default cap on connections authenticating at once (``--auth-queue``)
DEFAULT_LIMIT = 1000
#: keys per look-up query
BATCH = 500
#: how far back the finishing rate is measured (seconds)
RATE_WINDOW = 2.0
#: the longest wait a refusal asks for (seconds)
MAX_RETRY_AFTER = 30


class Admission:
    """Counts connections being authenticated; says how long a refused one should wait."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("the authentication queue must hold at least 1")
        self.limit = limit
        self.admitted = 0
        #: connections refused since start (for /metrics and logs)
        self.refused = 0
        self._finished: deque[float] = deque()

    def enter(self) -> bool:
        """Admit one more connection; False (nothing taken) when ``limit`` are in."""
        if self.admitted >= self.limit:
            self.refused += 1
            return False
        self.admitted += 1
        return True

    def leave(self, now: float) -> None:
        """An admitted connection is registered, refused or gone."""
        self.admitted = max(0, self.admitted - 1)
        self._finished.append(now)
        while self._finished and now - self._finished[0] > RATE_WINDOW:
            self._finished.popleft()

    def retry_after(self, now: float) -> int:
        """Seconds a refused client should wait: the queue's length over the rate
        authentications finished at lately (1 .. ``MAX_RETRY_AFTER``)."""
        while self._finished and now - self._finished[0] > RATE_WINDOW:
            self._finished.popleft()
        rate = len(self._finished) / RATE_WINDOW
        if rate <= 0:
            return MAX_RETRY_AFTER if self.admitted >= self.limit else 1
        return max(1, min(MAX_RETRY_AFTER, math.ceil(self.admitted / rate)))


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
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(
                                    exc if isinstance(exc, Exception) else RuntimeError("cancelled")
                                )
                    if not isinstance(exc, Exception):
                        raise
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
