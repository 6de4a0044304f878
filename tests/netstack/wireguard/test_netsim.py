"""A seeded lossy network on a virtual clock: loss, reordering, duplication, delay.

Two devices exchange numbered packets for several virtual minutes (so rekeys happen
under impairment).  Every delivered packet must be one that was sent, none twice, and
most must get through; handshakes must keep recovering.
"""

from __future__ import annotations

import heapq
import random

import pytest

from netstack.wireguard import events as ev

from .harness import A_ADDR, A_IP, B_ADDR, B_IP, Clock, ipv4_udp, pair


@pytest.mark.parametrize("seed", range(4))
def test_lossy_reordering_duplicating_network(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    net, a, b = pair(clock)
    nodes = {A_ADDR: a, B_ADDR: b}
    loss, dup, jitter = 0.1, 0.05, 0.08
    queue: list[tuple[float, int, bytes, tuple[str, int], tuple[str, int]]] = []
    order = 0

    def transmit() -> None:
        nonlocal order
        for src, device in nodes.items():
            for data, dst in device.datagrams_to_send():
                copies = 0 if rng.random() < loss else (2 if rng.random() < dup else 1)
                for _ in range(copies):
                    order += 1
                    when = clock.now + 0.01 + rng.random() * jitter
                    heapq.heappush(queue, (when, order, data, src, dst))

    sent: dict[tuple[str, int], set[bytes]] = {A_ADDR: set(), B_ADDR: set()}
    got: dict[tuple[str, int], list[bytes]] = {A_ADDR: [], B_ADDR: []}
    completed = 0
    end = clock.now + 400.0
    next_send = clock.now
    counter = 0
    for _ in range(200_000):
        deadlines = [d for d in (a.next_deadline(), b.next_deadline()) if d is not None]
        candidates = [*deadlines, next_send]
        if queue:
            candidates.append(queue[0][0])
        clock.now = max(clock.now, min(candidates))
        if clock.now >= end:
            break
        while queue and queue[0][0] <= clock.now:
            _, _, data, src, dst = heapq.heappop(queue)
            nodes[dst].receive_datagram(data, src, clock.now)
        for device in nodes.values():
            device.handle_timer(clock.now)
        if clock.now >= next_send:
            counter += 1
            for dst_ip, src_ip, device, to in ((B_IP, A_IP, a, B_ADDR), (A_IP, B_IP, b, A_ADDR)):
                packet = ipv4_udp(
                    src_ip, dst_ip, counter.to_bytes(4, "big") + bytes(rng.randrange(200))
                )
                device.send_packet(packet, clock.now)
                sent[to].add(packet)
            next_send = clock.now + rng.choice([0.05, 0.5, 3.0])
        transmit()
        for addr, device in nodes.items():
            got[addr].extend(device.packets_received())
            completed += sum(isinstance(e, ev.HandshakeCompleted) for e in device.events())
    else:  # pragma: no cover
        raise AssertionError("simulation did not finish")

    for addr in nodes:
        assert len(got[addr]) == len(set(got[addr])), "a packet was delivered twice"
        assert set(got[addr]) <= sent[addr], "delivered a packet nobody sent"
        assert len(got[addr]) >= 0.75 * len(sent[addr]), (len(got[addr]), len(sent[addr]))
    assert completed >= 4  # initial handshake plus rekeys every ~2 minutes, on both sides
    assert net is not None


def test_simultaneous_initiation_converges() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"a first"), clock.now)
    b.send_packet(ipv4_udp(B_IP, A_IP, b"b first"), clock.now)
    net.pump()
    net.advance(clock.now + 30)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"later"), clock.now)
    b.send_packet(ipv4_udp(B_IP, A_IP, b"later"), clock.now)
    net.pump()
    assert ipv4_udp(A_IP, B_IP, b"later") in net.received[B_ADDR]
    assert ipv4_udp(B_IP, A_IP, b"later") in net.received[A_ADDR]
