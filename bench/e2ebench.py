"""Harness for ``bench/test_e2e_bench.py``: small HTTP responses end to end, through
kakuremichi, beside the same origin reached directly and through nginx.

Three paths to one origin, all on loopback, every piece its own process::

    direct  client ──────────────────────────────────────────────▶ origin
    nginx   client ──▶ nginx (Debian, 1 worker, upstream keepalive) ──▶ origin
    ours    client ──▶ kakuremichi gateway ══WireGuard══▶ kakuremichi agent ──▶ origin
                       (userspace backend)     (UDP)     (user-space stack)

Roles of this module (``python -m bench.e2ebench ROLE 'JSON'``):

``origin``
    The app: a hand-written HTTP/1.1 keep-alive server on an ``asyncio.Protocol``
    that answers every request with the 13-byte ``hello, world\\n``.  It costs a few
    microseconds per request, so the proxies' cost is what the paths differ by (the
    Starlette sample app would be the bottleneck of all three).  Prints ``{"port": N}``
    when listening, exits when its stdin closes.
``client``
    The load generator: ``connections`` keep-alive connections (no pipelining), a
    warm-up of ``warmup`` requests per connection, then exactly ``requests`` requests
    shared among the connections (closed loop: a connection sends its next request when
    the previous answer is complete).  Every answer must be ``200`` with the exact body.
    Prints one JSON line: requests/s, p50/p99 latency, errors, its own CPU use and the
    CPU used by the ``watch`` processes (and their children) during the timed window.

Both use uvloop when it is importable (it comes with ``uvicorn[standard]``) so that
neither is what limits the direct path; the gateway and agent run exactly as shipped
(``kakuremichi gateway`` / ``kakuremichi agent``, default asyncio loop).

Settings that matter for the comparison: the gateway gets ``--rate-limit 0`` (its
default 50 req/s per client address would measure the limiter; one client address is
all a loopback bench has) and every kakuremichi process ``--log-level warning`` (no
per-request logging either way: the access log is off by default).  nginx runs with
``worker_processes 1`` (the gateway and the agent are one single-threaded process each,
and on 2 cores a second worker would only take CPU from the origin and the client),
``access_log off``, ``proxy_http_version 1.1`` with ``Connection ""`` and an upstream
``keepalive 64`` pool; started as root its worker drops to ``nobody`` (it writes
nothing: the error log is opened by the master, GET requests need no temp files).
No process is pinned to a core: the scheduler places them.

:class:`Processes` starts the servers (origin, nginx, Control, gateway, agent) as
separate sessions and always stops them: SIGTERM, then SIGKILL to the process group.
``KAKUREMICHI_E2E_BENCH_PROFILE=DIR`` runs the gateway and the agent under cProfile and
leaves ``gateway.prof`` / ``agent.prof`` in DIR when they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DOMAIN = "bench.example.com"
BODY = b"hello, world\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
CLOSE_RESPONSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def fast_loop() -> str:
    """Install uvloop's event loop policy if uvloop is there; name the loop in use."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _stop_on_stdin_eof(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()

    def read() -> None:
        for _ in sys.stdin:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read, daemon=True).start()
    return stop


# ------------------------------------------------------------------------- the origin


def _content_length(head: bytes) -> int | None:
    """The request's body length (0 without one); None for what we do not serve
    (chunked bodies, a malformed length)."""
    lowered = head.lower()
    if b"transfer-encoding:" in lowered:
        return None
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lowered.find(b"\r\n", at + 2)
    value = lowered[at + 17 : end if end >= 0 else len(lowered)].strip()
    return int(value) if value.isdigit() else None


def _wants_close(head: bytes) -> bool:
    lowered = head.lower()
    if b"\r\nconnection: close" in lowered:
        return True
    return lowered.split(b"\r\n", 1)[0].endswith(b"http/1.0") and b"keep-alive" not in lowered


