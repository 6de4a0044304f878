"""The whole system on loopback inside one event loop: Control + gateway (userspace
backend) + agent + local services.  No root, no namespaces: what the demo runs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from agent.runtime import Agent, AgentSettings
from gateway.runtime import Gateway, GatewaySettings
from kakuremichi.sampleapp import create_app
from tests.controlserver import RunningControl, create
from tests.support import free_port


class AppServer:
    """The sample app on a loopback port, in this event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(), host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = False  # type: ignore[attr-defined]
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> AppServer:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        async with asyncio.timeout(10):
            while not self.server.started:
                await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


async def tcp_echo() -> asyncio.Server:
    """Echoes bytes; answers EOF with EOF (half-close), so the client can read to the end."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(b"echo:" + data, addr)


async def udp_echo() -> asyncio.DatagramTransport:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _UdpEcho, local_addr=("127.0.0.1", 0)
    )
    return transport


@dataclass
class System:
    control: RunningControl
    api: httpx.AsyncClient
    gateway: Gateway
    agent: Agent
    app: AppServer
    agent_row: dict[str, Any]
    gateway_row: dict[str, Any]
    tmp: Path
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.gateway.settings.http_port}", timeout=30
        )

    async def tunnel(self, **fields: Any) -> dict[str, Any]:
        response = await self.api.post("/api/tunnels", json={"agent": "laptop", **fields})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def get(self, host: str, path: str = "/") -> httpx.Response:
        return await self.http.get(path, headers={"Host": host})

    async def wait_status(self, host: str, status: int, within: float, path: str = "/") -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        last: Any = None
        while loop.time() - started < within:
            try:
                last = (await self.get(host, path)).status_code
            except httpx.HTTPError as exc:
                last = exc
            if last == status:
                return loop.time() - started
            await asyncio.sleep(0.05)
        raise AssertionError(f"wanted {status} from {host} within {within}s, last {last!r}")


@contextlib.asynccontextmanager
async def running_system(
    control: RunningControl,
    api: httpx.AsyncClient,
    tmp: Path,
    gateway_options: dict[str, Any] | None = None,
    **agent_options: Any,
) -> AsyncIterator[System]:
    app = await AppServer().start()
    agent_row = await create(api, "agent", "laptop")
    gateway_row = await create(api, "gateway", "edge")
    options: dict[str, Any] = {
        "control_url": control.url,
        "api_key": gateway_row["apiKey"],
        "data_dir": tmp / "gateway",
        "public_ip": "127.0.0.1",
        "wireguard_port": free_port(kind=socket.SOCK_DGRAM),
        "backend": "userspace",
        "host": "127.0.0.1",
        "http_port": free_port(),
        "https_port": 0,
        "admin_port": free_port(),
        **(gateway_options or {}),
    }
    gateway = Gateway(GatewaySettings(**options))
    agent = Agent(
        AgentSettings(
            control_url=control.url,
            api_key=agent_row["apiKey"],
            data_dir=tmp / "agent",
            wireguard_host="127.0.0.1",
            **agent_options,
        )
    )
    await gateway.start()
    await agent.start()
    system = System(control, api, gateway, agent, app, agent_row, gateway_row, tmp)
    try:
        yield system
    finally:
        await system.http.aclose()
        await system.agent.stop()  # a test may have replaced it
        await system.gateway.stop()
        await app.stop()
