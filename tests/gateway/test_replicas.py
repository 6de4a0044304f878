"""A tunnel with two replicas through the real gateway proxy and TCP forwarder (issue
17): requests spread over both, a replica that cannot be dialled or resets is ejected
and the request goes to the other, a replica Control reports offline has its waiting
requests moved, sticky cookies and addresses hold, standby and draining are honoured,
and /metrics shows every replica's state.  The "agents" are small servers on
127.0.0.2 and 127.0.0.3 (the same port, as agents' virtual IPs would be)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from common.protocol import TunnelSpec, parse_tunnel
from common.relay.balance import COOKIE_NAME, replica_token
from gateway.proxy import Metrics, Router, TcpForwarder, TcpSettings
from tests.gateway.agentapp import ProxyHarness, RawServer
from tests.support import free_port

HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}
HOST = "app.example.com"


class Agent:
    """An HTTP/1.1 keep-alive server answering with its name; ``mode`` says how it
    behaves for the next connections: "ok", "reset" (closes at once), "hang" (reads
    requests, never answers)."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.mode = "ok"
        self.requests: list[tuple[str, bytes]] = []  # (method, cookie)
        self.server = RawServer(self._serve, host=HOSTS[name], port=port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.transport.abort()
            return
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.split(b"\r\n")
            method = lines[0].split(b" ")[0].decode()
            cookie = b""
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"cookie":
                    cookie = value.strip()
                elif name.lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            self.requests.append((method, cookie))
            if self.mode == "hang":
                await asyncio.sleep(60)
            body = self.name.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


def _tunnel(replicas: list[dict[str, Any]], **extra: Any) -> TunnelSpec:
    wire: dict[str, Any] = {
        "id": "t1",
        "protocol": "http",
        "domain": HOST,
        "publicPort": None,
        "target": "127.0.0.1:8080",
        "agentId": "a",
        "agentIp": HOSTS["a"],
        "enabled": True,
        "replicas": [
            {"agentId": r["agentId"], "agentIp": HOSTS[r["agentId"]], **r} for r in replicas
        ],
    }
    wire.update(extra)
    return parse_tunnel(wire)


TWO = [{"agentId": "a"}, {"agentId": "b"}]


class Setup:
    def __init__(self) -> None:
        port = free_port("127.0.0.2")
        self.agents = {name: Agent(name, port) for name in HOSTS}
        self.proxy = ProxyHarness(
            port, connect_timeout=2.0, response_header_timeout=30.0, shutdown_timeout=0.5
        )

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.proxy.url, timeout=10, headers={"Host": HOST}, **kw)

    def states(self) -> dict[str, str]:
        text = self.proxy.metrics.render()
        found = {}
        for line in text.splitlines():
            if line.startswith("kakuremichi_replica_state{") and line.endswith(" 1.0"):
                labels = dict(
                    part.split("=", 1)
                    for part in line[line.index("{") + 1 : line.index("}")].split(",")
                )
                found[labels["agent"].strip('"')] = labels["state"].strip('"')
        return found


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    s = Setup()
    for agent in s.agents.values():
        await agent.server.start()
    s.proxy.router.replace_all([_tunnel(TWO)])
    await s.proxy.start()
    try:
        yield s
    finally:
        await s.proxy.close()
        for agent in s.agents.values():
            await agent.server.stop()


async def _bodies(http: httpx.AsyncClient, n: int, method: str = "GET") -> list[str]:
    out = []
    for _ in range(n):
        response = await http.request(method, "/", content=b"x" if method == "POST" else None)
        out.append(
            f"{response.status_code}:{response.text}"
            if response.status_code != 200
            else response.text
        )
    return out


async def test_requests_alternate_over_two_replicas(setup: Setup) -> None:
    async with setup.client() as http:
        bodies = await _bodies(http, 10)
    assert sorted(bodies) == ["a"] * 5 + ["b"] * 5
    assert setup.states() == {"a": "healthy", "b": "healthy"}


async def test_a_replica_that_refuses_is_ejected_and_requests_go_to_the_other(setup: Setup) -> None:
    await setup.agents["b"].server.stop()  # connections to it are refused
    async with setup.client() as http:
        bodies = await _bodies(http, 6) + await _bodies(http, 2, "POST")
    assert bodies == ["a"] * 8  # a failed dial sent nothing: even a POST may move
    assert setup.states()["b"] == "ejected"
    text = setup.proxy.metrics.render()
    assert 'kakuremichi_replica_ejections_total{agent="b",tunnel="t1"} 1.0' in text
    assert 'kakuremichi_replica_retries_total{reason="replica_failed",tunnel="t1"} 1.0' in text


