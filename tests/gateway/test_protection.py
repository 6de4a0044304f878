"""Protection limits on the live proxy: rate, connections, sizes, slow clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from common.relay.accesslog import AccessLogSettings
from gateway.proxy import LimitSettings
from tests.gateway.agentapp import ProxyHarness, Uvicorn, raw_exchange, read_response, tunnel

HOST = {"Host": "app.example.com"}


async def start(agent: Uvicorn, **limits: object) -> ProxyHarness:
    harness = ProxyHarness(agent.port, limits=LimitSettings(**limits))  # type: ignore[arg-type]
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    return await harness.start()


@pytest.fixture
async def limited(agent: Uvicorn, request: pytest.FixtureRequest) -> AsyncIterator[ProxyHarness]:
    harness = await start(agent, **request.param)
    try:
        yield harness
    finally:
        await harness.close()


@pytest.mark.parametrize("limited", [{"rate": 0.5, "burst": 3}], indirect=True)
async def test_rate_limit_429_with_retry_after(limited: ProxyHarness) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as http:
        statuses = [(await http.get("/headers", headers=HOST)).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        refused = await http.get("/headers", headers=HOST)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "2"  # one token per 2 s, rounded up
        assert "Too many requests" in refused.text
        await asyncio.sleep(2.05)
        assert (await http.get("/headers", headers=HOST)).status_code == 200
    assert limited.metrics.rejected.get(reason="rate_limit") == 1


@pytest.mark.parametrize("limited", [{"max_connections_per_client": 2}], indirect=True)
async def test_connection_limit_per_client(limited: ProxyHarness) -> None:
    held = [await asyncio.open_connection("127.0.0.1", limited.port) for _ in range(2)]
    try:
        await asyncio.sleep(0.05)
        assert limited.proxy.connection_limiter.count("127.0.0.1") == 2
        reply = await raw_exchange(
            limited.port, b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 429 ")
        assert b"Too many concurrent connections" in reply
        # the held connections still work
        reader, writer = held[0]
        writer.write(b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.1)
    assert limited.proxy.connection_limiter.count("127.0.0.1") == 0
    reply = await raw_exchange(
        limited.port, b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "limited", [{"max_header_bytes": 4096, "max_header_count": 20}], indirect=True
)
async def test_header_limits_431(limited: ProxyHarness) -> None:
    big = b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    reply = await raw_exchange(limited.port, big)
    assert reply.startswith(b"HTTP/1.1 431 ") and b"too large" in reply
    many = b"GET / HTTP/1.1\r\nHost: app.example.com\r\n"
    many += b"".join(b"X-H%d: v\r\n" % i for i in range(30)) + b"\r\n"
    reply = await raw_exchange(limited.port, many)
    assert reply.startswith(b"HTTP/1.1 431 ") and b"Too many request header fields" in reply
    long_target = b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    assert (await raw_exchange(limited.port, long_target)).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("limited", [{"max_body_bytes": 1000}], indirect=True)
async def test_body_limit_413_declared_and_chunked(limited: ProxyHarness) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as http:
        ok = await http.post("/upload", content=b"x" * 1000, headers=HOST)
        assert ok.status_code == 200
        declared = await http.post("/upload", content=b"x" * 1001, headers=HOST)
        assert declared.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 300

    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as http:
        streamed = await http.post("/upload", content=chunks(), headers=HOST)
        assert streamed.status_code == 413
        assert "larger than allowed" in streamed.text


@pytest.mark.parametrize("limited", [{"header_timeout": 0.4}], indirect=True)
async def test_slowloris_gets_408_and_is_closed(limited: ProxyHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        started = asyncio.get_running_loop().time()
        writer.write(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n")
        await writer.drain()
        for _ in range(3):  # trickle a header byte at a time, never finishing
            await asyncio.sleep(0.1)
            writer.write(b"X")
            await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 3)
        elapsed = asyncio.get_running_loop().time() - started
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert 0.35 < elapsed < 2.5
    finally:
        writer.close()
    assert limited.metrics.rejected.get(reason="header_timeout") == 1


@pytest.mark.parametrize("limited", [{"header_timeout": 0.3}], indirect=True)
async def test_silent_new_connection_is_closed_after_header_timeout(limited: ProxyHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        reply = await asyncio.wait_for(reader.read(), 3)
        assert reply.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()


@pytest.mark.parametrize("limited", [{"idle_timeout": 0.3, "header_timeout": 5}], indirect=True)
async def test_idle_keep_alive_connection_closed_quietly(limited: ProxyHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        writer.write(b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        started = asyncio.get_running_loop().time()
        rest = await asyncio.wait_for(reader.read(), 3)
        assert rest == b""  # no 408 for a quiet keep-alive connection
        assert asyncio.get_running_loop().time() - started < 1.5
    finally:
        writer.close()


async def test_trusted_proxy_client_ip_drives_headers_and_rate_limit(agent: Uvicorn) -> None:
    harness = ProxyHarness(
        agent.port,
        trusted_proxies=("127.0.0.0/8",),
        limits=LimitSettings(rate=1.0, burst=1),
    )
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        async with httpx.AsyncClient(base_url=harness.url, timeout=10) as http:
            first = await http.get("/headers", headers={**HOST, "X-Forwarded-For": "203.0.113.7"})
            headers = dict(first.json()["headers"])
            assert headers["x-real-ip"] == "203.0.113.7"
            assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
            # a different client behind the same balancer has its own bucket
            other = await http.get("/headers", headers={**HOST, "X-Forwarded-For": "203.0.113.8"})
            assert other.status_code == 200
            again = await http.get("/headers", headers={**HOST, "X-Forwarded-For": "203.0.113.7"})
            assert again.status_code == 429
    finally:
        await harness.close()


async def test_agent_concurrency_cap_gives_503(agent: Uvicorn) -> None:
    harness = ProxyHarness(agent.port, max_active_per_agent=2)
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        async with httpx.AsyncClient(base_url=harness.url, timeout=10) as http:
            slow = [
                asyncio.ensure_future(http.get("/slow?delay=1.0", headers=HOST)) for _ in range(2)
            ]
            for _ in range(80):
                await asyncio.sleep(0.01)
                if harness.proxy.pool.active_count("127.0.0.1", agent.port) == 2:
                    break
            assert harness.proxy.pool.active_count("127.0.0.1", agent.port) == 2
            busy = await http.get("/headers", headers=HOST)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert all(r.status_code == 200 for r in await asyncio.gather(*slow))
            assert harness.proxy.pool.active_count("127.0.0.1", agent.port) == 0
            assert (await http.get("/headers", headers=HOST)).status_code == 200
    finally:
        await harness.close()


async def test_access_log_has_no_query_string(agent: Uvicorn, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    harness = ProxyHarness(agent.port, access_log=AccessLogSettings(str(log_path)))
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        async with httpx.AsyncClient(base_url=harness.url, timeout=10) as http:
            await http.get("/headers?token=s3cret", headers=HOST)
            await http.get("/", headers={"Host": "nope.example"})
    finally:
        await harness.close()  # flushes the log
    text = log_path.read_text()
    assert "host=app.example.com method=GET path=/headers status=200" in text, text
    assert "host=nope.example method=GET path=/ status=404" in text, text
    assert "s3cret" not in text


async def test_stalled_request_body_gets_408(agent: Uvicorn) -> None:
    harness = ProxyHarness(agent.port, body_idle_timeout=0.3)
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100\r\n\r\nonly10byte"
        )
        await writer.drain()
        status, _, body = await read_response(reader)
        assert status == 408 and b"did not arrive in time" in body
        writer.close()
        assert harness.metrics.rejected.get(reason="body_timeout") == 1
    finally:
        await harness.close()


async def test_malformed_chunked_body_gets_400(proxy_for_agent: ProxyHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_for_agent.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nZZZ\r\n"
    )
    await writer.drain()
    status, _, body = await read_response(reader)
    assert status == 400 and b"malformed" in body
    writer.close()


@pytest.fixture
async def proxy_for_agent(agent: Uvicorn) -> AsyncIterator[ProxyHarness]:
    harness = ProxyHarness(agent.port)
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()
