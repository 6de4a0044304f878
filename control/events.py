"""An in-process fan-out of what happens in Control, for the dashboard's live pages.

The hub publishes presence (a gateway or agent connected or went away), target
health reported by agents and traffic reported by gateways; the dashboard publishes
the changes its users make.  Each subscriber (one per open ``/events`` stream) has
a bounded queue: publishing never waits, and a subscriber that falls behind loses
its queue and is told to re-read the page (``overflow``) instead of holding memory.

Every event gets the next sequence number and the last ``REPLAY`` events are kept, so
a subscriber can start *after* a given number: a page is rendered with the number of
the newest event it reflects and its stream starts there (and a reconnecting stream
sends the last number it saw, SSE's ``Last-Event-ID``), so nothing that happens
between rendering and subscribing, or while reconnecting, is lost.  A number older
than the ring is answered ``overflow`` (re-read the page).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: events one subscriber may have waiting
QUEUE_SIZE = 256
#: subscribers at once (each is an open browser tab)
MAX_SUBSCRIBERS = 1024
#: recent events kept for subscribers that start after a given sequence number
REPLAY = 512


@dataclass(frozen=True)
class Event:
    """One thing that happened: ``kind`` (presence, health, traffic, change) and data."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    #: the bus's sequence number (0: not one of its events, e.g. ``overflow``)
    seq: int = 0


class Subscription:
    """One subscriber's queue; ``overflowed`` once it missed events."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(Event("overflow"))

    async def next(self, wait: float) -> Event | None:
        """The next event, or None after ``wait`` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Publish to every current subscriber without waiting."""

    def __init__(self, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.max_subscribers = max_subscribers
        self._subscribers: set[Subscription] = set()
        #: events published since start (for /metrics); also the newest's sequence number
        self.published = 0
        self._recent: deque[Event] = deque(maxlen=REPLAY)

    @property
    def seq(self) -> int:
        """The sequence number of the newest event (0 before the first)."""
        return self.published

    def subscribe(self, after: int | None = None) -> Subscription | None:
        """A new subscription, or None while ``max_subscribers`` are open.  With
        ``after``, the events since that sequence number come first (``overflow`` when
        they are no longer all kept)."""
        if len(self._subscribers) >= self.max_subscribers:
            return None
        subscription = Subscription(self)
        if after is not None and after < self.published:
            oldest = self._recent[0].seq if self._recent else self.published + 1
            if after + 1 < oldest:
                subscription.offer(Event("overflow"))
                subscription.overflowed = True
            else:
                for event in self._recent:
                    if event.seq > after:
                        subscription.offer(event)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def publish(self, kind: str, /, **data: Any) -> None:
        self.published += 1
        event = Event(kind, data, self.published)
        self._recent.append(event)
        for subscription in list(self._subscribers):
            subscription.offer(event)

    def close(self) -> None:
        """Tell every subscriber to finish (Control is shutting down)."""
        for subscription in list(self._subscribers):
            subscription.overflowed = True  # nothing more after this
            while not subscription.queue.empty():
                subscription.queue.get_nowait()
            subscription.queue.put_nowait(Event("closing"))

    def __len__(self) -> int:
        return len(self._subscribers)
