"""The gateway's end of the stream transport (``gateway/wgstream.py``) behind the real
HTTPS listener: WireGuard over a WebSocket reaches the gateway's WireGuard through
both bindings (fed into the engine for the userspace backend; relayed from a loopback
UDP socket, as to kernel WireGuard or wireguard-go), and every kind of bad peer --
garbage, oversized frames, non-WireGuard records, a slowloris upgrade, a TLS client
that never finishes, a stream that never brings a valid handshake, one that floods
before it, too many at once from one address -- is cut off while a good agent's
session keeps working."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import add_settings, resolve
from common.relay.limits import LimitSettings
from common.relay.metrics import Metrics
from common.relay.router import Router
from common.wgstream import PATH, SUBPROTOCOL, DatagramStream, StreamSettings, open_stream
from gateway.proxy.http import ProxyServer, ProxySettings
from gateway.tls import CertificateStore
from gateway.wgstream import StreamAcceptor, StreamServerSettings, engine_binding, relay_binding
from netstack.wireguard.aio import WireGuardSocket
from netstack.wireguard.engine import WireGuardEngine
from tests.netstack.wireguard.harness import A_IP, B_IP, ipv4_udp, keypair
from tests.support import metric_sample

AUTH_TIMEOUT = 1.5


def engine(seed: int) -> WireGuardEngine:
    private, _ = keypair(seed)
    return WireGuardEngine(private, random_bytes=os.urandom, wall_clock=time.time)


@dataclass
class Edge:
    """The gateway side: its WireGuard (B_IP) on a UDP socket, the HTTPS listener."""

    wg: WireGuardSocket
    acceptor: StreamAcceptor
    proxy: ProxyServer
    metrics: Metrics
    port: int


@contextlib.asynccontextmanager
async def edge(tmp: Path, binding: str, **overrides: object) -> AsyncIterator[Edge]:
    wg = await WireGuardSocket.open(engine(2), "127.0.0.1", 0)
    metrics = Metrics()
    bind = (
        engine_binding(lambda: wg)
        if binding == "engine"
        else relay_binding(int(wg.local_address[1]))
    )
    settings = StreamServerSettings(
        auth_timeout=AUTH_TIMEOUT,
        max_pre_auth=64,
        max_pending_per_address=4,
        **overrides,  # type: ignore[arg-type]
    )
    acceptor = StreamAcceptor(bind, metrics, settings)
    proxy = ProxyServer(
        Router(),
        settings=ProxySettings(limits=LimitSettings(header_timeout=1.0, rate=0)),
        metrics=metrics,
    )
    proxy.stream_acceptor = acceptor
    server = await proxy.start("127.0.0.1", 0, CertificateStore(tmp / "tls").server_context())
    try:
        yield Edge(wg, acceptor, proxy, metrics, int(server.sockets[0].getsockname()[1]))
    finally:
        await proxy.close()
        await acceptor.close()
        wg.close()


class Agent:
    """An agent-like peer: its own engine (A_IP) whose datagrams to the gateway take a
    stream (the agent's ``WireGuardSocket.route``), never its UDP socket."""

    def __init__(self, gateway: Edge, seed: int = 1) -> None:
        self.gateway = gateway
        self.seed = seed
        self.wg: WireGuardSocket | None = None
        self.stream: DatagramStream | None = None
        self.endpoint = ("127.0.0.1", 9)  # a UDP address nothing is sent to

    async def connect(self) -> Agent:
        self.wg = wg = await WireGuardSocket.open(engine(self.seed), "127.0.0.1", 0)
        gateway = self.gateway.wg.engine
        wg.engine.set_peer(gateway.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=self.endpoint)
        gateway.set_peer(wg.engine.public_key, allowed_ips=[f"{A_IP}/32"])
        self.stream = await open_stream(
            "127.0.0.1",
            self.gateway.port,
            on_datagrams=lambda datagrams: wg.receive_routed(datagrams, self.endpoint),
            timeout=5,
        )
        wg.route(self.endpoint, self.stream)
        return self

    async def round_trip(self, payload: bytes) -> None:
        """A packet to the gateway and one back, through the stream."""
        assert self.wg is not None
        packet = ipv4_udp(A_IP, B_IP, payload)
        self.wg.send_packet(packet)
        assert await asyncio.wait_for(self.gateway.wg.packets.get(), 10) == packet
        answer = ipv4_udp(B_IP, A_IP, payload[::-1])
        self.gateway.wg.send_packet(answer)
        assert await asyncio.wait_for(self.wg.packets.get(), 10) == answer

    def close(self) -> None:
        if self.stream is not None:
            self.stream.abort()
        if self.wg is not None:
            self.wg.close()


def client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


UPGRADE = (
    f"GET {PATH} HTTP/1.1\r\nHost: gw.example.com\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
).encode()


#: raw connections a test opened, closed when it ends (``raw`` fixture)
_OPENED: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def raw() -> AsyncIterator[None]:
    yield
    for writer in _OPENED:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
    _OPENED.clear()


async def connect(port: int, tls: bool = True) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tls:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_tls(), server_hostname=""
        )
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _OPENED.append(writer)
    return reader, writer


