"""The Alembic migrations produce exactly the tables in ``control/db/schema.py``."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from control.db.engine import create_engine, migrate
from control.db.schema import metadata
from tests.pgserver import PostgresServer, postgres

__all__ = ["postgres"]


async def test_migrated_schema_matches_metadata(tmp_path: Path) -> None:
    await _check_migrations(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")


async def test_migrated_schema_matches_metadata_on_postgresql(postgres: PostgresServer) -> None:
    """The same migrations on a real PostgreSQL (the shared store of several replicas)."""
    await _check_migrations(postgres.database())


async def _check_migrations(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate(engine)
        await migrate(engine)  # idempotent

        def check(connection: object) -> None:
            context = MigrationContext.configure(connection)  # type: ignore[arg-type]
            assert compare_metadata(context, metadata) == []
            tables = set(inspect(connection).get_table_names())  # type: ignore[arg-type]
            assert {
                "agents",
                "gateways",
                "tunnels",
                "certificates",
                "settings",
                "admin_users",
                "admin_sessions",
                "audit_log",
                "leases",
                "control_replicas",
                "presence",
                "alembic_version",
            } <= tables

        async with engine.connect() as conn:
            await conn.run_sync(check)
    finally:
        await engine.dispose()


async def test_replicas_starting_at_once_on_a_new_postgresql_database(
    postgres: PostgresServer,
) -> None:
    """Several Control replicas migrating one new database at the same moment: one
    migrates, the others wait on the advisory lock and find it done (without the lock
    the second crashed on a unique violation creating alembic_version)."""
    import asyncio

    url = postgres.database()
    engines = [create_engine(url) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        async with engines[0].connect() as conn:

            def check(connection: object) -> None:
                context = MigrationContext.configure(connection)  # type: ignore[arg-type]
                assert compare_metadata(context, metadata) == []

            await conn.run_sync(check)
    finally:
        for engine in engines:
            await engine.dispose()
