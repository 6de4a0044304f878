"""The data path's per-request metric updates (``common.relay.metrics``) next to the same
updates made with ``prometheus_client``'s own Counter and Histogram, in the same run:
``Metrics.request_done`` (a requests counter and a latency histogram, label keys bound
once per tunnel/domain/status) and a bound response-bytes counter, against
``Counter.labels(...).inc()`` / ``Histogram.labels(...).observe()`` on children bound
once the same way.  Our families are exposed through a ``prometheus_client`` custom
collector at scrape time, so the hot path keeps its own cost; this bench shows that cost
and the scrape's (``render()``) for 100 tunnels.  Reported in ``extra_info`` (printed
with ``-s``); no timing is asserted.

    pytest bench/test_metrics_bench.py -s
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram

from common.relay.metrics import DEFAULT_BUCKETS, Metrics


def cost(fn: Callable[[], None], number: int = 20000) -> float:
    """Nanoseconds per call, best of five runs."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def test_request_metrics_next_to_prometheus_client(benchmark: Any) -> None:
    ours = Metrics()
    response_bytes = ours.response_bytes_for("t1")

    def our_request() -> None:
        ours.request_done("t1", "app.example.com", 200, 0.003)
        response_bytes(1234.0)

    registry = CollectorRegistry()
    requests = PromCounter("requests", "r", ("tunnel", "domain", "code"), registry=registry).labels(
        "t1", "app.example.com", "200"
    )
    latency = PromHistogram(
        "latency", "l", ("tunnel",), registry=registry, buckets=DEFAULT_BUCKETS
    ).labels("t1")
    body = PromCounter("bytes", "b", ("tunnel",), registry=registry).labels("t1")

    def their_request() -> None:
        requests.inc()
        latency.observe(0.003)
        body.inc(1234.0)

    benchmark(our_request)
    mine, theirs = cost(our_request), cost(their_request)
    for tunnel in range(100):
        ours.request_done(f"t{tunnel}", f"d{tunnel}.example.com", 200, 0.01)
    scrape_us = min(timeit.repeat(ours.render, number=20, repeat=3)) / 20 * 1e6
    benchmark.extra_info.update(
        ours_ns_per_request=round(mine),
        prometheus_client_ns_per_request=round(theirs),
        ratio_ours_to_prometheus_client=round(mine / theirs, 3),
        scrape_us_100_tunnels=round(scrape_us),
    )
    print(
        f"\nper request: ours {mine:.0f} ns, prometheus_client {theirs:.0f} ns "
        f"({mine / theirs:.2f}x); a scrape of 100 tunnels {scrape_us:.0f} µs"
    )
    assert "kakuremichi_http_requests_total" in ours.render()
