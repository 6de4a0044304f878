"""The whole system in network namespaces: the agent as an unprivileged user, a real
Control, two gateways on wireguard-go + the kernel's TCP, a client host with an ACME CA.

Host 0: Control + gateway "edge1" (HTTPS, ACME); host 1: gateway "edge2"; host 2: the
agent (uid 65534) and the local services (sample app, TCP and UDP echo); host 3: the
"internet": clients and Pebble.  Everything is created through the admin CLI.  Checked:
HTTPS with Pebble's certificate from the client host (100 MB hash-checked, wss echo),
429 from the rate limit; through both gateways HTTP small and 100 MB both ways, a
WebSocket echo, a raw TCP tunnel with half-close, a UDP tunnel; REST changes (create,
update, delete → 404) within 1 s; Control stopped → traffic flows, back → re-sync; a
gateway restarted on a new WireGuard port → the agent follows; the agent stopped → 502
and back → 200 without touching a gateway; SIGTERM everywhere → exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.gateway_core.netns import ROOT, admin, lan, sh, spawn
from tests.gateway_core.pebble import running_pebble
from tests.support import need, need_binary, need_root, unique_name

TOKEN = "agent-e2e-admin-token-0123456789"
CONTROL = "http://192.0.2.1:7700"
NOBODY = "65534"
SMALL, BIG = 1024, 100 * 1024 * 1024


def client(netns: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = sh(
        sys.executable,
        "-m",
        "tests.agent.netclient",
        *args,
        netns=netns,
        check=False,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def wait_status(
    netns: str, domain: str, status: int, within: float, address: str = "127.0.0.1:8080"
) -> float:
    result = client(netns, "wait", address, domain, str(status), str(within))
    assert result["ok"], f"{domain} via {netns}: wanted {status}, last {result.get('last')}"
    return float(result["seconds"])


def unprivileged_python() -> tuple[list[str], dict[str, str]]:
    """An interpreter command line that uid 65534 can run, with our packages importable.

    The venv's interpreter often lives under /root (not traversable by others); the
    system's python3 of the same minor version reads the same site-packages."""
    paths = [str(ROOT), *site.getsitepackages()]
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--",
            "env",
            sys.executable,
            "-c",
            "import agent.main",
        ],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        check=False,
    )
    if probe.returncode == 0:
        return [sys.executable], {"PYTHONPATH": os.pathsep.join(paths)}
    return ["/usr/bin/python3"], {"PYTHONPATH": os.pathsep.join(paths)}


def gateway_argv(name: str, index: int, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kakuremichi.cli",
        "gateway",
        "--control-url",
        CONTROL,
        "--public-ip",
        f"192.0.2.{index + 1}",
        "--wireguard-backend",
        "wireguard-go",
        "--wireguard-port",
        str(port),
        "--interface",
        name,
        "--http-port",
        "8080",
        "--https-port",
        "0",
        "--admin-port",
        "9901",
    ]


def stop(proc: subprocess.Popen[bytes], within: float = 20) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return None
    return proc.returncode


