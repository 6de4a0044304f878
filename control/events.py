"""An in-process fan-out of what happens in Control, for the dashboard's live pages.

The hub publishes presence (a gateway or agent connected or went away), target
health reported by agents and traffic reported by gateways; the dashboard publishes
the changes its users make.  Each subscriber (one per open ``/events`` stream) has
a bounded queue: publishing never waits, and a subscriber that falls behind loses
its queue and is told to re-read the page (``overflow``) instead of holding memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

#: events one subscriber may have waiting
QUEUE_SIZE = 256
#: subscribers at once (each is an open browser tab)
MAX_SUBSCRIBERS = 1024


@dataclass(frozen=True)
class Event:
    """One thing that happened: ``kind`` (presence, health, traffic, change) and data."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


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
        #: events published since start (for /metrics)
        self.published = 0

    def subscribe(self) -> Subscription | None:
        """A new subscription, or None while ``max_subscribers`` are open."""
        if len(self._subscribers) >= self.max_subscribers:
            return None
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def publish(self, kind: str, /, **data: Any) -> None:
        self.published += 1
        event = Event(kind, data)
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
