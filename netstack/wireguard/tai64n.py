"""TAI64N timestamps for handshake initiations (whitepaper 5.1, 5.4.2).

Theory of operation: the responder accepts an initiation only if its 12-byte
timestamp is strictly greater than the last one it accepted from that peer, which
defeats replay of captured initiations.  A wall clock may step backwards (NTP, a
restart with a bad RTC), so :class:`Tai64nClock` remembers the last value it issued
and never issues one that is not larger; the adapter may persist
:attr:`Tai64nClock.last` across restarts and hand it back.  Like wireguard-go the
nanoseconds are rounded down to 2**24 ns (~16.8 ms) so the timestamp does not leak a
precise clock.  The wall clock is injected: the core never reads one itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .errors import MessageError

TAI64_EPOCH = 0x400000000000000A  # 2**62 + 10 (TAI - UTC offset used by WireGuard)
TIMESTAMP_SIZE = 12
_WHITENER = 0x1000000
_NS = 1_000_000_000
_FORMAT = struct.Struct(">QI")


def encode(total_ns: int) -> bytes:
    """TAI64N label for ``total_ns`` nanoseconds since the Unix epoch."""
    seconds, nanos = divmod(total_ns, _NS)
    return _FORMAT.pack(TAI64_EPOCH + seconds, nanos)


def decode(stamp: bytes) -> int:
    """Nanoseconds since the Unix epoch of a TAI64N label."""
    if len(stamp) != TIMESTAMP_SIZE:
        raise MessageError("a TAI64N timestamp is 12 bytes")
    seconds: int
    nanos: int
    seconds, nanos = _FORMAT.unpack(stamp)
    if nanos >= _NS:
        raise MessageError("TAI64N nanoseconds out of range")
    return (seconds - TAI64_EPOCH) * _NS + nanos


class Tai64nClock:
    """Issues strictly increasing TAI64N timestamps from an injected wall clock."""

    def __init__(self, wall_clock: Callable[[], float], last: bytes | None = None) -> None:
        self._wall_clock = wall_clock
        self._last_ns = decode(last) if last is not None else -1

    @property
    def last(self) -> bytes | None:
        """The last timestamp issued (persist it to stay monotonic across restarts)."""
        return encode(self._last_ns) if self._last_ns >= 0 else None

    def next(self) -> bytes:
        total = int(self._wall_clock() * _NS)
        seconds, nanos = divmod(total, _NS)
        total = seconds * _NS + nanos - nanos % _WHITENER
        if total <= self._last_ns:
            total = self._last_ns + 1
        self._last_ns = total
        return encode(total)
