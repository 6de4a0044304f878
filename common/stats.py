"""The ``stats`` a gateway or an agent sends Control every ``STATS_INTERVAL`` seconds.

A :class:`StatsReporter` reads the program's running totals (per-tunnel counters from
``common.relay.metrics``, WireGuard handshake ages from its data plane) and sends the
counts since the last report Control took: totals are remembered only once a frame
went out, so traffic during a Control outage is reported when it returns, not lost.
A total lower than the one last sent (counters reset) counts from zero.  Tunnels with
nothing new are left out; a frame goes out even when empty of traffic, for the
handshake ages.  Frames are bounded (``MAX_STATS_ENTRIES`` of each kind).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from common import protocol as p

log = logging.getLogger("kakuremichi.stats")

Totals = dict[str, tuple[int, int, int, int]]


class StatsReporter:
    """Deltas of running totals, sent as ``stats`` (see the module docstring)."""

    def __init__(
        self,
        totals: Callable[[], Totals],
        peers: Callable[[], Awaitable[list[p.PeerHandshake]]],
        send: Callable[[str, dict[str, Any]], Awaitable[bool]],
        interval: float = p.STATS_INTERVAL,
    ) -> None:
        self._totals = totals
        self._peers = peers
        self._send = send
        self.interval = interval
        self._sent: Totals = {}
        #: frames Control took (tests wait on it)
        self.reports = 0

    def build(self, current: Totals, peers: list[p.PeerHandshake]) -> p.Stats:
        """The frame for ``current`` totals against the last ones sent (sans-IO)."""
        entries: list[p.TunnelTraffic] = []
        for tunnel, now in current.items():
            before = self._sent.get(tunnel, (0, 0, 0, 0))
            delta = tuple(n - b if n >= b else n for n, b in zip(now, before, strict=True))
            if any(delta) and len(entries) < p.MAX_STATS_ENTRIES:
                entries.append(p.TunnelTraffic(tunnel[: p.MAX_ID], *delta))
        return p.Stats(tuple(entries), tuple(peers[: p.MAX_STATS_ENTRIES]))

    async def report(self) -> bool:
        """Send one frame; True when Control took it."""
        current = self._totals()
        stats = self.build(current, await self._peers())
        if not await self._send("stats", stats.to_wire()):
            return False
        self._sent = current
        self.reports += 1
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.report()
