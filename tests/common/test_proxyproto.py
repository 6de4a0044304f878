"""PROXY protocol v2 (haproxy ``proxy-protocol.txt`` §2.2) and v1 (§2.1): round trips,
byte-exact layout against hand-written vectors and the specification's examples, every
rejection by name, and the fuzz contract: any bytes give a header or a
``ProxyHeaderError``, fed whole or byte by byte; a header in front of each datagram
(UDP tunnels); the headers a target is sent."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.relay import proxyproto
from common.relay.proxyproto import (
    COMMAND_LOCAL,
    COMMAND_PROXY,
    MAX_HEADER_BYTES,
    SIGNATURE,
    TLV_TUNNEL,
    V1_MAX_BYTES,
    HeaderReader,
    ProxyHeader,
    ProxyHeaderError,
    address_pair,
    decode,
    decode_v1,
    encode,
    encode_v1,
    header_length,
    read_header,
    split_datagram,
    target_header,
    v1_line_length,
)

# -- hand-written vectors (§2.2: signature, ver/cmd, fam/proto, length, addresses, TLVs)

SIG_HEX = "0d0a0d0a000d0a515549540a"  # \r\n\r\n\0\r\nQUIT\n

#: LOCAL, UNSPEC/UNSPEC, 5 bytes: TLV 0xE0 of length 2, "t1"
LOCAL_T1 = bytes.fromhex(SIG_HEX + "20" + "00" + "0005" + "e0" + "0002" + "7431")

#: PROXY, INET/STREAM, 12 + 5 bytes: 192.0.2.1 -> 198.51.100.7, 12345 -> 80, then "t1"
PROXY_V4_T1 = bytes.fromhex(
    SIG_HEX + "21" + "11" + "0011" + "c0000201" + "c6336407" + "3039" + "0050" + "e00002" + "7431"
)

#: PROXY, INET6/DGRAM, 36 bytes: [2001:db8::1]:53 -> [2001:db8::2]:5353, no TLV
PROXY_V6_UDP = bytes.fromhex(
    SIG_HEX
    + "21"
    + "22"
    + "0024"
    + "20010db8000000000000000000000001"
    + "20010db8000000000000000000000002"
    + "0035"
    + "14e9"
)


def raw(ver_cmd: int, fam_proto: int, body: bytes, *, length: int | None = None) -> bytes:
    """A header with arbitrary fixed fields (the declared length defaults to the body's)."""
    declared = len(body) if length is None else length
    return SIGNATURE + bytes((ver_cmd, fam_proto)) + struct.pack("!H", declared) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


V4_ADDRESSES = bytes.fromhex("c0000201c633640730390050")


# -- round trips and layout ---------------------------------------------------------


def test_local_with_tunnel_is_byte_exact() -> None:
    assert encode(tunnel_id="t1") == LOCAL_T1
    header = decode(LOCAL_T1)
    assert header == ProxyHeader(COMMAND_LOCAL, None, None, "tcp", ((TLV_TUNNEL, b"t1"),))
    assert header.tunnel_id == "t1"
    assert header_length(LOCAL_T1[:16]) == len(LOCAL_T1) == 21


def test_proxy_ipv4_tcp_is_byte_exact() -> None:
    data = encode(tunnel_id="t1", source=("192.0.2.1", 12345), destination=("198.51.100.7", 80))
    assert data == PROXY_V4_T1
    header = decode(data)
    assert header.command == COMMAND_PROXY
    assert header.source == ("192.0.2.1", 12345)
    assert header.destination == ("198.51.100.7", 80)
    assert header.transport == "tcp"
    assert header.tunnel_id == "t1"


def test_proxy_ipv6_udp_is_byte_exact() -> None:
    data = encode(source=("2001:db8::1", 53), destination=("2001:db8::2", 5353), transport="udp")
    assert data == PROXY_V6_UDP
    header = decode(data)
    assert header == ProxyHeader(
        COMMAND_PROXY, ("2001:db8::1", 53), ("2001:db8::2", 5353), "udp", ()
    )
    assert header.tunnel_id is None


@pytest.mark.parametrize(
    ("source", "destination", "transport", "fam_proto"),
    [
        (("10.0.0.1", 0), ("10.0.0.2", 65535), "tcp", 0x11),
        (("10.0.0.1", 1), ("10.0.0.2", 2), "udp", 0x12),
        (("::1", 443), ("fe80::1", 8443), "tcp", 0x21),
        (("::ffff:c000:201", 7), ("::", 9), "udp", 0x22),  # ::ffff:192.0.2.1
    ],
)
def test_proxy_round_trips(
    source: tuple[str, int], destination: tuple[str, int], transport: str, fam_proto: int
) -> None:
    data = encode(tunnel_id="web", source=source, destination=destination, transport=transport)
    assert data[12] == 0x21 and data[13] == fam_proto
    assert int.from_bytes(data[14:16], "big") == len(data) - 16
    header = decode(data)
    assert (header.source, header.destination, header.transport) == (
        source,
        destination,
        transport,
    )
    assert header.tunnel_id == "web"


def test_extra_tlvs_are_kept_in_order_after_the_tunnel() -> None:
    extra = ((0x01, b"h2"), (0x04, b""), (0xEF, b"\x00" * 300))
    data = encode(tunnel_id="t-é", tlvs=extra)
    header = decode(data)
    assert header.tlvs == ((TLV_TUNNEL, "t-é".encode()), *extra)
    assert header.tlv(0x04) == b""
    assert header.tlv(0x02) is None
    assert header.tunnel_id == "t-é"


def test_local_skips_an_address_block() -> None:
    # §2.2: with LOCAL the receiver must ignore the address information
    header = decode(raw(0x20, 0x11, V4_ADDRESSES + tlv(TLV_TUNNEL, b"t9")))
    assert header.command == COMMAND_LOCAL
    assert header.source is None and header.destination is None
    assert header.tunnel_id == "t9"


def test_bare_local_is_sixteen_bytes() -> None:
    data = encode()
    assert data == bytes.fromhex(SIG_HEX + "20000000")
    assert decode(data) == ProxyHeader()


def test_header_of_exactly_max_bytes_is_accepted() -> None:
    value = b"x" * (MAX_HEADER_BYTES - 16 - 3)
    data = encode(tlvs=((0xE1, value),))
    assert len(data) == MAX_HEADER_BYTES
    assert decode(data).tlv(0xE1) == value
    with pytest.raises(ValueError, match="exceed"):
        encode(tlvs=((0xE1, value + b"x"),))


# -- rejections ---------------------------------------------------------------------

LONG_ID = b"x" * 256

REJECTED = {
    "bad signature": (b"\r\n\r\n\x00\r\nQUIT!" + LOCAL_T1[12:], "signature"),
    "v1 text line": (b"PROXY TCP4 192.0.2.1 198.51.100.7 12345 80\r\n", "signature"),
    "version 1": (raw(0x10, 0x00, b""), "version 1"),
    "version 3": (raw(0x30, 0x00, b""), "version 3"),
    "version 0": (raw(0x01, 0x11, V4_ADDRESSES), "version 0"),
    **{f"command {c}": (raw(0x20 | c, 0x00, b""), f"command {c}") for c in range(2, 16)},
    "family unix": (raw(0x21, 0x31, b"\x00" * 216), "family 3"),
    **{f"family {f}": (raw(0x21, (f << 4) | 1, b""), f"family {f}") for f in range(4, 16)},
    **{f"transport {t}": (raw(0x21, 0x10 | t, V4_ADDRESSES), f"transport {t}") for t in (3, 15)},
    "declared length over max": (
        raw(0x20, 0x00, b"", length=MAX_HEADER_BYTES - 16 + 1),
        "longer than",
    ),
    "declared length 65535": (raw(0x20, 0x00, b"", length=0xFFFF), "longer than"),
    "tlv type only": (raw(0x20, 0x00, b"\xe0"), "truncated TLV"),
    "tlv type and half a length": (
        raw(0x20, 0x00, tlv(0x01, b"ab") + b"\xe0\x00"),
        "truncated TLV",
    ),
    "tlv past the end": (raw(0x20, 0x00, b"\xe0\x00\x05t1"), "past the end"),
    "tlv past the end after a good one": (
        raw(0x20, 0x00, tlv(0x01, b"ok") + b"\x02\x00\x01"),
        "past the end",
    ),
    "empty tunnel id": (raw(0x20, 0x00, tlv(TLV_TUNNEL, b"")), "tunnel id length"),
    "256-byte tunnel id": (raw(0x20, 0x00, tlv(TLV_TUNNEL, LONG_ID)), "tunnel id length"),
    "non-utf8 tunnel id": (raw(0x20, 0x00, tlv(TLV_TUNNEL, b"t\xff")), "not UTF-8"),
    "overlong utf8 tunnel id": (raw(0x20, 0x00, tlv(TLV_TUNNEL, b"\xc0\xaf")), "not UTF-8"),
    "proxy with unspec family": (raw(0x21, 0x01, b""), "needs an address family"),
    "proxy with unspec transport": (raw(0x21, 0x10, V4_ADDRESSES), "needs an address family"),
    "proxy v4 address block short": (raw(0x21, 0x11, V4_ADDRESSES[:11]), "address block"),
    "proxy v6 address block short": (raw(0x21, 0x21, b"\x00" * 35), "address block"),
    "local v4 address block short": (raw(0x20, 0x11, b"\x00" * 4), "address block"),
    "trailing bytes": (LOCAL_T1 + b"G", "trailing bytes"),
    "truncated body": (LOCAL_T1[:-1], "truncated"),
    "truncated fixed part": (LOCAL_T1[:15], "truncated"),
    "empty": (b"", "truncated"),
}


@pytest.mark.parametrize(("data", "reason"), list(REJECTED.values()), ids=list(REJECTED))
def test_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as info:
        decode(data)
    message = str(info.value)
    # "command 1" must not pass for "command 15": numbers end the message
    assert message.endswith(reason) if reason[-1].isdigit() else reason in message


def test_header_length_rejects_the_fixed_part_alone() -> None:
    # the agent decides from the first 16 bytes alone, before reading further
    with pytest.raises(ProxyHeaderError, match="longer than"):
        header_length(raw(0x20, 0x00, b"", length=MAX_HEADER_BYTES))
    assert header_length(raw(0x20, 0x00, b"", length=MAX_HEADER_BYTES - 16)) == MAX_HEADER_BYTES
    with pytest.raises(ProxyHeaderError, match="unknown PROXY command 2"):
        header_length(raw(0x22, 0x00, b""))


def test_the_error_is_a_value_error() -> None:
    assert issubclass(ProxyHeaderError, ValueError)


# -- encode refuses what it cannot express ------------------------------------------

ENCODE_REFUSED = {
    "mixed families": {"source": ("192.0.2.1", 1), "destination": ("::1", 2)},
    "source port -1": {"source": ("192.0.2.1", -1), "destination": ("192.0.2.2", 2)},
    "destination port 65536": {"source": ("192.0.2.1", 1), "destination": ("192.0.2.2", 65536)},
    "source only": {"source": ("192.0.2.1", 1)},
    "destination only": {"destination": ("192.0.2.1", 1)},
    "not an address": {"source": ("example.com", 1), "destination": ("192.0.2.2", 2)},
    "unknown transport": {"transport": "sctp"},
    "empty tunnel id": {"tunnel_id": ""},
    "256-byte tunnel id": {"tunnel_id": "x" * 256},
    "128 two-byte characters": {"tunnel_id": "é" * 128},
    "tlv over 65535 bytes": {"tlvs": ((0xE1, b"x" * 0x10000),)},
    "tlv over the header limit": {"tlvs": ((0xE1, b"x" * 2000),)},
    "tlv type 256": {"tlvs": ((0x100, b""),)},
    "tlv type -1": {"tlvs": ((-1, b""),)},
    "tunnel as a raw tlv": {"tlvs": ((TLV_TUNNEL, b"t1"),)},
}


@pytest.mark.parametrize("kwargs", list(ENCODE_REFUSED.values()), ids=list(ENCODE_REFUSED))
def test_encode_refuses(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError) as info:
        encode(**kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, ProxyHeaderError)  # a caller bug, not bad input


def test_encode_accepts_the_limits() -> None:
    assert decode(encode(tunnel_id="x" * 255)).tunnel_id == "x" * 255
    assert decode(encode(tunnel_id="é" * 127 + "x")).tunnel_id == "é" * 127 + "x"


# -- fuzz: any input gives a header or ProxyHeaderError -----------------------------

addresses_v4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 0xFFFF))
addresses_v6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 0xFFFF))
extra_tlvs = st.lists(
    st.tuples(st.integers(0, 0xFF).filter(lambda t: t != TLV_TUNNEL), st.binary(max_size=40)),
    max_size=4,
).map(tuple)
tunnel_ids = st.none() | st.text(min_size=1, max_size=60)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """An encodable header and the arguments that built it."""
    kwargs: dict[str, object] = {"tunnel_id": draw(tunnel_ids), "tlvs": draw(extra_tlvs)}
    family = draw(st.sampled_from(["local", "v4", "v6"]))
    if family != "local":
        pair = addresses_v4 if family == "v4" else addresses_v6
        kwargs["source"] = draw(pair)
        kwargs["destination"] = draw(pair)
        kwargs["transport"] = draw(st.sampled_from(["tcp", "udp"]))
    return encode(**kwargs), kwargs  # type: ignore[arg-type]


