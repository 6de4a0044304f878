"""PROXY protocol v1/v2 towards raw TCP and UDP targets (issue 15): the app behind a
tunnel with ``proxyProtocol`` sees the client's address.

* The agent's tunnel port (``agent.forward.HttpTunnels``) on a kernel socket: a raw TCP
  tunnel's connection arrives with the gateway's PROXY header (the client's address and
  the tunnel id); the target gets the tunnel's version of it, then the client's bytes
  unchanged; an agent that has not seen the setting yet sends them bare; a header
  without the client's address, or naming a UDP tunnel, is refused without dialling; a
  retargeted tunnel ends its connections.
* The whole system on loopback (Control + gateway on the userspace backend + agent, one
  event loop) with a real consumer: nginx (Debian's nginx-light) listening with
  ``proxy_protocol`` and answering ``$proxy_protocol_addr $proxy_protocol_port``
  through raw TCP tunnels with v1 and v2 (and a plain listener through a tunnel without
  the setting, as before); a client's own header is only payload; a connection reaching
  the agent's raw port without the gateway's header gets nginx's "unknown address".
  A UDP tunnel with v2 to a server in this test that parses every datagram's header
  with ``common.relay.proxyproto`` and answers with the client's address; datagrams on
  the agent's tunnel port without a valid header are dropped and counted.  The
  gateway's access-log flow lines have the same form with and without the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.relay import proxyproto
from common.relay.accesslog import AccessLogSettings
from tests.agent.loopback import running_system
from tests.agent.test_http_tunnels import (
    LocalService,
    close,
    expect_refused,
    http_tunnel,
    running_agent,
)
from tests.agent.test_system_loopback import agent_ip
from tests.controlserver import RunningControl
from tests.support import free_port, need

# -- the agent's tunnel port, alone ------------------------------------------------------


class Recorder:
    """A target that keeps everything each connection sends and answers ``ok``."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        self.received.put_nowait(data)
        writer.write(b"ok")
        await writer.drain()


def raw_tunnel(tunnel_id: str, port: int, proxy: str | None, protocol: str = "tcp") -> Any:
    return dataclasses.replace(
        http_tunnel(tunnel_id, port),
        protocol=protocol,
        domain=None,
        public_port=2222 if protocol == "tcp" else 5353,
        proxy_protocol=proxy,
    )


CLIENT = ("203.0.113.7", 50123)
LISTENER = ("198.51.100.1", 2222)


def gateway_header(tunnel_id: str, **fields: Any) -> bytes:
    return proxyproto.encode(
        tunnel_id=tunnel_id, **({"source": CLIENT, "destination": LISTENER} | fields)
    )


async def through(agent: Any, data: bytes) -> bytes:
    reader, writer = await agent.connect()
    writer.write(data)
    writer.write_eof()
    answer = await reader.read()
    await close(writer)
    return answer


async def test_raw_tcp_on_the_tunnel_port_sends_the_target_the_client() -> None:
    recorder = Recorder()
    async with asyncio.timeout(10), LocalService(recorder) as target:
        tunnels = [
            raw_tunnel("v1", target.port, "v1"),
            dataclasses.replace(raw_tunnel("v2", target.port, "v2"), public_port=2223),
            dataclasses.replace(raw_tunnel("off", target.port, None), public_port=2224),
        ]
        async with running_agent(tunnels) as agent:
            # the client's bytes follow the agent's header unchanged, a header of its
            # own included
            spoof = b"PROXY TCP4 6.6.6.6 6.6.6.7 1 2\r\nhello"
            assert await through(agent, gateway_header("v1") + spoof) == b"ok"
            assert await recorder.received.get() == (
                b"PROXY TCP4 203.0.113.7 198.51.100.1 50123 2222\r\n" + spoof
            )
            assert await through(agent, gateway_header("v2") + b"hello") == b"ok"
            data = await recorder.received.get()
            header, rest = proxyproto.HeaderReader(v1=False).feed(data) or (None, b"")
            assert header == proxyproto.ProxyHeader(proxyproto.COMMAND_PROXY, CLIENT, LISTENER)
            assert rest == b"hello"
            # the gateway has the setting, this agent not yet: the target gets it bare
            assert await through(agent, gateway_header("off") + b"hello") == b"ok"
            assert await recorder.received.get() == b"hello"
            assert agent.metrics.tcp_connections.get(tunnel="v1") == 1
            assert agent.metrics.tcp_bytes.get(tunnel="v1", direction="in") == len(spoof)


