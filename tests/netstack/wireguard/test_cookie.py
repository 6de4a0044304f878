"""mac1/mac2/cookie mechanics, the load signal, TAI64N and the rate limiter."""

from __future__ import annotations

import ipaddress
import random

from netstack.wireguard import events as ev
from netstack.wireguard.cookie import CookieChecker, CookieGenerator, address_bytes
from netstack.wireguard.load import (
    QUEUE_HANDSHAKE_SIZE,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_QUEUE,
    UNDER_LOAD_RATE,
    HandshakeLoad,
)
from netstack.wireguard.messages import COOKIE_REPLY_SIZE, RESPONSE_SIZE, CookieReply
from netstack.wireguard.ratelimit import RateLimiter
from netstack.wireguard.tai64n import Tai64nClock, decode, encode

from .harness import A_ADDR, B_ADDR, Clock, Datagram, Net, keypair, pair

SRC = address_bytes(("192.0.2.1", 51820))


def _message(rng: random.Random, generator: CookieGenerator, now: float) -> bytearray:
    msg = bytearray(rng.randbytes(116) + bytes(32))
    generator.add_macs(msg, now)
    return msg


def test_cookie_round_trip_and_expiry() -> None:
    rng = random.Random(1)
    _, responder_public = keypair(5)
    checker = CookieChecker(responder_public, rng.randbytes)
    generator = CookieGenerator(responder_public)
    msg = _message(rng, generator, 0.0)
    assert checker.check_mac1(bytes(msg))
    assert msg[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    assert not checker.check_mac2(bytes(msg), SRC, 0.0)
    reply = CookieReply.parse(checker.create_reply(bytes(msg), 7, SRC, 0.0).build())
    assert reply.receiver == 7
    assert generator.consume_reply(reply, 0.0)
    assert not generator.consume_reply(reply, 0.0)  # only once per mac1
    msg = _message(rng, generator, 1.0)
    assert checker.check_mac2(bytes(msg), SRC, 1.0)
    assert not checker.check_mac2(bytes(msg), address_bytes(("192.0.2.1", 51821)), 1.0)
    # the responder's secret rotates after 120 s: old cookies stop working
    assert not checker.check_mac2(bytes(msg), SRC, 121.0)
    # and the initiator stops sending a cookie older than 120 s
    assert _message(rng, generator, 121.0)[-16:] == bytes(16)


def test_address_bytes_packs_ip_and_port() -> None:
    assert address_bytes(("192.0.2.1", 51820)) == bytes([192, 0, 2, 1]) + b"\xca\x6c"
    v6 = ipaddress.ip_address("2001:db8::1").packed
    assert address_bytes(("2001:db8::1", 1, 0, 0)) == v6 + b"\x00\x01"
    link_local = ipaddress.ip_address("fe80::1").packed
    assert address_bytes(("fe80::1%eth0", 2, 0, 3)) == link_local + b"\x00\x02"
    mapped = ipaddress.ip_address("::ffff:192.0.2.1").packed
    assert address_bytes(("::ffff:192.0.2.1", 3)) == mapped + b"\x00\x03"
    assert address_bytes(("not-an-ip", 4)) == b"not-an-ip\x00\x04"  # e.g. a test fake


def test_cookie_reply_for_another_message_rejected() -> None:
    rng = random.Random(2)
    _, responder_public = keypair(5)
    checker = CookieChecker(responder_public, rng.randbytes)
    generator = CookieGenerator(responder_public)
    first = _message(rng, generator, 0.0)
    _message(rng, generator, 0.0)  # a newer message replaces the remembered mac1
    reply = checker.create_reply(bytes(first), 1, SRC, 0.0)
    assert not generator.consume_reply(reply, 0.0)
    other = CookieGenerator(keypair(6)[1])
    assert not other.consume_reply(reply, 0.0)  # no message sent yet


def test_under_load_lasts_one_second_after_backlog() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    peer = a.peer(b.public_key)
    assert peer is not None

    def answer(backlog: int) -> int:
        peer.last_sent_handshake = float("-inf")
        a.initiate_handshake(b.public_key, clock.now)
        (initiation,) = net.collect()
        net.deliver(initiation, backlog=backlog)
        (out,) = b.datagrams_to_send()
        return len(out[0])

    assert answer(127) == RESPONSE_SIZE  # below wireguard-go's 1024/8 threshold
    clock.now += 1
    assert answer(128) == COOKIE_REPLY_SIZE
    clock.now += 0.9
    assert answer(0) == COOKIE_REPLY_SIZE  # still under load (UNDER_LOAD_AFTER_TIME)
    clock.now += 0.2
    assert answer(0) == RESPONSE_SIZE


def test_handshake_rate_alone_is_load() -> None:
    """Without a backlog (one datagram per wake-up), 128 handshake messages faster than
    the virtual queue drains put the device under load."""
    load = HandshakeLoad()
    assert not any(load.observe(10.0, 0) for _ in range(UNDER_LOAD_QUEUE - 1))
    assert load.observe(10.0, 0)
    assert load.under_load(10.0 + UNDER_LOAD_AFTER_TIME - 0.01)


def test_handshake_rate_below_the_drain_is_not_load() -> None:
    load = HandshakeLoad()
    step = 1.0 / (0.8 * UNDER_LOAD_RATE)  # 80% of the drain rate, for 20 s
    assert not any(load.observe(10.0 + i * step, 0) for i in range(int(20 / step)))


def test_flood_ends_load_one_second_after_it_stops() -> None:
    load = HandshakeLoad()
    step = 1.0 / (4 * UNDER_LOAD_RATE)
    states = [load.observe(10.0 + i * step, 0) for i in range(int(30 / step))]  # 30 s
    first = states.index(True)
    assert first * step < 0.2  # the virtual queue fills in ~128 / (2000 - 500) s
    assert all(states[first:])
    end = 10.0 + (len(states) - 1) * step
    # capped at 128: the state does not outlast the flood by its volume / 500 s
    assert load.under_load(end + UNDER_LOAD_AFTER_TIME - 0.01)
    assert not load.observe(end + UNDER_LOAD_AFTER_TIME + 0.01, 0)


def test_backlog_alone_is_load() -> None:
    load = HandshakeLoad()
    assert not load.observe(10.0, UNDER_LOAD_QUEUE - 1)
    assert load.observe(10.0, UNDER_LOAD_QUEUE)


def _initiation(net: Net, a_public_key: bytes, b_public_key: bytes) -> Datagram:
    a = net.nodes[A_ADDR]
    peer = a.peer(b_public_key)
    assert peer is not None
    peer.last_sent_handshake = float("-inf")
    a.initiate_handshake(b_public_key, net.clock.now)
    (initiation,) = net.collect()
    return initiation


def test_device_replays_of_one_initiation_get_cookie_replies() -> None:
    """One datagram at a time (backlog 0): the first 127 copies are processed (one
    response, the rest refused as replays after the DH work), then cookie replies."""
    clock = Clock()
    net, a, b = pair(clock)
    initiation = _initiation(net, a.public_key, b.public_key)
    sizes = []
    for _ in range(200):
        net.deliver(initiation)
        sizes.extend(len(d) for d, _ in b.datagrams_to_send())
    assert sizes == [RESPONSE_SIZE] + [COOKIE_REPLY_SIZE] * (200 - UNDER_LOAD_QUEUE + 1)


def test_not_under_load_handshakes_are_answered() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    for _ in range(20):
        clock.now += 0.5  # 2 handshakes a second: the virtual queue stays near empty
        net.deliver(_initiation(net, a.public_key, b.public_key))
        assert [len(d) for d, _ in b.datagrams_to_send()] == [RESPONSE_SIZE]


def _cookie_reply(net: Net, a_public_key: bytes, b_public_key: bytes) -> bytes:
    net.deliver(_initiation(net, a_public_key, b_public_key), backlog=500)
    ((reply, _),) = net.nodes[B_ADDR].datagrams_to_send()
    assert len(reply) == COOKIE_REPLY_SIZE
    return reply


def test_bad_cookie_replies_are_ignored() -> None:
    clock = Clock()
    net, a, b = pair(clock)
    reply = _cookie_reply(net, a.public_key, b.public_key)
    tampered = bytearray(reply)
    tampered[40] ^= 1  # inside the encrypted cookie
    wrong_nonce = bytearray(reply)
    wrong_nonce[8] ^= 1
    wrong_receiver = bytearray(reply)
    wrong_receiver[4] ^= 1
    bad = [
        bytes(tampered),
        bytes(wrong_nonce),
        bytes(wrong_receiver),
        reply[:-1],  # truncated
        reply + b"\0",  # too long
        reply[:4],
        b"\x03",
        b"\x03\x01\x00\x00" + reply[4:],  # reserved bytes set
    ]
    for data in bad:
        a.receive_datagram(data, B_ADDR, clock.now)
        assert a.events() == [] and a.datagrams_to_send() == []
    peer = a.peer(b.public_key)
    assert peer is not None and not peer.cookies.has_cookie
    clock.now += 6
    retry = _initiation(net, a.public_key, b.public_key)
    assert retry[0][-16:] == bytes(16)  # no cookie taken from any of them: no mac2
    # a reply to an older message does not count either
    a.receive_datagram(reply, B_ADDR, clock.now)
    assert a.events() == [] and not peer.cookies.has_cookie
    # the genuine reply to the latest message does
    net.deliver(retry, backlog=500)
    ((fresh, _),) = b.datagrams_to_send()
    a.receive_datagram(fresh, B_ADDR, clock.now)
    assert a.events() == [ev.CookieReceived(b.public_key)]


def test_mac2_gets_through_a_flood_from_another_source() -> None:
    """A flood of initiations keeps the device under load; the peer's retry with
    mac2 is answered while the flooder's copies only get cookie replies."""
    clock = Clock()
    net, a, b = pair(clock)
    flood = _initiation(net, a.public_key, b.public_key)[0]
    flooder = ("198.51.100.66", 40000)
    for _ in range(UNDER_LOAD_QUEUE):
        b.receive_datagram(flood, flooder, clock.now)
    b.datagrams_to_send()
    net.deliver(_initiation(net, a.public_key, b.public_key))
    (reply,) = net.collect()
    assert len(reply[0]) == COOKIE_REPLY_SIZE
    net.deliver(reply)
    for _ in range(50):  # 5 s of flood at 1000/s (twice the drain) until the retry
        clock.now += 0.1
        for _ in range(100):
            b.receive_datagram(flood, flooder, clock.now)
        assert [len(d) for d, _ in b.datagrams_to_send()] == [COOKIE_REPLY_SIZE] * 100
    retry = _initiation(net, a.public_key, b.public_key)
    assert retry[0][-16:] != bytes(16)
    net.deliver(retry)
    assert [len(d) for d, _ in b.datagrams_to_send()] == [RESPONSE_SIZE]


def test_batch_beyond_the_handshake_queue_is_dropped() -> None:
    """Of 1500 handshake messages drained at once, the first 1024 (wireguard-go's
    queue) get cookie replies and the rest are dropped unread."""
    clock = Clock()
    net, a, b = pair(clock)
    flood = _initiation(net, a.public_key, b.public_key)[0]
    flooder = ("198.51.100.66", 40000)
    batch = [(flood, flooder)] * 1500
    b.receive_datagrams(batch, clock.now)
    out = b.datagrams_to_send()
    assert len(out) == QUEUE_HANDSHAKE_SIZE
    assert {len(d) for d, _ in out} == {COOKIE_REPLY_SIZE}


def test_tai64n_encoding_and_monotonicity() -> None:
    assert encode(0).hex() == "400000000000000a00000000"
    assert decode(encode(1_700_000_000_123_456_789)) == 1_700_000_000_123_456_789
    wall = [1_700_000_000.5]
    clock = Tai64nClock(lambda: wall[0])
    first = clock.next()
    assert decode(first) % 10**9 % 2**24 == 0  # nanoseconds whitened to 2**24
    wall[0] -= 100  # the wall clock steps back
    second = clock.next()
    assert second > first
    assert Tai64nClock(lambda: 0.0, last=second).next() > second


def test_rate_limiter_token_bucket() -> None:
    limiter = RateLimiter()
    allowed = [limiter.allow("192.0.2.1", 10.0) for _ in range(10)]
    assert allowed == [True] * 4 + [False] * 6  # like wireguard-go: burst of 5 tokens
    assert limiter.allow("192.0.2.2", 10.0)  # per source
    # the bucket held exactly one packet's cost; 51 ms later it holds 2.02 costs
    assert limiter.allow("192.0.2.1", 10.051)
    assert limiter.allow("192.0.2.1", 10.052)
    assert not limiter.allow("192.0.2.1", 10.053)
    limiter.allow("192.0.2.3", 20.0)  # garbage collection of idle buckets
    assert len(limiter) == 1
