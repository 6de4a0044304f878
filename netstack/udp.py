"""UDP (RFC 768) and ICMP echo / error wire formats.

Theory of operation
-------------------
``parse_udp`` checks the length field against the buffer and verifies the checksum
over the pseudo-header; a zero checksum means "none" on IPv4 (RFC 768) but is invalid
on IPv6 (RFC 8200 section 8.1).  ``build_udp`` always fills the checksum in, using
0xFFFF for a computed zero.  Only ``UdpError`` escapes on bad input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netstack.checksum import checksum, pseudo_header_sum

PROTO_UDP = 17
UDP_HEADER_LEN = 8
_HEADER = struct.Struct("!HHHH")


class UdpError(ValueError):
    """A datagram that is not well-formed UDP."""


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One parsed UDP datagram."""

    src_port: int
    dst_port: int
    payload: bytes


def parse_udp(data: bytes, src: bytes, dst: bytes) -> UdpDatagram:
    """Parse a datagram carried between packed addresses ``src`` and ``dst``."""
    if len(data) < UDP_HEADER_LEN:
        raise UdpError("truncated UDP header")
    src_port, dst_port, length, csum = _HEADER.unpack_from(data)
    if length < UDP_HEADER_LEN or length > len(data):
        raise UdpError("UDP length inconsistent with the packet")
    data = data[:length]
    if csum == 0:
        if len(src) == 16:
            raise UdpError("zero UDP checksum over IPv6")
    elif checksum(data, pseudo_header_sum(src, dst, PROTO_UDP, length)) != 0:
        raise UdpError("bad UDP checksum")
    return UdpDatagram(src_port, dst_port, data[UDP_HEADER_LEN:])


def build_udp(src_port: int, dst_port: int, payload: bytes, src: bytes, dst: bytes) -> bytes:
    """The wire form of a datagram, checksum included."""
    length = UDP_HEADER_LEN + len(payload)
    if length > 0xFFFF:
        raise UdpError("UDP datagram too large")
    buf = bytearray(_HEADER.pack(src_port, dst_port, length, 0) + payload)
    csum = checksum(buf, pseudo_header_sum(src, dst, PROTO_UDP, length)) or 0xFFFF
    struct.pack_into("!H", buf, 6, csum)
    return bytes(buf)
