"""One event-loop timer for a deadline that mostly moves later.

A busy connection or WireGuard peer pushes its deadline forward on almost every packet
(the retransmission and tail-loss-probe timers, WireGuard's keepalive and new-handshake
timers).  Re-creating a ``TimerHandle`` on every move costs one per packet; instead a
timer already armed for an earlier moment is left alone: it fires, the owner finds
nothing due, and arms again for what is due then.  Only an earlier deadline replaces
the armed one.  Used by ``netstack.aio.AsyncStack`` and ``netstack.wireguard.aio``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["EarliestTimer"]


class EarliestTimer:
    """Calls ``callback`` (no arguments) by the earliest deadline it was armed for."""

    __slots__ = ("_callback", "_loop", "handle", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        #: the armed handle and its loop time (None: not armed)
        self.handle: asyncio.TimerHandle | None = None
        self.when: float | None = None

    def arm(self, deadline: float | None) -> None:
        """Make sure the callback runs by ``deadline`` (None: nothing to wake for; an
        armed timer fires once more, finds nothing, and is not re-armed)."""
        if deadline is None:
            return
        when = self.when
        if when is not None and when <= deadline:
            return
        if self.handle is not None:
            self.handle.cancel()
        self.when = deadline
        self.handle = self._loop.call_at(deadline, self._fire)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = None
        self.when = None

    def _fire(self) -> None:
        self.handle = None
        self.when = None
        self._callback()
