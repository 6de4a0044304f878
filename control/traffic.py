"""What gateways and agents report in ``stats``: per-tunnel traffic over the last hour
and the age of every WireGuard handshake.

Theory of operation
-------------------
Each ``stats`` frame carries counts since the sender's previous one.  They are added
to the tunnel's bucket of the current minute; a tunnel keeps the last ``MINUTES``
buckets in a ring (memory per tunnel is fixed), so "the last hour" costs nothing to
keep up to date and is read by summing.  Several gateways report the same tunnel:
their counts add up, which is the tunnel's traffic.

Handshakes are kept per public key as the wall time of the latest handshake any
reporter saw (a gateway about an agent, an agent about a gateway); the dashboard
shows the age of the newest.  Reports also say which transport each session uses
(``udp``, or ``tcp`` when WireGuard goes over the stream transport because UDP is
blocked); a key is shown on ``tcp`` while any report within ``TRANSPORT_WINDOW``
seconds said so (an agent may reach one gateway over UDP and another over TCP).

Sans-IO: every method takes ``now`` (wall seconds); nothing here reads a clock.
Memory is bounded by the tunnels and keys Control knows: the hub passes the ids of
the tunnels that exist with every report, counts for others are ignored and the rings
of deleted ones dropped (:meth:`Traffic.forget` drops one at once).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.protocol import PeerHandshake, TunnelTraffic

MINUTES = 60
#: public keys remembered at once (a key never seen again ages out)
MAX_KEYS = 100_000
#: how long a report of the stream transport (tcp) for a key is shown
TRANSPORT_WINDOW = 60.0


@dataclass
class Bucket:
    """One minute of one tunnel."""

    minute: int
    requests: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class Totals:
    """Sums over a window."""

    requests: int
    errors: int
    bytes_in: int
    bytes_out: int


class Traffic:
    """Per-tunnel minute buckets and handshake times (see the module docstring)."""

    def __init__(self, minutes: int = MINUTES) -> None:
        self.minutes = minutes
        self._rings: dict[str, list[Bucket | None]] = {}
        self._handshakes: dict[str, float] = {}
        self._transports: dict[str, tuple[str, float]] = {}  # key → (transport, when)
        #: ``stats`` frames taken (for /metrics)
        self.reports = 0

    def record(self, tunnels: Iterable[TunnelTraffic], known: set[str], now: float) -> set[str]:
        """Add one report's counts; ids not in ``known`` are ignored.  Returns the
        tunnels whose counts changed."""
        minute = int(now // 60)
        changed = set()
        if len(self._rings) > len(known):  # tunnels deleted since (through any path)
            for gone in self._rings.keys() - known:
                del self._rings[gone]
        for entry in tunnels:
            if entry.tunnel_id not in known:
                continue
            ring = self._rings.get(entry.tunnel_id)
            if ring is None:
                ring = self._rings[entry.tunnel_id] = [None] * self.minutes
            slot = minute % self.minutes
            bucket = ring[slot]
            if bucket is None or bucket.minute != minute:
                bucket = ring[slot] = Bucket(minute)
            bucket.requests += entry.requests
            bucket.errors += entry.errors
            bucket.bytes_in += entry.bytes_in
            bucket.bytes_out += entry.bytes_out
            if entry.requests or entry.errors or entry.bytes_in or entry.bytes_out:
                changed.add(entry.tunnel_id)
        self.reports += 1
        return changed

    def handshakes(self, peers: Iterable[PeerHandshake], now: float) -> None:
        for peer in peers:
            if peer.handshake_age is None:
                continue
            if peer.transport is not None:
                self._transport_seen(peer.public_key, peer.transport, now)
            at = now - peer.handshake_age
            if at > self._handshakes.get(peer.public_key, 0.0):
                if peer.public_key not in self._handshakes and len(self._handshakes) >= MAX_KEYS:
                    oldest = min(self._handshakes, key=self._handshakes.__getitem__)
                    del self._handshakes[oldest]
                self._handshakes[peer.public_key] = at

    def _transport_seen(self, key: str, transport: str, now: float) -> None:
        held = self._transports.get(key)
        recent_tcp = held is not None and held[0] == "tcp" and now - held[1] < TRANSPORT_WINDOW
        if recent_tcp and transport == "udp":
            return  # another reporter's tcp still stands
        if key not in self._transports and len(self._transports) >= MAX_KEYS:
            del self._transports[min(self._transports, key=lambda k: self._transports[k][1])]
        self._transports[key] = (transport, now)

    def transport(self, public_key: str | None) -> str | None:
        """``tcp`` if a report within the window said so, else what the latest said
        (None: nothing reported)."""
        held = self._transports.get(public_key or "")
        return None if held is None else held[0]

    def handshake_age(self, public_key: str | None, now: float) -> float | None:
        """Seconds since the newest handshake anyone reported for this key (None: none)."""
        if not public_key or public_key not in self._handshakes:
            return None
        return max(0.0, now - self._handshakes[public_key])

    def series(self, tunnel_id: str, now: float) -> list[Bucket]:
        """The last ``minutes`` minutes, oldest first, empty minutes as zero buckets."""
        minute = int(now // 60)
        ring = self._rings.get(tunnel_id)
        out = []
        for m in range(minute - self.minutes + 1, minute + 1):
            bucket = ring[m % self.minutes] if ring is not None else None
            out.append(bucket if bucket is not None and bucket.minute == m else Bucket(m))
        return out

    def totals(self, tunnel_id: str, now: float) -> Totals:
        series = self.series(tunnel_id, now)
        return Totals(
            sum(b.requests for b in series),
            sum(b.errors for b in series),
            sum(b.bytes_in for b in series),
            sum(b.bytes_out for b in series),
        )

    def forget(self, tunnel_id: str) -> None:
        self._rings.pop(tunnel_id, None)