async def test_a_reset_before_any_answer_moves_a_get_but_fails_a_post(setup: Setup) -> None:
    setup.agents["b"].mode = "reset"
    async with setup.client() as http:
        # the GET that meets b's reset on a fresh connection is replayed on a
        assert await _bodies(http, 2) == ["a", "a"]
        assert setup.states()["b"] == "ejected"
        # with a drained, b is all that is left: a POST sent to it is never replayed
        drained: list[dict[str, Any]] = [{"agentId": "a", "draining": True}, {"agentId": "b"}]
        setup.proxy.router.upsert(_tunnel(drained))
        post = await http.post("/", content=b"x")
    assert post.status_code == 502
    assert [m for m, _ in setup.agents["a"].requests] == ["GET", "GET"]


async def test_requests_waiting_on_a_replica_that_goes_offline_move_at_once(setup: Setup) -> None:
    setup.agents["b"].mode = "hang"
    async with setup.client() as http:
        assert (await http.get("/")).text == "a"
        waiting = asyncio.ensure_future(http.get("/"))  # to b, which never answers
        for _ in range(200):
            if setup.agents["b"].requests:
                break
            await asyncio.sleep(0.01)
        assert setup.agents["b"].requests
        # Control: b's agent left (its WebSocket closed)
        setup.proxy.router.upsert(
            _tunnel([{"agentId": "a"}, {"agentId": "b", "health": "offline"}])
        )
        response = await asyncio.wait_for(waiting, 5)
        assert response.status_code == 200 and response.text == "a"
        assert await _bodies(http, 3) == ["a"] * 3
    assert setup.states()["b"] == "offline"
    # back online: b takes its share again
    setup.agents["b"].mode = "ok"
    setup.proxy.router.upsert(_tunnel(TWO))
    async with setup.client() as http:
        assert sorted(await _bodies(http, 4)) == ["a", "a", "b", "b"]


async def test_sticky_cookie_keeps_a_client_on_its_replica(setup: Setup) -> None:
    setup.proxy.router.upsert(_tunnel(TWO, sticky="cookie"))
    async with setup.client() as http:
        first = await http.get("/")
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE_NAME}={replica_token('t1', first.text)};")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
        rest = [await http.get("/") for _ in range(6)]  # httpx sends the cookie back
        assert {r.text for r in rest} == {first.text}
        assert all("set-cookie" not in r.headers for r in rest)
        # its replica is drained: the client moves, with a new cookie
        other = "b" if first.text == "a" else "a"
        replicas = [{"agentId": n, "draining": n == first.text} for n in HOSTS]
        setup.proxy.router.upsert(_tunnel(replicas, sticky="cookie"))
        moved = await http.get("/")
        assert moved.text == other
        assert replica_token("t1", other) in moved.headers["set-cookie"]
        assert setup.states()[first.text] == "draining"
    # a cookie naming no replica is replaced
    async with setup.client(cookies={COOKIE_NAME: "0123456789abcdef"}) as http:
        response = await http.get("/")
    assert replica_token("t1", response.text) in response.headers["set-cookie"]


async def test_sticky_client_address_and_least_connections(setup: Setup) -> None:
    setup.proxy.router.upsert(_tunnel(TWO, sticky="client_ip"))
    async with setup.client() as http:
        bodies = await _bodies(http, 6)
    assert len(set(bodies)) == 1  # one client address, one replica
    setup.proxy.router.upsert(_tunnel(TWO, balance="least_connections"))
    for agent in setup.agents.values():
        agent.mode = "hang"  # the first request sticks wherever it lands
    before = {n: len(a.requests) for n, a in setup.agents.items()}

    def landed() -> list[str]:
        return [n for n, a in setup.agents.items() if len(a.requests) > before[n]]

    async with setup.client() as one, setup.client() as two:
        stuck = asyncio.ensure_future(one.get("/"))
        for _ in range(200):
            if landed():
                break
            await asyncio.sleep(0.01)
        assert len(landed()) == 1
        busy = landed()[0]
        for agent in setup.agents.values():
            agent.mode = "ok"
        free = "b" if busy == "a" else "a"
        assert await _bodies(two, 3) == [free] * 3  # the busy replica has one in flight
        stuck.cancel()
        with contextlib.suppress(BaseException):
            await stuck


