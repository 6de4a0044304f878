"""Wire formats against scapy (an independent oracle), plus fuzzing of the parsers."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Raw

from netstack import checksum
from netstack.icmp import IcmpError, echo_reply, parse_icmp, port_unreachable
from netstack.ip import (
    IpError,
    IpFragmentError,
    build_ipv4,
    build_ipv6,
    pack_address,
    parse_ip,
)
from netstack.tcpwire import (
    ACK,
    PSH,
    SYN,
    TcpError,
    TcpSegment,
    build_tcp,
    options_length,
    parse_tcp,
)
from netstack.udp import UdpError, build_udp, parse_udp

S4, D4 = pack_address("192.0.2.1"), pack_address("198.51.100.2")
S6, D6 = pack_address("2001:db8::1"), pack_address("2001:db8::2")


def test_rfc1071_example_checksum() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum.ones_sum(data) == 0xDDF2
    assert checksum.checksum(data) == 0x220D


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_checksum_matches_naive_sum(data: bytes, initial: int) -> None:
    padded = data + b"\0" if len(data) % 2 else data
    total = initial + sum(
        int.from_bytes(padded[i : i + 2], "big") for i in range(0, len(padded), 2)
    )
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert checksum.checksum(data, initial) == ~total & 0xFFFF
    assert checksum.pure_checksum(data, initial) == ~total & 0xFFFF


def test_ipv4_tcp_parsed_like_scapy() -> None:
    pkt = IP(src="192.0.2.1", dst="198.51.100.2", ttl=33) / TCP(
        sport=1234,
        dport=80,
        seq=0xFFFFFFF0,
        ack=77,
        flags="SA",
        window=29200,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (11, 22)), ("WScale", 7)],
    )
    raw = bytes(pkt)
    ip = parse_ip(raw)
    assert (ip.version, ip.src, ip.dst, ip.protocol, ip.ttl) == (4, S4, D4, 6, 33)
    seg = parse_tcp(ip.payload, ip.src, ip.dst)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (1234, 80, 0xFFFFFFF0, 77)
    assert seg.flags == SYN | ACK and seg.window == 29200
    assert (seg.mss, seg.wscale, seg.sack_permitted, seg.timestamp) == (1460, 7, True, (11, 22))


def test_ipv4_tcp_built_like_scapy_checks() -> None:
    seg = TcpSegment(
        5555,
        443,
        1,
        2,
        ACK | PSH,
        1000,
        b"hello",
        timestamp=(3, 4),
        sack_blocks=((100, 200), (300, 400)),
    )
    raw = build_ipv4(S4, D4, 6, build_tcp(seg, S4, D4), ttl=64)
    pkt = IP(raw)
    assert pkt[IP].chksum == IP(bytes(IP(raw))).chksum
    reference = IP(raw)
    del reference[IP].chksum
    del reference[TCP].chksum
    assert bytes(IP(bytes(reference))) == raw  # scapy recomputes identical checksums
    options = dict(pkt[TCP].options)
    assert options["Timestamp"] == (3, 4)
    assert options["SAck"] == (100, 200, 300, 400)
    assert bytes(pkt[TCP].payload) == b"hello"
    assert pkt.flags == "DF"


def test_ipv6_tcp_and_extension_headers() -> None:
    pkt = (
        IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=9)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1440)])
    )
    ip = parse_ip(bytes(pkt))
    assert (ip.version, ip.protocol, ip.ttl) == (6, 6, 9)
    seg = parse_tcp(ip.payload, ip.src, ip.dst)
    assert seg.mss == 1440 and seg.flags == SYN
    built = build_ipv6(S6, D6, 6, build_tcp(TcpSegment(7, 8, 9, 10, ACK, 11, b"v6"), S6, D6))
    ref = IPv6(built)
    del ref[TCP].chksum
    assert bytes(IPv6(bytes(ref))) == built


def test_fragments_are_reported() -> None:
    frag4 = IP(src="192.0.2.1", dst="198.51.100.2", flags="MF") / UDP() / Raw(b"x" * 20)
    with pytest.raises(IpFragmentError):
        parse_ip(bytes(frag4))
    frag6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment() / UDP()
    with pytest.raises(IpFragmentError):
        parse_ip(bytes(frag6))


def test_udp_against_scapy() -> None:
    for src, dst, ip_layer in ((S4, D4, IP), (S6, D6, IPv6)):
        built = build_udp(53, 5353, b"query", src, dst)
        head = (
            ip_layer(src="192.0.2.1", dst="198.51.100.2")
            if ip_layer is IP
            else IPv6(src="2001:db8::1", dst="2001:db8::2")
        )
        ref = bytes(head / UDP(sport=53, dport=5353) / Raw(b"query"))
        assert parse_ip(ref).payload == built
        datagram = parse_udp(built, src, dst)
        assert (datagram.src_port, datagram.dst_port, datagram.payload) == (53, 5353, b"query")
    with pytest.raises(UdpError):
        parse_udp(built[:-1] + b"X", S6, D6)


def test_icmp_echo_reply_against_scapy() -> None:
    request = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / ICMP(id=7, seq=9) / Raw(b"ping"))
    ip = parse_ip(request)
    reply = echo_reply(parse_icmp(ip.payload, ip.src, ip.dst), ip.dst, ip.src)
    parsed = ICMP(reply)
    assert (parsed.type, parsed.id, parsed.seq, bytes(parsed.payload)) == (0, 7, 9, b"ping")
    ref = ICMP(reply)
    del ref.chksum
    assert bytes(ICMP(bytes(ref))) == reply
    req6 = bytes(
        IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(id=3, seq=4, data=b"x")
    )
    ip6 = parse_ip(req6)
    reply6 = echo_reply(parse_icmp(ip6.payload, ip6.src, ip6.dst), ip6.dst, ip6.src)
    full = IPv6(build_ipv6(ip6.dst, ip6.src, 58, reply6))
    assert isinstance(full.payload, ICMPv6EchoReply)
    assert (full.payload.id, full.payload.seq) == (3, 4)
    ref6 = IPv6(bytes(full))
    del ref6.payload.cksum
    assert bytes(IPv6(bytes(ref6))) == bytes(full)


def test_port_unreachable_quotes_the_packet() -> None:
    offending = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(dport=9) / Raw(b"x" * 100))
    error = ICMP(port_unreachable(offending, D4, S4))
    assert (error.type, error.code) == (3, 3)
    assert bytes(error.payload)[:28] == offending[:28]


def test_bad_checksums_and_truncation_raise_the_layer_error() -> None:
    raw = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=1, dport=2))
    corrupt = bytearray(raw)
    corrupt[10] ^= 0xFF
    with pytest.raises(IpError):
        parse_ip(bytes(corrupt))
    ip = parse_ip(raw)
    flipped = bytearray(ip.payload)
    flipped[4] ^= 0x01
    with pytest.raises(TcpError):
        parse_tcp(bytes(flipped), ip.src, ip.dst)
    with pytest.raises(TcpError):
        parse_tcp(ip.payload[:10], ip.src, ip.dst)
    with pytest.raises(IcmpError):
        parse_icmp(b"\x08\x00", S4, D4)


ERRORS = (IpError, TcpError, UdpError, IcmpError)


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_fuzz_parsers_raise_only_their_errors(data: bytes) -> None:
    for func in (
        lambda: parse_ip(data),
        lambda: parse_tcp(data, S4, D4, verify_checksum=False),
        lambda: parse_udp(data, S4, D4),
        lambda: parse_icmp(data, S6, D6),
    ):
        with contextlib.suppress(*ERRORS):
            func()


@settings(max_examples=300)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=100),
    st.one_of(st.none(), st.integers(0, 0xFFFF)),
    st.one_of(st.none(), st.integers(0, 14)),
    st.booleans(),
    st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))),
    st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)), max_size=3),
)
def test_tcp_build_parse_roundtrip(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes,
    mss: int | None,
    wscale: int | None,
    sack_permitted: bool,
    timestamp: tuple[int, int] | None,
    sack: list[tuple[int, int]],
) -> None:
    seg = TcpSegment(
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        payload,
        mss,
        wscale,
        sack_permitted,
        timestamp,
        tuple(sack),
    )
    base = options_length(
        mss=mss is not None,
        wscale=wscale is not None,
        sack_permitted=sack_permitted,
        timestamp=timestamp is not None,
    )
    room = max(0, (40 - base - 4) // 8)  # SACK blocks beyond 40 option bytes are dropped
    expected = dataclasses.replace(seg, sack_blocks=seg.sack_blocks[:room])
    assert parse_tcp(build_tcp(seg, S6, D6), S6, D6) == expected


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 59), st.integers(0, 255))
def test_fuzz_mutated_tcp_packets(payload: bytes, position: int, value: int) -> None:
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, payload, timestamp=(1, 2), sack_blocks=((5, 6),))
    raw = bytearray(build_ipv4(S4, D4, 6, build_tcp(seg, S4, D4)))
    raw[position % len(raw)] = value
    try:
        ip = parse_ip(bytes(raw))
        parse_tcp(ip.payload, ip.src, ip.dst)
    except ERRORS:
        pass
