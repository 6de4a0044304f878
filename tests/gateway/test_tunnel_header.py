"""The PROXY v2 header the gateway writes on every new agent connection: one per
connection, naming the route's tunnel, never resent on keep-alive reuse, a pool per
(agent, tunnel); and a client cannot spoof one from outside the tunnel.

The upstream plays the agent's HTTP-tunnel listener and its target in one: it reads
the header with ``proxyproto.read_header`` and then answers HTTP/1.1 itself,
recording what arrived on each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common.relay import proxyproto
from tests.gateway.agentapp import ProxyHarness, read_response, tunnel


@dataclass
class AgentConnection:
    """What one connection from the gateway carried."""

    header: proxyproto.ProxyHeader
    #: (request head, body) of every request, as the bytes arrived after the header
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)


class HeaderAgent:
    """Reads the PROXY header, then serves Content-Length-framed HTTP/1.1 keep-alive."""

    def __init__(self) -> None:
        self.connections: list[AgentConnection] = []
        self.accepts = 0
        self.bad_headers: list[str] = []
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            try:
                header = await proxyproto.read_header(reader, 2.0)
            except proxyproto.ProxyHeaderError as exc:
                self.bad_headers.append(str(exc))
                return
            conn = AgentConnection(header)
            self.connections.append(conn)
            index = len(self.connections) - 1
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                fields = dict(
                    line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line
                )
                fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
                body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
                conn.requests.append((head, body))
                if head.startswith(b"GET /slow "):
                    await asyncio.sleep(0.2)  # keeps the connection busy
                answer = json.dumps(
                    {
                        "connection": index,
                        "tunnel": header.tunnel_id,
                        "host": fields.get(b"host", b"").decode(),
                        "body": body.hex(),
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def start(self) -> HeaderAgent:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await asyncio.wait_for(self.server.wait_closed(), 2)


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[tuple[ProxyHarness, HeaderAgent]]:
    """A gateway with the tunnel header on, in front of a ``HeaderAgent``; two tunnels
    (t1: a.example.com, t2: b.example.com) on the same agent address."""
    agent = await HeaderAgent().start()
    harness = ProxyHarness(agent.port, tunnel_header=True)
    harness.router.replace_all([tunnel("t1", "a.example.com"), tunnel("t2", "b.example.com")])
    await harness.start()
    try:
        async with asyncio.timeout(15):
            yield harness, agent
    finally:
        await harness.close()
        await agent.stop()


class Client:
    """One keep-alive client connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(raw)
        await self.writer.drain()
        return await read_response(self.reader)

    async def get(self, host: str, path: str = "/") -> dict[str, object]:
        status, _, body = await self.request(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        assert status == 200, body
        answer = json.loads(body)
        assert isinstance(answer, dict)
        return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the gateway closes (a reset counts as the end)."""
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), 5)
    return b""


# -- one header per connection, naming the tunnel -----------------------------------


async def test_one_header_per_connection_naming_the_tunnel() -> None:
    async with gateway() as (proxy, agent):
        client = await Client.open(proxy.port)
        answers = [await client.get("a.example.com", f"/{i}") for i in range(3)]
        await client.close()
        # and from another client connection: the pooled agent connection is reused
        other = await Client.open(proxy.port)
        answers.append(await other.get("a.example.com", "/3"))
        await other.close()

        assert [a["connection"] for a in answers] == [0, 0, 0, 0]
        assert {a["tunnel"] for a in answers} == {"t1"}
        assert agent.accepts == 1 and agent.bad_headers == []
        (conn,) = agent.connections
        assert conn.header == proxyproto.decode(proxyproto.encode(tunnel_id="t1"))
        assert conn.header.command == proxyproto.COMMAND_LOCAL
        # reuse sent plain requests: no second header in front of any of them
        heads = [head for head, _ in conn.requests]
        assert not any(proxyproto.SIGNATURE in head for head in heads)
        assert [head.split(b" ", 2)[:2] for head in heads] == [
            [b"GET", b"/%d" % i] for i in range(4)
        ]
        assert proxy.metrics.upstream_connections.get(result="dialed") == 1
        assert proxy.metrics.upstream_connections.get(result="reused") == 3


async def test_two_tunnels_on_one_agent_get_separate_connections() -> None:
    async with gateway() as (proxy, agent):
        client = await Client.open(proxy.port)
        order = ["a", "b", "a", "b", "b", "a"]
        answers = [await client.get(f"{name}.example.com") for name in order]
        await client.close()

        assert agent.accepts == 2 and len(agent.connections) == 2
        by_tunnel = {conn.header.tunnel_id: conn for conn in agent.connections}
        assert set(by_tunnel) == {"t1", "t2"}
        for answer in answers:
            # every request travelled on a connection whose header names its tunnel
            expected = "t1" if answer["host"] == "a.example.com" else "t2"
            assert answer["tunnel"] == expected
        assert len(by_tunnel["t1"].requests) == len(by_tunnel["t2"].requests) == 3
        for tunnel_id, host in (("t1", b"a.example.com"), ("t2", b"b.example.com")):
            for head, _ in by_tunnel[tunnel_id].requests:
                assert b"\r\nhost: " + host + b"\r\n" in head.lower()


async def test_a_changed_target_gets_a_new_connection() -> None:
    # the agent spliced the first connection to the old target: it must not carry
    # requests for the new one (REST changes take effect at once, not after the
    # pool's idle timeout)
    async with gateway() as (proxy, agent):
        client = await Client.open(proxy.port)
        assert (await client.get("a.example.com"))["tunnel"] == "t1"
        moved = tunnel("t1", "a.example.com", target="127.0.0.1:9")
        proxy.router.upsert(moved)
        assert (await client.get("a.example.com"))["tunnel"] == "t1"
        await client.close()
        assert agent.accepts == 2
        assert [len(conn.requests) for conn in agent.connections] == [1, 1]


async def test_concurrent_requests_each_open_a_connection_with_its_own_header() -> None:
    async with gateway() as (proxy, agent):
        clients = [await Client.open(proxy.port) for _ in range(3)]
        # three requests in flight at once cannot share one connection
        for client in clients:
            client.writer.write(b"GET /slow HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        answers = [await read_response(client.reader) for client in clients]
        for client in clients:
            await client.close()
        assert all(status == 200 for status, _, _ in answers)
        assert agent.bad_headers == []
        assert len(agent.connections) == agent.accepts == 3
        for conn in agent.connections:
            assert conn.header.tunnel_id == "t1"
            assert len(conn.requests) == 1


# -- spoofing from outside the tunnel -----------------------------------------------

SPOOFED = {
    "v2 header": proxyproto.encode(tunnel_id="t2"),
    "v2 header with addresses": proxyproto.encode(
        tunnel_id="t2", source=("203.0.113.9", 4711), destination=("100.64.0.100", 80)
    ),
    "v1 text line": b"PROXY TCP4 203.0.113.9 100.64.0.100 4711 80\r\n",
}


async def test_a_client_sending_a_proxy_header_gets_400() -> None:
    for name, spoof in SPOOFED.items():
        async with gateway() as (proxy, agent):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(spoof + b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
            await writer.drain()
            data = await read_to_end(reader)
            writer.close()
            assert data.startswith(b"HTTP/1.1 400 "), (name, data[:80])
            assert agent.accepts == 0, name


async def test_a_proxy_header_after_a_keep_alive_request_gets_400() -> None:
    async with gateway() as (proxy, agent):
        client = await Client.open(proxy.port)
        assert (await client.get("a.example.com"))["tunnel"] == "t1"
        client.writer.write(
            proxyproto.encode(tunnel_id="t2") + b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n"
        )
        data = await read_to_end(client.reader)
        await client.close()
        assert data.startswith(b"HTTP/1.1 400 "), data[:80]
        # nothing of it reached the agent: one connection, one request, no t2
        assert agent.accepts == 1
        (conn,) = agent.connections
        assert len(conn.requests) == 1
        assert conn.header.tunnel_id == "t1"


async def test_a_proxy_header_in_a_body_is_only_body_bytes() -> None:
    async with gateway() as (proxy, agent):
        client = await Client.open(proxy.port)
        spoof = proxyproto.encode(tunnel_id="t2") + b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
        status, _, body = await client.request(
            b"POST /upload HTTP/1.1\r\nHost: a.example.com\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(spoof), spoof)
        )
        assert status == 200
        answer = json.loads(body)
        # and the next request on the same connections still belongs to t1
        follow_up = await client.get("a.example.com", "/after")
        await client.close()

        assert bytes.fromhex(answer["body"]) == spoof
        assert answer["tunnel"] == follow_up["tunnel"] == "t1"
        assert agent.accepts == 1
        (conn,) = agent.connections
        assert conn.header.tunnel_id == "t1"
        assert [body for _, body in conn.requests] == [spoof, b""]
        assert conn.requests[0][0].startswith(b"POST /upload ")
        assert conn.requests[1][0].startswith(b"GET /after ")
