"""The gateway's HTTP/1.1 work per proxied request, ``gateway.proxy.h1`` next to h11
(what it replaced), in the same run: both roles of one exchange (the client's request
parsed and answered; the forwarded head written and the agent's response parsed), see
``tests/gateway/test_h1_wire.py``.  ``h1`` is measured as shipped (plain heads taken by
the Cython scanner) and with every head left to llhttp (``_scan`` off).  Reported: µs
per exchange for each and the ratios (``extra_info``; printed with ``-s``).  No timing
is asserted.

    pytest bench/test_h1_bench.py -s
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

from gateway.proxy.h1 import read
from tests.gateway.test_h1_wire import h1_roles, h11_roles


def cost(fn: Callable[[], bytes], number: int = 2000) -> float:
    """Microseconds per call, best of five runs."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def test_h1_next_to_h11_per_exchange(benchmark: Any) -> None:
    h11_server, h11_client = h11_roles()
    h1_server, h1_client = h1_roles()

    def exchange() -> None:
        h1_server()
        h1_client()

    benchmark(exchange)
    before = cost(h11_server) + cost(h11_client)
    after = cost(h1_server) + cost(h1_client)
    scan = read._Reader._scan
    read._Reader._scan = False
    try:
        llhttp_server, llhttp_client = h1_roles()
        llhttp = cost(llhttp_server) + cost(llhttp_client)
    finally:
        read._Reader._scan = scan
    benchmark.extra_info.update(
        h11_us=round(before, 2),
        h1_us=round(after, 2),
        llhttp_only_us=round(llhttp, 2),
        ratio=round(before / after, 1),
        scanner_gain=round(llhttp / after, 2),
    )
    print(
        f"\nper exchange, both roles: h11 {before:.1f} µs, h1 {after:.1f} µs "
        f"({before / after:.1f}x), h1 with every head to llhttp {llhttp:.1f} µs"
    )
