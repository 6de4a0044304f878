"""Database engine creation and start-up migrations.

SQLite (via aiosqlite) is the default; any SQLAlchemy async URL works
(``postgresql+asyncpg://…``).  For SQLite we turn on foreign keys, WAL and a busy
timeout on every connection, because SQLite leaves them off by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_HERE = Path(__file__).resolve().parent


def create_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def alembic_config() -> Config:
    config = Config(str(_HERE / "alembic.ini"))
    config.set_main_option("script_location", str(_HERE / "migrations"))
    return config


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


#: the PostgreSQL advisory lock that lets one Control replica migrate at a time
#: (any fixed 64-bit number; this one spells "kkm-migr")
MIGRATION_LOCK = 0x6B6B6D2D6D696772


async def take_turns(connection: AsyncConnection, key: int) -> None:
    """Hold PostgreSQL's advisory lock ``key`` until ``connection``'s transaction ends:
    Control replicas doing the same work wait for each other.  Nothing on SQLite (one
    process writes there)."""
    if connection.dialect.name == "postgresql":
        await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


async def migrate(engine: AsyncEngine) -> None:
    """Bring the database schema to the newest revision (idempotent).

    On PostgreSQL several Control replicas may start at once on a new database: each
    migrates inside one transaction holding an advisory lock, so the second waits for
    the first and then finds the schema at the newest revision (without it both
    created alembic_version and the second crashed on a unique violation)."""
    async with engine.begin() as connection:
        await take_turns(connection, MIGRATION_LOCK)
        await connection.run_sync(_upgrade)