async def test_standby_takes_over_only_while_no_active_is_healthy(setup: Setup) -> None:
    standby = [{"agentId": "a"}, {"agentId": "b", "role": "standby"}]
    setup.proxy.router.upsert(_tunnel(standby))
    async with setup.client() as http:
        assert await _bodies(http, 4) == ["a"] * 4
        assert setup.states() == {"a": "healthy", "b": "standby"}
        sick = [{"agentId": "a", "health": "unhealthy"}, {"agentId": "b", "role": "standby"}]
        setup.proxy.router.upsert(_tunnel(sick))  # a's target fails its check
        assert await _bodies(http, 3) == ["b"] * 3
        setup.proxy.router.upsert(_tunnel(standby))
        assert await _bodies(http, 2) == ["a"] * 2


async def test_every_replica_draining_is_a_503(setup: Setup) -> None:
    drained = [{"agentId": n, "draining": True} for n in HOSTS]
    setup.proxy.router.upsert(_tunnel(drained))
    async with setup.client() as http:
        response = await http.get("/")
    assert response.status_code == 503 and "being drained" in response.text
    assert response.headers["retry-after"] == "5"


async def test_single_agent_tunnels_are_untouched(setup: Setup) -> None:
    one = dataclasses.replace(_tunnel(TWO), replicas=())
    setup.proxy.router.upsert(one)
    async with setup.client() as http:
        assert await _bodies(http, 3) == ["a"] * 3
        assert "set-cookie" not in (await http.get("/")).headers
    assert setup.states() == {}


# -- raw TCP -----------------------------------------------------------------------------


async def _named_echo(name: bytes) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(name + b":" + data)
        await writer.drain()

    return handler


def _tcp_tunnel(port: int, replicas: list[dict[str, Any]]) -> TunnelSpec:
    wire = _tunnel(replicas).to_wire()
    wire.update(protocol="tcp", domain=None, publicPort=port)
    return parse_tunnel(wire)


