"""Property and fuzz tests: every parser yields a value, its own error, or a silent drop."""

from __future__ import annotations

import contextlib
import ipaddress
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstack.wireguard.allowedips import AllowedIPs
from netstack.wireguard.config import decode_key, parse_config, parse_endpoint
from netstack.wireguard.errors import ConfigError, MessageError
from netstack.wireguard.messages import (
    CookieReply,
    Initiation,
    Response,
    TransportHeader,
    message_type,
)
from netstack.wireguard.replay import WINDOW_SIZE, ReplayFilter
from netstack.wireguard.tai64n import decode

from .harness import A_ADDR, A_IP, B_IP, Clock, ipv4_udp, pair

FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# datagrams that look like WireGuard: a plausible type word and a plausible size
wg_like = st.one_of(
    st.binary(max_size=200),
    st.tuples(
        st.sampled_from([1, 2, 3, 4, 5, 0, 255]),
        st.sampled_from([148, 92, 64, 32, 33, 100, 1452, 0, 3]),
    ).flatmap(
        lambda ts: st.binary(min_size=max(ts[1] - 4, 0), max_size=max(ts[1] - 4, 0)).map(
            lambda body: bytes([ts[0], 0, 0, 0]) + body
        )
    ),
)


@FAST
@given(wg_like)
def test_message_parsers_raise_only_message_error(data: bytes) -> None:
    kind = message_type(data)
    assert kind in (None, 1, 2, 3, 4)
    for parser in (Initiation.parse, Response.parse, CookieReply.parse, TransportHeader.parse):
        try:
            parsed = parser(data)
        except MessageError:
            continue
        assert kind is not None
        if isinstance(parsed, (Initiation | Response, CookieReply)):
            assert parsed.build() == data


@FAST
@given(st.binary(max_size=16))
def test_tai64n_decode(data: bytes) -> None:
    try:
        decode(data)
    except MessageError:
        assert len(data) != 12 or int.from_bytes(data[8:], "big") >= 10**9


_clock = Clock()
_net, _a, _b = pair(_clock)
_a.send_packet(ipv4_udp(A_IP, B_IP, b"seed"), _clock.now)
_net.pump()
_VALID = [d[0] for d in _net.log]  # initiation, response, one transport message


@FAST
@given(wg_like, st.integers(0, 300))
def test_device_drops_garbage_silently(data: bytes, backlog: int) -> None:
    _b.receive_datagram(data, ("203.0.113.9", 9), _clock.now, backlog=backlog)
    assert _b.packets_received() == []
    for out, _ in _b.datagrams_to_send():
        assert len(out) == 64  # only a cookie reply can answer garbage (valid mac1 + load)


@MEDIUM
@given(
    st.sampled_from(range(len(_VALID))), st.lists(st.integers(0, 10_000), min_size=1, max_size=4)
)
def test_device_drops_mutated_messages(which: int, flips: list[int]) -> None:
    data = bytearray(_VALID[which])
    for flip in flips:
        data[flip % len(data)] ^= 1 << (flip % 8)
    _b.receive_datagram(bytes(data), A_ADDR, _clock.now)
    _b.packets_received()
    _b.datagrams_to_send()
    _b.events()


@MEDIUM
@given(
    st.lists(
        st.tuples(
            st.sampled_from(range(len(_VALID))),
            st.lists(st.integers(0, 10_000), max_size=3),
            st.sampled_from([A_ADDR, ("203.0.113.9", 9)]),
        ),
        max_size=12,
    )
)
def test_device_batch_of_mutated_messages(items: list[tuple[int, list[int], Any]]) -> None:
    """The batch path (what the adapter calls) on mixed valid, replayed and mutated
    messages: silent drops, never an exception."""
    batch = []
    for which, flips, addr in items:
        data = bytearray(_VALID[which])
        for flip in flips:
            data[flip % len(data)] ^= 1 << (flip % 8)
        batch.append((bytes(data), addr))
    _b.receive_datagrams(batch, _clock.now)
    _b.packets_received()
    _b.datagrams_to_send()
    _b.events()


config_line = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["[Interface]", "[Peer]", "[peer]", "[Bogus]", "[", "# c", ""]),
    st.tuples(
        st.sampled_from(
            [
                "PrivateKey",
                "PublicKey",
                "ListenPort",
                "AllowedIPs",
                "Endpoint",
                "PresharedKey",
                "PersistentKeepalive",
                "Address",
                "MTU",
                "DNS",
                "Bogus",
            ]
        ),
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(
                [
                    "0",
                    "51820",
                    "70000",
                    "off",
                    "1.2.3.4:5",
                    "[::1]:7",
                    "10.0.0.0/8, ::/0",
                    "YWJj",
                    "A" * 43 + "=",
                    "x" * 44,
                    "10.0.0.1/24",
                ]
            ),
        ),
    ).map(lambda kv: f"{kv[0]} = {kv[1]}"),
)


@FAST
@given(st.lists(config_line, max_size=12))
def test_config_parser_raises_only_config_error(lines: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config("\n".join(lines))


@FAST
@given(st.text(max_size=60))
def test_key_and_endpoint_parsers(text: str) -> None:
    for parser in (decode_key, parse_endpoint):
        with contextlib.suppress(ConfigError):
            parser(text)


networks = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]), t[1]))
    ),
    st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda t: ipaddress.IPv6Network((t[0] >> (128 - t[1]) << (128 - t[1]), t[1]))
    ),
)


@MEDIUM
@given(
    st.lists(st.tuples(networks, st.integers(0, 5)), max_size=30), st.randoms(use_true_random=False)
)
def test_allowed_ips_against_naive_table(
    entries: list[tuple[object, int]], rnd: random.Random
) -> None:
    table: AllowedIPs[int] = AllowedIPs()
    naive: dict[object, int] = {}
    for network, value in entries:
        table.insert(network, value)  # type: ignore[arg-type]
        naive[network] = value
    if entries and rnd.random() < 0.5:
        victim = rnd.choice(entries)[0]
        table.remove(victim)  # type: ignore[arg-type]
        naive.pop(victim, None)
    probes = (
        [n.network_address for n in naive]
        + [  # type: ignore[attr-defined]
            ipaddress.ip_address(rnd.getrandbits(32)) for _ in range(20)
        ]
        + [ipaddress.ip_address(rnd.getrandbits(128).to_bytes(16, "big")) for _ in range(20)]
    )
    for address in probes:
        best = max(
            (n for n in naive if n.version == address.version and address in n),  # type: ignore[attr-defined]
            key=lambda n: n.prefixlen,  # type: ignore[attr-defined]
            default=None,
        )
        expected = None if best is None else naive[best]
        assert table.lookup(address.packed) == expected


@MEDIUM
@given(st.lists(st.integers(0, 20_000), max_size=300))
def test_replay_filter_against_model(counters: list[int]) -> None:
    window = ReplayFilter()
    seen: set[int] = set()
    highest = -1
    for counter in counters:
        too_old = highest >= 0 and highest - counter > WINDOW_SIZE
        expected = counter not in seen and not too_old
        got = window.validate(counter, 2**64)
        if not too_old and highest - counter < WINDOW_SIZE - 64:
            # inside the guaranteed window the filter is exact
            assert got == expected, (counter, highest)
        if got:
            assert counter not in seen
            seen.add(counter)
            highest = max(highest, counter)
    assert not window.validate(2**64, 2**64)
