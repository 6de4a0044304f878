"""End-to-end benchmark: one origin reached seven ways, ``wrk`` as the load generator.

Rows (see ``bench/e2ebench.py`` for the namespaces, processes and settings)::

    direct         wrk → origin (nginx)
    nginx-edge     wrk → nginx → origin
    privileged     nginx → wireguard-go ══ wireguard-go → origin (kernel TCP both ends)
    newt           nginx → wireguard-go ══ gofwd (wireguard-go device on gVisor netstack,
                   io.Copy to the origin: Newt's design, bench/gofwd/main.go) → origin
    gateway-alone  ``kakuremichi gateway`` → origin, no tunnel (its HTTP layer alone)
    gateway-session   the same, a tunnel behind a password policy, with the session cookie
    gateway-replicas  the same, a tunnel with two replicas (two origins, round robin)
    all-userspace  gateway (userspace backend) ══ agent → origin, on loopback
    production     gateway (wireguard-go backend) in A ══ agent in B → origin in B

Per row: ``wrk -t1 -c1`` and ``-c32`` (``--latency``, ``Host: bench.example.com``):
req/s, p50/p99, errors (socket errors + non-2xx), the CPU of each process (cores:
utime+stime over the window, from /proc; the client's from getrusage); then a large
download with curl (MB/s and CPU).  With benchmarks enabled each is ``ROUNDS`` rounds
of ``SECONDS`` s (after a 1 s warm-up) and 3 downloads of 100 MB (after an untimed
10 MB one), medians reported; ``--benchmark-disable`` (CI) runs each once for 2 s and
downloads 10 MB once, to prove every row works.  The acceptance ratios are printed at
the end (``-s``) and stored in ``extra_info``.  No timing is asserted: every row must
answer 200 with the exact body (checked before and after the load), download the
exact size, and in the CI mode wrk must see 0 errors.

    pytest bench/test_e2e_bench.py -s                          # the full table
    pytest bench/test_e2e_bench.py -s --benchmark-disable      # one short pass

The rows that need namespaces (privileged, newt, gateway-alone, production) need root,
``ip``, ``wg``, ``wireguard-go`` (Debian) and, for newt, ``go`` with Debian's
golang-golang.zx2c4-wireguard-dev and golang-gvisor-gvisor-dev (the forwarder is built
once and cached, see ``build_gofwd``); every row needs ``wrk``, ``curl`` and ``nginx``.
Missing tools skip on a laptop and fail under ``CI=true`` (``tests.support.need``).

The machine has 2 cores: the client, the proxies and the origin share them, so each
row's numbers include that contention; the CPU columns say who used what.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.e2ebench import (
    BODY,
    DOWNLOADS,
    H2_ROWS,
    MB,
    NETNS_ROWS,
    ROWS,
    E2EBench,
    check_answers,
    check_h2,
    run_download,
    run_h2load,
    run_wrk,
)
from bench.e2ebench import nginx_binary as find_nginx
from tests.support import need

CONNECTIONS = (1, 32)
ROUNDS = 5
SECONDS = 5.0


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: float
    warmup: float  # seconds of wrk before the rounds (0: none)
    download: str  # the path fetched: "/100m" or "/10m"
    downloads: int


QUICK = Plan(1, 2.0, 0.0, "/10m", 1)
FULL = Plan(ROUNDS, SECONDS, 1.0, "/100m", 3)

#: row → its measurements, or the error that stopped it
RESULTS: dict[str, dict[str, Any] | BaseException] = {}


def _requirements(row: str) -> None:
    if row in H2_ROWS:
        need(
            shutil.which("h2load") is not None,
            "needs 'h2load' (Debian: apt-get install nghttp2-client)",
        )
    for program in ("wrk", "curl"):
        need(
            shutil.which(program) is not None,
            f"needs {program!r} (Debian: apt-get install {program})",
        )
    need(find_nginx() is not None, "needs 'nginx' (Debian: apt-get install nginx-light)")
    if row in NETNS_ROWS:
        need(os.geteuid() == 0, "needs root (network namespaces, TUN)")
        for program in ("ip", "wg", "wireguard-go"):
            need(shutil.which(program) is not None, f"needs the {program!r} program on PATH")
    if row == "newt":
        need(shutil.which("go") is not None, "needs 'go' (Debian: apt-get install golang-go)")
        for src in ("golang.zx2c4.com/wireguard/device", "gvisor.dev/gvisor/pkg/tcpip/stack"):
            need(
                Path("/usr/share/gocode/src", src).is_dir(),
                "needs Debian's golang-golang.zx2c4-wireguard-dev and golang-gvisor-gvisor-dev",
            )


@pytest.fixture(scope="module")
def bench() -> Iterator[E2EBench]:
    with E2EBench() as servers:
        yield servers


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _median_cpu(rounds: list[dict[str, Any]]) -> dict[str, float]:
    return {name: _median([r["cpu"][name] for r in rounds]) for name in rounds[0]["cpu"]}


def measure(bench: E2EBench, row: str, plan: Plan) -> dict[str, Any]:
    target = bench.target(row)
    check_answers(target.netns, target.port, host=target.host, headers=target.headers)
    result: dict[str, Any] = {"row": row, "rounds": plan.rounds, "seconds": plan.seconds}
    for connections in CONNECTIONS:
        if plan.warmup:
            run_wrk(target, connections, plan.warmup)
        rounds = [run_wrk(target, connections, plan.seconds) for _ in range(plan.rounds)]
        result[f"c{connections}"] = {
            "rps": _median([r["rps"] for r in rounds]),
            "p50_us": _median([r["p50_us"] for r in rounds]),
            "p99_us": _median([r["p99_us"] for r in rounds]),
            "errors": sum(r["errors"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds),
            "cpu": _median_cpu(rounds),
            "rps_rounds": [round(r["rps"]) for r in rounds],
        }
    if plan.warmup:
        run_download(target, "/10m")  # untimed (see bench/e2ebench.py on first downloads)
    downloads = [run_download(target, plan.download) for _ in range(plan.downloads)]
    result["download"] = {
        "bytes": DOWNLOADS[plan.download],
        "mb_s": _median([d["mb_s"] for d in downloads]),
        "cpu": _median_cpu(downloads),
        "mb_s_rounds": [round(d["mb_s"], 1) for d in downloads],
    }
    check_answers(target.netns, target.port, host=target.host, headers=target.headers)
    return result


def measure_h2(bench: E2EBench, row: str, plan: Plan) -> dict[str, Any]:
    """An HTTP/2 row: ``h2load`` at 1 and 32 connections (one stream each at a time);
    no download (the HTTP/1.1 rows measure the path's bulk speed)."""
    target = bench.target(row)
    check_h2(target.port)
    result: dict[str, Any] = {"row": row, "rounds": plan.rounds, "seconds": plan.seconds}
    for connections in CONNECTIONS:
        if plan.warmup:
            run_h2load(target, connections, plan.warmup)
        rounds = [run_h2load(target, connections, plan.seconds) for _ in range(plan.rounds)]
        result[f"c{connections}"] = {
            "rps": _median([r["rps"] for r in rounds]),
            "mean_us": _median([r["mean_us"] for r in rounds]),
            "errors": sum(r["errors"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds),
            "cpu": _median_cpu(rounds),
            "rps_rounds": [round(r["rps"]) for r in rounds],
        }
    check_h2(target.port)
    return result


def result_for(bench: E2EBench, row: str, plan: Plan) -> dict[str, Any]:
    """The row's measurements (measured now if this run has not yet); re-raises the
    error that stopped the row."""
    if row not in RESULTS:
        try:
            RESULTS[row] = (measure_h2 if row in H2_ROWS else measure)(bench, row, plan)
        except BaseException as exc:
            RESULTS[row] = exc
            raise
    found = RESULTS[row]
    if isinstance(found, BaseException):
        raise found
    return found


@pytest.mark.timeout(900)
@pytest.mark.parametrize("row", ROWS + H2_ROWS)
def test_row(benchmark: Any, bench: E2EBench, row: str) -> None:
    _requirements(row)
    plan = QUICK if benchmark.disabled else FULL
    RESULTS.pop(row, None)
    benchmark.group = "e2e"
    result = benchmark.pedantic(result_for, args=(bench, row, plan), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    if row == "newt":
        benchmark.extra_info.update(bench.info)
    if benchmark.disabled:
        for connections in CONNECTIONS:
            errors = result[f"c{connections}"]["errors"]
            assert errors == 0, f"{row}: wrk saw {errors} errors at {connections} connections"


# -- the cost of a policy and of balancing, in interleaved pairs

#: alternating pairs per comparison and seconds per ``wrk`` run (benchmarks enabled)
PAIRS = int(os.environ.get("KAKUREMICHI_BENCH_PAIRS", "10"))
PAIR_SECONDS = float(os.environ.get("KAKUREMICHI_BENCH_PAIR_SECONDS", "3"))


def _rps_and_cost(target: Any, connections: int, seconds: float) -> tuple[float, float]:
    """req/s and the gateway's CPU per request (µs) of one ``wrk`` run."""
    result = run_wrk(target, connections, seconds)
    return result["rps"], result["cpu"]["gateway"] / max(result["rps"], 1e-9) * 1e6


@pytest.mark.timeout(1800)
def test_policy_and_balancing_cost_in_pairs(benchmark: Any, bench: E2EBench) -> None:
    """Issue 15's and 17's 5% goals, measured as alternating pairs of short ``wrk`` runs
    on the one gateway (the order flips every pair; the medians of the pairs' ratios):
    gateway-session against gateway-alone sending the same session cookie (what the
    policy check adds), gateway-replicas against gateway-alone (what balancing over two
    replica addresses of the same origin adds): req/s and the gateway's CPU per
    request."""
    for row in ("gateway-alone", "gateway-session", "gateway-replicas"):
        _requirements(row)
    pairs, seconds = (1, 1.0) if benchmark.disabled else (PAIRS, PAIR_SECONDS)
    alone = bench.target("gateway-alone")
    session = bench.target("gateway-session")
    replicas = bench.target("gateway-replicas")
    comparisons = {
        "session": (dataclasses.replace(alone, headers=session.headers), session),
        "replicas": (alone, replicas),
    }
    ratios: dict[str, list[tuple[float, float]]] = {}

    def measure() -> None:
        for target in (alone, session, replicas):
            run_wrk(target, 32, 1)  # warm
        for connections in CONNECTIONS:
            for i in range(pairs):
                for name, (base, other) in comparisons.items():
                    order = (base, other) if i % 2 == 0 else (other, base)
                    first, second = (_rps_and_cost(t, connections, seconds) for t in order)
                    b, o = (first, second) if order[0] is base else (second, first)
                    key = f"{name}_c{connections}"
                    ratios.setdefault(key, []).append((o[0] / b[0], o[1] / b[1]))

    benchmark.group = "e2e"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    print(f"\npolicy and balancing cost, {pairs} alternating pairs of {seconds:g} s runs:")
    for key, values in ratios.items():
        rps = _median([r for r, _ in values])
        cost = _median([c for _, c in values])
        benchmark.extra_info[f"{key}_rps_ratio"] = round(rps, 3)
        benchmark.extra_info[f"{key}_cpu_per_request_ratio"] = round(cost, 3)
        print(f"  {key}: req/s {rps:.3f}x, gateway CPU per request {cost:.3f}x")
        assert all(r > 0 and c > 0 for r, c in values)


# -- the report


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _get(row: str, *keys: str) -> float | None:
    found: Any = RESULTS.get(row)
    if not isinstance(found, dict):
        return None
    for key in keys:
        found = found[key]
    return float(found)


def acceptance_ratios() -> dict[str, float | None]:
    """The ratios the project tracks (issue item 5), None where a row is missing."""
    return {
        "production_rps_c32_over_newt": ratio(
            _get("production", "c32", "rps"), _get("newt", "c32", "rps")
        ),
        "production_p50_c1_over_newt": ratio(
            _get("production", "c1", "p50_us"), _get("newt", "c1", "p50_us")
        ),
        "all_userspace_rps_c32_over_newt": ratio(
            _get("all-userspace", "c32", "rps"), _get("newt", "c32", "rps")
        ),
        "all_userspace_p50_c1_over_newt": ratio(
            _get("all-userspace", "c1", "p50_us"), _get("newt", "c1", "p50_us")
        ),
        "gateway_alone_rps_c32_over_nginx_edge": ratio(
            _get("gateway-alone", "c32", "rps"), _get("nginx-edge", "c32", "rps")
        ),
        "gateway_session_rps_c32_over_gateway_alone": ratio(
            _get("gateway-session", "c32", "rps"), _get("gateway-alone", "c32", "rps")
        ),
        "gateway_replicas_rps_c32_over_gateway_alone": ratio(
            _get("gateway-replicas", "c32", "rps"), _get("gateway-alone", "c32", "rps")
        ),
        "gateway_alone_p50_c1_over_nginx_edge": ratio(
            _get("gateway-alone", "c1", "p50_us"), _get("nginx-edge", "c1", "p50_us")
        ),
        "production_download_over_newt": ratio(
            _get("production", "download", "mb_s"), _get("newt", "download", "mb_s")
        ),
        "all_userspace_download_over_newt": ratio(
            _get("all-userspace", "download", "mb_s"), _get("newt", "download", "mb_s")
        ),
        "all_userspace_h2_rps_c32_over_nginx_edge_h2": ratio(
            _get("all-userspace-h2", "c32", "rps"), _get("nginx-edge-h2", "c32", "rps")
        ),
        "all_userspace_h2_rps_c32_over_all_userspace": ratio(
            _get("all-userspace-h2", "c32", "rps"), _get("all-userspace", "c32", "rps")
        ),
    }


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {used:.2f}" for name, used in cpu.items())


def print_report(bench: E2EBench, plan: Plan) -> None:
    size = DOWNLOADS[plan.download] // MB
    print(
        f"\nend to end: GET / ({len(BODY)} B) with wrk -t1, median of {plan.rounds} round(s) "
        f"of {plan.seconds:g} s; download {size} MB x {plan.downloads} with curl"
        + ("  [CI mode: short rounds, 10 MB download]" if plan is QUICK else "")
    )
    if "gofwd_build_seconds" in bench.info:
        cached = (
            " (cached binary; that is how long its build took)"
            if bench.info["gofwd_build_cached"]
            else ""
        )
        print(f"gofwd build: {bench.info['gofwd_build_seconds']} s{cached}")
    header = f"{'row':14} {'conns':>5} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'errors':>6}  CPU (cores)"
    print(header)
    for row in ROWS:
        found = RESULTS.get(row)
        if not isinstance(found, dict):
            reason = "not run" if found is None else f"FAILED: {type(found).__name__}"
            print(f"{row:14} {reason}")
            continue
        for connections in CONNECTIONS:
            r = found[f"c{connections}"]
            print(
                f"{row:14} {connections:5} {r['rps']:9.0f} {r['p50_us']:8.0f} {r['p99_us']:8.0f} "
                f"{r['errors']:6}  {_cpu_text(r['cpu'])}"
            )
    print("\nHTTP/2 over TLS, h2load -t1 -m1 (one stream per connection at a time)")
    print(f"{'row':16} {'conns':>5} {'req/s':>9} {'mean µs':>8} {'errors':>6}  CPU (cores)")
    for row in H2_ROWS:
        found = RESULTS.get(row)
        if not isinstance(found, dict):
            reason = "not run" if found is None else f"FAILED: {type(found).__name__}"
            print(f"{row:16} {reason}")
            continue
        for connections in CONNECTIONS:
            r = found[f"c{connections}"]
            print(
                f"{row:16} {connections:5} {r['rps']:9.0f} {r['mean_us']:8.0f} "
                f"{r['errors']:6}  {_cpu_text(r['cpu'])}"
            )
    print(f"\n{'row':14} {'MB/s':>8}  CPU (cores) during the {size} MB download")
    for row in ROWS:
        found = RESULTS.get(row)
        if isinstance(found, dict) and "download" in found:
            d = found["download"]
            print(f"{row:14} {d['mb_s']:8.1f}  {_cpu_text(d['cpu'])}")
    print("\nratios")
    for name, value in acceptance_ratios().items():
        print(f"  {name:40} {'n/a' if value is None else f'x{value:.3f}'}")


@pytest.mark.timeout(1800)
def test_report(benchmark: Any, bench: E2EBench) -> None:
    """Measures the rows this run has not measured yet (e.g. under ``-k report``),
    prints the table and the ratios."""
    plan = QUICK if benchmark.disabled else FULL

    measured_here: list[str] = []

    def fill() -> None:
        for row in ROWS + H2_ROWS:
            if row in RESULTS:
                continue
            try:
                _requirements(row)
            except pytest.skip.Exception:
                continue  # a laptop without root: report what can run
            measured_here.append(row)
            with contextlib.suppress(Exception):
                result_for(bench, row, plan)  # a failure is kept in RESULTS

    benchmark.group = "e2e"
    benchmark.pedantic(fill, rounds=1, iterations=1)
    print_report(bench, plan)
    benchmark.extra_info.update(acceptance_ratios())
    benchmark.extra_info.update(bench.info)
    # rows that failed in their own test have failed there already
    failed = {row: RESULTS[row] for row in measured_here if isinstance(RESULTS[row], BaseException)}
    assert not failed, f"rows that failed: {failed}"
