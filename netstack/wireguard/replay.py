"""Sliding-window replay filter for transport counters (RFC 6479, whitepaper 5.4.6).

Theory of operation: the window is a ring of 128 blocks of 64 bits.  One block is
always kept clear for the counter that moves the window forward, so the usable window
is (128 - 1) * 64 = 8128 counters behind the highest one seen, as in wireguard-go.
A counter is accepted once; older than the window, at or above the limit, or seen
before -> rejected.  Callers validate only after the packet authenticated, so an
attacker cannot move the window.
"""

from __future__ import annotations

_BLOCK_BITS = 64
_RING_BLOCKS = 128
_BLOCK_MASK = _RING_BLOCKS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS  # 8128


class ReplayFilter:
    """Accepts each 64-bit counter at most once within an 8128-counter window.

    ``last`` and ``ring`` are public so the transport's receive path can inline the
    in-order case (same block, above ``last``); everything else goes through
    :meth:`validate`.
    """

    __slots__ = ("last", "ring")

    def __init__(self) -> None:
        self.last = 0
        self.ring = [0] * _RING_BLOCKS

    def reset(self) -> None:
        self.last = 0
        self.ring = [0] * _RING_BLOCKS

    def validate(self, counter: int, limit: int) -> bool:
        """Accept ``counter`` (and remember it) or reject it as replayed/too old."""
        if counter >= limit:
            return False
        ring = self.ring
        block = counter >> 6
        last = self.last
        if counter > last and block == last >> 6:
            # In-order fast path: same block, above the highest seen, so not seen yet.
            self.last = counter
            ring[block & _BLOCK_MASK] |= 1 << (counter & 63)
            return True
        if counter > last:
            current = last >> 6
            diff = block - current
            if diff > _RING_BLOCKS:
                diff = _RING_BLOCKS
            for i in range(current + 1, current + diff + 1):
                ring[i & _BLOCK_MASK] = 0
            self.last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        index = block & _BLOCK_MASK
        bit = 1 << (counter & 63)
        old = ring[index]
        if old & bit:
            return False
        ring[index] = old | bit
        return True
