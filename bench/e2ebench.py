"""Harness for ``bench/test_e2e_bench.py``: one HTTP origin reached seven ways, measured
with ``wrk`` (Debian) and ``curl``, every piece its own process.

Rows (``ROWS``; "A", "B", "C" are network namespaces this harness creates)::

    direct         wrk ─▶ origin                                         (root namespace)
    nginx-edge     wrk ─▶ nginx ─▶ origin                                (root namespace)
    privileged     A: wrk ─▶ nginx ─▶ wireguard-go ══UDP══▶ B: wireguard-go ─▶ origin
                   (kernel TCP over both TUN interfaces: what a root-run agent gives)
    newt           A: wrk ─▶ nginx ─▶ wireguard-go ══UDP══▶ B: gofwd ─▶ origin
                   (Newt's design: bench/gofwd, wireguard-go's device on a gVisor
                   netstack, io.Copy of every accepted connection to 127.0.0.1:80)
    gateway-alone  C: wrk ─▶ ``kakuremichi gateway`` ─▶ origin       (no tunnel at all)
    all-userspace  wrk ─▶ gateway (userspace backend) ══UDP══▶ agent ─▶ origin  (root ns)
    production     A: wrk ─▶ gateway (wireguard-go backend) ══UDP══▶ B: agent ─▶ origin

Two more rows speak HTTP/2 over TLS, measured with ``h2load`` (Debian's
nghttp2-client) instead of ``wrk`` (``H2_ROWS``)::

    nginx-edge-h2     h2load ─▶ nginx (TLS, http2) ─▶ origin              (root namespace)
    all-userspace-h2  h2load ─▶ the all-userspace gateway's HTTPS listener (ALPN h2)
                      ══UDP══▶ agent ─▶ origin                            (root namespace)

A and B are joined by one veth pair (192.0.2.1 ↔ 192.0.2.2).  In A one wireguard-go
interface (10.90.0.1) has two peers: B's wireguard-go interface (10.90.0.2, the
privileged row) and gofwd (10.90.0.3, the Newt row); the production gateway brings up
its own wireguard-go interface in A (addresses from Control's pool, 100.64.0.0/10).

**Client placement**: in every row ``wrk`` (and ``curl``) runs in the namespace of the
first hop and reaches it over loopback (127.0.0.1), so the client costs the same
everywhere and only the path behind the first hop differs.

**The origin** is nginx (Debian, 1 worker, keep-alive, ``access_log off``):
``GET /`` is ``return 200 "hello, world\\n"`` (13 bytes), ``/100m`` and ``/10m`` are
sparse files served by nginx's static module (``sendfile on``).  It answers a small
request in a few microseconds with no interpreter in the way, so every row measures
the path rather than the app, and the download rows have an origin that is never the
bottleneck.  There is one origin per namespace that needs one (root, B, C), configured
alike.

**gateway-alone** runs ``kakuremichi gateway`` exactly as shipped (wireguard-go
backend, Control, REST-configured tunnel) with nothing changed for the bench: its
tunnel's agent is registered in Control but never runs, so the tunnel's ``agentIp``
(100.64.0.100) routes nowhere through WireGuard; that address is put on C's loopback
and the origin listens on it.  The gateway thus dials the origin over loopback with
its kernel TCP dialer, as in production, and opens each pooled connection with its
PROXY v2 header; the origin's ``listen … proxy_protocol`` reads that (once per
connection; the pool keeps them).  This is the gateway's HTTP layer alone, the fair
comparison with nginx-edge.

Settings that matter: every gateway gets ``--rate-limit 0`` (its default 50 req/s per
client address would measure the limiter: a bench has one client address) and every
kakuremichi process ``--log-level warning``; otherwise they run as shipped (their
default ``--event-loop``, Control's address allocation).  Both nginx roles run
``worker_processes 1`` (the gateway and the agent are one single-threaded process
each; on 2 cores a second worker would only take CPU from the others), HTTP/1.1 with an
upstream ``keepalive 64`` pool, and ``proxy_max_temp_file_size 0`` (a download streams
through memory buffers as in our gateway, never spooled to disk).  No process is
pinned to a core.

wireguard-go is Debian 12's (0.0.20220316), which predates upstream's own 7 MiB UDP
socket buffers: at the default 208 KiB its receive queue overflows in a fast download
(``RcvbufErrors`` in the receiving namespace) and TCP inside the tunnel recovers from
the losses, so the download rows crossing it (privileged, newt, production) vary from
round to round; the net.core buffer sysctls are read-only inside a namespace and the
host's are left alone.  Medians of several downloads are reported.  The Newt row's
first download after the wrk load sometimes stalls: gofwd's gVisor (Debian's
20221219) then counts dozens of retransmission timeouts (90 in one 20 s, 10 MB
download) where later downloads count none; so the full run starts the downloads with
an untimed 10 MB one on every row, and a stalled CI-mode download is slow, not wrong.

CPU of each process: utime+stime deltas from /proc/PID/stat over the timed window
(nginx with its worker; the gateway without its wireguard-go child, which is listed on
its own); wrk's own from ``getrusage(RUSAGE_CHILDREN)``.

:class:`E2EBench` starts what a row needs on first use and always stops everything:
SIGTERM then SIGKILL of each process group, processes left in the namespaces killed,
namespaces deleted, wireguard-go sockets and temporary directories removed.
``KAKUREMICHI_E2E_BENCH_PROFILE=DIR`` runs the gateways and agents under cProfile
(``<name>.prof`` in DIR when they exit); ``KAKUREMICHI_E2E_BENCH_GATEWAY_ARGS`` and
``KAKUREMICHI_E2E_BENCH_AGENT_ARGS`` add command-line options to every gateway / agent
(e.g. ``--event-loop asyncio`` to compare loops); unset, they run as shipped.

Roles (``python -m bench.e2ebench configure 'JSON'``): ``configure`` waits for Control
and creates the agent, the gateway and the tunnel through its REST API (run inside the
namespace Control listens in), printing their keys and the agent's address.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DOMAIN = "bench.example.com"
#: the gateway-session row's tunnel: the same origin behind a password policy
SESSION_DOMAIN = "session.example.com"
SESSION_PIN = "bench-pin-2468"
#: the gateway-replicas row's tunnel: the same origin as two replicas (round robin)
REPLICAS_DOMAIN = "replicas.example.com"
BODY = b"hello, world\n"
MB = 1_000_000
DOWNLOADS = {"/100m": 100 * MB, "/10m": 10 * MB}
CLK_TCK = os.sysconf("SC_CLK_TCK")

ROWS = (
    "direct",
    "nginx-edge",
    "privileged",
    "newt",
    "gateway-alone",
    "gateway-session",
    "gateway-replicas",
    "all-userspace",
    "production",
)
#: rows that need root, namespaces and wireguard-go
NETNS_ROWS = frozenset(
    {"privileged", "newt", "gateway-alone", "gateway-session", "gateway-replicas", "production"}
)
#: rows measured with ``h2load`` (HTTP/2 over TLS, self-signed certificates, not
#: verified): nginx as an HTTP/2 edge in front of the origin, and the all-userspace
#: row's gateway on its HTTPS listener (ALPN h2) through the tunnel to the origin
H2_ROWS = ("nginx-edge-h2", "all-userspace-h2")

# namespaces A/B (veth) and the wireguard-go tunnel of the privileged and Newt rows
VETH = ("192.0.2.1", "192.0.2.2")
WG_NET = "10.90.0"
WG_A, WG_B, WG_GOFWD = f"{WG_NET}.1", f"{WG_NET}.2", f"{WG_NET}.3"
WG_PORT_A, WG_PORT_B, WG_PORT_GOFWD = 51820, 51820, 51821
# fixed ports inside the namespaces (each namespace is ours alone)
CONTROL_PORT, GATEWAY_HTTP, GATEWAY_ADMIN, GATEWAY_WG = 7700, 8080, 9901, 51830
EDGE_PRIVILEGED, EDGE_NEWT, ORIGIN_PORT = 8081, 8082, 80

GOFWD_SRC = Path(__file__).resolve().parent / "gofwd" / "main.go"
GOPATH = "/usr/share/gocode"


# ---------------------------------------------------------------------- small helpers


def sh(*argv: str, input_text: str | None = None, check: bool = True, timeout: float = 30) -> str:
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, input=input_text, timeout=timeout
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def free_port(kind: str = "tcp") -> int:
    with socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    ) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def nginx_binary() -> str | None:
    """nginx from PATH or Debian's /usr/sbin (not on a normal user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (and its live descendants if asked; 0 if gone)."""
    total = 0.0
    for one in [pid, *(_descendants(pid) if children else [])]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(one)
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(_stat_fields(int(entry.name))[1])
                children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def child_named(pid: int, comm: str) -> int | None:
    """A direct child of ``pid`` whose command name is ``comm``."""
    for kid in _children_map().get(pid, []):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{kid}/comm").read_text().strip() == comm:
                return kid
    return None


