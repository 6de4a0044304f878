"""Pure-Python twin of the Cython hot path (``netstack/_fast.pyx``).

Theory of operation: the Internet checksum (RFC 1071) is the one's-complement sum of
16-bit big-endian words.  Because 2**16 == 1 (mod 0xFFFF), that sum is congruent to the
whole buffer read as one big-endian integer modulo 0xFFFF (RFC 1071 section 2(B),
"byte order independence" plus the deferred-carry argument), so CPython's C-speed
big-integer remainder does the word loop for us.  An odd trailing byte is padded with
a zero byte on the right (RFC 1071 section 4.1).

Every function here has an identical twin in ``_fast.pyx``; ``netstack.speedups``
picks one, and the same tests run against both.
"""

from __future__ import annotations


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
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


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data`` given a partial sum ``initial`` (RFC 1071)."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Partial sum of the IPv4 (RFC 9293 3.1) or IPv6 (RFC 8200 8.1) pseudo-header."""
    return ones_sum(src + dst, protocol + (length & 0xFFFF) + (length >> 16))
