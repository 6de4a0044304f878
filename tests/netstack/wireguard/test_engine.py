"""Deterministic in-memory tests: two (or many) devices on a virtual clock."""

from __future__ import annotations

import random

import pytest

from netstack.wireguard import events as ev
from netstack.wireguard.engine import WireGuardEngine
from netstack.wireguard.errors import ConfigError
from netstack.wireguard.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
)
from netstack.wireguard.timers import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    ZERO_KEY_MATERIAL_AFTER,
)
from netstack.wireguard.transport import padding_size

from .harness import (
    A_ADDR,
    A_IP,
    B_ADDR,
    B_IP,
    Clock,
    Net,
    ipv4_udp,
    ipv6_udp,
    keypair,
    make_engine,
    pair,
)


def kinds(net: Net, start: int = 0) -> list[int]:
    return [d[0][0] for d in net.log[start:]]


def handshake(net: Net, a: WireGuardEngine, b: WireGuardEngine) -> None:
    assert a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"), net.clock.now)
    net.pump()


def test_handshake_initiator_to_responder_and_data_both_ways() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    assert [len(d[0]) for d in net.log[:2]] == [INITIATION_SIZE, RESPONSE_SIZE]
    assert net.received[B_ADDR] == [ipv4_udp(A_IP, B_IP, b"hello")]
    assert ev.HandshakeCompleted(b.public_key, True) in a.events()
    assert ev.HandshakeCompleted(a.public_key, False) in b.events()
    # B's keypair is confirmed: it can now send without another handshake
    start = len(net.log)
    assert b.send_packet(ipv4_udp(B_IP, A_IP, b"back"), clock.now)
    net.pump()
    assert kinds(net, start) == [MESSAGE_TRANSPORT]
    assert net.received[A_ADDR] == [ipv4_udp(B_IP, A_IP, b"back")]


def test_handshake_responder_initiates_when_it_sends_first_with_ipv6_and_psk() -> None:
    clock = Clock()
    net, a, b = pair(clock, psk=bytes(range(32)))
    packet = ipv6_udp("fd00::2", "fd00::1", b"six")
    assert b.send_packet(packet, clock.now)
    net.pump()
    assert net.received[A_ADDR] == [packet]
    assert b.peer(a.public_key).current is not None


def test_psk_mismatch_fails_handshake() -> None:
    clock = Clock()
    net, a, b = pair(clock, psk=bytes(32))
    b.set_peer(a.public_key, preshared_key=bytes([1]) * 32)
    handshake(net, a, b)
    assert net.received[B_ADDR] == []
    assert a.peer(b.public_key).current is None


def test_staged_packets_flushed_in_order_after_handshake() -> None:
    clock = Clock()
    net, a, _ = pair(clock)
    packets = [ipv4_udp(A_IP, B_IP, bytes([i]) * i) for i in range(10)]
    for packet in packets:
        a.send_packet(packet, clock.now)
    net.pump()
    assert net.received[B_ADDR] == packets
    assert len(net.log) == 12  # initiation, response, ten data packets (no extra keepalive)


def test_transport_padding_and_sizes() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    for size in (28, 29, 100, 1419, 1420, 1500):
        start = len(net.log)
        packet = ipv4_udp(A_IP, B_IP, bytes(size - 28))
        a.send_packet(packet, clock.now)
        net.pump()
        wire = len(net.log[start][0])
        assert wire == 32 + size + padding_size(size, 1420)
        assert net.received[B_ADDR][-1] == packet
    assert padding_size(0, 1420) == 0
    assert padding_size(1, 1420) == 15
    assert padding_size(1419, 1420) == 1
    assert padding_size(1500, 1420) == 0  # 80 -> 80 is already a multiple of 16
    assert padding_size(1501, 1420) == 15


def test_rekey_after_120_seconds_by_initiator_without_loss() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    first = a.peer(b.public_key).current
    delivered = 1
    t0 = clock.now
    for step in range(1, 30):
        net.advance(t0 + step * 5)
        a.send_packet(ipv4_udp(A_IP, B_IP, b"x%d" % step), clock.now)
        b.send_packet(ipv4_udp(B_IP, A_IP, b"y%d" % step), clock.now)
        net.pump()
        delivered += 1
    assert len(net.received[B_ADDR]) == delivered  # nothing lost across the rekey
    assert len(net.received[A_ADDR]) == delivered - 1
    initiations = [d for d in net.log if d[0][0] == MESSAGE_INITIATION]
    assert len(initiations) == 2  # first handshake and exactly one rekey (~120 s)
    assert a.peer(b.public_key).current is not first
    assert a.peer(b.public_key).previous is first


