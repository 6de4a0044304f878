"""A seeded network simulator on a virtual clock, for deterministic stack tests.

Two (or more) ``Stack``s exchange packets through ``Path``s that drop, duplicate,
reorder and delay them from a seeded RNG, optionally through a drop-tail bottleneck
(bandwidth + queue limit).  ``Network.run_until`` advances virtual time to the next
packet delivery or stack deadline, so a test never sleeps and always replays exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from netstack import events as ev
from netstack.ip import parse_ip
from netstack.stack import Stack
from netstack.tcp import TcpConnection


@dataclass
class Impairment:
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # probability of an extra random delay (up to reorder_delay)
    reorder_delay: float = 0.01
    delay: float = 0.005  # one-way propagation delay
    bandwidth: float | None = None  # bytes per second at the bottleneck
    queue_limit: int = 1 << 20  # bytes waiting at the bottleneck (drop-tail)


@dataclass
class PathStats:
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    queue_drops: int = 0


@dataclass
class Path:
    impairment: Impairment
    rng: random.Random
    stats: PathStats = field(default_factory=PathStats)
    busy_until: float = 0.0
    filter: Callable[[bytes], bool] | None = None  # False drops the packet (tests)

    def schedule(self, packet: bytes, now: float) -> list[tuple[float, bytes]]:
        imp = self.impairment
        self.stats.sent += 1
        if self.filter is not None and not self.filter(packet):
            self.stats.dropped += 1
            return []
        if imp.loss and self.rng.random() < imp.loss:
            self.stats.dropped += 1
            return []
        depart = now
        if imp.bandwidth:
            start = max(now, self.busy_until)
            if (start - now) * imp.bandwidth > imp.queue_limit:
                self.stats.queue_drops += 1
                return []
            self.busy_until = start + len(packet) / imp.bandwidth
            depart = self.busy_until
        arrival = depart + imp.delay
        if imp.reorder and self.rng.random() < imp.reorder:
            self.stats.reordered += 1
            arrival += self.rng.random() * imp.reorder_delay
        out = [(arrival, packet)]
        if imp.duplicate and self.rng.random() < imp.duplicate:
            self.stats.duplicated += 1
            out.append((arrival + self.rng.random() * imp.reorder_delay, packet))
        return out


class Network:
    """Stacks joined by impaired paths; routes by destination address."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.stacks: dict[bytes, Stack] = {}
        self.paths: dict[tuple[int, int], Path] = {}
        self._queue: list[tuple[float, int, int, bytes]] = []
        self._seq = 0
        self.events: dict[int, list[ev.StackEvent]] = {}
        self.delivered = 0

    def add(self, stack: Stack, *addresses: bytes) -> Stack:
        for address in addresses:
            self.stacks[address] = stack
        self.events.setdefault(id(stack), [])
        return stack

    def connect(self, a: Stack, b: Stack, impairment: Impairment) -> tuple[Path, Path]:
        ab = Path(impairment, random.Random(self.rng.getrandbits(64)))
        ba = Path(impairment, random.Random(self.rng.getrandbits(64)))
        self.paths[(id(a), id(b))] = ab
        self.paths[(id(b), id(a))] = ba
        return ab, ba

    def _flush(self, stack: Stack) -> None:
        for packet in stack.packets_to_send(self.now):
            ip = parse_ip(packet)
            dest = self.stacks.get(ip.dst)
            if dest is None:
                continue
            path = self.paths[(id(stack), id(dest))]
            for arrival, data in path.schedule(packet, self.now):
                self._seq += 1
                heapq.heappush(self._queue, (arrival, self._seq, id(dest), data))
        self.events[id(stack)].extend(stack.events())

    def unique_stacks(self) -> list[Stack]:
        seen: dict[int, Stack] = {}
        for stack in self.stacks.values():
            seen[id(stack)] = stack
        return list(seen.values())

    def step(self, limit: float) -> bool:
        """Advance to the next event (at most ``limit``); False when nothing is left."""
        stacks = self.unique_stacks()
        for stack in stacks:
            self._flush(stack)
        candidates = [d for s in stacks if (d := s.next_deadline()) is not None]
        if self._queue:
            candidates.append(self._queue[0][0])
        if not candidates:
            return False
        when = min(candidates)
        if when > limit:
            self.now = limit
            return False
        self.now = max(self.now, when)
        by_id = {id(s): s for s in stacks}
        while self._queue and self._queue[0][0] <= self.now:
            _, _, dest_id, packet = heapq.heappop(self._queue)
            by_id[dest_id].receive_packet(packet, self.now)
            self.delivered += 1
        for stack in stacks:
            stack.handle_timer(self.now)
        for stack in stacks:
            self._flush(stack)
        return True

    def run_until(
        self, condition: Callable[[], bool], *, timeout: float = 600.0, max_steps: int = 2_000_000
    ) -> None:
        """Step until ``condition()`` holds; fail on virtual timeout or step budget."""
        deadline = self.now + timeout
        idle = 0
        for _ in range(max_steps):
            if condition():
                return
            if self.step(deadline):
                idle = 0
                continue
            # Nothing in flight: the application side (``condition``) may still make
            # progress (a slow reader), so give it a bounded number of idle rounds.
            idle += 1
            if self.now >= deadline or idle > 100_000:
                if condition():
                    return
                raise AssertionError(f"condition not met by t={self.now:.3f}")
        raise AssertionError("step budget exhausted")

    def take_events(self, stack: Stack) -> list[ev.StackEvent]:
        out = self.events[id(stack)]
        self.events[id(stack)] = []
        return out


class Pump:
    """Application glue for one connection: sends a payload, collects what arrives."""

    def __init__(self, conn: TcpConnection, payload: bytes = b"", *, close_after: bool = True):
        self.conn = conn
        self.payload = payload
        self.offset = 0
        self.received = bytearray()
        self.hasher = hashlib.sha256()
        self.received_len = 0
        self.eof = False
        self.close_after = close_after
        self.closed_sent = False
        self.reading = True
        self.keep = True

    def service(self) -> None:
        conn = self.conn
        if conn.is_closed:
            return
        if self.offset < len(self.payload) and conn.send_buffer_space:
            chunk = self.payload[self.offset : self.offset + conn.send_buffer_space]
            self.offset += conn.send(chunk)
        if self.offset >= len(self.payload) and self.close_after and not self.closed_sent:
            self.closed_sent = True
            conn.close()
        if self.reading:
            data = conn.read()
            if data:
                self.received_len += len(data)
                self.hasher.update(data)
                if self.keep:
                    self.received += data
            if conn.at_eof:
                self.eof = True


def run_pumps(net: Network, pumps: list[Pump], condition: Callable[[], bool], **kw: float) -> None:
    def check() -> bool:
        for pump in pumps:
            pump.service()
        return condition()

    net.run_until(check, **kw)  # type: ignore[arg-type]
