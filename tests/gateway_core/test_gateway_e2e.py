"""Control + ``kakuremichi gateway`` (wireguard-go backend) + a stand-in agent, in
network namespaces made by the test; driven through the admin CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_core.netns import admin as netns_admin
from tests.gateway_core.netns import sh, spawn, two_hosts
from tests.support import need_binary, need_root, unique_name

TOKEN = "e2e-admin-token-0123456789"


def admin(netns: str, *args: str) -> dict[str, Any]:
    return netns_admin(netns, "http://127.0.0.1:7700", TOKEN, *args)


def fetch(netns: str, host: str, port: int = 8080) -> tuple[int, str]:
    code = (
        "import urllib.request,urllib.error,sys\n"
        f"r=urllib.request.Request('http://127.0.0.1:{port}/hello',headers={{'Host':'{host}'}})\n"
        "try:\n  x=urllib.request.urlopen(r,timeout=10);print(x.status);print(x.read().decode())\n"
        "except urllib.error.HTTPError as e:\n  print(e.code);print(e.read().decode())\n"
    )
    out = sh(sys.executable, "-c", code, netns=netns, check=False)
    status, _, body = out.stdout.partition("\n")
    return (int(status) if status.strip().isdigit() else 0), body


def wait_status(netns: str, host: str, status: int, within: float) -> tuple[float, str]:
    started = time.monotonic()
    while True:
        got, body = fetch(netns, host)
        if got == status:
            return time.monotonic() - started, body
        if time.monotonic() - started > within:
            raise AssertionError(f"wanted {status} for {host}, last got {got}: {body[:200]}")
        time.sleep(0.1)


@pytest.mark.parametrize("backend", ["wireguard-go", "userspace"])
def test_gateway_routes_through_wireguard_to_the_agent(tmp_path: Path, backend: str) -> None:
    need_root()
    need_binary("wireguard-go")
    with two_hosts("gwe") as (gw_ns, agent_ns):
        procs: list[subprocess.Popen[bytes]] = []
        gw_if = unique_name("kge")
        try:
            procs.append(
                spawn(
                    gw_ns,
                    sys.executable,
                    "-m",
                    "kakuremichi.cli",
                    "control",
                    "--host",
                    "0.0.0.0",
                    "--port",
                    "7700",
                    "--admin-token",
                    TOKEN,
                    "--data-dir",
                    str(tmp_path / "control"),
                    log=tmp_path / "control.log",
                )
            )
            for _ in range(100):
                if (
                    sh(
                        sys.executable,
                        "-c",
                        "import urllib.request;urllib.request.urlopen('http://127.0.0.1:7700/healthz')",
                        netns=gw_ns,
                        check=False,
                    ).returncode
                    == 0
                ):
                    break
                time.sleep(0.1)
            agent = admin(gw_ns, "agent", "create", "laptop")
            gateway = admin(gw_ns, "gateway", "create", "edge")
            tunnel = admin(
                gw_ns,
                "tunnel",
                "create",
                "--domain",
                "app.example.com",
                "--agent",
                "laptop",
                "--target",
                "127.0.0.1:80",
            )
            gw = spawn(
                gw_ns,
                sys.executable,
                "-m",
                "kakuremichi.cli",
                "gateway",
                "--control-url",
                "http://127.0.0.1:7700",
                "--public-ip",
                "192.0.2.1",
                "--interface",
                gw_if,
                "--wireguard-backend",
                backend,
                "--http-port",
                "8080",
                "--https-port",
                "0",
                "--admin-port",
                "9901",
                "--data-dir",
                str(tmp_path / "gateway"),
                log=tmp_path / "gateway.log",
                env_extra={"KAKUREMICHI_API_KEY": gateway["apiKey"]},
            )  # never on argv
            procs.append(gw)
            procs.append(
                spawn(
                    agent_ns,
                    sys.executable,
                    "-m",
                    "tests.gateway_core.agent_standin",
                    "http://192.0.2.1:7700",
                    unique_name("kga"),
                    log=tmp_path / "agent.log",
                    env_extra={"STANDIN_API_KEY": agent["apiKey"]},
                )
            )
            _, body = wait_status(gw_ns, "app.example.com", 200, 30)
            assert "agent says hi" in body and "host=app.example.com" in body
            assert "xff=127.0.0.1" in body
            assert f"tunnel={tunnel['id']}" in body  # the PROXY v2 header named the tunnel
            assert fetch(gw_ns, "APP.example.com:8080")[0] == 200
            assert fetch(gw_ns, "unknown.example.com")[0] == 404
            # Delete → 404 within 1 s.
            admin(gw_ns, "tunnel", "delete", tunnel["id"])
            elapsed, _ = wait_status(gw_ns, "app.example.com", 404, 5)
            assert elapsed < 1.0
            tunnel = admin(
                gw_ns,
                "tunnel",
                "create",
                "--domain",
                "app.example.com",
                "--agent",
                "laptop",
                "--target",
                "127.0.0.1:80",
            )
            wait_status(gw_ns, "app.example.com", 200, 5)
            metrics = sh(
                sys.executable,
                "-c",
                "import urllib.request;print(urllib.request.urlopen("
                "'http://127.0.0.1:9901/metrics').read().decode())",
                netns=gw_ns,
            ).stdout
            assert (
                "kakuremichi_wireguard" in metrics or "kakuremichi_http_requests_total" in metrics
            )
            # The agent goes away → 502.
            procs[-1].send_signal(signal.SIGTERM)
            procs[-1].wait(10)
            wait_status(gw_ns, "app.example.com", 502, 20)
            # SIGTERM → clean exit, interface gone.
            gw.send_signal(signal.SIGTERM)
            assert gw.wait(20) == 0, (tmp_path / "gateway.log").read_text()[-2000:]
            if backend == "wireguard-go":
                assert sh("ip", "link", "show", gw_if, netns=gw_ns, check=False).returncode != 0
            log_text = (tmp_path / "gateway.log").read_text()
            assert gateway["apiKey"] not in log_text and agent["apiKey"] not in log_text
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
