"""Gateway HTTP proxy benchmarks: the same keep-alive client against the agent app
directly and through ``ProxyServer``, in the same run.

Run: ``pytest bench/test_proxy_bench.py --benchmark-columns=median,ops``.
Both rows of a group use one blocking keep-alive socket; ``small`` times ``BATCH``
sequential GETs of a tiny JSON answer (latency per request = median / BATCH), ``bulk``
one 10 MiB download.  The servers (uvicorn + the proxy) run on an event loop in a
background thread; the ratio direct/proxy of the medians is the proxy's cost.  No
WireGuard here: this isolates the HTTP layer (issue 6's end-to-end bench adds it).

``replicas2`` sends the same requests through a tunnel served by two replicas (issue
17: round robin, the pool keeping a connection to each); the ratio replicas2/proxy is
what balancing adds per request.  The app listens on 127.0.0.1, 127.0.0.2 and
127.0.0.3 with one port, as agents' virtual IPs would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from common.protocol import TunnelSpec, parse_tunnel
from gateway.proxy import LimitSettings
from tests.gateway.agentapp import ProxyHarness, Uvicorn, tunnel

BATCH = 100
BULK = 10 * 1024 * 1024
HOSTS = {"proxy": "app.example.com", "replicas2": "ha.example.com"}


class Servers:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.agent_port = 0
        self.proxy_port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        agent = await Uvicorn().start()
        replicas = [Uvicorn(host) for host in ("127.0.0.2", "127.0.0.3")]
        for replica in replicas:
            replica.port = agent.port
            await replica.start()
        # the benchmark is one client hammering: no rate limit here
        harness = ProxyHarness(agent.port, limits=LimitSettings(rate=0))
        harness.router.replace_all([tunnel("t1", HOSTS["proxy"]), _replicated("t2")])
        await harness.start()
        self.agent_port, self.proxy_port = agent.port, harness.port
        self.ready.set()
        await self._stop.wait()
        await harness.close()
        for server in (agent, *replicas):
            await server.stop()

    def __enter__(self) -> Servers:
        self.thread.start()
        assert self.ready.wait(20)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)


def _replicated(tunnel_id: str) -> TunnelSpec:
    replicas = [
        {"agentId": name, "agentIp": ip, "weight": 1, "role": "active", "health": "healthy"}
        for name, ip in (("r1", "127.0.0.2"), ("r2", "127.0.0.3"))
    ]
    wire = {
        **tunnel(tunnel_id, HOSTS["replicas2"]).to_wire(),
        "agentId": "r1",
        "agentIp": "127.0.0.2",
        "replicas": replicas,
    }
    return parse_tunnel(wire)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with Servers() as s:
        yield s


class KeepAliveClient:
    def __init__(self, port: int, host: str = HOSTS["proxy"]) -> None:
        self.request = f"HTTP/1.1\r\nHost: {host}\r\n\r\n"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def get(self, path: str) -> int:
        self.sock.sendall(f"GET {path} {self.request}".encode())
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"transfer-encoding":
                chunked = True
        if chunked:
            return self._read_chunked()
        while len(self.buffer) < length:
            self.buffer += self.sock.recv(1 << 20)
        self.buffer = self.buffer[length:]
        return length

    def _read_chunked(self) -> int:
        total = 0
        while True:
            while b"\r\n" not in self.buffer:
                self.buffer += self.sock.recv(1 << 20)
            size_line, _, self.buffer = self.buffer.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self.buffer) < size + 2:
                self.buffer += self.sock.recv(1 << 20)
            self.buffer = self.buffer[size + 2 :]
            total += size
            if size == 0:
                return total

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("via", ["direct", "proxy", "replicas2"])
def test_small_requests(benchmark: Any, servers: Servers, via: str) -> None:
    benchmark.group = f"small-GET-x{BATCH}"
    port = servers.agent_port if via == "direct" else servers.proxy_port
    client = KeepAliveClient(port, HOSTS.get(via, HOSTS["proxy"]))
    try:
        benchmark(lambda: [client.get("/headers") for _ in range(BATCH)])
    finally:
        client.close()


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_bulk_download(benchmark: Any, servers: Servers, via: str) -> None:
    benchmark.group = "bulk-10MiB"
    port = servers.agent_port if via == "direct" else servers.proxy_port
    client = KeepAliveClient(port)
    try:
        result = benchmark(lambda: client.get(f"/download?n={BULK}&cl=1"))
        assert result == BULK
    finally:
        client.close()
