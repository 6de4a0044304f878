"""The raw forwarders' PROXY protocol roles (``common.relay.tcp`` and ``udp``) on
kernel sockets on loopback, each side alone.

The gateway (``proxy_port`` set) sends a tunnel with ``proxyProtocol`` to the agent's
tunnel port, its PROXY v2 header (the client's address) before any client byte, so a
client's own header arrives as payload; a tunnel without it goes to the raw port as
before.  The agent's UDP forwarder (``tunnel_port`` set) binds the tunnel port while it
has such a tunnel, strips the gateway's header from every datagram, sends the target a
v2 header of its own, and drops (and counts) datagrams without a valid header.  Reached
on a raw port without the gateway's header, the agent sends the target the
specification's "addresses unknown" header.

Stand-ins for the agent and the target listen on 127.0.0.2 so that they never share a
port with the forwarder's listeners on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.protocol import TunnelSpec, parse_tunnel
from common.relay import proxyproto
from common.relay.metrics import Metrics
from common.relay.router import Router
from common.relay.tcp import TcpForwarder, TcpSettings
from common.relay.udp import UdpForwarder, UdpSettings
from tests.support import free_port

PEER = "127.0.0.2"  # the agent (for the gateway) or the target (for the agent)


def raw_tunnel(
    tunnel_id: str,
    protocol: str,
    public_port: int,
    proxy: str | None = None,
    *,
    target: str = "127.0.0.1:9",
    enabled: bool = True,
) -> TunnelSpec:
    return parse_tunnel(
        {
            "id": tunnel_id,
            "protocol": protocol,
            "publicPort": public_port,
            "target": target,
            "agentId": "a",
            "agentIp": PEER,
            "enabled": enabled,
            "proxyProtocol": proxy,
        }
    )


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.rejected.get(reason=reason)


# -- TCP ----------------------------------------------------------------------------------


class StreamRecorder:
    """A stand-in that reads (``headed``: a PROXY header, then) everything, echoes the
    payload, and keeps what it saw per connection."""

    def __init__(self, *, headed: bool) -> None:
        self.headed = headed
        self.seen: asyncio.Queue[tuple[proxyproto.ProxyHeader | None, bytes]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = None
        data = b""
        try:
            if self.headed:
                parser = proxyproto.HeaderReader()
                parsed = None
                while parsed is None:
                    chunk = await reader.read(1)  # byte by byte: exactly the header
                    if not chunk:
                        return
                    parsed = parser.feed(chunk)
                header, data = parsed
            data += await reader.read()
            writer.write(data)
            await writer.drain()
        finally:
            self.seen.put_nowait((header, data))
            writer.close()

    async def start(self, port: int) -> StreamRecorder:
        self.server = await asyncio.start_server(self.handle, PEER, port)
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def exchange(port: int, payload: bytes) -> tuple[bytes, tuple[str, int]]:
    """Send ``payload`` to the forwarder's listener, half-close, read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local = writer.get_extra_info("sockname")
    writer.write(payload)
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer, (str(local[0]), int(local[1]))


async def test_gateway_tcp_sends_the_client_first_to_the_tunnel_port() -> None:
    public, plain_port, tunnel_port = free_port(), free_port(), free_port(PEER)
    router, metrics = Router(), Metrics()
    headed = await StreamRecorder(headed=True).start(tunnel_port)
    raw = await StreamRecorder(headed=False).start(plain_port)
    forwarder = TcpForwarder(
        router,
        settings=TcpSettings(bind_host="127.0.0.1", proxy_port=tunnel_port),
        metrics=metrics,
    )
    router.replace_all([raw_tunnel("t1", "tcp", public, "v1"), raw_tunnel("t2", "tcp", plain_port)])
    await forwarder.start()
    try:
        async with asyncio.timeout(10):
            # the client's own header (claiming 6.6.6.6) is only payload to the agent
            spoof = proxyproto.encode(source=("6.6.6.6", 1), destination=("6.6.6.7", 2))
            payload = spoof + b"PROXY TCP4 6.6.6.6 6.6.6.7 1 2\r\nhello"
            answer, client = await exchange(public, payload)
            header, data = await headed.seen.get()
            assert answer == data == payload
            assert header is not None and header.version == 2
            assert header.command == proxyproto.COMMAND_PROXY and header.transport == "tcp"
            assert header.source == client and header.destination == ("127.0.0.1", public)
            assert header.tunnel_id == "t1"
            # byte counts are the client's bytes, not the header's
            assert metrics.tcp_bytes.get(tunnel="t1", direction="in") == len(payload)
            # a tunnel without the setting: to the raw port, nothing in front
            answer, _ = await exchange(plain_port, b"plain")
            assert answer == b"plain" and (await raw.seen.get()) == (None, b"plain")
            assert headed.seen.empty()
    finally:
        await forwarder.close()
        headed.close()
        raw.close()


