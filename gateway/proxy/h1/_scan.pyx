# cython: language_level=3, boundscheck=False, wraparound=False
"""A typed scanner for the plain heads most traffic is made of (see ``read.py``).

``scan_request`` and ``scan_response`` take a buffer that starts with a head (empty
lines before it already skipped) and return the head's pieces, or None whenever
anything is not in the narrow, unambiguous subset described in ``read.py``: the
caller then lets llhttp judge the very same bytes, so every refusal, every lenient
corner and every incomplete head stays llhttp's.  Accepting is the only thing done
here, and ``tests/gateway/test_h1_scan.py`` checks it against llhttp byte for byte.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp, memchr

cdef bytes _GET = b"GET"
cdef bytes _HEAD = b"HEAD"
cdef bytes _POST = b"POST"
cdef bytes _PUT = b"PUT"
cdef bytes _DELETE = b"DELETE"
cdef bytes _OPTIONS = b"OPTIONS"
cdef bytes _PATCH = b"PATCH"
cdef bytes _V11 = b"1.1"
cdef bytes _V10 = b"1.0"
cdef bytes _EMPTY = b""
cdef bytes _N_HOST = b"host"
cdef bytes _N_CONTENT_LENGTH = b"content-length"
cdef bytes _N_TRANSFER_ENCODING = b"transfer-encoding"
cdef bytes _N_CONNECTION = b"connection"

cdef enum:
    #: longest field name taken here (longer ones go to llhttp)
    MAX_NAME = 64
    #: Content-Length digits taken here (llhttp's limit is 2**64-1)
    MAX_LENGTH_DIGITS = 18

# character classes: 1 = tchar (RFC 9110 §5.6.2), 2 = field-value character without
# obs-text (HTAB, SP, VCHAR: RFC 9110 §5.5), 4 = request-target character taken here
# (RFC 3986 pchar, "/" and "?", no "#", no obs-text)
cdef unsigned char _CLASS[256]


cdef void _classes():
    cdef int c
    cdef bytes tchars = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    cdef bytes target = b"-._~!$&'()*+,;=:@/%?0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    for c in range(256):
        _CLASS[c] = 0
    for c in tchars:
        _CLASS[c] |= 1
    for c in range(0x20, 0x7f):
        _CLASS[c] |= 2
    _CLASS[9] |= 2
    for c in target:
        _CLASS[c] |= 4


_classes()


cdef Py_ssize_t _head_end(const char* p, Py_ssize_t size, Py_ssize_t max_head):
    """The length of the head (through its blank line), or -1 if not all here or too big."""
    cdef Py_ssize_t limit = size if size < max_head else max_head
    cdef const char* hit
    cdef Py_ssize_t at = 0
    while at + 4 <= limit:
        hit = <const char*>memchr(p + at, b"\r", limit - at - 3)
        if hit == NULL:
            return -1
        at = hit - p
        if p[at + 1] == b"\n" and p[at + 2] == b"\r" and p[at + 3] == b"\n":
            return at + 4
        at += 1
    return -1


cdef object _method(const char* p, Py_ssize_t n):
    if n == 3:
        if memcmp(p, b"GET", 3) == 0:
            return _GET
        if memcmp(p, b"PUT", 3) == 0:
            return _PUT
    elif n == 4:
        if memcmp(p, b"HEAD", 4) == 0:
            return _HEAD
        if memcmp(p, b"POST", 4) == 0:
            return _POST
    elif n == 5:
        if memcmp(p, b"PATCH", 5) == 0:
            return _PATCH
    elif n == 6:
        if memcmp(p, b"DELETE", 6) == 0:
            return _DELETE
    elif n == 7:
        if memcmp(p, b"OPTIONS", 7) == 0:
            return _OPTIONS
    return None


cdef object _version(const char* p):
    """``HTTP/1.1`` or ``HTTP/1.0`` at p (8 bytes readable), else None."""
    if memcmp(p, b"HTTP/1.", 7) != 0:
        return None
    if p[7] == b"1":
        return _V11
    if p[7] == b"0":
        return _V10
    return None


# what a head holds besides its framing, for the verbatim relay (``raw`` below)
cdef enum:
    #: a hop-by-hop field a proxy must drop (RFC 9110 §7.6.1), or a Connection field
    #: other than a lone "keep-alive"
    HOP = 1
    #: a field the gateway states itself (X-Forwarded-*, X-Real-IP, X-Auth-*)
    FORWARDED = 2
    #: the first field is not Host
    HOST_LATER = 4


cdef class _Fields:
    cdef public list headers
    cdef public int hosts
    cdef public object content_length
    cdef public list transfer_encodings
    cdef public list connection
    cdef int flags


cdef int _named(const char* name, Py_ssize_t n):
    """HOP or FORWARDED for a lower-cased field name that has that role, else 0 (Host,
    Content-Length, Transfer-Encoding and Connection are handled by the caller)."""
    if n == 2:
        return HOP if memcmp(name, b"te", 2) == 0 else 0
    if n == 7:
        return HOP if memcmp(name, b"trailer", 7) == 0 or memcmp(name, b"upgrade", 7) == 0 else 0
    if n == 9:
        return FORWARDED if memcmp(name, b"x-real-ip", 9) == 0 else 0
    if n == 11:
        return FORWARDED if memcmp(name, b"x-auth-user", 11) == 0 else 0
    if n == 12:
        return FORWARDED if memcmp(name, b"x-auth-email", 12) == 0 else 0
    if n == 13:
        return FORWARDED if memcmp(name, b"x-auth-groups", 13) == 0 else 0
    if n == 10:
        return HOP if memcmp(name, b"keep-alive", 10) == 0 else 0
    if n == 15:
        return FORWARDED if memcmp(name, b"x-forwarded-for", 15) == 0 else 0
    if n == 16:
        if memcmp(name, b"proxy-connection", 16) == 0:
            return HOP
        return FORWARDED if memcmp(name, b"x-forwarded-host", 16) == 0 else 0
    if n == 17:
        return FORWARDED if memcmp(name, b"x-forwarded-proto", 17) == 0 else 0
    if n == 18:
        return HOP if memcmp(name, b"proxy-authenticate", 18) == 0 else 0
    if n == 19:
        return HOP if memcmp(name, b"proxy-authorization", 19) == 0 else 0
    return 0


cdef bint _lone_keep_alive(const char* p, Py_ssize_t start, Py_ssize_t end):
    """Whether a field value (without surrounding whitespace) is "keep-alive" in any case."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if end - start != 10:
        return False
    for i in range(10):
        c = <unsigned char>p[start + i]
        if b"A" <= c <= b"Z":
            c += 32
        if c != (<const unsigned char*>b"keep-alive")[i]:
            return False
    return True


