"""Headline benchmark: the rootless agent's data plane next to the privileged path.

In one run, over real WireGuard with wireguard-go as the gateway (see
``bench/agentbench.py`` for the namespaces and processes):

* ``privileged`` (a): wireguard-go + kernel TCP on both ends;
* ``agent`` (b): wireguard-go ↔ our agent's data plane (``agent.device.AgentDataPlane``:
  our WireGuard and our TCP/IP stack on one UDP socket), the server on the stack;
* ``agent_forward``: (b) plus the agent's ``Forwarder`` raw TCP tunnel to a local kernel
  server, the complete path a tunnelled connection takes on an agent.

Measured: one TCP stream each way (Mbit/s, median of the rounds, paths interleaved),
64-byte request/response round trips (p50/p99 µs), 1,000 concurrent connections
(time to establish, one exchange each) and the agent's RSS while they are open.
Ratios are (b)/(a) for throughput (≥ 1.0 is the goal) and (b)/(a) of the latency (≤ 1.0
is the goal).  Nothing here asserts a speed; correctness is asserted (byte counts,
echoes, every connection).  Under ``--benchmark-disable`` (CI) everything runs once
with small sizes; with benchmarks enabled it uses the full sizes::

    pytest bench/test_agent_bench.py -s            # full run, prints the tables
    KAKUREMICHI_AGENT_BENCH_MB=200 pytest bench/test_agent_bench.py -s
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.agentbench import (
    APP_PORT,
    FORWARD_PORT,
    OUR_AGENT_IP,
    PRIV_AGENT_IP,
    Child,
    Topology,
    proc_stat,
)
from tests.support import need_binary, need_root

pytestmark = pytest.mark.root

#: path name → the address the gateway dials
PATHS: dict[str, tuple[str, int]] = {
    "privileged": (PRIV_AGENT_IP, APP_PORT),
    "agent": (OUR_AGENT_IP, APP_PORT),
    "agent_forward": (OUR_AGENT_IP, FORWARD_PORT),
}
MB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    stream_bytes: int
    rounds: int
    round_trips: int
    connections: int


FULL = Sizes(int(os.environ.get("KAKUREMICHI_AGENT_BENCH_MB", "100")) * MB, 3, 2000, 1000)
QUICK = Sizes(5 * MB, 1, 200, 100)  # --benchmark-disable: one quick pass (CI)


def _sizes(benchmark: Any) -> Sizes:
    return QUICK if benchmark.disabled else FULL


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    need_root()
    for program in ("wireguard-go", "wg", "ip"):
        need_binary(program)
    topo = Topology()
    try:
        topo.up()
        yield topo
    finally:
        topo.down()


def _agent_side(topo: Topology, path: str) -> list[Child]:
    """The processes doing the agent's work on a path (their CPU and memory)."""
    sides = {
        "privileged": [topo.priv_wg, topo.priv_server],
        "agent": [topo.agent],
        "agent_forward": [topo.agent, topo.local_app],
    }
    return [child for child in sides[path] if child is not None]


def _cpu(children: list[Child]) -> float:
    return sum(proc_stat(child.pid)[1] for child in children)


def _rss_kb(children: list[Child]) -> int:
    return sum(proc_stat(child.pid)[0] for child in children)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for row in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


@pytest.mark.parametrize("direction", ["gateway_to_agent", "agent_to_gateway"])
def test_stream_throughput(benchmark: Any, topology: Topology, direction: str) -> None:
    """One TCP stream, ``stream_bytes`` per round, the three paths interleaved."""
    sizes = _sizes(benchmark)
    job = "upload" if direction == "gateway_to_agent" else "download"
    mbit: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu: dict[str, list[float]] = {path: [] for path in PATHS}
    gateway_cpu: dict[str, list[float]] = {path: [] for path in PATHS}
    gateway_wg = topology.gw_wg
    assert gateway_wg is not None

    def measure() -> None:
        for _ in range(sizes.rounds):
            for path, (host, port) in PATHS.items():
                side = _agent_side(topology, path)
                cpu_before, gw_before = _cpu(side), _cpu([gateway_wg])
                result = topology.client(
                    {"job": job, "host": host, "port": port, "size": sizes.stream_bytes}, 300
                )
                assert result["received"] == sizes.stream_bytes, (path, result)
                seconds = result["seconds"]
                mbit[path].append(sizes.stream_bytes * 8 / seconds / 1e6)
                cpu[path].append((_cpu(side) - cpu_before) / seconds * 100)
                gateway_cpu[path].append((_cpu([gateway_wg]) - gw_before) / seconds * 100)

    benchmark.pedantic(measure, rounds=1, iterations=1)

    medians = {path: _median(values) for path, values in mbit.items()}
    base = medians["privileged"]
    info = benchmark.extra_info
    info["direction"] = direction
    # Other work on the host skews every path alike; the load average says how much.
    info["host_loadavg_1m"] = round(os.getloadavg()[0], 2)
    info["stream_bytes"] = sizes.stream_bytes
    info["rounds"] = sizes.rounds
    for path in PATHS:
        info[f"{path}_throughput_mbit"] = round(medians[path], 1)
        info[f"{path}_rounds_mbit"] = [round(v, 1) for v in mbit[path]]
        info[f"{path}_agent_side_cpu_pct"] = round(_median(cpu[path]), 1)
        info[f"{path}_gateway_wg_cpu_pct"] = round(_median(gateway_cpu[path]), 1)
    info["throughput_mbit"] = round(medians["agent"], 1)
    info["ratio_b_over_a"] = round(medians["agent"] / base, 3)
    info["ratio_forward_over_a"] = round(medians["agent_forward"] / base, 3)
    _table(
        f"stream {direction}: {sizes.stream_bytes // MB} MB x {sizes.rounds} rounds",
        ["path", "Mbit/s", "ratio/(a)", "agent-side CPU %", "gateway wg CPU %"],
        [
            [
                path,
                medians[path],
                f"{medians[path] / base:.2f}",
                _median(cpu[path]),
                _median(gateway_cpu[path]),
            ]
            for path in PATHS
        ],
    )