@pytest.mark.parametrize(("version", "expected"), [("v1", b"PROXY UNKNOWN\r\n"), ("v2", None)])
async def test_agent_tcp_on_the_raw_port_says_the_address_is_unknown(
    version: str, expected: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    # the agent has the setting, the gateway not yet: no client address arrived, and the
    # target (which expects a header) gets the specification's "unknown" one
    public, target_port = free_port(), free_port(PEER)
    target = await StreamRecorder(headed=True).start(target_port)
    router = Router(upstream=lambda text: (PEER, target_port, ""))
    forwarder = TcpForwarder(router, settings=TcpSettings(bind_host="127.0.0.1"))
    router.replace_all([raw_tunnel("t1", "tcp", public, version)])
    await forwarder.start()
    try:
        async with asyncio.timeout(10):
            with caplog.at_level(logging.WARNING, logger="common.relay.tcp"):
                for _ in range(2):
                    answer, _ = await exchange(public, b"hello")
                    header, data = await target.seen.get()
            assert answer == data == b"hello"
            assert header is not None and header.command == proxyproto.COMMAND_LOCAL
            # the operator is told, once (not per connection)
            notes = [r for r in caplog.records if "without the client's address" in r.message]
            assert len(notes) == 1 and "t1" in notes[0].message
            assert header.version == int(version[1]) and header.source is None
            if expected is not None:
                assert proxyproto.encode_v1() == expected
    finally:
        await forwarder.close()
        target.close()


# -- UDP ----------------------------------------------------------------------------------


class DatagramRecorder(asyncio.DatagramProtocol):
    """A stand-in that keeps every datagram and answers ``echo:`` + what follows the
    header it may carry."""

    def __init__(self, *, headed: bool) -> None:
        self.headed = headed
        self.seen: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.put_nowait((data, addr))
        payload = data
        if self.headed:
            with contextlib.suppress(proxyproto.ProxyHeaderError):
                _, payload = proxyproto.split_datagram(data)
        assert self.transport is not None
        self.transport.sendto(b"echo:" + payload, addr)


class Socket(asyncio.DatagramProtocol):
    """A client (or a gateway's flow) socket that queues what it receives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


@contextlib.asynccontextmanager
async def datagram_endpoint(
    protocol: asyncio.DatagramProtocol, **where: Any
) -> AsyncIterator[asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, **where)
    try:
        yield transport
    finally:
        transport.close()


async def nothing_arrives(queue: asyncio.Queue[Any], wait: float = 0.2) -> None:
    with contextlib.suppress(TimeoutError):
        got = await asyncio.wait_for(queue.get(), wait)
        raise AssertionError(f"unexpected datagram {got!r}")


async def test_gateway_udp_prefixes_every_datagram_with_its_client() -> None:
    public, tunnel_port = free_port(kind=2), free_port(PEER, kind=2)
    plain_port = free_port(kind=2)
    router, metrics = Router(), Metrics()
    headed, raw = DatagramRecorder(headed=True), DatagramRecorder(headed=False)
    forwarder = UdpForwarder(
        router,
        settings=UdpSettings(bind_host="127.0.0.1", proxy_port=tunnel_port),
        metrics=metrics,
    )
    router.replace_all([raw_tunnel("u1", "udp", public, "v2"), raw_tunnel("u2", "udp", plain_port)])
    one, two = Socket(), Socket()
    async with (
        asyncio.timeout(10),
        datagram_endpoint(headed, local_addr=(PEER, tunnel_port)),
        datagram_endpoint(raw, local_addr=(PEER, plain_port)),
        datagram_endpoint(one, remote_addr=("127.0.0.1", public)) as first,
        datagram_endpoint(two, remote_addr=("127.0.0.1", public)) as second,
    ):
        await forwarder.start()
        try:
            headers = {}
            for sock, queue, name in ((first, one.queue, b"a"), (second, two.queue, b"b")):
                sent = []
                for index in range(3):
                    sock.sendto(name + bytes([48 + index]))
                    sent.append(name + bytes([48 + index]))
                    assert await queue.get() == b"echo:" + sent[-1]  # replies as they were
                local = sock.get_extra_info("sockname")
                for payload in sent:
                    data, _ = await headed.seen.get()
                    header, rest = proxyproto.split_datagram(data)
                    assert rest == payload
                    assert header.command == proxyproto.COMMAND_PROXY
                    assert header.transport == "udp" and header.tlvs == ()
                    assert header.source == (local[0], local[1])
                    assert header.destination == ("127.0.0.1", public)
                    headers.setdefault(name, set()).add(data[: -len(payload)])
            assert all(len(found) == 1 for found in headers.values())  # one per flow
            assert metrics.udp_bytes.get(tunnel="u1", direction="in") == 12  # payloads only
            # a tunnel without the setting: to its raw port, bare
            async with datagram_endpoint(Socket(), remote_addr=("127.0.0.1", plain_port)) as s:
                s.sendto(b"bare")
                assert (await raw.seen.get())[0] == b"bare"
        finally:
            await forwarder.close()


class AgentUdp:
    """The agent's UDP forwarder on kernel sockets: raw ports and the tunnel port on
    127.0.0.1, targets resolved to the recorder on 127.0.0.2."""

    def __init__(self, tunnel_port: int) -> None:
        self.tunnel_port = tunnel_port
        self.target = DatagramRecorder(headed=True)
        self.other = DatagramRecorder(headed=True)
        self.target_port = free_port(PEER, kind=2)
        self.other_port = free_port(PEER, kind=2)
        self.router = Router(upstream=lambda text: (PEER, int(text.rpartition(":")[2]), ""))
        self.metrics = Metrics()
        self.forwarder = UdpForwarder(
            self.router,
            settings=UdpSettings(bind_host="127.0.0.1", tunnel_port=tunnel_port),
            metrics=self.metrics,
        )

    def tunnel(
        self, tunnel_id: str, port: int, proxy: str | None, other: bool = False
    ) -> TunnelSpec:
        target = self.other_port if other else self.target_port
        return raw_tunnel(tunnel_id, "udp", port, proxy, target=f"{PEER}:{target}")

    async def settle(self) -> None:
        await self.forwarder.wait_reconciled()


def gateway_header(client: tuple[str, int], public: int) -> bytes:
    return proxyproto.encode(source=client, destination=("198.51.100.1", public), transport="udp")


def tunnel_port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_agent_udp_tunnel_port(caplog: pytest.LogCaptureFixture) -> None:
    tunnel_port = free_port(kind=2)
    public, other_public = 40001, 40002  # only named in headers: never bound here
    agent = AgentUdp(tunnel_port)
    gateway, stranger = Socket(), Socket()
    async with (
        asyncio.timeout(20),
        datagram_endpoint(agent.target, local_addr=(PEER, agent.target_port)),
        datagram_endpoint(agent.other, local_addr=(PEER, agent.other_port)),
        datagram_endpoint(gateway, remote_addr=("127.0.0.1", tunnel_port)) as flow,
        datagram_endpoint(stranger, remote_addr=("127.0.0.1", tunnel_port)) as second,
    ):
        agent.router.replace_all([agent.tunnel("u0", 40000, None)])
        await agent.forwarder.start()
        try:
            # bound only while a tunnel has the setting
            assert tunnel_port_free(tunnel_port)
            agent.router.replace_all(
                [agent.tunnel("u1", public, "v2"), agent.tunnel("u2", other_public, None, True)]
            )
            await agent.settle()
            assert not tunnel_port_free(tunnel_port)

            header = gateway_header(("203.0.113.9", 5555), public)
            for payload in (b"one", b"", b"three"):
                flow.sendto(header + payload)
                assert await gateway.queue.get() == b"echo:" + payload  # no header back
                data, _ = await agent.target.seen.get()
                got, rest = proxyproto.split_datagram(data)
                assert rest == payload
                assert got.source == ("203.0.113.9", 5555)
                assert got.destination == ("198.51.100.1", public)
                assert got.transport == "udp" and got.tlvs == ()

            # what is dropped, each counted; nothing reaches a target
            bad = {
                "another client in the flow": gateway_header(("203.0.113.10", 1), public) + b"x",
                "no header": b"x",
                "a truncated header": header[:20],
                "a LOCAL header": proxyproto.encode() + b"x",
                "a TCP header": proxyproto.encode(
                    source=("203.0.113.9", 1), destination=("198.51.100.1", public)
                )
                + b"x",
                "a v1 line": b"PROXY TCP4 203.0.113.9 198.51.100.1 1 40001\r\nx",
                "a port with no tunnel": gateway_header(("203.0.113.9", 1), 40009) + b"x",
            }
            with caplog.at_level(logging.WARNING, logger="common.relay.udp"):
                flow.sendto(bad.pop("another client in the flow"))
                for datagram in bad.values():
                    second.sendto(datagram)
                await nothing_arrives(agent.target.seen)
            assert rejected(agent.metrics, "proxy_header") == 7
            assert gateway.queue.empty() and stranger.queue.empty()
            # logged, but not once per datagram
            assert len([r for r in caplog.records if "dropped a datagram" in r.message]) == 1

            # the agent without the setting for this tunnel (the gateway saw it first):
            # the target gets the client's payload bare
            second.sendto(gateway_header(("203.0.113.9", 7), other_public) + b"bare")
            assert await stranger.queue.get() == b"echo:bare"
            assert (await agent.other.seen.get())[0] == b"bare"

            # a change of the tunnel's route ends its flows: the next datagram opens a
            # flow to the new target
            agent.router.upsert(agent.tunnel("u1", public, "v2", other=True))
            await agent.settle()
            flow.sendto(header + b"moved")
            assert await gateway.queue.get() == b"echo:moved"
            data, _ = await agent.other.seen.get()
            assert proxyproto.split_datagram(data)[1] == b"moved"
            assert agent.target.seen.empty()

            # no tunnel with the setting left: the port is let go
            agent.router.replace_all([agent.tunnel("u2", other_public, None)])
            await agent.settle()
            assert tunnel_port_free(tunnel_port)
        finally:
            await agent.forwarder.close()


async def test_agent_udp_tunnel_port_taken_by_a_plain_tunnel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tunnel_port = free_port(kind=2)
    agent = AgentUdp(tunnel_port)
    client = Socket()
    async with (
        asyncio.timeout(10),
        datagram_endpoint(agent.target, local_addr=(PEER, agent.target_port)),
        datagram_endpoint(client, remote_addr=("127.0.0.1", tunnel_port)) as sock,
    ):
        with caplog.at_level(logging.WARNING, logger="common.relay.udp"):
            agent.router.replace_all(
                [agent.tunnel("plain", tunnel_port, None), agent.tunnel("u1", 40001, "v2")]
            )
            await agent.forwarder.start()
        try:
            assert any(
                "cannot be served" in r.message and "plain" in r.message for r in caplog.records
            )
            # the plain tunnel keeps its port: its datagrams are relayed bare
            sock.sendto(b"hi")
            assert await client.queue.get() == b"echo:hi"
            assert (await agent.target.seen.get())[0] == b"hi"
            # once it is gone, the port serves the tunnel with the setting
            agent.router.replace_all([agent.tunnel("u1", 40001, "v2")])
            await agent.forwarder.wait_reconciled()
            sock.sendto(gateway_header(("203.0.113.1", 9), 40001) + b"hi")
            assert await client.queue.get() == b"echo:hi"
            data, _ = await agent.target.seen.get()
            assert proxyproto.split_datagram(data)[0].source == ("203.0.113.1", 9)
        finally:
            await agent.forwarder.close()


async def test_agent_udp_on_the_raw_port_says_the_address_is_unknown() -> None:
    public = free_port(kind=2)
    agent = AgentUdp(free_port(kind=2))
    client = Socket()
    async with (
        asyncio.timeout(10),
        datagram_endpoint(agent.target, local_addr=(PEER, agent.target_port)),
        datagram_endpoint(client, remote_addr=("127.0.0.1", public)) as sock,
    ):
        agent.router.replace_all([agent.tunnel("u1", public, "v2")])
        await agent.forwarder.start()
        try:
            sock.sendto(b"hi")
            assert await client.queue.get() == b"echo:hi"
            data, _ = await agent.target.seen.get()
            header, payload = proxyproto.split_datagram(data)
            assert header.command == proxyproto.COMMAND_LOCAL and payload == b"hi"
        finally:
            await agent.forwarder.close()
