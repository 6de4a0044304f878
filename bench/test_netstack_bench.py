"""netstack benchmarks (pytest-benchmark).

* Cython vs pure-Python twin on the hot path (checksum of a full segment).
* Per-packet receive cost of the Stack on the established-state data path.
* Single-connection throughput kernel <-> our stack through a TUN device (both
  directions), next to kernel <-> kernel over a veth pair in the same run as the limit.
  The kernel side runs in a separate process inside the namespace (its own core).

Throughput numbers land in ``extra_info`` (Mbit/s) of each benchmark.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

import pytest

from netstack import _pure, speedups
from netstack import checksum as _checksum
from netstack.aio import AsyncStack
from netstack.ip import build_ipv4, pack_address
from netstack.stack import Stack
from netstack.tcpwire import ACK, SYN, TcpSegment, build_tcp
from netstack.tun import TunLink
from netstack.wireguard import _pure as _pure_wg
from netstack.wireguard.replay import ReplayFilter
from tests.netstack.nsutil import KERNEL_V4, STACK_V4, TunNamespace, run
from tests.support import need, need_root, unique_name

BYTES = int(os.environ.get("KAKUREMICHI_BENCH_BYTES", str(64 * 1024 * 1024)))

KERNEL_SENDER = """
import socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port))
chunk = b"k" * 65536
left = size
while left:
    n = s.send(chunk[: min(left, len(chunk))])
    left -= n
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""

KERNEL_SINK = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen()
print("ready", flush=True)
conn, _ = srv.accept()
total = 0
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    total += len(data)
print(total, flush=True)
"""


def _fast_module(name: str = "netstack._fast") -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        need(False, f"the Cython extension {name} is not built")
        raise


def test_checksum_pure_twin(benchmark: Any) -> None:
    data = random.Random(1).randbytes(1460)
    benchmark(_checksum.pure_checksum, data, 0x1234)


def test_checksum_cython(benchmark: Any) -> None:
    fast = _fast_module()
    data = random.Random(1).randbytes(1460)
    benchmark(fast.checksum, data, 0x1234)
    pure = min(_timeit(lambda: _checksum.pure_checksum(data, 0x1234)) for _ in range(3))
    cython = min(_timeit(lambda: fast.checksum(data, 0x1234)) for _ in range(3))
    benchmark.extra_info["speedup_vs_pure"] = round(pure / cython, 1)


def _timeit(func: Any, number: int = 20000) -> float:
    start = time.perf_counter()
    for _ in range(number):
        func()
    return (time.perf_counter() - start) / number


def _established_receiver() -> tuple[Stack, list[bytes]]:
    """A Stack with one connection and 2,000 in-order full-size data packets for it."""
    stack = Stack(["10.0.0.2"], mtu=1500, rng=random.Random(1))
    listener = stack.listen(80)
    src, dst = pack_address("10.0.0.1"), pack_address("10.0.0.2")
    syn = TcpSegment(40000, 80, 1000, 0, SYN, 65535, mss=1460, wscale=7, sack_permitted=True)
    stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(syn, src, dst)), 0.0)
    out = stack.packets_to_send(0.0)
    iss = int.from_bytes(out[0][24:28], "big")
    ack = TcpSegment(40000, 80, 1001, (iss + 1) & 0xFFFFFFFF, ACK, 5000)
    stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(ack, src, dst)), 0.0)
    stack.packets_to_send(0.0)
    stack.events()
    assert listener.accept() is not None
    payload = b"p" * 1460
    packets = []
    for i in range(2000):
        seg = TcpSegment(40000, 80, 1001 + i * 1460, (iss + 1) & 0xFFFFFFFF, ACK, 5000, payload)
        packets.append(build_ipv4(src, dst, 6, build_tcp(seg, src, dst)))
    return stack, packets


def _receive_all(stack: Stack, packets: list[bytes]) -> None:
    now = 1.0
    conn = next(iter(stack._conns.values()))
    for start in range(0, len(packets), 16):
        stack.receive_packets(packets[start : start + 16], now)
        stack.packets_to_send(now)
        conn.read()
        now += 0.0001


def _established_sender() -> tuple[Stack, Any, bytes, bytes, int]:
    """A Stack with one accepted connection (timestamps, SACK, window scaling on)."""
    stack = Stack(["10.0.0.2"], mtu=1500, rng=random.Random(1))
    listener = stack.listen(80)
    src, dst = pack_address("10.0.0.1"), pack_address("10.0.0.2")
    syn = TcpSegment(
        40000, 80, 1000, 0, SYN, 65535, mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0)
    )
    stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(syn, src, dst)), 0.0)
    iss = int.from_bytes(stack.packets_to_send(0.0)[0][24:28], "big")
    ack = TcpSegment(40000, 80, 1001, (iss + 1) & 0xFFFFFFFF, ACK, 65535, timestamp=(2, 0))
    stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(ack, src, dst)), 0.0)
    stack.packets_to_send(0.0)
    stack.events()
    conn = listener.accept()
    assert conn is not None
    return stack, conn, src, dst, iss


SEND_SEGMENTS = 4000


def _send_all(stack: Stack, conn: Any, src: bytes, dst: bytes, iss: int) -> int:
    """Bulk data out of the stack, every burst acknowledged at once (the peer's ACKs
    are built outside the timed region's hot loop only as one packet per burst)."""
    data = memoryview(bytes(64 * 1024))
    acked = iss + 1
    now = 0.001
    sent = 0
    tsval = 3
    while sent < SEND_SEGMENTS:
        while conn.send_buffer_space >= len(data):
            conn.send(data)
        out = stack.packets_to_send(now)
        sent += len(out)
        for packet in out:
            acked += len(packet) - 52  # IPv4 + TCP with the timestamp option
        reply = TcpSegment(40000, 80, 1001, acked & 0xFFFFFFFF, ACK, 65535, timestamp=(tsval, 0))
        tsval += 1
        stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(reply, src, dst)), now)
        now += 0.0001
    return sent


