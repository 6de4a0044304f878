"""Harness for ``bench/test_agent_bench.py``: the agent's data plane beside the privileged
path, over real WireGuard (wireguard-go) in network namespaces.

Topology (created by :class:`Topology`, always torn down by it)::

    ns G "gateway": wireguard-go 10.77.0.1/24 + 10.78.0.1/24 + 10.80.0.1/24 +
    │                10.79.0.1/24 (one peer per agent, as a real gateway holds one
    │                address per agent subnet); the bench clients; the relays
    ├── veth 172.31.1.0/24 ── ns A "privileged agent": wireguard-go 10.77.0.100 +
    │                          kernel TCP, an asyncio server on :5201 (the namespace's
    │                          congestion control) and on :5202 (CUBIC, TCP_CONGESTION)
    ├── veth 172.31.2.0/24 ── ns B "our agent": one process running the agent's own
    │                          data plane (``agent.device.AgentDataPlane``: our WireGuard +
    │                          our TCP/IP stack on one UDP socket, sending with CUBIC)
    │                          holding 10.78.0.100,
    │                          the same asyncio server on the stack's :5201, and a
    │                          ``agent.forward.Forwarder`` raw TCP tunnel :5301 →
    │                          127.0.0.1:5201 (a kernel server process in B, the
    │                          "local app"), i.e. the agent's full forwarding path;
    │                          a second agent process, ``--congestion bbr``, 10.80.0.100
    └── veth 172.31.3.0/24 ── ns C "mitmproxy_rs": Rust boringtun + smoltcp
                               (``mitmproxy_rs.wireguard``) as 10.79.0.100, the same
                               bench application on its streams (the gateway dials it)

The relays: one seeded user-space UDP impairment relay per agent, in G, between the
agent's WireGuard and the gateway's (the kernel has no netem here).  Each is one
process, a thread per direction, dropping a seeded share of the datagrams and
delaying the rest (``set`` on its stdin); WireGuard roams to it and back when an
agent's endpoint is switched (``Topology.through_relays``).  A loss each way of p
drops a datagram of any kind (data, ACKs, handshakes) with probability p.

Everything runs as a separate process under ``ip netns exec`` (wireguard-go, the
servers, the agents, the relays and the gateway-side clients), so each has its own
interpreter and can use its own core.  Usage of the roles::

    python -m bench.agentbench server '{"host": ..., "port": ...}'  # kernel TCP
    python -m bench.agentbench agent  '{...}'                         # our stack
    python -m bench.agentbench mitm   '{...}'                         # mitmproxy_rs
    python -m bench.agentbench relay  '{"listen": ..., "peer": ..., "target": ...}'
    python -m bench.agentbench client '{"job": "upload" | "download" | "rtt" | "conns" | "probe", ...}'

The servers speak one line of command first: ``sink`` (count bytes until EOF, answer
the count), ``source N`` (send N bytes, then FIN) or ``echo``.  Servers and the agent
print one JSON line when ready and exit when their stdin closes; clients print JSON
results.  Every loop is bounded by a byte count, a round count or a deadline.

Listen backlogs: the kernel servers ask for 4096; the agent's listeners take
``UserspaceTunnel.start_server``'s default (4096 too), as the agent's own ``Forwarder``
does.  ``KAKUREMICHI_AGENT_BENCH_PROFILE=FILE`` runs the agent processes under cProfile
and writes the stats to FILE (the BBR agent's to FILE.bbr) when they exit.
``KAKUREMICHI_AGENT_BENCH_TRACE=FILE`` has each agent write, every 10 ms, one JSON line
per busy TCP connection of its stack (window, bytes in flight, pacing rate, BBR's state
and model, recovery and retransmission counters) to FILE.cubic / FILE.bbr: how issue
20's rounds were read, e.g. a stall waiting for an RTO or a bandwidth estimate above
what the path delivers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import queue
import random
import resource
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]

GW_PORT = 51820
PRIV_NET, OURS_NET, BBR_NET, MITM_NET = "10.77.0", "10.78.0", "10.80.0", "10.79.0"
GW_PRIV_IP, PRIV_AGENT_IP = f"{PRIV_NET}.1", f"{PRIV_NET}.100"
GW_OURS_IP, OUR_AGENT_IP = f"{OURS_NET}.1", f"{OURS_NET}.100"
GW_BBR_IP, BBR_AGENT_IP = f"{BBR_NET}.1", f"{BBR_NET}.100"
GW_MITM_IP, MITM_AGENT_IP = f"{MITM_NET}.1", f"{MITM_NET}.100"
VETH_A = ("172.31.1.1", "172.31.1.2")  # G side, A side
VETH_B = ("172.31.2.1", "172.31.2.2")  # G side, B side
VETH_C = ("172.31.3.1", "172.31.3.2")  # G side, C side
OUR_WG_PORT, BBR_WG_PORT = 51820, 51821  # our two agents' UDP ports in B
APP_PORT = 5201  # the bench server, on the agent's address
CUBIC_APP_PORT, BBR_APP_PORT = 5202, 5203  # the privileged agent's, TCP_CONGESTION set
#: the relays' ports in G, one per agent (see ``Topology.relays``)
RELAY_PORTS = {"privileged": 51901, "agent": 51902, "agent_bbr": 51903, "mitmproxy_rs": 51904}
FORWARD_PORT = 5301  # the Forwarder's raw TCP tunnel → 127.0.0.1:APP_PORT in B
CHUNK = 256 * 1024
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux; not in the socket module


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 65536))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---------------------------------------------------------------------- the server app


class Reader(Protocol):
    async def readline(self) -> bytes: ...
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


async def serve(reader: Reader, writer: Writer) -> None:
    """The bench application, identical on kernel TCP, on our stack and on smoltcp."""
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
    congestion = cfg.get("congestion")
    if congestion:
        with socket.socket() as probe:
            try:
                probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
            except OSError as exc:
                emit(ready=False, error=f"TCP_CONGESTION {congestion}: {exc}")
                return

    async def serve_with(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if congestion:  # before any data: this connection's sender (Linux per socket)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        await serve(reader, writer)

    server = await asyncio.start_server(serve_with, cfg["host"], cfg["port"], backlog=4096)
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
    device = AgentDataPlane(
        KeyPair.from_private(base64.b64decode(cfg["private_key"])),
        port=cfg.get("wireguard_port", 0),
        congestion=cfg.get("congestion", "cubic"),
    )
    await device.start()

    def gateway(host: str, port: int) -> GatewayPeer:
        return GatewayPeer(
            "gw", "gateway", cfg["gateway_public"], (host, port), (f"{cfg['gateway_ip']}/32",)
        )

    device.apply(cfg["address"], [gateway(cfg["gateway_host"], cfg["gateway_port"])])
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
        command, _, argument = line.partition(" ")
        if command == "endpoint":  # the gateway's WireGuard through a relay, or direct
            host, _, port = argument.rpartition(":")
            device.apply(cfg["address"], [gateway(host, int(port))])
            emit(endpoint=argument)
        elif line == "stats":
            stack = tunnel.stack
            emit(
                counters=dict(stack.counters),
                connections=stack.connection_count,
                unroutable=tunnel.link.unroutable,
            )

    stop = _stop_on_stdin_eof(loop, on_line)
    trace = os.environ.get("KAKUREMICHI_AGENT_BENCH_TRACE")
    tracing = None
    if trace:
        path = f"{trace}.{cfg.get('congestion', 'cubic')}"
        tracing = loop.create_task(trace_connections(tunnel.stack, path))
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
        if tracing is not None:
            tracing.cancel()
        server.close()
        await forwarder.close()
        device.close()


async def trace_connections(stack: Any, path: str, interval: float = 0.01) -> None:
    """Every ``interval``, one JSON line per connection of ``stack`` that has sent
    more than 100 kB (``KAKUREMICHI_AGENT_BENCH_TRACE``; runs until cancelled)."""
    from netstack.bbr import Bbr

    loop = asyncio.get_running_loop()
    start = loop.time()
    with open(path, "w", encoding="utf-8") as out:
        while True:
            await asyncio.sleep(interval)
            for conn in list(stack._conns.values()):
                if conn._snd_max < 100_000:
                    continue
                cc = conn._cc
                record = {
                    "t": round(loop.time() - start, 4),
                    "port": conn.remote_port,
                    "snd_una": conn._snd_una,
                    "cwnd": conn._cwnd,
                    "in_flight": conn._snd_nxt - conn._snd_una,
                    "pacing_mbit": round(conn._pace_rate * 8e-6, 1),
                    "srtt_ms": round((conn._srtt or 0.0) * 1e3, 2),
                    "sack_ranges": len(conn._sacked),
                    "in_recovery": conn._in_recovery,
                    "recoveries": conn.stats_recoveries,
                    "retransmitted": conn.stats_retransmitted,
                    "tlp": conn.stats_tlp,
                    "rto": conn.stats_rto,
                    "undo": conn.stats_undo,
                }
                if isinstance(cc, Bbr):
                    record.update(
                        bbr_state=cc.state,
                        btl_bw_mbit=round(cc.btl_bw * 8e-6, 1),
                        min_rtt_ms=round(cc.min_rtt * 1e3, 3),
                        pacing_gain=round(cc.pacing_gain, 2),
                    )
                out.write(json.dumps(record) + "\n")
            out.flush()


class MitmStream:
    """A ``mitmproxy_rs`` stream with the asyncio stream methods ``serve`` uses."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    async def readline(self) -> bytes:
        while b"\n" not in self.buffer and len(self.buffer) < 65536:
            data = await self.stream.read(65536)
            if not data:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += data
        line, newline, self.buffer = self.buffer.partition(b"\n")
        return line + newline

    async def read(self, n: int = -1) -> bytes:
        if self.buffer:
            data = self.buffer if n < 0 else self.buffer[:n]
            self.buffer = self.buffer[len(data) :]
            return data
        return bytes(await self.stream.read(65536 if n < 0 else n))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.stream.write(bytes(data))

    async def drain(self) -> None:
        await self.stream.drain()

    def close(self) -> None:
        self.stream.close()


