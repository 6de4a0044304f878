"""Local target health checks against real listeners on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from agent.health import HealthMonitor, check_target
from common.protocol import TunnelSpec
from common.relay.targets import Target
from tests.support import free_port


def test_target_parsing() -> None:
    assert Target.parse("127.0.0.1:8080") == Target("127.0.0.1", 8080)
    assert Target.parse("[::1]:22") == Target("::1", 22)
    assert Target.parse("http://app.internal:3000/base/") == Target(
        "app.internal", 3000, False, "/base", http=True
    )
    assert Target.parse("https://localhost") == Target("localhost", 443, True, "", http=True)
    assert str(Target.parse("[::1]:22")) == "[::1]:22"
    # a Unicode path goes on the wire percent-encoded (UTF-8); escapes already there stay
    unicode = Target.parse("http://127.0.0.1:8080/caf\u00e9 \u00fc/\u8def\u5f84/")
    assert unicode.path_prefix == "/caf%C3%A9%20%C3%BC/%E8%B7%AF%E5%BE%84"
    assert unicode.path_prefix.isascii()
    assert Target.parse("http://h:1/a%20b/~x;y=1").path_prefix == "/a%20b/~x;y=1"
    for bad in (
        "nope",
        "h:0",
        "h:99999",
        "ftp://x",
        "http://",
        "h:\u0668\u0660",
        "http://h:\u0668\u0660/",
    ):
        with pytest.raises(ValueError):
            Target.parse(bad)


async def http_server(status: int) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # a plain TCP probe connects and leaves
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_checks() -> None:
    ok, ok_port = await http_server(204)
    bad, bad_port = await http_server(503)
    try:
        assert await check_target(Target("127.0.0.1", ok_port)) == ("healthy", "tcp connect ok")
        assert await check_target(Target.parse(f"http://127.0.0.1:{ok_port}/")) == (
            "healthy",
            "HTTP 204",
        )
        health, detail = await check_target(Target.parse(f"http://127.0.0.1:{bad_port}/x"))
        assert (health, detail) == ("unhealthy", "HTTP 503")
        health, detail = await check_target(Target("127.0.0.1", free_port()))
        assert health == "unhealthy" and "refused" in detail.lower()
    finally:
        ok.close()
        bad.close()


def spec(tunnel_id: str, protocol: str, target: str, enabled: bool) -> TunnelSpec:
    http = protocol == "http"
    domain, port = (f"{tunnel_id}.example.com", None) if http else (None, 2222)
    return TunnelSpec(tunnel_id, protocol, domain, port, target, "a", "100.64.0.100", enabled)


async def test_monitor_reports_changes() -> None:
    server, port = await http_server(200)
    reports: list[dict[str, Any]] = []

    async def report(payload: dict[str, Any]) -> bool:
        reports.append(payload)
        return True

    tunnels = {
        "t1": spec("t1", "http", f"127.0.0.1:{port}", True),
        "t2": spec("t2", "tcp", "bad target", True),
        "t3": spec("t3", "http", "127.0.0.1:1", False),
    }
    monitor = HealthMonitor(lambda: tunnels, report, interval=0.05, report_every=1000)
    task = asyncio.create_task(monitor.run())
    try:
        async with asyncio.timeout(5):
            while not reports:
                await asyncio.sleep(0.01)
        first = {e["tunnelId"]: e["health"] for e in reports[0]["tunnels"]}
        assert first == {"t1": "healthy", "t2": "unhealthy"}
        await asyncio.sleep(0.3)
        assert len(reports) == 1  # nothing changed, nothing sent
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(5):
            while len(reports) < 2:
                await asyncio.sleep(0.01)
        assert {e["tunnelId"]: e["health"] for e in reports[1]["tunnels"]}["t1"] == "unhealthy"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
