"""Schemathesis generates requests from ``/openapi.json`` and fires them at a running
Control with the admin token: no request may produce a 5xx, and every response must
match the documented schema and status codes.

The run is bounded: at most ``max_examples`` generated cases per operation, plus the
cases schemathesis derives from the schema itself (about 1,400 requests in all), and
it never skips (nothing here depends on the machine)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from control.app import ControlSettings, create_app
from tests.controlserver import ADMIN_TOKEN
from tests.support import free_port


@pytest.fixture(scope="module")
def control_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db: Path = tmp_path_factory.mktemp("fuzz") / "control.db"
    # the generated bearer values for the documented security scheme (401s) must not lock
    # the fuzzer's address out: the limit on failed admin-token attempts has its own tests
    app = create_app(
        ControlSettings(
            database_url=f"sqlite+aiosqlite:///{db}",
            admin_token=ADMIN_TOKEN,
            admin_auth_failures=1_000_000,
        )
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    assert server.started
    base = f"http://127.0.0.1:{port}"
    # Seed objects so that generated ids/names sometimes hit something real.
    import httpx

    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        client.post("/api/agents", json={"name": "laptop"})
        client.post("/api/gateways", json={"name": "edge"})
        client.post(
            "/api/tunnels",
            json={"domain": "app.example.com", "target": "127.0.0.1:80", "agent": "laptop"},
        )
    yield base
    server.should_exit = True
    thread.join(20)


@pytest.fixture(scope="module")
def api_schema(control_base: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{control_base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
STATUSES: list[int] = []


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    STATUSES.append(response.status_code)
    case.validate_response(
        response, checks=[not_a_server_error, response_schema_conformance, status_code_conformance]
    )


def test_fuzzing_reached_the_handlers() -> None:
    """Guard against a fuzz run that only ever saw 401s (or nothing)."""
    # Schemathesis also generates its own bearer values for the documented security
    # scheme (those get 401); the rest must reach the handlers in numbers.
    authorised = [s for s in STATUSES if s != 401]
    assert len(authorised) > 300
    assert sum(200 <= s < 300 for s in authorised) > 20
    assert {404, 409, 422} <= set(authorised)
