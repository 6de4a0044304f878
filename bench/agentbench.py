"""Harness for ``bench/test_agent_bench.py``: the agent's data plane beside the privileged
path, over real WireGuard (wireguard-go) in network namespaces.

Topology (created by :class:`Topology`, always torn down by it)::

    ns G "gateway": wireguard-go, 10.77.0.1/24 + 10.78.0.1/24 (one peer per agent,
    │                as a real gateway holds one address per agent subnet)
    ├── veth 172.31.1.0/24 ── ns A "privileged agent": wireguard-go 10.77.0.100 +
    │                          kernel TCP, an asyncio server on :5201
    └── veth 172.31.2.0/24 ── ns B "our agent": one process running the agent's own
                               data plane (``agent.device.AgentDataPlane``: our WireGuard +
                               our TCP/IP stack on one UDP socket) holding 10.78.0.100,
                               the same asyncio server on the stack's :5201, and a
                               ``agent.forward.Forwarder`` raw TCP tunnel :5301 →
                               127.0.0.1:5201 (a kernel server process in B, the
                               "local app"), i.e. the agent's full forwarding path.

Everything runs as a separate process under ``ip netns exec`` (wireguard-go, the
servers, the agent and the gateway-side clients), so each has its own interpreter
and can use its own core.  Usage of the roles::

    python -m bench.agentbench server '{"host": ..., "port": ...}'  # kernel TCP
    python -m bench.agentbench agent  '{...}'                         # our stack
    python -m bench.agentbench client '{"job": "upload" | "download" | "rtt" | "conns" | "probe", ...}'

The servers speak one line of command first: ``sink`` (count bytes until EOF, answer
the count), ``source N`` (send N bytes, then FIN) or ``echo``.  Servers and the agent
print one JSON line when ready and exit when their stdin closes; clients print JSON
results.  Every loop is bounded by a byte count, a round count or a deadline.

Listen backlogs: the kernel servers ask for 4096; the agent's listeners take
``UserspaceTunnel.start_server``'s default (4096 too), as the agent's own ``Forwarder``
does.  ``KAKUREMICHI_AGENT_BENCH_PROFILE=FILE``
runs the agent process under cProfile and writes the stats to FILE when it exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

GW_PORT = 51820
PRIV_NET, OURS_NET = "10.77.0", "10.78.0"
GW_PRIV_IP, PRIV_AGENT_IP = f"{PRIV_NET}.1", f"{PRIV_NET}.100"
GW_OURS_IP, OUR_AGENT_IP = f"{OURS_NET}.1", f"{OURS_NET}.100"
VETH_A = ("172.31.1.1", "172.31.1.2")  # G side, A side
VETH_B = ("172.31.2.1", "172.31.2.2")  # G side, B side
APP_PORT = 5201  # the bench server, on the agent's address
FORWARD_PORT = 5301  # the Forwarder's raw TCP tunnel → 127.0.0.1:APP_PORT in B
CHUNK = 256 * 1024


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 65536))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---------------------------------------------------------------------- the server app


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The bench application, identical on kernel TCP and on our stack."""
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
        command, _, argument = line.decode("ascii", "replace").strip().partition(" ")
        if command == "sink":
            total = 0
            while data := await reader.read(1 << 20):
                total += len(data)
            writer.write(f"{total}\n".encode())
            await writer.drain()
        elif command == "source":
            left = int(argument)
            chunk = memoryview(bytes(CHUNK))
            while left > 0:
                n = min(left, CHUNK)
                writer.write(chunk[:n])
                await writer.drain()
                left -= n
        elif command == "echo":
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


def _stop_on_stdin_eof(loop: asyncio.AbstractEventLoop, on_line: Any = None) -> asyncio.Event:
    stop = asyncio.Event()

    def read() -> None:
        for line in sys.stdin:
            if on_line is not None and line.strip():
                loop.call_soon_threadsafe(on_line, line.strip())
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read, daemon=True).start()
    return stop


async def run_server(cfg: dict[str, Any]) -> None:
    """Kernel TCP: the privileged agent's side (and the Forwarder's local app)."""
    raise_fd_limit()
    # A large accept queue (asyncio's default is 100): the privileged path should show
    # what kernel TCP can do, not drop SYNs of the 1,000-connection burst.
    server = await asyncio.start_server(serve, cfg["host"], cfg["port"], backlog=4096)
    stop = _stop_on_stdin_eof(asyncio.get_running_loop())
    emit(ready=True, pid=os.getpid())
    try:
        await asyncio.wait_for(stop.wait(), cfg.get("lifetime", 3600))
    except TimeoutError:
        pass
    finally:
        server.close()


