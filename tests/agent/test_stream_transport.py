"""The stream transport end to end on loopback, in one event loop: Control + gateway
(userspace backend, HTTPS on) + agent + the sample app, with the agent's UDP cut by a
switch on its WireGuard socket (the namespace test, ``test_stream_netns.py``, cuts it
with iptables): the tunnel comes up over the WebSocket, serves HTTP, moves back to
UDP when UDP answers again while a slow download keeps going, and back to the stream
when UDP is cut again; ``--transport tcp`` never sends a UDP datagram."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import httpx

from agent.runtime import Agent
from gateway.wg.userspace import UserspaceBackend
from kakuremichi.sampleapp import pattern_sha256
from tests.agent.loopback import System, running_system
from tests.controlserver import RunningControl
from tests.support import free_port, metric_sample


class UdpSwitch:
    """Stands in for the agent's UDP socket: while ``blocked``, nothing goes out and
    what comes in is read and thrown away (as a firewall dropping UDP both ways)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.blocked = False
        self.sent = 0  # datagrams that really left
        self.type = sock.type
        self.family = sock.family

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recvfrom_into(self, buffer: bytearray) -> tuple[int, Any]:
        while True:
            size, addr = self._sock.recvfrom_into(buffer)  # BlockingIOError when empty
            if not self.blocked:
                return size, addr

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.blocked:
            return len(data)
        self.sent += 1
        return self._sock.sendto(data, addr)

    def sendmsg(self, buffers: list[bytes], ancillary: Any, flags: int, addr: Any) -> int:
        if self.blocked:
            return sum(len(b) for b in buffers)
        self.sent += 1
        return self._sock.sendmsg(buffers, ancillary, flags, addr)


def udp_switch(agent: Agent) -> UdpSwitch:
    udp = agent.data_plane.tunnel.udp
    assert udp is not None
    switch = UdpSwitch(udp.sock)
    udp.sock = switch  # type: ignore[assignment]
    return switch


def transport(agent: Agent) -> str:
    keys = list(agent.data_plane.gateways)
    assert len(keys) == 1
    return agent.data_plane.transport_of(keys[0])[0]


async def wait_transport(agent: Agent, wanted: str, within: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while transport(agent) != wanted:
        assert loop.time() - started < within, f"still {transport(agent)} after {within}s"
        await asyncio.sleep(0.1)
    return loop.time() - started


async def healthz(system: System, port: int, path: str = "/healthz") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as client:
        body: dict[str, Any] = (await client.get(f"http://127.0.0.1:{port}{path}")).json()
    return body


async def slow_download(system: System, size: int, seconds: float) -> dict[str, Any]:
    """Read ``size`` bytes of the sample app's pattern over about ``seconds``."""
    digest, total = hashlib.sha256(), 0
    pause = seconds / (size / 65536)
    async with system.http.stream(
        "GET", f"/bytes/{size}", headers={"Host": "app.example.com"}, timeout=60
    ) as response:
        async for chunk in response.aiter_bytes(65536):
            digest.update(chunk)
            total += len(chunk)
            await asyncio.sleep(pause)
    return {"status": response.status_code, "bytes": total, "ok": digest.hexdigest()}


async def test_blocked_udp_uses_the_stream_and_comes_back(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    metrics_port = free_port()
    https_port = free_port()
    async with running_system(
        control,
        api,
        tmp_path,
        gateway_options={"https_port": https_port},
        metrics_port=metrics_port,
    ) as system:
        switch = udp_switch(system.agent)
        switch.blocked = True  # before the first handshake
        loop = asyncio.get_running_loop()
        started = loop.time()
        await system.tunnel(domain="app.example.com", target=f"http://127.0.0.1:{system.app.port}")
        await system.wait_status("app.example.com", 200, 20)
        assert loop.time() - started < 15
        assert transport(system.agent) == "tcp"
        streams = system.gateway.streams
        assert [s.authenticated for s in streams.sessions] == [True]

        # HTTP with bodies both ways, through the stream
        body = bytes(range(256)) * 8192  # 2 MiB
        echoed = await system.http.post("/echo", content=body, headers={"Host": "app.example.com"})
        assert echoed.status_code == 200 and echoed.content == body
        for path in ("/healthz", "/readyz"):  # the same parts, what orchestrators ask
            health = await healthz(system, metrics_port, path)
            assert health["parts"]["wireguard"]["state"] == "ok"
            assert "stream transport (tcp): edge" in health["parts"]["wireguard"]["reason"]
        async with httpx.AsyncClient(timeout=5) as client:
            metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert (
            metric_sample(metrics, "kakuremichi_gateway_transport", gateway="edge", transport="tcp")
            == 1
        )
        connects = metric_sample(
            metrics, "kakuremichi_gateway_stream_connects_total", gateway="edge", result="ok"
        )
        assert connects == 1
        gateway_metrics = system.gateway.metrics.render()
        assert (
            metric_sample(gateway_metrics, "kakuremichi_wireguard_streams", state="authenticated")
            == 1
        )

        # UDP answers again: back on UDP within 30 s while a slow download goes on
        size = 12 * 1024 * 1024
        download = asyncio.ensure_future(slow_download(system, size, 16.0))
        await asyncio.sleep(1.0)
        switch.blocked = False
        back = await wait_transport(system.agent, "udp", 30)
        assert back < 30
        result = await download
        assert result == {"status": 200, "bytes": size, "ok": pattern_sha256(size)}
        await asyncio.sleep(6)  # the stream lingers 5 s, then closes
        assert not streams.sessions
        assert (await system.get("app.example.com")).status_code == 200

        # cut again, in the middle of a download: back on the stream, and the download
        # (paused while UDP is silent, never reset) completes intact
        size = 8 * 1024 * 1024
        download = asyncio.ensure_future(slow_download(system, size, 10.0))
        await asyncio.sleep(1.0)
        switch.blocked = True
        await wait_transport(system.agent, "tcp", 30)
        result = await download
        assert result == {"status": 200, "bytes": size, "ok": pattern_sha256(size)}
        assert (await system.get("app.example.com")).status_code == 200
        wg = system.gateway.wg
        assert isinstance(wg, UserspaceBackend)
        endpoints = [s.endpoint for s in wg.tunnel.stats()]
        assert endpoints and endpoints[0] is not None and endpoints[0].startswith("wss:")


async def test_forced_tcp_never_sends_udp(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_system(
        control, api, tmp_path, gateway_options={"https_port": free_port()}, transport="tcp"
    ) as system:
        switch = udp_switch(system.agent)
        await system.tunnel(domain="app.example.com", target=f"http://127.0.0.1:{system.app.port}")
        await system.wait_status("app.example.com", 200, 20)
        assert transport(system.agent) == "tcp"
        assert switch.sent == 0
        seen = json.loads((await system.get("app.example.com", "/headers")).text)
        assert seen["host"] == "app.example.com"
