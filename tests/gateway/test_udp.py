"""Raw UDP tunnels: per-client flows, replies to the right client, idle expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.proxy import Metrics, Router, UdpForwarder, UdpSettings
from tests.gateway.agentapp import tunnel
from tests.support import free_port

AGENT_IP = "127.0.0.2"


class Echo(asyncio.DatagramProtocol):
    """The agent side: echoes each datagram prefixed with the sender's port."""

    def __init__(self) -> None:
        self.peers: set[Any] = set()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.peers.add(addr)
        assert self.transport is not None
        self.transport.sendto(b"echo:" + data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def udp_client(port: int) -> tuple[asyncio.DatagramTransport, Client]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        Client, remote_addr=("127.0.0.1", port)
    )
    return transport, protocol


class Setup:
    def __init__(self, **settings: Any) -> None:
        self.port = free_port("127.0.0.1")
        self.router = Router()
        self.metrics = Metrics()
        self.forwarder = UdpForwarder(
            self.router, None, UdpSettings(bind_host="127.0.0.1", **settings), self.metrics
        )
        self.echo = Echo()
        self.agent_transport: asyncio.DatagramTransport | None = None

    async def start(self) -> Setup:
        loop = asyncio.get_running_loop()
        self.agent_transport, _ = await loop.create_datagram_endpoint(
            lambda: self.echo, local_addr=(AGENT_IP, self.port)
        )
        self.router.upsert(
            tunnel("u1", None, protocol="udp", public_port=self.port, agent_ip=AGENT_IP)
        )
        await self.forwarder.start()
        return self

    async def stop(self) -> None:
        await self.forwarder.close()
        if self.agent_transport is not None:
            self.agent_transport.close()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    s = await Setup(flow_idle_timeout=0.3).start()
    try:
        yield s
    finally:
        await s.stop()


async def test_flows_per_client_and_replies_routed_back(setup: Setup) -> None:
    (t1, c1), (t2, c2) = await udp_client(setup.port), await udp_client(setup.port)
    try:
        for i in range(5):
            t1.sendto(b"one-%d" % i)
            t2.sendto(b"two-%d" % i)
        got1 = [await asyncio.wait_for(c1.queue.get(), 5) for _ in range(5)]
        got2 = [await asyncio.wait_for(c2.queue.get(), 5) for _ in range(5)]
        assert sorted(got1) == [b"echo:one-%d" % i for i in range(5)]
        assert sorted(got2) == [b"echo:two-%d" % i for i in range(5)]
        assert len(setup.echo.peers) == 2  # one stable agent-side peer per client
        assert len(setup.forwarder.flows) == 2
        assert setup.metrics.udp_flows.get(tunnel="u1") == 2
        assert setup.metrics.udp_bytes.get(tunnel="u1", direction="in") == 50
    finally:
        t1.close()
        t2.close()


async def test_idle_flows_expire(setup: Setup) -> None:
    transport, client = await udp_client(setup.port)
    try:
        transport.sendto(b"hi")
        assert await asyncio.wait_for(client.queue.get(), 5) == b"echo:hi"
        assert len(setup.forwarder.flows) == 1
        await asyncio.sleep(0.6)
        assert setup.forwarder.flows == {}
        assert setup.metrics.udp_flows.get(tunnel="u1") == 0
        transport.sendto(b"again")  # a new flow opens transparently
        assert await asyncio.wait_for(client.queue.get(), 5) == b"echo:again"
    finally:
        transport.close()


async def test_tunnel_removal_closes_port_and_flows(setup: Setup) -> None:
    transport, client = await udp_client(setup.port)
    try:
        transport.sendto(b"x")
        await asyncio.wait_for(client.queue.get(), 5)
        setup.router.remove("u1")
        await setup.forwarder.wait_reconciled()
        assert setup.forwarder.listeners == {} and setup.forwarder.flows == {}
    finally:
        transport.close()


async def test_flow_cap_per_client() -> None:
    s = await Setup(max_flows_per_client=1).start()
    try:
        (t1, c1), (t2, c2) = await udp_client(s.port), await udp_client(s.port)
        t1.sendto(b"a")
        assert await asyncio.wait_for(c1.queue.get(), 5) == b"echo:a"
        t2.sendto(b"b")  # same client address (127.0.0.1): over the cap, dropped
        await asyncio.sleep(0.2)
        assert c2.queue.empty()
        assert s.metrics.rejected.get(reason="udp_flows_per_client") == 1
        t1.close()
        t2.close()
    finally:
        await s.stop()