async def run_mitm(cfg: dict[str, Any]) -> None:
    """mitmproxy_rs's WireGuard server (Rust boringtun + smoltcp): a peer of the gateway's
    wireguard-go whose every tunnelled TCP connection the bench application answers."""
    from mitmproxy_rs import wireguard

    async def handle_tcp(stream: Any) -> None:
        adapter = MitmStream(stream)
        try:
            await serve(adapter, adapter)
        except Exception:  # a stream smoltcp reset: the client reports it
            stream.close()

    async def handle_udp(stream: Any) -> None:
        stream.close()

    server = await wireguard.start_wireguard_server(
        cfg["host"], cfg["port"], cfg["private_key"], [cfg["peer_public"]], handle_tcp, handle_udp
    )
    stop = _stop_on_stdin_eof(asyncio.get_running_loop())
    emit(ready=True, pid=os.getpid())
    try:
        await asyncio.wait_for(stop.wait(), cfg.get("lifetime", 3600))
    except TimeoutError:
        pass
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Impairment:
    """What a relay does to each datagram, per direction (seeded)."""

    loss_to_target: float = 0.0  # datagrams from the near peer on to the target
    loss_to_peer: float = 0.0  # the answers, back to the near peer
    delay: float = 0.0  # seconds, each way
    seed: int = 0
    generation: int = 0


