"""WireGuard's Cython transport path (``netstack/wireguard/_fast.pyx``) and its
pure-Python twin agree, message by message and on the engine's batch runs
(``open_run``/``seal_run``), which the whole suite also runs on each:
``KAKUREMICHI_NETSTACK_PURE=1 pytest tests/netstack``."""

from __future__ import annotations

import importlib
import ipaddress
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.wireguard import _pure, speedups, transport
from netstack.wireguard.replay import ReplayFilter
from netstack.wireguard.timers import REJECT_AFTER_MESSAGES
from netstack.wireguard.transport import padding_size
from tests.support import need

from .harness import A_IP, B_IP, Clock, ipv4_udp, ipv6_udp, pair


def fast() -> ModuleType:
    try:
        return importlib.import_module("netstack.wireguard._fast")
    except ImportError:
        need(False, "the Cython extension netstack.wireguard._fast is not built")
        raise


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=3000),
    st.sampled_from([0, 1, 16, 80, 1280, 1420, 9000]),
)
def test_twins_agree_on_transport_messages(
    key: bytes, receiver: int, counter: int, packet: bytes, mtu: int
) -> None:
    module = fast()
    sealed = module.TransportCipher(key).seal(receiver, counter, packet, mtu)
    assert sealed == _pure.TransportCipher(key).seal(receiver, counter, packet, mtu)
    assert sealed[:4] == b"\x04\0\0\0"
    assert len(sealed) == 32 + len(packet) + padding_size(len(packet), mtu)
    for cipher in (module.TransportCipher(key), _pure.TransportCipher(key)):
        opened = cipher.open(counter, bytearray(sealed))
        assert opened is not None and opened[: len(packet)] == packet
        assert not any(opened[len(packet) :])  # zero padding
        assert cipher.open(counter ^ 1, sealed) is None  # wrong nonce
        forged = bytearray(sealed)
        forged[-1] ^= 0x80
        assert cipher.open(counter, forged) is None
        assert cipher.open(counter, sealed[:31]) is None


def test_transport_cipher_rejects_bad_keys() -> None:
    module = fast()
    for cls in (module.TransportCipher, _pure.TransportCipher):
        with pytest.raises(ValueError):
            cls(bytes(31))


def test_this_run_uses_the_implementation_the_switch_chose() -> None:
    """In this process the engine runs on what the switch chose: the twins in
    scripts/test.sh's ``KAKUREMICHI_NETSTACK_PURE=1`` run (so that run really tests
    ``_pure.py``), the compiled module otherwise (a missing build skips, and fails
    under ``CI=true``)."""
    if os.environ.get("KAKUREMICHI_NETSTACK_PURE") == "1":
        module, name = _pure, "pure"
    else:
        module, name = fast(), "cython"
    assert name == speedups.IMPLEMENTATION
    assert transport.open_run is module.open_run
    assert transport.seal_run is module.seal_run
    clock = Clock()
    net, a, b = pair(clock)
    assert a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"), clock.now)
    net.pump()
    for engine, other in ((a, b), (b, a)):
        peer = engine.peer(other.public_key)
        assert peer is not None and peer.current is not None
        assert type(peer.current.send) is module.TransportCipher
        assert type(peer.current.receive) is module.TransportCipher


# The batch runs, compiled against twin.  In the suite they run only through the engine,
# on one implementation per run; here both get the same random batches side by side:
# runs to the peer broken by packets routed elsewhere, unroutable or malformed ones,
# and (open_run) forgeries, replays, other sessions, other addresses and keepalives.

PEER, OTHER = object(), object()
ADDR, ELSEWHERE = ("192.0.2.1", 51820), ("192.0.2.9", 51820)
RECEIVER = 0x11223344
_SOURCES = {"10.0.0.2": PEER, "fd00::2": PEER, "10.0.0.3": OTHER, "fd00::3": OTHER}