def per_packet_round() -> dict[str, float]:
    """Microseconds per packet, receive and send, for the implementation in use (one
    round; a child with ``KAKUREMICHI_NETSTACK_PURE=1`` measures the twin)."""
    stack, packets = _established_receiver()
    start = time.perf_counter()
    _receive_all(stack, packets)
    receive = (time.perf_counter() - start) / len(packets)
    sender = _established_sender()
    start = time.perf_counter()
    count = _send_all(*sender)
    send = (time.perf_counter() - start) / count
    return {"receive_us": receive * 1e6, "send_us": send * 1e6}


_ROUND_SERVER = """
import json, sys
import bench.test_netstack_bench as b
for _ in sys.stdin:
    print(json.dumps(b.per_packet_round()), flush=True)
"""


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def cython_vs_twin(rounds: int) -> dict[str, float]:
    """Per-packet costs of the Cython hot path and of its pure twin, each in a child
    process of its own, measured in alternating rounds (the first to run alternates
    too) so that the shared machine's drifting speed hits both alike.  The speed-ups
    are the medians of the per-round ratios."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("KAKUREMICHI_NETSTACK_PURE", None)
    children = {
        name: subprocess.Popen(
            [sys.executable, "-c", _ROUND_SERVER],
            env=env if name == "cython" else {**env, "KAKUREMICHI_NETSTACK_PURE": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("cython", "pure")
    }
    results: dict[str, list[dict[str, float]]] = {"cython": [], "pure": []}
    try:
        for index in range(rounds + 1):  # round 0 warms both up and is not counted
            order = ("cython", "pure") if index % 2 else ("pure", "cython")
            for name in order:
                child = children[name]
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                line = child.stdout.readline()
                if not line:
                    raise RuntimeError(f"the {name} child exited")
                if index:
                    results[name].append(json.loads(line))
    finally:
        for child in children.values():
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=60)
            if child.stdout is not None:
                child.stdout.close()
    summary: dict[str, float] = {"rounds": rounds}
    for what in ("receive", "send"):
        key = f"{what}_us"
        ours = [r[key] for r in results["cython"]]
        twin = [r[key] for r in results["pure"]]
        summary[f"cython_{key}"] = round(_median(ours), 2)
        summary[f"pure_{key}"] = round(_median(twin), 2)
        summary[f"{what}_speedup"] = round(
            _median([t / o for t, o in zip(twin, ours, strict=True)]), 2
        )
    return summary


def test_per_packet_receive_cost(benchmark: Any) -> None:
    """Feed in-order data in bursts of 16 (one ACK per burst, as a TUN read batch)."""

    def setup() -> tuple[tuple[Stack, list[bytes]], dict[str, Any]]:
        return _established_receiver(), {}

    benchmark.pedantic(_receive_all, setup=setup, rounds=5)
    if benchmark.stats is not None:  # None under --benchmark-disable (one plain run)
        per_packet = benchmark.stats.stats.median / 2000
        benchmark.extra_info["per_packet_us"] = round(per_packet * 1e6, 2)


def test_per_packet_cost_cython_vs_pure_twin(benchmark: Any) -> None:
    """The whole per-packet path (parse, TCP, build) with the Cython hot path next to
    the pure-Python twin, in alternating rounds of two child processes in the same run
    (``KAKUREMICHI_BENCH_ROUNDS``, default 15; 2 under --benchmark-disable)."""
    _fast_module()
    if speedups.IMPLEMENTATION != "cython":
        need(False, "KAKUREMICHI_NETSTACK_PURE=1 is set: nothing to compare against")
    benchmark.pedantic(per_packet_round, rounds=1)
    rounds = 2 if benchmark.disabled else int(os.environ.get("KAKUREMICHI_BENCH_ROUNDS", "15"))
    summary = cython_vs_twin(rounds)
    benchmark.extra_info.update(summary)
    print(f"\nper packet: {summary}")
    assert summary["cython_receive_us"] > 0 and summary["pure_send_us"] > 0


@pytest.mark.parametrize("which", ["parse_tcp_packet", "build_tcp_packet", "open_run"])
def test_hot_function_cython_vs_pure_twin(benchmark: Any, which: str) -> None:
    """Each hot-path function next to its twin on a full-size segment."""
    fast = _fast_module()
    compiled, twin_module = fast, _pure  # WireGuard's run: its own pair of modules
    segment = TcpSegment(
        40000, 80, 1, 2, ACK, 5000, bytes(1448), timestamp=(5, 6), sack_blocks=((9, 10),)
    )
    src, dst = pack_address("10.0.0.1"), pack_address("10.0.0.2")
    packet = fast.build_tcp_packet(segment, src, dst)
    if which == "parse_tcp_packet":
        calls = [lambda m: m.parse_tcp_packet(packet, TcpSegment)]
    elif which == "build_tcp_packet":
        calls = [lambda m: m.build_tcp_packet(segment, src, dst)]
    else:
        compiled, twin_module = _fast_module("netstack.wireguard._fast"), _pure_wg
        key = bytes(range(32))
        messages = [
            (compiled.TransportCipher(key).seal(7, n, packet, 1420), ("192.0.2.1", 1))
            for n in range(64)
        ]

        def run(m: Any) -> None:
            replay = ReplayFilter()
            m.open_run(
                messages,
                0,
                m.TransportCipher(key),
                replay,
                7,
                ("192.0.2.1", 1),
                None,
                {src: None},
                lambda _s: None,
                [],
                2**60,
            )

        calls = [run]
    call = calls[0]
    benchmark(call, compiled)
    twin = min(_timeit(lambda: call(twin_module), 300) for _ in range(3))
    cython = min(_timeit(lambda: call(compiled), 300) for _ in range(3))
    benchmark.extra_info["speedup_vs_pure"] = round(twin / cython, 1)


async def _stack_receives_from_kernel(ns: TunNamespace, size: int) -> float:
    link = TunLink(ns.fd)
    astack = AsyncStack(Stack([STACK_V4], mtu=1500, rng=random.Random(3)), link)
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        done.set_result(total)
        writer.close()

    try:
        await astack.start_server(sink, 5001)
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            ns.ns,
            sys.executable,
            "-c",
            KERNEL_SENDER,
            STACK_V4,
            "5001",
            str(size),
        )
        total = await asyncio.wait_for(done, 300)
        elapsed = time.perf_counter() - start
        await asyncio.wait_for(proc.wait(), 30)
        assert total == size
        return size * 8 / elapsed / 1e6
    finally:
        astack.close()
        link.detach()


async def _stack_sends_to_kernel(ns: TunNamespace, size: int) -> float:
    link = TunLink(ns.fd)
    astack = AsyncStack(Stack([STACK_V4], mtu=1500, rng=random.Random(4)), link)
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns.ns,
        sys.executable,
        "-c",
        KERNEL_SINK,
        KERNEL_V4,
        "5002",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(b"ready")
        start = time.perf_counter()
        _, writer = await astack.open_connection(KERNEL_V4, 5002, timeout=10)
        chunk = b"s" * (1 << 20)
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        total = int(await asyncio.wait_for(proc.stdout.readline(), 300))
        elapsed = time.perf_counter() - start
        writer.close()
        assert total == size // len(chunk) * len(chunk)
        return total * 8 / elapsed / 1e6
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        astack.close()
        link.detach()


@pytest.mark.root
@pytest.mark.parametrize("direction", ["kernel_to_stack", "stack_to_kernel"])
def test_throughput_over_tun(benchmark: Any, direction: str) -> None:
    need_root()
    ns = TunNamespace(3)
    results: list[float] = []
    try:
        func = (
            _stack_receives_from_kernel
            if direction == "kernel_to_stack"
            else (_stack_sends_to_kernel)
        )

        def once() -> None:
            results.append(asyncio.run(func(ns, BYTES)))

        benchmark.pedantic(once, rounds=3)
    finally:
        ns.close()
    results.sort()
    benchmark.extra_info["mbit_per_s_median"] = round(results[len(results) // 2], 1)
    benchmark.extra_info["bytes"] = BYTES


@pytest.mark.root
def test_throughput_kernel_to_kernel_veth(benchmark: Any) -> None:
    """The limit: the same transfer between two kernel stacks over a veth pair."""
    need_root()
    ns_a, ns_b = unique_name("nsva", 0), unique_name("nsvb", 0)
    veth_a, veth_b = unique_name("va", 0), unique_name("vb", 0)
    results: list[float] = []
    run("ip", "netns", "add", ns_a)
    try:
        run("ip", "netns", "add", ns_b)
        run(
            "ip",
            "link",
            "add",
            veth_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            ns_b,
        )
        for ns, dev, addr in ((ns_a, veth_a, "10.78.0.1/24"), (ns_b, veth_b, "10.78.0.2/24")):
            run("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
            run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")

        def once() -> None:
            sink = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns_b,
                    sys.executable,
                    "-c",
                    KERNEL_SINK,
                    "10.78.0.2",
                    "5003",
                ],
                stdout=subprocess.PIPE,
            )
            try:
                assert sink.stdout is not None
                assert sink.stdout.readline().startswith(b"ready")
                start = time.perf_counter()
                subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns_a,
                        sys.executable,
                        "-c",
                        KERNEL_SENDER,
                        "10.78.0.2",
                        "5003",
                        str(BYTES),
                    ],
                    check=True,
                    timeout=300,
                )
                total = int(sink.stdout.readline())
                results.append(total * 8 / (time.perf_counter() - start) / 1e6)
            finally:
                sink.kill()
                sink.wait()
                if sink.stdout is not None:
                    sink.stdout.close()

        benchmark.pedantic(once, rounds=3)
    finally:
        subprocess.run(["ip", "netns", "del", ns_a], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", ns_b], capture_output=True, timeout=20)
    results.sort()
    benchmark.extra_info["mbit_per_s_median"] = round(results[len(results) // 2], 1)
