"""The store on PostgreSQL (issue 19): the REST API and hub tests that check what the
store does (allocation, uniqueness, conflicts, paging, numbers a column cannot hold,
keys, certificates, configs built from the rows) run again against a real PostgreSQL
server (``tests.pgserver``), each test on a fresh database migrated by Alembic at
start.  The tests reading the SQLite file directly stay SQLite-only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control.alloc import AddressPlan
from control.db.engine import create_engine, migrate
from control.db.schema import settings
from control.db.store import Store
from tests.control.test_api import (
    test_admin_token_is_required_everywhere,
    test_certificates,
    test_concurrent_agent_creates_get_distinct_subnets,
    test_gateway_slots_and_keys,
    test_internationalised_domains_are_stored_as_a_labels,
    test_malformed_bodies,
    test_names_cannot_take_the_shape_of_an_id,
    test_numbers_no_field_can_hold_are_refused_not_500,
    test_tunnel_crud_conflicts_and_paging,
)
from tests.control.test_hub import (
    test_agent_and_gateway_auth_and_config,
    test_gateway_endpoint_change_pushes_to_agents,
    test_rotated_key_closes_connection_and_old_key_fails,
    test_status_and_certificate_obtained,
    test_tunnel_changes_reach_the_right_clients,
)
from tests.controlserver import RunningControl
from tests.pgserver import PostgresServer, postgres

__all__ = [
    "postgres",
    "test_admin_token_is_required_everywhere",
    "test_agent_and_gateway_auth_and_config",
    "test_certificates",
    "test_concurrent_agent_creates_get_distinct_subnets",
    "test_gateway_endpoint_change_pushes_to_agents",
    "test_gateway_slots_and_keys",
    "test_internationalised_domains_are_stored_as_a_labels",
    "test_malformed_bodies",
    "test_names_cannot_take_the_shape_of_an_id",
    "test_numbers_no_field_can_hold_are_refused_not_500",
    "test_rotated_key_closes_connection_and_old_key_fails",
    "test_status_and_certificate_obtained",
    "test_tunnel_changes_reach_the_right_clients",
    "test_tunnel_crud_conflicts_and_paging",
]


@pytest.fixture
async def control(tmp_path: Path, postgres: PostgresServer) -> AsyncIterator[RunningControl]:
    """Control on a fresh PostgreSQL database (the tests above take this one)."""
    server = RunningControl(tmp_path / "unused.db", database_url=postgres.database())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_the_database_is_postgresql(control: RunningControl) -> None:
    """Guards the module: the fixture above really puts Control on PostgreSQL."""
    assert control.app.state.store.engine.dialect.name == "postgresql"
    assert not control.db_path.exists()


@pytest.fixture
async def two_stores(postgres: PostgresServer) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores, each on its own engine, on one fresh database: two replicas' stores."""
    url = postgres.database()
    engines = [create_engine(url), create_engine(url)]
    try:
        await migrate(engines[0])
        yield Store(engines[0], AddressPlan()), Store(engines[1], AddressPlan())
    finally:
        for engine in engines:
            await engine.dispose()


async def test_replicas_making_a_setting_at_once_agree_on_one(
    two_stores: tuple[Store, Store],
) -> None:
    """Settings made on first use (the session-cookie keys, a generated admin token)
    and the start-up epoch, by two replicas at the same moment: one value for both and
    distinct epochs, never a failed insert (the bench's two replicas once got a
    UniqueViolation on ``session_keys`` while authenticating a gateway)."""
    a, b = two_stores
    for round_ in range(10):
        async with a.engine.begin() as conn:
            await conn.execute(settings.delete().where(settings.c.key == "session_keys"))
        keys_a, keys_b = await asyncio.gather(a.session_keys(), b.session_keys())
        assert keys_a == keys_b and len(keys_a) == 1, round_
        first, second = await asyncio.gather(
            a.setting_if_absent(f"made-{round_}", "by a"),
            b.setting_if_absent(f"made-{round_}", "by b"),
        )
        assert first == second in ("by a", "by b")
        assert await a.get_setting(f"made-{round_}") == first
    epochs = await asyncio.gather(*(store.next_epoch() for store in (a, b) * 5))
    assert sorted(epochs) == list(range(1, 11)), epochs
