"""Fuzz the public listener with random and structured junk: every input gets an HTTP
answer or a close, never a hang or a crash, and the server keeps serving.

The proxy and a tiny agent run on their own event loop in a background thread, so
hypothesis can drive plain blocking sockets from the test thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.proxy import LimitSettings
from tests.gateway.agentapp import ProxyHarness, RawServer, tunnel


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()


class Background:
    """Proxy + agent on a private loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        agent = await RawServer(_agent).start()
        limits = LimitSettings(header_timeout=1.0, idle_timeout=1.0, rate=0, max_header_bytes=4096)
        harness = ProxyHarness(agent.port, limits=limits, body_idle_timeout=1.0)
        harness.router.replace_all([tunnel("t1", "app.example.com")])
        await harness.start()
        self.port = harness.port
        self.ready.set()
        await self._stop.wait()
        await harness.close()
        await agent.stop()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10)

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def background() -> Iterator[tuple[Background, _Errors]]:
    errors = _Errors()
    logger = logging.getLogger("gateway.proxy")
    logger.addHandler(errors)
    bg = Background()
    bg.start()
    try:
        yield bg, errors
    finally:
        bg.stop()
        logger.removeHandler(errors)


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while True:
                chunk = sock.recv(65536)  # a hang raises socket.timeout: the test fails
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def assert_serving(port: int) -> None:
    reply = exchange(port, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]


TOKENS = st.sampled_from(
    [b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"G\x00T", b"", b"get"]
)
TARGETS = st.sampled_from(
    [b"/", b"*", b"http://app.example.com/x", b"//", b"/%00", b"/\xff", b"", b"/a b", b"ftp://x/"]
)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"http/1.1"])
NAMES = st.sampled_from(
    [
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Upgrade",
        b"Expect",
        b"X-Forwarded-For",
        b"Bad Name",
        b"",
    ]
)
VALUES = st.one_of(
    st.sampled_from(
        [
            b"app.example.com",
            b"chunked",
            b"0",
            b"-1",
            b"99999999999999999999",
            b"close",
            b"websocket",
            b"100-continue",
            b"upgrade",
            b"gzip, chunked",
            b"5",
        ]
    ),
    st.binary(max_size=40),
)
SEPARATORS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n"])


@st.composite
def http_ish(draw: st.DrawFn) -> bytes:
    line = b" ".join([draw(TOKENS), draw(TARGETS), draw(VERSIONS)])
    sep = draw(SEPARATORS)
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=8))
    head = line + sep + b"".join(n + b": " + v + sep for n, v in fields) + sep
    return head + draw(st.binary(max_size=300))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.one_of(st.binary(max_size=3000), http_ish()))
def test_random_input_never_crashes_or_hangs(
    background: tuple[Background, _Errors], data: bytes
) -> None:
    bg, errors = background
    reply = exchange(bg.port, data)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:100]
    assert b"Traceback" not in reply
    assert not errors.records, [r.getMessage() for r in errors.records]


def test_still_serving_after_fuzz(background: tuple[Background, _Errors]) -> None:
    bg, errors = background
    assert_serving(bg.port)
    assert not errors.records


# -- a broken or hostile agent: whatever it answers, the gateway answers something sane


class AgentReplies:
    """What the fuzzed agent sends back (set per example from the test thread)."""

    def __init__(self) -> None:
        self.reply = b""
        self.close_after = True


class UpstreamBackground(Background):
    def __init__(self, replies: AgentReplies) -> None:
        super().__init__()
        self.replies = replies

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        replies = self.replies

        async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            writer.write(replies.reply)
            await writer.drain()
            if not replies.close_after:
                await asyncio.sleep(0.5)  # hold the connection: the proxy must time out

        upstream = await RawServer(agent).start()
        harness = ProxyHarness(
            upstream.port,
            limits=LimitSettings(rate=0),
            response_header_timeout=0.3,
            body_idle_timeout=0.3,
        )
        harness.router.replace_all([tunnel("t1", "app.example.com")])
        await harness.start()
        self.port = harness.port
        self.ready.set()
        await self._stop.wait()
        await harness.close()
        await upstream.stop()


@pytest.fixture(scope="module")
def upstream_background() -> Iterator[tuple[UpstreamBackground, AgentReplies, _Errors]]:
    errors = _Errors()
    logger = logging.getLogger("gateway.proxy")
    logger.addHandler(errors)
    replies = AgentReplies()
    bg = UpstreamBackground(replies)
    bg.start()
    try:
        yield bg, replies, errors
    finally:
        bg.stop()
        logger.removeHandler(errors)


STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 101 Switching Protocols",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 999 Weird",
        b"HTTP/1.1 20 Short",
        b"HTTP/2 200",
        b"",
    ]
)


@st.composite
def agent_reply(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    sep = draw(SEPARATORS)
    head = draw(STATUS_LINES) + sep + b"".join(n + b": " + v + sep for n, v in fields) + sep
    return head + draw(st.binary(max_size=300))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(reply=st.one_of(st.binary(max_size=500), agent_reply()), close_after=st.booleans())
def test_agent_garbage_never_crashes_the_gateway(
    upstream_background: tuple[UpstreamBackground, AgentReplies, _Errors],
    reply: bytes,
    close_after: bool,
) -> None:
    bg, replies, errors = upstream_background
    replies.reply, replies.close_after = reply, close_after
    answer = exchange(
        bg.port, b"GET / HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n"
    )
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
    assert not errors.records, [r.getMessage() for r in errors.records]
