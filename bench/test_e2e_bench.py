"""End-to-end benchmark: small responses through kakuremichi, next to the same origin
reached directly and through nginx, in the same run.

    direct  client → origin
    nginx   client → nginx (Debian package, 1 worker, HTTP/1.1 upstream keepalive) → origin
    ours    client → ``kakuremichi gateway`` (userspace WireGuard) ══ WireGuard ══▶
            ``kakuremichi agent`` → origin

Every piece is its own process on loopback (see ``bench/e2ebench.py``): Control, the
gateway and the agent are started with the ``kakuremichi`` command and configured through
Control's REST API like ``kakuremichi demo`` does; the origin is a minimal asyncio
HTTP/1.1 server answering ``hello, world\\n`` (13 bytes), so it is not what limits the
proxies; the load generator is another process: 16 keep-alive connections, no
pipelining, a fixed number of ``GET /`` (``Host: bench.example.com``) per round.

Reported per path (``extra_info`` and a printed table with ``-s``): requests/s, p50 and
p99 latency (medians over the rounds), the client's CPU and the servers' CPU (fraction
of one core), and the ratios ours/direct and ours/nginx.  No timing is asserted; every
answer must be ``200`` with the exact body.  ``--benchmark-disable`` (CI) runs one short
round per path; with benchmarks enabled each path gets ``ROUNDS`` rounds::

    pytest bench/test_e2e_bench.py -s
    KAKUREMICHI_E2E_BENCH_PROFILE=/tmp/prof pytest bench/test_e2e_bench.py -s   # cProfile

The machine has 2 cores: with ``ours`` the client, gateway, agent and origin share them,
so its numbers include that contention (the CPU columns show who used what; they come
from /proc tick counts, 10 ms, so they mean little in the short CI round).  ``direct``
saturates both the client and the origin (about one core each), so it is a lower bound
of what the origin can serve and ours/direct an upper bound of our share of it.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.e2ebench import BODY, Processes, run_load
from tests.support import need

PATHS = ("direct", "nginx", "ours")
CONNECTIONS = 16
ROUNDS = 5


@dataclass(frozen=True)
class Plan:
    """How much load each path gets per round (the paths differ ~50x in speed)."""

    rounds: int
    warmup: int  # requests per connection before the clock starts
    requests: dict[str, int]


QUICK = Plan(1, 2, {"direct": 400, "nginx": 400, "ours": 400})
FULL = Plan(ROUNDS, 50, {"direct": 60_000, "nginx": 40_000, "ours": 6_000})

RESULTS: dict[str, dict[str, Any]] = {}


def nginx_binary() -> str:
    """nginx from PATH or Debian's /usr/sbin (not on a normal user's PATH)."""
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    need(path is not None, "needs the 'nginx' program (Debian: apt-get install nginx-light)")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def servers() -> Iterator[Processes]:
    with Processes() as processes:
        processes.start_origin()
        processes.start_ours()
        yield processes


def measure(servers: Processes, path: str, plan: Plan) -> dict[str, Any]:
    """``plan.rounds`` client runs against one path; medians plus every round."""
    if path == "nginx" and "nginx" not in servers.ports:
        servers.start_nginx(nginx_binary())
    port = servers.ports["origin" if path == "direct" else path]
    rounds = []
    for _ in range(plan.rounds):
        result = run_load(port, plan.requests[path], CONNECTIONS, plan.warmup, servers.watch(path))
        assert result["ok"], f"{path}: {result['error']} ({result.get('answered')} answered)"
        assert result["requests"] == plan.requests[path]
        rounds.append(result)

    def median(key: str) -> float:
        return float(statistics.median(r[key] for r in rounds))

    return {
        "path": path,
        "requests_per_round": plan.requests[path],
        "rounds": len(rounds),
        "connections": CONNECTIONS,
        "rps": median("rps"),
        "p50_us": median("p50_us"),
        "p99_us": median("p99_us"),
        "client_cpu": median("client_cpu"),
        "server_cpu": {
            name: statistics.median(r["cpu"][name] for r in rounds) for name in rounds[0]["cpu"]
        },
        "loop": rounds[0]["loop"],
        "rps_rounds": [round(r["rps"]) for r in rounds],
    }


def result_for(servers: Processes, path: str, plan: Plan) -> dict[str, Any]:
    if path not in RESULTS:
        RESULTS[path] = measure(servers, path, plan)
    return RESULTS[path]


def ratios(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """ours/other: rps below 1 means slower; latency above 1 means slower."""
    return {
        "rps": round(ours["rps"] / other["rps"], 4),
        "p50": round(ours["p50_us"] / other["p50_us"], 2),
        "p99": round(ours["p99_us"] / other["p99_us"], 2),
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    first = next(iter(results.values()))
    print(
        f"\nsmall responses ({len(BODY)} B), {CONNECTIONS} keep-alive connections, "
        f"median of {first['rounds']} round(s), client and origin on {first['loop']}"
    )
    print(f"{'path':8} {'req/s':>9} {'p50 µs':>9} {'p99 µs':>9} {'client':>7}  servers (cores)")
    for path, r in results.items():
        cpu = ", ".join(f"{name} {used:.2f}" for name, used in r["server_cpu"].items())
        print(
            f"{path:8} {r['rps']:9.0f} {r['p50_us']:9.0f} {r['p99_us']:9.0f} "
            f"{r['client_cpu']:7.2f}  {cpu}"
        )
    ours = results["ours"]
    for other in ("direct", "nginx"):
        if other in results:
            q = ratios(ours, results[other])
            print(
                f"ours/{other:6}  req/s x{q['rps']:.3f}   p50 x{q['p50']:.1f}   p99 x{q['p99']:.1f}"
            )


@pytest.mark.parametrize("path", PATHS)
def test_small_responses(benchmark: Any, servers: Processes, path: str) -> None:
    plan = QUICK if benchmark.disabled else FULL
    RESULTS.pop(path, None)
    benchmark.group = "e2e-small-responses"
    result = benchmark.pedantic(result_for, args=(servers, path, plan), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    if path != "ours":
        return
    # the comparison: measure what this run has not measured yet (e.g. under -k ours)
    for other in ("direct", "nginx"):
        result_for(servers, other, plan)
    for other in ("direct", "nginx"):
        benchmark.extra_info[f"ours_over_{other}"] = ratios(result, RESULTS[other])
    print_table({p: RESULTS[p] for p in PATHS})