async def upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TLS connection that completed the upgrade (and nothing more)."""
    reader, writer = await connect(port)
    writer.write(UPGRADE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Read until the gateway closes the connection; what it sent last."""
    tail = b""
    async with asyncio.timeout(seconds):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                tail = (tail + chunk)[-256:]
    return tail


def masked(opcode: int, payload: bytes, *, length: int | None = None) -> bytes:
    """A client frame (masked with a zero key, so the payload reads as it is)."""
    size = len(payload) if length is None else length
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + bytes(4) + payload


def counted(metrics: Metrics, family: str, **labels: str) -> float:
    names = {
        "refused": "kakuremichi_wireguard_stream_refused_total",
        "closed": "kakuremichi_wireguard_stream_closed_total",
    }
    return metric_sample(metrics.render(), names[family], **labels) or 0.0


@pytest.mark.parametrize("binding", ["engine", "relay"])
async def test_an_agent_over_the_stream_reaches_wireguard(tmp_path: Path, binding: str) -> None:
    async with edge(tmp_path, binding) as gw:
        agent = await Agent(gw).connect()
        try:
            await agent.round_trip(b"hello")
            (session,) = gw.acceptor.sessions
            assert session.authenticated
            peer = gw.wg.engine.peer(agent.wg.engine.public_key)  # type: ignore[union-attr]
            assert peer is not None and peer.endpoint is not None
            endpoint = f"{peer.endpoint[0]}:{peer.endpoint[1]}"
            assert gw.acceptor.transport_of(endpoint) == "tcp"
            assert gw.acceptor.transport_of("192.0.2.7:51820") == "udp"
            assert gw.acceptor.record_peer("laptop", endpoint) == "tcp"
            for _ in range(20):
                await agent.round_trip(os.urandom(1200))
            text = gw.metrics.render()
            assert metric_sample(text, "kakuremichi_wireguard_streams", state="authenticated") == 1
            transport = metric_sample(
                text, "kakuremichi_wireguard_transport", agent="laptop", transport="tcp"
            )
            assert transport == 1
            assert 'kakuremichi_wireguard_stream_bytes_total{direction="rx"}' in text
        finally:
            agent.close()
        await asyncio.sleep(0.2)
        assert not gw.acceptor.sessions  # gone with its connection
        text = gw.metrics.render()
        assert metric_sample(text, "kakuremichi_wireguard_streams", state="authenticated") == 0


