"""The store on PostgreSQL (issue 19): the REST API and hub tests that check what the
store does (allocation, uniqueness, conflicts, paging, numbers a column cannot hold,
keys, certificates, configs built from the rows) run again against a real PostgreSQL
server (``tests.pgserver``), each test on a fresh database migrated by Alembic at
start.  The tests reading the SQLite file directly stay SQLite-only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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
