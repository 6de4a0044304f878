# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython hot path of the TCP/IP stack; twin of ``netstack/_pure.py`` (same functions,
same results).  WireGuard's transport hot path is its own module
(``netstack/wireguard/_fast.pyx``).

Chosen by profiling the agent's data plane, in the order it paid off:

* the Internet checksum (below; chosen by ``netstack/checksum.py``, which the packet
  codecs use);
* a received TCP packet parsed in one pass (``parse_tcp_packet``) and a segment to send
  built into its IP packet in one allocation (``build_tcp_packet``);
* the established-state receive path, first per segment (``tcp_receive_established``),
  then for the Stack's whole packet loop (``tcp_receive_run``: parse, connection
  lookup and the segment applied from C values, a burst of one connection's packets
  on one load of its fields);
* the bulk sender's run of new full-size segments (``tcp_send_run``), built straight
  into IP packets.

Theory of operation of the checksum: the Internet checksum (RFC 1071) summed 16 bits
at a time into a 64-bit accumulator, carries folded at the end (RFC 1071 section 2(C),
deferred carries).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memset


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


# ---------------------------------------------------------------- IP + TCP parse
#
# Theory of operation: a received TCP packet used to cost two Python parsers and two
# value objects (IpPacket, TcpSegment).  Here IPv4 (header checksum, no fragments,
# options skipped) or IPv6 without extension headers, then TCP (data offset, checksum
# over the pseudo-header, options as tcpwire.parse_tcp reads them) are checked in one
# C pass into a ``TcpView`` struct; ``parse_tcp_packet`` then builds the TcpSegment and
# ``tcp_receive_run`` (below) first tries the established-state path straight from
# the struct, building objects only when that path declines.  Anything else --
# malformed, a fragment, not TCP, IPv6 extension headers -- is None and the stack's
# full Python path classifies and counts it.  Twin: ``parse_tcp_packet`` in
# ``_pure.py``.