def test_keypair_rejected_after_180_seconds() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    net.drop = lambda d: True  # cut the wire: no rekey can happen
    # a packet encrypted now but delivered after REJECT_AFTER_TIME is refused
    a.send_packet(ipv4_udp(A_IP, B_IP, b"late"), clock.now)
    late = net.collect()
    assert len(late) == 1
    clock.now += REJECT_AFTER_TIME + 0.001
    net.drop = lambda d: False
    net.deliver(late[0])
    assert b.packets_received() == []
    # and A no longer uses the old keypair to send: it starts a new handshake
    start = len(net.log)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"new"), clock.now)
    net.pump()
    assert kinds(net, start)[0] == MESSAGE_INITIATION
    assert net.received[B_ADDR][-1] == ipv4_udp(A_IP, B_IP, b"new")


def test_passive_keepalive_after_10_seconds() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    start = len(net.log)
    t = clock.now
    net.advance(t + KEEPALIVE_TIMEOUT - 0.01)
    assert len(net.log) == start
    net.advance(t + KEEPALIVE_TIMEOUT + 0.01)
    sent = net.log[start:]
    assert [(len(d[0]), d[1]) for d in sent] == [(32, B_ADDR)]  # B's empty keepalive


def test_new_handshake_when_data_is_unanswered() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    net.drop = lambda d: d[1] == B_ADDR  # B's answers never arrive
    start = len(net.log)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"anyone?"), clock.now)
    net.pump()
    net.advance(clock.now + 15.4)
    assert MESSAGE_INITIATION in kinds(net, start)


def test_retries_then_give_up_and_zero() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    net.drop = lambda d: True
    t0 = clock.now
    a.send_packet(ipv4_udp(A_IP, B_IP, b"lost"), clock.now)
    net.pump()
    net.advance(t0 + 200)
    initiations = [d for d in net.log if d[0][0] == MESSAGE_INITIATION]
    assert len(initiations) == MAX_TIMER_HANDSHAKES + 2  # 20 tries, as wireguard-go
    assert ev.HandshakeGaveUp(b.public_key) in a.events()
    peer = a.peer(b.public_key)
    assert not peer.staged
    assert peer.timers.zero_key_material is not None
    net.advance(t0 + 200 + ZERO_KEY_MATERIAL_AFTER)
    assert ev.KeysZeroed(b.public_key) in a.events()
    assert a.next_deadline() is None


def test_replay_and_duplicates_rejected_reordering_accepted() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    b.packets_received()
    for i in range(200):
        a.send_packet(ipv4_udp(A_IP, B_IP, i.to_bytes(2, "big")), clock.now)
    batch = net.collect()
    rng = random.Random(5)
    shuffled = batch[:]
    rng.shuffle(shuffled)
    for d in shuffled:
        net.deliver(d)
    got = b.packets_received()
    assert sorted(got) == sorted(ipv4_udp(A_IP, B_IP, i.to_bytes(2, "big")) for i in range(200))
    for d in batch[:50]:  # duplicates
        net.deliver(d)
    assert b.packets_received() == []


def test_packets_older_than_window_rejected() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    b.packets_received()
    for _ in range(8200):
        a.send_packet(ipv4_udp(A_IP, B_IP, b"w"), clock.now)
    batch = net.collect()
    net.deliver(batch[-1])  # counter 8200 (0 was the first handshake packet)
    net.deliver(batch[0])  # counter 1: more than 8128 behind
    net.deliver(batch[100])  # counter 101: within the window
    assert len(b.packets_received()) == 2


def test_previous_keypair_still_accepted_after_rekey() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    b.send_packet(ipv4_udp(B_IP, A_IP, b"confirm"), clock.now)
    net.pump()
    b.send_packet(ipv4_udp(B_IP, A_IP, b"in flight"), clock.now)
    in_flight = net.collect()
    clock.now += 6
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    assert a.peer(b.public_key).previous is not None
    net.deliver(in_flight[0])
    assert a.packets_received() == [ipv4_udp(B_IP, A_IP, b"in flight")]


