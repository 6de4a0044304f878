"""Real peers for the gateway proxy tests.

``agent_app`` is a raw ASGI app served by a real uvicorn on loopback; it plays the
agent (in production the agent's local target sits behind it, reached by Host).
``RawServer`` is a tiny asyncio server for answers uvicorn would never send (odd
hop-by-hop fields, connection drops).  ``ProxyHarness`` starts a ``ProxyServer`` with
a router pointing at them, with the PROXY header to agents switched off (the agent's
side of it is tested in ``tests/agent/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import uvicorn

from common.protocol import TunnelSpec, parse_tunnel
from gateway.proxy import Metrics, ProxyServer, ProxySettings, Router
from gateway.proxy.pool import Dialer
from tests.support import free_port

BLOCK = hashlib.sha256(b"kakuremichi").digest() * 2048  # 64 KiB deterministic block


def pattern_sha256(total: int) -> str:
    """The sha256 of ``total`` bytes of the repeating test pattern."""
    digest = hashlib.sha256()
    full, rest = divmod(total, len(BLOCK))
    for _ in range(full):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


async def _json(
    send: Callable[[dict[str, Any]], Awaitable[None]], obj: Any, status: int = 200
) -> None:
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def agent_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The stand-in agent: echo headers, hash uploads, stream downloads, WebSocket echo."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
    path = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if path == "/headers":
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        client = scope.get("client")
        await _json(
            send,
            {
                "headers": headers,
                "client_port": client[1] if client else None,
                "path": path,
                "query": scope["query_string"].decode(),
                "method": scope["method"],
            },
        )
    elif path == "/upload":
        digest = hashlib.sha256()
        length = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            more = message.get("more_body", False)
        await _json(send, {"sha256": digest.hexdigest(), "length": length})
    elif path == "/download":
        total = int(query.get("n", "0"))
        response_headers = [(b"content-type", b"application/octet-stream")]
        if query.get("cl") == "1":
            response_headers.append((b"content-length", str(total).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        sent = 0
        while sent < total:
            piece = BLOCK[: min(len(BLOCK), total - sent)]
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": sent < total})
        if total == 0:
            await send({"type": "http.response.body", "body": b""})
    elif path == "/echo":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
            await send(
                {"type": "http.response.body", "body": message.get("body", b""), "more_body": more}
            )
    elif path == "/slow":
        await asyncio.sleep(float(query.get("delay", "1")))
        await _json(send, {"slow": True})
    else:
        await _json(send, {"error": "not found"}, status=404)


class Uvicorn:
    """uvicorn serving ``agent_app`` on 127.0.0.1:ephemeral, inside the test's loop."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Uvicorn:
        config = uvicorn.Config(
            agent_app,
            host=self.host,
            port=self.port,
            log_config=None,
            lifespan="off",
            ws="websockets-sansio",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        for _ in range(500):
            if self.server.started:
                return self
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        raise TimeoutError("uvicorn did not start")

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await asyncio.wait_for(self.task, 20)
            self.server = None


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A plain asyncio TCP server with a test-supplied handler."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawServer:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass
            finally:
                self.tasks.discard(task)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        self.server = await asyncio.start_server(on_connect, self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


def tunnel(
    tunnel_id: str,
    domain: str | None,
    *,
    agent_ip: str = "127.0.0.1",
    enabled: bool = True,
    protocol: str = "http",
    public_port: int | None = None,
    target: str = "localhost:8080",
) -> TunnelSpec:
    """A tunnel as Control describes it (built through its wire form, so a test cannot
    hand the router what the protocol would refuse)."""
    return parse_tunnel(
        {
            "id": tunnel_id,
            "protocol": protocol,
            "domain": domain,
            "publicPort": public_port,
            "target": target,
            "agentId": f"agent-{tunnel_id}",
            "agentIp": agent_ip,
            "enabled": enabled,
        }
    )


class ProxyHarness:
    """A started ``ProxyServer`` plus its router and metrics."""

    def __init__(
        self,
        upstream_port: int,
        *,
        dialer: Dialer | None = None,
        ssl_context: Any = None,
        **settings: Any,
    ) -> None:
        self.router = Router()
        self.metrics = Metrics()
        # the upstreams here are plain HTTP servers, not agents: no PROXY header
        settings.setdefault("tunnel_header", False)
        self.settings = ProxySettings(upstream_port=upstream_port, **settings)
        self.proxy = ProxyServer(self.router, dialer, self.settings, self.metrics)
        self.ssl_context = ssl_context
        self.port = 0

    async def start(self) -> ProxyHarness:
        await self.proxy.start("127.0.0.1", 0, self.ssl_context)
        self.port = self.proxy.ports[0]
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def close(self) -> None:
        await self.proxy.close()


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, eof: bool = False) -> bytes:
    """Send raw bytes to the proxy and read until it closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def read_response(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length-framed HTTP/1.1 response from a raw stream."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        return status, headers, body
