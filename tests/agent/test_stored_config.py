"""The gateway and the agent started while Control is unreachable serve the
configuration they stored (``last-config.json``, 0600), and ``/healthz`` says which
part is degraded or down; the gateway's failed reconcile pass (a ``WgError``) is
logged in one line, retried with back-off, and applied once it works."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.runtime import Agent, AgentSettings
from common import protocol as p
from common.controlclient import ControlView
from common.keys import load_or_create
from common.supervisor import Backoff
from gateway.runtime import Gateway, GatewaySettings
from gateway.wg.device import WgError
from gateway.wg.state import WgState
from tests.configframes import agent_config_data
from tests.support import free_port


def tunnel(tunnel_id: str, domain: str, agent_ip: str = "100.64.0.100") -> dict[str, Any]:
    return p.TunnelSpec(
        tunnel_id, "http", domain, None, "127.0.0.1:8080", "a", agent_ip, True
    ).to_wire()


def agent_entry(n: int, public_key: str) -> dict[str, Any]:
    return {
        "id": f"a{n}",
        "name": f"agent{n}",
        "publicKey": public_key,
        "subnet": f"100.64.{n}.0/24",
        "virtualIp": f"100.64.{n}.100",
        "allowedIps": [f"100.64.{n}.100/32"],
        "gatewayIp": f"100.64.{n}.1",
    }


def gateway_config(tmp: Path, *agents: int, tunnels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "gateway": {
            "id": "g",
            "name": "edge",
            "slot": 1,
            "publicIp": "127.0.0.1",
            "wireguardPort": 51820,
            "addresses": [f"100.64.{n}.1/24" for n in agents],
        },
        "agents": [
            agent_entry(n, load_or_create(tmp / f"agent-key-{n}").public_b64) for n in agents
        ],
        "tunnels": tunnels,
        "certificates": [],
    }


def store(data_dir: Path, role: str, data: dict[str, Any]) -> Path:
    """What a previous run stored (the runtime writes it the same way)."""
    view = ControlView()
    view.apply(p.Frame("config", data, 5), role)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "last-config.json"
    view.store(path)
    return path


async def until(predicate: Callable[[], object], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def healthz(port: int) -> tuple[int, dict[str, dict[str, str]]]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as admin:
        response = await admin.get("/healthz")
    body: dict[str, Any] = response.json()
    return response.status_code, body["parts"]


async def test_gateway_serves_its_stored_config_and_retries_a_failed_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "gateway"
    first = [tunnel("t1", "app.example.com", "100.64.1.100")]
    store(data_dir, "gateway", gateway_config(tmp_path, 1, tunnels=first))
    settings = GatewaySettings(
        control_url=f"http://127.0.0.1:{free_port()}",  # Control is away
        api_key="gtw_stored_config_test_0123456789",
        data_dir=data_dir,
        public_ip="127.0.0.1",
        wireguard_port=free_port(kind=socket.SOCK_DGRAM),
        backend="userspace",
        host="127.0.0.1",
        http_port=free_port(),
        https_port=0,
        admin_port=free_port(),
    )
    gateway = Gateway(settings)
    gateway.runtime.backoff = Backoff(0.05, 0.2)
    caplog.set_level(logging.INFO)
    await gateway.start()
    try:
        await until(lambda: gateway.runtime.applied >= 1)
        route = gateway.router.lookup_host("app.example.com")
        assert route is not None and route.upstream_host == "100.64.1.100"
        status, parts = await healthz(settings.admin_port)
        assert status == 200
        assert parts["config"] == {
            "state": "ok",
            "reason": "applied the stored configuration (1 tunnels)",
        }
        assert parts["control"]["state"] == "degraded"
        assert "serving the stored configuration" in parts["control"]["reason"]
        assert parts["wireguard"]["state"] == "ok" and parts["tasks"]["state"] == "ok"

        # a WireGuard change that fails once: one line, a retry, then it is applied
        real_apply = gateway.wg.apply
        failed = asyncio.Event()
        release = asyncio.Event()

        async def fail_once(state: WgState) -> None:
            if not failed.is_set():
                failed.set()
                raise WgError("wg set wg0 peer …: Operation not permitted")
            await release.wait()
            await real_apply(state)

        gateway.wg.apply = fail_once  # type: ignore[method-assign]
        frame = p.Frame(
            "config",
            gateway_config(
                tmp_path,
                1,
                2,
                tunnels=[*first, tunnel("t2", "b.example.com", "100.64.2.100")],
            ),
            6,
        )
        assert gateway.client.view.apply(frame, "gateway")
        assert gateway.client.on_change is not None
        gateway.client.on_change(gateway.client.view)
        await failed.wait()
        await until(lambda: gateway.runtime.last_error)
        status, parts = await healthz(settings.admin_port)
        assert status == 200 and parts["config"]["state"] == "degraded"
        assert "WgError: wg set wg0 peer" in parts["config"]["reason"]
        release.set()
        await until(lambda: gateway.runtime.applied >= 2)
        assert gateway.wg.tunnel.peer_keys() == {  # type: ignore[union-attr]
            a["publicKey"] for a in frame.data["agents"]
        }
        [line] = [
            r for r in caplog.records if "applying the configuration failed" in r.getMessage()
        ]
        assert line.exc_info is None  # an expected error: one line, no traceback
        assert line.fields["role"] == "gateway" and line.fields["config_version"] == 6  # type: ignore[attr-defined]
        status, parts = await healthz(settings.admin_port)
        assert status == 200 and parts["config"]["state"] == "ok"
    finally:
        await gateway.stop()
    assert oct((data_dir / "last-config.json").stat().st_mode & 0o777) == "0o600"
    assert "gtw_stored_config_test" not in caplog.text


async def test_agent_serves_its_stored_config_and_says_no_gateway_answers(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "agent"
    gateway_key = load_or_create(tmp_path / "gateway-key").public_b64
    silent = free_port(kind=socket.SOCK_DGRAM)  # a gateway that never answers
    path = store(
        data_dir,
        "agent",
        agent_config_data(
            tunnel("t1", "app.example.com"),
            gateway_key=gateway_key,
            endpoint=f"127.0.0.1:{silent}",
        ),
    )
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    metrics_port = free_port()
    agent = Agent(
        AgentSettings(
            control_url=f"http://127.0.0.1:{free_port()}",
            api_key="agt_stored_config_test_0123456789",
            data_dir=data_dir,
            wireguard_host="127.0.0.1",
            metrics_port=metrics_port,
            health_interval=60,
        )
    )
    await agent.start()
    try:
        await until(lambda: agent.applied >= 1)
        assert agent.data_plane.address == "100.64.0.100"
        assert list(agent.data_plane.gateways) == [gateway_key]
        assert agent.forwarder.router.lookup_host("app.example.com") is not None
        status, parts = await healthz(metrics_port)
        assert status == 503  # nothing can reach this agent
        assert parts["wireguard"] == {
            "state": "down",
            "reason": "no gateway has completed a WireGuard handshake",
        }
        assert parts["config"] == {
            "state": "ok",
            "reason": "applied the stored configuration (1 tunnels)",
        }
        assert parts["control"]["state"] == "degraded"
    finally:
        await agent.stop()
