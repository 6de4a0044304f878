"""Restarts, SIGTERM and configuration errors of the real ``kakuremichi control`` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.controlserver import (
    ADMIN_TOKEN,
    RunningControl,
    connect_client,
    control_command,
    create,
)
from tests.support import free_port


async def test_restart_keeps_everything_and_clients_resync(tmp_path: Path) -> None:
    db = tmp_path / "control.db"
    server = RunningControl(db)
    await server.start()
    async with server.api() as api:
        agent = await create(api, "agent", "laptop")
        gateway = await create(api, "gateway", "edge")
        tunnel = (
            await api.post(
                "/api/tunnels",
                json={"domain": "app.example.com", "target": "127.0.0.1:8080", "agent": "laptop"},
            )
        ).json()
    peer = await connect_client(server, agent["apiKey"], "agent", 1)
    gw = await connect_client(server, gateway["apiKey"], "gateway", 2)
    await peer.expect("config")  # the gateway's key arrived
    before_agent, before_gw = peer.version, gw.version
    port = server.port
    await server.stop()
    for client in (peer, gw):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await client.recv(5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001  # going away

    again = RunningControl(db)
    again.port = port
    await again.start()
    try:
        async with again.api() as api:
            assert (await api.get("/api/agents/laptop")).json()["online"] is False
            assert (await api.get(f"/api/tunnels/{tunnel['id']}")).json()[
                "domain"
            ] == "app.example.com"
        peer = await connect_client(again, agent["apiKey"], "agent", 1)
        gw = await connect_client(again, gateway["apiKey"], "gateway", 2)
        assert peer.version > before_agent and gw.version > before_gw  # monotonic across restarts
        config = peer.frames[1]["data"]
        assert config["tunnels"][0]["id"] == tunnel["id"]
        assert config["gateways"][0]["endpoint"] == "192.0.2.10:51820"
        assert gw.frames[1]["data"]["agents"][0]["name"] == "laptop"
        async with again.api() as api:
            assert (await api.get("/api/agents/laptop")).json()["online"] is True
        await peer.close()
        await gw.close()
    finally:
        await again.stop()


def _spawn(
    tmp_path: Path, port: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        control_command(port, tmp_path / "data", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


async def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            if proc.poll() is not None:
                raise AssertionError(f"control exited: {proc.communicate()}")
            try:
                if (await client.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("control did not come up")


async def test_sigterm_closes_websockets_with_going_away(tmp_path: Path) -> None:
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    proc = _spawn(
        tmp_path,
        port,
        "--log-format",
        "json",
        env={"KAKUREMICHI_ADMIN_TOKEN_FILE": str(token_file)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url, proc)
        shim = RunningControl(tmp_path / "unused.db")
        shim.port = port
        async with shim.api() as api:
            agent = await create(api, "agent", "laptop")
        peer = await connect_client(shim, agent["apiKey"], "agent", 3)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await peer.recv(10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any(
        line["msg"] == "client connected" and line.get("client") == "laptop" for line in lines
    )
    assert agent["apiKey"] not in out + err and ADMIN_TOKEN not in out + err


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--port", "99999"], {}, "--port"),
        (["--address-pool", "300.0.0.0/8"], {}, "--address-pool"),
        (["--agent-prefix", "x"], {}, "--agent-prefix"),
        (["--log-format", "xml"], {}, "--log-format"),
        ([], {"KAKUREMICHI_OFFLINE_AFTER": "-3"}, "KAKUREMICHI_OFFLINE_AFTER"),
        (
            [],
            {"KAKUREMICHI_ADMIN_TOKEN_FILE": "/nonexistent/token"},
            "KAKUREMICHI_ADMIN_TOKEN_FILE",
        ),
        (["--admin-token", "short"], {}, "--admin-token"),
        (["--config", "/nonexistent.toml"], {}, "config"),
    ],
)
def test_bad_configuration_exits_2_naming_the_setting(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", "control", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", "control", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for flag in (
        "--host",
        "--port",
        "--data-dir",
        "--admin-token",
        "--address-pool",
        "KAKUREMICHI_ADMIN_TOKEN_FILE",
        "--log-format",
    ):
        assert flag in result.stdout