def test_source_address_not_allowed_is_dropped() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    b.send_packet(ipv4_udp("10.9.0.77", A_IP, b"spoof"), clock.now)
    net.pump()
    assert net.received[A_ADDR] == []


def test_no_route_returns_false() -> None:
    clock = Clock()
    _, a, _ = pair(clock)
    assert not a.send_packet(ipv4_udp(A_IP, "10.99.0.1", b"x"), clock.now)
    assert not a.send_packet(b"\x45", clock.now)
    assert not a.send_packet(b"", clock.now)


def test_initiation_replay_and_flood_rejected() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.initiate_handshake(b.public_key, clock.now)
    (initiation,) = net.collect()
    net.deliver(initiation)
    assert len(b.datagrams_to_send()) == 1
    clock.now += 1
    net.deliver(initiation)  # replayed timestamp
    assert b.datagrams_to_send() == []
    # two fresh initiations 10 ms apart: the second is a flood
    clock.now += 10
    a.initiate_handshake(b.public_key, clock.now)
    (first,) = net.collect()
    a.peer(b.public_key).last_sent_handshake = float("-inf")
    a.initiate_handshake(b.public_key, clock.now)
    (second,) = net.collect()
    net.deliver(first)
    clock.now += 0.010
    net.deliver(second)
    assert len(b.datagrams_to_send()) == 1


def test_bad_mac1_dropped() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.initiate_handshake(b.public_key, clock.now)
    ((data, src, dst),) = net.collect()
    bad = bytearray(data)
    bad[-20] ^= 1
    net.deliver((bytes(bad), src, dst))
    assert b.datagrams_to_send() == []


def test_cookie_reply_under_load_then_mac2() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"under load"), clock.now)
    (initiation,) = net.collect()
    net.deliver(initiation, backlog=500)
    (reply,) = net.collect()
    assert len(reply[0]) == COOKIE_REPLY_SIZE and reply[2] == A_ADDR
    net.deliver(reply)
    assert ev.CookieReceived(b.public_key) in a.events()
    # still under load at the retry: the retry carries mac2 and is accepted
    t = clock.now
    for _ in range(10):
        deadline = a.next_deadline()
        assert deadline is not None
        clock.now = deadline
        a.handle_timer(clock.now)
        batch = net.collect()
        if batch:
            break
    assert clock.now - t >= 5.0
    (retry,) = batch
    assert retry[0][-16:] != bytes(16)  # mac2 present
    net.deliver(retry, backlog=500)
    (response,) = net.collect()
    assert len(response[0]) == RESPONSE_SIZE
    net.deliver(response)
    net.pump()
    assert net.received[B_ADDR] == [ipv4_udp(A_IP, B_IP, b"under load")]


def test_cookie_from_other_address_rejected_under_load() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.initiate_handshake(b.public_key, clock.now)
    (initiation,) = net.collect()
    net.deliver(initiation, backlog=500)
    (reply,) = net.collect()
    net.deliver(reply)
    clock.now += 6
    a.initiate_handshake(b.public_key, clock.now)
    (retry,) = net.collect()
    # same mac2, but arriving from another source address: cookie does not match
    net.deliver(retry, source=("192.0.2.99", 51820), backlog=500)
    out = b.datagrams_to_send()
    assert [len(d) for d, _ in out] == [COOKIE_REPLY_SIZE]


def test_rate_limit_under_load() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.initiate_handshake(b.public_key, clock.now)
    (initiation,) = net.collect()
    net.deliver(initiation, backlog=500)
    (reply,) = net.collect()
    net.deliver(reply)
    responses = 0
    for _ in range(30):  # 30 valid initiations with mac2 within ~0.6 s from one source
        clock.now += 0.021
        a.peer(b.public_key).last_sent_handshake = float("-inf")
        a.initiate_handshake(b.public_key, clock.now)
        (initiation,) = net.collect()
        net.deliver(initiation, backlog=500)
        responses += sum(len(d) == RESPONSE_SIZE for d, _ in b.datagrams_to_send())
    # 20/s with a burst of 5 (4 after the first, as in wireguard-go's token bucket)
    assert 10 <= responses <= 18