def test_agent_system_in_namespaces(tmp_path: Path) -> None:
    need_root()
    need_binary("wireguard-go")
    need_binary("setpriv")
    python, py_env = unprivileged_python()
    need(
        subprocess.run([*python, "--version"], capture_output=True, check=False).returncode == 0,
        "no python for the unprivileged agent",
    )
    agent_dir = Path(tempfile.mkdtemp(prefix="kkm-agent-"))
    os.chown(agent_dir, int(NOBODY), int(NOBODY))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    gw_ifs = [unique_name("kaw", 1), unique_name("kaw", 2)]
    try:
        with (
            lan("ka", 4) as (h0, h1, h2, h3),
            running_pebble(
                tmp_path, 8080, netns=h3, listen_ip="192.0.2.4", target_ip="192.0.2.1"
            ) as pebble,
        ):

            def start_control(log: str) -> None:
                procs["control"] = spawn(
                    h0,
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
                    log=tmp_path / log,
                )
                wait_control(h0)

            start_control("control.log")

            def cli(*args: str) -> dict[str, Any]:
                return admin(h0, CONTROL, TOKEN, *args)

            agent = cli("agent", "create", "laptop")
            edge1 = cli("gateway", "create", "edge1")
            edge2 = cli("gateway", "create", "edge2")
            cli(
                "tunnel",
                "create",
                "--domain",
                "app.example.com",
                "--agent",
                "laptop",
                "--target",
                "http://127.0.0.1:8000",
            )
            cli(
                "tunnel",
                "create",
                "--protocol",
                "tcp",
                "--public-port",
                "7001",
                "--agent",
                "laptop",
                "--target",
                "127.0.0.1:9001",
            )
            cli(
                "tunnel",
                "create",
                "--protocol",
                "udp",
                "--public-port",
                "7002",
                "--agent",
                "laptop",
                "--target",
                "127.0.0.1:9002",
            )

            # Local services next to the agent.
            procs["app"] = spawn(
                h2,
                sys.executable,
                "-m",
                "kakuremichi.sampleapp",
                "--port",
                "8000",
                log=tmp_path / "app.log",
            )
            procs["echo"] = spawn(
                h2,
                sys.executable,
                "-m",
                "tests.agent.netclient",
                "serve",
                "9001",
                "9002",
                log=tmp_path / "echo.log",
            )
            procs["edge1"] = spawn(
                h0,
                *gateway_argv(gw_ifs[0], 0, 51820),
                "--https-port",
                "8443",
                "--acme-directory",
                pebble.directory,
                "--acme-ca-file",
                pebble.listener_ca,
                "--rate-limit",
                "20",
                "--rate-burst",
                "40",
                "--data-dir",
                str(tmp_path / "edge1"),
                log=tmp_path / "edge1.log",
                env_extra={"KAKUREMICHI_API_KEY": edge1["apiKey"]},
            )
            procs["edge2"] = spawn(
                h1,
                *gateway_argv(gw_ifs[1], 1, 51820),
                "--data-dir",
                str(tmp_path / "edge2"),
                log=tmp_path / "edge2.log",
                env_extra={"KAKUREMICHI_API_KEY": edge2["apiKey"]},
            )
            key_file = agent_dir / "api.key"
            key_file.write_text(agent["apiKey"] + "\n")
            os.chown(key_file, int(NOBODY), int(NOBODY))
            key_file.chmod(0o600)

            def start_agent(log: str) -> subprocess.Popen[bytes]:
                return spawn(
                    h2,
                    *python,
                    "-m",
                    "kakuremichi.cli",
                    "agent",
                    "--control-url",
                    CONTROL,
                    "--data-dir",
                    str(agent_dir / "state"),
                    "--health-interval",
                    "2",
                    log=tmp_path / log,
                    env_extra={
                        **py_env,
                        "KAKUREMICHI_API_KEY_FILE": str(key_file),
                        "HOME": str(agent_dir),
                    },
                    user=NOBODY,
                )

            procs["agent"] = start_agent("agent.log")
            try:
                # Both gateways reach the app through the agent.
                wait_status(h0, "app.example.com", 200, 60)
                wait_status(h1, "app.example.com", 200, 60)
                agent_pid = sh("ip", "netns", "pids", h2).stdout.split()
                uids = {
                    pid: Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
                    for pid in agent_pid
                    if "kakuremichi.cli\x00agent"
                    in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                }
                assert uids and set(uids.values()) == {NOBODY}, uids

                # HTTPS from the client namespace: the certificate was issued by Pebble
                # over HTTP-01 across the LAN, trusted through Pebble's root.
                roots = tmp_path / "pebble-roots.pem"
                roots.write_text(pebble.issuing_roots())
                edge1_tls = "192.0.2.1:8443"
                deadline = time.monotonic() + 90
                while True:
                    out = sh(
                        sys.executable,
                        "-m",
                        "tests.agent.netclient",
                        "https",
                        edge1_tls,
                        "app.example.com",
                        "/",
                        str(roots),
                        netns=h3,
                        check=False,
                    )
                    if out.returncode == 0 and json.loads(out.stdout)["status"] == 200:
                        break
                    assert time.monotonic() < deadline, out.stderr[-500:]
                    time.sleep(0.5)
                # Control stored what the gateway reported (a real ACME chain passes the
                # check every stored certificate passes, control/certs.py)
                deadline = time.monotonic() + 30
                while True:
                    listed = sh(
                        sys.executable, "-m", "kakuremichi.cli", "admin", "certificate", "list",
                        "--json", "--control-url", CONTROL, "--admin-token", TOKEN, netns=h0,
                    )  # fmt: skip
                    stored = json.loads(listed.stdout)
                    if stored:
                        break
                    assert time.monotonic() < deadline, "Control never stored the certificate"
                    time.sleep(0.5)
                assert [(c["domain"], c["source"]) for c in stored] == [("app.example.com", "acme")]
                secure = client(
                    h3, "https", edge1_tls, "app.example.com", f"/bytes/{BIG}", str(roots)
                )
                assert secure["status"] == 200 and secure["ok"], secure
                assert client(h3, "wss", edge1_tls, "app.example.com", str(roots))["ok"]
                # The per-client rate limit (20/s, burst 40): a burst of 150 meets 429s.
                burst = client(h3, "burst", "192.0.2.1:8080", "app.example.com", "150")
                assert burst["statuses"].get("429", 0) >= 50, burst
                assert burst["retry_after"] and burst["retry_after"][0].isdigit()
                time.sleep(2.5)  # the bucket refills

                seen = json.loads(
                    client(h0, "get", "127.0.0.1:8080", "app.example.com", "/headers")["body"]
                )
                assert (
                    seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
                )

                # 100 MB each way, hash-checked, through gateway → wireguard-go → agent.
                for size in (SMALL, BIG):
                    down = client(h0, "download", "127.0.0.1:8080", "app.example.com", str(size))
                    assert down["status"] == 200 and down["ok"] and down["bytes"] == size, down
                    up = client(h0, "upload", "127.0.0.1:8080", "app.example.com", str(size))
                    assert up["status"] == 200 and up["ok"], up
                print(f"100 MB: download {down['seconds']:.1f}s, upload {up['seconds']:.1f}s")
                assert client(h1, "websocket", "127.0.0.1:8080", "app.example.com")["ok"]
                # Raw TCP (half-close) and UDP tunnels through each gateway's public port.
                for host in (h0, h1):
                    tcp = client(host, "tcp", "127.0.0.1", "7001", str(2 * 1024 * 1024))
                    assert tcp["ok"], tcp
                    assert client(host, "udp", "127.0.0.1", "7002")["reply"] == "echo:ping"

                # REST changes take effect within 1 s.
                created = cli(
                    "tunnel",
                    "create",
                    "--domain",
                    "new.example.com",
                    "--agent",
                    "laptop",
                    "--target",
                    "http://127.0.0.1:8000",
                )
                assert wait_status(h0, "new.example.com", 200, 5) < 1.0
                cli("tunnel", "update", created["id"], "--target", "127.0.0.1:1")  # nothing listens
                assert wait_status(h0, "new.example.com", 502, 5) < 1.0
                cli("tunnel", "delete", created["id"])
                assert wait_status(h0, "new.example.com", 404, 5) < 1.0

                # Control stops: traffic keeps flowing through both gateways.
                assert stop(procs["control"]) == 0
                for host in (h0, h1):
                    assert (
                        client(host, "get", "127.0.0.1:8080", "app.example.com", "/")["status"]
                        == 200
                    )
                # Control comes back: the agent re-syncs and takes new tunnels.
                start_control("control2.log")
                cli(
                    "tunnel",
                    "create",
                    "--domain",
                    "again.example.com",
                    "--agent",
                    "laptop",
                    "--target",
                    "http://127.0.0.1:8000",
                )
                wait_status(h0, "again.example.com", 200, 90)

                # edge2's WireGuard comes back on a new port: the agent follows on its own.
                assert stop(procs["edge2"]) == 0
                procs["edge2"] = spawn(
                    h1,
                    *gateway_argv(gw_ifs[1], 1, 51900),
                    "--data-dir",
                    str(tmp_path / "edge2"),
                    log=tmp_path / "edge2b.log",
                    env_extra={"KAKUREMICHI_API_KEY": edge2["apiKey"]},
                )
                wait_status(h1, "app.example.com", 200, 60)
                assert client(h0, "get", "127.0.0.1:8080", "app.example.com", "/")["status"] == 200

                # The agent stops → 502 for clients; it starts again → 200, no gateway touched.
                assert stop(procs["agent"]) == 0
                wait_status(h3, "app.example.com", 502, 30, address="192.0.2.1:8080")
                procs["agent"] = start_agent("agent2.log")
                wait_status(h3, "app.example.com", 200, 60, address="192.0.2.1:8080")
                assert stop(procs["agent"]) == 0
            finally:
                for name in ("agent", "edge1", "edge2", "app", "echo", "control"):
                    if name in procs:
                        stop(procs[name])
                for log in sorted(tmp_path.glob("*.log")):  # shown by pytest on failure
                    print(f"---- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
            log_text = (tmp_path / "agent.log").read_text()
            for line in (
                "connected to control",
                "gateway handshake complete",
                "tunnel added",
                "agent stopped",
            ):
                assert line in log_text, line
            assert agent["apiKey"] not in log_text
            for ifname in gw_ifs:
                assert sh("ip", "link", "show", ifname, check=False).returncode != 0
    finally:
        shutil.rmtree(agent_dir, ignore_errors=True)


def wait_control(netns: str) -> None:
    probe = (
        "import urllib.request;urllib.request.urlopen('http://127.0.0.1:7700/healthz', timeout=2)"
    )
    for _ in range(150):
        if sh(sys.executable, "-c", probe, netns=netns, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("control did not come up")
