# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython hot path; twin of ``netstack/_pure.py`` (same functions, same results).

Theory of operation: the Internet checksum (RFC 1071) summed 16 bits at a time into a
64-bit accumulator, carries folded at the end (RFC 1071 section 2(C), deferred carries).
Chosen by profiling: a checksum over every received and sent segment is the largest
single cost in the pure-Python path.
"""

from libc.stdint cimport uint64_t


cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    /* RFC 1071 section 2(B): sum in native byte order 32 bits at a time, fold,
       and swap once at the end on little-endian hosts. */
    static inline uint64_t kk_sum16(const unsigned char *p, Py_ssize_t n) {
        uint64_t acc = 0;
        uint32_t w32;
        uint16_t w16;
        uint16_t probe = 1;
        int little = *(const unsigned char *)&probe == 1;
        while (n >= 4) { memcpy(&w32, p, 4); acc += w32; p += 4; n -= 4; }
        if (n >= 2) { memcpy(&w16, p, 2); acc += w16; p += 2; n -= 2; }
        if (n) { acc += little ? (uint64_t)p[0] : ((uint64_t)p[0] << 8); }
        while (acc >> 16) acc = (acc & 0xFFFF) + (acc >> 16);
        if (little) acc = ((acc & 0xFF) << 8) | (acc >> 8);
        return acc;
    }
    """
    uint64_t kk_sum16(const unsigned char *p, Py_ssize_t n) nogil


cdef inline uint64_t _sum16(const unsigned char[:] data) noexcept nogil:
    if data.shape[0] == 0:
        return 0
    return kk_sum16(&data[0], data.shape[0])


cdef inline unsigned int _fold(uint64_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <unsigned int>total


def ones_sum(data, unsigned int initial=0):
    """The 16-bit one's-complement sum of ``data`` added to ``initial`` (not inverted)."""
    cdef const unsigned char[:] view = data
    cdef uint64_t raw = _sum16(view)
    cdef uint64_t total = raw + initial
    cdef unsigned int folded = _fold(total)
    if folded == 0 and total != 0:
        return 0xFFFF
    return folded


def checksum(data, unsigned int initial=0):
    """The Internet checksum of ``data`` given a partial sum ``initial`` (RFC 1071)."""
    return (~ones_sum(data, initial)) & 0xFFFF


def pseudo_header_sum(bytes src, bytes dst, int protocol, int length):
    """Partial sum of the IPv4 (RFC 9293 3.1) or IPv6 (RFC 8200 8.1) pseudo-header."""
    cdef uint64_t total = _sum16(src) + _sum16(dst) + protocol + (length & 0xFFFF) + (length >> 16)
    cdef unsigned int folded = _fold(total)
    if folded == 0 and total != 0:
        return 0xFFFF
    return folded
