"""The proxy's fast path (``http.py``, step 3): a bodiless, replayable request on an
idle pooled agent connection is relayed from the transports' callbacks.  These tests
pin what that path must keep of the coroutine path's behaviour: answers in order,
pipelining, 1xx, deadlines (504, a stalled body aborts), back-pressure both ways, a
client that goes away, and the coroutine path for what the fast path does not take.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from common.relay.splice import reset
from tests.gateway.agentapp import ProxyHarness, RawServer, read_response, tunnel

HOST = "app.example.com"
GET = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def gateway(handler: object, **settings: object) -> AsyncIterator[ProxyHarness]:
    upstream = await RawServer(handler).start()  # type: ignore[arg-type]
    harness = await ProxyHarness(upstream.port, **settings).start()
    harness.router.replace_all([tunnel("t1", HOST)])
    try:
        yield harness
    finally:
        await harness.close()
        await upstream.stop()


async def requests_of(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        try:
            yield await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return


async def ok_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with its request line as the body."""
    async for head in requests_of(reader):
        body = head.split(b"\r\n", 1)[0]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


async def open_client(harness: ProxyHarness) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", harness.port)


def after_first(then: Callable[[asyncio.StreamWriter, int], Awaitable[None]]) -> Handler:
    """An agent that answers the first request on a connection with ``OK`` (so the
    gateway pools that connection) and each later one (numbered from 2) with ``then``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls = 0
        async for _ in requests_of(reader):
            calls += 1
            if calls == 1:
                writer.write(OK)
            else:
                await then(writer, calls)
            await writer.drain()

    return handler


async def pooled_client(
    harness: ProxyHarness,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose first request went through: its agent connection is now pooled,
    so the next request takes the fast path."""
    reader, writer = await open_client(harness)
    writer.write(GET)
    assert (await read_response(reader))[0] == 200
    return reader, writer


