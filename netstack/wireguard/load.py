"""Whether a device is under load: when handshake messages must carry a cookie (mac2).

Theory of operation: wireguard-go calls a device under load while its queue of
handshake messages waiting for a worker holds at least 1/8 of its 1024 slots, and
keeps saying so for one second afterwards (``device.IsUnderLoad``).  Under load a
handshake message without a valid mac2 gets a cookie reply instead of the
Diffie-Hellman work, and one with a valid mac2 is rate limited per source IP
(whitepaper 5.3; :mod:`.cookie`, :mod:`.ratelimit`).

A sans-IO engine has no queue of its own, so :class:`HandshakeLoad` takes two signals
and either one sets the one-second state:

* ``backlog``, the handshake messages the adapter still holds behind this one (it
  drained them from the socket in one batch): the real queue, so ``backlog >= 128``
  means the same as in wireguard-go -- we are behind.  Like wireguard-go's queue it
  holds QUEUE_HANDSHAKE_SIZE: ``WireGuardEngine.receive_datagrams`` drops the handshake
  messages of a batch beyond the first 1024 unread, so a wake-up's handshake work
  (cookie replies under a flood) stays bounded when the engine falls behind.
* a virtual queue: every handshake message that passed mac1 adds one, and it drains
  at UNDER_LOAD_RATE per second, the pace a worker given about 1/8 of a core keeps
  (one consumed initiation plus the response costs ~250 us here, see
  ``bench/test_wg_flood_bench.py``: 500/s is ~1/8 of a second of work per second).
  It fills to 128 only when handshakes have arrived faster than that for a while, and
  it is capped at 128 so the state ends one second after a flood does, not after the
  flood's whole volume has drained.  A flood the engine could still keep up with
  one message at a time (so the socket never holds 128) would otherwise take half a
  core or more from the tunnel's traffic without ever counting as load.

Only messages with a valid mac1 count: anything else costs one keyed BLAKE2s and
is dropped, and a sender that cannot compute mac1 (it does not know our public key)
should not be able to make the engine demand cookies from everyone.  Time is passed in.
"""

from __future__ import annotations

QUEUE_HANDSHAKE_SIZE = 1024  # wireguard-go: QueueHandshakeSize
UNDER_LOAD_QUEUE = QUEUE_HANDSHAKE_SIZE // 8
UNDER_LOAD_AFTER_TIME = 1.0  # wireguard-go: UnderLoadAfterTime
UNDER_LOAD_RATE = 500.0  # handshake messages per second the virtual queue drains


class HandshakeLoad:
    """The under-load state of one engine, fed once per mac1-valid handshake message."""

    __slots__ = ("_level", "_level_at", "_until")

    def __init__(self) -> None:
        self._level = 0.0  # the virtual queue's length after the last message
        self._level_at = float("-inf")
        self._until = float("-inf")

    def observe(self, now: float, backlog: int) -> bool:
        """Count one handshake message received at ``now`` with ``backlog`` more
        waiting behind it; True when the engine is (still) under load."""
        drained = max(0.0, now - self._level_at) * UNDER_LOAD_RATE
        level = min(max(0.0, self._level - drained) + 1.0, float(UNDER_LOAD_QUEUE))
        self._level = level
        self._level_at = now
        if backlog >= UNDER_LOAD_QUEUE or level >= UNDER_LOAD_QUEUE:
            self._until = now + UNDER_LOAD_AFTER_TIME
            return True
        return now < self._until

    def under_load(self, now: float) -> bool:
        """The state at ``now`` without counting a message (for metrics and tests)."""
        return now < self._until
