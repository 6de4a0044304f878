"""mac1/mac2/cookie mechanics, the load signal, TAI64N and the rate limiter."""

from __future__ import annotations

import random

from netstack.wireguard.cookie import CookieChecker, CookieGenerator, address_bytes
from netstack.wireguard.messages import COOKIE_REPLY_SIZE, RESPONSE_SIZE, CookieReply
from netstack.wireguard.ratelimit import RateLimiter
from netstack.wireguard.tai64n import Tai64nClock, decode, encode

from .harness import Clock, keypair, pair

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