async def run_agent(cfg: dict[str, Any]) -> None:
    """Our agent's data plane: ``AgentDataPlane`` (WireGuard + stack) and its Forwarder."""
    from agent.device import AgentDataPlane, GatewayPeer
    from agent.forward import Forwarder
    from common.keys import KeyPair
    from common.protocol import parse_tunnel

    raise_fd_limit()
    loop = asyncio.get_running_loop()
    device = AgentDataPlane(KeyPair.from_private(base64.b64decode(cfg["private_key"])))
    await device.start()
    gateway = GatewayPeer(
        "gw",
        "gateway",
        cfg["gateway_public"],
        (cfg["gateway_host"], cfg["gateway_port"]),
        (f"{cfg['gateway_ip']}/32",),
    )
    device.apply(cfg["address"], [gateway])
    tunnel = device.tunnel
    server = await tunnel.start_server(serve, cfg["port"])
    forwarder = Forwarder(tunnel, http_port=cfg["http_port"])
    forwarder.update(
        [
            parse_tunnel(
                {
                    "id": "bench-forward",
                    "protocol": "tcp",
                    "publicPort": cfg["forward_port"],
                    "target": cfg["forward_target"],
                    "agentId": "bench-agent",
                    "agentIp": cfg["address"],
                    "enabled": True,
                }
            )
        ]
    )
    await forwarder.start()
    await forwarder.wait_reconciled()

    def on_line(line: str) -> None:
        if line == "stats":
            stack = tunnel.stack
            emit(
                counters=dict(stack.counters),
                connections=stack.connection_count,
                unroutable=tunnel.link.unroutable,
            )

    stop = _stop_on_stdin_eof(loop, on_line)
    try:
        deadline = loop.time() + 20
        while not any(s.handshake_age is not None for s in tunnel.stats()):
            if loop.time() > deadline:
                emit(ready=False, error="no WireGuard handshake with the gateway within 20 s")
                return
            await asyncio.sleep(0.05)
        emit(ready=True, pid=os.getpid(), udp_port=tunnel.port)
        await asyncio.wait_for(stop.wait(), cfg.get("lifetime", 3600))
    except TimeoutError:
        pass
    finally:
        server.close()
        await forwarder.close()
        device.close()


# ---------------------------------------------------------------------- clients (in G)


