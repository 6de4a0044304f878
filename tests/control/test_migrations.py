"""The Alembic migrations produce exactly the tables in ``control/db/schema.py``."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from control.db.engine import create_engine, migrate
from control.db.schema import metadata


async def test_migrated_schema_matches_metadata(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
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
                "alembic_version",
            } <= tables

        async with engine.connect() as conn:
            await conn.run_sync(check)
    finally:
        await engine.dispose()
