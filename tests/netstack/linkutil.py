"""A seeded impairment relay: a ``PacketLink`` wrapper that drops, duplicates,
reorders and delays packets in both directions (the kernel has no netem here)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from netstack.aio import PacketLink


class ImpairedLink:
    def __init__(
        self,
        inner: PacketLink,
        *,
        seed: int,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.005,
    ) -> None:
        self.inner = inner
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.jitter = jitter
        self.stats = {"dropped": 0, "duplicated": 0, "reordered": 0, "passed": 0}
        self._receive: Callable[[bytes], None] | None = None

    def _relay(self, packet: bytes, deliver: Callable[[bytes], None]) -> None:
        rng = self.rng
        if rng.random() < self.loss:
            self.stats["dropped"] += 1
            return
        copies = 2 if rng.random() < self.duplicate else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        loop = asyncio.get_running_loop()
        for _ in range(copies):
            wait = self.delay
            if rng.random() < self.reorder:
                self.stats["reordered"] += 1
                wait += rng.random() * self.jitter
            self.stats["passed"] += 1
            if wait > 0:
                loop.call_later(wait, deliver, packet)
            else:
                deliver(packet)

    def attach(self, receive: Callable[[bytes], None]) -> None:
        self._receive = receive
        self.inner.attach(lambda packet: self._relay(packet, receive))

    def send(self, packet: bytes) -> None:
        self._relay(packet, self.inner.send)