def _connect(host: str, port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload(host: str, port: int, size: int) -> dict[str, Any]:
    """One stream gateway → agent: ``size`` bytes into the sink, timed until it counted."""
    with _connect(host, port) as sock:
        sock.sendall(b"sink\n")
        chunk = memoryview(bytes(1 << 20))
        start = time.perf_counter()
        left = size
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 64:
            data = sock.recv(64)
            if not data:
                break
            reply += data
        elapsed = time.perf_counter() - start
    received = int(reply) if reply.strip() else -1
    return {"bytes": size, "received": received, "seconds": elapsed}


def download(host: str, port: int, size: int) -> dict[str, Any]:
    """One stream agent → gateway: the source sends ``size`` bytes, timed until EOF."""
    with _connect(host, port) as sock:
        buffer = bytearray(1 << 20)
        sock.sendall(f"source {size}\n".encode())
        start = time.perf_counter()
        total = 0
        while total <= size:  # bounded: the count, EOF, or the socket timeout
            n = sock.recv_into(buffer)
            if not n:
                break
            total += n
        elapsed = time.perf_counter() - start
    return {"bytes": size, "received": total, "seconds": elapsed}


def round_trips(host: str, port: int, count: int, size: int, warmup: int) -> dict[str, Any]:
    """``count`` request/response round trips of ``size`` bytes on one connection."""
    samples: list[int] = []
    message = bytes(range(256))[:size].ljust(size, b"x")
    with _connect(host, port) as sock:
        sock.sendall(b"echo\n")
        clock = time.perf_counter_ns
        for i in range(warmup + count):
            start = clock()
            sock.sendall(message)
            got = bytearray()
            while len(got) < size:
                data = sock.recv(size - len(got))
                if not data:
                    raise ConnectionError("echo closed early")
                got += data
            took = clock() - start
            if got != message:
                raise AssertionError("echo returned other bytes")
            if i >= warmup:
                samples.append(took)
    samples.sort()
    return {
        "count": len(samples),
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[min(len(samples) - 1, len(samples) * 99 // 100)] / 1000,
        "min_us": samples[0] / 1000,
        "max_us": samples[-1] / 1000,
    }


async def many_connections(host: str, port: int, count: int, timeout: float) -> None:
    """``count`` connections opened at once, each does one echo exchange, all held open
    until a line arrives on stdin (the parent reads the agent's memory meanwhile)."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    connect_times: list[float] = []

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        began = time.perf_counter()
        pair = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        connect_times.append(time.perf_counter() - began)
        return pair

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    established = time.perf_counter() - start
    open_pairs = [r for r in results if not isinstance(r, BaseException)]
    errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})

    async def exchange(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        payload = i.to_bytes(16, "big")
        writer.write(b"echo\n" + payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(16), timeout) == payload

    start = time.perf_counter()
    exchanged = await asyncio.gather(
        *(exchange(i, r, w) for i, (r, w) in enumerate(open_pairs)), return_exceptions=True
    )
    exchange_seconds = time.perf_counter() - start
    connect_times.sort()
    emit(
        held=True,
        requested=count,
        established=len(open_pairs),
        exchanged=sum(1 for e in exchanged if e is True),
        establish_seconds=established,
        exchange_seconds=exchange_seconds,
        connect_p50_ms=connect_times[len(connect_times) // 2] * 1000 if connect_times else None,
        connect_max_ms=connect_times[-1] * 1000 if connect_times else None,
        errors=errors,
    )
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), 120)
    for _, writer in open_pairs:
        writer.close()
    await asyncio.sleep(0.2)
    emit(closed=True)


def probe(host: str, port: int, within: float) -> dict[str, Any]:
    """Wait until an echo round trip works (the tunnel is up end to end)."""
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        try:
            with _connect(host, port, timeout=2) as sock:
                sock.sendall(b"echo\nping")
                if sock.recv(4) == b"ping":
                    return {"ok": True}
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    return {"ok": False, "error": last}


def run_client(job: dict[str, Any]) -> None:
    kind, host, port = job["job"], job["host"], job["port"]
    if kind == "upload":
        emit(**upload(host, port, job["size"]))
    elif kind == "download":
        emit(**download(host, port, job["size"]))
    elif kind == "rtt":
        emit(**round_trips(host, port, job["count"], job["size"], job["warmup"]))
    elif kind == "conns":
        asyncio.run(many_connections(host, port, job["count"], job["timeout"]))
    elif kind == "probe":
        emit(**probe(host, port, job["within"]))
    else:
        raise SystemExit(f"unknown job {kind!r}")


# ---------------------------------------------------------------------- the topology


def sh(*argv: str, input_text: str | None = None, check: bool = True) -> str:
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, input=input_text, timeout=30
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def proc_stat(pid: int) -> tuple[int, float]:
    """(VmRSS in KiB, CPU seconds used) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class Child:
    """A process in a namespace, speaking JSON lines on stdout (and read on stdin)."""

    def __init__(self, ns: str, *argv: str, stdin: bool = True) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            cwd=REPO,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    @classmethod
    def python(cls, ns: str, role: str, cfg: dict[str, Any]) -> Child:
        return cls(ns, sys.executable, "-m", "bench.agentbench", role, json.dumps(cfg))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self._stderr) < 200:
                self._stderr.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` execs the program: same pid

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no answer within {timeout} s from {' '.join(self.argv[:4])}; "
                f"exit={self.proc.poll()} stderr={''.join(self._stderr)[-2000:]}"
            ) from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


@dataclass
class Topology:
    """Namespaces G, A and B with wireguard-go, the servers and the agent (module doc)."""

    tag: str = "kab"
    names: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    agent: Child | None = None
    priv_server: Child | None = None
    local_app: Child | None = None
    gw_wg: Child | None = None
    priv_wg: Child | None = None

    def __post_init__(self) -> None:
        from tests.support import unique_name

        for key, prefix in {
            "g": "g", "a": "a", "b": "b", "wg_g": "wg", "wg_a": "wa",
            "veth_ga": "ga", "veth_ag": "ag", "veth_gb": "gb", "veth_bg": "bg",
        }.items():  # fmt: skip
            self.names[key] = unique_name(self.tag + prefix)

    @property
    def ns_g(self) -> str:
        return self.names["g"]

    # -- set-up

    def up(self) -> None:
        from common.keys import KeyPair

        n = self.names
        for ns in (n["g"], n["a"], n["b"]):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for g_dev, o_dev, other, (g_ip, o_ip) in (
            (n["veth_ga"], n["veth_ag"], n["a"], VETH_A),
            (n["veth_gb"], n["veth_bg"], n["b"], VETH_B),
        ):
            sh("ip", "link", "add", g_dev, "netns", n["g"], "type", "veth",
               "peer", "name", o_dev, "netns", other)  # fmt: skip
            for ns, dev, ip in ((n["g"], g_dev, g_ip), (other, o_dev, o_ip)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        gw_keys, priv_keys, our_keys = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
        self.gw_wg = self._wireguard_go(n["g"], n["wg_g"], gw_keys)
        sh("ip", "netns", "exec", n["g"], "wg", "set", n["wg_g"],
           "peer", priv_keys.public_b64, "allowed-ips", f"{PRIV_AGENT_IP}/32",
           "peer", our_keys.public_b64, "allowed-ips", f"{OUR_AGENT_IP}/32")  # fmt: skip
        for cidr in (f"{GW_PRIV_IP}/24", f"{GW_OURS_IP}/24"):
            sh("ip", "-n", n["g"], "addr", "add", cidr, "dev", n["wg_g"])
        sh("ip", "-n", n["g"], "link", "set", n["wg_g"], "up")
        # (a) the privileged agent: wireguard-go + kernel TCP, same keepalive as ours
        self.priv_wg = self._wireguard_go(n["a"], n["wg_a"], priv_keys)
        sh("ip", "netns", "exec", n["a"], "wg", "set", n["wg_a"], "peer", gw_keys.public_b64,
           "endpoint", f"{VETH_A[0]}:{GW_PORT}", "allowed-ips", f"{GW_PRIV_IP}/32",
           "persistent-keepalive", "25")  # fmt: skip
        sh("ip", "-n", n["a"], "addr", "add", f"{PRIV_AGENT_IP}/24", "dev", n["wg_a"])
        sh("ip", "-n", n["a"], "link", "set", n["wg_a"], "up")
        self.priv_server = self._spawn(
            Child.python(n["a"], "server", {"host": PRIV_AGENT_IP, "port": APP_PORT})
        )
        assert self.priv_server.read(20).get("ready")
        # (b) our agent, and its Forwarder's local app
        self.local_app = self._spawn(
            Child.python(n["b"], "server", {"host": "127.0.0.1", "port": APP_PORT})
        )
        assert self.local_app.read(20).get("ready")
        self.agent = self._spawn(
            Child.python(
                n["b"],
                "agent",
                {
                    "private_key": our_keys.private_b64,
                    "gateway_public": gw_keys.public_b64,
                    "gateway_host": VETH_B[0],
                    "gateway_port": GW_PORT,
                    "gateway_ip": GW_OURS_IP,
                    "address": OUR_AGENT_IP,
                    "port": APP_PORT,
                    "http_port": 80,
                    "forward_port": FORWARD_PORT,
                    "forward_target": f"127.0.0.1:{APP_PORT}",
                },
            )
        )
        ready = self.agent.read(30)
        assert ready.get("ready"), ready
        for host, port in (
            (PRIV_AGENT_IP, APP_PORT),
            (OUR_AGENT_IP, APP_PORT),
            (OUR_AGENT_IP, FORWARD_PORT),
        ):
            result = self.client({"job": "probe", "host": host, "port": port, "within": 20}, 30)
            assert result["ok"], (host, port, result)

    def _spawn(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def _wireguard_go(self, ns: str, ifname: str, keys: Any) -> Child:
        daemon = self._spawn(Child(ns, "wireguard-go", "-f", ifname, stdin=False))
        sock = Path(f"/var/run/wireguard/{ifname}.sock")
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.025)
        else:
            raise AssertionError(f"wireguard-go did not create {sock}")
        sh("ip", "netns", "exec", ns, "wg", "set", ifname, "listen-port", str(GW_PORT),
           "private-key", "/dev/stdin", input_text=keys.private_b64)  # fmt: skip
        return daemon

    # -- use

    def client(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one client job in G and return its JSON result."""
        child = Child.python(self.ns_g, "client", job)
        try:
            result = child.read(timeout)
            child.proc.wait(10)
            return result
        finally:
            child.stop()

    @contextlib.contextmanager
    def held_connections(self, job: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
        """The ``conns`` job: yields its report while its connections are still open."""
        child = Child.python(self.ns_g, "client", job)
        try:
            yield child.read(timeout)
            child.send("release")
            assert child.read(30).get("closed")
        finally:
            child.stop()

    def agent_stats(self) -> dict[str, Any]:
        assert self.agent is not None
        self.agent.send("stats")
        return self.agent.read(10)

    # -- tear-down

    def down(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        for ns in (self.names["g"], self.names["a"], self.names["b"]):
            pids = sh("ip", "netns", "pids", ns, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        for key in ("wg_g", "wg_a"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"/var/run/wireguard/{self.names[key]}.sock").unlink()


def main(argv: list[str]) -> None:
    role, cfg = argv[0], json.loads(argv[1])
    if role == "server":
        asyncio.run(run_server(cfg))
    elif role == "agent":
        profile = os.environ.get("KAKUREMICHI_AGENT_BENCH_PROFILE")
        if profile:  # cProfile the agent process; stats written when it exits
            import cProfile

            with cProfile.Profile() as profiler:
                asyncio.run(run_agent(cfg))
            profiler.dump_stats(profile)
        else:
            asyncio.run(run_agent(cfg))
    elif role == "client":
        run_client(cfg)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
