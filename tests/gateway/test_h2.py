"""HTTP/2 at the edge (``gateway/proxy/h2session.py``, ``h2stream.py``): real HTTP/2
clients against the gateway's TLS listener (ALPN h2), the stand-in agent behind it
speaking HTTP/1.1.

httpx (with ``http2=True``) for what a client normally does: routing, the gateway's
pages, the access policy and identity fields, streaming both ways with hash checks,
errors.  ``RawH2``, the ``h2`` library as a client on a raw TLS connection, for what
a hostile one does: rapid reset (CVE-2023-44487), PING and SETTINGS floods, never
reading, header injection, oversized header lists, and for GOAWAY on idle and on
shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

from common.passwords import hash_password
from common.protocol import AccessPolicy, BasicUser
from common.relay.accesslog import AccessLogSettings
from gateway.proxy import LimitSettings
from gateway.proxy.h2settings import H2Settings
from gateway.tls import CertificateStore
from tests.gateway.agentapp import ProxyHarness, Uvicorn, pattern_sha256, tunnel

HOST = "app.example.com"


async def h2_proxy(agent_port: int, tmp: Path, **settings: Any) -> ProxyHarness:
    store = CertificateStore(tmp, alpn=("h2", "http/1.1"))
    harness = ProxyHarness(agent_port, ssl_context=store.server_context(), **settings)
    harness.router.replace_all(
        [tunnel("t1", HOST), tunnel("off", "off.example.com", enabled=False)]
    )
    return await harness.start()


@pytest.fixture
async def proxy(agent: Uvicorn, tmp_path: Path) -> AsyncIterator[ProxyHarness]:
    harness = await h2_proxy(agent.port, tmp_path / "tls")
    try:
        yield harness
    finally:
        await harness.close()


def client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(http2=True, verify=False, timeout=30, **options)


class RawH2:
    """An HTTP/2 client on a raw TLS connection: the h2 library's frames, or our own."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: H2Connection
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.eof = False

    @classmethod
    async def open(cls, port: int, *, validate: bool = True, window: int | None = None) -> RawH2:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=HOST
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        config = H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        conn = H2Connection(config)
        conn.initiate_connection()
        if window is not None:
            conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
            conn.increment_flow_control_window(window - 65_535)
        writer.write(conn.data_to_send())
        return cls(reader, writer, conn)

    def request(self, path: str, *, end: bool = True, extra: list[Any] | None = None) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", HOST.encode()),
            (b":path", path.encode()),
            *(extra or []),
        ]
        self.conn.send_headers(stream_id, headers, end_stream=end)
        self.writer.write(self.conn.data_to_send())
        return stream_id

    async def read(self, timeout: float = 10.0) -> list[Event]:
        """Events from the next bytes the gateway sent (none at EOF)."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return []
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, DataReceived) and event.stream_id:
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
        pending = self.conn.data_to_send()
        if pending and not self.writer.is_closing():
            with contextlib.suppress(ConnectionError, OSError):
                self.writer.write(pending)
        return list(events)

    async def until_closed(self, timeout: float = 10.0) -> list[Event]:
        """Every event until the gateway closes the connection."""
        seen: list[Event] = []
        async with asyncio.timeout(timeout):
            while not self.eof:
                seen += await self.read(timeout)
        return seen

    async def response(self, stream_id: int, timeout: float = 10.0) -> tuple[int, bytes]:
        status, body = 0, b""
        async with asyncio.timeout(timeout):
            while True:
                for event in await self.read(timeout):
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    if isinstance(event, ResponseReceived):
                        status = int(dict(event.headers or [])[b":status"])
                    elif isinstance(event, DataReceived):
                        body += event.data or b""
                    elif isinstance(event, StreamEnded):
                        return status, body
                    elif isinstance(event, StreamReset):
                        raise ConnectionResetError(f"stream reset {event.error_code!r}")
                if self.eof:
                    raise ConnectionError("closed")

    def close(self) -> None:
        self.writer.close()


def goaway(events: list[Event]) -> ConnectionTerminated | None:
    return next((e for e in events if isinstance(e, ConnectionTerminated)), None)


# -- what clients normally do ------------------------------------------------------------


async def test_routing_forwarding_and_pages(proxy: ProxyHarness) -> None:
    async with client() as http:
        answer = await http.get(
            f"{proxy.url}/headers?x=1",
            headers={"host": HOST, "x-forwarded-for": "6.6.6.6", "cookie": "a=1"},
        )
        assert answer.http_version == "HTTP/2" and answer.status_code == 200
        seen = answer.json()
        fields = dict(seen["headers"])
        assert fields["host"] == HOST and seen["query"] == "x=1"
        assert fields["x-forwarded-proto"] == "https"
        assert fields["x-forwarded-host"] == HOST
        # the client's list is kept, the peer the gateway saw appended and vouched for
        assert fields["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
        assert fields["x-real-ip"] == "127.0.0.1"
        # HTTP/2 sends cookies as separate fields; HTTP/1.1 gets one (RFC 9113 §8.2.3)
        cookies = await http.get(
            f"{proxy.url}/headers", headers=[("host", HOST), ("cookie", "a=1"), ("cookie", "b=2")]
        )
        assert [v for k, v in cookies.json()["headers"] if k == "cookie"] == ["a=1; b=2"]

        unknown = await http.get(f"{proxy.url}/", headers={"host": "nope.example.com"})
        assert unknown.status_code == 404 and "nope.example.com" in unknown.text
        assert unknown.headers["server"] == "kakuremichi-gateway"
        disabled = await http.get(f"{proxy.url}/", headers={"host": "off.example.com"})
        assert disabled.status_code == 503
        head = await http.head(f"{proxy.url}/download?n=1000&cl=1", headers={"host": HOST})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "1000"
        missing = await http.get(f"{proxy.url}/nothing", headers={"host": HOST})
        assert missing.status_code == 404 and missing.json() == {"error": "not found"}
    metrics = proxy.metrics
    assert metrics.requests.get(tunnel="t1", domain=HOST, code="200") == 3
    assert metrics.requests.get(tunnel="", domain="", code="404") == 1
    async with asyncio.timeout(5):
        while metrics.active_connections.get(listener="h2") != 0:
            await asyncio.sleep(0.02)


async def test_http2_off_means_http11(agent: Uvicorn, tmp_path: Path) -> None:
    store = CertificateStore(tmp_path, alpn=("http/1.1",))
    harness = ProxyHarness(agent.port, ssl_context=store.server_context())
    harness.router.replace_all([tunnel("t1", HOST)])
    await harness.start()
    try:
        async with client() as http:
            answer = await http.get(f"{harness.url}/headers", headers={"host": HOST})
        assert answer.http_version == "HTTP/1.1" and answer.status_code == 200
    finally:
        await harness.close()


async def test_streaming_both_ways_hash_checked(proxy: ProxyHarness) -> None:
    body = os.urandom(6 * 1024 * 1024 + 7)

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 100_000):
            yield body[at : at + 100_000]

    async with client() as http:
        url = f"{proxy.url}"
        # no content-length: chunked towards the agent
        streamed = await http.post(f"{url}/upload", content=pieces(), headers={"host": HOST})
        assert streamed.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
        sized = await http.post(f"{url}/upload", content=body, headers={"host": HOST})
        assert sized.json()["sha256"] == hashlib.sha256(body).hexdigest()
        echoed = await http.post(f"{url}/echo", content=pieces(), headers={"host": HOST})
        assert hashlib.sha256(echoed.content).digest() == hashlib.sha256(body).digest()
        n = 20 * 1024 * 1024 + 3
        download = await http.get(f"{url}/download?n={n}", headers={"host": HOST})
        assert len(download.content) == n
        assert hashlib.sha256(download.content).hexdigest() == pattern_sha256(n)
        # many streams on one connection at once
        sizes = [1_000_000 + i for i in range(12)]
        answers = await asyncio.gather(
            *(http.get(f"{url}/download?n={s}&cl=1", headers={"host": HOST}) for s in sizes)
        )
        assert [hashlib.sha256(a.content).hexdigest() for a in answers] == [
            pattern_sha256(s) for s in sizes
        ]
        assert {a.http_version for a in answers} == {"HTTP/2"}
    tunnel_bytes = proxy.metrics.request_bytes.get(tunnel="t1")
    assert tunnel_bytes == 3 * len(body)


async def test_access_policy_and_identity(proxy: ProxyHarness) -> None:
    alice = BasicUser("alice", hash_password("s3cret"))
    proxy.proxy.access.update((AccessPolicy(tunnel_id="t1", epoch=1, basic_users=(alice,)),), ())
    right = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"alice:nope").decode()
    async with client() as http:
        url = f"{proxy.url}/headers"
        refused = await http.get(url, headers={"host": HOST})
        assert refused.status_code == 401 and "basic" in refused.headers["www-authenticate"].lower()
        bad = await http.get(url, headers={"host": HOST, "authorization": wrong})
        assert bad.status_code == 401
        spoof = {"host": HOST, "authorization": right, "x-auth-user": "root", "x-auth-email": "x"}
        allowed = await http.get(url, headers=spoof)
        assert allowed.status_code == 200
        fields = allowed.json()["headers"]
        assert [v for k, v in fields if k == "x-auth-user"] == ["alice"]
        assert [v for k, v in fields if k == "x-auth-email"] == [""]
        # IP rules: the same tunnel closed to this address
        proxy.proxy.access.update(
            (AccessPolicy(tunnel_id="t1", epoch=2, ip_deny=("127.0.0.0/8",)),), ()
        )
        denied = await http.get(url, headers={"host": HOST})
        assert denied.status_code == 403 and denied.http_version == "HTTP/2"


async def test_agent_errors_are_gateway_pages(agent: Uvicorn, tmp_path: Path) -> None:
    closed = Uvicorn()  # a port nothing listens on
    harness = await h2_proxy(
        closed.port, tmp_path, response_header_timeout=0.5, pool_max_idle_per_agent=0
    )
    try:
        async with client() as http:
            refused = await http.get(f"{harness.url}/", headers={"host": HOST})
            assert refused.status_code == 502 and "refused" in refused.text
            harness.settings = harness.proxy.settings  # (unchanged; for the reader)
            harness.proxy.router.replace_all([tunnel("t1", HOST)])
    finally:
        await harness.close()
    slow = await h2_proxy(agent.port, tmp_path, response_header_timeout=0.5)
    try:
        async with client() as http:
            late = await http.get(f"{slow.url}/slow?delay=3", headers={"host": HOST})
            assert late.status_code == 504 and "did not answer" in late.text
        assert slow.metrics.upstream_errors.get(tunnel="t1", kind="timeout") == 1
    finally:
        await slow.close()


async def test_access_log_has_a_line_per_stream(agent: Uvicorn, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    harness = await h2_proxy(
        agent.port,
        tmp_path / "tls",
        access_log=AccessLogSettings(path=str(log_path), format="json"),
    )
    try:
        async with client() as http:
            await http.get(f"{harness.url}/headers?secret=1", headers={"host": HOST})
            await http.post(f"{harness.url}/upload", content=b"x" * 5000, headers={"host": HOST})
            await http.get(f"{harness.url}/", headers={"host": "nope.example.com"})
    finally:
        await harness.close()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(x["method"], x["path"], x["status"], x["decision"]) for x in lines] == [
        ("GET", "/headers", 200, "allow"),
        ("POST", "/upload", 200, "allow"),
        ("GET", "/", 404, "no_route"),
    ]
    assert lines[1]["bytes_in"] >= 5000 and lines[0]["bytes_out"] > 100
    assert lines[0]["tunnel"] == "t1" and lines[0]["client"] == "127.0.0.1"


# -- what hostile clients do -------------------------------------------------------------


async def test_rapid_reset_is_bounded(agent: Uvicorn, tmp_path: Path) -> None:
    """CVE-2023-44487: streams opened and reset at once cost a budget; spent, the
    connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed; others are served."""
    h2 = H2Settings(reset_burst=50, reset_rate=10.0)
    harness = await h2_proxy(agent.port, tmp_path, http2=h2)
    try:
        raw = await RawH2.open(harness.port)
        sent = 0
        with contextlib.suppress(ConnectionError, OSError):
            for _ in range(40):  # bounded: at most 40 bursts of 50 streams
                for _ in range(50):
                    stream_id = raw.request("/slow?delay=5")
                    raw.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                    sent += 1
                raw.writer.write(raw.conn.data_to_send())
                await raw.writer.drain()
                if raw.writer.is_closing():
                    break
        events = await raw.until_closed()
        ended = goaway(events)
        assert ended is not None and ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert harness.metrics.rejected.get(reason="h2_rapid_reset") == 1
        assert harness.proxy.pool.dials < 200, "reset streams must not each reach the agent"
        raw.close()
        async with client() as http:
            fine = await http.get(f"{harness.url}/headers", headers={"host": HOST})
        assert fine.status_code == 200
    finally:
        await harness.close()


@pytest.mark.parametrize("frame", ["ping", "settings", "empty_data"])
async def test_control_frame_floods_are_bounded(agent: Uvicorn, tmp_path: Path, frame: str) -> None:
    harness = await h2_proxy(agent.port, tmp_path, http2=H2Settings(control_burst=200))
    try:
        raw = await RawH2.open(harness.port)
        stream_id = raw.request("/upload", end=False) if frame == "empty_data" else 0
        with contextlib.suppress(ConnectionError, OSError):
            for i in range(2000):  # bounded; never reads meanwhile
                if frame == "ping":
                    raw.conn.ping(i.to_bytes(8, "big"))
                elif frame == "settings":
                    raw.conn.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 65536 + i})
                else:
                    raw.conn.send_data(stream_id, b"")
                raw.writer.write(raw.conn.data_to_send())
                if i % 100 == 0:
                    await raw.writer.drain()
        ended = goaway(await raw.until_closed())
        assert ended is not None and ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert harness.metrics.rejected.get(reason="h2_flood") == 1
    finally:
        await harness.close()


async def test_a_client_that_never_reads_is_dropped(agent: Uvicorn, tmp_path: Path) -> None:
    harness = await h2_proxy(agent.port, tmp_path, body_idle_timeout=1.0)
    try:
        raw = await RawH2.open(harness.port, window=2**31 - 1)
        raw.request("/download?n=200000000")  # 200 MB, never read
        loop = asyncio.get_running_loop()
        started = loop.time()
        while harness.metrics.rejected.get(reason="h2_unread") == 0:
            assert loop.time() - started < 15, "the gateway kept a client that does not read"
            await asyncio.sleep(0.1)
        while harness.proxy._sessions or harness.proxy.pool.active_count("127.0.0.1", agent.port):
            assert loop.time() - started < 15
            await asyncio.sleep(0.1)
        raw.close()
    finally:
        await harness.close()


async def test_header_injection_never_reaches_the_agent(proxy: ProxyHarness) -> None:
    """CR, LF, NUL or a space where HTTP/1.1 would split a head: refused, by the frame
    layer (the connection) or by admission (400); nothing goes to the agent."""
    path = "/headers"
    cases: list[tuple[str, list[tuple[bytes, bytes]]]] = [
        (path, [(b"x-evil", b"a\r\nx-injected: 1")]),
        (path, [(b"x-evil", b"a\nx-injected: 1")]),
        (path, [(b"x-evil", b"a\x00b")]),
        (path, [(b"bad name", b"v")]),
        (path, [(b"x-evil", b"\x7f")]),
        ("/a b HTTP/1.1\r\nx-injected: y", []),
        ("/a\tb", []),
        ("no-slash", []),
    ]
    refused = 0
    for target, extra in cases:
        raw = await RawH2.open(proxy.port, validate=False)
        try:
            stream_id = raw.request(target, extra=extra)
            try:
                status, body = await raw.response(stream_id)
            except (ConnectionError, OSError):
                continue  # refused by the frame layer (GOAWAY)
            assert status == 400, (target, extra, status, body[:200])
            refused += 1
        finally:
            raw.close()
    assert refused >= 3  # some reach admission: the gateway's own check is exercised
    assert proxy.proxy.pool.dials == 0


async def test_header_limits(agent: Uvicorn, tmp_path: Path) -> None:
    harness = await h2_proxy(
        agent.port, tmp_path, limits=LimitSettings(max_header_bytes=8192, max_header_count=20)
    )
    try:
        raw = await RawH2.open(harness.port)
        many = [(f"x-f{i}".encode(), b"v") for i in range(30)]
        status, _ = await raw.response(raw.request("/headers", extra=many))
        assert status == 431
        # beyond SETTINGS_MAX_HEADER_LIST_SIZE the connection itself is refused
        events: list[Event] = []
        with contextlib.suppress(ConnectionError, OSError):
            raw.request("/headers", extra=[(b"x-big", b"v" * 20_000)])
            events = await raw.until_closed()
        ended = goaway(events)
        assert ended is None or ended.error_code != ErrorCodes.NO_ERROR
        raw.close()
    finally:
        await harness.close()


async def test_idle_connection_gets_goaway(agent: Uvicorn, tmp_path: Path) -> None:
    harness = await h2_proxy(
        agent.port, tmp_path, limits=LimitSettings(idle_timeout=0.5, header_timeout=0.5)
    )
    try:
        raw = await RawH2.open(harness.port)
        status, _ = await raw.response(raw.request("/headers"))
        assert status == 200
        ended = goaway(await raw.until_closed(timeout=5))
        assert ended is not None and ended.error_code == ErrorCodes.NO_ERROR
        # a connection that never asks for anything: closed at the header deadline
        silent = await RawH2.open(harness.port)
        ended = goaway(await silent.until_closed(timeout=5))
        assert ended is not None
        raw.close()
        silent.close()
    finally:
        await harness.close()


async def test_shutdown_sends_goaway_and_finishes_streams(agent: Uvicorn, tmp_path: Path) -> None:
    """GOAWAY(NO_ERROR) naming the last stream served; that stream still gets its
    whole answer; then the connection closes.  (Read as raw frames: the h2 library as
    a client takes no frame after a GOAWAY.)"""
    harness = await h2_proxy(agent.port, tmp_path)
    raw = await RawH2.open(harness.port)
    try:
        stream_id = raw.request("/slow?delay=1")
        await asyncio.sleep(0.3)  # the request is with the agent
        closing = asyncio.ensure_future(harness.close())
        received = bytearray()
        async with asyncio.timeout(10):
            while data := await raw.reader.read(65536):
                received += data
        await closing
        frames = list(_buffer(bytes(received)))
        kinds = [type(f).__name__ for f in frames]
        away = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert len(away) == 1 and away[0].error_code == ErrorCodes.NO_ERROR
        assert away[0].last_stream_id == stream_id
        after = frames[frames.index(away[0]) :]
        headers = [f for f in after if isinstance(f, HeadersFrame)]
        data = [f for f in after if isinstance(f, DataFrame) and f.stream_id == stream_id]
        assert len(headers) == 1 and headers[0].stream_id == stream_id, kinds
        assert b'"slow"' in b"".join(bytes(f.data) for f in data)
        assert "END_STREAM" in data[-1].flags
    finally:
        raw.close()


def _buffer(data: bytes) -> FrameBuffer:
    buffer = FrameBuffer(server=False)
    buffer.max_frame_size = 2**24 - 1
    buffer.add_data(data)
    return buffer


# -- configuration ---------------------------------------------------------------------


def _gateway_values(argv: list[str], environ: dict[str, str]) -> Any:
    import argparse

    from common.config import add_settings, resolve
    from gateway.main import SETTINGS, settings_from

    parser = argparse.ArgumentParser()
    add_settings(parser, SETTINGS)
    base = ["--control-url", "http://127.0.0.1:1", "--api-key", "gtw_x", "--public-ip", "127.0.0.1"]
    return settings_from(resolve(parser.parse_args(base + argv), SETTINGS, environ))


def test_http2_settings_from_flags_and_environment() -> None:
    from common.config import ConfigError

    assert _gateway_values([], {}).http2 == H2Settings()
    off = _gateway_values(["--http2", "false", "--http2-max-streams", "8"], {})
    assert off.http2 == H2Settings(enabled=False, max_concurrent_streams=8)
    env = _gateway_values([], {"KAKUREMICHI_HTTP2_MAX_STREAMS": "250"})
    assert env.http2.max_concurrent_streams == 250
    with pytest.raises(ConfigError, match="--http2-max-streams"):
        _gateway_values(["--http2-max-streams", "0"], {})
    with pytest.raises(ConfigError, match="--http2"):
        _gateway_values(["--http2", "maybe"], {})
