"""Protection limits for the public listeners: rates, connection counts, sizes, deadlines.

Theory of operation
-------------------
Everything here is sans-IO: callers pass the current time (``loop.time()``) and get a
decision back, so tests drive the clock explicitly.

* ``TokenBucket`` holds ``burst`` tokens and refills at ``rate`` tokens/s.  A request
  takes one token; when none is left the caller answers 429 with ``Retry-After`` set
  to the time until the next token (rounded up to whole seconds, RFC 9110 §10.2.3).
* ``RateLimiter`` keeps one bucket per client key.  The key is the client's IPv4
  address, or its IPv6 /64 (one host usually owns a whole /64, so per-address limits
  would be trivial to dodge).  Buckets live in an LRU capped at ``max_tracked_clients``;
  evicting a bucket forgets at most a partial debt, and a full bucket is the same as no
  bucket, so memory stays bounded under address-spraying floods.
* ``ConnectionLimiter`` counts open connections per client key and in total.
* Header size/count limits and the slow-client deadlines are enforced by the HTTP
  adapter (``http.py``) with the numbers from ``LimitSettings``.

The client address is always the TCP peer of the public socket.  Incoming
``X-Forwarded-For`` is never used for limiting: anybody can write it.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Per-client and per-request protection limits (0 or None disables a limit)."""

    #: sustained requests per second per client key (0 = no rate limit)
    rate: float = 50.0
    #: bucket size: requests a client may burst above the sustained rate
    burst: int = 100
    #: concurrent connections per client key (0 = unlimited)
    max_connections_per_client: int = 256
    #: concurrent connections in total (0 = unlimited)
    max_connections: int = 10_000
    #: bytes of request line + headers (431 beyond)
    max_header_bytes: int = 32 * 1024
    #: number of request header fields (431 beyond)
    max_header_count: int = 100
    #: request body bytes (413 beyond; None = unlimited)
    max_body_bytes: int | None = 1024 * 1024 * 1024
    #: seconds a client has to deliver complete request headers once it starts (408)
    header_timeout: float = 10.0
    #: seconds an idle keep-alive client connection is kept open between requests
    idle_timeout: float = 60.0
    #: clients remembered by the rate limiter (LRU)
    max_tracked_clients: int = 100_000

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0 requests/s (0 disables it)")
        if self.rate > 0 and self.burst < 1:
            raise ValueError("burst must be >= 1 when a rate is set")
        for name in ("max_connections_per_client", "max_connections", "max_tracked_clients"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes must be >= 1024")
        if self.max_header_count < 1:
            raise ValueError("max_header_count must be >= 1")
        if self.max_body_bytes is not None and self.max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0 (or None for no limit)")
        for name in ("header_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")


def client_key(ip: str) -> str:
    """The identity limits are counted under: the IPv4 address or the IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class TokenBucket:
    """A token bucket on an explicit clock (RFC 2697-style single rate)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0.0 if allowed, else seconds until it would be."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one rate-limit check."""

    allowed: bool
    retry_after: int  # whole seconds (>= 1) when not allowed, else 0


#: the usual answer, made once (a frozen dataclass costs a call per request)
_ALLOWED = RateDecision(True, 0)


class RateLimiter:
    """Per-client token buckets in a bounded LRU."""

    def __init__(self, rate: float, burst: int, max_tracked: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_tracked = max(1, max_tracked)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, client_ip: str, now: float) -> RateDecision:
        if not self.enabled:
            return _ALLOWED
        key = client_key(client_ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, max(1, self.burst), now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        wait = bucket.take(now)
        if wait == 0.0:
            return _ALLOWED
        return RateDecision(False, max(1, math.ceil(wait)))

    def __len__(self) -> int:
        return len(self._buckets)


class ConnectionLimiter:
    """Counts open connections per client key and in total."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._counts: dict[str, int] = {}
        self.open = 0

    def try_acquire(self, client_ip: str, *, exempt: bool = False) -> bool:
        """Count a new connection; False (and nothing counted) if over a limit.

        ``exempt`` connections (from a trusted proxy, which speaks for many clients)
        count only against the total.
        """
        if self.total and self.open >= self.total:
            return False
        if exempt:
            self.open += 1
            return True
        key = client_key(client_ip)
        count = self._counts.get(key, 0)
        if self.per_client and count >= self.per_client:
            return False
        self._counts[key] = count + 1
        self.open += 1
        return True

    def release(self, client_ip: str, *, exempt: bool = False) -> None:
        if exempt:
            self.open = max(0, self.open - 1)
            return
        key = client_key(client_ip)
        count = self._counts.get(key, 0)
        if count <= 1:
            self._counts.pop(key, None)
        else:
            self._counts[key] = count - 1
        if count:
            self.open -= 1

    def count(self, client_ip: str) -> int:
        return self._counts.get(client_key(client_ip), 0)
