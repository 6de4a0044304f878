"""The agent's transports (``agent/streams.py``) on a real user-space tunnel, without a
gateway: what is routed where before any stream exists, a gateway removed while its
stream is being opened, and forced TCP without a stream endpoint."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from agent.streams import Gateway, Transports
from common.keys import KeyPair
from common.relay.metrics import Registry
from netstack.tunnel import UserspaceTunnel
from tests.support import metric_sample


@pytest.fixture
async def tunnel() -> UserspaceTunnel:
    tunnel = UserspaceTunnel(KeyPair.generate().private, ["100.64.0.100"])
    await tunnel.start("127.0.0.1", 0)
    try:
        yield tunnel  # type: ignore[misc]
    finally:
        tunnel.close()


def gateway(stream_port: int | None, udp_port: int = 9) -> Gateway:
    key = KeyPair.generate().public_b64
    stream = ("127.0.0.1", stream_port) if stream_port is not None else None
    return Gateway(key, "edge", ("127.0.0.1", udp_port), stream, "100.64.0.1")


async def test_a_gateway_removed_while_its_stream_opens(tunnel: UserspaceTunnel) -> None:
    """The stream endpoint accepts TCP and never answers the upgrade: the gateway goes
    away meanwhile; the attempt is cancelled, nothing stays routed or in the metrics."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    registry = Registry()
    transports = Transports(tunnel, "tcp", registry=registry)
    try:
        edge = gateway(silent.getsockname()[1])
        transports.update([edge])
        tunnel.set_peer(edge.public_key, ["100.64.0.1/32"], edge.endpoint, 25)
        transports.tick()  # --transport tcp: connect at once
        await asyncio.sleep(0.2)
        assert tunnel.udp is not None and tunnel.udp.routed(edge.endpoint) is not None
        text = registry.render()
        assert metric_sample(text, "kakuremichi_gateway_transport", gateway="edge", transport="tcp")
        transports.update([])
        await asyncio.sleep(0.1)
        assert tunnel.udp.routed(edge.endpoint) is None
        text = registry.render()
        assert (
            metric_sample(text, "kakuremichi_gateway_transport", gateway="edge", transport="tcp")
            is None
        )
        assert transports.describe(edge.public_key) == ("udp", "")
    finally:
        await transports.close()
        silent.close()


async def test_forced_tcp_without_a_stream_endpoint_sends_nothing(
    tunnel: UserspaceTunnel, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    transports = Transports(tunnel, "tcp")
    try:
        edge = gateway(None, receiver.getsockname()[1])
        with caplog.at_level(logging.ERROR, "agent.transport"):
            transports.update([edge])
        assert "offers no stream transport" in caplog.text
        tunnel.set_peer(edge.public_key, ["100.64.0.1/32"], edge.endpoint, 25)  # a keepalive
        for _ in range(4):
            transports.tick()
            await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):
            receiver.recv(2048)  # not one datagram reached the gateway's UDP port
        assert transports.describe(edge.public_key)[0] == "tcp"
    finally:
        await transports.close()
        receiver.close()


async def test_auto_starts_on_udp(tunnel: UserspaceTunnel) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    transports = Transports(tunnel, "auto")
    try:
        edge = gateway(1, receiver.getsockname()[1])
        transports.update([edge])
        tunnel.set_peer(edge.public_key, ["100.64.0.1/32"], edge.endpoint, 25)
        data = await asyncio.get_running_loop().run_in_executor(None, receiver.recv, 2048)
        assert data[0] == 1  # the first handshake initiation, over UDP
        assert transports.describe(edge.public_key) == ("udp", "start")
    finally:
        await transports.close()
        receiver.close()
