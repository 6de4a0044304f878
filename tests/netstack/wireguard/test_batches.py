"""The batch paths (``WireGuardEngine.receive_datagrams`` / ``WireGuardEngine.send_packets``, which the
asyncio adapter uses) leave a device exactly as the one-at-a-time paths do.

Two identical worlds (same seeds, so the same keys) are driven through the same
scenario; one device gets the batch call, its twin the single calls, and every piece of
observable state is compared: packets out, datagrams out, events, counters, timers,
endpoints, replay windows and keypairs.  Run under both ``KAKUREMICHI_NETSTACK_PURE``
settings by the suite, so both ``open_run``/``seal_run`` twins are covered.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from netstack.wireguard.engine import WireGuardEngine, is_handshake
from netstack.wireguard.peer import Peer
from netstack.wireguard.timers import REKEY_AFTER_MESSAGES
from netstack.wireguard.transport import MAX_CONTENT_SIZE

from .harness import A_ADDR, A_IP, B_ADDR, B_IP, Clock, Net, ipv4_udp, ipv6_udp, pair

ROAMED = ("192.0.2.99", 4242)


def world() -> tuple[Net, WireGuardEngine, WireGuardEngine, Clock]:
    clock = Clock()
    net, a, b = pair(clock)
    assert a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"), clock.now)
    net.pump()
    b.packets_received()
    a.packets_received()
    return net, a, b, clock


def peer_state(peer: Peer) -> dict[str, Any]:
    timers = peer.timers
    state: dict[str, Any] = {
        "rx": peer.rx_bytes,
        "tx": peer.tx_bytes,
        "endpoint": peer.endpoint,
        "staged": list(peer.staged),
        "timers": {name: getattr(timers, name) for name in type(timers).__slots__},
    }
    for slot in ("previous", "current", "next"):
        keypair = getattr(peer, slot)
        state[slot] = None
        if keypair is not None:
            state[slot] = (
                keypair.local_index,
                keypair.remote_index,
                keypair.send_nonce,
                keypair.replay.last,
                list(keypair.replay.ring),
            )
    return state


def device_state(device: WireGuardEngine) -> dict[str, Any]:
    return {
        "packets": device.packets_received(),
        "datagrams": device.datagrams_to_send(),
        "events": device.events(),
        "peers": {key: peer_state(peer) for key, peer in device.peers.items()},
    }


def scenario(
    seed: int, a: WireGuardEngine, b: WireGuardEngine, clock: Clock
) -> list[tuple[bytes, Any]]:
    """Datagrams from ``a`` to ``b``: data (v4 and v6), keepalives, a spoofed source, a
    bad IP length, replays, forgeries, reordering, a roamed source, a new handshake
    mid-stream, junk and a wrong receiver index."""
    rng = random.Random(seed)
    for i in range(rng.randrange(40, 160)):
        choice = rng.random()
        payload = rng.randbytes(rng.randrange(0, 1400))
        if choice < 0.6:
            packet = ipv4_udp(A_IP, B_IP, payload)
        elif choice < 0.75:
            packet = ipv6_udp("fd00::1", "fd00::2", payload)
        elif choice < 0.8:
            packet = ipv4_udp("10.9.0.77", B_IP, payload)  # not A's allowed IP at B
        elif choice < 0.85:
            broken = bytearray(ipv4_udp(A_IP, B_IP, payload))
            broken[2:4] = (len(broken) + 9).to_bytes(2, "big")  # claims more than it has
            packet = bytes(broken)
        elif choice < 0.9:
            a.send_keepalive(b.public_key, clock.now)
            continue
        elif choice < 0.92 and i > 10:
            peer = a.peer(b.public_key)
            assert peer is not None
            peer.last_sent_handshake = float("-inf")
            a.initiate_handshake(b.public_key, clock.now)
            continue
        else:
            packet = ipv4_udp(A_IP, B_IP, payload[:50])
        assert a.send_packet(packet, clock.now)
    datagrams: list[tuple[bytes, Any]] = [(data, addr) for data, addr in a.datagrams_to_send()]
    assert datagrams
    out: list[tuple[bytes, Any]] = []
    for data, _ in datagrams:
        roll = rng.random()
        addr = ROAMED if roll < 0.03 else A_ADDR
        out.append((data, addr))
        if roll > 0.95:
            out.append((data, addr))  # duplicate
        elif roll > 0.92 and len(data) > 40:
            forged = bytearray(data)
            forged[rng.randrange(16, len(forged))] ^= 1 << rng.randrange(8)
            out.append((bytes(forged), addr))
        elif roll > 0.9:
            out.append((rng.randbytes(rng.randrange(0, 200)), addr))
        elif roll > 0.88 and len(data) >= 32:
            wrong = bytearray(data)
            wrong[4] ^= 0xFF
            out.append((bytes(wrong), addr))
    for _ in range(len(out) // 10):  # some reordering
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    out.extend(out[: rng.randrange(0, 10)])  # replays of the start
    return out


@pytest.mark.parametrize("seed", range(12))
def test_receive_datagrams_matches_one_at_a_time(seed: int) -> None:
    _, a1, b1, clock1 = world()
    _, a2, b2, clock2 = world()
    assert a1.public_key == a2.public_key and device_state(b1) == device_state(b2)
    batch = scenario(seed, a1, b1, clock1)
    assert scenario(seed, a2, b2, clock2) == batch  # same keys, same messages
    clock1.now = clock2.now = clock1.now + 0.5
    b1.receive_datagrams(batch, clock1.now)
    handshakes = sum(1 for data, _ in batch if is_handshake(data))
    for data, addr in batch:
        if is_handshake(data):
            handshakes -= 1
        b2.receive_datagram(data, addr, clock2.now, backlog=handshakes)
    one, other = device_state(b1), device_state(b2)
    assert one["packets"], "the scenario must deliver packets"
    assert one == other


@pytest.mark.parametrize("seed", range(6))
def test_deferred_handshakes_match_transport_first(seed: int) -> None:
    """With ``deferred`` the batch's transport messages are processed, everything else
    is set aside; passing that back gives the state of one-at-a-time calls on the
    transport messages first, then the rest in their order."""
    _, a1, b1, clock1 = world()
    _, a2, b2, clock2 = world()
    batch = scenario(seed, a1, b1, clock1)
    assert scenario(seed, a2, b2, clock2) == batch
    rng = random.Random(seed)
    peer = a1.peer(b1.public_key)
    assert peer is not None
    for _ in range(3):  # handshake messages among the transport ones
        peer.last_sent_handshake = float("-inf")
        a1.initiate_handshake(b1.public_key, clock1.now)
        ((initiation, _),) = a1.datagrams_to_send()
        batch.insert(rng.randrange(len(batch)), (initiation, A_ADDR))
    clock1.now = clock2.now = clock1.now + 0.5
    deferred: list[tuple[bytes, Any]] = []
    b1.receive_datagrams(batch, clock1.now, deferred=deferred)
    transport = [item for item in batch if item[0][:4] == b"\x04\0\0\0" and len(item[0]) >= 32]
    assert deferred == [item for item in batch if item not in transport]
    assert sum(1 for data, _ in deferred if is_handshake(data)) >= 3
    assert b1.packets_received(), "the transport messages were processed at once"
    b1.receive_datagrams(deferred, clock1.now)
    for data, addr in transport:
        b2.receive_datagram(data, addr, clock2.now)
    handshakes = sum(1 for data, _ in deferred if is_handshake(data))
    for data, addr in deferred:
        if is_handshake(data):
            handshakes -= 1
        b2.receive_datagram(data, addr, clock2.now, backlog=handshakes)
    b1_state, b2_state = device_state(b1), device_state(b2)
    b1_state.pop("packets"), b2_state.pop("packets")  # drained above on b1
    assert b1_state == b2_state


@pytest.mark.parametrize("seed", range(8))
def test_send_packets_matches_one_at_a_time(seed: int) -> None:
    _, a1, b1, clock1 = world()
    _, a2, b2, clock2 = world()
    rng = random.Random(seed)
    if seed % 2:  # cross REKEY_AFTER_MESSAGES inside the batch
        for device, peer_key in ((a1, b1.public_key), (a2, b2.public_key)):
            peer = device.peer(peer_key)
            assert peer is not None and peer.current is not None
            peer.current.send_nonce = REKEY_AFTER_MESSAGES - 5
    packets: list[Any] = []
    for _ in range(rng.randrange(50, 200)):
        roll = rng.random()
        payload = rng.randbytes(rng.randrange(0, 1400))
        if roll < 0.7:
            packets.append(ipv4_udp(A_IP, B_IP, payload))
        elif roll < 0.8:
            packets.append(ipv6_udp("fd00::1", "fd00::2", payload))
        elif roll < 0.85:
            packets.append(ipv4_udp(A_IP, "10.99.0.1", payload))  # no route
        elif roll < 0.88:
            packets.append(b"")
        elif roll < 0.9:
            packets.append(bytes(MAX_CONTENT_SIZE + 1))
        elif roll < 0.93:
            packets.append(bytearray(ipv4_udp(A_IP, B_IP, payload)))
        else:
            packets.append(b"\x45" + bytes(10))  # too short to route
    clock1.now = clock2.now = clock1.now + 0.25
    unroutable = a1.send_packets(packets, clock1.now)
    assert unroutable == sum(1 for packet in packets if not a2.send_packet(packet, clock2.now))
    one, other = device_state(a1), device_state(a2)
    assert one["datagrams"], "the batch must produce messages"
    assert one == other


def test_send_packets_before_a_session_stages_them_in_order() -> None:
    clock = Clock()
    net, a, _ = pair(clock)
    packets = [ipv4_udp(A_IP, B_IP, bytes([i])) for i in range(20)]
    assert a.send_packets(packets, clock.now) == 0
    net.pump()
    assert net.received[B_ADDR] == packets