class OriginProtocol(asyncio.Protocol):
    """One keep-alive connection of the origin: every complete request gets ``BODY``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out: list[bytes] = []
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            length = _content_length(head)
            if length is None:
                out.append(BAD_REQUEST)
                break
            if len(self.buffer) < end + 4 + length:
                break  # the rest of the body is still on its way
            self.buffer = self.buffer[end + 4 + length :]
            if _wants_close(head):
                out.append(CLOSE_RESPONSE)
                break
            out.append(RESPONSE)
        else:
            if len(self.buffer) > MAX_HEAD:
                out.append(BAD_REQUEST)
        if out:
            self.transport.write(b"".join(out))
            if out[-1] is not RESPONSE:
                self.transport.close()


async def run_origin(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(OriginProtocol, HOST, cfg.get("port", 0), backlog=1024)
    stop = _stop_on_stdin_eof(loop)
    emit(port=server.sockets[0].getsockname()[1], pid=os.getpid())
    try:
        await asyncio.wait_for(stop.wait(), cfg.get("lifetime", 3600))
    except TimeoutError:
        pass
    finally:
        server.close()


# ------------------------------------------------------------------------- the client


class ClientError(Exception):
    """An answer that was not ``200`` with the expected body, or a lost connection."""


def _parse_response(buffer: bytes) -> tuple[int, bytes, int] | None:
    """(status, body, bytes consumed) of the first complete response, None if incomplete.
    Content-Length and chunked bodies; anything else is a ClientError."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise ClientError("response head too large")
        return None
    head = buffer[:end].lower()
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ClientError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    start = end + 4
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
    if chunked:
        return _parse_chunked(buffer, status, start)
    if length is None:
        raise ClientError("response without Content-Length (keep-alive needs one)")
    if len(buffer) < start + length:
        return None
    return status, buffer[start : start + length], start + length


def _parse_chunked(buffer: bytes, status: int, at: int) -> tuple[int, bytes, int] | None:
    body = bytearray()
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(buffer[at:eol].split(b";", 1)[0], 16)
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", eol)
            if buffer[eol : eol + 4] == b"\r\n\r\n":
                return status, bytes(body), eol + 4
            if trailer_end < 0:
                return None
            return status, bytes(body), trailer_end + 4
        if len(buffer) < eol + 2 + size + 2:
            return None
        body += buffer[eol + 2 : eol + 2 + size]
        at = eol + 2 + size + 2


