"""Bodies and protocol switches through the proxy: streaming, chunked, 100-continue,
WebSocket, TLS listener."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import resource
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from tests.gateway.agentapp import (
    BLOCK,
    ProxyHarness,
    Uvicorn,
    pattern_sha256,
    read_response,
    tunnel,
)

MB = 1024 * 1024
HOST = {"Host": "app.example.com"}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def pattern_stream(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = BLOCK[: min(len(BLOCK), total - sent)]
        sent += len(piece)
        yield piece


@pytest.mark.slow
@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_50mb_download_is_streamed_and_hash_checked(
    proxy: ProxyHarness, content_length: bool
) -> None:
    total = 50 * MB
    rss_before = max_rss_mb()
    digest = hashlib.sha256()
    received = 0
    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as http:
        url = f"/download?n={total}" + ("&cl=1" if content_length else "")
        async with http.stream("GET", url, headers=HOST) as response:
            assert response.status_code == 200
            if content_length:
                assert response.headers["content-length"] == str(total)
            else:
                assert response.headers["transfer-encoding"] == "chunked"
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                received += len(chunk)
    assert received == total
    assert digest.hexdigest() == pattern_sha256(total)
    assert max_rss_mb() - rss_before < 30  # never buffered whole
    assert proxy.metrics.response_bytes.get(tunnel="t1") == total


@pytest.mark.slow
async def test_50mb_chunked_upload_is_streamed_and_hash_checked(proxy: ProxyHarness) -> None:
    total = 50 * MB
    rss_before = max_rss_mb()
    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as http:
        response = await http.post("/upload", content=pattern_stream(total), headers=HOST)
    assert response.status_code == 200
    assert response.json() == {"sha256": pattern_sha256(total), "length": total}
    assert max_rss_mb() - rss_before < 30
    assert proxy.metrics.request_bytes.get(tunnel="t1") == total


async def test_content_length_upload(proxy: ProxyHarness) -> None:
    body = BLOCK * 3 + b"tail"
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.post("/upload", content=body, headers=HOST)
        assert response.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
        # keep-alive survives a body exchange
        again = await http.post("/upload", content=b"x", headers=HOST)
        assert again.json()["length"] == 1
    assert proxy.proxy.pool.dials == 1


async def test_full_duplex_echo_streams_while_uploading(proxy: ProxyHarness) -> None:
    """The agent echoes each chunk as it arrives: the response flows during the upload."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(b"5\r\nhello\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readuntil(b"hello\r\n"), 5)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert b" world" in rest
    finally:
        writer.close()


async def test_expect_100_continue_is_relayed(proxy: ProxyHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        body = b"x" * 1000
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        await writer.drain()
        status, _, payload = await read_response(reader)
        assert status == 200
        assert hashlib.sha256(body).hexdigest().encode() in payload
    finally:
        writer.close()


async def test_expect_100_continue_rejected_early_by_gateway(proxy: ProxyHarness) -> None:
    """An unknown host is answered at once; the client never has to send its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: nope.example\r\nExpect: 100-continue\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        await writer.drain()
        status, _, _ = await read_response(reader)
        assert status == 404
    finally:
        writer.close()


async def test_websocket_echo_through_proxy(proxy: ProxyHarness) -> None:
    uri = "ws://app.example.com/ws"
    async with connect(uri, host="127.0.0.1", port=proxy.port, compression=None) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        payload = bytes(range(256)) * 1000
        await ws.send(payload)
        assert await asyncio.wait_for(ws.recv(), 5) == payload
    assert proxy.metrics.requests.get(tunnel="t1", domain="app.example.com", code="101") == 1
    await asyncio.sleep(0.1)
    assert proxy.metrics.active_connections.get(listener="websocket") == 0


async def test_websocket_to_unknown_host_is_404(proxy: ProxyHarness) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        async with connect("ws://nope.example/ws", host="127.0.0.1", port=proxy.port):
            pass
    assert info.value.response.status_code == 404


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("app.example.com")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_tls_listener_sets_forwarded_proto_https(agent: Uvicorn, tmp_path: Path) -> None:
    server_ctx, client_ctx = self_signed(tmp_path)
    harness = await ProxyHarness(agent.port, ssl_context=server_ctx).start()
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    try:
        transport = httpx.AsyncHTTPTransport(verify=client_ctx)
        async with httpx.AsyncClient(transport=transport, timeout=10) as http:
            # connect to 127.0.0.1 but present app.example.com for SNI and Host
            response = await http.get(
                f"https://127.0.0.1:{harness.port}/headers",
                headers=HOST,
                extensions={"sni_hostname": "app.example.com"},
            )
        assert response.status_code == 200
        headers = dict(response.json()["headers"])
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-forwarded-host"] == "app.example.com"
    finally:
        await harness.close()


async def test_agent_answering_without_reading_body_skips_100_continue(proxy: ProxyHarness) -> None:
    """The agent answers at once (it never reads the body): no 100, the final answer
    arrives promptly, and the connection is closed since the body was never sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"POST /headers HTTP/1.1\r\nHost: app.example.com\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5000000\r\n\r\n"
        )
        await writer.drain()
        status, _, body = await read_response(reader, timeout=3)
        assert status == 200 and b"100-continue" in body
        assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()


async def test_body_limit_hit_mid_stream_aborts_instead_of_hanging(agent: Uvicorn) -> None:
    from gateway.proxy import LimitSettings

    harness = ProxyHarness(agent.port, limits=LimitSettings(max_body_bytes=100_000))
    harness.router.replace_all([tunnel("t1", "app.example.com")])
    await harness.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * 30_000
        for _ in range(5):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            await asyncio.sleep(0.02)
        data = await asyncio.wait_for(reader.read(), 5)  # echo streamed, then cut off
        assert data.startswith(b"HTTP/1.1 200 ")
        assert not data.endswith(b"0\r\n\r\n")  # not a complete chunked body
        writer.close()
    finally:
        await harness.close()


async def test_tls_handshake_that_never_comes_is_cut(agent: Uvicorn, tmp_path: Path) -> None:
    from gateway.proxy import LimitSettings

    server_ctx, _ = self_signed(tmp_path)
    harness = ProxyHarness(
        agent.port, ssl_context=server_ctx, limits=LimitSettings(header_timeout=0.3)
    )
    await harness.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no handshake
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()
    finally:
        await harness.close()