REFUSED = {
    "LOCAL, no client": proxyproto.encode(tunnel_id="v1"),
    "a UDP header": gateway_header("v1", transport="udp"),
    "a UDP tunnel": gateway_header("u1"),
    "an unknown tunnel": gateway_header("nope"),
}


async def test_raw_tcp_headers_without_a_client_are_refused() -> None:
    recorder = Recorder()
    async with asyncio.timeout(10), LocalService(recorder) as target:
        tunnels = [raw_tunnel("v1", target.port, "v1"), raw_tunnel("u1", target.port, "v2", "udp")]
        async with running_agent(tunnels) as agent:
            for data in REFUSED.values():
                reader, writer = await agent.connect()
                writer.write(data + b"hello")
                await expect_refused(reader)
                await close(writer)
            assert target.accepts == 0
            assert agent.rejected("unknown_tunnel") == len(REFUSED)


async def test_a_retargeted_raw_tunnel_ends_its_connections() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"held\n")
        await reader.read()

    async with asyncio.timeout(10), LocalService(hold) as target:
        tunnel = raw_tunnel("v1", target.port, "v2")
        async with running_agent([tunnel]) as agent:
            reader, writer = await agent.connect()
            writer.write(gateway_header("v1"))
            assert await reader.readline() == b"held\n"
            moved = dataclasses.replace(tunnel, target="127.0.0.1:9")
            agent.tunnels.router.replace_all([moved])
            assert agent.tunnels.reconcile() == 1
            await expect_refused(reader)
            await close(writer)