def test_roaming_moves_endpoint() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    new_addr = ("198.51.100.7", 40000)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"from new place"), clock.now)
    ((data, _, _),) = net.collect()
    b.receive_datagram(data, new_addr, clock.now)
    assert ev.EndpointChanged(a.public_key, new_addr) in b.events()
    b.send_packet(ipv4_udp(B_IP, A_IP, b"reply"), clock.now)
    ((_, dst2),) = b.datagrams_to_send()
    assert dst2 == new_addr
    # an unauthenticated packet from elsewhere does not move it
    b.receive_datagram(data[:-1] + bytes([data[-1] ^ 1]), ("203.0.113.1", 1), clock.now)
    assert b.peer(a.public_key).endpoint == new_addr


def test_responder_without_endpoint_learns_it() -> None:
    clock = Clock()
    net, a, b = pair(clock, endpoint_on_b=False)
    assert b.peer(a.public_key).endpoint is None
    handshake(net, a, b)
    assert b.peer(a.public_key).endpoint == A_ADDR


def test_persistent_keepalive() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    a.set_peer(b.public_key, persistent_keepalive=25, now=clock.now)
    net.pump()
    assert b.peer(a.public_key).current is not None  # the keepalive caused a handshake
    start = len(net.log)
    net.advance(clock.now + 80)
    from_a = [d for d in net.log[start:] if d[1] == A_ADDR]
    assert len(from_a) == 3 and all(len(d[0]) == 32 for d in from_a)


def test_many_peers_added_removed_updated() -> None:
    clock = Clock()
    net = Net(clock)
    server = make_engine(1000, clock)
    server_addr = ("192.0.2.250", 51820)
    net.attach(server_addr, server)
    clients = []
    for i in range(40):
        client = make_engine(2000 + i, clock)
        addr = (f"192.0.2.{i + 10}", 51820)
        net.attach(addr, client)
        client.set_peer(server.public_key, allowed_ips=["10.0.0.0/8"], endpoint=server_addr)
        server.set_peer(client.public_key, allowed_ips=[f"10.1.{i}.0/24"])
        clients.append((client, addr, f"10.1.{i}.5"))
    for client, _, ip in clients:
        client.send_packet(ipv4_udp(ip, "10.0.0.1", ip.encode()), clock.now)
    net.pump()
    assert len(net.received[server_addr]) == 40
    for _, _, ip in clients:
        server.send_packet(ipv4_udp("10.0.0.1", ip, b"hi"), clock.now)
    net.pump()
    assert all(net.received[addr] == [ipv4_udp("10.0.0.1", ip, b"hi")] for _, addr, ip in clients)
    # remove one, move another's prefix: the rest are undisturbed
    gone, _, gone_ip = clients[0]
    server.remove_peer(gone.public_key)
    assert not server.send_packet(ipv4_udp("10.0.0.1", gone_ip, b"x"), clock.now)
    gone.send_packet(ipv4_udp(gone_ip, "10.0.0.1", b"x"), clock.now)
    moved, _, _ = clients[1]
    server.set_peer(moved.public_key, allowed_ips=["10.1.0.0/24", "10.1.1.0/24"])
    assert server.allowed_ips(moved.public_key)[0].prefixlen == 24
    before = len(net.received[server_addr])
    for client, _, ip in clients[1:]:
        client.send_packet(ipv4_udp(ip, "10.0.0.1", b"again"), clock.now)
    net.pump()
    assert len(net.received[server_addr]) == before + 39
    # a more specific prefix wins over a broader one
    server.set_peer(clients[2][0].public_key, allowed_ips=["10.1.0.0/16", "10.1.2.0/24"])
    server.send_packet(ipv4_udp("10.0.0.1", "10.1.3.5", b"lpm"), clock.now)
    net.pump()
    assert net.received[clients[3][1]][-1] == ipv4_udp("10.0.0.1", "10.1.3.5", b"lpm")


def test_config_errors() -> None:
    clock = Clock()
    a = make_engine(1, clock)
    with pytest.raises(ConfigError):
        a.set_peer(b"short")
    with pytest.raises(ConfigError):
        a.set_peer(a.public_key)
    with pytest.raises(ConfigError):
        a.set_peer(bytes(32))  # low-order point
    with pytest.raises(ConfigError):
        a.set_peer(make_engine(2, clock).public_key, allowed_ips=["not an ip"])
    with pytest.raises(ConfigError):
        WireGuardEngine(b"x", random_bytes=random.Random(1).randbytes, wall_clock=clock.wall)


