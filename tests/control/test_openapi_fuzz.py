"""Schemathesis generates requests from ``/openapi.json`` and fires them at a running
Control with the admin token: no request may produce a 5xx, and every response must
match the documented schema and status codes.

The run is bounded: at most ``max_examples`` generated cases per operation, plus the
cases schemathesis derives from the schema itself (about 1,400 requests in all), and
it never skips (nothing here depends on the machine).

It happens once per module, in the ``fuzz_run`` fixture, which both tests use: each
passes on its own (``pytest …::test_fuzzing_reached_the_handlers`` runs the fuzzer
too).  The fixture builds every operation's test with ``get_all_tests``, the function
schemathesis' ``@schema.parametrize()`` runs inside its pytest item (the same phases,
settings and checks), and records each operation's failure instead of raising it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    load_all_checks,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.pytest.lazy import get_all_tests

from control.api.openapi import build_openapi
from control.app import ControlSettings, create_app
from control.main import server_for
from tests.controlserver import ADMIN_TOKEN
from tests.support import free_port

#: the generated bearer values for the documented security scheme (401s) must not lock
#: the fuzzer's address out: the limit on failed admin-token attempts has its own tests
FUZZ_AUTH_FAILURES = 1_000_000
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def control_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db: Path = tmp_path_factory.mktemp("fuzz") / "control.db"
    app = create_app(
        ControlSettings(
            database_url=f"sqlite+aiosqlite:///{db}",
            admin_token=ADMIN_TOKEN,
            admin_auth_failures=FUZZ_AUTH_FAILURES,
        )
    )
    port = free_port()
    server = server_for(app, "127.0.0.1", port)  # as served, the listener's rules included
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    assert server.started
    base = f"http://127.0.0.1:{port}"
    # Seed objects so that generated ids/names sometimes hit something real.
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


@dataclass
class FuzzRun:
    """What one run of every operation saw."""

    statuses: list[int] = field(default_factory=list)
    #: (operation, what went wrong), for each operation that failed a check
    failures: list[tuple[str, BaseException]] = field(default_factory=list)
    operations: int = 0
    #: what Control logged at ERROR or above, or with a traceback, meanwhile
    logged: list[str] = field(default_factory=list)


class _Errors(logging.Handler):
    """Collects log records at ERROR and above, and any carrying a traceback."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.into.append(f"{record.name} {record.levelname}: {self.format(record)}")


@pytest.fixture(scope="module")
def fuzz_run(control_base: str) -> FuzzRun:
    run = FuzzRun()
    schema = schemathesis.openapi.from_url(f"{control_base}/openapi.json")
    load_all_checks()

    def call(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        run.statuses.append(response.status_code)
        case.validate_response(
            response,
            checks=[not_a_server_error, response_schema_conformance, status_code_conformance],
        )

    errors = _Errors(run.logged)
    root = logging.getLogger()
    root.addHandler(errors)
    try:
        for result in get_all_tests(
            schema=schema, test_func=call, settings=SETTINGS, given_kwargs={}
        ):
            assert isinstance(result, Ok), result  # the document itself must load
            operation, test = result.ok()
            run.operations += 1
            try:
                test()
            except (Exception, FailureGroup) as exc:  # one operation's must not hide the rest
                run.failures.append((operation.label, exc))
    finally:
        root.removeHandler(errors)
    return run


def test_no_server_errors(fuzz_run: FuzzRun) -> None:
    documented = build_openapi()["paths"].values()
    assert fuzz_run.operations == sum(len(set(item) - {"parameters"}) for item in documented)
    if fuzz_run.failures:
        pytest.fail(
            "\n\n".join(f"{label}:\n{exc!s}" for label, exc in fuzz_run.failures),
            pytrace=False,
        )


def test_no_traceback_or_error_in_the_logs(fuzz_run: FuzzRun) -> None:
    """Every generated request is answered without Control logging an error or a
    traceback (an unexpected exception caught and logged would not show as a 5xx)."""
    assert fuzz_run.operations > 0
    assert fuzz_run.logged == [], "\n".join(fuzz_run.logged[:5])


def test_fuzzing_reached_the_handlers(fuzz_run: FuzzRun) -> None:
    """Guard against a fuzz run that only ever saw 401s (or nothing)."""
    # Schemathesis also generates its own bearer values for the documented security
    # scheme (those get 401); the rest must reach the handlers in numbers.
    authorised = [s for s in fuzz_run.statuses if s != 401]
    assert len(authorised) > 300
    assert sum(200 <= s < 300 for s in authorised) > 20
    assert {404, 409, 422} <= set(authorised)