async def _tcp_once(port: int) -> bytes:
    """One connection through the forwarder's public port: what the replica echoes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"hi")
        await writer.drain()
        return await asyncio.wait_for(reader.read(100), 10)
    finally:
        writer.close()


async def test_raw_tcp_balances_per_connection_and_avoids_a_dead_replica() -> None:
    port = free_port("127.0.0.1")
    servers = {
        n: RawServer(await _named_echo(n.encode()), host=h, port=port) for n, h in HOSTS.items()
    }
    for server in servers.values():
        await server.start()
    router = Router()
    metrics = Metrics()
    forwarder = TcpForwarder(
        router, None, TcpSettings(bind_host="127.0.0.1", connect_timeout=2), metrics
    )
    router.replace_all([_tcp_tunnel(port, TWO)])
    await forwarder.start()
    try:
        await forwarder.wait_reconciled()
        got = sorted([await _tcp_once(port) for _ in range(4)])
        assert got == [b"a:hi", b"a:hi", b"b:hi", b"b:hi"]
        await servers["b"].stop()
        assert [await _tcp_once(port) for _ in range(4)] == [b"a:hi"] * 4  # avoid b
        assert 'kakuremichi_replica_ejections_total{agent="b",tunnel="t1"} 1.0' in metrics.render()
    finally:
        await forwarder.close()
        for server in servers.values():
            await server.stop()


async def test_raw_tcp_dial_to_a_replica_reported_offline_moves_at_once() -> None:
    """A connection whose dial to b hangs (b's agent just died: nothing answers) goes to
    a as soon as Control reports b offline, not after the connect timeout (60 s here)."""
    port = free_port("127.0.0.1")
    server = RawServer(await _named_echo(b"a"), host=HOSTS["a"], port=port)
    await server.start()
    hanging = asyncio.Event()

    async def dialer(host: str, dial_port: int, timeout: float) -> Any:
        if host == HOSTS["b"]:
            hanging.set()
            await asyncio.sleep(timeout)  # an agent that vanished: no answer at all
            raise TimeoutError
        return await asyncio.open_connection(host, dial_port)

    router = Router()
    forwarder = TcpForwarder(
        router, dialer, TcpSettings(bind_host="127.0.0.1", connect_timeout=60), Metrics()
    )
    router.replace_all([_tcp_tunnel(port, TWO)])
    await forwarder.start()
    try:
        await forwarder.wait_reconciled()
        assert await _tcp_once(port) == b"a:hi"  # round robin: the next one goes to b
        waiting = asyncio.ensure_future(_tcp_once(port))
        await asyncio.wait_for(hanging.wait(), 5)
        started = asyncio.get_running_loop().time()
        router.upsert(_tcp_tunnel(port, [{"agentId": "a"}, {"agentId": "b", "health": "offline"}]))
        assert await asyncio.wait_for(waiting, 5) == b"a:hi"
        assert asyncio.get_running_loop().time() - started < 5
        assert forwarder._dialing == {}
    finally:
        await forwarder.close()
        await server.stop()


async def test_raw_tcp_connections_a_replica_never_answered_end_when_it_goes_offline() -> None:
    """b's agent dies after answering a dial but before its first byte: the client is
    reset as soon as Control reports b offline (as the HTTP pool ends the requests still
    waiting for a head), not left until its own timeout.  A connection b has already
    answered is left alone (an agent that only lost Control keeps serving it)."""
    port = free_port("127.0.0.1")
    accepted = 0
    silent = asyncio.Event()

    async def b_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted > 1:  # the agent died: it reads and never answers
            silent.set()
            await reader.read()
            return
        while data := await reader.read(100):
            writer.write(b"b:" + data)
            await writer.drain()

    servers = [
        RawServer(await _named_echo(b"a"), host=HOSTS["a"], port=port),
        RawServer(b_handler, host=HOSTS["b"], port=port),
    ]
    for server in servers:
        await server.start()
    router = Router()
    metrics = Metrics()
    forwarder = TcpForwarder(router, None, TcpSettings(bind_host="127.0.0.1"), metrics)
    router.replace_all([_tcp_tunnel(port, TWO)])
    await forwarder.start()
    opened: list[asyncio.StreamWriter] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)
        writer.write(b"hi")
        await writer.drain()
        return reader, writer

    try:
        await forwarder.wait_reconciled()
        assert await _tcp_once(port) == b"a:hi"  # round robin: the next one goes to b
        answered_reader, answered_writer = await connect()
        assert await asyncio.wait_for(answered_reader.read(100), 5) == b"b:hi"
        assert await _tcp_once(port) == b"a:hi"
        stuck_reader, _ = await connect()  # to b, which now never answers
        await asyncio.wait_for(silent.wait(), 5)
        for _ in range(100):  # the forwarder has the connection (its dial came back)
            if any(forwarder._unanswered.values()):
                break
            await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        router.upsert(_tcp_tunnel(port, [{"agentId": "a"}, {"agentId": "b", "health": "offline"}]))
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(stuck_reader.read(100), 5) == b""
        assert asyncio.get_running_loop().time() - started < 2
        assert 'kakuremichi_upstream_errors_total{kind="offline",tunnel="t1"} 1.0' in (
            metrics.render()
        )
        answered_writer.write(b"again")  # b's answered connection still works
        await answered_writer.drain()
        assert await asyncio.wait_for(answered_reader.read(100), 5) == b"b:again"
        assert forwarder._unanswered == {}
    finally:
        for writer in opened:
            writer.close()
        await forwarder.close()
        for server in servers:
            await server.stop()


async def test_raw_tcp_dial_answered_as_its_replica_goes_offline_moves_to_another() -> None:
    """Control reports b offline while b's answer to the dial is on its way: the
    connection goes to a (nothing of the client's was sent yet)."""
    port = free_port("127.0.0.1")
    servers = [
        RawServer(await _named_echo(n.encode()), host=h, port=port) for n, h in HOSTS.items()
    ]
    for server in servers:
        await server.start()
    router = Router()

    async def dialer(host: str, dial_port: int, timeout: float) -> Any:
        opened = await asyncio.open_connection(host, dial_port)
        if host == HOSTS["b"]:  # the report lands after the dial, before its caller resumes
            offline = [{"agentId": "a"}, {"agentId": "b", "health": "offline"}]
            asyncio.get_running_loop().call_soon(router.upsert, _tcp_tunnel(port, offline))
        return opened

    forwarder = TcpForwarder(router, dialer, TcpSettings(bind_host="127.0.0.1"), Metrics())
    router.replace_all([_tcp_tunnel(port, TWO)])
    await forwarder.start()
    try:
        await forwarder.wait_reconciled()
        assert await _tcp_once(port) == b"a:hi"  # round robin: the next one goes to b
        assert await _tcp_once(port) == b"a:hi"  # b went offline as it answered
        assert await _tcp_once(port) == b"a:hi"
    finally:
        await forwarder.close()
        for server in servers:
            await server.stop()