# ------------------------------------------------------------------------- processes


@dataclass
class Child:
    """A server process in its own session; stderr (and stdout unless piped) to a log."""

    name: str
    proc: subprocess.Popen[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` execs the program: the same pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def readline(self, within: float) -> str:
        """The next stdout line (stdout must be piped), or the log if none comes."""
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(within)
        if not result or not result[0].strip():
            raise RuntimeError(f"{self.name} said nothing within {within:g}s:\n{self.tail()}")
        return result[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        # the whole session: nginx's worker, the gateway's wireguard-go, anything left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class Processes:
    """Started processes, each in its own session, always stopped by :meth:`close`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        netns: str | None = None,
        env: dict[str, str] | None = None,
        pipes: bool = False,
    ) -> Child:
        """Start ``argv`` (in ``netns``); ``pipes``: stdin and stdout are pipes to us."""
        log = self.tmp / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                in_ns(netns, argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


# ---------------------------------------------------------------------- HTTP via curl


def curl_get(
    ns: str | None,
    url: str,
    count: int = 1,
    max_time: float = 5,
    host: str = DOMAIN,
    headers: tuple[str, ...] = (),
) -> list[tuple[int, bytes]]:
    """``count`` GETs of ``url`` on one keep-alive connection (curl in ``ns``):
    (status, body) of each; [] if curl could not connect at all."""
    marker = "[kkm-status %{http_code}]"  # not "@…": -w would read a file
    argv = ["curl", "-s", "--max-time", str(max_time), "-H", f"Host: {host}"]
    for field in headers:
        argv += ["-H", field]
    argv += ["-w", marker, *([url] * count)]
    done = subprocess.run(in_ns(ns, argv), capture_output=True, timeout=max_time * count + 30)
    answers = re.findall(rb"(.*?)\[kkm-status (\d{3})\]", done.stdout, re.DOTALL)
    return [(int(status), body) for body, status in answers]


def check_answers(
    ns: str | None, port: int, count: int = 5, host: str = DOMAIN, headers: tuple[str, ...] = ()
) -> None:
    """``count`` requests; every one must be 200 with the exact body."""
    answers = curl_get(ns, f"http://{HOST}:{port}/", count, host=host, headers=headers)
    assert len(answers) == count, f"{count} requests, {len(answers)} answers: {answers[:3]}"
    for status, body in answers:
        assert (status, body) == (200, BODY), f"wanted 200 {BODY!r}, got {status} {body[:200]!r}"


def wait_answering(ns: str | None, port: int, within: float, watch: list[Child], what: str) -> None:
    """Poll until ``GET /`` on ``port`` answers 200 with the body."""
    deadline = time.monotonic() + within
    last: list[tuple[int, bytes]] = []
    while time.monotonic() < deadline:
        for child in watch:
            child.check_alive()
        last = curl_get(ns, f"http://{HOST}:{port}/", 1, max_time=2)
        if last == [(200, BODY)]:
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {c.name}:\n{c.tail()}" for c in watch)
    raise RuntimeError(f"{what} not answering within {within:g}s (last {last[:1]!r}):\n{logs}")


def wait_listening(ns: str | None, port: int, within: float, child: Child) -> None:
    """Poll until something accepts on 127.0.0.1:``port`` in ``ns`` (any HTTP answer)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        child.check_alive()
        done = subprocess.run(
            in_ns(
                ns, ["curl", "-s", "-o", "/dev/null", "--max-time", "2", f"http://{HOST}:{port}/"]
            ),
            capture_output=True,
            timeout=30,
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} not listening on {port} within {within:g}s:\n{child.tail()}")


# ------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Target:
    """Where a row's client connects and whose CPU it watches."""

    row: str
    netns: str | None
    port: int
    #: process label → (pid, count its descendants too)
    watch: dict[str, tuple[int, bool]]
    #: the Host the client asks for, and any other header fields it sends
    host: str = DOMAIN
    headers: tuple[str, ...] = ()


_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _micros(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(match[1]) * _TIME_UNITS[match[2]]


def parse_wrk(out: str) -> dict[str, Any]:
    """req/s, p50/p99 (µs), requests and errors from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    done = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)$", out, re.M)
    if not (rps and done and p50 and p99):
        raise ValueError(f"unparsable wrk output:\n{out}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = sum(int(n) for n in sock.groups()) if sock else 0
    status_errors = int(non2xx[1]) if non2xx else 0
    return {
        "rps": float(rps[1]),
        "requests": int(done[1]),
        "p50_us": _micros(p50[1]),
        "p99_us": _micros(p99[1]),
        "socket_errors": socket_errors,
        "status_errors": status_errors,
        "errors": socket_errors + status_errors,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_window(watch: dict[str, tuple[int, bool]]) -> Iterator[dict[str, Any]]:
    """Yields a dict filled on exit: ``cpu`` (cores per process label, ``client`` being
    the programs this process ran and reaped meanwhile) and ``seconds``."""
    report: dict[str, Any] = {}
    before = {name: cpu_seconds(pid, kids) for name, (pid, kids) in watch.items()}
    reaped = _children_cpu()
    started = time.perf_counter()
    yield report
    wall = time.perf_counter() - started
    cpu = {
        name: (cpu_seconds(pid, kids) - before[name]) / wall for name, (pid, kids) in watch.items()
    }
    report["cpu"] = {"client": (_children_cpu() - reaped) / wall, **cpu}
    report["seconds"] = wall


#: wrk's request, Host first and the other fields in a fixed order (see the script)
WRK_HOST_FIRST = Path(__file__).with_name("wrk_host_first.lua")


def run_wrk(target: Target, connections: int, seconds: float) -> dict[str, Any]:
    """One ``wrk -t1`` run against the target; parsed results plus CPU."""
    wrk = shutil.which("wrk") or "wrk"
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    argv += ["-s", str(WRK_HOST_FIRST)]  # Host first, as curl and browsers send it
    for field in target.headers:
        argv += ["-H", field]
    argv += ["-H", f"Host: {target.host}", f"http://{HOST}:{target.port}/"]
    with cpu_window(target.watch) as usage:
        done = subprocess.run(
            in_ns(target.netns, argv), capture_output=True, text=True, timeout=seconds + 60
        )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return {**parse_wrk(done.stdout), **usage, "connections": connections}


def parse_h2load(out: str) -> dict[str, Any]:
    """req/s, mean time per request (µs), requests and errors from ``h2load`` output."""
    rps = re.search(r"^finished in [\d.]+\w+, ([\d.]+) req/s", out, re.M)
    done = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
        re.M,
    )
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    mean = re.search(r"^time for request:\s+\S+\s+\S+\s+(\S+)", out, re.M)
    if not (rps and done and codes and mean):
        raise ValueError(f"unparsable h2load output:\n{out}")
    failed = int(done[5]) + int(done[6]) + int(done[7])
    non2xx = int(codes[2]) + int(codes[3]) + int(codes[4])
    return {
        "rps": float(rps[1]),
        "requests": int(done[3]),
        "mean_us": _micros(mean[1]),
        "errors": failed + non2xx,
    }


def run_h2load(target: Target, connections: int, seconds: float) -> dict[str, Any]:
    """One ``h2load -t1`` run (one stream at a time per connection, like ``wrk``'s
    connections) against an HTTPS target; parsed results plus CPU."""
    argv = ["h2load", "-t1", f"-c{connections}", "-m1", f"-D{seconds:g}"]
    argv += ["-H", f":authority: {DOMAIN}", f"https://{HOST}:{target.port}/"]
    with cpu_window(target.watch) as usage:
        done = subprocess.run(
            in_ns(target.netns, argv), capture_output=True, text=True, timeout=seconds + 60
        )
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr.strip()}")
    return {**parse_h2load(done.stdout), **usage, "connections": connections}


def check_h2(port: int, within: float = 30.0) -> None:
    """The HTTPS target answers ``GET /`` over HTTP/2 with the exact body."""
    argv = ["curl", "-sk", "--http2", "--max-time", "5", "-w", "\n%{http_version} %{http_code}"]
    argv += ["-H", f"Host: {DOMAIN}", f"https://{HOST}:{port}/"]
    deadline = time.monotonic() + within
    out = ""
    while time.monotonic() < deadline:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        if out == BODY.decode() + "\n2 200":
            return
        time.sleep(0.2)
    raise RuntimeError(f"no HTTP/2 answer on {port} within {within:g}s: {out!r}")


def run_download(target: Target, path: str) -> dict[str, Any]:
    """One GET of a large file with curl (body discarded); MB/s plus CPU."""
    size = DOWNLOADS[path]
    limit = max(120, 5 * size // MB)  # bounded: at least 0.2 MB/s
    url = f"http://{HOST}:{target.port}{path}"
    write_out = "%{http_code} %{size_download} %{time_total}"
    argv = ["curl", "-sS", "--max-time", str(limit), "-o", "/dev/null", "-w", write_out]
    for field in target.headers:
        argv += ["-H", field]
    argv += ["-H", f"Host: {target.host}", url]
    with cpu_window(target.watch) as usage:
        done = subprocess.run(
            in_ns(target.netns, argv), capture_output=True, text=True, timeout=limit + 30
        )
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr.strip()}"
    status, received, seconds = done.stdout.split()
    assert (int(status), int(received)) == (200, size), (status, received, size)
    return {"bytes": size, "seconds": float(seconds), "mb_s": size / MB / float(seconds), **usage}


# ------------------------------------------------------------------------- the Go side


def go_build_key() -> str:
    """A hash of what the gofwd binary is built from (source, toolchain, libraries)."""
    digest = hashlib.sha256(GOFWD_SRC.read_bytes())
    digest.update(sh("go", "version").encode())
    for package in ("golang-golang.zx2c4-wireguard-dev", "golang-gvisor-gvisor-dev"):
        version = sh("dpkg-query", "-W", "-f=${Version}", package, check=False)
        digest.update(f"{package}={version}".encode())
    return digest.hexdigest()[:16]


def build_gofwd() -> tuple[Path, float, bool]:
    """The gofwd binary, how long its build took (s) and whether it came from the cache.

    Built with ``GO111MODULE=off GOPATH=/usr/share/gocode go build`` against Debian's
    golang-golang.zx2c4-wireguard-dev and golang-gvisor-gvisor-dev (about 30 s cold
    on the 2-core machine, mostly gVisor; GOCACHE in a temporary directory), then kept
    in ``$XDG_CACHE_HOME/kakuremichi`` or ``/var/tmp/kakuremichi-bench`` under a hash of
    the source, toolchain and library versions, so later sessions reuse it
    (``KAKUREMICHI_E2E_BENCH_REBUILD=1`` forces a build)."""
    base = os.environ.get("XDG_CACHE_HOME")
    cache = Path(base, "kakuremichi") if base else Path("/var/tmp/kakuremichi-bench")
    binary = cache / f"gofwd-{go_build_key()}"
    note = binary.with_name(binary.name + ".json")
    if binary.is_file() and not os.environ.get("KAKUREMICHI_E2E_BENCH_REBUILD"):
        took = 0.0
        with contextlib.suppress(OSError, ValueError, KeyError):
            took = float(json.loads(note.read_text())["build_seconds"])
        return binary, took, True
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kakuremichi-gofwd-") as work:
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": GOPATH,
            "GOCACHE": str(Path(work, "cache")),
            "GOFLAGS": "",
            "CGO_ENABLED": "0",
        }
        started = time.perf_counter()
        out = Path(work, "gofwd")
        done = subprocess.run(
            ["go", "build", "-o", str(out), "."],
            cwd=GOFWD_SRC.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"go build of bench/gofwd failed:\n{done.stderr[-3000:]}")
        partial = binary.with_name(f"{binary.name}.tmp{os.getpid()}")
        shutil.copy2(out, partial)
        partial.replace(binary)
    note.write_text(json.dumps({"build_seconds": round(took, 1)}))
    for stale in cache.glob("gofwd-*"):  # builds of other sources
        if stale not in (binary, note):
            with contextlib.suppress(OSError):
                stale.unlink()
    return binary, took, False


# ------------------------------------------------------------------------- nginx configs

_NGINX_HEAD = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""

# The app: a 13-byte answer for GET / and big static files, keep-alive.
_ORIGIN_SERVER = """\
    sendfile on;
    tcp_nopush on;
    server {{
{listens}
        location = / {{
            default_type text/plain;
            return 200 "hello, world\\n";
        }}
        location / {{
            root {www};
            default_type application/octet-stream;
        }}
    }}
"""

# nginx as a Debian admin would put it in front of an app: HTTP/1.1 to the upstream
# with a keepalive pool, no access log (our gateway logs no requests by default either).
_EDGE_SERVER = """\
    upstream up{index} {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://up{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


def origin_conf(prefix: Path, www: Path, listens: list[str]) -> str:
    lines = "\n".join(f"        listen {listen};" for listen in listens)
    return _NGINX_HEAD.format(prefix=prefix) + _ORIGIN_SERVER.format(listens=lines, www=www) + "}\n"


def edge_conf(
    prefix: Path, servers: list[tuple[str, str]], tls: tuple[Path, Path] | None = None
) -> str:
    """``servers``: (listen, upstream address) pairs; ``tls``: (certificate, key) to
    listen with TLS and HTTP/2."""
    if tls is not None:
        cert, key = tls
        servers = [
            (f"{listen} ssl http2;\n        ssl_certificate {cert};\n"
             f"        ssl_certificate_key {key}", upstream)
            for listen, upstream in servers
        ]  # fmt: skip
    body = "".join(
        _EDGE_SERVER.format(index=i, listen=listen, upstream=upstream)
        for i, (listen, upstream) in enumerate(servers)
    )
    return _NGINX_HEAD.format(prefix=prefix) + body + "}\n"


# ------------------------------------------------------------------------- the bench


class E2EBench:
    """Every row's servers, started on first use (:meth:`target`), always torn down."""

    def __init__(self) -> None:
        from common.keys import KeyPair
        from tests.support import unique_name

        self.tmp = Path(tempfile.mkdtemp(prefix="kakuremichi-e2e-"))
        self.targets: dict[str, Target] = {}
        #: facts for the report (the Go build)
        self.info: dict[str, Any] = {}
        #: the gateway-alone row's agent address (its origin listens on it)
        self.alone_agent_ip = ""
        self.tokens: dict[str, str] = {}
        self.keys = {k: KeyPair.generate() for k in ("a", "b", "gofwd")}
        self.edge_a: Child | None = None
        self.procs = Processes(self.tmp)
        self.nginx = nginx_binary() or "nginx"
        self.www = Path(tempfile.mkdtemp(prefix="kakuremichi-e2e-www-"))
        self.www.chmod(0o755)  # nginx's worker runs as nobody
        for path, size in DOWNLOADS.items():
            with open(self.www / path.lstrip("/"), "wb") as handle:
                handle.truncate(size)  # sparse: zeros, no disk
            (self.www / path.lstrip("/")).chmod(0o644)
        self.names = {
            key: unique_name("ke" + prefix)
            for key, prefix in {
                "a": "a", "b": "b", "c": "c", "veth_a": "va", "veth_b": "vb",
                "wg_a": "wa", "wg_b": "wb", "gw_a": "ga", "gw_c": "gc",
            }.items()
        }  # fmt: skip
        self.namespaces: list[str] = []
        self.pids: dict[str, int] = {}
        self.origin_port = 0  # the root namespace's origin (0: not started)
        self.https_port = 0  # the all-userspace gateway's HTTPS listener
        self.profile = os.environ.get("KAKUREMICHI_E2E_BENCH_PROFILE")
        self._started: set[str] = set()

    def __enter__(self) -> E2EBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.procs.close()
        for ns in reversed(self.namespaces):
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        for key in ("wg_a", "wg_b", "gw_a", "gw_c"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"/var/run/wireguard/{self.names[key]}.sock").unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.www, ignore_errors=True)

    # -- rows

    def target(self, row: str) -> Target:
        """The row's client target, its servers started (and answering) first."""
        if row not in self.targets:
            self.targets[row] = getattr(self, "_row_" + row.replace("-", "_"))()
        return self.targets[row]

    def _once(self, what: str, start: Callable[[], None]) -> None:
        if what not in self._started:
            start()
            self._started.add(what)

    def _row_direct(self) -> Target:
        self._once("origin", self._origin_root)
        return Target("direct", None, self.origin_port, {"origin": (self.pids["origin"], True)})

    def _row_nginx_edge(self) -> Target:
        self._once("origin", self._origin_root)
        port = free_port()
        conf = edge_conf(self._prefix("edge"), [(f"{HOST}:{port}", f"{HOST}:{self.origin_port}")])
        edge = self._nginx("edge", conf, None)
        wait_answering(None, port, 20, [edge], "nginx edge")
        watch = {"nginx": (edge.pid, True), "origin": (self.pids["origin"], True)}
        return Target("nginx-edge", None, port, watch)

    def _row_nginx_edge_h2(self) -> Target:
        from gateway.tls import self_signed

        self._once("origin", self._origin_root)
        cert = self_signed(DOMAIN)
        prefix = self._prefix("edge-h2")
        (prefix / "edge.crt").write_text(cert.chain_pem)
        (prefix / "edge.key").write_text(cert.key_pem)
        (prefix / "edge.key").chmod(0o600)
        port = free_port()
        conf = edge_conf(
            prefix,
            [(f"{HOST}:{port}", f"{HOST}:{self.origin_port}")],
            (prefix / "edge.crt", prefix / "edge.key"),
        )
        edge = self._nginx("edge-h2", conf, None)
        check_h2(port)
        watch = {"nginx": (edge.pid, True), "origin": (self.pids["origin"], True)}
        return Target("nginx-edge-h2", None, port, watch)

    def _row_all_userspace_h2(self) -> Target:
        h1 = self.target("all-userspace")
        check_h2(self.https_port, 60)
        return Target("all-userspace-h2", None, self.https_port, h1.watch)

    def _row_privileged(self) -> Target:
        self._once("pair", self._pair)
        wait_answering(self.ns_a, EDGE_PRIVILEGED, 30, [self.edge], "privileged row")
        watch = {
            "nginx": (self.edge.pid, True),
            "wg-go A": (self.pids["wg_a"], False),
            "wg-go B": (self.pids["wg_b"], False),
            "origin": (self.pids["origin_b"], True),
        }
        return Target("privileged", self.ns_a, EDGE_PRIVILEGED, watch)

    def _row_newt(self) -> Target:
        self._once("pair", self._pair)
        binary, took, cached = build_gofwd()
        self.info["gofwd_build_seconds"] = round(took, 1)
        self.info["gofwd_build_cached"] = cached
        self.info["gofwd_binary"] = str(binary)
        uapi = "\\n".join(
            [
                f"private_key={self.keys['gofwd'].private.hex()}",
                f"listen_port={WG_PORT_GOFWD}",
                f"public_key={self.keys['a'].public.hex()}",
                f"endpoint={VETH[0]}:{WG_PORT_A}",
                f"allowed_ip={WG_A}/32",
                "persistent_keepalive_interval=25",
            ]
        )
        gofwd = self.procs.spawn(
            "gofwd",
            [str(binary), "-address", WG_GOFWD, "-port", "80", "-target", f"{HOST}:{ORIGIN_PORT}"],
            netns=self.ns_b,
            pipes=True,
        )
        assert gofwd.proc.stdin is not None
        gofwd.proc.stdin.write(uapi + "\n")
        gofwd.proc.stdin.flush()
        assert gofwd.readline(20).strip() == "ready"
        wait_answering(self.ns_a, EDGE_NEWT, 30, [self.edge, gofwd], "Newt row (gofwd)")
        watch = {
            "nginx": (self.edge.pid, True),
            "wg-go A": (self.pids["wg_a"], False),
            "gofwd": (gofwd.pid, False),
            "origin": (self.pids["origin_b"], True),
        }
        return Target("newt", self.ns_a, EDGE_NEWT, watch)

    def _row_gateway_alone(self) -> Target:
        ns = self._namespace("c")
        control_url = f"http://{HOST}:{CONTROL_PORT}"
        control = self._control("control-c", ns, HOST)
        # (the target is the never-running agent's business: unused)
        keys = self._configure(ns, control_url, self.tokens["control-c"], "http://127.0.0.1:9")
        agent_ip = self.alone_agent_ip = keys["agent_ip"]
        # the tunnel's agent never runs: its address is the origin's, on C's loopback
        sh("ip", "-n", ns, "addr", "add", f"{agent_ip}/32", "dev", "lo")
        prefix = self._prefix("origin-c")
        origin = self._nginx(
            "origin-c",
            origin_conf(prefix, self.www, [f"{agent_ip}:{ORIGIN_PORT} proxy_protocol"]),
            ns,
        )
        gateway = self._gateway(
            "gateway-c",
            ns,
            control_url,
            keys["gateway_key"],
            "wireguard-go",
            HOST,
            self.names["gw_c"],
        )
        wait_answering(ns, GATEWAY_HTTP, 60, [control, gateway, origin], "gateway alone")
        watch = {
            "gateway": (gateway.pid, False),
            "origin": (origin.pid, True),
            "control": (control.pid, False),
        }
        return Target("gateway-alone", ns, GATEWAY_HTTP, watch)

    def _configure_on_c(self, role: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Run a configure role of this module against the gateway-alone row's Control
        (in its namespace); what it prints last, as JSON ({} if nothing)."""
        cfg = {"url": f"http://{HOST}:{CONTROL_PORT}", "token": self.tokens["control-c"]}
        argv = [sys.executable, "-m", "bench.e2ebench", role, json.dumps({**cfg, **extra})]
        done = subprocess.run(
            in_ns(self.target("gateway-alone").netns, argv),
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=90,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{role} failed: {done.stderr[-2000:]}")
        lines = done.stdout.strip().splitlines()
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        return result

    def _row_gateway_session(self) -> Target:
        """The gateway-alone row's gateway, a second tunnel to the same origin behind a
        password policy, and the client sending the session cookie it signed in for:
        the cost of the access policy on every request."""
        alone = self.target("gateway-alone")
        ns = alone.netns
        self._configure_on_c("configure-session", {"pin": SESSION_PIN})
        # (the sign-in page answers once the policy is in force at the gateway)
        cookie = self._sign_in(ns, alone.port)
        headers = (f"Cookie: kkm_session={cookie}",)
        without = curl_get(ns, f"http://{HOST}:{alone.port}/", host=SESSION_DOMAIN)
        if not without or without[0][0] != 401:
            raise RuntimeError(f"the session tunnel let a client in without a cookie: {without}")
        return Target("gateway-session", ns, alone.port, alone.watch, SESSION_DOMAIN, headers)

    def _row_gateway_replicas(self) -> Target:
        """The gateway-alone row's gateway and a third tunnel to the same origin with two
        replicas (round robin): the second agent's address is on C's loopback too, with
        the same origin nginx answering on it, so every request is balanced between two
        upstream addresses (the cost of balancing on every request; issue 17's 5% goal).
        Neither agent runs, so Control reports both offline and the gateway balances over
        every replica that is not draining, as it does when no health is known."""
        alone = self.target("gateway-alone")
        ns = alone.netns
        second_ip = self._configure_on_c("configure-replicas", {})["agent_ip"]
        sh("ip", "-n", ns, "addr", "add", f"{second_ip}/32", "dev", "lo")
        # the gateway-alone row's origin answers on the second replica's address too (its
        # configuration reloaded with SIGHUP): one origin process for both replicas, so
        # the row differs from gateway-alone by the balancing alone, not by a second
        # nginx competing for the two cores
        prefix = self._prefix("origin-c")
        listens = [f"{ip}:{ORIGIN_PORT} proxy_protocol" for ip in (self.alone_agent_ip, second_ip)]
        path = prefix / "nginx.conf"
        path.write_text(origin_conf(prefix, self.www, listens))
        argv = [self.nginx, "-p", f"{prefix}/", "-c", str(path), "-e", f"{prefix}/logs/error.log"]
        test = subprocess.run(in_ns(ns, [*argv, "-t"]), capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t (origin-c, two listens) failed: {test.stderr.strip()}")
        os.kill(self.pids["origin-c"], signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:  # the tunnel has reached the gateway once both upstreams answer
            answers = curl_get(ns, f"http://{HOST}:{alone.port}/", 4, host=REPLICAS_DOMAIN)
            if len(answers) == 4 and all(status == 200 for status, _ in answers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{REPLICAS_DOMAIN} does not answer 200: {answers}")
            time.sleep(0.2)
        return Target("gateway-replicas", ns, alone.port, alone.watch, REPLICAS_DOMAIN)

    def _sign_in(self, ns: str | None, port: int) -> str:
        """Sign in to the session tunnel through its login page, as a browser does."""
        deadline = time.monotonic() + 30
        url = f"http://{HOST}:{port}/.kakuremichi/login"
        jar = str(self.tmp / "session-cookies.txt")
        while True:
            page = sh(*in_ns(ns, ["curl", "-s", "-c", jar, "-H", f"Host: {SESSION_DOMAIN}", url]))
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            if csrf:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no sign-in page for {SESSION_DOMAIN}: {page[:300]}")
            time.sleep(0.2)
        answer = sh(
            *in_ns(
                ns,
                [
                    "curl",
                    "-s",
                    "-b",
                    jar,
                    "-c",
                    jar,
                    "-o",
                    "/dev/null",
                    "-D",
                    "-",
                    "-H",
                    f"Host: {SESSION_DOMAIN}",
                    "--data-urlencode",
                    f"csrf={csrf[1]}",
                    "--data-urlencode",
                    f"password={SESSION_PIN}",
                    url,
                ],
            )
        )
        found = re.search(r"(?im)^set-cookie: kkm_session=([^;\s]+)", answer)
        if not found:
            raise RuntimeError(f"signing in to {SESSION_DOMAIN} failed: {answer[:500]}")
        return found[1]

    def _row_all_userspace(self) -> Target:
        self._once("origin", self._origin_root)
        control_port, http_port = free_port(), free_port()
        self.https_port = free_port()
        control_url = f"http://{HOST}:{control_port}"
        control = self._control("control-u", None, HOST, control_port)
        keys = self._configure(
            None, control_url, self.tokens["control-u"], f"http://{HOST}:{self.origin_port}"
        )
        gateway = self._gateway(
            "gateway-u", None, control_url, keys["gateway_key"], "userspace", HOST, None,
            http_port=http_port, admin_port=free_port(), wg_port=free_port("udp"),
            https_port=self.https_port,
        )  # fmt: skip
        agent = self._agent("agent-u", None, control_url, keys["agent_key"], HOST)
        wait_answering(None, http_port, 60, [control, gateway, agent], "all-userspace row")
        watch = {
            "gateway": (gateway.pid, False),
            "agent": (agent.pid, False),
            "origin": (self.pids["origin"], True),
            "control": (control.pid, False),
        }
        return Target("all-userspace", None, http_port, watch)

    def _row_production(self) -> Target:
        self._once("pair", self._pair)
        control_url = f"http://{VETH[0]}:{CONTROL_PORT}"
        control = self._control("control-a", self.ns_a, VETH[0])
        keys = self._configure(
            self.ns_a, control_url, self.tokens["control-a"], f"http://{HOST}:{ORIGIN_PORT}"
        )
        gateway = self._gateway(
            "gateway-a",
            self.ns_a,
            control_url,
            keys["gateway_key"],
            "wireguard-go",
            VETH[0],
            self.names["gw_a"],
        )
        agent = self._agent("agent-b", self.ns_b, control_url, keys["agent_key"], VETH[1])
        wait_answering(self.ns_a, GATEWAY_HTTP, 60, [control, gateway, agent], "production row")
        wg_child = child_named(gateway.pid, "wireguard-go")
        watch = {"gateway": (gateway.pid, False)}
        if wg_child is not None:
            watch["gateway wg-go"] = (wg_child, False)
        watch |= {
            "agent": (agent.pid, False),
            "origin": (self.pids["origin_b"], True),
            "control": (control.pid, False),
        }
        return Target("production", self.ns_a, GATEWAY_HTTP, watch)

    # -- building blocks

    @property
    def edge(self) -> Child:
        """A's nginx edge (the privileged and Newt rows' first hop)."""
        assert self.edge_a is not None
        return self.edge_a

    @property
    def ns_a(self) -> str:
        return self.names["a"]

    @property
    def ns_b(self) -> str:
        return self.names["b"]

    def _prefix(self, name: str) -> Path:
        prefix = self.tmp / name
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        return prefix

    def _nginx(self, name: str, conf: str, ns: str | None) -> Child:
        prefix = self._prefix(name)
        path = prefix / "nginx.conf"
        path.write_text(conf)
        argv = [self.nginx, "-p", f"{prefix}/", "-c", str(path), "-e", f"{prefix}/logs/error.log"]
        test = subprocess.run(in_ns(ns, [*argv, "-t"]), capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t ({name}) failed: {test.stderr.strip()}")
        child = self.procs.spawn(name, [*argv, "-g", "daemon off;"], netns=ns)
        self.pids[name] = child.pid
        return child

    def _origin_root(self) -> None:
        port = free_port()
        origin = self._nginx(
            "origin", origin_conf(self._prefix("origin"), self.www, [f"{HOST}:{port}"]), None
        )
        wait_answering(None, port, 20, [origin], "origin")
        self.origin_port = port

    def _namespace(self, key: str) -> str:
        ns = self.names[key]
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _pair(self) -> None:
        """Namespaces A and B on a veth pair, the wireguard-go tunnel of the privileged
        and Newt rows, B's origin and A's nginx edge (both upstreams)."""
        a, b = self._namespace("a"), self._namespace("b")
        n = self.names
        sh("ip", "link", "add", n["veth_a"], "netns", a, "type", "veth",
           "peer", "name", n["veth_b"], "netns", b)  # fmt: skip
        for ns, dev, ip in ((a, n["veth_a"], VETH[0]), (b, n["veth_b"], VETH[1])):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.pids["wg_a"] = self._wireguard_go(a, n["wg_a"], self.keys["a"], WG_PORT_A).pid
        sh("ip", "netns", "exec", a, "wg", "set", n["wg_a"],
           "peer", self.keys["b"].public_b64, "allowed-ips", f"{WG_B}/32",
           "endpoint", f"{VETH[1]}:{WG_PORT_B}",
           "peer", self.keys["gofwd"].public_b64, "allowed-ips", f"{WG_GOFWD}/32",
           "endpoint", f"{VETH[1]}:{WG_PORT_GOFWD}")  # fmt: skip
        sh("ip", "-n", a, "addr", "add", f"{WG_A}/24", "dev", n["wg_a"])
        sh("ip", "-n", a, "link", "set", n["wg_a"], "up")
        self.pids["wg_b"] = self._wireguard_go(b, n["wg_b"], self.keys["b"], WG_PORT_B).pid
        sh("ip", "netns", "exec", b, "wg", "set", n["wg_b"],
           "peer", self.keys["a"].public_b64, "allowed-ips", f"{WG_A}/32",
           "endpoint", f"{VETH[0]}:{WG_PORT_A}", "persistent-keepalive", "25")  # fmt: skip
        sh("ip", "-n", b, "addr", "add", f"{WG_B}/24", "dev", n["wg_b"])
        sh("ip", "-n", b, "link", "set", n["wg_b"], "up")
        origin = self._nginx(
            "origin-b", origin_conf(self._prefix("origin-b"), self.www, [str(ORIGIN_PORT)]), b
        )
        wait_answering(b, ORIGIN_PORT, 20, [origin], "origin in B")
        self.pids["origin_b"] = origin.pid
        servers = [
            (f"{HOST}:{EDGE_PRIVILEGED}", f"{WG_B}:{ORIGIN_PORT}"),
            (f"{HOST}:{EDGE_NEWT}", f"{WG_GOFWD}:80"),
        ]
        self.edge_a = self._nginx("edge-a", edge_conf(self._prefix("edge-a"), servers), a)
        wait_listening(a, EDGE_PRIVILEGED, 20, self.edge_a)

    def _wireguard_go(self, ns: str, ifname: str, keys: Any, port: int) -> Child:
        daemon = self.procs.spawn(
            f"wireguard-go-{ifname}", ["wireguard-go", "-f", ifname], netns=ns
        )
        sock = Path(f"/var/run/wireguard/{ifname}.sock")
        for _ in range(400):
            if sock.exists():
                break
            daemon.check_alive()
            time.sleep(0.025)
        else:
            raise RuntimeError(f"wireguard-go did not create {sock}:\n{daemon.tail()}")
        sh("ip", "netns", "exec", ns, "wg", "set", ifname, "listen-port", str(port),
           "private-key", "/dev/stdin", input_text=keys.private_b64)  # fmt: skip
        return daemon

    def _cli(self, name: str, profiled: bool = False) -> list[str]:
        if profiled and self.profile:
            Path(self.profile).mkdir(parents=True, exist_ok=True)
            out = str(Path(self.profile, f"{name}.prof").resolve())
            return [sys.executable, "-m", "cProfile", "-o", out, "-m", "kakuremichi.cli"]
        return [sys.executable, "-m", "kakuremichi.cli"]

    def _control(self, name: str, ns: str | None, host: str, port: int = CONTROL_PORT) -> Child:
        token = "adm_bench_" + secrets.token_urlsafe(24)
        self.tokens[name] = token
        argv = [*self._cli(name), "control", "--host", host, "--port", str(port)]
        argv += ["--data-dir", str(self.tmp / name), "--log-level", "warning"]
        child = self.procs.spawn(name, argv, netns=ns, env={"KAKUREMICHI_ADMIN_TOKEN": token})
        self.pids[name] = child.pid
        return child

    def _configure(self, ns: str | None, url: str, token: str, target: str) -> dict[str, Any]:
        cfg = {"url": url, "token": token, "target": target}
        argv = [sys.executable, "-m", "bench.e2ebench", "configure", json.dumps(cfg)]
        done = subprocess.run(
            in_ns(ns, argv),
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=90,
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"configuring Control at {url} failed: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def _gateway(
        self,
        name: str,
        ns: str | None,
        control_url: str,
        api_key: str,
        backend: str,
        public_ip: str,
        interface: str | None,
        *,
        http_port: int = GATEWAY_HTTP,
        admin_port: int = GATEWAY_ADMIN,
        wg_port: int = GATEWAY_WG,
        https_port: int = 0,
    ) -> Child:
        argv = [
            *self._cli(name, profiled=True),
            "gateway",
            *("--control-url", control_url, "--data-dir", str(self.tmp / name)),
            *("--public-ip", public_ip, "--wireguard-backend", backend),
            *("--wireguard-port", str(wg_port)),
            *(("--interface", interface) if interface else ()),
            *("--host", HOST, "--http-port", str(http_port), "--https-port", str(https_port)),
            *("--admin-host", HOST, "--admin-port", str(admin_port)),
            # one client hammering from one address: no per-client rate limit
            *("--rate-limit", "0"),
            *("--log-level", "warning"),
            *shlex.split(os.environ.get("KAKUREMICHI_E2E_BENCH_GATEWAY_ARGS", "")),
        ]
        child = self.procs.spawn(name, argv, netns=ns, env={"KAKUREMICHI_API_KEY": api_key})
        self.pids[name] = child.pid
        return child

    def _agent(
        self, name: str, ns: str | None, control_url: str, api_key: str, wg_host: str
    ) -> Child:
        argv = [
            *self._cli(name, profiled=True),
            "agent",
            *("--control-url", control_url, "--data-dir", str(self.tmp / name)),
            *("--wireguard-host", wg_host, "--log-level", "warning"),
            *shlex.split(os.environ.get("KAKUREMICHI_E2E_BENCH_AGENT_ARGS", "")),
        ]
        child = self.procs.spawn(name, argv, netns=ns, env={"KAKUREMICHI_API_KEY": api_key})
        self.pids[name] = child.pid
        return child


# ------------------------------------------------------------------------- configure role


def configure(cfg: dict[str, Any]) -> None:
    """Control's REST API, as an operator (or ``kakuremichi demo``) uses it."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg['token']}"}
    with httpx.Client(base_url=cfg["url"], headers=headers, timeout=10) as api:
        deadline = time.monotonic() + 60
        while True:
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"Control at {cfg['url']} not healthy within 60 s")
            time.sleep(0.1)

        def create(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = api.post(path, json=body)
            if response.status_code != 201:
                raise SystemExit(f"POST {path}: {response.status_code} {response.text[:300]}")
            data: dict[str, Any] = response.json()
            return data

        agent = create("/api/agents", {"name": "bench-agent"})
        gateway = create("/api/gateways", {"name": "bench-gateway"})
        create("/api/tunnels", {"domain": DOMAIN, "agent": "bench-agent", "target": cfg["target"]})
    print(
        json.dumps(
            {
                "agent_key": agent["apiKey"],
                "gateway_key": gateway["apiKey"],
                "agent_ip": agent["virtualIp"],
            }
        ),
        flush=True,
    )


def configure_session(cfg: dict[str, Any]) -> None:
    """The gateway-session row's tunnel and its password policy."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg['token']}"}
    with httpx.Client(base_url=cfg["url"], headers=headers, timeout=30) as api:
        agent = api.get("/api/agents/bench-agent").json()
        tunnel = api.post(
            "/api/tunnels",
            json={
                "domain": SESSION_DOMAIN,
                "agent": agent["id"],
                "target": api.get("/api/tunnels").json()["items"][0]["target"],
            },
        )
        if tunnel.status_code != 201:
            raise SystemExit(f"POST /api/tunnels: {tunnel.status_code} {tunnel.text[:300]}")
        policy = api.put(
            f"/api/tunnels/{tunnel.json()['id']}/access", json={"password": cfg["pin"]}
        )
        if policy.status_code != 200:
            raise SystemExit(f"PUT access: {policy.status_code} {policy.text[:300]}")


def configure_replicas(cfg: dict[str, Any]) -> None:
    """The gateway-replicas row's second agent and its two-replica tunnel; prints the
    second agent's address."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg['token']}"}
    with httpx.Client(base_url=cfg["url"], headers=headers, timeout=30) as api:
        second = api.post("/api/agents", json={"name": "bench-agent-2"})
        if second.status_code != 201:
            raise SystemExit(f"POST /api/agents: {second.status_code} {second.text[:300]}")
        tunnel = api.post(
            "/api/tunnels",
            json={
                "domain": REPLICAS_DOMAIN,
                "replicas": [{"agent": "bench-agent"}, {"agent": "bench-agent-2"}],
                "target": api.get("/api/tunnels").json()["items"][0]["target"],
            },
        )
        if tunnel.status_code != 201:
            raise SystemExit(f"POST /api/tunnels: {tunnel.status_code} {tunnel.text[:300]}")
    print(json.dumps({"agent_ip": second.json()["virtualIp"]}), flush=True)


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if role == "configure":
        configure(cfg)
    elif role == "configure-session":
        configure_session(cfg)
    elif role == "configure-replicas":
        configure_replicas(cfg)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
