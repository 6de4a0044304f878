"""Hub benchmarks: how many clients one Control process holds, memory per connection,
re-sync throughput, and push latency from a REST change to every gateway.

Sizes come from the environment so CI can prove the suite runs while a full run
reports the real numbers (see README, "Benchmarks"):

    KAKUREMICHI_BENCH_CLIENTS   agents connected and heart-beating   (default 1000)
    KAKUREMICHI_BENCH_GATEWAYS  gateways receiving each tunnel push  (default 1000)

Goals reported against (issue 2): 10,000 clients on one process; p99 push latency
under 100 ms at 1,000 clients.  The same rows for SQLite and PostgreSQL, one and two
Control replicas, and clients coming back after ``kill -9`` (issue 19) are in
``bench/test_hub_cluster_bench.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from bench.hubswarm import ControlProcess, Swarm, percentile, raise_fd_limit

CLIENTS = int(os.environ.get("KAKUREMICHI_BENCH_CLIENTS", "1000"))
# Setting up 10,000 clients takes minutes on two cores: bound it, generously.
pytestmark = pytest.mark.timeout(1800)
GATEWAYS = int(os.environ.get("KAKUREMICHI_BENCH_GATEWAYS", "1000"))


@pytest.fixture(scope="module")
def fd_limit() -> int:
    limit = raise_fd_limit()
    assert limit > max(CLIENTS, GATEWAYS) + 200, f"RLIMIT_NOFILE {limit} too small"
    return limit


@pytest.fixture(scope="module")
def agent_swarm(
    tmp_path_factory: pytest.TempPathFactory, fd_limit: int
) -> Iterator[dict[str, Any]]:
    control = ControlProcess(tmp_path_factory.mktemp("hub-scale"))
    swarm = Swarm(control)
    try:
        rss_before = control.rss_kib()
        keys = swarm.run(swarm.create("agent", CLIENTS, "a"))
        rss_idle = control.rss_kib()
        connect_s = swarm.run(swarm.connect_all(keys, "agent"))
        rss_connected = control.rss_kib()
        yield {
            "swarm": swarm,
            "control": control,
            "connect_s": connect_s,
            "rss_before_kib": rss_before,
            "rss_per_connection_kib": (rss_connected - rss_idle) / CLIENTS,
        }
    finally:
        swarm.close()
        control.stop()


def test_many_clients_heartbeat(benchmark: Any, agent_swarm: dict[str, Any]) -> None:
    """One round = every client sends a heartbeat (current version; no reply needed)."""
    swarm: Swarm = agent_swarm["swarm"]
    benchmark.pedantic(
        lambda: swarm.run(swarm.heartbeat_sweep(stale=False)), rounds=5, iterations=1
    )
    healthy = sum(not c.closed for c in swarm.clients)
    benchmark.extra_info.update(
        {
            "clients": CLIENTS,
            "connected_after": healthy,
            "connect_all_s": round(agent_swarm["connect_s"], 2),
            "connects_per_s": round(CLIENTS / agent_swarm["connect_s"], 1),
            "server_rss_per_connection_kib": round(agent_swarm["rss_per_connection_kib"], 1),
            "server_rss_total_mib": round(agent_swarm["control"].rss_kib() / 1024, 1),
        }
    )
    assert healthy == CLIENTS


def test_many_clients_stale_resync(benchmark: Any, agent_swarm: dict[str, Any]) -> None:
    """One round = every client reports a stale version and gets a full config back."""
    swarm: Swarm = agent_swarm["swarm"]
    elapsed = benchmark.pedantic(
        lambda: swarm.run(swarm.heartbeat_sweep(stale=True)), rounds=3, iterations=1
    )
    benchmark.extra_info.update({"clients": CLIENTS, "configs_per_s": round(CLIENTS / elapsed, 1)})
    assert all(not c.closed for c in swarm.clients)


@pytest.fixture(scope="module")
def gateway_swarm(
    tmp_path_factory: pytest.TempPathFactory, fd_limit: int
) -> Iterator[dict[str, Any]]:
    # /20 agent subnets with the agent at .2000 leave 1999 gateway slots.
    control = ControlProcess(
        tmp_path_factory.mktemp("hub-push"), "--agent-prefix", "20", "--agent-host", "2000"
    )
    swarm = Swarm(control)
    try:
        keys = swarm.run(swarm.create("gateway", GATEWAYS, "g"))
        agent_key = swarm.run(swarm.create("agent", 1, "owner"))
        swarm.run(swarm.connect_all(keys, "gateway"))
        swarm.run(swarm.connect_all(agent_key, "agent"))
        yield {"swarm": swarm, "gateways": swarm.clients[:GATEWAYS]}
    finally:
        swarm.close()
        control.stop()


def test_push_latency_to_every_gateway(benchmark: Any, gateway_swarm: dict[str, Any]) -> None:
    """One round = REST tunnel create until the last of GATEWAYS gateways has it."""
    swarm: Swarm = gateway_swarm["swarm"]
    receivers = gateway_swarm["gateways"]
    completions: list[float] = []
    arrivals: list[float] = []
    counter = iter(range(10**6))

    def one_round() -> float:
        done, each = swarm.run(swarm.push_round("owner0", next(counter), len(receivers)))
        completions.append(done)
        arrivals.extend(each)
        return done

    benchmark.pedantic(one_round, rounds=30, iterations=1, warmup_rounds=2)
    benchmark.extra_info["rounds_ms"] = [round(c * 1000, 1) for c in completions]
    benchmark.extra_info.update(
        {
            "gateways": len(receivers),
            "all_gateways_p50_ms": round(percentile(completions, 50) * 1000, 1),
            "all_gateways_p99_ms": round(percentile(completions, 99) * 1000, 1),
            "per_gateway_arrival_p50_ms": round(percentile(arrivals, 50) * 1000, 1),
            "per_gateway_arrival_p99_ms": round(percentile(arrivals, 99) * 1000, 1),
        }
    )
