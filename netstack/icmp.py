"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) messages: echo and destination unreachable.

Theory of operation
-------------------
``parse_icmp`` verifies the checksum (ICMPv4: over the message only; ICMPv6: over the
pseudo-header too, RFC 4443 section 2.3) and returns type, code and the rest of the
message.  The builders make echo replies (RFC 792 "Echo or Echo Reply"; RFC 4443
section 4.2) that copy identifier, sequence and data, and port-unreachable errors that
quote as much of the offending packet as fits (RFC 792: header + 64 bits; RFC 4443
section 2.4(c): up to the minimum IPv6 MTU).  Only ``IcmpError`` escapes on bad input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netstack.checksum import checksum, pseudo_header_sum

PROTO_ICMP = 1
PROTO_ICMPV6 = 58

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_PORT_UNREACHABLE = 3

ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_PORT_UNREACHABLE = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

_IPV6_MIN_MTU = 1280


class IcmpError(ValueError):
    """A message that is not well-formed ICMP/ICMPv6."""


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    """One parsed ICMP message; ``rest`` is everything after the 4-byte header."""

    type: int
    code: int
    rest: bytes


def parse_icmp(data: bytes, src: bytes, dst: bytes) -> IcmpMessage:
    """Parse ICMPv4 (4-byte addresses) or ICMPv6 (16-byte addresses)."""
    if len(data) < 8:
        raise IcmpError("truncated ICMP message")
    initial = pseudo_header_sum(src, dst, PROTO_ICMPV6, len(data)) if len(src) == 16 else 0
    if checksum(data, initial) != 0:
        raise IcmpError("bad ICMP checksum")
    return IcmpMessage(data[0], data[1], data[4:])


def build_icmp(type_: int, code: int, rest: bytes, src: bytes, dst: bytes) -> bytes:
    """An ICMP (or ICMPv6, for 16-byte addresses) message with its checksum."""
    buf = bytearray(struct.pack("!BBH", type_, code, 0) + rest)
    initial = pseudo_header_sum(src, dst, PROTO_ICMPV6, len(buf)) if len(src) == 16 else 0
    struct.pack_into("!H", buf, 2, checksum(buf, initial))
    return bytes(buf)


def echo_reply(request: IcmpMessage, src: bytes, dst: bytes) -> bytes:
    """The reply to an echo request (identifier, sequence and data copied)."""
    reply_type = ICMPV6_ECHO_REPLY if len(src) == 16 else ICMP_ECHO_REPLY
    return build_icmp(reply_type, 0, request.rest, src, dst)


def port_unreachable(offending_packet: bytes, src: bytes, dst: bytes) -> bytes:
    """A port-unreachable error quoting ``offending_packet`` (its IP header onward)."""
    if len(src) == 16:
        quote = offending_packet[: _IPV6_MIN_MTU - 48]
        return build_icmp(
            ICMPV6_DEST_UNREACHABLE, ICMPV6_PORT_UNREACHABLE, bytes(4) + quote, src, dst
        )
    header_len = (offending_packet[0] & 0x0F) * 4
    quote = offending_packet[: header_len + 8]
    return build_icmp(ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE, bytes(4) + quote, src, dst)
