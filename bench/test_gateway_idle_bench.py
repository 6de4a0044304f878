"""Idle keep-alive clients held by the gateway: 10,000 connections and its RSS.

``kakuremichi control`` and ``kakuremichi gateway`` (userspace backend, no agent needed)
run as their own processes on loopback, started as a user would.  The bench then opens
``KAKUREMICHI_BENCH_IDLE_CONNECTIONS`` (default 10,000) keep-alive connections from
this process, each sending one request the gateway answers itself (404: no tunnel for
the host) and then staying open and silent; it reads the gateway's RSS
(``/proc/PID/status`` VmRSS) before and with all of them open, checks the gateway's own
``kakuremichi_active_connections`` gauge, and sends a second request on a sample of
the held connections to show they are still served.  Reported (``extra_info``, and a
line printed with ``-s``): connections held, RSS idle and loaded, KiB per connection,
and how long opening them took.  No timing is asserted.

    pytest bench/test_gateway_idle_bench.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port

CONNECTIONS = int(os.environ.get("KAKUREMICHI_BENCH_IDLE_CONNECTIONS", "10000"))
SAMPLE = 200
REQUEST = b"GET / HTTP/1.1\r\nHost: idle.example.com\r\nUser-Agent: idle-bench\r\n\r\n"


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kakuremichi.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited early: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _raise_nofile()
    tmp = tmp_path_factory.mktemp("idle")
    token = secrets.token_urlsafe(24)
    control_port, http_port, admin_port = free_port(), free_port(), free_port()
    wg_port = free_port(kind=2)  # SOCK_DGRAM
    control_log, gateway_log = tmp / "control.log", tmp / "gateway.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        control = _spawn(
            ["control", "--host", "127.0.0.1", "--port", str(control_port), "--data-dir",
             str(tmp / "control"), "--log-level", "warning"],
            control_log,
            {"KAKUREMICHI_ADMIN_TOKEN": token},
        )  # fmt: skip
        procs.append(control)
        control_url = f"http://127.0.0.1:{control_port}"
        _wait_http(f"{control_url}/healthz", time.monotonic() + 30, control, control_log)
        created = httpx.post(
            f"{control_url}/api/gateways",
            json={"name": "edge"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        created.raise_for_status()
        gw = _spawn(
            ["gateway", "--control-url", control_url, "--public-ip", "127.0.0.1",
             "--wireguard-backend", "userspace", "--wireguard-port", str(wg_port),
             "--host", "127.0.0.1", "--http-port", str(http_port), "--https-port", "0",
             "--admin-port", str(admin_port), "--rate-limit", "0",
             "--max-connections-per-client", "0", "--max-connections", str(2 * CONNECTIONS),
             "--data-dir", str(tmp / "gateway"),
             "--log-level", "warning"],
            gateway_log,
            {"KAKUREMICHI_API_KEY": created.json()["apiKey"]},
        )  # fmt: skip
        procs.append(gw)
        _wait_http(f"http://127.0.0.1:{http_port}/", time.monotonic() + 30, gw, gateway_log)
        yield {"pid": gw.pid, "port": http_port, "admin": admin_port, "log": gateway_log}
    finally:
        for proc in reversed(procs):
            _stop(proc)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(REQUEST)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return status


async def _hold(port: int, count: int) -> dict[str, Any]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conns.append((reader, writer))
        assert await _exchange(reader, writer) == 404

    started = time.monotonic()
    try:
        async with asyncio.timeout(300):
            for start in range(0, count, 250):
                await asyncio.gather(*(one() for _ in range(min(250, count - start))))
        opened = time.monotonic() - started
        return {"conns": conns, "open_seconds": opened}
    except BaseException:
        for _, writer in conns:
            writer.transport.abort()
        raise


def test_gateway_holds_idle_keepalive_connections(benchmark: Any, gateway: dict[str, Any]) -> None:
    result: dict[str, Any] = {}

    async def scenario() -> None:
        idle_rss = rss_kib(gateway["pid"])
        held = await _hold(gateway["port"], CONNECTIONS)
        conns = held["conns"]
        try:
            await asyncio.sleep(2)  # idle: nothing moves
            loaded_rss = rss_kib(gateway["pid"])
            async with httpx.AsyncClient() as admin:
                metrics = (await admin.get(f"http://127.0.0.1:{gateway['admin']}/metrics")).text
            gauge = next(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith('kakuremichi_active_connections{listener="http"}')
            )
            step = max(1, len(conns) // SAMPLE)
            async with asyncio.timeout(60):
                statuses = await asyncio.gather(*(_exchange(*c) for c in conns[::step]))
            result.update(
                connections=len(conns),
                gauge=gauge,
                sample_ok=sum(1 for s in statuses if s == 404),
                sample=len(statuses),
                open_seconds=round(held["open_seconds"], 2),
                rss_idle_mib=round(idle_rss / 1024, 1),
                rss_loaded_mib=round(loaded_rss / 1024, 1),
                kib_per_connection=round((loaded_rss - idle_rss) / max(1, len(conns)), 2),
            )
        finally:
            for _, writer in conns:
                writer.transport.abort()

    benchmark.pedantic(lambda: asyncio.run(scenario()), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(
        f"\nidle keep-alive: {result['connections']} held (gauge {result['gauge']:.0f}), "
        f"opened in {result['open_seconds']} s; gateway RSS {result['rss_idle_mib']} MiB idle "
        f"→ {result['rss_loaded_mib']} MiB ({result['kib_per_connection']} KiB/connection); "
        f"second request on {result['sample']} held: {result['sample_ok']} answered"
    )
    assert result["connections"] == CONNECTIONS
    assert result["gauge"] >= CONNECTIONS
    assert result["sample_ok"] == result["sample"]
