"""The agent's HTTP-tunnel listener (``agent.forward.HttpTunnels``) on a kernel socket:
PROXY v2 header → tunnel → splice to a local target, with half-close and
back-pressure; every bad, late or foreign header is refused without dialling.

The tunnelled connection's client plays the gateway; targets are small asyncio
servers on loopback that count the connections they accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from agent.forward import HttpTunnels, LocalDialer, resolve_target
from common.protocol import TunnelSpec, parse_tunnel
from common.relay import proxyproto
from common.relay.metrics import Metrics
from common.relay.router import Router
from tests.support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: socket buffers for the back-pressure test: fixed (no autotuning) and small, so what
#: the kernel may hold is bounded and the test stays quick
SMALL_BUFFER = 64 * 1024


def listening_socket(*, small_buffers: bool) -> socket.socket:
    """A listener on 127.0.0.1; accepted sockets inherit a fixed small receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if small_buffers:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


class LocalService:
    """A tunnel's target on 127.0.0.1: runs ``handler`` per connection, counts accepts."""

    def __init__(self, handler: Handler, *, small_buffers: bool = False) -> None:
        self.handler = handler
        self.small_buffers = small_buffers
        self.accepts = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def __aenter__(self) -> LocalService:
        self.server = await asyncio.start_server(
            self._on_connect, sock=listening_socket(small_buffers=self.small_buffers)
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.wait_for(self.server.wait_closed(), 2)


async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Speaks first, so a connection dialled by mistake shows up as data at the client."""
    writer.write(b"hello from the target\n")
    await writer.drain()
    await reader.read()


def http_tunnel(tunnel_id: str, port: int, **extra: Any) -> TunnelSpec:
    """An HTTP tunnel as Control describes it, its target on 127.0.0.1:``port``."""
    return parse_tunnel(
        {
            "id": tunnel_id,
            "protocol": "http",
            "domain": f"{tunnel_id}.example.com",
            "target": f"127.0.0.1:{port}",
            "agentId": "a",
            "agentIp": "100.64.0.100",
            "enabled": True,
            **extra,
        }
    )


@dataclass
class Agent:
    """``HttpTunnels`` serving a kernel listener on 127.0.0.1."""

    tunnels: HttpTunnels
    metrics: Metrics
    port: int

    async def connect(
        self, *, small_buffers: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not small_buffers:
            return await asyncio.open_connection("127.0.0.1", self.port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def rejected(self, reason: str) -> float:
        return self.metrics.rejected.get(reason=reason)

    def open_connections(self) -> float:
        return self.metrics.active_connections.get(listener="http_tunnel")

    async def wait_idle(self) -> None:
        """Until every tunnelled connection has ended."""
        while self.open_connections():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_agent(
    tunnels: list[TunnelSpec],
    *,
    header_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    idle_timeout: float = 30.0,
    small_buffers: bool = False,
) -> AsyncIterator[Agent]:
    router = Router(upstream=resolve_target)
    dialer = LocalDialer()
    dialer.update(tunnels)
    router.replace_all(tunnels)
    metrics = Metrics()
    http = HttpTunnels(
        router,
        dialer,
        metrics,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        header_timeout=header_timeout,
    )
    sock = listening_socket(small_buffers=small_buffers)
    server = await asyncio.get_running_loop().create_server(http.protocol, sock=sock)
    try:
        yield Agent(http, metrics, int(server.sockets[0].getsockname()[1]))
    finally:
        server.close()
        await http.close(grace=1.0)
        await asyncio.wait_for(server.wait_closed(), 2)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def expect_refused(reader: asyncio.StreamReader, within: float = 3.0) -> None:
    """The agent ends the connection (reset or EOF) without a byte from any target."""
    async with asyncio.timeout(within):
        try:
            data = await reader.read()
        except ConnectionResetError:
            return
    assert data == b""


def header(tunnel_id: str) -> bytes:
    return proxyproto.encode(tunnel_id=tunnel_id)


# -- spliced connections ------------------------------------------------------------


async def test_bytes_reach_the_target_verbatim_both_ways() -> None:
    # another PROXY header inside the payload is payload: only the first one is read
    request = b"GET / HTTP/1.1\r\nHost: t1.example.com\r\n\r\n" + header("other") + bytes(256)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n" + bytes(range(256)) * 512
    received: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readexactly(len(request)))
        writer.write(response)
        await writer.drain()  # then close: the client must still get every byte

    async with (
        asyncio.timeout(10),
        LocalService(answer) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        reader, writer = await agent.connect()
        writer.write(header("t1") + request)  # header and payload in one write
        await writer.drain()
        assert await reader.read() == response
        await close(writer)
        await agent.wait_idle()
        assert received == [request]
        assert target.accepts == 1
        metrics = agent.metrics
        assert metrics.http_tunnel_connections.get(tunnel="t1") == 1
        assert metrics.http_tunnel_bytes.get(tunnel="t1", direction="in") == len(request)
        assert metrics.http_tunnel_bytes.get(tunnel="t1", direction="out") == len(response)
        assert agent.rejected("proxy_header") == agent.rejected("unknown_tunnel") == 0


async def test_header_alone_then_payload_later() -> None:
    seen: list[bytes] = []

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readexactly(5))
        writer.write(b"echo:" + seen[-1])
        await writer.drain()

    async with (
        asyncio.timeout(10),
        LocalService(echo_once) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        reader, writer = await agent.connect()
        writer.write(header("t1"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"hello")
        assert await reader.read() == b"echo:hello"
        await close(writer)
        assert seen == [b"hello"]


async def test_target_that_answers_and_closes_at_once() -> None:
    # its greeting and its EOF may both arrive before the agent's dial has returned
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye\n")
        writer.write_eof()  # with the greeting, in one go
        await reader.read()

    async with (
        asyncio.timeout(10),
        LocalService(say_bye) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        reader, writer = await agent.connect()
        writer.write(header("t1"))
        assert await asyncio.wait_for(reader.read(), 3) == b"bye\n"
        await close(writer)
        await asyncio.wait_for(agent.wait_idle(), 3)


async def test_half_close_both_ways() -> None:
    target_saw_eof = asyncio.Event()

    async def read_to_eof_then_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await reader.read()  # ends only at the client's EOF
        target_saw_eof.set()
        await asyncio.sleep(0.05)  # the reverse direction still open after that EOF
        writer.write(b"got %d bytes: " % len(data) + data[:5])
        await writer.drain()
        writer.write(b" - and more, later")
        await writer.drain()
        writer.write_eof()
        await reader.read()  # until the agent closes its side too

    async with (
        asyncio.timeout(10),
        LocalService(read_to_eof_then_answer) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        reader, writer = await agent.connect()
        writer.write(header("t1") + b"hello world")
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(target_saw_eof.wait(), 3)
        assert await reader.read() == b"got 11 bytes: hello - and more, later"
        assert reader.at_eof()
        await close(writer)
        await agent.wait_idle()
        assert not target.tasks  # the target's connection ended as well
        assert agent.metrics.http_tunnel_bytes.get(tunnel="t1", direction="out") == 37


def pattern(index: int, size: int) -> bytes:
    """Chunk ``index`` of the test stream: distinct, so a lost or reordered chunk shows."""
    block = hashlib.sha256(index.to_bytes(4, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


async def test_back_pressure_stalls_the_sender_then_every_byte_arrives() -> None:
    total = 64 * 1024 * 1024
    chunk = 256 * 1024
    release = asyncio.Event()

    async def slow_then_hash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()  # not reading: the agent must stop reading the client
        digest = hashlib.sha256()
        count = 0
        while data := await reader.read(1024 * 1024):
            digest.update(data)
            count += len(data)
        writer.write(f"{count} {digest.hexdigest()}".encode())
        await writer.drain()

    expected = hashlib.sha256()
    for index in range(total // chunk):
        expected.update(pattern(index, chunk))

    async with (
        asyncio.timeout(30),
        LocalService(slow_then_hash, small_buffers=True) as target,
        running_agent([http_tunnel("t1", target.port)], small_buffers=True) as agent,
    ):
        reader, writer = await agent.connect(small_buffers=True)
        writer.write(header("t1"))
        index = 0
        stalled = False
        while index < total // chunk:
            writer.write(pattern(index, chunk))
            index += 1
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                stalled = True
                break
        accepted = index * chunk
        # kernel buffers on three sockets plus the agent's bounded ones: a few MiB
        assert stalled, "the client could send 64 MiB to a target that never read"
        assert accepted < 16 * 1024 * 1024, accepted  # measured: 4.5 MiB on Linux defaults
        assert target.accepts == 1
        release.set()
        while index < total // chunk:
            writer.write(pattern(index, chunk))
            index += 1
            await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        assert answer == f"{total} {expected.hexdigest()}".encode()
        await close(writer)
        assert agent.metrics.http_tunnel_bytes.get(tunnel="t1", direction="in") == total


async def test_many_tunnels_each_reach_their_own_target() -> None:
    def named(name: bytes) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(name + b":" + await reader.read())
            await writer.drain()

        return handler

    async with (
        asyncio.timeout(10),
        LocalService(named(b"one")) as one,
        LocalService(named(b"two")) as two,
    ):
        tunnels = [
            http_tunnel("t1", one.port),
            # the same domain as t1 (it loses the domain) and a URL target with a prefix:
            # the agent finds a tunnel by id and dials host:port of the URL
            http_tunnel(
                "t2", two.port, domain="t1.example.com", target=f"http://127.0.0.1:{two.port}/p"
            ),
        ]
        async with running_agent(tunnels) as agent:
            for tunnel_id, expected in (("t2", b"two:x"), ("t1", b"one:y"), ("t2", b"two:z")):
                reader, writer = await agent.connect()
                writer.write(header(tunnel_id) + expected[-1:])
                writer.write_eof()
                assert await reader.read() == expected
                await close(writer)
            assert (one.accepts, two.accepts) == (1, 2)


# -- refused connections: nothing is dialled ----------------------------------------


async def refuse_case(
    agent: Agent,
    target: LocalService,
    data: bytes,
    *,
    eof: bool = False,
    within: float = 3.0,
) -> None:
    reader, writer = await agent.connect()
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        await expect_refused(reader, within)
    finally:
        await close(writer)
    await asyncio.wait_for(agent.wait_idle(), 2)
    await asyncio.sleep(0.02)  # an accept the agent caused would have run by now
    assert target.accepts == 0
    assert agent.metrics.http_tunnel_connections.get(tunnel="t1") == 0


BAD_HEADERS = {
    "plain http": b"GET / HTTP/1.1\r\nHost: t1.example.com\r\n\r\n",
    "garbage": bytes(range(7, 64)),
    "v1 text header": b"PROXY TCP4 192.0.2.1 100.64.0.100 4711 80\r\nGET / HTTP/1.1\r\n\r\n",
    "version 1 binary": b"\r\n\r\n\x00\r\nQUIT\n\x11" + header("t1")[13:],
    "oversize length": header("t1")[:14] + b"\xff\xff" + bytes(64),
    "non-utf8 tunnel id": proxyproto.SIGNATURE + b"\x20\x00\x00\x04\xe0\x00\x01\xff",
}


@pytest.mark.parametrize("data", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
async def test_bad_header_is_refused(data: bytes) -> None:
    async with (
        asyncio.timeout(10),
        LocalService(greeter) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        await refuse_case(agent, target, data)
        assert agent.rejected("proxy_header") == 1
        assert agent.rejected("unknown_tunnel") == 0


@pytest.mark.parametrize("cut", [0, 8, 16, 19])
async def test_truncated_header_then_eof_is_refused(cut: int) -> None:
    async with (
        asyncio.timeout(10),
        LocalService(greeter) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        await refuse_case(agent, target, header("t1")[:cut], eof=True)
        assert agent.rejected("proxy_header") == 1


@pytest.mark.parametrize("cut", [0, 10, 18])
async def test_truncated_header_then_stall_is_refused_after_the_header_timeout(cut: int) -> None:
    loop = asyncio.get_running_loop()
    async with (
        asyncio.timeout(10),
        LocalService(greeter) as target,
        running_agent([http_tunnel("t1", target.port)], header_timeout=0.3) as agent,
    ):
        start = loop.time()
        await refuse_case(agent, target, header("t1")[:cut], within=3.0)
        assert 0.25 <= loop.time() - start < 3.0
        assert agent.rejected("proxy_header") == 1


REFUSED_TUNNELS = {
    "unknown tunnel": header("nope"),
    "disabled tunnel": header("off"),
    "tcp tunnel": header("raw"),
    "no tunnel tlv": proxyproto.encode(),
    "proxy header without tunnel": proxyproto.encode(
        source=("192.0.2.1", 4711), destination=("100.64.0.100", 80)
    ),
    "removed tunnel": header("gone"),
}


@pytest.mark.parametrize("data", list(REFUSED_TUNNELS.values()), ids=list(REFUSED_TUNNELS))
async def test_header_naming_a_tunnel_not_served_is_refused(data: bytes) -> None:
    async with asyncio.timeout(10), LocalService(greeter) as target:
        port = target.port
        tunnels = [
            http_tunnel("t1", port),
            http_tunnel("off", port, enabled=False),
            dataclasses.replace(
                http_tunnel("raw", port), protocol="tcp", domain=None, public_port=2222
            ),
            http_tunnel("gone", port),
        ]
        async with running_agent(tunnels) as agent:
            router = agent.tunnels.router
            router.replace_all([t for t in tunnels if t.id != "gone"])
            assert router.lookup_tunnel("off") is not None  # known, but disabled
            assert router.lookup_port("tcp", 2222) is not None
            await refuse_case(agent, target, data + b"GET / HTTP/1.1\r\n\r\n")
            assert agent.rejected("unknown_tunnel") == 1
            assert agent.rejected("proxy_header") == 0


async def test_a_disabled_tunnel_serves_again_once_enabled() -> None:
    async with asyncio.timeout(10), LocalService(greeter) as target:
        tunnels = [http_tunnel("t1", target.port, enabled=False)]
        async with running_agent(tunnels) as agent:
            await refuse_case(agent, target, header("t1"))
            agent.tunnels.router.replace_all([http_tunnel("t1", target.port)])
            reader, writer = await agent.connect()
            writer.write(header("t1"))
            assert await reader.readline() == b"hello from the target\n"
            await close(writer)
            assert target.accepts == 1


async def test_refused_target_resets_the_tunnelled_connection() -> None:
    closed_port = free_port()
    async with (
        asyncio.timeout(10),
        running_agent([http_tunnel("t1", closed_port)]) as agent,
    ):
        reader, writer = await agent.connect()
        writer.write(header("t1") + b"GET / HTTP/1.1\r\nHost: t1.example.com\r\n\r\n")
        await writer.drain()
        await expect_refused(reader)
        await close(writer)
        await agent.wait_idle()
        errors = agent.metrics.upstream_errors
        assert errors.get(tunnel="t1", kind="refused") == 1
        assert errors.get(tunnel="t1", kind="unreachable") == 0
        assert agent.metrics.http_tunnel_connections.get(tunnel="t1") == 1
        assert agent.rejected("proxy_header") == agent.rejected("unknown_tunnel") == 0


async def test_listener_keeps_serving_after_refusals() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        await writer.drain()

    async with (
        asyncio.timeout(10),
        LocalService(echo) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        for bad in (b"junk" * 8, header("nope")):
            reader, writer = await agent.connect()
            writer.write(bad)
            await expect_refused(reader)
            await close(writer)
        reader, writer = await agent.connect()
        writer.write(header("t1") + b"still here")
        writer.write_eof()
        assert await reader.read() == b"still here"
        await close(writer)
        assert agent.rejected("proxy_header") == agent.rejected("unknown_tunnel") == 1
        assert target.accepts == 1


# -- Control changes the tunnel list -------------------------------------------------


async def open_splice(
    agent: Agent, tunnel_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await agent.connect()
    writer.write(header(tunnel_id))
    assert await reader.readline() == b"hello from the target\n"
    return reader, writer


@pytest.mark.parametrize("change", ["deleted", "disabled", "retargeted"])
async def test_a_changed_tunnel_ends_its_open_connections(change: str) -> None:
    async with (
        asyncio.timeout(10),
        LocalService(greeter) as target,
        LocalService(greeter) as other_target,
    ):
        tunnels = [http_tunnel("t1", target.port), http_tunnel("t2", target.port)]
        async with running_agent(tunnels) as agent:
            reader1, writer1 = await open_splice(agent, "t1")
            reader2, writer2 = await open_splice(agent, "t2")
            if change == "deleted":
                changed = [tunnels[1]]
            elif change == "disabled":
                changed = [http_tunnel("t1", target.port, enabled=False), tunnels[1]]
            else:
                changed = [http_tunnel("t1", other_target.port), tunnels[1]]
            agent.tunnels.router.replace_all(changed)
            assert agent.tunnels.reconcile() == 1
            await expect_refused(reader1)  # ended: reset or EOF, nothing more
            # the other tunnel's connection is untouched and still spliced
            assert agent.tunnels.reconcile() == 0
            writer2.write(b"ping")
            await writer2.drain()
            assert not reader2.at_eof()
            await close(writer1)
            await close(writer2)
            await agent.wait_idle()
            if change == "retargeted":
                _, writer = await open_splice(agent, "t1")  # now the new target
                await close(writer)
                assert other_target.accepts == 1
            assert target.accepts == 2


async def test_an_unchanged_list_ends_nothing() -> None:
    async with asyncio.timeout(10), LocalService(greeter) as target:
        tunnels = [http_tunnel("t1", target.port)]
        async with running_agent(tunnels) as agent:
            reader, writer = await open_splice(agent, "t1")
            _, pending = await agent.connect()  # no header yet: not judged by reconcile
            agent.tunnels.router.replace_all([http_tunnel("t1", target.port)])
            assert agent.tunnels.reconcile() == 0
            writer.write_eof()
            assert await reader.read() == b""  # the target saw EOF and closed: half-close works
            await close(writer)
            await close(pending)
            assert target.accepts == 1


async def test_close_ends_spliced_connections_within_its_grace() -> None:
    async with (
        asyncio.timeout(10),
        LocalService(greeter) as target,
        running_agent([http_tunnel("t1", target.port)]) as agent,
    ):
        reader, writer = await open_splice(agent, "t1")
        await agent.tunnels.close(grace=0.1)
        assert agent.open_connections() == 0
        assert not agent.tunnels.open
        await expect_refused(reader)
        await close(writer)
