"""A real Control (uvicorn on loopback, SQLite file) and real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from common import protocol
from control.app import ControlSettings, create_app
from control.main import _Server
from tests.support import free_port

ADMIN_TOKEN = "test-admin-token-0123456789"


def control_args(port: int, data_dir: Path, *extra: str) -> list[str]:
    """``kakuremichi`` arguments for a Control on 127.0.0.1:``port`` keeping its state
    in ``data_dir``, then ``extra``."""
    return [
        "control",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *extra,
    ]


def control_command(port: int, data_dir: Path, *extra: str) -> list[str]:
    """The command line running that Control as a process (``control_args``)."""
    return [sys.executable, "-m", "kakuremichi.cli", *control_args(port, data_dir, *extra)]


class RunningControl:
    """A Control server started inside the test's event loop."""

    def __init__(self, db_path: Path, **overrides: Any) -> None:
        self.db_path = db_path
        self.overrides = overrides
        self.port = free_port()
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.app: Any = None
        self.announced: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> RunningControl:
        settings = ControlSettings(
            database_url=self.overrides.pop("database_url", f"sqlite+aiosqlite:///{self.db_path}"),
            admin_token=self.overrides.pop("admin_token", ADMIN_TOKEN),
            announce=self.announced.append,
            **self.overrides,
        )
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            ws_max_size=protocol.MAX_FRAME_BYTES,
            ws_per_message_deflate=False,
            lifespan="on",
        )
        self.server = _Server(config, self.app)
        self.server.install_signal_handlers = False  # type: ignore[attr-defined]
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        for _ in range(500):
            if self.server.started:
                return self
            if self.task.done():
                self.task.result()
                raise RuntimeError("control exited during start-up")
            await asyncio.sleep(0.01)
        raise TimeoutError("control did not start")

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await asyncio.wait_for(self.task, 20)
            self.server = None

    def api(self, token: str | None = ADMIN_TOKEN) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)


@contextlib.asynccontextmanager
async def control_replicas(
    directory: Path, database_url: str, replica_timeout: float = 2.0
) -> AsyncIterator[tuple[RunningControl, RunningControl]]:
    """Two Control replicas on one (PostgreSQL) database, stopped in reverse order."""
    first = await RunningControl(
        directory / "a.db", database_url=database_url, replica_timeout=replica_timeout
    ).start()
    try:
        second = await RunningControl(
            directory / "b.db", database_url=database_url, replica_timeout=replica_timeout
        ).start()
        try:
            yield first, second
        finally:
            await second.stop()
    finally:
        await first.stop()


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[RunningControl]:
    server = RunningControl(tmp_path / "control.db")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api(control: RunningControl) -> AsyncIterator[httpx.AsyncClient]:
    async with control.api() as client:
        yield client


def public_key(seed: int) -> str:
    return base64.b64encode(bytes([seed % 256]) * 32).decode()


class Peer:
    """A WebSocket client speaking the Control protocol, recording every frame."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.version = 0

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        self.frames.append(frame)
        if isinstance(frame.get("configVersion"), int):
            self.version = frame["configVersion"]
        return frame

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """Next frame of this type (others are recorded and skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {type_!r} frame within {timeout}s; got {self.types()}")
            frame = await self.recv(left)
            if frame["type"] == type_:
                return frame

    async def nothing(self, wait: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            frame = await self.recv(wait)
            raise AssertionError(f"unexpected frame {frame}")

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]

    async def send(self, type_: str, data: Any) -> None:
        await self.ws.send(json.dumps({"type": type_, "data": data}))

    async def heartbeat(self, version: int | None = None) -> None:
        await self.send(
            "heartbeat",
            {"timestamp": 1.0, "configVersion": self.version if version is None else version},
        )

    async def close(self) -> None:
        await self.ws.close()


async def connect_client(
    control: RunningControl,
    api_key: str,
    client_type: str,
    seed: int,
    public_ip: str = "192.0.2.10",
    wireguard_port: int = 51820,
    https_port: int | None = None,
) -> Peer:
    ws = await connect(control.ws_url, max_size=protocol.MAX_FRAME_BYTES * 4)
    peer = Peer(ws)
    data: dict[str, Any] = {
        "apiKey": api_key,
        "clientType": client_type,
        "publicKey": public_key(seed),
        "version": "test/1",
    }
    if client_type == "gateway":
        data |= {"publicIp": public_ip, "wireguardPort": wireguard_port, "httpsPort": https_port}
    await peer.send("auth", data)
    frame = await peer.recv()
    assert frame["type"] == "auth_success", frame
    config = await peer.recv()
    assert config["type"] == "config", config
    return peer


async def create(api: httpx.AsyncClient, kind: str, name: str) -> dict[str, Any]:
    response = await api.post(f"/api/{kind}s", json={"name": name})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def in_ci() -> bool:
    return os.environ.get("CI") == "true"
