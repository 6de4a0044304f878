"""Issue 19's system test, with real processes: PostgreSQL, two ``kakuremichi control``
replicas on it, two gateways and two agents spread over both (each given both Control
URLs, in opposite orders), a sample app on loopback and requests through every gateway to
every tunnel all along.

- a REST change made on either replica reaches every gateway and agent (a new tunnel
  answers through both gateways; the measured delay is printed);
- ``kill -9`` of the replica holding the once-only jobs' lease: its clients reconnect to
  the other, requests through the tunnels never fail meanwhile, changes made just before
  and just after the kill all arrive, and the lease moves within the replica timeout.

Needs Debian's postgresql package (skips without it on a laptop; runs under CI=true).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.controlserver import control_args
from tests.pgserver import PostgresServer, postgres
from tests.support import free_port, need_binary, need_root
from tests.tlsca import TestCa

__all__ = ["postgres"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ADMIN_TOKEN = "cluster-processes-admin-token-0123"
REPLICA_TIMEOUT = 2.0


class Process:
    """One ``kakuremichi`` program (or ``command``) as a child process, its output in a
    log file."""

    def __init__(self, name: str, argv: list[str], log: Path, command: str | None = None) -> None:
        self.name = name
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            [command, *argv] if command else [sys.executable, "-m", "kakuremichi.cli", *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KAKUREMICHI_LOG_LEVEL": "info"},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Cluster:
    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.processes: list[Process] = []
        self.controls: dict[str, str] = {}  # name → URL
        self.control_procs: dict[str, Process] = {}
        self.gateway_http: dict[str, int] = {}  # name → public HTTP port

    def spawn(self, name: str, argv: list[str], command: str | None = None) -> Process:
        process = Process(name, argv, self.tmp / f"{name}.log", command)
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in self.processes)

    def start_control(self, name: str, public_url: str | None = None) -> None:
        port = free_port()
        self.controls[name] = f"http://127.0.0.1:{port}"
        self.control_procs[name] = self.spawn(
            f"control-{name}",
            control_args(
                port,
                self.tmp / f"control-{name}",
                "--database-url",
                self.database_url,
                "--admin-token",
                ADMIN_TOKEN,
                "--replica-timeout",
                str(REPLICA_TIMEOUT),
                "--public-url",
                public_url or f"http://127.0.0.1:{port}",
            ),
        )

    def start_gateway(self, name: str, key: str, urls: str, *extra: str) -> None:
        http_port = free_port()
        self.gateway_http[name] = http_port
        self.spawn(
            f"gateway-{name}",
            [
                "gateway",
                "--control-url",
                urls,
                "--api-key",
                key,
                "--data-dir",
                str(self.tmp / f"gateway-{name}"),
                "--public-ip",
                "127.0.0.1",
                "--host",
                "127.0.0.1",
                "--wireguard-backend",
                "userspace",
                "--wireguard-port",
                str(free_port(kind=socket.SOCK_DGRAM)),
                "--http-port",
                str(http_port),
                "--https-port",
                "0",
                "--admin-host",
                "127.0.0.1",
                "--admin-port",
                str(free_port()),
                *extra,
            ],
        )

    def start_agent(self, name: str, key: str, urls: str, *extra: str) -> None:
        self.spawn(
            f"agent-{name}",
            [
                "agent",
                "--control-url",
                urls,
                "--api-key",
                key,
                "--data-dir",
                str(self.tmp / f"agent-{name}"),
                "--wireguard-host",
                "127.0.0.1",
                *extra,
            ],
        )


@pytest.fixture
def cluster(tmp_path: Path, postgres: PostgresServer) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres.database())
    try:
        yield made
    finally:
        for process in reversed(made.processes):
            process.stop()


@pytest.fixture
async def app() -> AsyncIterator[str]:
    """A tiny HTTP origin on loopback: answers ``ok <path>``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                body = b"ok " + path
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def until(what: str, check: Any, cluster: Cluster, within: float) -> float:
    """Seconds until ``check()`` is truthy; fails with the processes' logs after ``within``."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < within:
        try:
            if await check():
                return time.monotonic() - started
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    pytest.fail(f"{what}: not within {within} s (last: {last!r})\n{cluster.logs()}")


async def test_two_control_processes_on_postgres_kill_9_keeps_traffic_and_changes(
    cluster: Cluster, app: str
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    cluster.start_control("a")
    async with httpx.AsyncClient(headers=auth, timeout=5) as http:

        async def ready(url: str) -> bool:
            return (await http.get(f"{url}/readyz")).status_code == 200

        async def holds_jobs(url: str) -> bool:
            return bool((await http.get(f"{url}/healthz")).json()["jobs"])

        a, b = "a", "b"
        await until("control a ready", lambda: ready(cluster.controls[a]), cluster, 30)
        # A takes the jobs' lease first, so the kill -9 below has to move it
        await until("a holds the lease", lambda: holds_jobs(cluster.controls[a]), cluster, 15)
        cluster.start_control(b)
        await until("control b ready", lambda: ready(cluster.controls[b]), cluster, 30)
        url_a, url_b = cluster.controls[a], cluster.controls[b]

        async def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = await http.post(f"{url}{path}", json=body)
            assert response.status_code == 201, response.text
            row: dict[str, Any] = response.json()
            return row

        keys = {}
        for kind, name, via in (
            ("gateways", "g1", url_a),
            ("gateways", "g2", url_b),
            ("agents", "x1", url_a),
            ("agents", "x2", url_b),
        ):
            keys[name] = (await post(via, f"/api/{kind}", {"name": name}))["apiKey"]
        await post(url_a, "/api/tunnels", {"domain": "one.test", "agent": "x1", "target": app})
        await post(url_b, "/api/tunnels", {"domain": "two.test", "agent": "x2", "target": app})
        # spread: g1 and x1 prefer A, g2 and x2 prefer B
        cluster.start_gateway("g1", keys["g1"], f"{url_a},{url_b}")
        cluster.start_gateway("g2", keys["g2"], f"{url_b},{url_a}")
        cluster.start_agent("x1", keys["x1"], f"{url_a},{url_b}")
        cluster.start_agent("x2", keys["x2"], f"{url_b},{url_a}")

        async with httpx.AsyncClient(timeout=5) as client:

            async def through(gateway: str, domain: str) -> bool:
                port = cluster.gateway_http[gateway]
                response = await client.get(
                    f"http://127.0.0.1:{port}/{domain}", headers={"Host": domain}
                )
                return response.status_code == 200 and response.text == f"ok /{domain}"

            async def everywhere(domains: list[str]) -> bool:
                for gateway in ("g1", "g2"):
                    for domain in domains:
                        if not await through(gateway, domain):
                            return False
                return True

            await until(
                "both tunnels through both gateways",
                lambda: everywhere(["one.test", "two.test"]),
                cluster,
                60,
            )

            # a change on either replica reaches the clients of both
            delays = []
            for via, domain, agent in ((url_b, "three.test", "x1"), (url_a, "four.test", "x2")):
                await post(via, "/api/tunnels", {"domain": domain, "agent": agent, "target": app})
                delays.append(await until(domain, lambda d=domain: everywhere([d]), cluster, 10))
            print(f"a change on one replica served through both gateways after {delays} s")

            # traffic all along: every gateway to every tunnel, round after round
            failures: list[str] = []
            served = 0
            stop = asyncio.Event()

            async def traffic() -> None:
                nonlocal served
                rounds = 0
                while not stop.is_set() and rounds < 5000:  # bounded
                    rounds += 1
                    for gateway in ("g1", "g2"):
                        for domain in ("one.test", "two.test"):
                            try:
                                ok = await through(gateway, domain)
                            except httpx.HTTPError as exc:
                                ok = False
                                failures.append(f"{gateway} {domain}: {exc!r}")
                            else:
                                if not ok:
                                    failures.append(f"{gateway} {domain}: bad answer")
                            served += 1
                    await asyncio.sleep(0.02)

            loop_task = asyncio.create_task(traffic())
            await asyncio.sleep(1.0)
            # a change made on A just before it dies, and one on B just after
            await post(url_a, "/api/tunnels", {"domain": "five.test", "agent": "x1", "target": app})
            killed = cluster.control_procs[a]
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(10)
            await post(url_b, "/api/tunnels", {"domain": "six.test", "agent": "x2", "target": app})
            moved = await until(
                "the lease moves to b", lambda: holds_jobs(url_b), cluster, 5 * REPLICA_TIMEOUT
            )
            await until(
                "changes from before and after the kill everywhere",
                lambda: everywhere(["five.test", "six.test"]),
                cluster,
                30,
            )
            # the clients of A are on B now: another change on B reaches them too
            await post(
                url_b, "/api/tunnels", {"domain": "seven.test", "agent": "x1", "target": app}
            )
            await until("a change after the move", lambda: everywhere(["seven.test"]), cluster, 10)
            await asyncio.sleep(1.0)
            stop.set()
            await loop_task
            print(f"lease moved {moved:.1f} s after the kill; {served} requests, 0 failed")
            assert not failures, f"{len(failures)} of {served} failed: {failures[:5]}"
            assert served > 40

            # every client is online at the surviving replica
            for kind, names in (("agents", ("x1", "x2")), ("gateways", ("g1", "g2"))):
                for name in names:
                    row = (await http.get(f"{url_b}/api/{kind}/{name}")).json()
                    assert row["online"], (name, cluster.logs())
    for process in cluster.processes:
        if process is not killed:
            assert process.stop() == 0, (process.name, process.log()[-3000:])
        assert "Traceback" not in process.log(), (process.name, process.log()[-3000:])


NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "kakuremichi-control.conf"


def nginx_config(tmp: Path, port: int, replicas: list[str], cert: Path, key: Path) -> Path:
    """deploy/nginx/kakuremichi-control.conf with this test's addresses and certificate,
    inside a minimal nginx.conf of the test's own (foreground, files in ``tmp``)."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^    server 10\.0\.0\.\d+:7700 (.*);$", text, re.M)
    assert len(servers) == len(replicas) == 2, servers
    text = re.sub(r"^    server 10\.0\.0\.\d+:7700 .*;\n", "", text, flags=re.M)
    upstream = "".join(f"    server {r} {servers[0]};\n" for r in replicas)
    text = text.replace(
        "upstream kakuremichi_control {\n", "upstream kakuremichi_control {\n" + upstream
    )
    for old, new in (
        ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        ("/etc/ssl/kakuremichi/control.crt", str(cert)),
        ("/etc/ssl/kakuremichi/control.key", str(key)),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (tmp / "kakuremichi-control.conf").write_text(text)
    main = tmp / "nginx.conf"
    main.write_text(
        "daemon off;\n"
        "user root;\n"
        "worker_processes 1;\n"
        f"pid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/nginx-error.log info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {tmp}/{kind}-temp;\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {tmp}/kakuremichi-control.conf;\n"
        "}\n"
    )
    return main


async def test_the_shipped_nginx_config_in_front_of_two_replicas(
    cluster: Cluster, app: str, tmp_path: Path
) -> None:
    """deploy/nginx/kakuremichi-control.conf (HTTPS, WebSocket upgrade, next upstream on
    a refused connect) as the only Control URL of a gateway and an agent: kill -9 of a
    replica, and both are back through nginx on the other, traffic never failing, and
    REST calls through nginx keep working."""
    need_root()  # nginx's master switches its worker to 'user root' only as root
    nginx = need_binary("nginx")
    ca = TestCa()
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    ca.issue(tmp_path / "lb.crt", tmp_path / "lb.key", ("127.0.0.1",))
    lb_port = free_port()
    lb_url = f"https://127.0.0.1:{lb_port}"
    cluster.start_control("a", public_url=lb_url)
    cluster.start_control("b", public_url=lb_url)
    replicas = [cluster.controls[n].removeprefix("http://") for n in ("a", "b")]
    conf = nginx_config(tmp_path, lb_port, replicas, tmp_path / "lb.crt", tmp_path / "lb.key")
    check = subprocess.run([nginx, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    cluster.spawn("nginx", ["-c", str(conf)], command=nginx)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        httpx.AsyncClient(
            base_url=lb_url,
            headers=auth,
            timeout=5,
            verify=ssl.create_default_context(cafile=ca_file),
        ) as lb,
        httpx.AsyncClient(headers=auth, timeout=5) as direct,
    ):

        async def ready(url: str) -> bool:
            return (await direct.get(f"{url}/readyz")).status_code == 200

        for name in ("a", "b"):
            await until(f"control {name}", lambda n=name: ready(cluster.controls[n]), cluster, 30)
        await until("nginx", lambda: lb_ready(lb), cluster, 15)

        async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = await lb.post(path, json=body)
            assert response.status_code == 201, response.text
            row: dict[str, Any] = response.json()
            return row

        gateway_key = (await post("/api/gateways", {"name": "g1"}))["apiKey"]
        agent_key = (await post("/api/agents", {"name": "x1"}))["apiKey"]
        await post("/api/tunnels", {"domain": "one.test", "agent": "x1", "target": app})
        ca_flag = ("--control-ca", str(ca_file))
        cluster.start_gateway("g1", gateway_key, lb_url, *ca_flag)
        cluster.start_agent("x1", agent_key, lb_url, *ca_flag)
        port = cluster.gateway_http["g1"]

        async with httpx.AsyncClient(timeout=5) as client:

            async def through(domain: str) -> bool:
                response = await client.get(
                    f"http://127.0.0.1:{port}/{domain}", headers={"Host": domain}
                )
                return response.status_code == 200 and response.text == f"ok /{domain}"

            await until("one.test through the gateway", lambda: through("one.test"), cluster, 60)
            failures: list[str] = []
            served = 0
            stop = asyncio.Event()

            async def traffic() -> None:
                nonlocal served
                for _ in range(10000):  # bounded
                    if stop.is_set():
                        return
                    try:
                        if not await through("one.test"):
                            failures.append("bad answer")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    served += 1
                    await asyncio.sleep(0.02)

            loop_task = asyncio.create_task(traffic())
            await asyncio.sleep(0.5)
            killed = cluster.control_procs["a"]
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(10)
            # through nginx: REST goes to the survivor, and so do the clients
            await post("/api/tunnels", {"domain": "two.test", "agent": "x1", "target": app})
            await until("two.test after the kill", lambda: through("two.test"), cluster, 30)

            async def online(kind: str, name: str) -> bool:
                return bool((await lb.get(f"/api/{kind}/{name}")).json()["online"])

            await until("g1 online", lambda: online("gateways", "g1"), cluster, 30)
            await until("x1 online", lambda: online("agents", "x1"), cluster, 30)
            stop.set()
            await loop_task
            assert not failures, f"{len(failures)} of {served} failed: {failures[:5]}"
            assert served > 20
    for process in cluster.processes:
        if process is not killed:
            assert process.stop() == 0, (process.name, process.log()[-3000:])


async def lb_ready(lb: httpx.AsyncClient) -> bool:
    return (await lb.get("/readyz")).status_code == 200
