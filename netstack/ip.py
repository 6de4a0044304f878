"""IPv4 and IPv6 wire formats: a checked parser and a builder.

Theory of operation
-------------------
``parse_ip`` takes one raw packet (as delivered by a TUN device or WireGuard) and
returns an ``IpPacket`` value object, or raises ``IpError`` -- never anything else.

* IPv4 (RFC 791 section 3.1): version/IHL/total length are checked against the buffer,
  the header checksum is verified (RFC 1071), options are skipped (not interpreted),
  bytes beyond ``total length`` (link padding) are ignored.  Fragments (MF set or a
  non-zero offset, RFC 791 section 2.3) are not reassembled: ``IpFragmentError`` lets
  the stack count and drop them.
* IPv6 (RFC 8200 section 3): the payload length is checked, and extension headers
  (hop-by-hop, routing, destination options: RFC 8200 section 4) are walked to the
  upper-layer header.  A Fragment header (section 4.5) raises ``IpFragmentError``;
  ESP/AH/No-Next-Header and unknown headers end the walk with that protocol number.

Addresses are kept as packed ``bytes`` (4 or 16 long) on the hot path; the API edges
convert from ``ipaddress`` objects.  Builders always set DF on IPv4 (we never fragment:
RFC 8900) and produce a correct header checksum.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from netstack.checksum import checksum

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

_HOP_BY_HOP = 0
_ROUTING = 43
_FRAGMENT = 44
_DEST_OPTS = 60
_EXTENSION_HEADERS = frozenset({_HOP_BY_HOP, _ROUTING, _DEST_OPTS})
_MAX_EXTENSION_HEADERS = 8

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40

_V4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_V6_HEADER = struct.Struct("!IHBB16s16s")


class IpError(ValueError):
    """A packet that is not a well-formed IPv4/IPv6 packet."""


class IpFragmentError(IpError):
    """A fragment: this stack does not reassemble (counted and dropped by the stack)."""


@dataclass(slots=True, unsafe_hash=True)
class IpPacket:
    """One parsed IP packet: addresses packed, ``payload`` is the upper-layer bytes.

    A value object, never changed after construction (not ``frozen``: see TcpSegment).
    """

    version: int
    src: bytes
    dst: bytes
    protocol: int
    ttl: int
    payload: bytes
    header: bytes


def parse_ip(packet: bytes) -> IpPacket:
    """Parse an IPv4 or IPv6 packet; raise ``IpError`` on anything malformed."""
    if not packet:
        raise IpError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _parse_ipv4(packet)
    if version == 6:
        return _parse_ipv6(packet)
    raise IpError(f"unknown IP version {version}")


def _parse_ipv4(packet: bytes) -> IpPacket:
    if len(packet) < IPV4_HEADER_LEN:
        raise IpError("truncated IPv4 header")
    (ver_ihl, _tos, total_length, _ident, flags_frag, ttl, protocol, _csum, src, dst) = (
        _V4_HEADER.unpack_from(packet)
    )
    header_len = (ver_ihl & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN:
        raise IpError("IPv4 IHL below 5")
    if total_length < header_len or total_length > len(packet):
        raise IpError("IPv4 total length inconsistent with the packet")
    header = packet[:header_len]
    if checksum(header) != 0:
        raise IpError("bad IPv4 header checksum")
    if flags_frag & 0x3FFF:  # MF flag or a fragment offset
        raise IpFragmentError("IPv4 fragment")
    return IpPacket(4, src, dst, protocol, ttl, packet[header_len:total_length], header)


def _parse_ipv6(packet: bytes) -> IpPacket:
    if len(packet) < IPV6_HEADER_LEN:
        raise IpError("truncated IPv6 header")
    _vtcfl, payload_length, next_header, hop_limit, src, dst = _V6_HEADER.unpack_from(packet)
    end = IPV6_HEADER_LEN + payload_length
    if end > len(packet):
        raise IpError("IPv6 payload length beyond the packet")
    offset = IPV6_HEADER_LEN
    for _ in range(_MAX_EXTENSION_HEADERS):
        if next_header == _FRAGMENT:
            raise IpFragmentError("IPv6 fragment")
        if next_header not in _EXTENSION_HEADERS:
            break
        if offset + 2 > end:
            raise IpError("truncated IPv6 extension header")
        ext_len = (packet[offset + 1] + 1) * 8
        if offset + ext_len > end:
            raise IpError("IPv6 extension header beyond the payload")
        next_header = packet[offset]
        offset += ext_len
    else:
        raise IpError("too many IPv6 extension headers")
    return IpPacket(6, src, dst, next_header, hop_limit, packet[offset:end], packet[:offset])


def build_ipv4(
    src: bytes, dst: bytes, protocol: int, payload: bytes, *, ttl: int = 64, ident: int = 0
) -> bytes:
    """An IPv4 packet (DF set, no options) around ``payload``."""
    total = IPV4_HEADER_LEN + len(payload)
    if total > 0xFFFF:
        raise IpError("IPv4 packet too large")
    header = bytearray(
        _V4_HEADER.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, protocol, 0, src, dst)
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header) + payload


def build_ipv6(
    src: bytes, dst: bytes, next_header: int, payload: bytes, *, hop_limit: int = 64
) -> bytes:
    """An IPv6 packet (no extension headers) around ``payload``."""
    if len(payload) > 0xFFFF:
        raise IpError("IPv6 payload too large (no jumbograms)")
    return _V6_HEADER.pack(0x60000000, len(payload), next_header, hop_limit, src, dst) + payload


def build_ip(src: bytes, dst: bytes, protocol: int, payload: bytes, *, ttl: int = 64) -> bytes:
    """An IPv4 or IPv6 packet, chosen by the address length."""
    if len(src) == 4:
        return build_ipv4(src, dst, protocol, payload, ttl=ttl)
    return build_ipv6(src, dst, protocol, payload, hop_limit=ttl)


def pack_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An address in its packed form (4 or 16 bytes)."""
    return ipaddress.ip_address(address).packed


def format_address(packed: bytes) -> str:
    """The text form of a packed address."""
    return str(ipaddress.ip_address(packed))
