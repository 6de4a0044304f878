"""The stream transport in namespaces, against a real gateway on wireguard-go: the
agent's namespace drops UDP (iptables) and lets only TCP to Control and the gateway's
HTTPS port out.

Host 0: Control + gateway "edge" (wireguard-go, HTTPS on 8443); host 1: the agent (uid
65534) and its local services, behind the firewall; host 2: the internet's client.
Checked: the tunnel is up over the stream within 10 s of the agent's start; HTTP, a
WebSocket and a raw TCP tunnel work, 100 MB each way hash-checked; the agent's and the
gateway's metrics and /healthz say "tcp"; UDP let through again → back on UDP within
30 s while a long download keeps going (hash-checked); UDP dropped again → back on the
stream, serving; SIGTERM everywhere → exit 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.agent.test_system_netns import (
    CONTROL,
    NOBODY,
    TOKEN,
    client,
    gateway_argv,
    stop,
    unprivileged_python,
    wait_control,
)
from tests.gateway_core.netns import ROOT, admin, lan, sh, spawn
from tests.support import metric_sample, need, need_binary, need_root, unique_name

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]

BIG = 100 * 1024 * 1024
AGENT_METRICS = 9100
GATEWAY_ADMIN = 9111
DROP_UDP = (
    ("OUTPUT", "!", "-o", "lo", "-p", "udp", "-j", "DROP"),
    ("INPUT", "!", "-i", "lo", "-p", "udp", "-j", "DROP"),
)
ONLY_CONTROL_AND_HTTPS = ("OUTPUT", "!", "-o", "lo", "-p", "tcp", "-m", "multiport", "!", "--dports", "7700,8443", "-j", "DROP")  # fmt: skip


def firewall(netns: str, action: str, *rules: tuple[str, ...]) -> None:
    for chain, *rule in rules:
        sh("iptables", action, chain, *rule, netns=netns)


def fetch(netns: str, url: str) -> str:
    code = (
        f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=3).read().decode())"
    )
    out = sh(sys.executable, "-c", code, netns=netns, check=False)
    return out.stdout if out.returncode == 0 else ""


def agent_transport(netns: str) -> str:
    """What the agent's /metrics says the gateway's transport is ("" if unknown)."""
    text = fetch(netns, f"http://127.0.0.1:{AGENT_METRICS}/metrics")
    for transport in ("udp", "tcp"):
        seen = metric_sample(
            text, "kakuremichi_gateway_transport", gateway="edge", transport=transport
        )
        if seen == 1:
            return transport
    return ""


def wait_transport(netns: str, wanted: str, within: float) -> float:
    started = time.monotonic()
    while (seen := agent_transport(netns)) != wanted:
        assert time.monotonic() - started < within, f"agent still on {seen!r} after {within}s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_blocked_udp_in_namespaces(tmp_path: Path) -> None:
    need_root()
    need_binary("wireguard-go")
    need_binary("iptables")
    need_binary("setpriv")
    python, py_env = unprivileged_python()
    need(
        subprocess.run([*python, "--version"], capture_output=True, check=False).returncode == 0,
        "no python for the unprivileged agent",
    )
    agent_dir = Path(tempfile.mkdtemp(prefix="kkm-stream-"))
    os.chown(agent_dir, int(NOBODY), int(NOBODY))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ifname = unique_name("ktw", 1)
    try:
        with lan("kt", 3) as (h0, h1, h2):
            procs["control"] = spawn(
                h0, sys.executable, "-m", "kakuremichi.cli", "control", "--host", "0.0.0.0",
                "--port", "7700", "--admin-token", TOKEN, "--data-dir", str(tmp_path / "control"),
                log=tmp_path / "control.log",
            )  # fmt: skip
            wait_control(h0)

            def cli(*args: str) -> dict[str, object]:
                return admin(h0, CONTROL, TOKEN, *args)

            agent = cli("agent", "create", "laptop")
            edge = cli("gateway", "create", "edge")
            cli("tunnel", "create", "--domain", "app.example.com", "--agent", "laptop",
                "--target", "http://127.0.0.1:8000")  # fmt: skip
            cli("tunnel", "create", "--protocol", "tcp", "--public-port", "7001", "--agent",
                "laptop", "--target", "127.0.0.1:9001")  # fmt: skip
            procs["app"] = spawn(
                h1, sys.executable, "-m", "kakuremichi.sampleapp", "--port", "8000",
                log=tmp_path / "app.log",
            )  # fmt: skip
            procs["echo"] = spawn(
                h1, sys.executable, "-m", "tests.agent.netclient", "serve", "9001", "9002",
                log=tmp_path / "echo.log",
            )  # fmt: skip
            procs["edge"] = spawn(
                h0,
                *gateway_argv(ifname, 0, 51820),
                "--https-port",
                "8443",
                "--rate-limit",
                "0",
                "--admin-port",
                str(GATEWAY_ADMIN),
                "--data-dir",
                str(tmp_path / "edge"),
                log=tmp_path / "edge.log",
                env_extra={"KAKUREMICHI_API_KEY": str(edge["apiKey"])},
            )
            key_file = agent_dir / "api.key"
            key_file.write_text(f"{agent['apiKey']}\n")
            os.chown(key_file, int(NOBODY), int(NOBODY))
            key_file.chmod(0o600)
            # the agent's network passes TCP to Control and to the gateway's HTTPS port only
            firewall(h1, "-A", ONLY_CONTROL_AND_HTTPS, *DROP_UDP)
            # the gateway is up (its HTTPS listener answers) before the agent's clock starts
            deadline = time.monotonic() + 60
            while "kakuremichi_wireguard_streams" not in fetch(
                h0, f"http://127.0.0.1:{GATEWAY_ADMIN}/metrics"
            ):
                assert time.monotonic() < deadline, "the gateway did not come up"
                time.sleep(0.2)

            started = time.monotonic()
            procs["agent"] = spawn(
                h1,
                *python,
                "-m",
                "kakuremichi.cli",
                "agent",
                "--control-url",
                CONTROL,
                "--data-dir",
                str(agent_dir / "state"),
                "--metrics-port",
                str(AGENT_METRICS),
                log=tmp_path / "agent.log",
                env_extra={
                    **py_env,
                    "KAKUREMICHI_API_KEY_FILE": str(key_file),
                    "HOME": str(agent_dir),
                },
                user=NOBODY,
            )
            try:
                up = client(h2, "wait", "192.0.2.1:8080", "app.example.com", "200", "20")
                assert up["ok"], up
                came_up = time.monotonic() - started
                print(f"up over the stream {came_up:.1f}s after the agent started")
                assert came_up < 10.0
                seen = fetch(h1, f"http://127.0.0.1:{AGENT_METRICS}/metrics")
                assert agent_transport(h1) == "tcp", seen[-3000:]
                assert "over the stream transport (tcp): edge" in fetch(
                    h1, f"http://127.0.0.1:{AGENT_METRICS}/healthz"
                )
                gateway_metrics = fetch(h0, f"http://127.0.0.1:{GATEWAY_ADMIN}/metrics")
                streams = metric_sample(
                    gateway_metrics, "kakuremichi_wireguard_streams", state="authenticated"
                )
                assert streams == 1

                # HTTP, a WebSocket, a raw TCP tunnel, 100 MB each way, all over the stream
                down = client(h2, "download", "192.0.2.1:8080", "app.example.com", str(BIG))
                assert down["status"] == 200 and down["ok"] and down["bytes"] == BIG, down
                upload = client(h2, "upload", "192.0.2.1:8080", "app.example.com", str(BIG))
                assert upload["status"] == 200 and upload["ok"], upload
                print(
                    f"100 MB over the stream: download {down['seconds']:.1f}s, "
                    f"upload {upload['seconds']:.1f}s"
                )
                assert client(h2, "websocket", "192.0.2.1:8080", "app.example.com")["ok"]
                tcp = client(h2, "tcp", "192.0.2.1", "7001", str(4 * 1024 * 1024))
                assert tcp["ok"], tcp
                assert agent_transport(h1) == "tcp"

                # UDP passes again: back on UDP within 30 s, a long download surviving it
                long_size = 24 * 1024 * 1024
                slow = subprocess.Popen(
                    ["ip", "netns", "exec", h2, sys.executable, "-m", "tests.agent.netclient",
                     "slowdownload", "192.0.2.1:8080", "app.example.com", str(long_size), "24"],
                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                try:
                    time.sleep(3)
                    firewall(h1, "-D", *DROP_UDP)
                    back = wait_transport(h1, "udp", 30)
                    print(f"back on UDP {back:.1f}s after it was let through")
                    out, err = slow.communicate(timeout=120)
                finally:
                    if slow.poll() is None:
                        slow.kill()
                        slow.wait()
                assert slow.returncode == 0, err[-2000:]
                survived = __import__("json").loads(out.decode().strip().splitlines()[-1])
                assert survived["ok"] and survived["bytes"] == long_size, survived
                assert survived["seconds"] > back  # it really spanned the switch

                # UDP dropped again: back on the stream, still serving
                firewall(h1, "-A", *DROP_UDP)
                again = wait_transport(h1, "tcp", 40)
                print(f"back on the stream {again:.1f}s after UDP was dropped again")
                ok = client(h2, "wait", "192.0.2.1:8080", "app.example.com", "200", "30")
                assert ok["ok"], ok
                assert client(h2, "get", "192.0.2.1:8080", "app.example.com", "/")["status"] == 200
                assert stop(procs["agent"]) == 0
            finally:
                for name in ("agent", "edge", "app", "echo", "control"):
                    if name in procs:
                        stop(procs[name])
                for log in sorted(tmp_path.glob("*.log")):  # shown by pytest on failure
                    print(f"---- {log.name}\n" + "\n".join(log.read_text().splitlines()[-25:]))
            agent_log = (tmp_path / "agent.log").read_text()
            assert "gateway transport switched" in agent_log
            assert str(agent["apiKey"]) not in agent_log
            assert sh("ip", "link", "show", ifname, check=False).returncode != 0
    finally:
        shutil.rmtree(agent_dir, ignore_errors=True)