def relay_direction(
    src: socket.socket,
    dst: socket.socket,
    name: str,
    state: list[Impairment],
    counts: dict[str, int],
) -> None:
    """One direction of a relay: datagrams from ``src`` to ``dst``, dropped with the
    seeded probability and held for the delay (a FIFO: the delay is the same for all,
    so nothing is reordered).  Blocking receives while nothing waits, else select()
    until the next datagram is due."""
    generation = -1
    rng = random.Random()
    loss = delay = 0.0
    held: deque[tuple[float, bytes]] = deque()
    buffer = bytearray(65536)
    view = memoryview(buffer)
    clock = time.monotonic
    while True:
        current = state[0]
        if current.generation != generation:
            generation, delay = current.generation, current.delay
            loss = current.loss_to_target if name == "to_target" else current.loss_to_peer
            rng = random.Random(f"{current.seed}/{name}")
        if not held and delay <= 0:
            n = src.recv_into(buffer)
            if loss and rng.random() < loss:
                counts["dropped"] += 1
                continue
            counts["passed"] += 1
            with contextlib.suppress(OSError):  # the far end not listening (yet)
                dst.send(view[:n])
            continue
        timeout = max(0.0, held[0][0] - clock()) if held else 0.5
        readable, _, _ = select.select([src], [], [], timeout)
        if readable:
            for _ in range(256):  # what is queued now; bounded, then the due ones go
                try:
                    data = src.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if loss and rng.random() < loss:
                    counts["dropped"] += 1
                    continue
                held.append((clock() + delay, data))
        now = clock()
        while held and held[0][0] <= now:
            counts["passed"] += 1
            with contextlib.suppress(OSError):
                dst.send(held.popleft()[1])