cdef Py_ssize_t _fields(const char* p, Py_ssize_t pos, Py_ssize_t stop, _Fields out):
    """Field lines from ``pos`` to the blank line ending at ``stop``; -1 to decline."""
    cdef char name[MAX_NAME]
    cdef Py_ssize_t start, name_len, value_start, value_end, i
    cdef unsigned char c
    cdef bytes lowered, value
    cdef list headers = out.headers
    while True:
        if pos + 2 == stop:
            return stop  # the blank line (the head ends with it: see _head_end)
        start = pos
        while _CLASS[<unsigned char>p[pos]] & 1:
            pos += 1
        name_len = pos - start
        if name_len == 0 or name_len > MAX_NAME or p[pos] != b":":
            return -1  # also obs-fold: a line that starts with SP or HTAB has no name
        for i in range(name_len):
            c = <unsigned char>p[start + i]
            if b"A" <= c <= b"Z":
                c += 32
            name[i] = <char>c
        pos += 1
        while p[pos] == b" " or p[pos] == b"\t":
            pos += 1
        value_start = pos
        while _CLASS[<unsigned char>p[pos]] & 2:
            pos += 1
        if p[pos] != b"\r" or p[pos + 1] != b"\n":
            return -1  # bare CR or LF, a control character, obs-text: llhttp decides
        value_end = pos
        while value_end > value_start and (p[value_end - 1] == b" " or p[value_end - 1] == b"\t"):
            value_end -= 1
        pos += 2
        value = PyBytes_FromStringAndSize(p + value_start, value_end - value_start) \
            if value_end > value_start else _EMPTY
        if name_len == 4 and memcmp(name, b"host", 4) == 0:
            lowered = _N_HOST
            out.hosts += 1
        elif name_len == 14 and memcmp(name, b"content-length", 14) == 0:
            if out.content_length is not None:
                return -1  # a second one: llhttp's refusal
            if value_end == value_start or value_end - value_start > MAX_LENGTH_DIGITS:
                return -1
            for i in range(value_start, value_end):
                if not (b"0" <= p[i] <= b"9"):
                    return -1
            lowered = _N_CONTENT_LENGTH
            out.content_length = value
        elif name_len == 17 and memcmp(name, b"transfer-encoding", 17) == 0:
            lowered = _N_TRANSFER_ENCODING
            out.transfer_encodings.append(value)
        elif name_len == 10 and memcmp(name, b"connection", 10) == 0:
            lowered = _N_CONNECTION
            out.connection.append(value)
            if not _lone_keep_alive(p, value_start, value_end):
                out.flags |= HOP
        else:
            lowered = PyBytes_FromStringAndSize(name, name_len)
            out.flags |= _named(name, name_len)
        if not headers and lowered is not _N_HOST:
            out.flags |= HOST_LATER
        headers.append((lowered, value))


