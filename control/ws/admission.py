"""A cap on unauthenticated WebSocket connections per remote address.

A connection is *pending* from the moment its upgrade request reaches the hub until it
has authenticated, been refused, or gone away (the hub's ``auth`` deadline bounds how
long that can take).  Each address may hold at most ``per_address`` pending
connections; one more is refused before the upgrade (HTTP 429), so a single host
cannot tie up the hub with sockets that never authenticate, while authenticated
clients behind the same address are never counted.

IPv6 clients are counted per /64: one host usually holds a whole /64, so a cap per
single address would be no cap at all.  Refusals are logged once per address per
``log_interval`` seconds with the number refused since the previous line.

Sans-IO: callers pass the current time; nothing here reads a clock.
"""

from __future__ import annotations

import functools

from common.relay.limits import client_key

#: default cap on not-yet-authenticated connections per address
#: (``--max-unauthenticated-per-address``)
DEFAULT_PER_ADDRESS = 16
#: a refusal line per address at most this often (seconds)
LOG_INTERVAL = 60.0
#: forget when an address was last logged once this many are remembered (stale ones go)
_LOGGED_PRUNE_AT = 4096


@functools.lru_cache(maxsize=4096)
def address_key(host: str | None) -> str:
    """What the cap counts by: the IPv4 address, the IPv6 /64, or the host as given
    (the rate limiter's ``client_key``; "?" when the server knows no peer).  Cached:
    parsing the address was 4% of Control's CPU in a reconnect storm, where thousands
    of connections come from a few addresses (a NAT, a load balancer)."""
    return client_key(host) if host else "?"


class PendingAuth:
    """Counts pending connections per address and says when a refusal is to be logged."""

    def __init__(self, per_address: int = DEFAULT_PER_ADDRESS, log_interval: float = LOG_INTERVAL):
        if per_address < 1:
            raise ValueError("per_address must be at least 1")
        self.per_address = per_address
        self.log_interval = log_interval
        self._pending: dict[str, int] = {}
        #: address -> (when a refusal was last logged, refusals since then)
        self._logged: dict[str, tuple[float, int]] = {}

    def pending(self, key: str) -> int:
        return self._pending.get(key, 0)

    def total(self) -> int:
        return sum(self._pending.values())

    def enter(self, key: str) -> bool:
        """Take a slot for a new connection; False (nothing taken) if the cap is reached."""
        count = self._pending.get(key, 0)
        if count >= self.per_address:
            return False
        self._pending[key] = count + 1
        return True

    def leave(self, key: str) -> None:
        """Give back a slot taken by :meth:`enter` (authenticated, refused or gone)."""
        count = self._pending.get(key, 0) - 1
        if count > 0:
            self._pending[key] = count
        else:
            self._pending.pop(key, None)

    def refused(self, key: str, now: float) -> int | None:
        """Count one refusal; the number refused since the last line if one is due now
        (1 for the first), else None."""
        last, unlogged = self._logged.get(key, (None, 0))
        if last is not None and now - last < self.log_interval:
            self._logged[key] = (last, unlogged + 1)
            return None
        if len(self._logged) >= _LOGGED_PRUNE_AT:
            self._logged = {k: v for k, v in self._logged.items() if now - v[0] < self.log_interval}
        self._logged[key] = (now, 0)
        return unlogged + 1