class Budget:
    """Requests left in the current phase, shared by the connections, and what they saw."""

    def __init__(self) -> None:
        self.left = 0
        self.latencies_ns: list[int] = []
        self.record = False


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection of the load generator: one request in flight at most."""

    def __init__(self, budget: Budget, request: bytes) -> None:
        self.budget = budget
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.sent_at = 0
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def run(self) -> asyncio.Future[None]:
        """Send requests from the budget until it is empty; the future says when."""
        self.done = asyncio.get_running_loop().create_future()
        self._send_next()
        return self.done

    def _send_next(self) -> None:
        assert self.transport is not None and self.done is not None
        if self.budget.left <= 0:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.budget.left -= 1
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def _fail(self, error: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            parsed = _parse_response(self.buffer)
        except (ClientError, ValueError) as exc:
            self._fail(ClientError(f"unparsable response: {exc}"))
            return
        if parsed is None:
            return
        status, body, used = parsed
        elapsed = time.perf_counter_ns() - self.sent_at
        self.buffer = self.buffer[used:]
        if status != 200 or body != BODY:
            self._fail(ClientError(f"wanted 200 {BODY!r}, got {status} {body[:80]!r}"))
            return
        if self.buffer:
            self._fail(ClientError("bytes after the response (nothing was pipelined)"))
            return
        if self.budget.record:
            self.budget.latencies_ns.append(elapsed)
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ClientError(f"connection lost: {exc or 'closed by peer'}"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (0 for a vanished one)."""
    total = 0.0
    for one in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    rank = math.ceil(fraction * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


async def run_client(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    request = (
        f"GET / HTTP/1.1\r\nHost: {cfg.get('host_header', DOMAIN)}\r\n"
        "User-Agent: kakuremichi-e2ebench\r\nAccept: */*\r\n\r\n"
    ).encode()
    budget = Budget()
    conns: list[ClientConnection] = []
    timeout = cfg.get("timeout", 120)
    try:
        async with asyncio.timeout(timeout):
            for _ in range(cfg["connections"]):
                _, conn = await loop.create_connection(
                    lambda: ClientConnection(budget, request), HOST, cfg["port"]
                )
                conns.append(conn)
            budget.left = cfg["warmup"] * len(conns)
            await asyncio.gather(*(c.run() for c in conns))
            budget.left, budget.record = cfg["requests"], True
            watch = {name: int(pid) for name, pid in cfg.get("watch", {}).items()}
            cpu_before = {name: cpu_seconds(pid) for name, pid in watch.items()}
            own_before = time.process_time()
            started = time.perf_counter()
            await asyncio.gather(*(c.run() for c in conns))
            wall = time.perf_counter() - started
            own = time.process_time() - own_before
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in watch.items()}
    except (ClientError, OSError, TimeoutError) as exc:
        kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        emit(ok=False, error=f"{kind}: {exc}", answered=len(budget.latencies_ns))
        return
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    latencies = sorted(budget.latencies_ns)
    emit(
        ok=len(latencies) == cfg["requests"],
        error=None if len(latencies) == cfg["requests"] else "answers missing",
        requests=len(latencies),
        connections=len(conns),
        seconds=wall,
        rps=len(latencies) / wall,
        p50_us=percentile(latencies, 0.50) / 1000,
        p99_us=percentile(latencies, 0.99) / 1000,
        max_us=latencies[-1] / 1000,
        client_cpu=own / wall,
        loop=cfg.get("loop", "asyncio"),
        cpu={name: used / wall for name, used in cpu.items()},
    )


# ---------------------------------------------------------------- processes and paths


@dataclass
class Child:
    """A server process in its own session; its output goes to a log file."""

    name: str
    proc: subprocess.Popen[str]
    log: Path

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        # the whole session: nginx's workers, anything a child left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class Processes:
    """Every server of the three paths, started on demand and always stopped."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kakuremichi-e2ebench-"))
        self.children: list[Child] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.profile = os.environ.get("KAKUREMICHI_E2E_BENCH_PROFILE")

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, stdin: bool = False
    ) -> Child:
        log = self.tmp / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdin else out,
                stderr=out,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        self.pids[name] = proc.pid
        return child

    def _role(self, role: str, cfg: dict[str, Any]) -> list[str]:
        return [sys.executable, "-m", "bench.e2ebench", role, json.dumps(cfg)]

    def start_origin(self) -> int:
        child = self.spawn("origin", self._role("origin", {}), stdin=True)
        assert child.proc.stdout is not None
        line = _readline(child, 20)
        self.ports["origin"] = int(json.loads(line)["port"])
        return self.ports["origin"]

    def start_nginx(self, nginx: str) -> int:
        """nginx in front of the origin: one worker, HTTP/1.1 + keepalive upstream."""
        port = free_port()
        prefix = self.tmp / "nginx"
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                prefix=prefix,
                port=port,
                origin=self.ports["origin"],
            )
        )
        argv = [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/logs/error.log"]
        test = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t failed: {test.stderr.strip()}")
        child = self.spawn("nginx", [*argv, "-g", "daemon off;"])
        _wait_listening(child, port, 20)
        self.ports["nginx"] = port
        return port

    def start_ours(self) -> int:
        """Control, then gateway and agent as their own processes, configured through the
        REST API the way ``kakuremichi demo`` (and an operator) does it."""
        import httpx  # only here: the origin and client roles start without it

        token = "adm_bench_" + secrets.token_urlsafe(24)
        control_port, http_port = free_port(), free_port()
        control_url = f"http://{HOST}:{control_port}"
        cli = [sys.executable, "-m", "kakuremichi.cli"]
        quiet = ["--log-level", "warning"]
        control = self.spawn(
            "control",
            [
                *cli,
                "control",
                *("--host", HOST, "--port", str(control_port)),
                *("--data-dir", str(self.tmp / "control")),
                *quiet,
            ],
            env={"KAKUREMICHI_ADMIN_TOKEN": token},
        )
        with httpx.Client(
            base_url=control_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as api:

            def healthy() -> bool:
                try:
                    return api.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            _poll(control, healthy, 30, "Control")
            agent_row = _create(api, "/api/agents", {"name": "bench-agent"})
            gateway_row = _create(api, "/api/gateways", {"name": "bench-gateway"})
            _create(
                api,
                "/api/tunnels",
                {
                    "domain": DOMAIN,
                    "agent": "bench-agent",
                    "target": f"http://{HOST}:{self.ports['origin']}",
                },
            )
        gateway = self.spawn(
            "gateway",
            [
                *self._profiled(cli, "gateway"),
                "gateway",
                *("--control-url", control_url, "--data-dir", str(self.tmp / "gateway")),
                *("--public-ip", HOST, "--wireguard-backend", "userspace"),
                *("--wireguard-port", str(free_port(kind="udp"))),
                *("--host", HOST, "--http-port", str(http_port), "--https-port", "0"),
                *("--admin-host", HOST, "--admin-port", str(free_port())),
                # one client hammering from one address: no per-client rate limit
                *("--rate-limit", "0"),
                *quiet,
            ],
            env={"KAKUREMICHI_API_KEY": gateway_row["apiKey"]},
        )
        agent = self.spawn(
            "agent",
            [
                *self._profiled(cli, "agent"),
                "agent",
                *("--control-url", control_url, "--data-dir", str(self.tmp / "agent")),
                *("--wireguard-host", HOST),
                *quiet,
            ],
            env={"KAKUREMICHI_API_KEY": agent_row["apiKey"]},
        )

        def through() -> bool:
            for child in (gateway, agent):
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            try:
                response = httpx.get(
                    f"http://{HOST}:{http_port}/", headers={"Host": DOMAIN}, timeout=5
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and response.content == BODY

        _poll(gateway, through, 60, "a request through gateway → WireGuard → agent")
        self.ports["ours"] = http_port
        return http_port

    def _profiled(self, cli: list[str], name: str) -> list[str]:
        if not self.profile:
            return cli
        Path(self.profile).mkdir(parents=True, exist_ok=True)
        out = str(Path(self.profile, f"{name}.prof").resolve())
        return [sys.executable, "-m", "cProfile", "-o", out, *cli[1:]]

    def watch(self, path: str) -> dict[str, int]:
        """The server processes whose CPU the client should measure for one path."""
        names = {"direct": ["origin"], "nginx": ["nginx", "origin"]}.get(
            path, ["gateway", "agent", "origin"]
        )
        return {name: self.pids[name] for name in names}


def _create(api: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(path, json=body)
    if response.status_code != 201:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
    data: dict[str, Any] = response.json()
    return data


def _readline(child: Child, within: float) -> str:
    """The first stdout line of a role process, or its log if it dies or stays silent."""
    assert child.proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(child.proc.stdout.readline()))  # type: ignore[union-attr]
    reader.daemon = True
    reader.start()
    reader.join(within)
    if not result or not result[0].strip():
        raise RuntimeError(f"{child.name} did not start:\n{child.tail()}")
    return result[0]


def _poll(child: Child, ready: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {within:g}s:\n{child.tail()}")


def _wait_listening(child: Child, port: int, within: float) -> None:
    def connects() -> bool:
        with socket.create_connection((HOST, port), timeout=1):
            return True

    _poll(child, connects, within, f"{child.name} on port {port}")


def free_port(kind: str = "tcp") -> int:
    with socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    ) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def run_load(port: int, requests: int, connections: int, warmup: int, watch: dict[str, int]) -> Any:
    """One round: a client process against ``port``; its JSON result."""
    cfg = {
        "port": port,
        "requests": requests,
        "connections": connections,
        "warmup": warmup,
        "watch": watch,
        "timeout": 300,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.e2ebench", "client", json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=330,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"client failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# nginx as a Debian admin would put it in front of an app: HTTP/1.1 to the upstream with a
# keepalive pool, no access log (our gateway logs no requests by default either).
NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 1000000;
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    cfg["loop"] = fast_loop()
    runner = {"origin": run_origin, "client": run_client}[role]
    asyncio.run(runner(cfg))


if __name__ == "__main__":
    main()
