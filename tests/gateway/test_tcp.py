"""Raw TCP tunnels: listeners follow the router, bytes are spliced with half-close."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from common.protocol import TunnelSpec
from gateway.proxy import Metrics, Router, TcpForwarder, TcpSettings
from tests.gateway.agentapp import RawServer, tunnel
from tests.support import free_port

AGENT_IP = "127.0.0.2"  # the agent listens on the same port number as the public side


async def echo_then_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then (half-closed by the client) still send a trailer and close."""
    digest = hashlib.sha256()
    while True:
        data = await reader.read(65536)
        if not data:
            break
        digest.update(data)
        writer.write(data)
        await writer.drain()
    writer.write(b"|bye:" + digest.hexdigest().encode())
    await writer.drain()


class Setup:
    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.router = Router()
        self.metrics = Metrics()
        self.forwarder = TcpForwarder(
            self.router, None, TcpSettings(bind_host="127.0.0.1", idle_timeout=5), self.metrics
        )
        self.agent = RawServer(echo_then_bye, host=AGENT_IP, port=self.port)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    s = Setup()
    await s.agent.start()
    await s.forwarder.start()
    try:
        yield s
    finally:
        await s.forwarder.close()
        await s.agent.stop()


def tcp_tunnel(port: int, tid: str = "tcp1", enabled: bool = True) -> TunnelSpec:
    return tunnel(tid, None, protocol="tcp", public_port=port, agent_ip=AGENT_IP, enabled=enabled)


async def test_echo_with_half_close(setup: Setup) -> None:
    setup.router.replace_all([tcp_tunnel(setup.port)])
    await setup.forwarder.wait_reconciled()
    assert setup.port in setup.forwarder.listeners
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    payload = bytes(range(256)) * 4096  # 1 MiB
    writer.write(payload)
    writer.write_eof()  # half-close: we still expect the agent's answer
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    expected = payload + b"|bye:" + hashlib.sha256(payload).hexdigest().encode()
    assert received == expected
    await asyncio.sleep(0.05)
    assert setup.metrics.tcp_bytes.get(tunnel="tcp1", direction="in") == len(payload)
    assert setup.metrics.tcp_bytes.get(tunnel="tcp1", direction="out") == len(expected)
    assert setup.metrics.tcp_connections.get(tunnel="tcp1") == 1


async def test_listeners_follow_router(setup: Setup) -> None:
    setup.router.upsert(tcp_tunnel(setup.port))
    await setup.forwarder.wait_reconciled()
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    # disabling the tunnel closes the listener and cuts the open connection
    setup.router.upsert(tcp_tunnel(setup.port, enabled=False))
    await setup.forwarder.wait_reconciled()
    assert setup.port not in setup.forwarder.listeners
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", setup.port)
    setup.router.upsert(tcp_tunnel(setup.port))
    await setup.forwarder.wait_reconciled()
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(b"pong")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"pong"
    writer.close()
    setup.router.remove("tcp1")
    await setup.forwarder.wait_reconciled()
    assert setup.forwarder.listeners == {}


async def test_port_in_use_is_reported_and_retried(setup: Setup) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = int(blocker.sockets[0].getsockname()[1])
    setup.router.upsert(tcp_tunnel(busy, tid="busy"))
    await setup.forwarder.wait_reconciled()
    assert busy in setup.forwarder.bind_errors and busy not in setup.forwarder.listeners
    assert 'kakuremichi_listener_bind_errors{protocol="tcp"} 1' in setup.metrics.render()
    blocker.close()
    await blocker.wait_closed()
    await setup.forwarder.reconcile()
    assert busy in setup.forwarder.listeners and busy not in setup.forwarder.bind_errors


async def test_agent_down_closes_client(setup: Setup) -> None:
    await setup.agent.stop()
    setup.router.upsert(tcp_tunnel(setup.port))
    await setup.forwarder.wait_reconciled()
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    # a reset, as the forwarder documents: an unreachable tunnel is not an empty answer
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert setup.metrics.upstream_errors.get(tunnel="tcp1", kind="unreachable") == 1


async def test_connection_limit_per_client() -> None:
    router = Router()
    port = free_port()
    agent = await RawServer(echo_then_bye, host=AGENT_IP, port=port).start()
    forwarder = TcpForwarder(
        router, None, TcpSettings(bind_host="127.0.0.1", max_connections_per_client=1)
    )
    router.upsert(tcp_tunnel(port))
    await forwarder.start()
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"a")
        assert await asyncio.wait_for(r1.readexactly(1), 5) == b"a"
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r2.read(), 5) == b""  # refused by closing
        w2.close()
        w1.close()
    finally:
        await forwarder.close()
        await agent.stop()
