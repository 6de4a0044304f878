"""Failed admin-token attempts per address (``control.api.authlimit``): the sliding
window on its own, then a real Control on loopback, a second address being 127.0.0.2."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from common.relay.limits import client_key
from control.api.authlimit import AuthFailures
from tests.controlserver import ADMIN_TOKEN, RunningControl

LIMIT = 3
WINDOW = 1.0
WRONG = "wrong-token-0123456789abcdef"
REFUSED_LINE = (
    "refusing admin API requests from an address with too many failed admin-token attempts"
)

# -- the window (sans-IO) -------------------------------------------------------------


def test_the_limit_is_reached_within_the_window_only() -> None:
    failures = AuthFailures(limit=3, window=60.0)
    assert failures.failed("a", 0.0) == 0 and failures.failed("a", 10.0) == 0
    assert failures.retry_after("a", 20.0) == 0
    assert failures.failed("a", 20.0) == 40  # the third within a minute: wait for the first
    assert failures.retry_after("a", 20.0) == 40
    assert failures.retry_after("a", 59.5) == 1  # rounded up, never 0 while refused
    assert failures.retry_after("b", 30.0) == 0  # per address
    assert failures.retry_after("a", 60.0) == 0  # the first has left the window
    assert failures.failed("a", 61.0) == 9  # sliding: now the one at 10 s is the oldest
    # spread out, failures never add up to a lock-out
    spread = AuthFailures(limit=3, window=60.0)
    assert all(spread.failed("a", t * 31.0) == 0 for t in range(20))


def test_addresses_forgotten_are_bounded() -> None:
    failures = AuthFailures(limit=2, window=60.0, max_tracked=3)
    for i in range(10):
        failures.failed(f"10.0.0.{i}", 0.0)
    assert len(failures) == 3
    failures.failed("10.0.0.9", 1.0)
    assert failures.retry_after("10.0.0.9", 1.0) == 59
    assert failures.retry_after("10.0.0.0", 1.0) == 0  # evicted first
    assert failures.retry_after("10.0.0.9", 61.0) == 0 and len(failures) == 2  # expired: gone
    with pytest.raises(ValueError):
        AuthFailures(limit=0)
    with pytest.raises(ValueError):
        AuthFailures(window=0.0)


def test_ipv6_addresses_count_per_64() -> None:
    failures = AuthFailures(limit=2, window=60.0)
    failures.failed(client_key("2001:db8:1:2::1"), 0.0)
    failures.failed(client_key("2001:db8:1:2:ffff::7"), 0.0)
    assert failures.retry_after(client_key("2001:db8:1:2::99"), 1.0) > 0
    assert failures.retry_after(client_key("2001:db8:1:3::1"), 1.0) == 0


# -- a real Control -------------------------------------------------------------------


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[RunningControl]:
    server = RunningControl(
        tmp_path / "control.db", admin_auth_failures=LIMIT, admin_auth_window=WINDOW
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _client(
    control: RunningControl, token: str | None, local: str = "127.0.0.1"
) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=control.url,
        headers=headers,
        timeout=10,
        transport=httpx.AsyncHTTPTransport(local_address=local),
    )


async def test_failures_past_the_limit_get_429_until_the_window_passes(
    limited: RunningControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control")
    async with (
        _client(limited, WRONG) as wrong,
        _client(limited, ADMIN_TOKEN) as right,
        _client(limited, None) as anonymous,
        _client(limited, ADMIN_TOKEN, "127.0.0.2") as elsewhere,
    ):
        # successes never count, however many
        for _ in range(LIMIT * 3):
            assert (await right.get("/api/agents")).status_code == 200
        # nor do requests without any credential (they guess nothing)
        for _ in range(LIMIT * 3):
            assert (await anonymous.get("/api/agents")).status_code == 401
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(LIMIT):
            assert (await wrong.get("/api/agents")).status_code == 401
        # locked: every /api/ request from the address, the right token included, and
        # without looking at the token (no oracle for more guesses)
        for client in (wrong, right, anonymous):
            response = await client.post("/api/agents", json={"name": "x"})
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "too_many_auth_failures"
        assert (await right.get("/healthz")).status_code == 200  # only /api/ is guarded
        # another address is unaffected
        assert (await elsewhere.get("/api/agents")).status_code == 200
        # cooled down: the right token works again, and nothing was created meanwhile
        await asyncio.sleep(max(0.0, started + WINDOW + 0.05 - loop.time()))
        listed = await right.get("/api/agents")
        assert listed.status_code == 200 and listed.json()["items"] == []
        # and the wrong one starts from a fresh allowance
        for _ in range(LIMIT):
            assert (await wrong.get("/api/agents")).status_code == 401
        assert (await wrong.get("/api/agents")).status_code == 429
    lines = [r for r in caplog.records if r.getMessage() == REFUSED_LINE]
    fields = [r.fields for r in lines]  # type: ignore[attr-defined]
    assert len(lines) == 1, fields  # once per address per interval (a minute)
    assert fields[0]["address"] == "127.0.0.1" and fields[0]["failures"] == LIMIT
    assert fields[0]["since_last_logged"] == 0
    for record in caplog.records:  # neither token, anywhere
        text = record.getMessage() + repr(getattr(record, "fields", ""))
        assert WRONG not in text and ADMIN_TOKEN not in text


async def test_the_refusal_line_counts_the_ones_not_logged(
    limited: RunningControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control")
    async with _client(limited, WRONG) as wrong:
        statuses = [(await wrong.get("/api/agents")).status_code for _ in range(LIMIT + 5)]
        assert statuses == [401] * LIMIT + [429] * 5
        # the next line, once due, says how many went unlogged
        middleware = limited.app.middleware_stack
        while not hasattr(middleware, "refusals"):
            middleware = middleware.app
        middleware.refusals.interval = 0.0
        assert (await wrong.get("/api/agents")).status_code == 429
    lines = [r for r in caplog.records if r.getMessage() == REFUSED_LINE]
    assert [r.fields["since_last_logged"] for r in lines] == [0, 5]  # type: ignore[attr-defined]
