"""The stream transport (WireGuard over a WebSocket over TLS, issue 18) next to UDP.

In one run, over a real wireguard-go gateway with the gateway's stream end in front of
it (``bench/streambench.py`` has the namespaces and processes), our agent's data plane
reaches the gateway four ways: ``udp`` and ``stream`` over a veth; ``udp_lossy`` and
``stream_lossy`` through a user-space relay that drops a seeded 1% of the packets each
way (for the stream: the outer TCP's packets, so TCP runs inside TCP over a lossy
path).  Measured, rows interleaved in every round:

* one TCP stream each way through the tunnel (Mbit/s, median of the rounds), the
  ratio stream/udp (goal ≥ 0.5) and stream_lossy/udp_lossy; and the same two rows
  against the userspace backend (``user_udp``, ``user_stream``: the gateway's own
  engine fed from the stream, the jobs run through its stack);
* 64-byte request/response round trips (p50/p99 µs), the p50 ratio stream/udp
  (goal ≤ 2);
* queueing delay under a bulk transfer: 64-byte round trips while a download runs,
  next to the same round trips idle, and on the stream the WebSocket ping round trip
  above its minimum (how long the outer connection's buffers hold packets; bounded by
  ``common.wgstream.StreamSettings``), with the datagrams dropped at that bound.

Correctness is asserted (byte counts, echoes); speed never is.  ``--benchmark-disable``
(CI) runs everything once with small sizes::

    pytest bench/test_stream_bench.py -s                # full sizes, prints the tables
    KAKUREMICHI_STREAM_BENCH_MB=200 pytest bench/test_stream_bench.py -s
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.streambench import PATHS, USER_PATHS, StreamTopology
from tests.support import need_binary, need_root

pytestmark = pytest.mark.root
MB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    stream_bytes: int
    rounds: int
    round_trips: int
    loaded_bytes: int


FULL = Sizes(int(os.environ.get("KAKUREMICHI_STREAM_BENCH_MB", "100")) * MB, 3, 2000, 200 * MB)
QUICK = Sizes(4 * MB, 1, 200, 8 * MB)  # --benchmark-disable: one quick pass (CI)


def _sizes(benchmark: Any) -> Sizes:
    return QUICK if benchmark.disabled else FULL


@pytest.fixture(scope="module")
def topology() -> Iterator[StreamTopology]:
    need_root()
    for program in ("wireguard-go", "wg", "ip"):
        need_binary(program)
    topo = StreamTopology()
    with tempfile.TemporaryDirectory(prefix="kkm-streambench-") as state:
        try:
            topo.up(Path(state))
            yield topo
        finally:
            topo.down()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for row in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


@pytest.mark.parametrize("direction", ["gateway_to_agent", "agent_to_gateway"])
def test_stream_vs_udp_throughput(benchmark: Any, topology: StreamTopology, direction: str) -> None:
    sizes = _sizes(benchmark)
    job = "upload" if direction == "gateway_to_agent" else "download"
    mbit: dict[str, list[float]] = {path: [] for path in PATHS + USER_PATHS}

    def measure() -> None:
        for _ in range(sizes.rounds):
            for path in PATHS + USER_PATHS:
                topology.use(path)
                result = topology.job(path, {"job": job, "size": sizes.stream_bytes}, 600)
                assert result["received"] == sizes.stream_bytes, (path, result)
                mbit[path].append(sizes.stream_bytes * 8 / result["seconds"] / 1e6)

    benchmark.pedantic(measure, rounds=1, iterations=1)

    medians = {path: _median(values) for path, values in mbit.items()}
    info = benchmark.extra_info
    info["direction"] = direction
    info["host_loadavg_1m"] = round(os.getloadavg()[0], 2)
    info["stream_bytes"] = sizes.stream_bytes
    for path in PATHS + USER_PATHS:
        info[f"{path}_mbit"] = round(medians[path], 1)
        info[f"{path}_rounds_mbit"] = [round(v, 1) for v in mbit[path]]
    info["ratio_stream_over_udp"] = round(medians["stream"] / medians["udp"], 3)
    info["ratio_user_stream_over_user_udp"] = round(medians["user_stream"] / medians["user_udp"], 3)
    info["ratio_lossy_stream_over_lossy_udp"] = round(
        medians["stream_lossy"] / medians["udp_lossy"], 3
    )
    info["relay"] = topology.relay_counts()
    _table(
        f"one TCP stream {direction}: {sizes.stream_bytes // MB} MB x {sizes.rounds} rounds",
        ["path", "Mbit/s", "ratio to udp", "ratio to udp_lossy"],
        [
            [
                p,
                medians[p],
                _ratio(medians[p], medians["udp"]),
                _ratio(medians[p], medians["udp_lossy"]),
            ]
            for p in PATHS
        ]
        + [
            [p, medians[p], _ratio(medians[p], medians["user_udp"]) + " (to user_udp)", "-"]
            for p in USER_PATHS
        ],
    )


def test_stream_vs_udp_round_trips(benchmark: Any, topology: StreamTopology) -> None:
    sizes = _sizes(benchmark)
    results: dict[str, dict[str, Any]] = {}

    def measure() -> None:
        for path in PATHS + USER_PATHS:
            topology.use(path)
            job = {
                "job": "rtt",
                "count": sizes.round_trips,
                "size": 64,
                "warmup": max(20, sizes.round_trips // 20),
            }
            results[path] = topology.job(path, job, 300)
            assert results[path]["count"] == sizes.round_trips

    benchmark.pedantic(measure, rounds=1, iterations=1)

    info = benchmark.extra_info
    for path, result in results.items():
        info[f"{path}_p50_us"] = round(result["p50_us"], 1)
        info[f"{path}_p99_us"] = round(result["p99_us"], 1)
    info["p50_ratio_stream_over_udp"] = round(
        results["stream"]["p50_us"] / results["udp"]["p50_us"], 3
    )
    info["p50_ratio_user_stream_over_user_udp"] = round(
        results["user_stream"]["p50_us"] / results["user_udp"]["p50_us"], 3
    )
    _table(
        f"64-byte round trips x {sizes.round_trips}",
        ["path", "p50 µs", "p99 µs", "max µs", "p50 ratio to udp"],
        [
            [
                p,
                r["p50_us"],
                r["p99_us"],
                r["max_us"],
                _ratio(r["p50_us"], results["user_udp" if p in USER_PATHS else "udp"]["p50_us"])
                + (" (to user_udp)" if p in USER_PATHS else ""),
            ]
            for p, r in results.items()
        ],
    )


def test_queueing_delay_under_a_bulk_transfer(benchmark: Any, topology: StreamTopology) -> None:
    """64-byte round trips while a download runs on the same tunnel, and the stream's
    WebSocket ping above its minimum: what the bounded outer buffer lets a packet wait."""
    sizes = _sizes(benchmark)
    rows: list[list[Any]] = []
    info = benchmark.extra_info

    def measure() -> None:
        for path in PATHS:
            topology.use(path)
            rtt_job = {"job": "rtt", "count": sizes.round_trips // 2, "size": 64, "warmup": 10}
            idle = topology.client(rtt_job, 300)
            topology.pings()  # (forget the idle pings)
            bulk = topology.start_client({"job": "download", "size": sizes.loaded_bytes})
            try:
                loaded = topology.client(rtt_job, 600)
                done = bulk.read(600)
            finally:
                bulk.stop()
            assert done["received"] == sizes.loaded_bytes, (path, done)
            pings = topology.pings()
            samples = [p * 1e3 for p in pings["pings"]]
            floor = (pings["rtt_min"] or 0) * 1e3
            delay = [s - floor for s in samples]
            rows.append(
                [
                    path,
                    idle["p50_us"] / 1e3,
                    loaded["p50_us"] / 1e3,
                    loaded["p99_us"] / 1e3,
                    _pct(delay, 0.5) if delay else "-",
                    _pct(delay, 0.99) if delay else "-",
                    pings["dropped"],
                ]
            )
            info[f"{path}_idle_p50_ms"] = round(idle["p50_us"] / 1e3, 3)
            info[f"{path}_loaded_p50_ms"] = round(loaded["p50_us"] / 1e3, 3)
            info[f"{path}_loaded_p99_ms"] = round(loaded["p99_us"] / 1e3, 3)
            if delay:
                info[f"{path}_ws_queueing_p50_ms"] = round(_pct(delay, 0.5), 3)
                info[f"{path}_ws_queueing_max_ms"] = round(max(delay), 3)
            info[f"{path}_outer_dropped"] = pings["dropped"]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    _table(
        f"queueing delay during a {sizes.loaded_bytes // MB} MB download (ms)",
        [
            "path",
            "64 B idle p50",
            "64 B loaded p50",
            "loaded p99",
            "ws queue p50",
            "ws queue p99",
            "outer drops",
        ],
        rows,
    )