# -- the whole system, with nginx as the consumer ------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{pp} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "$proxy_protocol_addr $proxy_protocol_port";
        }}
    }}
    server {{
        listen 127.0.0.1:{plain};
        location / {{
            default_type text/plain;
            return 200 "plain $remote_addr";
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def nginx(prefix: Path) -> AsyncIterator[tuple[int, int]]:
    """nginx with a ``proxy_protocol`` listener and a plain one: (pp port, plain port)."""
    binary = nginx_binary()
    need(binary is not None, "needs nginx (Debian's nginx-light)")
    assert binary is not None
    prefix.mkdir(parents=True, exist_ok=True)
    pp, plain = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, pp=pp, plain=plain))
    argv = [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log"]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = await asyncio.create_subprocess_exec(
        *argv, "-g", "daemon off;", stdout=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", plain)
                except OSError:
                    assert proc.returncode is None, "nginx exited"
                    await asyncio.sleep(0.05)
                    continue
                await close(writer)
                break
        yield pp, plain
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGQUIT)  # graceful: the worker goes too
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


REQUEST = b"GET / HTTP/1.0\r\nHost: app\r\n\r\n"


def body(response: bytes) -> tuple[bytes, bytes]:
    """(status line, body) of an HTTP/1.0 answer."""
    head, _, rest = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], rest


async def ask(port: int, prefix: bytes = b"") -> tuple[bytes, bytes, int]:
    """An HTTP/1.0 request through the gateway's raw port: (status, body, our port)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local_port = int(writer.get_extra_info("sockname")[1])
    writer.write(prefix + REQUEST)
    answer = await asyncio.wait_for(reader.read(), 5)
    await close(writer)
    status, text = body(answer)
    return status, text, local_port


async def ask_until_up(port: int) -> tuple[bytes, bytes, int]:
    """Retry while the tunnel comes up (listeners, WireGuard handshake)."""
    async with asyncio.timeout(30):
        while True:
            try:
                status, text, local = await ask(port)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            if status:
                return status, text, local
            await asyncio.sleep(0.1)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():  # the first lines are on their way
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def test_nginx_sees_the_client_through_raw_tcp_tunnels(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    access = AccessLogSettings(path=str(log_path), format="json", flush_interval=0.05)
    async with (
        nginx(tmp_path / "nginx") as (pp, plain),
        running_system(control, api, tmp_path, {"access_log": access}) as system,
    ):
        ports = {name: free_port() for name in ("v1", "v2", "plain")}
        for name, version in (("v1", "v1"), ("v2", "v2")):
            await system.tunnel(
                protocol="tcp",
                public_port=ports[name],
                target=f"127.0.0.1:{pp}",
                proxyProtocol=version,
            )
        await system.tunnel(protocol="tcp", public_port=ports["plain"], target=f"127.0.0.1:{plain}")
        for name in ("v1", "v2"):
            status, text, local = await ask_until_up(ports[name])
            assert status == b"HTTP/1.1 200 OK", (name, status, text)
            assert text == f"127.0.0.1 {local}".encode(), name  # the client, not the agent
            # a client's own header is part of its request: nginx refuses that request
            spoof = b"PROXY TCP4 6.6.6.6 6.6.6.7 1 2\r\n"
            status, text, _ = await ask(ports[name], spoof)
            assert status == b"HTTP/1.1 400 Bad Request" and b"6.6.6.6" not in text
        status, text, _ = await ask_until_up(ports["plain"])
        assert (status, text) == (b"HTTP/1.1 200 OK", b"plain 127.0.0.1")  # as before

        # the agent's raw port reached without the gateway's header (a gateway that has
        # not seen the setting): nginx gets "address unknown" and answers, with none
        address = await agent_ip(system)
        wg: Any = system.gateway.wg
        for name in ("v1", "v2"):
            reader, writer = await wg.dial(address, ports[name], 5)
            writer.write(REQUEST)
            status, text = body(await asyncio.wait_for(reader.read(), 5))
            await close(writer)
            assert (status, text) == (b"HTTP/1.1 200 OK", b" "), name

        # the access log's flow lines: the same fields and meaning with the setting
        def served(port: int) -> list[dict[str, Any]]:
            return [
                line
                for line in lines
                if line["port"] == port and line["decision"] == "allow" and line["bytes_out"]
            ]

        async with asyncio.timeout(10):
            while True:
                lines = read_json_lines(log_path)
                if all(served(port) for port in ports.values()):
                    break
                await asyncio.sleep(0.05)
        plain_line = served(ports["plain"])[0]
        for name in ("v1", "v2"):
            line = served(ports[name])[0]
            assert list(line) == list(plain_line)
            assert line["client"] == "127.0.0.1" and line["upstream"] == address
            assert line["bytes_in"] == len(REQUEST)  # the client's bytes, no header
            assert line["protocol"] == "tcp"


class ClientEcho(asyncio.DatagramProtocol):
    """The UDP app: parses each datagram's PROXY v2 header and answers with the client
    address it names and the payload (``bad ...`` when the header does not parse)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.headers: list[proxyproto.ProxyHeader] = []
        self.payload_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            header, payload = proxyproto.split_datagram(data)
        except proxyproto.ProxyHeaderError as exc:
            answer = f"bad {exc}".encode()
        else:
            self.headers.append(header)
            self.payload_bytes += len(payload)
            source = header.source or ("-", 0)
            answer = f"{source[0]} {source[1]} ".encode() + payload
        assert self.transport is not None
        self.transport.sendto(answer, addr)


class Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def test_udp_tunnel_with_v2_gives_each_datagram_its_client(
    control: RunningControl,
    api: httpx.AsyncClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    app = ClientEcho()
    app_transport, _ = await loop.create_datagram_endpoint(lambda: app, local_addr=("127.0.0.1", 0))
    app_port = app_transport.get_extra_info("sockname")[1]
    log_path = tmp_path / "access.log"
    access = AccessLogSettings(path=str(log_path), format="json", flush_interval=0.05)
    public, plain_public = free_port(kind=2), free_port(kind=2)
    try:
        async with running_system(control, api, tmp_path, {"access_log": access}) as system:
            await system.tunnel(
                protocol="udp",
                public_port=public,
                target=f"127.0.0.1:{app_port}",
                proxyProtocol="v2",
            )
            await system.tunnel(
                protocol="udp", public_port=plain_public, target=f"127.0.0.1:{app_port}"
            )
            inbox = Inbox()
            client, _ = await loop.create_datagram_endpoint(
                lambda: inbox, remote_addr=("127.0.0.1", public)
            )
            local = client.get_extra_info("sockname")[1]
            sent = 0
            try:
                async with asyncio.timeout(30):
                    while True:
                        client.sendto(b"hello")
                        sent += 5
                        with contextlib.suppress(TimeoutError):
                            answer = await asyncio.wait_for(inbox.queue.get(), 0.5)
                            break
                assert answer == f"127.0.0.1 {local} hello".encode()
                for index in range(20):
                    client.sendto(b"n%d" % index)
                    sent += len(b"n%d" % index)
                got = set()
                async with asyncio.timeout(10):
                    while len(got) < 18:  # UDP may drop; loopback rarely does
                        got.add(await inbox.queue.get())
                expected = {f"127.0.0.1 {local} n{i}".encode() for i in range(20)}
                assert got <= expected | {answer}  # late answers to the first tries too
                last = app.headers[-1]
                assert last.destination == ("127.0.0.1", public) and last.transport == "udp"
                # the header takes 28 bytes of a datagram's room in the tunnel (MTU 1420,
                # IPv4): 1364 bytes still go, one more is dropped and counted, quietly
                client.sendto(b"z" * 1364)
                sent += 1364
                async with asyncio.timeout(5):
                    while not (reply := await inbox.queue.get()).endswith(b"z"):
                        pass  # the last answers to the numbered ones
                assert reply == f"127.0.0.1 {local} ".encode() + b"z" * 1364
                gateway_metrics = system.gateway.metrics
                with caplog.at_level(logging.WARNING):
                    client.sendto(b"z" * 1365)
                    sent += 1365
                    async with asyncio.timeout(5):
                        while not gateway_metrics.rejected.get(reason="udp_send_failed"):
                            await asyncio.sleep(0.02)
                assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
                received = app.payload_bytes
            finally:
                client.close()

            # the plain tunnel reaches the same app without a header: it says so
            inbox = Inbox()
            plain, _ = await loop.create_datagram_endpoint(
                lambda: inbox, remote_addr=("127.0.0.1", plain_public)
            )
            try:
                async with asyncio.timeout(10):
                    while True:
                        plain.sendto(b"x")
                        with contextlib.suppress(TimeoutError):
                            answer = await asyncio.wait_for(inbox.queue.get(), 0.5)
                            break
                assert answer.startswith(b"bad ")
            finally:
                plain.close()

            # datagrams on the agent's tunnel port from the gateway's side without a
            # valid header are dropped and counted, none reaches the app
            address = await agent_ip(system)
            metrics = system.agent.forwarder.metrics
            before = metrics.rejected.get(reason="proxy_header")
            seen = len(app.headers)
            replies: asyncio.Queue[bytes] = asyncio.Queue()
            wg: Any = system.gateway.wg
            flow = await wg.udp_flow(address, 80, replies.put_nowait)
            bad = [
                b"no header at all",
                proxyproto.encode(source=("203.0.113.1", 1), destination=("127.0.0.1", public))
                + b"a TCP header",
                proxyproto.encode() + b"LOCAL",
                proxyproto.encode(
                    source=("203.0.113.1", 1), destination=("127.0.0.1", public), transport="udp"
                )[:-3],
            ]
            try:
                for datagram in bad:
                    flow.send(datagram)
                async with asyncio.timeout(10):
                    while metrics.rejected.get(reason="proxy_header") < before + len(bad):
                        await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)
                assert replies.empty() and len(app.headers) == seen
            finally:
                flow.close()
        # the flows ended with the gateway: their access-log lines have one form
        lines = read_json_lines(log_path)
        udp = {line["port"]: line for line in lines if line["protocol"] == "udp"}
        assert list(udp[public]) == list(udp[plain_public])
        assert udp[public]["client"] == "127.0.0.1" and udp[public]["decision"] == "allow"
        # the client's bytes, not the headers: between what reached the app and what
        # the client sent (the first may have been lost while the tunnel came up)
        assert received <= udp[public]["bytes_in"] <= sent
    finally:
        app_transport.close()
