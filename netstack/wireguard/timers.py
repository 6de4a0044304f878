"""Protocol constants and per-peer timers, exactly as wireguard-go's timers.go.

Theory of operation: each peer has five one-shot timers, each either unset (``None``)
or a deadline on the caller's monotonic clock.  Protocol events arm or disarm them
through the ``on_*`` hooks below (names follow wireguard-go's ``timers*`` functions);
``WireGuardEngine.handle_timer(now)`` fires the expired ones:

* retransmit_handshake -- REKEY_TIMEOUT + jitter after an initiation; retry until
  MAX_TIMER_HANDSHAKES, then give up, drop staged packets and schedule zeroing.
* send_keepalive -- KEEPALIVE_TIMEOUT after receiving data we did not answer.
* new_handshake -- KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter after sending data we
  got no answer to: the session may be dead, so start a fresh handshake.
* zero_key_material -- 3 * REJECT_AFTER_TIME after the last session was derived.
* persistent_keepalive -- the configured interval after any authenticated packet.

What each one does when it fires is the engine's (:mod:`.engine`); :class:`TimerHeap`
finds the peers whose deadlines have passed without scanning every peer, and
:class:`Jitter` is the handshake timers' random 0-333 ms.

Nothing here reads a clock or a random source: ``now`` and the jitter's seed are
passed in.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Generic, Protocol, TypeVar

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
REKEY_TIMEOUT_JITTER_MAX_MS = 334
REJECT_AFTER_TIME = 180.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020
ZERO_KEY_MATERIAL_AFTER = REJECT_AFTER_TIME * 3
# keepKeyFreshReceiving: initiate if our session is about to be rejected by the peer.
LAST_MINUTE_HANDSHAKE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165
MAX_STAGED_PACKETS = 128
PADDING_MULTIPLE = 16


class PeerTimers:
    """The five deadlines and three flags of one peer's timer state machine."""

    __slots__ = (
        "handshake_attempts",
        "need_another_keepalive",
        "new_handshake",
        "persistent_keepalive",
        "persistent_keepalive_interval",
        "retransmit_handshake",
        "send_keepalive",
        "sent_last_minute_handshake",
        "zero_key_material",
    )

    def __init__(self, persistent_keepalive_interval: int = 0) -> None:
        self.retransmit_handshake: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_key_material: float | None = None
        self.persistent_keepalive: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.persistent_keepalive_interval = persistent_keepalive_interval

    def next_deadline(self) -> float | None:
        best: float | None = None
        for deadline in (
            self.retransmit_handshake,
            self.send_keepalive,
            self.new_handshake,
            self.zero_key_material,
            self.persistent_keepalive,
        ):
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def on_data_sent(self, now: float, jitter: float) -> None:
        if self.new_handshake is None:
            self.new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter

    def on_data_received(self, now: float) -> None:
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def on_any_authenticated_packet_sent(self) -> None:
        self.send_keepalive = None

    def on_any_authenticated_packet_received(self) -> None:
        self.new_handshake = None

    def on_handshake_initiated(self, now: float, jitter: float) -> None:
        self.retransmit_handshake = now + REKEY_TIMEOUT + jitter

    def on_handshake_complete(self) -> None:
        self.retransmit_handshake = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def on_session_derived(self, now: float) -> None:
        self.zero_key_material = now + ZERO_KEY_MATERIAL_AFTER

    def on_any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive = now + self.persistent_keepalive_interval

    def stop(self) -> None:
        self.retransmit_handshake = None
        self.send_keepalive = None
        self.new_handshake = None
        self.zero_key_material = None
        self.persistent_keepalive = None


class Jitter:
    """REKEY_TIMEOUT's jitter in whole milliseconds below REKEY_TIMEOUT_JITTER_MAX_MS,
    as wireguard-go draws it.  It needs no secrecy: a PRNG seeded once, not a
    getrandom() per data packet sent after a receive (that was one system call per
    HTTP exchange)."""

    __slots__ = ("_random",)

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed).random

    def __call__(self) -> float:
        return int(self._random() * REKEY_TIMEOUT_JITTER_MAX_MS) / 1000.0


class Timed(Protocol):
    """What :class:`TimerHeap` schedules: anything with a peer's timers."""

    @property
    def timers(self) -> PeerTimers: ...


T = TypeVar("T", bound=Timed)


class TimerHeap(Generic[T]):
    """The earliest deadline among many peers' timers, and the peers that are due,
    without scanning them all (a timer wheel's job, as a heap).

    A heap of ``(deadline, seq, peer)`` plus ``touched``, the peers whose timers may
    have moved since it was last brought up to date: whoever changes a peer's timers
    adds the peer there (one set insertion per packet, no heap operation).
    Invariant: every live peer whose timers have a deadline D has an entry with a
    deadline <= D; stale entries are dropped lazily.
    """

    def __init__(self) -> None:
        #: peers whose timers may have changed since the last refresh
        self.touched: set[T] = set()
        self._heap: list[tuple[float, int, T]] = []
        #: the deadline each peer has in ``_heap`` (other entries of it are stale)
        self._armed: dict[T, float] = {}
        self._seq = itertools.count()

    def next_deadline(self) -> float | None:
        """The earliest deadline of any peer's timers, or None."""
        self._refresh()
        heap = self._heap
        armed = self._armed
        while heap:
            deadline, _, peer = heap[0]
            if armed.get(peer) != deadline:
                heapq.heappop(heap)  # stale: the peer is gone or its deadline moved
                continue
            current = peer.timers.next_deadline()
            if current == deadline:
                return deadline
            # moved without the peer being marked touched: take its current deadline
            heapq.heappop(heap)
            if current is None:
                del armed[peer]
            else:
                armed[peer] = current
                heapq.heappush(heap, (current, next(self._seq), peer))
        return None

    def due(self, now: float) -> list[T]:
        """The peers with an entry at or before ``now``, each once, earliest first;
        the caller fires their timers and marks them touched."""
        self._refresh()
        heap = self._heap
        armed = self._armed
        due: dict[T, None] = {}
        while heap and heap[0][0] <= now:
            deadline, _, peer = heapq.heappop(heap)
            if armed.get(peer) == deadline:
                del armed[peer]  # re-armed once its timers ran (it is touched then)
            due[peer] = None
        return list(due)

    def forget(self, peer: T) -> None:
        """``peer`` is gone: its entries are stale from now on."""
        self.touched.discard(peer)
        self._armed.pop(peer, None)

    def _refresh(self) -> None:
        """Give every touched peer's deadline an entry, if it changed (one push per
        change, not a heap rebuild per packet; stale entries are popped lazily)."""
        heap = self._heap
        armed = self._armed
        if len(heap) > 2 * len(armed) + 64:  # compact away stale entries
            heap[:] = [entry for entry in heap if armed.get(entry[2]) == entry[0]]
            heapq.heapify(heap)
        touched = self.touched
        if touched:
            seq = self._seq
            for peer in touched:
                deadline = peer.timers.next_deadline()
                if deadline is None:
                    armed.pop(peer, None)
                elif armed.get(peer) != deadline:
                    armed[peer] = deadline
                    heapq.heappush(heap, (deadline, next(seq), peer))
            touched.clear()