def test_round_trip_64b(benchmark: Any, topology: Topology) -> None:
    """64-byte request/response round trips on one connection (TCP_NODELAY)."""
    sizes = _sizes(benchmark)
    results: dict[str, dict[str, Any]] = {}

    def measure() -> None:
        for path, (host, port) in PATHS.items():
            job = {
                "job": "rtt",
                "host": host,
                "port": port,
                "count": sizes.round_trips,
                "size": 64,
                "warmup": max(20, sizes.round_trips // 20),
            }
            results[path] = topology.client(job, 120)
            assert results[path]["count"] == sizes.round_trips

    benchmark.pedantic(measure, rounds=1, iterations=1)

    info = benchmark.extra_info
    info["round_trips"] = sizes.round_trips
    for path, result in results.items():
        info[f"{path}_p50_us"] = round(result["p50_us"], 1)
        info[f"{path}_p99_us"] = round(result["p99_us"], 1)
    info["p50_us"] = info["agent_p50_us"]
    info["p99_us"] = info["agent_p99_us"]
    a, b = results["privileged"], results["agent"]
    info["p50_ratio_b_over_a"] = round(b["p50_us"] / a["p50_us"], 3)
    info["p99_ratio_b_over_a"] = round(b["p99_us"] / a["p99_us"], 3)
    _table(
        f"64-byte round trips x {sizes.round_trips}",
        ["path", "p50 µs", "p99 µs", "min µs", "max µs", "p50 ratio/(a)"],
        [
            [
                path,
                r["p50_us"],
                r["p99_us"],
                r["min_us"],
                r["max_us"],
                f"{r['p50_us'] / a['p50_us']:.2f}",
            ]
            for path, r in results.items()
        ],
    )


def test_concurrent_connections(benchmark: Any, topology: Topology) -> None:
    """Many connections opened at once from the gateway, each doing one echo exchange,
    all held open while the agent's memory is read; then closed."""
    sizes = _sizes(benchmark)
    results: dict[str, dict[str, Any]] = {}
    agent = topology.agent
    assert agent is not None

    def measure() -> None:
        for path, (host, port) in PATHS.items():
            side = _agent_side(topology, path)
            rss_before = _rss_kb(side)
            job = {
                "job": "conns",
                "host": host,
                "port": port,
                "count": sizes.connections,
                "timeout": 30,
            }
            with topology.held_connections(job, 120) as report:
                report["rss_before_kb"] = rss_before
                report["rss_held_kb"] = _rss_kb(side)
                report["agent_rss_held_kb"] = proc_stat(agent.pid)[0]
            time.sleep(0.5)
            report["rss_after_kb"] = _rss_kb(side)
            results[path] = report

    benchmark.pedantic(measure, rounds=1, iterations=1)

    stats = topology.agent_stats()
    info = benchmark.extra_info
    info["connections"] = sizes.connections
    for path, r in results.items():
        for key in (
            "established",
            "exchanged",
            "establish_seconds",
            "exchange_seconds",
            "connect_p50_ms",
            "connect_max_ms",
            "rss_before_kb",
            "rss_held_kb",
            "rss_after_kb",
        ):
            value = r[key]
            info[f"{path}_{key}"] = round(value, 3) if isinstance(value, float) else value
    info["agent_rss_kb"] = results["agent"]["agent_rss_held_kb"]
    info["agent_stack_counters"] = stats["counters"]
    _table(
        f"{sizes.connections} concurrent connections (RSS of the agent-side processes)",
        ["path", "ok", "echoed", "establish s", "connect p50 ms", "max ms", "RSS MB idle→held"],
        [
            [
                path,
                r["established"],
                r["exchanged"],
                f"{r['establish_seconds']:.3f}",
                r["connect_p50_ms"] or 0.0,
                r["connect_max_ms"] or 0.0,
                f"{r['rss_before_kb'] / 1024:.1f}→{r['rss_held_kb'] / 1024:.1f}",
            ]
            for path, r in results.items()
        ],
    )
    print(f"  agent stack counters: {stats['counters']}, connections now {stats['connections']}")
    for path, r in results.items():
        assert r["established"] == sizes.connections, (path, r)
        assert r["exchanged"] == sizes.connections, (path, r)