@st.composite
def inner_packets(draw: st.DrawFn) -> bytes:
    """An IP packet as the tunnel carries it, or something that only looks like one."""
    payload = draw(st.binary(max_size=300))
    # mostly to the peer (long runs), else to another peer or unroutable
    host = draw(st.sampled_from(["2"] * 8 + ["3", "4"]))
    v4 = ipv4_udp(f"10.0.0.{host}", f"10.0.0.{host}", payload)
    v6 = ipv6_udp(f"fd00::{host}", f"fd00::{host}", payload)
    kind = draw(st.sampled_from(["v4", "v6"] * 8 + ["short", "long", "version", "empty"]))
    if kind == "short":
        return v4[: draw(st.integers(0, 19))]
    if kind == "long":  # the IP header claims more than there is
        return v4[:2] + (len(v4) + 1).to_bytes(2, "big") + v4[4:]
    if kind == "version":
        return bytes([0x50]) + v4[1:]
    if kind == "empty":
        return b""
    return v4 if kind == "v4" else v6


def _routes() -> tuple[dict[bytes, object], Callable[[bytes], object]]:
    """Half the known addresses in the cache, the rest found by the lookup."""
    packed = {ipaddress.ip_address(a).packed: owner for a, owner in _SOURCES.items()}
    cache = {a: owner for a, owner in packed.items() if len(a) == 4}
    return cache, lambda address: packed.get(address)


@given(
    st.binary(min_size=32, max_size=32),
    st.lists(inner_packets(), max_size=30),
    st.data(),
)
def test_twins_agree_on_seal_runs(key: bytes, packets: list[bytes], data: st.DataObject) -> None:
    module = fast()
    start = data.draw(st.integers(0, len(packets)))
    counter = data.draw(st.integers(0, 2**64 - 50))
    limit = data.draw(st.sampled_from([2**60, counter + data.draw(st.integers(0, 20))]))
    mtu = data.draw(st.sampled_from([0, 80, 1420]))
    cache = {ipaddress.ip_address(a).packed: owner for a, owner in _SOURCES.items()}
    results = []
    for implementation in (module, _pure):
        out: list[tuple[bytes, object]] = []
        cipher = implementation.TransportCipher(key)
        returned = implementation.seal_run(
            packets, start, cipher, RECEIVER, counter, limit, mtu, 65503, ADDR, PEER, cache, out
        )
        results.append((returned, out))
    assert results[0] == results[1]


# counters mostly in order, sometimes a jump ahead (within and beyond the window) or back
_STEPS = st.sampled_from([1] * 12 + [0, 2, 63, 64, 130, 9000, -1, -70, -9000])


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 12000),
    st.lists(st.tuples(inner_packets(), _STEPS, st.integers(0, 40)), max_size=30),
    st.data(),
)
def test_twins_agree_on_open_runs(
    key: bytes, last: int, messages: list[tuple[bytes, int, int]], data: st.DataObject
) -> None:
    module = fast()
    sealer = _pure.TransportCipher(key)
    batch: list[Any] = []
    counter = last
    for packet, step, twist in messages:
        counter = max(0, counter + step)
        message = sealer.seal(RECEIVER, counter, packet, 1420)
        if twist == 1:  # a forgery
            flipped = bytearray(message)
            flipped[-1] ^= 1
            message = bytes(flipped)
        elif twist == 2:  # another session
            message = sealer.seal(RECEIVER + 1, counter, packet, 1420)
        elif twist == 3:  # a replay of the one before
            message = batch[-1][0] if batch else message
        elif twist == 4:  # a keepalive
            message = sealer.seal(RECEIVER, counter, b"", 1420)
        elif twist == 5:  # not a transport message at all
            message = message[:31] if counter % 2 else bytes([1]) + message[1:]
        batch.append((message, ELSEWHERE if twist == 6 else ADDR))
        if twist == 7:
            batch.append(["not", "a tuple"])
    start = data.draw(st.integers(0, len(batch)))
    limit = data.draw(st.sampled_from([REJECT_AFTER_MESSAGES, last + 20]))
    results = []
    for implementation in (module, _pure):
        replay = ReplayFilter()
        replay.validate(last, REJECT_AFTER_MESSAGES)
        cache, lookup = _routes()
        packets: list[bytes] = []
        returned = implementation.open_run(
            batch,
            start,
            implementation.TransportCipher(key),
            replay,
            RECEIVER,
            ADDR,
            PEER,
            cache,
            lookup,
            packets,
            limit,
        )
        results.append((returned, packets, replay.last, list(replay.ring)))
    assert results[0] == results[1]
