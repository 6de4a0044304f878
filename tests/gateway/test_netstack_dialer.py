"""The proxy dialling agents through our user-space TCP/IP stack (the ``userspace``
backend's data path), without WireGuard: two ``AsyncStack``s on an in-memory link.

The "agent" stack listens on 100.64.0.100:80 and splices every connection to the real
uvicorn app on loopback, as the agent's forwarder does; the proxy's dialer is the
gateway stack's ``open_connection``.  This checks that the proxy uses only the stream
API the netstack provides (half-close, back-pressure, no peername).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect

from common.relay.splice import close_writer, splice
from tests.gateway.agentapp import ProxyHarness, Uvicorn, pattern_sha256, tunnel
from tests.support import need

try:  # the user-space stack is developed alongside; CI=true turns a skip into a failure
    from netstack.aio import AsyncStack, MemoryLink
    from netstack.stack import Stack
except ImportError:  # pragma: no cover - only before netstack lands
    AsyncStack = MemoryLink = Stack = None  # type: ignore[assignment,misc]

GATEWAY_IP = "100.64.0.1"
AGENT_IP = "100.64.0.100"
HOST = {"Host": "app.example.com"}


class Netstacks:
    def __init__(self, app_port: int) -> None:
        self.app_port = app_port
        self.gateway: AsyncStack | None = None
        self.agent: AsyncStack | None = None
        self.accepted = 0

    async def start(self) -> Netstacks:
        need(AsyncStack is not None, "needs the netstack user-space TCP/IP stack")
        link_gw, link_agent = MemoryLink.pair()
        self.gateway = AsyncStack(Stack([GATEWAY_IP], rng=random.Random(1)), link_gw)
        self.agent = AsyncStack(Stack([AGENT_IP], rng=random.Random(2)), link_agent)

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            app_reader, app_writer = await asyncio.open_connection("127.0.0.1", self.app_port)
            try:
                await splice(reader, writer, app_reader, app_writer, idle_timeout=30)
            except (ConnectionError, OSError, TimeoutError):
                pass
            finally:
                await close_writer(app_writer)
                await close_writer(writer)

        await self.agent.start_server(forward, 80)
        return self

    async def dial(
        self,
        host: str,
        port: int,
        timeout: float,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.gateway is not None
        return await self.gateway.open_connection(host, port, timeout=timeout)


@pytest.fixture
async def via_netstack(agent: Uvicorn) -> AsyncIterator[tuple[ProxyHarness, Netstacks]]:
    stacks = await Netstacks(agent.port).start()
    harness = ProxyHarness(80, dialer=stacks.dial, connect_timeout=2.0)
    harness.router.replace_all([tunnel("t1", "app.example.com", agent_ip=AGENT_IP)])
    await harness.start()
    try:
        yield harness, stacks
    finally:
        await harness.close()


async def test_requests_and_keep_alive_through_netstack(
    via_netstack: tuple[ProxyHarness, Netstacks],
) -> None:
    harness, stacks = via_netstack
    async with httpx.AsyncClient(base_url=harness.url, timeout=20) as http:
        for _ in range(5):
            response = await http.get("/headers", headers=HOST)
            assert response.status_code == 200
        body = bytes(range(256)) * 2000
        upload = await http.post("/upload", content=body, headers=HOST)
        assert upload.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    assert stacks.accepted == 1  # one agent connection, kept alive across 6 requests


@pytest.mark.slow
async def test_download_through_netstack_is_hash_checked(
    via_netstack: tuple[ProxyHarness, Netstacks],
) -> None:
    harness, _ = via_netstack
    total = 4 * 1024 * 1024
    digest = hashlib.sha256()
    async with (
        httpx.AsyncClient(base_url=harness.url, timeout=60) as http,
        http.stream("GET", f"/download?n={total}", headers=HOST) as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            digest.update(chunk)
    assert digest.hexdigest() == pattern_sha256(total)


async def test_websocket_through_netstack(via_netstack: tuple[ProxyHarness, Netstacks]) -> None:
    harness, _ = via_netstack
    async with connect(
        "ws://app.example.com/ws", host="127.0.0.1", port=harness.port, compression=None
    ) as ws:
        for message in ("one", "two", "x" * 100_000):
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 10) == message


async def test_closed_port_on_agent_stack_is_502(agent: Uvicorn) -> None:
    stacks = await Netstacks(agent.port).start()
    harness = ProxyHarness(81, dialer=stacks.dial, connect_timeout=2.0)  # nothing on :81
    harness.router.replace_all([tunnel("t1", "app.example.com", agent_ip=AGENT_IP)])
    await harness.start()
    try:
        async with httpx.AsyncClient(base_url=harness.url, timeout=20) as http:
            response = await http.get("/headers", headers=HOST)
        assert response.status_code == 502
    finally:
        await harness.close()
