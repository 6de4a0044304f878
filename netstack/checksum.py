"""The Internet checksum (RFC 1071) for the packet codecs (``ip``, ``tcpwire``, ``udp``,
``icmp``).

Theory of operation of the pure version: the Internet checksum is the one's-complement
sum of 16-bit big-endian words.  Because 2**16 == 1 (mod 0xFFFF), that sum is congruent
to the whole buffer read as one big-endian integer modulo 0xFFFF (RFC 1071 section
2(B), "byte order independence" plus the deferred-carry argument), so CPython's
C-speed big-integer remainder does the word loop for us.  An odd trailing byte is
padded with a zero byte on the right (RFC 1071 section 4.1).

``ones_sum``, ``checksum`` and ``pseudo_header_sum`` are the Cython versions
(``netstack/_fast.pyx``) when the extension is built, unless
``KAKUREMICHI_NETSTACK_PURE=1``; the ``pure_…`` functions stay for the tests that
compare the two.  This module imports no other module of ours than the extension, so
the codecs, and the TCP twin (``_pure``) that is defined by them, form no circle.
"""

from __future__ import annotations

import os


def pure_ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's-complement sum of ``data`` added to ``initial`` (not inverted)."""
    length = len(data)
    value = int.from_bytes(data, "big")
    if length & 1:
        value <<= 8
    total = value % 0xFFFF + initial
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    if total == 0 and (value or initial):
        # A non-zero sum that is a multiple of 0xFFFF is 0xFFFF in one's complement.
        return 0xFFFF
    return total


def pure_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data`` given a partial sum ``initial`` (RFC 1071)."""
    return ~pure_ones_sum(data, initial) & 0xFFFF


def pure_pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Partial sum of the IPv4 (RFC 9293 3.1) or IPv6 (RFC 8200 8.1) pseudo-header."""
    return pure_ones_sum(src + dst, protocol + (length & 0xFFFF) + (length >> 16))


ones_sum = pure_ones_sum
checksum = pure_checksum
pseudo_header_sum = pure_pseudo_header_sum
IMPLEMENTATION = "pure"

if os.environ.get("KAKUREMICHI_NETSTACK_PURE") != "1":  # pragma: no branch
    try:
        from netstack import _fast  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # the extension is not built in this checkout
        pass
    else:
        ones_sum = _fast.ones_sum
        checksum = _fast.checksum
        pseudo_header_sum = _fast.pseudo_header_sum
        IMPLEMENTATION = "cython"
