"""Leases in the database (control/db/leases.py), on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from control.db.engine import create_engine, migrate
from control.db.leases import Leases
from tests.pgserver import PostgresServer, postgres

__all__ = ["postgres"]


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'l.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.database()
    engine = create_engine(url)
    await migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_one_holder_at_a_time(engine: AsyncEngine) -> None:
    leases = Leases(engine)
    assert await leases.acquire("jobs", "a", 30) == 1
    assert await leases.acquire("jobs", "b", 30) is None
    assert await leases.acquire("jobs", "a", 30) == 1  # renewal keeps the fence
    state = await leases.get("jobs")
    assert state is not None and state.holder == "a" and state.held
    assert 29 < state.expires_at - state.now <= 30
    assert await leases.acquire("other", "b", 30) == 1  # names are independent


async def test_lapsed_lease_moves_with_a_new_fence(engine: AsyncEngine) -> None:
    leases = Leases(engine)
    assert await leases.acquire("jobs", "a", 0.2) == 1
    assert await leases.acquire("jobs", "b", 5) is None
    for _ in range(100):
        await asyncio.sleep(0.05)
        fence = await leases.acquire("jobs", "b", 5)
        if fence is not None:
            break
    assert fence == 2
    assert await leases.acquire("jobs", "a", 5) is None  # the old holder lost it
    state = await leases.get("jobs")
    assert state is not None and state.holder == "b"


async def test_release_frees_at_once(engine: AsyncEngine) -> None:
    leases = Leases(engine)
    assert await leases.acquire("jobs", "a", 60) == 1
    assert not await leases.release("jobs", "b")  # not b's to release
    assert await leases.release("jobs", "a")
    state = await leases.get("jobs")
    assert state is not None and state.holder is None and not state.held
    assert await leases.acquire("jobs", "b", 60) == 2
    assert await leases.get("never") is None


async def test_racing_replicas_get_one_holder(engine: AsyncEngine) -> None:
    leases = Leases(engine)
    for name in ("fresh", "lapsed"):
        if name == "lapsed":
            await leases.acquire(name, "old", 0.05)
            await asyncio.sleep(0.2)
        results = await asyncio.gather(*(leases.acquire(name, f"r{i}", 30) for i in range(8)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results


async def test_bad_arguments_are_refused(engine: AsyncEngine) -> None:
    leases = Leases(engine)
    for name, holder, ttl in (("", "a", 1), ("x" * 129, "a", 1), ("n", "", 1), ("n", "a", 0)):
        with pytest.raises(ValueError):
            await leases.acquire(name, holder, ttl)