@pytest.mark.parametrize("binding", ["engine", "relay"])
async def test_bad_peers_are_cut_off_and_the_good_one_never_notices(
    tmp_path: Path, binding: str
) -> None:
    async with edge(tmp_path, binding) as gw:
        good = await Agent(gw).connect()
        try:
            await good.round_trip(b"before")

            # garbage instead of WebSocket frames: a framing error closes it at once
            reader, writer = await upgraded(gw.port)
            writer.write(os.urandom(64) + b"\x89\x00")
            await closed_within(reader, 3)
            await good.round_trip(b"after garbage")

            # a record that is not WireGuard: 1007
            reader, writer = await upgraded(gw.port)
            writer.write(masked(0x2, b"\x00\x04abcd"))
            assert b"\x03\xef" in await closed_within(reader, 3)  # close code 1007

            # a frame announcing 1 TiB: 1009 before a byte of it is buffered
            reader, writer = await upgraded(gw.port)
            writer.write(masked(0x2, b"", length=1 << 40))
            assert b"\x03\xf1" in await closed_within(reader, 3)  # close code 1009
            await good.round_trip(b"after oversize")

            # WireGuard-shaped initiations that no peer's key made: never authenticated
            reader, writer = await upgraded(gw.port)
            fake = b"\x01\x00\x00\x00" + os.urandom(144)
            writer.write(masked(0x2, len(fake).to_bytes(2, "big") + fake))
            started = asyncio.get_running_loop().time()
            await closed_within(reader, AUTH_TIMEOUT + 3)
            assert asyncio.get_running_loop().time() - started >= AUTH_TIMEOUT - 0.2
            assert counted(gw.metrics, "closed", reason="unauthenticated") >= 1

            # a flood before any handshake: closed at max_pre_auth
            reader, writer = await upgraded(gw.port)
            keepalive = b"\x04\x00\x00\x00" + os.urandom(28)
            record = len(keepalive).to_bytes(2, "big") + keepalive
            writer.write(masked(0x2, record * 100))
            await closed_within(reader, 3)
            await good.round_trip(b"after flood")

            # slowloris on the upgrade itself: the listener's header deadline (1 s)
            reader, writer = await connect(gw.port)
            for byte in UPGRADE[:20]:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
            tail = await closed_within(reader, 3)
            assert b"408" in tail or tail == b""

            # a TLS client that never says hello: the TLS handshake deadline
            raw_reader, _ = await connect(gw.port, tls=False)
            await closed_within(raw_reader, 5)

            # plain GET on the path, and a WebSocket without our subprotocol: refused
            reader, writer = await connect(gw.port)
            writer.write(f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 426 "), head  # Upgrade Required
            reader, writer = await connect(gw.port)
            writer.write(UPGRADE.replace(SUBPROTOCOL.encode(), b"chat"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 400 ")
            assert counted(gw.metrics, "refused", reason="bad_upgrade") >= 2

            # too many unauthenticated streams from one address: 429 for the fifth (the
            # good agent's, authenticated, does not count)
            for _ in range(4):
                await upgraded(gw.port)
            reader, writer = await connect(gw.port)
            writer.write(UPGRADE)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 429 "), head
            assert counted(gw.metrics, "refused", reason="pending_per_address") == 1
            await good.round_trip(b"at the end")
            assert [s.authenticated for s in gw.acceptor.sessions].count(True) == 1
        finally:
            good.close()


async def test_streams_end_when_the_gateway_stops(tmp_path: Path) -> None:
    async with edge(tmp_path, "engine") as gw:
        agent = await Agent(gw).connect()
        await agent.round_trip(b"x")
        assert agent.stream is not None
        await gw.acceptor.close()
        assert await asyncio.wait_for(agent.stream.closed, 5)
        assert not gw.acceptor.sessions
        # and nothing new is taken any more
        reader, writer = await connect(gw.port)
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 503 ")
        agent.close()


async def test_without_a_binding_the_path_is_refused(tmp_path: Path) -> None:
    metrics = Metrics()
    acceptor = StreamAcceptor(None, metrics, StreamServerSettings(stream=StreamSettings()))
    proxy = ProxyServer(Router(), metrics=metrics)
    proxy.stream_acceptor = acceptor
    server = await proxy.start("127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await connect(port, tls=False)
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 503 ")
        # other paths are the proxy's as before (no tunnel: 404)
        reader, writer = await connect(port, tls=False)
        writer.write(b"GET /.well-known/other HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404 ")
    finally:
        await proxy.close()


def test_the_gateway_offers_the_stream_unless_told_not_to(tmp_path: Path) -> None:
    """``--wireguard-over-https`` (default true): the listener's hook and the HTTPS port
    reported to Control, from which agents learn the stream endpoint; false: neither
    (the path is an ordinary request, routed like any other)."""
    from gateway.main import SETTINGS, settings_from
    from gateway.runtime import Gateway, GatewaySettings

    parser = argparse.ArgumentParser()
    add_settings(parser, SETTINGS)
    base = ["--control-url", "http://127.0.0.1:1", "--api-key", "gtw_x", "--public-ip", "192.0.2.7"]
    assert settings_from(resolve(parser.parse_args(base), SETTINGS, {})).wireguard_over_https
    off = resolve(parser.parse_args([*base, "--wireguard-over-https", "false"]), SETTINGS, {})
    assert settings_from(off).wireguard_over_https is False
    env = resolve(parser.parse_args(base), SETTINGS, {"KAKUREMICHI_WIREGUARD_OVER_HTTPS": "no"})
    assert settings_from(env).wireguard_over_https is False

    common = {
        "control_url": "http://127.0.0.1:1",
        "api_key": "gtw_x",
        "public_ip": "192.0.2.7",
        "backend": "userspace",
        "https_port": 8443,
    }
    on = Gateway(GatewaySettings(data_dir=tmp_path / "on", **common))  # type: ignore[arg-type]
    assert on.proxy.stream_acceptor is on.streams
    assert on.client.settings.https_port == 8443
    without = Gateway(
        GatewaySettings(data_dir=tmp_path / "off", wireguard_over_https=False, **common)  # type: ignore[arg-type]
    )
    assert without.proxy.stream_acceptor is None
    assert without.client.settings.https_port is None
    no_https = Gateway(GatewaySettings(data_dir=tmp_path / "plain", **{**common, "https_port": 0}))  # type: ignore[arg-type]
    assert no_https.client.settings.https_port is None