cdef _Fields _new_fields():
    cdef _Fields out = _Fields.__new__(_Fields)
    out.headers = []
    out.hosts = 0
    out.content_length = None
    out.transfer_encodings = []
    out.connection = []
    out.flags = 0
    return out


def scan_request(bytes buf, Py_ssize_t max_head):
    """``(stop, method, target, version, headers, hosts, content_length,
    transfer_encodings, connection, raw)`` for a plain request head at the start of
    ``buf``, or None (see the module docstring).

    ``raw`` is the head's bytes without its blank line when they may go to the agent
    as they are, followed only by the gateway's forwarding fields: HTTP/1.1, Host the
    first field, no hop-by-hop field (a lone ``Connection: keep-alive`` is what the
    gateway would say itself towards the agent, RFC 9110 §7.6.1) and no forwarding
    field; else None."""
    cdef const char* p = PyBytes_AS_STRING(buf)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t stop = _head_end(p, size, max_head)
    cdef Py_ssize_t pos = 0, start
    if stop < 0:
        return None
    while _CLASS[<unsigned char>p[pos]] & 1:
        pos += 1
    if p[pos] != b" ":
        return None
    method = _method(p, pos)
    if method is None:
        return None
    pos += 1
    start = pos
    if p[pos] != b"/":
        return None  # origin-form only (absolute-form, "*" and the rest: llhttp)
    while _CLASS[<unsigned char>p[pos]] & 4:
        pos += 1
    if p[pos] != b" " or pos + 11 > stop:
        return None
    target = PyBytes_FromStringAndSize(p + start, pos - start)
    version = _version(p + pos + 1)
    if version is None or p[pos + 9] != b"\r" or p[pos + 10] != b"\n":
        return None
    cdef _Fields out = _new_fields()
    if _fields(p, pos + 11, stop, out) < 0:
        return None
    if out.transfer_encodings:
        return None  # a request body framed by chunks is rare: llhttp judges it
    raw = PyBytes_FromStringAndSize(p, stop - 2) \
        if out.flags == 0 and version is _V11 and out.hosts == 1 else None
    return (stop, method, target, version, out.headers, out.hosts, out.content_length,
            out.transfer_encodings, out.connection, raw)


def scan_response(bytes buf, Py_ssize_t max_head):
    """``(stop, status, reason, version, headers, content_length, transfer_encodings,
    connection, raw)`` for a plain response head at the start of ``buf``, or None.

    ``raw`` is the whole head when it may go to a client as it is: HTTP/1.1, a final
    status, no hop-by-hop field other than the framing (a lone chunked
    ``Transfer-Encoding``, which the gateway re-frames as chunked, and a lone
    ``Connection: keep-alive``, the gateway's own option on a kept connection); the
    caller still decides whether the client's side allows it.  Else None."""
    cdef const char* p = PyBytes_AS_STRING(buf)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t stop = _head_end(p, size, max_head)
    cdef Py_ssize_t pos, start
    cdef int status
    if stop < 17:  # "HTTP/1.1 200 \r\n\r\n": nothing shorter is taken here
        return None
    version = _version(p)
    if version is None or p[8] != b" ":
        return None
    if not (b"1" <= p[9] <= b"5" and b"0" <= p[10] <= b"9" and b"0" <= p[11] <= b"9"):
        return None
    if p[12] != b" ":
        return None  # no reason phrase at all ("HTTP/1.1 200\r\n"): llhttp's
    status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    pos = start = 13
    while _CLASS[<unsigned char>p[pos]] & 2:
        pos += 1
    if p[pos] != b"\r" or p[pos + 1] != b"\n":
        return None
    reason = PyBytes_FromStringAndSize(p + start, pos - start) if pos > start else _EMPTY
    cdef _Fields out = _new_fields()
    if _fields(p, pos + 2, stop, out) < 0:
        return None
    if out.transfer_encodings:
        # only a lone "chunked" on a 1.1 response that has no Content-Length besides
        if (
            len(out.transfer_encodings) != 1
            or out.content_length is not None
            or version is not _V11
            or (<bytes>out.transfer_encodings[0]).lower() != b"chunked"
        ):
            return None
    if out.content_length is not None and (status < 200 or status == 204 or status == 304):
        return None
    raw = PyBytes_FromStringAndSize(p, stop) \
        if (out.flags & HOP) == 0 and version is _V11 and status >= 200 else None
    return (stop, status, reason, version, out.headers, out.content_length,
            out.transfer_encodings, out.connection, raw)