def run_relay(cfg: dict[str, Any]) -> None:
    """A seeded UDP impairment relay: datagrams from ``peer`` arriving at ``listen`` go
    to ``target`` from a socket of their own, and the answers back to ``peer``.  Stdin:
    ``set {"loss": p, "delay": s, "seed": n}`` (each way; ``loss_to_target`` /
    ``loss_to_peer`` for one way), ``stats``."""

    def udp(bind: tuple[str, int], connect: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
            with contextlib.suppress(OSError):  # root: beyond rmem_max/wmem_max
                sock.setsockopt(socket.SOL_SOCKET, option, 8 << 20)
        sock.bind(bind)
        sock.connect(connect)
        return sock

    near = udp((cfg["listen"][0], cfg["listen"][1]), (cfg["peer"][0], cfg["peer"][1]))
    far = udp(("0.0.0.0", 0), (cfg["target"][0], cfg["target"][1]))
    state = [Impairment()]
    counts = {name: {"passed": 0, "dropped": 0} for name in ("to_target", "to_peer")}
    for src, dst, name in ((near, far, "to_target"), (far, near, "to_peer")):
        threading.Thread(
            target=relay_direction, args=(src, dst, name, state, counts[name]), daemon=True
        ).start()
    emit(ready=True, pid=os.getpid(), port=far.getsockname()[1])
    for line in sys.stdin:  # the threads end with the process
        command, _, argument = line.strip().partition(" ")
        if command == "set":
            values = json.loads(argument)
            both = float(values.get("loss", 0.0))
            state[0] = Impairment(
                float(values.get("loss_to_target", both)),
                float(values.get("loss_to_peer", both)),
                float(values.get("delay", 0.0)),
                int(values.get("seed", 0)),
                state[0].generation + 1,
            )
            emit(set=values)
        elif command == "stats":
            emit(counts=counts)


# ---------------------------------------------------------------------- clients (in G)


def _connect(host: str, port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload(host: str, port: int, size: int, cap: float | None = None) -> dict[str, Any]:
    """One stream gateway → agent: ``size`` bytes into the sink (fewer if ``cap`` seconds
    pass first), timed until the sink counted them."""
    with _connect(host, port) as sock:
        sock.settimeout(max(30.0, 2 * cap) if cap else 30.0)
        sock.sendall(b"sink\n")
        chunk = memoryview(bytes(1 << 16 if cap else 1 << 20))
        start = time.perf_counter()
        deadline = start + cap if cap else None
        left = size
        while left > 0 and (deadline is None or time.perf_counter() < deadline):
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        sent = size - left
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while not reply.endswith(b"\n") and len(reply) < 64:
                data = sock.recv(64)
                if not data:
                    break
                reply += data
        except TimeoutError:
            # the stream stalled: say how (the caller decides whether a row may stall)
            return {
                "bytes": sent,
                "received": -1,
                "seconds": time.perf_counter() - start,
                "capped": sent < size,
                "stalled": f"no count from the sink after {sent} bytes; {tcp_state(sock)}",
            }
        elapsed = time.perf_counter() - start
    received = int(reply) if reply.strip() else -1
    return {"bytes": sent, "received": received, "seconds": elapsed, "capped": sent < size}


_TCP_INFO = struct.Struct("8B24I")
_TCP_INFO_NAMES = [
    "rto",
    "ato",
    "snd_mss",
    "rcv_mss",
    "unacked",
    "sacked",
    "lost",
    "retrans",
    "fackets",
    "last_data_sent",
    "last_ack_sent",
    "last_data_recv",
    "last_ack_recv",
    "pmtu",
    "rcv_ssthresh",
    "rtt",
    "rttvar",
    "snd_ssthresh",
    "snd_cwnd",
    "advmss",
    "reordering",
    "rcv_rtt",
    "rcv_space",
    "total_retrans",
]


def tcp_state(sock: socket.socket) -> str:
    """What the kernel knows of a stuck connection: its state, the bytes still queued to
    send, and TCP_INFO's counters (for a failure message)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError as exc:
        return f"no TCP_INFO ({exc})"
    fields = _TCP_INFO.unpack(raw.ljust(_TCP_INFO.size, b"\0"))
    head = f"state={fields[0]} ca_state={fields[1]} retransmits={fields[2]} backoff={fields[4]}"
    rest = " ".join(f"{n}={v}" for n, v in zip(_TCP_INFO_NAMES, fields[8:], strict=True))
    return f"{head} queued={queued} {rest}"


def download(host: str, port: int, size: int, cap: float | None = None) -> dict[str, Any]:
    """One stream agent → gateway: the source sends ``size`` bytes, timed until EOF (or
    until ``cap`` seconds passed: then what arrived by then, and the connection reset)."""
    with _connect(host, port) as sock:
        buffer = bytearray(1 << 20)
        sock.sendall(f"source {size}\n".encode())
        start = time.perf_counter()
        deadline = start + cap if cap else None
        total = 0
        while total <= size:  # bounded: the count, EOF, the cap or the socket timeout
            if deadline is not None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                sock.settimeout(left)
            try:
                n = sock.recv_into(buffer)
            except TimeoutError:
                break
            if not n:
                break
            total += n
        elapsed = time.perf_counter() - start
        capped = total < size and deadline is not None and time.perf_counter() >= deadline
        if capped:  # no FIN wait: a reset ends the source's loop at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {
        "bytes": total if capped else size,
        "received": total,
        "seconds": elapsed,
        "capped": capped,
    }


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
        # the tail in bands: a probe or fast repair (10-100 ms), an RTO (beyond)
        "over_10ms": sum(1 for t in samples if t > 10_000_000),
        "over_100ms": sum(1 for t in samples if t > 100_000_000),
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
        emit(**upload(host, port, job["size"], job.get("cap")))
    elif kind == "download":
        emit(**download(host, port, job["size"], job.get("cap")))
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


def mitmproxy_rs_importable() -> bool:
    """mitmproxy_rs 0.10.x installs from PyPI on Python 3.11 (test extras); 0.11 does not."""
    try:
        import mitmproxy_rs.wireguard  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Topology:
    """Namespaces G, A, B and C with wireguard-go, the servers, our two agents,
    mitmproxy_rs and the relays (module doc)."""

    tag: str = "kab"
    names: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    agent: Child | None = None
    agent_bbr: Child | None = None
    mitm: Child | None = None
    priv_server: Child | None = None
    #: rows that could not be set up here, with the reason
    missing: dict[str, str] = field(default_factory=dict)
    local_app: Child | None = None
    gw_wg: Child | None = None
    priv_wg: Child | None = None
    relays: dict[str, Child] = field(default_factory=dict)
    #: each relay's port towards the gateway's WireGuard (or mitmproxy_rs), in G
    relay_far_ports: dict[str, int] = field(default_factory=dict)
    #: the paths' WireGuard goes through the relays (``through_relays``)
    relayed: bool = False
    keys: dict[str, Any] = field(default_factory=dict)
    #: the paths set up: name -> (address, port) the gateway dials
    paths: dict[str, tuple[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tests.support import unique_name

        for key, prefix in {
            "g": "g", "a": "a", "b": "b", "c": "c", "wg_g": "wg", "wg_a": "wa",
            "veth_ga": "ga", "veth_ag": "ag", "veth_gb": "gb", "veth_bg": "bg",
            "veth_gc": "gc", "veth_cg": "cg",
        }.items():  # fmt: skip
            self.names[key] = unique_name(self.tag + prefix)

    @property
    def ns_g(self) -> str:
        return self.names["g"]

    # -- set-up

    def up(self, with_mitm: bool = True) -> None:
        from common.keys import KeyPair

        n = self.names
        for ns in (n["g"], n["a"], n["b"], n["c"]):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for g_dev, o_dev, other, (g_ip, o_ip) in (
            (n["veth_ga"], n["veth_ag"], n["a"], VETH_A),
            (n["veth_gb"], n["veth_bg"], n["b"], VETH_B),
            (n["veth_gc"], n["veth_cg"], n["c"], VETH_C),
        ):
            sh("ip", "link", "add", g_dev, "netns", n["g"], "type", "veth",
               "peer", "name", o_dev, "netns", other)  # fmt: skip
            for ns, dev, ip in ((n["g"], g_dev, g_ip), (other, o_dev, o_ip)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        keys = self.keys
        for name in ("gateway", "privileged", "agent", "agent_bbr", "mitmproxy_rs"):
            keys[name] = KeyPair.generate()
        gw_keys = keys["gateway"]
        self.gw_wg = self._wireguard_go(n["g"], n["wg_g"], gw_keys)
        sh("ip", "netns", "exec", n["g"], "wg", "set", n["wg_g"],
           "peer", keys["privileged"].public_b64, "allowed-ips", f"{PRIV_AGENT_IP}/32",
           "peer", keys["agent"].public_b64, "allowed-ips", f"{OUR_AGENT_IP}/32",
           "peer", keys["agent_bbr"].public_b64, "allowed-ips", f"{BBR_AGENT_IP}/32",
           "peer", keys["mitmproxy_rs"].public_b64, "allowed-ips", f"{MITM_AGENT_IP}/32",
           "endpoint", f"{VETH_C[1]}:{GW_PORT}")  # fmt: skip
        for cidr in (f"{GW_PRIV_IP}/24", f"{GW_OURS_IP}/24", f"{GW_BBR_IP}/24", f"{GW_MITM_IP}/24"):
            sh("ip", "-n", n["g"], "addr", "add", cidr, "dev", n["wg_g"])
        sh("ip", "-n", n["g"], "link", "set", n["wg_g"], "up")
        # (a) the privileged agent: wireguard-go + kernel TCP, same keepalive as ours
        self.priv_wg = self._wireguard_go(n["a"], n["wg_a"], keys["privileged"])
        sh("ip", "netns", "exec", n["a"], "wg", "set", n["wg_a"], "peer", gw_keys.public_b64,
           "endpoint", f"{VETH_A[0]}:{GW_PORT}", "allowed-ips", f"{GW_PRIV_IP}/32",
           "persistent-keepalive", "25")  # fmt: skip
        sh("ip", "-n", n["a"], "addr", "add", f"{PRIV_AGENT_IP}/24", "dev", n["wg_a"])
        sh("ip", "-n", n["a"], "link", "set", n["wg_a"], "up")
        self.priv_server = self._ready(
            Child.python(n["a"], "server", {"host": PRIV_AGENT_IP, "port": APP_PORT})
        )
        self.paths["privileged"] = (PRIV_AGENT_IP, APP_PORT)
        # the same kernel with each congestion control explicitly (TCP_CONGESTION)
        for name, congestion, app_port in (
            ("privileged_cubic", "cubic", CUBIC_APP_PORT),
            ("privileged_bbr", "bbr", BBR_APP_PORT),
        ):
            server = Child.python(
                n["a"],
                "server",
                {"host": PRIV_AGENT_IP, "port": app_port, "congestion": congestion},
            )
            self.children.append(server)
            ready = server.read(30)
            if ready.get("ready"):
                self.paths[name] = (PRIV_AGENT_IP, app_port)
            else:  # a kernel without BBR: the row is left out, and said so
                self.missing[name] = ready.get("error", "did not start")
        # (b) our agents (CUBIC, the default, and BBR), and the Forwarder's local app
        self.local_app = self._ready(
            Child.python(n["b"], "server", {"host": "127.0.0.1", "port": APP_PORT})
        )
        self.agent = self._agent("agent", OUR_AGENT_IP, GW_OURS_IP, OUR_WG_PORT, "cubic")
        self.agent_bbr = self._agent("agent_bbr", BBR_AGENT_IP, GW_BBR_IP, BBR_WG_PORT, "bbr")
        self.paths["agent"] = (OUR_AGENT_IP, APP_PORT)
        self.paths["agent_bbr"] = (BBR_AGENT_IP, APP_PORT)
        self.paths["agent_forward"] = (OUR_AGENT_IP, FORWARD_PORT)
        # (c) mitmproxy_rs: Rust boringtun + smoltcp; the gateway initiates to it
        if with_mitm and mitmproxy_rs_importable():
            self.mitm = self._ready(
                Child.python(
                    n["c"],
                    "mitm",
                    {
                        "host": VETH_C[1],
                        "port": GW_PORT,
                        "private_key": keys["mitmproxy_rs"].private_b64,
                        "peer_public": gw_keys.public_b64,
                    },
                )
            )
            self.paths["mitmproxy_rs"] = (MITM_AGENT_IP, APP_PORT)
        elif with_mitm:
            self.missing["mitmproxy_rs"] = "mitmproxy_rs is not installed (the test extras)"
        # the relays, idle until ``through_relays``
        near = {
            "privileged": ((VETH_A[0], RELAY_PORTS["privileged"]), (VETH_A[1], GW_PORT)),
            "agent": ((VETH_B[0], RELAY_PORTS["agent"]), (VETH_B[1], OUR_WG_PORT)),
            "agent_bbr": ((VETH_B[0], RELAY_PORTS["agent_bbr"]), (VETH_B[1], BBR_WG_PORT)),
            "mitmproxy_rs": (("127.0.0.1", RELAY_PORTS["mitmproxy_rs"]), ("127.0.0.1", GW_PORT)),
        }
        far = {"mitmproxy_rs": (VETH_C[1], GW_PORT)}
        for name, (listen, peer) in near.items():
            if name == "mitmproxy_rs" and self.mitm is None:
                continue
            target = far.get(name, ("127.0.0.1", GW_PORT))
            relay = Child.python(
                n["g"], "relay", {"listen": listen, "peer": peer, "target": target}
            )
            self.children.append(relay)
            ready = relay.read(30)
            assert ready.get("ready"), (name, ready)
            self.relays[name] = relay
            self.relay_far_ports[name] = ready["port"]
        self.probe_all()

    def _ready(self, child: Child, timeout: float = 30) -> Child:
        self.children.append(child)
        ready = child.read(timeout)
        assert ready.get("ready"), (child.argv[:5], ready)
        return child

    def _agent(self, key: str, address: str, gateway_ip: str, port: int, congestion: str) -> Child:
        return self._ready(
            Child.python(
                self.names["b"],
                "agent",
                {
                    "private_key": self.keys[key].private_b64,
                    "gateway_public": self.keys["gateway"].public_b64,
                    "gateway_host": VETH_B[0],
                    "gateway_port": GW_PORT,
                    "gateway_ip": gateway_ip,
                    "address": address,
                    "port": APP_PORT,
                    "http_port": 80,
                    "forward_port": FORWARD_PORT,
                    "forward_target": f"127.0.0.1:{APP_PORT}",
                    "wireguard_port": port,
                    "congestion": congestion,
                },
            )
        )

    def probe_all(self, within: float = 20) -> None:
        for host, port in self.paths.values():
            job = {"job": "probe", "host": host, "port": port, "within": within}
            result = self.client(job, within + 10)
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

    # -- the relays

    def _route(self, relayed: bool) -> None:
        """Every agent's WireGuard through its relay, or direct again.  Both ends of each
        pair are told: WireGuard roams to wherever the last authenticated datagram came
        from, so an end still sending direct would pull the other back."""
        n, keys = self.names, self.keys
        far = self.relay_far_ports

        def gateway_peer(name: str, endpoint: str) -> None:
            sh("ip", "netns", "exec", n["g"], "wg", "set", n["wg_g"],
               "peer", keys[name].public_b64, "endpoint", endpoint)  # fmt: skip

        port = RELAY_PORTS["privileged"] if relayed else GW_PORT
        sh("ip", "netns", "exec", n["a"], "wg", "set", n["wg_a"],
           "peer", keys["gateway"].public_b64, "endpoint", f"{VETH_A[0]}:{port}")  # fmt: skip
        gateway_peer(
            "privileged", f"127.0.0.1:{far['privileged']}" if relayed else f"{VETH_A[1]}:{GW_PORT}"
        )
        for name, child, wg_port in (
            ("agent", self.agent, OUR_WG_PORT),
            ("agent_bbr", self.agent_bbr, BBR_WG_PORT),
        ):
            assert child is not None
            child.send(f"endpoint {VETH_B[0]}:{RELAY_PORTS[name] if relayed else GW_PORT}")
            assert child.read(10).get("endpoint"), name
            gateway_peer(name, f"127.0.0.1:{far[name]}" if relayed else f"{VETH_B[1]}:{wg_port}")
        if self.mitm is not None:  # mitmproxy_rs answers wherever the gateway's came from
            gateway_peer(
                "mitmproxy_rs",
                f"127.0.0.1:{RELAY_PORTS['mitmproxy_rs']}" if relayed else f"{VETH_C[1]}:{GW_PORT}",
            )
        self.relayed = relayed

    @contextlib.contextmanager
    def through_relays(self) -> Iterator[None]:
        """The paths through the relays (clean until ``impair``), then direct again."""
        self.impair(0.0, 0.0)
        self._route(True)
        try:
            self.probe_all()
            yield
        finally:
            self.impair(0.0, 0.0)
            time.sleep(0.2)  # what the relays still hold goes first (it would pull back)
            self._route(False)
            self.probe_all()

    def impair(
        self, loss: float, delay: float, seed: int = 20, *, answers_only: bool = False
    ) -> None:
        """Each relay drops ``loss`` of the datagrams each way (``answers_only``: only of
        those the agent sends) and delays the rest by ``delay`` seconds each way."""
        for name, child in self.relays.items():
            values: dict[str, float] = {"delay": delay, "seed": seed}
            if answers_only:  # the agent is the near peer, except for mitmproxy_rs's relay
                from_agent = "loss_to_peer" if name == "mitmproxy_rs" else "loss_to_target"
                values.update(loss_to_target=0.0, loss_to_peer=0.0)
                values[from_agent] = loss
            else:
                values["loss"] = loss
            child.send(f"set {json.dumps(values)}")
        for child in self.relays.values():
            assert "set" in child.read(10)

    def relay_counts(self) -> dict[str, Any]:
        counts = {}
        for name, child in self.relays.items():
            child.send("stats")
            counts[name] = child.read(10)["counts"]
        return counts

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

    def udp_buffer_drops(self) -> int:
        """Datagrams G's kernel dropped for full socket buffers (the relays' and the
        gateway's WireGuard's): loss beyond what the relays were told to cause."""
        snmp = sh("ip", "netns", "exec", self.ns_g, "cat", "/proc/net/snmp").splitlines()
        header, values = (line.split() for line in snmp if line.startswith("Udp:"))
        return int(dict(zip(header, values, strict=True))["RcvbufErrors"])

    def kernel_congestion(self) -> str:
        """The congestion control of the privileged agent's namespace (its :5201)."""
        return sh(
            "ip", "netns", "exec", self.names["a"],
            "cat", "/proc/sys/net/ipv4/tcp_congestion_control",
        ).strip()  # fmt: skip

    # -- tear-down

    def down(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        for ns in (self.names["g"], self.names["a"], self.names["b"], self.names["c"]):
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
        if profile and cfg.get("congestion", "cubic") != "cubic":
            profile += "." + cfg["congestion"]  # the BBR agent's, beside the default's
        if profile:  # cProfile the agent process; stats written when it exits
            import cProfile

            with cProfile.Profile() as profiler:
                asyncio.run(run_agent(cfg))
            profiler.dump_stats(profile)
        else:
            asyncio.run(run_agent(cfg))
    elif role == "client":
        run_client(cfg)
    elif role == "mitm":
        asyncio.run(run_mitm(cfg))
    elif role == "relay":
        run_relay(cfg)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
