"""Fixtures for the gateway proxy tests: a real uvicorn "agent" and a started proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.gateway.agentapp import ProxyHarness, Uvicorn, tunnel


@pytest.fixture
async def agent() -> AsyncIterator[Uvicorn]:
    server = await Uvicorn().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def proxy(agent: Uvicorn) -> AsyncIterator[ProxyHarness]:
    harness = ProxyHarness(agent.port)
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()
