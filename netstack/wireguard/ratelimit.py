"""Per-source token bucket for handshake messages under load (wireguard-go ratelimiter).

Theory of operation: while the engine is under load, each source IP may start 20
handshakes per second with a burst of 5.  Buckets idle for more than a second are
forgotten on a garbage-collection pass (run at most once a second), and the table is
bounded so a flood of spoofed sources cannot exhaust memory.
"""

from __future__ import annotations

PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
PACKET_COST = 1_000_000_000 // PACKETS_PER_SECOND  # in nanoseconds, exact like wireguard-go
MAX_TOKENS = PACKET_COST * PACKETS_BURSTABLE
GC_INTERVAL = 1.0
MAX_ENTRIES = 65536


class RateLimiter:
    """Token buckets keyed by source IP (port ignored)."""

    def __init__(self) -> None:
        self._buckets: dict[object, list[int]] = {}  # ip -> [tokens, last time] in ns
        self._last_gc = float("-inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def _collect(self, now: float) -> None:
        self._last_gc = now
        now_ns = int(now * 1_000_000_000)
        stale = [ip for ip, (_, last) in self._buckets.items() if now_ns - last > 1_000_000_000]
        for ip in stale:
            del self._buckets[ip]

    def allow(self, ip: object, now: float) -> bool:
        if now - self._last_gc > GC_INTERVAL:
            self._collect(now)
        now_ns = int(now * 1_000_000_000)
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= MAX_ENTRIES:
                return False
            self._buckets[ip] = [MAX_TOKENS - PACKET_COST, now_ns]
            return True
        tokens = min(MAX_TOKENS, bucket[0] + max(0, now_ns - bucket[1]))
        bucket[1] = now_ns
        if tokens > PACKET_COST:
            bucket[0] = tokens - PACKET_COST
            return True
        bucket[0] = tokens
        return False