@st.composite
def near_headers(draw: st.DrawFn) -> bytes:
    """Bytes that get past the signature: mostly plausible fixed fields, random rest."""
    ver_cmd = draw(st.sampled_from([0x20, 0x21]) | st.integers(0, 0xFF))
    fam_proto = draw(
        st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x10, 0x01]) | st.integers(0, 0xFF)
    )
    parts = draw(
        st.lists(
            st.binary(max_size=40)
            | st.binary(min_size=12, max_size=12)
            | st.binary(min_size=36, max_size=36)
            | st.builds(tlv, st.sampled_from([TLV_TUNNEL, 0x01]), st.binary(max_size=40)),
            max_size=5,
        )
    )
    body = b"".join(parts)
    # mostly the body's own length, so that decoding gets past the fixed part
    length = draw(st.sampled_from([None, None, None]) | st.integers(0, 0xFFFF))
    return raw(ver_cmd, fam_proto, body, length=length)


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes overwritten, and perhaps cut short."""
    data = bytearray(draw(valid_headers())[0])
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(12, len(data) - 1))] = draw(st.integers(0, 0xFF))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=80)
    | st.binary(max_size=80).map(SIGNATURE.__add__)
    | near_headers()
    | mutated_headers()
)
def test_any_bytes_decode_or_raise_proxy_header_error(data: bytes) -> None:
    try:
        header = decode(data)
    except ProxyHeaderError:
        return
    # what decoded is whole and self-consistent
    assert len(data) == header_length(data[:16]) <= MAX_HEADER_BYTES
    _ = header.tunnel_id  # validated: never a UnicodeDecodeError later
    kinds = [kind for kind, _ in header.tlvs]
    tunnel_first = kinds.count(TLV_TUNNEL) == 0 or (
        kinds.count(TLV_TUNNEL) == 1 and kinds[0] == TLV_TUNNEL
    )
    if (data[13] == 0x00 or header.command == COMMAND_PROXY) and tunnel_first:
        # canonical input re-encodes to the same bytes (encode puts the tunnel first)
        others = tuple((k, v) for k, v in header.tlvs if k != TLV_TUNNEL)
        assert (
            encode(
                tunnel_id=header.tunnel_id,
                source=header.source,
                destination=header.destination,
                transport=header.transport,
                tlvs=others,
            )
            == data
        )


@settings(max_examples=200, deadline=None)
@given(valid_headers())
def test_valid_headers_round_trip_and_every_truncation_fails(
    built: tuple[bytes, dict[str, object]],
) -> None:
    data, kwargs = built
    header = decode(data)
    assert header.tunnel_id == kwargs["tunnel_id"]
    assert header.source == kwargs.get("source")
    assert header.destination == kwargs.get("destination")
    assert header.tlvs[1 if kwargs["tunnel_id"] is not None else 0 :] == kwargs["tlvs"]
    for end in range(len(data)):
        with pytest.raises(ProxyHeaderError):
            decode(data[:end])
    with pytest.raises(ProxyHeaderError, match="trailing"):
        decode(data + b"\x00")


# -- read_header: from a stream, whole or byte by byte ------------------------------

PAYLOAD = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
STREAM_HEADERS = {
    "local tunnel": LOCAL_T1,
    "proxy v4": PROXY_V4_T1,
    "proxy v6 udp": PROXY_V6_UDP,
    "bare local": encode(),
    "tlvs": encode(tunnel_id="t2", tlvs=((0x01, b"h2"), (0xEE, b"z" * 500))),
}


@pytest.mark.parametrize("data", list(STREAM_HEADERS.values()), ids=list(STREAM_HEADERS))
async def test_read_header_whole_leaves_the_payload(data: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data + PAYLOAD)
    reader.feed_eof()
    async with asyncio.timeout(5):
        header = await read_header(reader, 1.0)
        assert header == decode(data)
        assert await reader.read() == PAYLOAD


@pytest.mark.parametrize("data", list(STREAM_HEADERS.values()), ids=list(STREAM_HEADERS))
async def test_read_header_byte_by_byte_gives_the_same(data: bytes) -> None:
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        for i in range(len(data + PAYLOAD)):
            reader.feed_data((data + PAYLOAD)[i : i + 1])
            await asyncio.sleep(0)
        reader.feed_eof()

    async with asyncio.timeout(5):
        feeder = asyncio.ensure_future(trickle())
        header = await read_header(reader, 2.0)
        assert header == decode(data)
        await feeder
        assert await reader.read() == PAYLOAD


@pytest.mark.parametrize("cut", [0, 1, 12, 15, 16, 17, len(PROXY_V4_T1) - 1])
async def test_read_header_eof_inside_the_header(cut: int) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(PROXY_V4_T1[:cut])
    reader.feed_eof()
    async with asyncio.timeout(5):
        with pytest.raises(ProxyHeaderError, match="ended inside"):
            await read_header(reader, 1.0)


@pytest.mark.parametrize("cut", [0, 5, 16, len(PROXY_V4_T1) - 1])
async def test_read_header_stall_times_out(cut: int) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(PROXY_V4_T1[:cut])
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(5):
        with pytest.raises(ProxyHeaderError, match="in time"):
            await read_header(reader, 0.2)
    assert 0.19 <= loop.time() - start < 2.0


async def test_read_header_refuses_bad_fixed_bytes_without_waiting_for_more() -> None:
    # a bad signature or an oversize length is refused from 16 bytes, not after a timeout
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\n", raw(0x20, 0x00, b"", length=0xFFFF)):
        reader = asyncio.StreamReader()
        reader.feed_data(data)  # no EOF: the stream stays open
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ProxyHeaderError):
            await read_header(reader, 5.0)
        assert loop.time() - start < 1.0


async def test_read_header_bad_body_is_proxy_header_error() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(raw(0x20, 0x00, tlv(TLV_TUNNEL, b"\xff")) + PAYLOAD)
    with pytest.raises(ProxyHeaderError, match="UTF-8"):
        await read_header(reader, 1.0)


async def test_read_header_connection_error_is_proxy_header_error() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(LOCAL_T1[:10])
    reader.set_exception(ConnectionResetError("reset by peer"))
    with pytest.raises(ProxyHeaderError, match="connection failed"):
        await read_header(reader, 1.0)


def test_module_names() -> None:
    assert proxyproto.TLV_TUNNEL == 0xE0 and 0xE0 <= TLV_TUNNEL <= 0xEF  # §2.2.7 custom range
    assert proxyproto.FIXED_BYTES == 16 and len(SIGNATURE) == 12


# == version 1 (§2.1), what a target reads, datagrams ====================================


#: §2.1's example, before an HTTP request
V1_EXAMPLE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
#: §2.1's longest lines a receiver must take: 56, 104, 15 and 107 characters
V1_LONGEST_TCP4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
FFFF6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
V1_LONGEST_TCP6 = f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode()
V1_UNKNOWN_SHORT = b"PROXY UNKNOWN\r\n"
V1_UNKNOWN_WORST = f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode()


def test_v1_spec_lengths() -> None:
    lengths = [len(line) for line in (V1_LONGEST_TCP4, V1_LONGEST_TCP6, V1_UNKNOWN_SHORT)]
    assert lengths == [56, 104, 15]
    assert len(V1_UNKNOWN_WORST) == V1_MAX_BYTES == 107


def test_v1_example_is_byte_exact() -> None:
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == V1_EXAMPLE
    header = decode_v1(V1_EXAMPLE)
    assert header == ProxyHeader(
        COMMAND_PROXY, ("192.168.0.1", 56324), ("192.168.0.11", 443), "tcp", (), version=1
    )


def test_v1_longest_lines() -> None:
    top = ("255.255.255.255", 65535)
    assert encode_v1(top, top) == V1_LONGEST_TCP4
    assert decode_v1(V1_LONGEST_TCP4).source == top
    six = decode_v1(V1_LONGEST_TCP6)
    assert six.source == six.destination == (FFFF6, 65535)
    assert encode_v1((FFFF6, 65535), (FFFF6, 65535)) == V1_LONGEST_TCP6
    for line in (V1_UNKNOWN_SHORT, V1_UNKNOWN_WORST):
        header = decode_v1(line)  # UNKNOWN: the rest of the line is ignored
        assert (header.command, header.source, header.version) == (COMMAND_LOCAL, None, 1)
    assert encode_v1() == V1_UNKNOWN_SHORT


@pytest.mark.parametrize(
    ("source", "destination", "line"),
    [
        (("0.0.0.0", 0), ("10.0.0.1", 1), b"PROXY TCP4 0.0.0.0 10.0.0.1 0 1\r\n"),
        (("2001:db8::1", 443), ("::", 80), b"PROXY TCP6 2001:db8::1 :: 443 80\r\n"),
        (("::1", 1), ("fe80::1", 65535), b"PROXY TCP6 ::1 fe80::1 1 65535\r\n"),
    ],
)
def test_v1_round_trips(source: tuple[str, int], destination: tuple[str, int], line: bytes) -> None:
    assert encode_v1(source, destination) == line
    assert decode_v1(line) == ProxyHeader(COMMAND_PROXY, source, destination, version=1)


def test_v1_ipv6_in_any_case_and_full_form() -> None:
    header = decode_v1(b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::2 1 2\r\n")
    assert header.source == ("2001:db8::1", 1)


V1_REJECTED = {
    "not PROXY": (b"GET / HTTP/1.1\r\n", "signature"),
    "lower case": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
    "PROXY without space": (b"PROXY\r\n", "signature"),
    "v2 signature": (LOCAL_T1, "signature"),
    "no protocol": (b"PROXY \r\n", "protocol ''"),
    "UDP4": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol 'UDP4'"),
    "UNKNOWNX": (b"PROXY UNKNOWNX\r\n", "protocol"),
    "tcp4 lower": (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    "two spaces": (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "six fields"),
    "trailing space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "six fields"),
    "tab": (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "six fields"),
    "missing port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "six fields"),
    "leading zero octet": (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "IPv4"),
    "octet 256": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "IPv4"),
    "three octets": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
    "v6 under TCP4": (b"PROXY TCP4 ::1 ::2 1 2\r\n", "IPv4"),
    "v4 under TCP6": (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv6"),
    "v6 zone": (b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n", "IPv6"),
    "v6 two double colons": (b"PROXY TCP6 1::2::3 ::2 1 2\r\n", "IPv6"),
    "v6 nine groups": (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::2 1 2\r\n", "IPv6"),
    "port 65536": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    "port leading zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
    "port sign": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
    "port empty": (b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", "port"),
    "port unicode digits": ("PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(), "US-ASCII"),
    "non-ascii address": ("PROXY TCP4 1.2.3.\u0664 5.6.7.8 1 2\r\n".encode(), "US-ASCII"),
    "lone LF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone LF"),
    "lone CR": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", "lone CR"),
    "LF inside": (b"PROXY UNKNOWN\n\r\n", "lone LF"),
    "no CRLF in 107 bytes": (V1_UNKNOWN_WORST[:-2] + b"ff\r\n", "first 107 bytes"),
    "CR as the 107th byte": (V1_UNKNOWN_WORST[:-2] + b"f\r\n", "first 107 bytes"),
    "truncated": (V1_EXAMPLE[:-1], "truncated"),
    "empty": (b"", "truncated"),
    "trailing bytes": (V1_EXAMPLE + b"G", "trailing bytes"),
}


@pytest.mark.parametrize(("data", "reason"), list(V1_REJECTED.values()), ids=list(V1_REJECTED))
def test_v1_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as info:
        decode_v1(data)
    assert reason in str(info.value)


def test_v1_line_length_decides_early() -> None:
    # more is needed while the bytes can still become a line; a bad prefix or a lone
    # CR/LF is refused at once, not after a timeout
    for cut in range(len(V1_EXAMPLE)):
        assert v1_line_length(V1_EXAMPLE[:cut]) is None
    assert v1_line_length(V1_EXAMPLE + b"GET") == len(V1_EXAMPLE)
    assert v1_line_length(b"PROXY UNKNOWN\r") is None  # the LF may follow
    for bad in (b"X", b"PROXX", b"PROXY UNKNOWN\n", b"PROXY UNKNOWN\rX", b"P" + b"\x00"):
        with pytest.raises(ProxyHeaderError):
            v1_line_length(bad)
    with pytest.raises(ProxyHeaderError, match="107"):
        v1_line_length(b"PROXY " + b"x" * 101)
    assert v1_line_length(b"PROXY " + b"x" * 100) is None


ENCODE_V1_REFUSED = {
    "mixed families": (("192.0.2.1", 1), ("::1", 2)),
    "port 65536": (("192.0.2.1", 65536), ("192.0.2.2", 2)),
    "port -1": (("192.0.2.1", 1), ("192.0.2.2", -1)),
    "source only": (("192.0.2.1", 1), None),
    "not an address": (("example.com", 1), ("192.0.2.2", 2)),
}


@pytest.mark.parametrize("pair", list(ENCODE_V1_REFUSED.values()), ids=list(ENCODE_V1_REFUSED))
def test_encode_v1_refuses(pair: tuple[object, object]) -> None:
    with pytest.raises(ValueError) as info:
        encode_v1(*pair)  # type: ignore[arg-type]
    assert not isinstance(info.value, ProxyHeaderError)


@settings(max_examples=300, deadline=None)
@given(st.tuples(addresses_v4, addresses_v4) | st.tuples(addresses_v6, addresses_v6))
def test_v1_round_trips_any_addresses(pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    line = encode_v1(*pair)
    assert len(line) <= V1_MAX_BYTES
    assert decode_v1(line) == ProxyHeader(COMMAND_PROXY, pair[0], pair[1], version=1)
    for end in range(len(line)):
        with pytest.raises(ProxyHeaderError):
            decode_v1(line[:end])


@st.composite
def near_v1_lines(draw: st.DrawFn) -> bytes:
    """Lines that start like version 1, with plausible and random fields."""
    words = st.sampled_from(
        ["TCP4", "TCP6", "UNKNOWN", "1.2.3.4", "::1", "0", "65535", "65536", "01", "", "%"]
    ) | st.text(st.characters(codec="utf-8"), max_size=12)
    fields = draw(st.lists(words, max_size=7))
    end = draw(st.sampled_from(["\r\n", "\r\n", "\n", "\r", "", "\r\nrest"]))
    return ("PROXY " + draw(st.sampled_from([" ", " ", "  ", "\t"])).join(fields) + end).encode()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120) | st.binary(max_size=120).map(b"PROXY ".__add__) | near_v1_lines())
def test_any_bytes_decode_v1_or_raise_proxy_header_error(data: bytes) -> None:
    try:
        header = decode_v1(data)
    except ProxyHeaderError:
        return
    assert header.version == 1 and len(data) <= V1_MAX_BYTES and data.endswith(b"\r\n")
    if header.command == COMMAND_PROXY:
        assert header.source is not None and header.destination is not None
        assert encode_v1(header.source, header.destination) == data  # canonical only


# -- HeaderReader: either version from a stream, whole or byte by byte ------------------

READER_HEADERS = {
    "v1 example": V1_EXAMPLE,
    "v1 tcp6": V1_LONGEST_TCP6,
    "v1 unknown": V1_UNKNOWN_WORST,
    **{f"v2 {name}": data for name, data in STREAM_HEADERS.items()},
}


def _decoded(data: bytes) -> ProxyHeader:
    return decode_v1(data) if data.startswith(b"PROXY") else decode(data)


@pytest.mark.parametrize("data", list(READER_HEADERS.values()), ids=list(READER_HEADERS))
def test_header_reader_whole_and_byte_by_byte(data: bytes) -> None:
    reader = HeaderReader()
    assert reader.feed(data + PAYLOAD) == (_decoded(data), PAYLOAD)
    reader = HeaderReader()
    stream = data + PAYLOAD
    for index in range(len(data) - 1):
        assert reader.feed(stream[index : index + 1]) is None
    assert reader.feed(stream[len(data) - 1 :]) == (_decoded(data), PAYLOAD)


READER_REJECTED = {
    "http": (b"GET / HTTP/1.1\r\n", {}),
    "tls": (b"\x16\x03\x01\x02\x00", {}),
    "bad v2 signature at byte 5": (SIGNATURE[:4] + b"\x01", {}),
    "v2 version 1": (raw(0x11, 0x00, b""), {}),
    "v1 lone LF": (b"PROXY TCP4\n", {}),
    "v1 only, v2 sent": (LOCAL_T1, {"v2": False}),
    "v2 only, v1 sent": (V1_EXAMPLE, {"v1": False}),
    "v1 too long": (b"PROXY " + b"1" * 120, {}),
}


@pytest.mark.parametrize(
    ("data", "allowed"), list(READER_REJECTED.values()), ids=list(READER_REJECTED)
)
def test_header_reader_refuses_without_waiting(data: bytes, allowed: dict[str, bool]) -> None:
    # byte by byte: refused at the first byte that settles it, never "need more" forever
    reader = HeaderReader(**allowed)
    with pytest.raises(ProxyHeaderError):
        for index in range(len(data)):
            reader.feed(data[index : index + 1])
        raise AssertionError("not refused")  # pragma: no cover


def test_header_reader_needs_a_version() -> None:
    with pytest.raises(ValueError, match="version"):
        HeaderReader(v1=False, v2=False)


# -- datagrams: a v2 header in front of each (UDP tunnels) -------------------------------

#: PROXY, INET/DGRAM (\x12, §2.2's table), 12 bytes: 203.0.113.5:40000 -> 198.51.100.1:5353
PROXY_V4_DGRAM = bytes.fromhex(
    SIG_HEX + "21" + "12" + "000c" + "cb007105" + "c6336401" + "9c40" + "14e9"
)


def test_a_datagram_header_by_hand() -> None:
    header, payload = split_datagram(PROXY_V4_DGRAM + b"\x00query")
    assert header == ProxyHeader(
        COMMAND_PROXY, ("203.0.113.5", 40000), ("198.51.100.1", 5353), "udp", ()
    )
    assert payload == b"\x00query"
    assert split_datagram(PROXY_V6_UDP) == (decode(PROXY_V6_UDP), b"")  # an empty datagram
    assert (
        target_header("v2", ("203.0.113.5", 40000), ("198.51.100.1", 5353), "udp") == PROXY_V4_DGRAM
    )


DATAGRAMS_REFUSED = {
    "no header": b"hello",
    "empty": b"",
    "fixed part only, length says 12": PROXY_V4_DGRAM[:16],
    "address block cut": PROXY_V4_DGRAM[:-1],
    "v1 line": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello",
    "bad tlv": raw(0x21, 0x12, bytes.fromhex("cb007105c633640114e914e9") + b"\xe0\x00\x09t"),
    "version 3": bytes([*PROXY_V4_DGRAM[:12], 0x31, *PROXY_V4_DGRAM[13:]]),
}


@pytest.mark.parametrize("data", list(DATAGRAMS_REFUSED.values()), ids=list(DATAGRAMS_REFUSED))
def test_datagrams_without_a_whole_header_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        split_datagram(data)


# -- what a target is sent ---------------------------------------------------------------


def test_target_headers() -> None:
    client, listener = ("192.0.2.1", 4711), ("198.51.100.7", 2222)
    assert target_header("v1", client, listener) == encode_v1(client, listener)
    assert target_header("v2", client, listener) == encode(source=client, destination=listener)
    # an IPv4 client seen through a dual-stack socket is an IPv4 client
    mapped = ("::ffff:192.0.2.1", 4711), ("::ffff:198.51.100.7", 2222)
    assert target_header("v1", *mapped) == b"PROXY TCP4 192.0.2.1 198.51.100.7 4711 2222\r\n"
    # addresses unknown (the agent reached without the gateway's header): the spec's
    # "use the connection's own addresses"
    assert target_header("v1") == b"PROXY UNKNOWN\r\n"
    assert target_header("v2") == target_header("v2", transport="udp") == encode()
    assert decode(target_header("v2")).command == COMMAND_LOCAL
    with pytest.raises(ValueError, match="UDP"):
        target_header("v1", client, listener, "udp")
    with pytest.raises(ValueError, match="version"):
        target_header("v3", client, listener)


def test_address_pairs_keep_one_family() -> None:
    assert address_pair(("::ffff:10.0.0.1", 1), ("10.0.0.2", 2)) == (
        ("10.0.0.1", 1),
        ("10.0.0.2", 2),
    )
    assert address_pair(("2001:db8::1", 1), ("10.0.0.2", 2)) == (("2001:db8::1", 1), ("::", 2))
    assert address_pair(("10.0.0.1", 1), ("2001:db8::2", 2)) == (("10.0.0.1", 1), ("0.0.0.0", 2))
