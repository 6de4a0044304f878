"""The TCP/IP stack's Cython hot path and its pure-Python twin agree (WireGuard's
transport twins: tests/netstack/wireguard/test_speedups.py); the switch forces the twins.

Run the whole suite against each: ``KAKUREMICHI_NETSTACK_PURE=1 pytest tests/netstack``
uses the twin everywhere; without it the extension is used when built.
"""

from __future__ import annotations

import importlib
import os
import struct
import subprocess
import sys
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack import _pure, speedups, stack, tcp, tcpsend
from netstack import checksum as _checksum
from netstack.ip import build_ipv4, build_ipv6, parse_ip
from netstack.tcpwire import TcpSegment, build_tcp, options_length, parse_tcp
from tests.support import need


def fast() -> ModuleType:
    try:
        return importlib.import_module("netstack._fast")
    except ImportError:
        need(False, "the Cython extension netstack._fast is not built")
        raise


@given(st.binary(max_size=2000), st.integers(0, 0xFFFF))
def test_twins_agree_on_checksums(data: bytes, initial: int) -> None:
    module = fast()
    assert module.checksum(data, initial) == _checksum.pure_checksum(data, initial)
    assert module.ones_sum(bytearray(data), initial) == _checksum.pure_ones_sum(data, initial)
    assert module.ones_sum(memoryview(data), initial) == _checksum.pure_ones_sum(data, initial)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16), st.integers(0, 255))
def test_twins_agree_on_pseudo_headers(v4: bytes, v6: bytes, protocol: int) -> None:
    module = fast()
    for src in (v4, v6):
        for length in (0, 20, 1480, 70000):
            assert module.pseudo_header_sum(src, src[::-1], protocol, length) == (
                _checksum.pure_pseudo_header_sum(src, src[::-1], protocol, length)
            )


def test_environment_switch_forces_the_twin() -> None:
    code = (
        "import netstack.speedups as s, netstack.checksum as c, netstack.wireguard.speedups as w;"
        " print(s.IMPLEMENTATION, c.IMPLEMENTATION, w.IMPLEMENTATION)"
    )
    env = {**os.environ, "KAKUREMICHI_NETSTACK_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["pure"] * 3
    env.pop("KAKUREMICHI_NETSTACK_PURE")
    fast()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["cython"] * 3


def test_this_run_uses_the_implementation_the_switch_chose() -> None:
    """In this process, the modules that call the hot path hold what the switch chose:
    the twin in scripts/test.sh's ``KAKUREMICHI_NETSTACK_PURE=1`` run (so that run
    really tests ``_pure.py``), the compiled module otherwise (a missing build skips,
    and fails under ``CI=true``)."""
    if os.environ.get("KAKUREMICHI_NETSTACK_PURE") == "1":
        module, name = _pure, "pure"
        checksum = _checksum.pure_checksum
    else:
        module, name = fast(), "cython"
        checksum = module.checksum
    assert name == speedups.IMPLEMENTATION
    assert name == _checksum.IMPLEMENTATION
    assert _checksum.checksum is checksum
    assert tcp.receive_established is module.tcp_receive_established
    assert tcpsend.send_run is module.tcp_send_run
    assert stack.receive_tcp_run is module.tcp_receive_run
    assert speedups.parse_tcp_packet is module.parse_tcp_packet


def _tcp_packet(draw: st.DrawFn) -> bytes:
    segment, src, dst = _segment(draw)
    tcp = build_tcp(segment, src, dst)
    return build_ipv6(src, dst, 6, tcp) if len(src) == 16 else build_ipv4(src, dst, 6, tcp)


def _segment(draw: st.DrawFn) -> tuple[TcpSegment, bytes, bytes]:
    v6 = draw(st.booleans())
    src, dst = (bytes(range(16)), bytes(range(16, 32))) if v6 else (b"\n\0\0\1", b"\n\0\0\2")
    u32 = st.integers(0, 2**32 - 1)
    segment = TcpSegment(
        draw(st.integers(0, 65535)),
        draw(st.integers(0, 65535)),
        draw(u32),
        draw(u32),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 65535)),
        draw(st.binary(max_size=64)),
        draw(st.none() | st.integers(0, 65535)),
        draw(st.none() | st.integers(0, 14)),
        draw(st.booleans()),
        draw(st.none() | st.tuples(u32, u32)),
        tuple(draw(st.lists(st.tuples(u32, u32), max_size=4))),
    )
    return segment, src, dst


@st.composite
def tcp_packets(draw: st.DrawFn) -> bytes:
    packet = bytearray(_tcp_packet(draw))
    for flip in draw(st.lists(st.integers(0, 10_000), max_size=3)):
        packet[flip % len(packet)] ^= 1 << (flip % 8)
    if draw(st.booleans()):
        packet = packet[: draw(st.integers(0, len(packet)))]
    return bytes(packet)


@given(tcp_packets() | st.binary(max_size=120))
def test_twins_agree_on_tcp_packets(packet: bytes) -> None:
    module = fast()
    ours = module.parse_tcp_packet(packet, TcpSegment)
    assert ours == _pure.parse_tcp_packet(packet, TcpSegment)
    if ours is not None:
        assert type(ours[2]) is TcpSegment


@given(st.data())
def test_well_formed_tcp_packets_parse(data: st.DataObject) -> None:
    packet = data.draw(st.composite(_tcp_packet)())
    for module in (fast(), _pure):
        parsed = module.parse_tcp_packet(packet, TcpSegment)
        assert parsed is not None
        assert parsed[2] == parse_tcp(parse_ip(packet).payload, parsed[0], parsed[1])


@given(st.data())
def test_twins_agree_on_building_tcp_packets(data: st.DataObject) -> None:
    segment, src, dst = data.draw(st.composite(_segment)())
    built = fast().build_tcp_packet(segment, src, dst)
    assert built == _pure.build_tcp_packet(segment, src, dst)
    parsed = fast().parse_tcp_packet(built, TcpSegment)
    assert parsed is not None and parsed[:2] == (src, dst)
    options = options_length(
        mss=segment.mss is not None,
        wscale=segment.wscale is not None,
        sack_permitted=segment.sack_permitted,
        timestamp=segment.timestamp is not None,
    )
    room = max(0, min(4, (40 - options - 4) // 8))
    assert parsed[2].sack_blocks == segment.sack_blocks[:room]
    assert parsed[2].payload == segment.payload and parsed[2].seq == segment.seq


def test_building_rejects_what_does_not_fit() -> None:
    for module in (fast(), _pure):
        with pytest.raises((ValueError, OverflowError, struct.error)):
            module.build_tcp_packet(TcpSegment(1, 2, 3, 4, 16, 70000), bytes(4), bytes(4))
        with pytest.raises(ValueError):
            module.build_tcp_packet(TcpSegment(1, 2, 3, 4, 16, 1), bytes(4), bytes(16))