async def test_a_keep_alive_run_of_gets_takes_the_fast_path() -> None:
    async with gateway(ok_server) as harness:
        reader, writer = await open_client(harness)
        for index in range(20):
            writer.write(f"GET /{index} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            status, _, body = await read_response(reader)
            assert (status, body) == (200, f"GET /{index} HTTP/1.1".encode())
        writer.close()
        proxy = harness.proxy
        # the first request dials (coroutine path), every later one reuses it
        assert proxy.pool.dials == 1 and proxy.fast_exchanges == 19


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with gateway(ok_server) as harness:
        reader, writer = await pooled_client(harness)
        writer.write(
            b"".join(f"GET /{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for i in range(50))
        )
        for index in range(50):
            _, _, body = await read_response(reader)
            assert body == f"GET /{index} HTTP/1.1".encode()
        writer.close()
        assert harness.proxy.fast_exchanges == 50


async def test_informational_responses_and_chunked_bodies_are_relayed() -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _ in requests_of(reader):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    async with gateway(hints) as harness:
        reader, writer = await open_client(harness)
        for _ in range(2):
            writer.write(GET)
            early = await reader.readuntil(b"\r\n\r\n")
            assert early.startswith(b"HTTP/1.1 103 ") and b"link: </a.css>" in early.lower()
            head = await reader.readuntil(b"\r\n\r\n")
            assert (
                head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
            )
            assert await reader.readuntil(b"0\r\n\r\n") == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        writer.close()
        assert harness.proxy.fast_exchanges == 1


async def test_an_agent_that_does_not_answer_gets_504_and_the_connection_goes_on() -> None:
    async def second_never(writer: asyncio.StreamWriter, call: int) -> None:
        if call == 2:
            await asyncio.sleep(30)  # the second request is never answered
        writer.write(OK)

    async with gateway(after_first(second_never), response_header_timeout=0.3) as harness:
        reader, writer = await pooled_client(harness)
        writer.write(GET)
        status, _, _ = await read_response(reader)
        assert status == 504 and harness.proxy.fast_exchanges == 1
        writer.write(GET)  # the same client connection serves the next request
        assert (await read_response(reader))[0] == 200
        writer.close()
        timeouts = harness.metrics.upstream_errors.get(tunnel="t1", kind="timeout")
        assert timeouts == 1


async def test_a_body_that_stalls_aborts_the_client_connection() -> None:
    async def stalls(writer: asyncio.StreamWriter, call: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")

    async with gateway(after_first(stalls), body_idle_timeout=0.3) as harness:
        reader, writer = await pooled_client(harness)
        writer.write(GET)
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: 10" in head.lower()
        rest = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                rest = await reader.read()  # ends: EOF or reset, never 10 bytes
        assert rest in (b"", b"hal") and len(rest) < 10
        writer.close()


async def test_a_client_that_does_not_read_back_pressures_the_agent() -> None:
    total = 64 * 1024 * 1024
    sent = 0

    async def big(writer: asyncio.StreamWriter, call: int) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent < total:
            writer.write(block)
            sent += len(block)
            await writer.drain()

    async with gateway(after_first(big)) as harness:
        reader, writer = await pooled_client(harness)
        writer.write(GET)
        await asyncio.sleep(1.0)  # the client reads nothing meanwhile
        stalled_at = sent
        # kernel buffers on three sockets and the transport's high-water mark: a few
        # MB, never the whole body (it would all sit in the gateway's memory)
        assert stalled_at < 24 * 1024 * 1024, stalled_at
        await reader.readuntil(b"\r\n\r\n")
        received = 0
        async with asyncio.timeout(30):
            while received < total:
                chunk = await reader.read(1 << 20)
                assert chunk
                received += len(chunk)
        assert received == total and harness.proxy.fast_exchanges == 1
        writer.close()


async def test_pipelining_client_that_never_reads_is_paused() -> None:
    async with gateway(ok_server) as harness:
        _reader, writer = await open_client(harness)
        # 404s are answered in the callback: a client that sends and never reads
        # must be paused, not answered into an unbounded buffer
        flood = b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n" * 20000
        for _ in range(200):  # (bounded; a loaded machine may need more than a few rounds)
            if writer.transport.get_write_buffer_size() < 4 * 1024 * 1024:
                writer.write(flood)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await writer.drain()
            sessions = list(harness.proxy._sessions)
            if sessions and sessions[0]._read_paused:
                break
        (session,) = list(harness.proxy._sessions)
        assert session._read_paused
        transport = session.transport
        assert transport is not None
        assert transport.get_write_buffer_size() < 1024 * 1024
        writer.transport.abort()


async def test_a_client_that_leaves_mid_response_drops_the_agent_connection() -> None:
    gate = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter, call: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        gate.set()
        await asyncio.sleep(30)

    async with gateway(after_first(slow)) as harness:
        reader, writer = await pooled_client(harness)
        writer.write(GET)
        await gate.wait()
        await reader.readuntil(b"\r\n\r\n")
        reset(writer.transport)  # gone for good (a FIN alone still gets the answer)
        for _ in range(100):
            if harness.proxy.pool.active_count("127.0.0.1", harness.settings.upstream_port) == 0:
                break
            await asyncio.sleep(0.02)
        assert harness.proxy.pool.active_count("127.0.0.1", harness.settings.upstream_port) == 0
        assert harness.proxy.pool.idle_count() == 0  # the half-read connection is not pooled


async def test_bodies_and_unsafe_methods_take_the_coroutine_path() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async with gateway(echo) as harness:
        reader, writer = await pooled_client(harness)
        for _ in range(3):
            writer.write(
                f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello".encode()
            )
            assert (await read_response(reader))[2] == b"hello"
            writer.write(GET)  # and back to the fast path in between
            assert (await read_response(reader))[0] == 200
        writer.close()
        assert harness.proxy.fast_exchanges == 3


async def test_a_client_that_half_closes_still_gets_its_answer() -> None:
    async with gateway(ok_server) as harness:
        reader, writer = await pooled_client(harness)
        writer.write(GET)
        writer.write_eof()  # e.g. `nc -N`: the request, then FIN
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"GET / HTTP/1.1")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # then the gateway closes
        writer.close()
        assert harness.proxy.fast_exchanges == 1
