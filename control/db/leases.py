"""Leases in the database: at most one holder of a name at a time, for a while.

Several Control replicas share one database; a job that must run once (the presence
clean-up of dead replicas, expiry sweeps, one ACME order per domain) runs on the
replica holding its lease.  A lease is a row ``(name, holder, expires_at, fence)``:

* :meth:`Leases.acquire` takes a free or lapsed lease, or renews one the caller
  already holds, in one conditional ``UPDATE`` (``INSERT`` the first time).  Two
  replicas racing for a lapsed lease both run the ``UPDATE``; the database's row
  lock makes the second re-check the condition against the first's new row, so it
  matches nothing.  The loser gets ``None``.
* ``fence`` grows every time the lease changes hands: work that outlives its lease
  (a holder paused longer than the lease) can be refused by comparing fences.
* Times come from the database's clock, never from the replicas' own clocks, so
  replicas with skewed clocks still agree on when a lease lapses.
* :meth:`Leases.release` gives a lease up at once (clean shutdown): the next
  ``acquire`` by anyone succeeds without waiting for it to lapse.

Generic on purpose: the names are the callers' (``control-jobs`` for the cluster's
once-only jobs; ``acme:<domain>`` for one ACME order per domain across replicas,
``control/acme_cluster.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.db.schema import leases

#: longest lease name (the column's size)
MAX_NAME = 128
#: longest holder id
MAX_HOLDER = 64


def db_now(dialect: str) -> sa.ColumnElement[Any]:
    """The database's clock as float seconds since the Unix epoch."""
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Float)
    # SQLite: julianday() has millisecond precision
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


@dataclass(frozen=True)
class LeaseState:
    """A lease as stored: its holder (None: released), expiry and fence."""

    name: str
    holder: str | None
    expires_at: float
    fence: int
    acquired_at: float
    #: the database's clock when this was read
    now: float

    @property
    def held(self) -> bool:
        return self.holder is not None and self.expires_at > self.now


class Leases:
    """Take, renew, release and read leases (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._now = db_now(engine.dialect.name)

    @staticmethod
    def _check(name: str, holder: str | None = None) -> None:
        if not name or len(name) > MAX_NAME:
            raise ValueError(f"lease name must be 1..{MAX_NAME} characters")
        if holder is not None and (not holder or len(holder) > MAX_HOLDER):
            raise ValueError(f"lease holder must be 1..{MAX_HOLDER} characters")

    async def acquire(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew ``name`` for ``ttl`` seconds; its fence if ``holder`` holds it
        now, None if someone else does."""
        self._check(name, holder)
        if not 0 < ttl <= 86400:
            raise ValueError("lease ttl must be in (0, 86400] seconds")
        now = self._now
        mine = leases.c.holder == holder
        async with self.engine.begin() as conn:
            result = await conn.execute(
                leases.update()
                .where(
                    leases.c.name == name,
                    sa.or_(mine, leases.c.holder.is_(None), leases.c.expires_at < now),
                )
                .values(
                    holder=holder,
                    expires_at=now + ttl,
                    fence=sa.case((mine, leases.c.fence), else_=leases.c.fence + 1),
                    acquired_at=sa.case((mine, leases.c.acquired_at), else_=now),
                )
            )
            if result.rowcount:
                return await self._fence(conn, name, holder)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    leases.insert().values(
                        name=name,
                        holder=holder,
                        expires_at=sa.select(now + ttl).scalar_subquery(),
                        fence=1,
                        acquired_at=sa.select(now).scalar_subquery(),
                    )
                )
        except IntegrityError:
            return None  # it exists and someone else holds it
        return 1

    @staticmethod
    async def _fence(conn: AsyncConnection, name: str, holder: str) -> int | None:
        fence = await conn.scalar(
            sa.select(leases.c.fence).where(leases.c.name == name, leases.c.holder == holder)
        )
        return None if fence is None else int(fence)

    async def release(self, name: str, holder: str) -> bool:
        """Give up ``name`` if ``holder`` holds it; True if it did."""
        self._check(name, holder)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                leases.update()
                .where(leases.c.name == name, leases.c.holder == holder)
                .values(holder=None, expires_at=self._now)
            )
        return bool(result.rowcount)

    async def get(self, name: str) -> LeaseState | None:
        """The lease as stored now (None: never taken)."""
        self._check(name)
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(leases, self._now.label("now")).where(leases.c.name == name)
                )
            ).first()
        if row is None:
            return None
        return LeaseState(
            row.name, row.holder, row.expires_at, row.fence, row.acquired_at, float(row.now)
        )
