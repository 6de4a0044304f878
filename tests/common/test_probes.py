"""``/livez`` and ``/readyz`` on all three programs, and the Prometheus exposition through
``prometheus_client`` (``process_*``, ``python_info``, ``kakuremichi_build_info``, our
families read by a custom collector, checked with prometheus_client's own parser)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.runtime import Agent, AgentSettings
from common import __version__
from common.health import DOWN, OK, Health
from common.relay.admin import AdminServer
from common.relay.metrics import Metrics
from tests.controlserver import RunningControl, create
from tests.support import free_port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_exposition_has_process_build_info_and_our_families_unchanged() -> None:
    metrics = Metrics()
    metrics.request_done("t1", "app.example.com", 200, 0.02)
    metrics.request_done("t1", "app.example.com", 502, None)
    metrics.response_bytes_for("t1")(1234.0)
    metrics.active_connections.inc(listener="http")
    metrics.listener_bind_errors.set(1, protocol="tcp")
    metrics.requests.inc(tunnel="", domain='we"ird\\\n', code="404")  # escaping
    text = metrics.render()
    parsed = samples(text)
    assert (
        parsed[
            (
                "kakuremichi_build_info",
                (("python", __import__("platform").python_version()), ("version", __version__)),
            )
        ]
        == 1
    )
    names = {name for name, _ in parsed}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    # every sample our own writer gives appears with the same value
    ours = samples(metrics.registry.render_plain())
    assert ours and all(parsed[key] == value for key, value in ours.items())
    assert (
        parsed[
            (
                "kakuremichi_http_requests_total",
                (("code", "404"), ("domain", 'we"ird\\\n'), ("tunnel", "")),
            )
        ]
        == 1
    )


async def test_admin_listener_livez_readyz() -> None:
    health = Health()
    health.set("control", OK, "connected")
    health.set("wireguard", DOWN, "no gateway has completed a WireGuard handshake")
    admin = AdminServer(Metrics(), health)
    await admin.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin.port}") as http:
            assert (await http.get("/livez")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["parts"]["wireguard"]["state"] == DOWN
            assert (await http.get("/healthz")).status_code == 503
            health.set("wireguard", OK, "1 of 1 gateways have a live session")
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.head("/livez")).status_code == 200
            assert (await http.post("/livez")).status_code == 405
    finally:
        await admin.close()


async def test_an_agent_waiting_for_a_gateway_is_alive_not_ready(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    row = await create(api, "agent", "waiting")
    port = free_port()
    agent = Agent(
        AgentSettings(
            control_url=control.url,
            api_key=row["apiKey"],
            data_dir=tmp_path / "agent",
            wireguard_host="127.0.0.1",
            metrics_port=port,
        )
    )
    await agent.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await agent.client.connected.wait()
            for _ in range(100):
                if agent.runtime.applied:
                    break
                await __import__("asyncio").sleep(0.05)
            assert (await http.get("/livez")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "no gateway" in ready.json()["parts"]["wireguard"]["reason"]
            assert ready.json()["parts"]["control"]["state"] == OK
    finally:
        await agent.stop()


async def test_control_livez_readyz(
    control: RunningControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with httpx.AsyncClient(base_url=control.url) as http:
        assert (await http.get("/livez")).json() == {"status": "alive"}
        assert (await http.get("/readyz")).status_code == 200
        from sqlalchemy.ext.asyncio import AsyncEngine

        def broken(self: object) -> object:
            raise OSError("database unreachable")

        monkeypatch.setattr(AsyncEngine, "connect", broken)
        down = await http.get("/readyz")
        assert down.status_code == 503 and "database" in down.json()["reason"]
        assert (await http.get("/livez")).status_code == 200
        metrics = await http.get("/metrics")
        if metrics.status_code == 200:  # Control's /metrics (the dashboard's families)
            assert "process_cpu_seconds_total" in metrics.text
            assert "kakuremichi_build_info" in metrics.text
