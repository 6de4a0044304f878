"""Harness for ``bench/test_stream_bench.py``: the agent's data plane reaching a gateway
over UDP and over the stream transport (WireGuard in a WebSocket over TLS), in
network namespaces, with a real wireguard-go as the gateway's WireGuard.

Topology (created by :class:`StreamTopology`, always torn down by it)::

    ns G "gateway": wireguard-go 10.81.0.1/24 (the agent its one peer); the gateway's
    │               stream end (``gateway.wgstream.StreamAcceptor`` behind the real
    │               ``ProxyServer`` TLS listener on :8443, relaying to wireguard-go's
    │               UDP port); the bench clients (``bench.agentbench`` client jobs:
    │               kernel TCP through wireguard-go to the agent); and the userspace
    │               backend as a second gateway, 10.81.0.2 on UDP :51821 with its
    │               stream end on :8444 feeding its engine, running the same jobs
    │               through its own stack (paths ``user_udp`` and ``user_stream``)
    ├── veth 172.31.8.0/24 ───────────── ns A "agent": one process running our
    │                                     WireGuard + TCP/IP stack (``UserspaceTunnel``)
    └── TUN 10.99.0.1 ⇄ relay ⇄ TUN 10.99.0.2   as 10.81.0.100, the bench server on the
        (a process in G holding both TUN          stack's :5201, switching paths on
         devices, A's moved to A, dropping         command: ``udp`` and ``stream`` over the
         a seeded share of the packets)            veth, ``udp_lossy`` and ``stream_lossy``
                                                    through the relay

The relay is the outer path's packet loss (the kernel has no netem here): TCP below
the WebSocket sees it, retransmits, and the tunnelled TCP inside sees only delay.
Roles of this module::

    python -m bench.streambench edge  '{...}'    # in G: the gateway's stream end
    python -m bench.streambench agent '{...}'    # in A: the data plane; reads commands
    python -m bench.streambench relay '{...}'    # in G: the lossy TUN relay (both TUNs)
    python -m bench.streambench usergw '{...}'   # in G: the userspace gateway; runs jobs

Commands to the agent (one JSON line each, one JSON answer): ``{"path": name}`` moves
the gateway's datagrams to a path and waits until a round trip works on it;
``{"pings": true}`` returns the stream's WebSocket ping round trips since the last
ask (one ping every 50 ms while a stream is up) and its drop count.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agentbench import Child, _stop_on_stdin_eof, emit, serve, sh
from common import eventloop

APP_PORT = 5201
GW_PORT = 51820
HTTPS_PORT = 8443
GW_IP, AGENT_IP = "10.81.0.1", "10.81.0.100"
#: the userspace gateway (the rootless backend): our engine and stack in G
USER_GW_IP, USER_GW_PORT, USER_HTTPS_PORT = "10.81.0.2", 51821, 8444
VETH = ("172.31.8.1", "172.31.8.2")  # G side, A side
TUN = ("10.99.0.1", "10.99.0.2")  # G side, A side (through the relay)
PATHS = ("udp", "stream", "udp_lossy", "stream_lossy")
#: the same two ways to the userspace gateway (the engine fed from the stream directly)
USER_PATHS = ("user_udp", "user_stream")


def _endpoint(path: str) -> tuple[str, int]:
    if path.startswith("user_"):
        return (VETH[0], USER_GW_PORT)
    return (TUN[0] if path.endswith("_lossy") else VETH[0], GW_PORT)


# ---------------------------------------------------------------------- roles


async def run_edge(cfg: dict[str, Any]) -> None:
    """The gateway's stream end: TLS listener → StreamAcceptor → wireguard-go's port."""
    from common.relay.metrics import Metrics
    from common.relay.router import Router
    from gateway.proxy.http import ProxyServer
    from gateway.tls import CertificateStore
    from gateway.wgstream import StreamAcceptor, relay_binding

    metrics = Metrics()
    acceptor = StreamAcceptor(relay_binding(GW_PORT), metrics)
    proxy = ProxyServer(Router(), metrics=metrics)
    proxy.stream_acceptor = acceptor
    context = CertificateStore(Path(cfg["state"])).server_context()
    await proxy.start("0.0.0.0", HTTPS_PORT, context)
    stop = _stop_on_stdin_eof(asyncio.get_running_loop())
    emit(ready=True, pid=os.getpid())
    try:
        await stop.wait()
    finally:
        await proxy.close()
        await acceptor.close()


async def run_agent(cfg: dict[str, Any]) -> None:
    """Our data plane as the agent, on the path the parent asks for."""
    from common.wgstream import DatagramStream, open_stream
    from netstack.tunnel import UserspaceTunnel

    loop = asyncio.get_running_loop()
    tunnel = UserspaceTunnel(base64.b64decode(cfg["private_key"]), [AGENT_IP])
    await tunnel.start("0.0.0.0", 0)
    keys = {
        "wg": base64.b64decode(cfg["gateway_public"]),
        "user": base64.b64decode(cfg["user_gateway_public"]),
    }
    tunnel.set_peer(cfg["gateway_public"], [f"{GW_IP}/32"], _endpoint("udp"), 25)
    tunnel.set_peer(cfg["user_gateway_public"], [f"{USER_GW_IP}/32"], _endpoint("user_udp"), 25)
    server = await tunnel.start_server(serve, APP_PORT)
    udp = tunnel.udp
    assert udp is not None
    state: dict[str, Any] = {"stream": None, "endpoint": _endpoint("udp"), "pings": []}
    user: dict[str, Any] = {"stream": None, "endpoint": _endpoint("user_udp")}

    async def pinger() -> None:
        seen = 0
        while True:
            await asyncio.sleep(0.05)
            stream: DatagramStream | None = state["stream"]
            if stream is not None and stream.is_open:
                if stream.pongs != seen and stream.rtt is not None:
                    state["pings"].append(stream.rtt)
                seen = stream.pongs
                stream.ping_now()  # (none while the last one is out)

    async def use(path: str) -> dict[str, Any]:
        on_user = path.startswith("user_")
        held = user if on_user else state
        old: DatagramStream | None = held["stream"]
        udp.route(held["endpoint"], None)
        held["stream"] = None
        if old is not None:
            old.close("switching")
        endpoint = _endpoint(path)
        held["endpoint"] = endpoint
        if "stream" in path:
            stream = await open_stream(
                endpoint[0],
                USER_HTTPS_PORT if on_user else HTTPS_PORT,
                on_datagrams=lambda datagrams: udp.receive_routed(datagrams, endpoint),
                timeout=10,
            )
            held["stream"] = stream
            udp.route(endpoint, stream)
        key = keys["user" if on_user else "wg"]
        tunnel.device.set_peer(key, endpoint=endpoint)
        tunnel.device.initiate_handshake(key, udp.now(), force=True)
        udp.flush()
        target = USER_GW_IP if on_user else GW_IP
        # up when a round trip through the tunnel works on the new path: a SYN to a
        # closed port of the gateway's kernel, answered with a reset
        deadline = loop.time() + 20
        while loop.time() < deadline:
            try:
                _, writer = await tunnel.open_connection(target, APP_PORT + 1, timeout=2)
            except (ConnectionRefusedError, ConnectionResetError):
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        state["pings"] = []
        return {"path": path, "ok": loop.time() < deadline}

    queue: asyncio.Queue[str] = asyncio.Queue()
    stop = _stop_on_stdin_eof(loop, queue.put_nowait)
    ping_task = loop.create_task(pinger())
    emit(ready=True, pid=os.getpid())
    stopped = loop.create_task(stop.wait())
    try:
        while True:
            getter = loop.create_task(queue.get())
            await asyncio.wait({getter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            command = json.loads(getter.result())
            if "path" in command:
                emit(**await use(command["path"]))
            elif "pings" in command:
                stream = state["stream"]
                emit(
                    pings=state["pings"],
                    dropped=stream.dropped if stream is not None else 0,
                    rtt_min=stream.rtt_min if stream is not None else None,
                )
                state["pings"] = []
    finally:
        ping_task.cancel()
        server.close()
        for held in (state, user):
            if held["stream"] is not None:
                held["stream"].close("done")
        tunnel.close()


async def run_user_gateway(cfg: dict[str, Any]) -> None:
    """The gateway's ``userspace`` backend: our WireGuard and stack on a UDP socket, its
    stream end feeding the engine (``engine_binding``); the bench jobs run here, through
    this stack to the agent, as the gateway's proxy dials agents on this backend."""
    from common.relay.metrics import Metrics
    from common.relay.router import Router
    from gateway.proxy.http import ProxyServer
    from gateway.tls import CertificateStore
    from gateway.wgstream import StreamAcceptor, engine_binding
    from netstack.tunnel import UserspaceTunnel

    loop = asyncio.get_running_loop()
    tunnel = UserspaceTunnel(base64.b64decode(cfg["private_key"]), [USER_GW_IP])
    await tunnel.start("0.0.0.0", USER_GW_PORT)
    tunnel.set_peer(cfg["agent_public"], [f"{AGENT_IP}/32"])
    metrics = Metrics()
    acceptor = StreamAcceptor(engine_binding(lambda: tunnel.udp), metrics)
    proxy = ProxyServer(Router(), metrics=metrics)
    proxy.stream_acceptor = acceptor
    context = CertificateStore(Path(cfg["state"])).server_context()
    await proxy.start("0.0.0.0", USER_HTTPS_PORT, context)

    async def job(command: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await tunnel.open_connection(AGENT_IP, APP_PORT, timeout=10)
        try:
            return await _job_on_stream(command, reader, writer)
        finally:
            writer.close()

    queue: asyncio.Queue[str] = asyncio.Queue()
    stop = _stop_on_stdin_eof(loop, queue.put_nowait)
    stopped = loop.create_task(stop.wait())
    emit(ready=True, pid=os.getpid())
    try:
        while True:
            getter = loop.create_task(queue.get())
            await asyncio.wait({getter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            emit(**await job(json.loads(getter.result())))
    finally:
        await proxy.close()
        await acceptor.close()
        tunnel.close()


async def _job_on_stream(
    command: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> dict[str, Any]:
    """``bench.agentbench``'s client jobs (the same bench server protocol), on asyncio
    streams: ``upload`` (to the agent), ``download`` (from it), ``rtt``."""
    kind = command["job"]
    if kind == "upload":
        size = command["size"]
        chunk = bytes(256 * 1024)
        start = time.perf_counter()
        writer.write(b"sink\n")
        left = size
        while left > 0:
            writer.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
            await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.readline(), 120)
        return {"bytes": size, "received": int(reply or -1), "seconds": time.perf_counter() - start}
    if kind == "download":
        size = command["size"]
        writer.write(f"source {size}\n".encode())
        start = time.perf_counter()
        total = 0
        while total < size:
            data = await asyncio.wait_for(reader.read(1 << 20), 60)
            if not data:
                break
            total += len(data)
        return {"bytes": size, "received": total, "seconds": time.perf_counter() - start}
    if kind == "rtt":
        size, count, warmup = command["size"], command["count"], command["warmup"]
        message = bytes(range(256))[:size].ljust(size, b"x")
        writer.write(b"echo\n")
        samples: list[int] = []
        for i in range(warmup + count):
            began = time.perf_counter_ns()
            writer.write(message)
            got = await asyncio.wait_for(reader.readexactly(size), 10)
            took = time.perf_counter_ns() - began
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
    raise ValueError(f"unknown job {kind!r}")


async def run_relay(cfg: dict[str, Any]) -> None:
    """Two TUN devices joined packet by packet, a seeded share dropped each way."""
    from netstack.tun import TunLink, open_tun

    rng = random.Random(cfg["seed"])
    loss = float(cfg["loss"])
    fds = [open_tun(cfg["tun_g"]), open_tun(cfg["tun_a"])]
    links = [TunLink(fd, mtu=1500) for fd in fds]
    counts = {"passed": 0, "dropped": 0}

    def forward(to: TunLink) -> Any:
        def relay(packet: bytes) -> None:
            if rng.random() < loss:
                counts["dropped"] += 1
                return
            counts["passed"] += 1
            to.send(packet)

        return relay

    links[0].attach(forward(links[1]))
    links[1].attach(forward(links[0]))
    loop = asyncio.get_running_loop()
    stop = _stop_on_stdin_eof(loop, lambda line: emit(**counts))
    emit(ready=True, pid=os.getpid())
    try:
        await stop.wait()
    finally:
        for link in links:
            link.detach()
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------- the topology


def role(ns: str, name: str, cfg: dict[str, Any]) -> Child:
    """One of this module's roles as a process in ``ns``."""
    return Child(ns, sys.executable, "-m", "bench.streambench", name, json.dumps(cfg))


@dataclass
class StreamTopology:
    """Namespaces G and A, wireguard-go, the edge, the agent and the relay (module doc)."""

    loss: float = 0.01
    seed: int = 18
    tag: str = "ksb"
    names: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    agent: Child | None = None
    edge: Child | None = None
    user_gateway: Child | None = None
    relay: Child | None = None
    wg: Child | None = None

    def __post_init__(self) -> None:
        from tests.support import unique_name

        for key, prefix in {
            "g": "g", "a": "a", "wg": "w", "veth_g": "vg", "veth_a": "va", "tun_g": "tg",
            "tun_a": "ta",
        }.items():  # fmt: skip
            self.names[key] = unique_name(self.tag + prefix)

    @property
    def ns_g(self) -> str:
        return self.names["g"]

    def up(self, state: Path) -> None:
        from common.keys import KeyPair

        n = self.names
        for ns in (n["g"], n["a"]):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", n["veth_g"], "netns", n["g"], "type", "veth",
           "peer", "name", n["veth_a"], "netns", n["a"])  # fmt: skip
        for ns, dev, ip in ((n["g"], n["veth_g"], VETH[0]), (n["a"], n["veth_a"], VETH[1])):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # the lossy path: the relay opens both TUN devices, then they move in
        # (both are created in G by the relay there; A's then moves to A, its fd stays)
        relay_cfg = {"tun_g": n["tun_g"], "tun_a": n["tun_a"], "seed": self.seed, "loss": self.loss}
        self.relay = self._spawn(role(n["g"], "relay", relay_cfg))
        assert self.relay.read(20).get("ready")
        sh("ip", "-n", n["g"], "link", "set", n["tun_a"], "netns", n["a"])
        for ns, dev, ip in ((n["g"], n["tun_g"], TUN[0]), (n["a"], n["tun_a"], TUN[1])):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", "1500", "up")
        # the gateway's WireGuard: wireguard-go, the agent its peer
        gw_keys, agent_keys, user_keys = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
        self.wg = self._spawn(Child(n["g"], "wireguard-go", "-f", n["wg"], stdin=False))
        sock = Path(f"/var/run/wireguard/{n['wg']}.sock")
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.025)
        else:
            raise AssertionError(f"wireguard-go did not create {sock}")
        sh("ip", "netns", "exec", n["g"], "wg", "set", n["wg"], "listen-port", str(GW_PORT),
           "private-key", "/dev/stdin", input_text=gw_keys.private_b64)  # fmt: skip
        sh("ip", "netns", "exec", n["g"], "wg", "set", n["wg"], "peer", agent_keys.public_b64,
           "allowed-ips", f"{AGENT_IP}/32")  # fmt: skip
        sh("ip", "-n", n["g"], "addr", "add", f"{GW_IP}/24", "dev", n["wg"])
        sh("ip", "-n", n["g"], "link", "set", n["wg"], "up")
        self.edge = self._spawn(role(n["g"], "edge", {"state": str(state / "edge")}))
        assert self.edge.read(30).get("ready")
        user_cfg = {
            "state": str(state / "usergw"),
            "private_key": user_keys.private_b64,
            "agent_public": agent_keys.public_b64,
        }
        self.user_gateway = self._spawn(role(n["g"], "usergw", user_cfg))
        assert self.user_gateway.read(30).get("ready")
        agent_cfg = {
            "private_key": agent_keys.private_b64,
            "gateway_public": gw_keys.public_b64,
            "user_gateway_public": user_keys.public_b64,
        }
        self.agent = self._spawn(role(n["a"], "agent", agent_cfg))
        assert self.agent.read(30).get("ready")

    def _spawn(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def use(self, path: str) -> None:
        """Move the agent to ``path`` (returns once a round trip works there)."""
        assert self.agent is not None
        self.agent.send(json.dumps({"path": path}))
        answer = self.agent.read(60)
        assert answer == {"path": path, "ok": True}, answer

    def pings(self) -> dict[str, Any]:
        assert self.agent is not None
        self.agent.send(json.dumps({"pings": True}))
        return self.agent.read(10)

    def relay_counts(self) -> dict[str, Any]:
        assert self.relay is not None
        self.relay.send("counts")
        return self.relay.read(10)

    def job(self, path: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A bench job to the agent on ``path``: kernel TCP through wireguard-go, or
        through the userspace gateway's own stack for the ``user_`` paths."""
        if not path.startswith("user_"):
            return self.client(job, timeout)
        assert self.user_gateway is not None
        self.user_gateway.send(json.dumps(job))
        return self.user_gateway.read(timeout)

    def client(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A ``bench.agentbench`` client job in G, to the agent's bench server."""
        child = Child.python(self.ns_g, "client", {"host": AGENT_IP, "port": APP_PORT, **job})
        try:
            result = child.read(timeout)
            child.proc.wait(10)
            return result
        finally:
            child.stop()

    def start_client(self, job: dict[str, Any]) -> Child:
        return Child.python(self.ns_g, "client", {"host": AGENT_IP, "port": APP_PORT, **job})

    def down(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        for ns in (self.names["g"], self.names["a"]):
            pids = sh("ip", "netns", "pids", ns, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        with contextlib.suppress(FileNotFoundError):
            Path(f"/var/run/wireguard/{self.names['wg']}.sock").unlink()


def main(argv: list[str]) -> None:
    role, cfg = argv[0], json.loads(argv[1])
    runners = {
        "edge": run_edge,
        "agent": run_agent,
        "relay": run_relay,
        "usergw": run_user_gateway,
    }
    if role not in runners:
        raise SystemExit(f"unknown role {role!r}")
    # the programs' default loop (uvloop when importable), KAKUREMICHI_EVENT_LOOP to choose
    choice = os.environ.get("KAKUREMICHI_EVENT_LOOP", "auto")
    profile = os.environ.get("KAKUREMICHI_STREAM_BENCH_PROFILE")  # a prefix: one file a role
    with contextlib.ExitStack() as stack:
        if profile:
            import cProfile

            profiler = stack.enter_context(cProfile.Profile())
            stack.callback(profiler.dump_stats, f"{profile}.{role}")
        with asyncio.Runner(loop_factory=eventloop.loop_factory(choice)) as runner:
            runner.run(runners[role](cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