cdef inline unsigned int _be16(const unsigned char *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline uint64_t _be32(const unsigned char *p) noexcept nogil:
    return ((<uint64_t>p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


cdef struct TcpView:
    Py_ssize_t addr_off      # source address; the destination follows it
    Py_ssize_t addr_len      # 4 or 16
    Py_ssize_t tcp_off       # TCP header
    Py_ssize_t tcp_len       # TCP header + payload
    Py_ssize_t data_off      # TCP header length (payload at tcp_off + data_off)
    unsigned int src_port
    unsigned int dst_port
    uint64_t seq
    uint64_t ack
    unsigned int flags
    unsigned int window
    int mss                  # -1: absent
    int wscale               # -1: absent
    bint sack_permitted
    bint has_ts
    uint64_t tsval
    uint64_t tsecr
    int blocks               # SACK blocks (40 option bytes hold at most 4)
    uint64_t block_edges[8]


cdef bint _view_tcp(const unsigned char *p, Py_ssize_t size, TcpView *v) noexcept nogil:
    """Fill ``v`` from a well-formed IPv4/IPv6 TCP packet; False for anything else."""
    cdef Py_ssize_t header_len, end, tcp_len, offset, i, opt_len, j
    cdef uint64_t total
    cdef unsigned int kind
    if size < 20:
        return False
    cdef int version = p[0] >> 4
    if version == 4:
        header_len = (p[0] & 0x0F) * 4
        if header_len < 20 or size < header_len:
            return False
        end = _be16(p + 2)
        if end < header_len or end > size:
            return False
        if _fold(kk_sum16(p, header_len)) != 0xFFFF:
            return False
        if _be16(p + 6) & 0x3FFF or p[9] != 6:
            return False
        v.addr_off = 12
        v.addr_len = 4
        total = kk_sum16(p + 12, 8)
    elif version == 6:
        if size < 40 or p[6] != 6:
            return False
        header_len = 40
        end = 40 + _be16(p + 4)
        if end > size:
            return False
        v.addr_off = 8
        v.addr_len = 16
        total = kk_sum16(p + 8, 32)
    else:
        return False
    cdef const unsigned char *t = p + header_len
    tcp_len = end - header_len
    if tcp_len < 20:
        return False
    offset = (t[12] >> 4) * 4
    if offset < 20 or offset > tcp_len:
        return False
    total += 6 + (tcp_len & 0xFFFF) + (tcp_len >> 16) + kk_sum16(t, tcp_len)
    if _fold(total) != 0xFFFF:
        return False
    v.tcp_off = header_len
    v.tcp_len = tcp_len
    v.data_off = offset
    v.src_port = _be16(t)
    v.dst_port = _be16(t + 2)
    v.seq = _be32(t + 4)
    v.ack = _be32(t + 8)
    v.flags = t[13]
    v.window = _be16(t + 14)
    v.mss = -1
    v.wscale = -1
    v.sack_permitted = False
    v.has_ts = False
    v.tsval = 0
    v.tsecr = 0
    v.blocks = 0
    i = 20
    while i < offset:
        kind = t[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= offset:
            return False
        opt_len = t[i + 1]
        if opt_len < 2 or i + opt_len > offset:
            return False
        if kind == 2 and opt_len == 4:
            v.mss = _be16(t + i + 2)
        elif kind == 3 and opt_len == 3:
            v.wscale = t[i + 2] if t[i + 2] < 14 else 14
        elif kind == 4 and opt_len == 2:
            v.sack_permitted = True
        elif kind == 5 and opt_len >= 10 and (opt_len - 2) % 8 == 0:
            j = i + 2
            while j < i + opt_len and v.blocks < 4:
                v.block_edges[2 * v.blocks] = _be32(t + j)
                v.block_edges[2 * v.blocks + 1] = _be32(t + j + 4)
                v.blocks += 1
                j += 8
        elif kind == 8 and opt_len == 10:
            v.has_ts = True
            v.tsval = _be32(t + i + 2)
            v.tsecr = _be32(t + i + 6)
        i += opt_len
    return True


cdef object _segment_of(const unsigned char *p, TcpView *v, object segment_type):
    cdef const unsigned char *t = p + v.tcp_off
    cdef int k
    blocks = tuple([(v.block_edges[2 * k], v.block_edges[2 * k + 1]) for k in range(v.blocks)])
    payload = PyBytes_FromStringAndSize(<const char *>t + v.data_off, v.tcp_len - v.data_off)
    return segment_type(
        v.src_port, v.dst_port, v.seq, v.ack, v.flags, v.window, payload,
        v.mss if v.mss >= 0 else None,
        v.wscale if v.wscale >= 0 else None,
        v.sack_permitted,
        (v.tsval, v.tsecr) if v.has_ts else None,
        blocks,
    )


cdef tuple _parsed(const unsigned char *p, TcpView *v, object segment_type):
    """What ``parse_tcp_packet`` returns for the packet ``v`` describes."""
    src = PyBytes_FromStringAndSize(<const char *>p + v.addr_off, v.addr_len)
    dst = PyBytes_FromStringAndSize(<const char *>p + v.addr_off + v.addr_len, v.addr_len)
    return src, dst, _segment_of(p, v, segment_type)


def parse_tcp_packet(packet, segment_type):
    """``(src, dst, segment)`` for a well-formed IPv4/IPv6 TCP packet (``segment`` built
    by calling ``segment_type`` like ``tcpwire.TcpSegment``), None for anything else."""
    if type(packet) is not bytes:
        return None
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(packet)
    cdef TcpView v
    if not _view_tcp(p, PyBytes_GET_SIZE(packet), &v):
        return None
    return _parsed(p, &v, segment_type)


# ---------------------------------------------------------------- TCP packet build
#
# The other half: a segment to send becomes its whole IP packet in one allocation --
# IPv4 (DF, TTL 64, header checksum) or IPv6 (hop limit 64) around the TCP header with
# options laid out as ``tcpwire.build_tcp`` does (Linux's order, 4-byte aligned), the
# payload, and the TCP checksum.  Twin: ``build_tcp_packet`` in ``_pure.py``.

cdef inline void _put16(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void _put32(unsigned char *p, uint64_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef Py_ssize_t _tcp_options(object segment, unsigned char *opts) except -1:
    """``segment``'s options as ``tcpwire.build_tcp`` lays them out; their length."""
    cdef Py_ssize_t n = 0, room, count, k
    cdef object mss = segment.mss
    cdef object timestamp = segment.timestamp
    cdef object wscale = segment.wscale
    cdef bint sack_permitted = segment.sack_permitted
    cdef tuple blocks = segment.sack_blocks
    cdef uint64_t left, right
    if mss is not None:
        opts[0] = 2
        opts[1] = 4
        _put16(opts + 2, <unsigned int>_u16(mss))
        n = 4
    if timestamp is not None:
        if sack_permitted:
            opts[n] = 4
            opts[n + 1] = 2
        else:
            opts[n] = 1
            opts[n + 1] = 1
        opts[n + 2] = 8
        opts[n + 3] = 10
        _put32(opts + n + 4, _u32(timestamp[0]))
        _put32(opts + n + 8, _u32(timestamp[1]))
        n += 12
    elif sack_permitted:
        opts[n] = 1
        opts[n + 1] = 1
        opts[n + 2] = 4
        opts[n + 3] = 2
        n += 4
    if wscale is not None:
        opts[n] = 1
        opts[n + 1] = 3
        opts[n + 2] = 3
        opts[n + 3] = <unsigned char>_u8(wscale)
        n += 4
    room = (40 - n - 4) // 8
    if blocks and room > 0:
        count = len(blocks)
        if count > 4:
            count = 4
        if count > room:
            count = room
        opts[n] = 1
        opts[n + 1] = 1
        opts[n + 2] = 5
        opts[n + 3] = <unsigned char>(2 + 8 * count)
        n += 4
        for k in range(count):
            left = _u32(blocks[k][0])
            right = _u32(blocks[k][1])
            _put32(opts + n, left)
            _put32(opts + n + 4, right)
            n += 8
    return n


cdef Py_ssize_t _address_length(bytes src, bytes dst) except -1:
    cdef Py_ssize_t address_len = PyBytes_GET_SIZE(src)
    if address_len != PyBytes_GET_SIZE(dst) or (address_len != 4 and address_len != 16):
        raise ValueError("addresses must both be 4 or both 16 bytes")
    return address_len


cdef inline void _ip_header(unsigned char *p, const unsigned char *s, const unsigned char *d,
                            Py_ssize_t address_len, Py_ssize_t tcp_len) noexcept nogil:
    """IPv4 (DF, TTL 64, header checksum) or IPv6 (hop limit 64) around TCP."""
    if address_len == 4:
        p[0] = 0x45
        p[1] = 0
        _put16(p + 2, <unsigned int>(20 + tcp_len))
        _put16(p + 4, 0)
        _put16(p + 6, 0x4000)
        p[8] = 64
        p[9] = 6
        _put16(p + 10, 0)
        memcpy(p + 12, s, 4)
        memcpy(p + 16, d, 4)
        _put16(p + 10, (~_fold(kk_sum16(p, 20))) & 0xFFFF)
    else:
        _put32(p, 0x60000000)
        _put16(p + 4, <unsigned int>tcp_len)
        p[6] = 6
        p[7] = 64
        memcpy(p + 8, s, 16)
        memcpy(p + 24, d, 16)


cdef inline void _tcp_checksum(unsigned char *t, const unsigned char *s, const unsigned char *d,
                               Py_ssize_t address_len, Py_ssize_t tcp_len) noexcept nogil:
    """Fill in the checksum of the TCP segment at ``t`` (its field zero until now)."""
    cdef uint64_t total = kk_sum16(s, address_len) + kk_sum16(d, address_len)
    total += 6 + (tcp_len & 0xFFFF) + (tcp_len >> 16) + kk_sum16(t, tcp_len)
    _put16(t + 16, (~_fold(total)) & 0xFFFF)


def build_tcp_packet(segment, bytes src not None, bytes dst not None):
    """The IP packet carrying ``segment`` from ``src`` to ``dst`` (packed addresses)."""
    cdef unsigned char opts[40]
    cdef Py_ssize_t n = _tcp_options(segment, opts)
    cdef const unsigned char[:] view
    cdef const unsigned char *data = NULL
    cdef Py_ssize_t payload_len
    payload = segment.payload
    if type(payload) is bytes:
        data = <const unsigned char *>PyBytes_AS_STRING(payload)
        payload_len = PyBytes_GET_SIZE(payload)
    else:
        view = payload
        payload_len = view.shape[0]
        if payload_len:
            data = &view[0]
    cdef Py_ssize_t tcp_len = 20 + n + payload_len
    cdef Py_ssize_t address_len = _address_length(src, dst)
    cdef Py_ssize_t ip_len = 20 if address_len == 4 else 40
    if tcp_len + (ip_len if address_len == 4 else 0) > 0xFFFF:
        raise ValueError("TCP segment too large for one IP packet")
    cdef unsigned int src_port = <unsigned int>_u16(segment.src_port)
    cdef unsigned int dst_port = <unsigned int>_u16(segment.dst_port)
    cdef uint64_t seq = _u32(segment.seq)
    cdef uint64_t ack = _u32(segment.ack)
    cdef unsigned char flags = <unsigned char>_u8(segment.flags)
    cdef unsigned int window = <unsigned int>_u16(segment.window)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, ip_len + tcp_len)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    cdef unsigned char *t = p + ip_len
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(src)
    cdef const unsigned char *d = <const unsigned char *>PyBytes_AS_STRING(dst)
    _ip_header(p, s, d, address_len, tcp_len)
    _put16(t, src_port)
    _put16(t + 2, dst_port)
    _put32(t + 4, seq)
    _put32(t + 8, ack)
    t[12] = <unsigned char>(((20 + n) // 4) << 4)
    t[13] = flags
    _put16(t + 14, window)
    _put16(t + 16, 0)
    _put16(t + 18, 0)
    if n:
        memcpy(t + 20, opts, n)
    if payload_len:
        memcpy(t + 20 + n, data, payload_len)
    _tcp_checksum(t, s, d, address_len, tcp_len)
    return out


cdef inline uint64_t _u32(object value) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = value
    if v > 0xFFFFFFFF:
        raise OverflowError("value does not fit in 32 bits")
    return v


cdef inline uint64_t _u16(object value) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = value
    if v > 0xFFFF:
        raise OverflowError("value does not fit in 16 bits")
    return v


cdef inline uint64_t _u8(object value) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = value
    if v > 0xFF:
        raise OverflowError("value does not fit in 8 bits")
    return v


# ---------------------------------------------------------------- TCP established path
#
# Theory of operation: ``_take`` is the whole receive path of the common segment once
# established (the conditions are documented on the twin,
# ``_pure.tcp_receive_established``): it first checks everything that could send the
# segment to the general path and changes nothing if one does; past that point the
# segment is applied in full.  It works on a ``Fields`` struct, C copies of the
# connection's fields that the path reads and writes, loaded from the connection's
# ``__dict__`` (they are plain instance attributes, all set in ``TcpBase.__init__``)
# and stored back once: ``tcp_receive_run`` keeps one loaded across consecutive
# packets of the same connection (recognised by their addresses and ports, without
# a table lookup), so a burst of a bulk transfer costs a parse, a few C comparisons
# and a copy of the payload into the receive buffer per packet -- no TcpSegment,
# payload or timestamp objects.  Whatever calls back into Python (the ACK branch:
# send buffer, RTT, congestion control, tail loss probe; receive-window auto-tuning)
# stores the struct first and reloads it after, so the Python side always sees the
# connection as the twin would leave it.  ``tcp_receive_established`` runs it for one
# TcpSegment (``TcpConnection.receive``).

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_alloc
        char *ob_bytes
        char *ob_start


cdef int _append(object buffer, const char *data, Py_ssize_t size) except -1:
    """``buffer += data[:size]`` for a bytearray, growing it by doubling: CPython's
    own resize adds an eighth (a copy of the whole buffer every few packets), and
    after a read from the front (``del buffer[:n]``) every growth copies it."""
    cdef Py_ssize_t held = PyByteArray_GET_SIZE(buffer)
    cdef Py_ssize_t need = held + size
    cdef PyByteArrayObject *raw = <PyByteArrayObject *>buffer
    if need + (raw.ob_start - raw.ob_bytes) + 1 > raw.ob_alloc:
        PyByteArray_Resize(buffer, 2 * need)  # then a "minor downsize", which keeps it
    PyByteArray_Resize(buffer, need)
    memcpy(PyByteArray_AS_STRING(buffer) + held, data, size)
    return 0

from netstack import events as _ev

cdef enum:
    _ACK_FLAG = 0x10
    _CONTROL_FLAGS = 0x37  # FIN, SYN, RST, ACK, URG: only ACK may be set here

# Fields written by ``_take`` (bits of ``Fields.dirty``).
cdef enum:
    _D_RECEIVE = 1       # _last_receive, _keepalive_probes
    _D_WINDOW = 2        # _snd_wnd, _snd_wl1, _snd_wl2, _max_snd_wnd
    _D_TS_RECENT = 4
    _D_RCV_RTT = 8
    _D_RCV_NXT = 16
    _D_ACK = 32          # _ack_pending, _ack_now, _ack_deadline, _quickack


cdef struct Fields:
    bint blocked         # recovery, SACK scoreboard, undo or reassembly under way
    bint ts_ok
    bint discard_input
    bint has_fin
    bint ack_now
    bint has_ack_deadline
    bint has_rcv_rtt
    bint has_srtt
    int dirty
    long long rcv_nxt, irs, ts_recent, rcv_adv, snd_una, iss, snd_max, fin, snd_wscale
    long long snd_wnd, snd_wl1, snd_wl2, max_snd_wnd, last_ack_sent, ack_pending, quickack
    double last_receive, ack_deadline, rcv_rtt, srtt, rcv_space_time, delayed_ack


cdef int _load(Fields *f, dict d) except -1:
    f.blocked = bool(d["_in_recovery"] or d["_sacked"] or d["_dupacks"] or d["_undo_pending"]
                     or d["_ooo"])
    f.ts_ok = d["_ts_ok"]
    f.discard_input = d["_discard_input"]
    f.rcv_nxt = d["_rcv_nxt"]
    f.irs = d["_irs"]
    f.ts_recent = d["_ts_recent"]
    f.rcv_adv = d["_rcv_adv"]
    f.snd_una = d["_snd_una"]
    f.iss = d["_iss"]
    f.snd_max = d["_snd_max"]
    fin = d["_fin_offset"]
    f.has_fin = fin is not None
    f.fin = fin if f.has_fin else 0
    f.snd_wscale = d["_snd_wscale"]
    f.snd_wnd = d["_snd_wnd"]
    f.snd_wl1 = d["_snd_wl1"]
    f.snd_wl2 = d["_snd_wl2"]
    f.max_snd_wnd = d["_max_snd_wnd"]
    f.last_ack_sent = d["_last_ack_sent"]
    f.ack_pending = d["_ack_pending"]
    f.quickack = d["_quickack"]
    f.ack_now = d["_ack_now"]
    deadline = d["_ack_deadline"]
    f.has_ack_deadline = deadline is not None
    f.ack_deadline = deadline if f.has_ack_deadline else 0.0
    rtt = d["_rcv_rtt"]
    f.has_rcv_rtt = rtt is not None
    f.rcv_rtt = rtt if f.has_rcv_rtt else 0.0
    srtt = d["_srtt"]
    f.has_srtt = srtt is not None
    f.srtt = srtt if f.has_srtt else 0.0
    f.rcv_space_time = d["_rcv_space_time"]
    f.delayed_ack = d["config"].delayed_ack
    f.dirty = 0
    return 0


cdef int _store(Fields *f, dict d) except -1:
    cdef int dirty = f.dirty
    if dirty & _D_RECEIVE:
        d["_last_receive"] = f.last_receive
        d["_keepalive_probes"] = 0
    if dirty & _D_WINDOW:
        d["_snd_wnd"] = f.snd_wnd
        d["_snd_wl1"] = f.snd_wl1
        d["_snd_wl2"] = f.snd_wl2
        d["_max_snd_wnd"] = f.max_snd_wnd
    if dirty & _D_TS_RECENT:
        d["_ts_recent"] = f.ts_recent
    if dirty & _D_RCV_RTT:
        d["_rcv_rtt"] = f.rcv_rtt
    if dirty & _D_RCV_NXT:
        d["_rcv_nxt"] = f.rcv_nxt
    if dirty & _D_ACK:
        d["_ack_pending"] = f.ack_pending
        d["_ack_now"] = True if f.ack_now else False
        d["_ack_deadline"] = f.ack_deadline if f.has_ack_deadline else None
        d["_quickack"] = f.quickack
    f.dirty = 0
    return 0


cdef int _take(Fields *f, object conn, dict d, unsigned int flags, uint64_t wire_seq,
               uint64_t wire_ack, unsigned int raw_window, bint has_sack, bint ts_present,
               uint64_t tsval_, uint64_t tsecr_, const char *data, Py_ssize_t size,
               double now) except -1:
    """1 when the segment was handled here, 0 when it was left untouched."""
    if (flags & _CONTROL_FLAGS) != _ACK_FLAG or has_sack or f.blocked:
        return 0
    cdef long long rcv_nxt = f.rcv_nxt
    if (<uint64_t>(<long long>wire_seq - f.irs - rcv_nxt)) & 0xFFFFFFFF:
        return 0
    cdef bint has_ts = f.ts_ok and ts_present
    cdef long long tsval = tsval_, tsecr = tsecr_
    cdef long long ts_recent = f.ts_recent
    if has_ts and ((<uint64_t>(tsval - ts_recent)) & 0xFFFFFFFF) >= 0x80000000:
        return 0
    if size and size > f.rcv_adv - rcv_nxt:
        return 0
    cdef long long snd_una = f.snd_una
    cdef long long advance = (<uint64_t>(<long long>wire_ack - f.iss - snd_una)) & 0xFFFFFFFF
    if advance >= 0x80000000:
        return 0
    cdef long long ack = snd_una + advance
    cdef long long snd_max = f.snd_max
    if ack > snd_max:
        return 0
    if f.has_fin and ack > f.fin >= snd_una:
        return 0
    cdef long long window = (<long long>raw_window) << (<int>f.snd_wscale)
    if not advance and not size and snd_max > snd_una and window == f.snd_wnd:
        return 0
    cdef bint keep = size > 0 and not f.discard_input
    cdef object rcvbuf = None
    if keep:
        rcvbuf = d["_rcvbuf"]
        if type(rcvbuf) is not bytearray:
            return 0
    # -- from here on the segment is ours.
    f.last_receive = now
    f.dirty |= _D_RECEIVE
    cdef long long wl1 = f.snd_wl1
    if wl1 < rcv_nxt or (wl1 == rcv_nxt and f.snd_wl2 <= ack):
        f.snd_wnd = window
        f.snd_wl1 = rcv_nxt
        f.snd_wl2 = ack
        if window > f.max_snd_wnd:
            f.max_snd_wnd = window
        f.dirty |= _D_WINDOW
    if advance:
        _store(f, d)
        _acknowledged(conn, d, snd_una, ack, advance, snd_max, has_ts, tsecr, now)
        _load(f, d)
    cdef long long ts_now, pending, quickack
    cdef double sample, interval
    if has_ts and rcv_nxt <= f.last_ack_sent:
        if ((<uint64_t>(tsval - ts_recent)) & 0xFFFFFFFF) < 0x80000000:
            f.ts_recent = tsval
            f.dirty |= _D_TS_RECENT
        if size and tsecr:
            ts_now = _ts_now(d, now)
            sample = ((<uint64_t>(ts_now - tsecr)) & 0xFFFFFFFF) / 1000.0
            if sample < 60.0:
                if f.has_rcv_rtt:
                    f.rcv_rtt = min(f.rcv_rtt, sample) * 0.9 + sample * 0.1
                else:
                    f.rcv_rtt = sample
                    f.has_rcv_rtt = True
                f.dirty |= _D_RCV_RTT
    if size:
        f.rcv_nxt = rcv_nxt + size
        f.dirty |= _D_RCV_NXT
        if keep:
            if not PyByteArray_GET_SIZE(rcvbuf):
                conn._emit(_ev.DataAvailable())
            _append(rcvbuf, data, size)
        pending = f.ack_pending + 1
        f.ack_pending = pending
        quickack = f.quickack
        if pending >= 2 or quickack > 0:
            f.ack_now = True
        elif not f.has_ack_deadline:
            f.ack_deadline = now + f.delayed_ack
            f.has_ack_deadline = True
        if quickack > 0:
            f.quickack = quickack - 1
        f.dirty |= _D_ACK
        # ReceiveSide._autotune's own early return, tested here to spare the call;
        # the twin just calls it.
        if f.has_rcv_rtt:
            interval = f.rcv_rtt
        elif f.has_srtt:
            interval = f.srtt
        else:
            interval = 0.1
        if now - f.rcv_space_time >= max(interval, 0.005):
            _store(f, d)
            conn._autotune(now)
            _load(f, d)
    return 1


cdef inline long long _ts_now(dict d, double now) except? -1:
    """``TcpBase._ts_now``: int() and the C cast both truncate toward zero."""
    return (<long long>(now * 1000) + <long long>d["_ts_offset"]) & 0xFFFFFFFF


cdef int _acknowledged(object conn, dict d, long long snd_una, long long ack,
                       long long advance, long long snd_max, bint has_ts, long long tsecr,
                       double now) except -1:
    """The ACK branch of the established path: new data acknowledged (the fields the
    struct holds are stored; this works on the connection itself)."""
    cdef long long start, trim, snd_nxt, flight_before, mss, cwnd, ts_now
    cdef double sample
    config = d["config"]
    sndbuf = d["_sndbuf"]
    start = d["_sndbuf_start"]
    trim = min(ack, start + <long long>len(sndbuf)) - start
    if trim > 0:
        sndbuf.consume(trim)
        d["_sndbuf_start"] = start + trim
    snd_nxt = d["_snd_nxt"]
    flight_before = snd_nxt - snd_una
    d["_snd_una"] = ack
    if snd_nxt < ack:
        d["_snd_nxt"] = ack
    if <long long>d["_high_rxt"] < ack:
        d["_high_rxt"] = ack
    if has_ts and tsecr:
        ts_now = _ts_now(d, now)
        sample = ((<uint64_t>(ts_now - tsecr)) & 0xFFFFFFFF) / 1000.0
        if sample < 60.0:
            conn._rtt_sample(sample)
        d["_rtt_seq"] = None
    else:
        rtt_seq = d["_rtt_seq"]
        if rtt_seq is not None and ack > <long long>rtt_seq:
            conn._rtt_sample(now - <double>d["_rtt_time"])
            d["_rtt_seq"] = None
    d["_retries"] = 0
    mss = d["_snd_mss"]  # TcpBase._send_mss()
    cwnd = d["_cwnd"]
    if flight_before + mss >= cwnd:
        if cwnd < <long long>d["_ssthresh"]:
            cwnd += min(advance, 2 * mss)
        else:
            srtt = d["_srtt"]
            cwnd = d["_cc"].on_ack(cwnd, advance, mss, now, srtt if srtt else 0.0)
        d["_cwnd"] = min(cwnd, 2 * <long long>config.send_buffer)
    d["_rto_deadline"] = None if ack >= snd_max else now + <double>d["_rto"]
    d["_tlp_out"] = False
    if ack >= snd_max:
        d["_tlp_deadline"] = None  # all of _arm_tail_loss_probe with nothing in flight
    else:
        conn._arm_tail_loss_probe(now)
    if d["_send_blocked"] and conn.send_buffer_space > 0:
        d["_send_blocked"] = False
        conn._emit(_ev.SendSpaceAvailable())
    return 0


def tcp_receive_established(object conn, object seg, double now):
    """The in-order, ACK-only segment of an ESTABLISHED connection, handled in full or
    not at all (False: nothing changed, the general path takes it); the twin of
    ``_pure.tcp_receive_established``, which documents the conditions."""
    payload = seg.payload
    if type(payload) is not bytes:
        payload = bytes(payload)
    ts = seg.timestamp
    cdef bint ts_present = ts is not None
    cdef uint64_t tsval = 0, tsecr = 0
    if ts_present:
        tsval = ts[0]
        tsecr = ts[1]
    cdef dict d = conn.__dict__
    cdef Fields f
    _load(&f, d)
    cdef int taken = _take(
        &f, conn, d, seg.flags, seg.seq, seg.ack, seg.window, bool(seg.sack_blocks), ts_present,
        tsval, tsecr, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), now,
    )
    _store(&f, d)
    return taken == 1


def tcp_receive_run(list packets, Py_ssize_t start, double now, local, dict conns,
                    dict dirty, fast_states, segment_type):
    """Received packets ``packets[start:]`` through the established-state path, in
    order, up to the first one it does not take; the twin of ``_pure.tcp_receive_run``.

    A packet is taken when it is a TCP segment of a connection in ``fast_states``
    (keyed in ``conns`` by ``(local address, local port, remote address, remote
    port)``, the local address in ``local``) that the hot path handled in full; the
    connection is then marked in ``dirty``.  Returns ``(index, parsed)``: the index of
    the first packet not taken (``len(packets)`` when all were) and what
    ``parse_tcp_packet`` made of it -- ``(src, dst, segment)`` for the general path, or
    None when it is not well-formed TCP (or when all were taken).
    """
    cdef Py_ssize_t i = start
    cdef Py_ssize_t n = PyList_GET_SIZE(packets)
    cdef const unsigned char *p
    cdef TcpView v
    cdef Fields f
    cdef object conn = None  # the connection ``f`` holds, while it holds one
    cdef dict d = None
    cdef unsigned char last_key[36]  # addresses and ports of the packets of ``conn``
    cdef Py_ssize_t key_len = 0, address_bytes
    cdef object src, dst, found
    try:
        while i < n:
            packet = <object>PyList_GET_ITEM(packets, i)
            if type(packet) is not bytes:
                return i, None
            p = <const unsigned char *>PyBytes_AS_STRING(packet)
            if not _view_tcp(p, PyBytes_GET_SIZE(packet), &v):
                return i, None
            address_bytes = 2 * v.addr_len
            if not (conn is not None and key_len == address_bytes + 4
                    and memcmp(last_key, p + v.addr_off, address_bytes) == 0
                    and memcmp(last_key + address_bytes, p + v.tcp_off, 4) == 0):
                if conn is not None:
                    _store(&f, d)
                    conn = None
                src = PyBytes_FromStringAndSize(<const char *>p + v.addr_off, v.addr_len)
                dst = PyBytes_FromStringAndSize(<const char *>p + v.addr_off + v.addr_len,
                                                v.addr_len)
                if dst not in local:
                    return i, (src, dst, _segment_of(p, &v, segment_type))
                found = conns.get((dst, v.dst_port, src, v.src_port))
                if found is None or found.state not in fast_states:
                    return i, (src, dst, _segment_of(p, &v, segment_type))
                conn = found
                d = conn.__dict__
                _load(&f, d)
                memcpy(last_key, p + v.addr_off, address_bytes)
                memcpy(last_key + address_bytes, p + v.tcp_off, 4)
                key_len = address_bytes + 4
            if not _take(&f, conn, d, v.flags, v.seq, v.ack, v.window, v.blocks > 0, v.has_ts,
                         v.tsval, v.tsecr, <const char *>p + v.tcp_off + v.data_off,
                         v.tcp_len - v.data_off, now):
                _store(&f, d)
                conn = None
                return i, _parsed(p, &v, segment_type)
            dirty[conn] = None
            i += 1
        return n, None
    finally:
        if conn is not None:
            _store(&f, d)


# ---------------------------------------------------------------- TCP send run
#
# Theory of operation: a bulk sender's ``_transmit`` spends its time in one branch --
# new, full-size data after the first segment of the call, which carries the first
# segment's ACK fields (the ``template``) and differs only in SEQ, flags and payload.
# ``tcp_send_run`` takes over that branch for as many segments in a row as it applies:
# it stops, changing nothing for that segment, at the first one the branch would not
# take (the congestion or peer window, sender SWS avoidance, old data, our FIN, the
# end of the data) and ``_transmit`` carries on from there.  A payload inside one of
# the send buffer's chunks is sliced from it directly (``SendBuffer.peek`` for one
# that spans chunks or reaches the unfrozen tail, which peek then freezes), and the
# connection's fields are written once at the end.
# Twin: ``tcp_send_run`` in ``_pure.py``.

import bisect as _bisect


def tcp_send_run(object conn, object template, list out, long long pipe, long long data_end,
                 object fin, long long mss, long long limit, double now, object wire):
    """New data segments modelled on ``template`` appended to ``out`` while
    ``_transmit``'s template branch applies (at most ``limit``), as TcpSegments or, when
    ``wire`` is ``(source, destination)``, straight as their IP packets; returns
    ``(segments, pipe)``.  The twin of ``_pure.tcp_send_run``."""
    cdef dict d = conn.__dict__
    cdef long long fin_offset = -1 if fin is None else <long long>fin
    cdef long long cwnd = d["_cwnd"]
    cdef long long snd_una = d["_snd_una"]
    cdef long long wnd_right = snd_una + <long long>d["_snd_wnd"]
    cdef long long half_window = (<long long>d["_max_snd_wnd"]) // 2
    cdef long long nxt = d["_snd_nxt"]
    cdef long long first_max = d["_snd_max"]
    cdef long long snd_max = first_max
    cdef long long iss = d["_iss"]
    cdef long long room, usable, avail, length, end, local, chunk_start = 0, chunk_len = 0
    cdef long long count = 0
    cdef Py_ssize_t index = -1
    cdef unsigned int flags
    sndbuf = d["_sndbuf"]
    cdef long long base = <long long>sndbuf._head - <long long>d["_sndbuf_start"]
    cdef list chunks = sndbuf._chunks
    cdef list starts = sndbuf._starts
    cdef object chunk = None
    segment_type = type(template)
    src_port = template.src_port
    dst_port = template.dst_port
    wire_ack = template.ack
    window = template.window
    timestamp = template.timestamp
    sack_blocks = template.sack_blocks
    # The packet form: every packet of the run has the same headers but for the
    # lengths, SEQ, flags and checksums; they are laid out once here.
    cdef unsigned char header[100]
    cdef unsigned char *hp
    cdef Py_ssize_t address_len = 0, ip_len = 0, tcp_header = 0, n_opts
    cdef const unsigned char *s = NULL
    cdef const unsigned char *dp = NULL
    cdef const char *source = NULL
    cdef bytes packet
    cdef unsigned char *pp
    if wire is not None:
        wire_src, wire_dst = wire
        address_len = _address_length(wire_src, wire_dst)
        s = <const unsigned char *>PyBytes_AS_STRING(wire_src)
        dp = <const unsigned char *>PyBytes_AS_STRING(wire_dst)
        ip_len = 20 if address_len == 4 else 40
        hp = header + ip_len
        n_opts = _tcp_options(template, hp + 20)
        tcp_header = 20 + n_opts
        _put16(hp, <unsigned int>_u16(src_port))
        _put16(hp + 2, <unsigned int>_u16(dst_port))
        _put32(hp + 8, _u32(wire_ack))
        hp[12] = <unsigned char>((tcp_header // 4) << 4)
        _put16(hp + 14, <unsigned int>_u16(window))
        _put16(hp + 16, 0)
        _put16(hp + 18, 0)
    while count < limit:
        room = cwnd - pipe
        if room <= 0:
            break
        usable = wnd_right - nxt
        if room < usable:
            usable = room
        avail = data_end - nxt
        if avail <= 0:
            break
        length = avail if avail < mss else mss
        if usable < length:
            length = usable
        if length <= 0:
            break
        if length < mss and length < avail and (room < mss or length < half_window):
            break
        end = nxt + length
        if nxt < snd_max or end == fin_offset:
            break
        flags = 0x18 if end == data_end else 0x10  # ACK | PSH at the end of the data
        # The payload: a slice of the chunk holding it, else SendBuffer.peek.
        local = base + nxt
        if index < 0 or local < chunk_start or local >= chunk_start + chunk_len:
            first = sndbuf._first
            index = _bisect.bisect_right(starts, local, first) - 1
            if index >= <Py_ssize_t>first:
                chunk = chunks[index]
                chunk_start = starts[index]
                chunk_len = PyBytes_GET_SIZE(chunk)
            else:
                index = -1
        payload = None
        if index >= 0 and local + length <= chunk_start + chunk_len:
            source = PyBytes_AS_STRING(chunk) + (local - chunk_start)
            if wire is None:
                if local == chunk_start and length == chunk_len:
                    payload = chunk
                else:
                    payload = PyBytes_FromStringAndSize(source, length)
        else:
            payload = sndbuf.peek(nxt - <long long>d["_sndbuf_start"], length)
            source = PyBytes_AS_STRING(payload)
            index = -1  # the chunks may have changed (the tail frozen)
        if wire is None:
            out.append(
                segment_type(
                    src_port, dst_port, (iss + nxt) & 0xFFFFFFFF, wire_ack, flags, window,
                    payload, None, None, False, timestamp, sack_blocks,
                )
            )
        else:
            packet = PyBytes_FromStringAndSize(NULL, ip_len + tcp_header + length)
            pp = <unsigned char *>PyBytes_AS_STRING(packet)
            _ip_header(pp, s, dp, address_len, tcp_header + length)
            memcpy(pp + ip_len, header + ip_len, tcp_header)
            _put32(pp + ip_len + 4, (iss + nxt) & 0xFFFFFFFF)
            pp[ip_len + 13] = <unsigned char>flags
            memcpy(pp + ip_len + tcp_header, source, length)
            _tcp_checksum(pp + ip_len, s, dp, address_len, tcp_header + length)
            out.append(packet)
        nxt = end
        snd_max = end
        pipe += length
        count += 1
    if count:
        d["_snd_nxt"] = nxt
        d["_ack_now"] = False  # as _segment: new data carries our ACK
        d["_ack_pending"] = 0
        d["_ack_deadline"] = None
        d["_tlp_new_data"] = False
        d["_persist_deadline"] = None
        d["_persist_backoff"] = 0
        if d["_rtt_seq"] is None and not d["_ts_ok"]:
            d["_rtt_seq"] = first_max
            d["_rtt_time"] = now
        d["_snd_max"] = snd_max
        if d["_rto_deadline"] is None:
            d["_rto_deadline"] = now + <double>d["_rto"]
    return count, pipe