def test_timestamps_monotonic_across_restart_and_clock_step() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    saved = a.last_timestamp
    assert saved is not None
    # "restart" A with the wall clock stepped back one hour
    clock2 = Clock(clock.now)
    clock2.wall = lambda: clock.wall() - 3600  # type: ignore[method-assign]
    from .harness import keypair as kp

    private, _ = kp(1)
    a2 = WireGuardEngine(
        private,
        random_bytes=random.Random(9).randbytes,
        wall_clock=clock2.wall,
        last_timestamp=saved,
    )
    a2.set_peer(b.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=B_ADDR)
    net.nodes[A_ADDR] = a2
    clock.now += 1
    a2.send_packet(ipv4_udp(A_IP, B_IP, b"after restart"), clock.now)
    net.pump()
    assert net.received[B_ADDR][-1] == ipv4_udp(A_IP, B_IP, b"after restart")


def test_rekey_on_receive_near_expiry() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    b.send_packet(ipv4_udp(B_IP, A_IP, b"confirm"), clock.now)
    net.pump()
    # A (the initiator) only receives keepalives and sends nothing, so only the
    # last-minute rule (REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT) rekeys.
    start = len(net.log)
    t0 = clock.now
    for step in range(1, 40):
        net.advance(t0 + step * 5)
        b.send_keepalive(a.public_key, clock.now)
        net.pump()
    inits = [d for d in net.log[start:] if d[0][0] == MESSAGE_INITIATION]
    assert inits, "A never rekeyed"
    first_init = net.log.index(inits[0])
    keepalives_before = sum(1 for d in net.log[start:first_init] if d[1] == B_ADDR)
    # B sent one keepalive per 5 s, so the rekey came after ~165 s (33 keepalives)
    assert 32 <= keepalives_before <= 34
    assert a.peer(b.public_key).current.created > t0 + 160
    assert REKEY_AFTER_TIME < REJECT_AFTER_TIME


def test_message_count_limits() -> None:
    from netstack.wireguard.timers import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES

    clock = Clock()
    net, a, b = pair(clock)
    handshake(net, a, b)
    keypair = a.peer(b.public_key).current
    assert keypair is not None
    # past REKEY_AFTER_MESSAGES the sender starts a new handshake but keeps sending
    keypair.send_nonce = REKEY_AFTER_MESSAGES + 1
    clock.now += 6  # beyond the REKEY_TIMEOUT rate limit of initiations
    start = len(net.log)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"many"), clock.now)
    net.pump()
    assert kinds(net, start)[:2] == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    # at REJECT_AFTER_MESSAGES a keypair is never used again
    keypair = a.peer(b.public_key).current
    assert keypair is not None
    keypair.send_nonce = REJECT_AFTER_MESSAGES
    clock.now += 6
    start = len(net.log)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"too many"), clock.now)
    net.pump()
    assert kinds(net, start)[0] == MESSAGE_INITIATION
    assert net.received[B_ADDR][-1] == ipv4_udp(A_IP, B_IP, b"too many")
    # and a receiver refuses counters at or above the limit
    replay = b.peer(a.public_key).current.replay
    assert not replay.validate(REJECT_AFTER_MESSAGES, REJECT_AFTER_MESSAGES)


def test_unknown_initiator_and_duplicate_response_dropped() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    stranger = make_engine(77, clock)
    stranger.set_peer(b.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=B_ADDR)
    stranger.initiate_handshake(b.public_key, clock.now)
    ((data, _),) = stranger.datagrams_to_send()
    b.receive_datagram(data, ("192.0.2.66", 1), clock.now)
    assert b.datagrams_to_send() == []  # b does not know this key
    a.initiate_handshake(b.public_key, clock.now)
    (initiation,) = net.collect()
    net.deliver(initiation)
    (response,) = net.collect()
    net.deliver(response)
    first = a.peer(b.public_key).current
    assert first is not None
    a.datagrams_to_send()
    net.deliver(response)  # replayed response: no second session
    assert a.peer(b.public_key).current is first
    assert a.datagrams_to_send() == []


