"""The HTTP reverse proxy against a real uvicorn agent: routing, pages, headers, pool."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.gateway.agentapp import (
    ProxyHarness,
    RawServer,
    Uvicorn,
    raw_exchange,
    read_response,
    tunnel,
)
from tests.support import free_port


def client(proxy: ProxyHarness, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proxy.url, timeout=10, **kwargs)


def header_map(payload: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in payload["headers"]:
        out.setdefault(name, []).append(value)
    return out


@pytest.mark.parametrize(
    "host", ["app.example.com", "APP.Example.COM", "app.example.com.", "app.example.com:8443"]
)
async def test_routes_by_host_any_case_port_and_trailing_dot(
    proxy: ProxyHarness, host: str
) -> None:
    async with client(proxy) as http:
        response = await http.get("/headers?x=1", headers={"Host": host})
    assert response.status_code == 200
    payload = response.json()
    assert payload["path"] == "/headers" and payload["query"] == "x=1"
    assert header_map(payload)["host"] == [host]  # Host passes through unchanged


async def test_unknown_host_gets_404_page(proxy: ProxyHarness) -> None:
    async with client(proxy) as http:
        response = await http.get("/", headers={"Host": "nope.example.com"})
        plain = await http.get("/", headers={"Host": "nope.example.com", "Accept": "text/plain"})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "No tunnel is configured for the host nope.example.com" in response.text
    assert "Traceback" not in response.text
    assert plain.status_code == 404
    assert plain.text.startswith("404 Not Found\nNo tunnel")


async def test_unknown_host_is_html_escaped(proxy: ProxyHarness) -> None:
    reply = await raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: <script>x\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 404 ")
    assert b"<script>" not in reply and b"&lt;script&gt;" in reply


async def test_disabled_tunnel_page(proxy: ProxyHarness) -> None:
    proxy.router.upsert(tunnel("t1", "app.example.com", enabled=False))
    async with client(proxy) as http:
        response = await http.get("/headers", headers={"Host": "app.example.com"})
    assert response.status_code == 503
    assert "tunnel for app.example.com is disabled" in response.text


async def test_router_changes_apply_immediately_even_on_open_connection(
    proxy: ProxyHarness,
) -> None:
    async with client(proxy) as http:
        assert (await http.get("/headers", headers={"Host": "app.example.com"})).status_code == 200
        proxy.router.remove("t1")
        assert (await http.get("/headers", headers={"Host": "app.example.com"})).status_code == 404
        proxy.router.upsert(tunnel("t2", "new.example.com"))
        assert (await http.get("/headers", headers={"Host": "new.example.com"})).status_code == 200
        proxy.router.replace_all([])
        assert (await http.get("/headers", headers={"Host": "new.example.com"})).status_code == 404


async def test_agent_refusing_gives_502(agent: Uvicorn) -> None:
    harness = await ProxyHarness(free_port()).start()  # nothing listens there
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        async with client(harness) as http:
            response = await http.get("/", headers={"Host": "app.example.com"})
        assert response.status_code == 502
        assert "refused" in response.text
        assert harness.metrics.upstream_errors.get(tunnel="t1", kind="refused") == 1
    finally:
        await harness.close()


async def test_unreachable_agent_gives_502_after_connect_timeout() -> None:
    attempts: list[tuple[str, int, float]] = []

    async def blackhole(host: str, port: int, timeout: float) -> Any:
        attempts.append((host, port, timeout))
        await asyncio.sleep(timeout)
        raise TimeoutError

    harness = await ProxyHarness(80, dialer=blackhole, connect_timeout=0.2).start()
    harness.router.replace_all([tunnel("t1", "app.example.com", agent_ip="100.64.0.100")])
    try:
        async with client(harness) as http:
            response = await http.get("/", headers={"Host": "app.example.com"})
        assert response.status_code == 502
        assert "unreachable" in response.text
        assert attempts == [("100.64.0.100", 80, 0.2)]
    finally:
        await harness.close()


async def test_slow_agent_gives_504(agent: Uvicorn) -> None:
    harness = await ProxyHarness(agent.port, response_header_timeout=0.3).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        async with client(harness) as http:
            started = asyncio.get_running_loop().time()
            response = await http.get("/slow?delay=1.5", headers={"Host": "app.example.com"})
            elapsed = asyncio.get_running_loop().time() - started
            assert response.status_code == 504
            assert "did not answer within 0.3 seconds" in response.text
            assert elapsed < 1.4  # did not wait for the agent's 1.5 s
            # the client connection stays usable
            ok = await http.get("/headers", headers={"Host": "app.example.com"})
            assert ok.status_code == 200
    finally:
        await harness.close()


async def test_keep_alive_on_both_sides(proxy: ProxyHarness) -> None:
    client_ports = set()
    async with client(proxy) as http:
        for _ in range(6):
            response = await http.get("/headers", headers={"Host": "app.example.com"})
            assert response.status_code == 200
            client_ports.add(response.json()["client_port"])
    assert len(client_ports) == 1  # one agent connection, reused
    assert proxy.proxy.pool.dials == 1 and proxy.proxy.pool.reuses == 5
    assert proxy.metrics.upstream_connections.get(result="reused") == 5
    # and the client side kept one connection: all six on a raw socket too
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for _ in range(3):
            writer.write(b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
            status, _, _ = await read_response(reader)
            assert status == 200
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(proxy: ProxyHarness) -> None:
    request = b"GET /headers?n=%d HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"".join(request % i for i in range(3)))
        for i in range(3):
            status, _, body = await read_response(reader)
            assert status == 200 and f'"query": "n={i}"'.encode() in body
    finally:
        writer.close()


async def test_stale_pooled_connection_is_retried_transparently() -> None:
    """An agent closing a keep-alive connection just as a request arrives: no 502."""
    served = 0

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # the next request on this connection meets a close (the race a pool must absorb)
        await reader.readuntil(b"\r\n\r\n")

    upstream = await RawServer(one_shot).start()
    harness = await ProxyHarness(upstream.port, pool_idle_timeout=30).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        async with client(harness) as http:
            for _ in range(3):
                response = await http.get("/", headers={"Host": "app.example.com"})
                assert response.status_code == 200 and response.text == "ok"
        assert served == 3
        assert harness.proxy.pool.reuses == 2  # reused, failed, retried on a new one
    finally:
        await harness.close()
        await upstream.stop()


async def test_forwarded_headers_append_client_ip_and_overwrite_host_proto(
    proxy: ProxyHarness,
) -> None:
    async with client(proxy) as http:
        response = await http.get(
            "/headers",
            headers={
                "Host": "app.example.com",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https",
                "X-Real-IP": "6.6.6.6",
            },
        )
    headers = header_map(response.json())
    # spoofed values are kept as history, never trusted: the gateway's entry is last
    assert headers["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    assert headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-forwarded-host"] == ["app.example.com"]
    assert headers["x-forwarded-proto"] == ["http"]


async def test_hop_by_hop_request_headers_are_stripped(proxy: ProxyHarness) -> None:
    async with client(proxy) as http:
        response = await http.get(
            "/headers",
            headers={
                "Host": "app.example.com",
                "Connection": "keep-alive, X-Private-Hop",
                "X-Private-Hop": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Connection": "keep-alive",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "TE": "trailers",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
                "X-End-To-End": "kept",
            },
        )
    headers = header_map(response.json())
    for name in (
        "x-private-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ):
        assert name not in headers, name
    assert headers["x-end-to-end"] == ["kept"]


async def test_hop_by_hop_response_headers_are_stripped_and_client_kept_alive() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=1\r\n"
            b"Proxy-Authenticate: Basic\r\nX-App: yes\r\nContent-Length: 5\r\n\r\nhello"
        )
        await writer.drain()

    upstream = await RawServer(answer).start()
    harness = await ProxyHarness(upstream.port).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        for _ in range(2):  # the agent closed, the client connection did not
            writer.write(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status == 200 and body == b"hello"
            assert headers["x-app"] == "yes"
            for name in ("x-hop", "keep-alive", "proxy-authenticate", "connection"):
                assert name not in headers, name
        writer.close()
        assert upstream.connections == 2
    finally:
        await harness.close()
        await upstream.stop()


async def test_agent_closing_mid_body_aborts_client_connection() -> None:
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
        await writer.drain()

    upstream = await RawServer(truncate).start()
    harness = await ProxyHarness(upstream.port).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        async with client(harness) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/", headers={"Host": "app.example.com"})
        # an invalid response head becomes a 502 page
        upstream.handler = _garbage
        async with client(harness) as http:
            response = await http.get("/", headers={"Host": "app.example.com"})
        assert response.status_code == 502
    finally:
        await harness.close()
        await upstream.stop()


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
    await writer.drain()


async def test_absolute_form_target_uses_its_authority(proxy: ProxyHarness) -> None:
    reply = await raw_exchange(
        proxy.port,
        b"GET http://app.example.com/headers?a=b HTTP/1.1\r\nHost: other.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"path": "/headers"' in reply and b'"query": "a=b"' in reply


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
        (b"CONNECT app.example.com:443 HTTP/1.1\r\nHost: app.example.com\r\n\r\n", 405),
        (b"GET / HTTP/1.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: app.example.com\r\nHost: other.example\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_get_small_error_pages(
    proxy: ProxyHarness, request_bytes: bytes, status: int
) -> None:
    reply = await raw_exchange(proxy.port, request_bytes, timeout=3)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]
    assert b"Traceback" not in reply
    async with client(proxy) as http:  # and the server keeps serving
        assert (await http.get("/headers", headers={"Host": "app.example.com"})).status_code == 200


async def test_http10_client_gets_close_delimited_response(proxy: ProxyHarness) -> None:
    reply = await raw_exchange(
        proxy.port, b"GET /download?n=100000 HTTP/1.0\r\nHost: app.example.com\r\n\r\n"
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"chunked" not in head.lower()
    assert len(body) == 100000


async def test_head_request_has_no_body(proxy: ProxyHarness) -> None:
    async with client(proxy) as http:
        response = await http.head("/download?n=5000&cl=1", headers={"Host": "app.example.com"})
        assert response.status_code == 200 and response.content == b""
        again = await http.get("/headers", headers={"Host": "app.example.com"})
        assert again.status_code == 200


async def test_graceful_close_lets_inflight_request_finish(agent: Uvicorn) -> None:
    harness = await ProxyHarness(agent.port).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    async with client(harness) as http:
        inflight = asyncio.ensure_future(
            http.get("/slow?delay=0.5", headers={"Host": "app.example.com"})
        )
        await asyncio.sleep(0.2)
        await harness.close()
        response = await inflight
        assert response.status_code == 200
        assert response.headers.get("connection") == "close"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", harness.port)


async def test_acme_challenge_answered_before_routing(proxy: ProxyHarness) -> None:
    tokens = {"/.well-known/acme-challenge/tok123": "tok123.thumbprint"}
    proxy.proxy.challenge_responder = tokens.get
    async with client(proxy) as http:
        # even for a domain without a tunnel yet (ACME runs before the tunnel is served)
        hit = await http.get("/.well-known/acme-challenge/tok123", headers={"Host": "new.example"})
        assert hit.status_code == 200 and hit.text == "tok123.thumbprint"
        miss = await http.get("/.well-known/acme-challenge/other", headers={"Host": "new.example"})
        assert miss.status_code == 404
        normal = await http.get("/headers", headers={"Host": "app.example.com"})
        assert normal.status_code == 200


async def test_redirect_to_https_for_known_hosts_only(proxy: ProxyHarness) -> None:
    proxy.proxy.redirect_https = True
    proxy.proxy.challenge_responder = {"/.well-known/acme-challenge/t": "t.k"}.get
    async with client(proxy) as http:
        moved = await http.get("/a/b?c=d", headers={"Host": "APP.example.com:80"})
        assert moved.status_code == 308
        assert moved.headers["location"] == "https://app.example.com/a/b?c=d"
        proxy.proxy.redirect_https_port = 8443
        moved = await http.get("/", headers={"Host": "app.example.com"})
        assert moved.headers["location"] == "https://app.example.com:8443/"
        unknown = await http.get("/", headers={"Host": "nope.example"})
        assert unknown.status_code == 404
        challenge = await http.get(
            "/.well-known/acme-challenge/t", headers={"Host": "app.example.com"}
        )
        assert challenge.status_code == 200 and challenge.text == "t.k"


async def test_bad_absolute_target_is_400(proxy: ProxyHarness) -> None:
    reply = await raw_exchange(
        proxy.port,
        b"GET http://app.example.com HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 ") or reply.startswith(b"HTTP/1.1 404 ")
    reply = await raw_exchange(proxy.port, b"GET ftp://x/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_agent_sending_both_te_and_cl_is_reframed() -> None:
    async def both(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        await writer.drain()

    upstream = await RawServer(both).start()
    harness = await ProxyHarness(upstream.port).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        async with client(harness) as http:
            response = await http.get("/", headers={"Host": "app.example.com"})
        assert response.status_code == 200 and response.text == "hello"
    finally:
        await harness.close()
        await upstream.stop()


async def test_post_never_reuses_an_old_idle_connection() -> None:
    """A request that cannot be replayed must not meet a connection the agent is closing."""

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = (
            int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if b"content-length" in head.lower()
            else 0
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # keep the socket open but never answer again: a reused connection would 504
        await asyncio.sleep(5)

    upstream = await RawServer(one_per_connection).start()
    harness = await ProxyHarness(
        upstream.port, pool_idle_timeout=30, response_header_timeout=1.0
    ).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        async with client(harness) as http:
            assert (await http.get("/", headers={"Host": "app.example.com"})).status_code == 200
            await asyncio.sleep(1.2)
            response = await http.post("/", content=b"data", headers={"Host": "app.example.com"})
            assert response.status_code == 200
        assert harness.proxy.pool.dials == 2
    finally:
        await harness.close()
        await upstream.stop()


async def test_client_disconnect_mid_download_releases_everything(proxy: ProxyHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /download?n=50000000 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    await writer.drain()
    await reader.readexactly(200_000)
    writer.transport.abort()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if proxy.metrics.active_connections.get(listener="http") == 0:
            break
    assert proxy.metrics.active_connections.get(listener="http") == 0
    assert proxy.proxy.pool.idle_count() == 0  # the half-read agent connection was dropped
    async with client(proxy) as http:
        assert (await http.get("/headers", headers={"Host": "app.example.com"})).status_code == 200


async def test_close_does_not_wait_for_idle_keep_alive_connections(agent: Uvicorn) -> None:
    harness = await ProxyHarness(agent.port, shutdown_timeout=5).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 200
    started = asyncio.get_running_loop().time()
    await harness.close()
    assert asyncio.get_running_loop().time() - started < 1.0
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_many_concurrent_clients_leave_counters_balanced(agent: Uvicorn) -> None:
    from gateway.proxy import LimitSettings

    proxy = await ProxyHarness(agent.port, limits=LimitSettings(rate=0)).start()
    proxy.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        await _hammer(proxy)
    finally:
        await proxy.close()


async def _hammer(proxy: ProxyHarness) -> None:
    async def one_client(n: int) -> list[int]:
        async with client(proxy) as http:
            statuses = []
            for i in range(5):
                if i % 2:
                    response = await http.post(
                        "/upload", content=b"x" * (n * 100 + i), headers={"Host": "app.example.com"}
                    )
                else:
                    response = await http.get("/headers", headers={"Host": "app.example.com"})
                statuses.append(response.status_code)
            return statuses

    results = await asyncio.gather(*(one_client(n) for n in range(40)))
    assert [status for statuses in results for status in statuses] == [200] * 200
    await asyncio.sleep(0.1)
    pool = proxy.proxy.pool
    assert pool.active_count("127.0.0.1", proxy.settings.upstream_port) == 0
    assert pool.idle_count() <= proxy.settings.pool_max_idle_per_agent
    assert proxy.proxy.connection_limiter.open == 0
    assert proxy.metrics.active_connections.get(listener="http") == 0
    assert proxy.metrics.requests.get(tunnel="t1", domain="app.example.com", code="200") == 200


async def test_connection_header_cannot_remove_host_or_framing(proxy: ProxyHarness) -> None:
    body = b"0123456789"
    reply = await raw_exchange(
        proxy.port,
        b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\n"
        b"Connection: close, host, content-length, x-real-ip\r\nContent-Length: 10\r\n\r\n" + body,
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"length": 10' in reply


async def test_unicode_path_prefix_goes_out_percent_encoded() -> None:
    """A tunnel whose target URL has a non-ASCII path: requests carry the prefix as
    UTF-8 %XX in front of their own target (it used to raise in the gateway)."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    upstream = await RawServer(answer).start()
    harness = await ProxyHarness(upstream.port).start()
    route = tunnel("t1", "app.example.com", target="http://127.0.0.1:8080/caf\u00e9/\u8def\u5f84")
    harness.router.replace_all([route])
    try:
        async with client(harness) as http:
            for _ in range(2):  # the first dials (coroutine path), the second is pooled
                response = await http.get("/x?q=1", headers={"Host": "app.example.com"})
                assert response.status_code == 200 and response.text == "ok"
        assert seen == [b"GET /caf%C3%A9/%E8%B7%AF%E5%BE%84/x?q=1 HTTP/1.1"] * 2
    finally:
        await harness.close()
        await upstream.stop()