def test_next_deadline_matches_naive_minimum_under_random_operations() -> None:
    """The device's deadline heap against a scan of every peer's timers."""
    rng = random.Random(11)
    clock = Clock()
    net = Net(clock)
    hub = make_engine(500, clock)
    hub_addr = ("192.0.2.200", 51820)
    net.attach(hub_addr, hub)
    spokes = []
    for i in range(25):
        spoke = make_engine(600 + i, clock)
        addr = (f"192.0.2.{i + 1}", 51820)
        net.attach(addr, spoke)
        spoke.set_peer(hub.public_key, allowed_ips=["10.0.0.0/8"], endpoint=hub_addr)
        hub.set_peer(spoke.public_key, allowed_ips=[f"10.2.{i}.0/24"], endpoint=addr)
        spokes.append((spoke, f"10.2.{i}.1"))
    net.drop = lambda d: rng.random() < 0.2

    def naive(device: WireGuardEngine) -> float | None:
        deadlines = [p.timers.next_deadline() for p in device.peers.values()]
        return min((d for d in deadlines if d is not None), default=None)

    for _ in range(400):
        op = rng.random()
        spoke, ip = rng.choice(spokes)
        if op < 0.4:
            spoke.send_packet(ipv4_udp(ip, "10.0.0.1", b"up"), clock.now)
        elif op < 0.7:
            hub.send_packet(ipv4_udp("10.0.0.1", ip, b"down"), clock.now)
        elif op < 0.75:
            hub.set_peer(
                spoke.public_key, persistent_keepalive=rng.choice([0, 5, 25]), now=clock.now
            )
        elif op < 0.78:
            hub.remove_peer(spoke.public_key)
        elif op < 0.8:
            hub.set_peer(spoke.public_key, allowed_ips=[f"{ip}/32"])
        net.pump()
        for device in (hub, *(s for s, _ in spokes)):
            assert device.next_deadline() == naive(device)
        clock.now += rng.choice([0.01, 0.5, 3.0, 11.0])
        for device in (hub, *(s for s, _ in spokes)):
            device.handle_timer(clock.now)
            assert all(
                d is None or d > clock.now
                for d in (p.timers.next_deadline() for p in device.peers.values())
            ), "handle_timer left an expired timer behind"


def test_established_exchanges_draw_no_random_bytes() -> None:
    """Request/response traffic on an established session asks ``random_bytes`` for
    nothing: the timers' jitter comes from a PRNG seeded once (each call of the real
    ``os.urandom`` is a system call, and one per exchange was measurable)."""
    clock = Clock()
    private_a, _ = keypair(1)
    calls: list[int] = []
    rng = random.Random(5)

    def counted(n: int) -> bytes:
        calls.append(n)
        return rng.randbytes(n)

    a = WireGuardEngine(private_a, random_bytes=counted, wall_clock=clock.wall)
    b = make_engine(2, clock)
    net = Net(clock)
    net.attach(A_ADDR, a)
    net.attach(B_ADDR, b)
    a.set_peer(b.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=B_ADDR)
    b.set_peer(a.public_key, allowed_ips=[f"{A_IP}/32"], endpoint=A_ADDR)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"), clock.now)
    net.pump()
    assert net.received[B_ADDR] == [ipv4_udp(A_IP, B_IP, b"hello")]
    before = len(calls)
    jitters = set()
    for i in range(200):
        clock.now += 0.01
        b.send_packet(ipv4_udp(B_IP, A_IP, b"request %d" % i), clock.now)
        net.pump()
        a.send_packet(ipv4_udp(A_IP, B_IP, b"response %d" % i), clock.now)
        net.pump()
        peer = a.peers[b.public_key]
        if peer.timers.new_handshake is not None:
            jitters.add(round(peer.timers.new_handshake - clock.now, 6))
    assert len(net.received[A_ADDR]) == 200
    assert len(calls) == before  # no draw per exchange
    assert len(jitters) > 50  # and the jitter still varies
    assert all(15.0 <= j <= 15.0 + 0.334 for j in jitters)


def test_a_forced_initiation_skips_the_rekey_timeout() -> None:
    """One initiation per REKEY_TIMEOUT, unless forced (the agent moving a gateway onto
    the stream resends at once what blocked UDP swallowed); the responder takes it."""
    clock = Clock()
    net, a, b = pair(clock)
    a.initiate_handshake(b.public_key, clock.now)
    assert len(net.collect()) == 1  # and never delivered: lost
    clock.now += 1
    a.initiate_handshake(b.public_key, clock.now)
    assert net.collect() == []  # rate-limited
    a.initiate_handshake(b.public_key, clock.now, force=True)
    (initiation,) = net.collect()
    net.deliver(initiation)
    (response,) = net.collect()
    net.deliver(response)
    assert a.peer(b.public_key).last_handshake == clock.now
