"""HTTP/1.1 framing for the gateway: heads parsed by llhttp in C, bodies framed here.

Theory of operation
-------------------
Both edges of the proxy speak HTTP/1.1 through this package: a ``RequestReader`` per
client connection (the server role) and a ``ResponseReader`` per agent connection
(the client role), in ``read.py``; what goes out is built by ``write.py``.  The
readers are sans-IO: ``receive(data)`` and ``eof()`` go in, heads and body bytes come
out; nothing here touches a socket or a clock.  One reader serves a whole keep-alive
connection: what follows a message in its buffer is the next message (pipelining),
or after an upgrade the other protocol (``trailing()``).

* **Heads** are parsed by llhttp (``httptools``, the parser of Node.js) in its strict
  mode: CRLF line ends only, no obs-fold, no control characters in field values,
  tokens for methods and field names, one ``Content-Length`` of digits only.  llhttp
  sees exactly the head bytes: the reader looks for the blank line itself
  (``bytes.find``, resuming where it stopped) and feeds whatever arrived before it at
  once, so garbage is refused at its first bad byte, and a head still incomplete
  beyond ``max_head_bytes`` is a 431.  llhttp's callbacks collect the target, the
  reason phrase and the fields (names lower-cased, values without surrounding
  whitespace); the framing rules are then checked on that list, so that each refusal
  gets its own status (the RFC section is beside each rule in ``read.py``).  For
  that, llhttp is lenient about exactly the rules checked there instead: the
  version, ``Transfer-Encoding`` values, and ``Content-Length`` beside
  ``Transfer-Encoding``.  Empty lines before a message are skipped (RFC 9112 §2.2).
  A parser is reused for the next head when the last message ended with its head and
  kept the connection open (a run of GETs allocates none); otherwise the next head
  gets a fresh one.
* **Plain heads skip llhttp.**  Most heads are a known method, an origin-form
  target of URL characters, HTTP/1.0 or 1.1 and field lines of visible ASCII; a
  typed Cython scanner (``_scan.pyx``) takes exactly those, complete in the buffer and
  within ``max_head_bytes``, in one pass that builds the same pieces llhttp's
  callbacks would (names lower-cased, values stripped, the framing fields noted),
  and the same framing rules are then checked on them.  Anything else - an unknown
  or lower-case method, another target form, obs-text, obs-fold, a bare CR or LF,
  space before a colon, a second ``Content-Length``, a chunked request, a head still
  arriving - is declined and llhttp judges the very same bytes, so every refusal
  and every lenient corner stays llhttp's; ``tests/gateway/test_h1_scan.py`` checks
  that a reader with the scanner and one without agree on every head, body and
  refusal.  It halves the cost of reading a request and a response head.
  ``KAKUREMICHI_H1_SCAN=0`` leaves every head to llhttp.
* **Bodies** are framed by the readers, not by llhttp, which cannot be told that a
  response answers a HEAD request and cannot stop at the end of a message: a
  ``Content-Length`` body is counted and handed on as the received ``bytes`` objects
  (no copy when a read holds only body), a chunked body is decoded by a small state
  machine over the same buffer (one ``bytes`` per read, not one event per chunk;
  extensions and trailers checked, then dropped), a response without framing runs
  until EOF.  Responses to HEAD, 1xx, 204 and 304 have no body (RFC 9112 §6.3); a 101
  answering an upgrade request switches the reader off (``SWITCHED``).
* **Writing** is a bytes join (``request_head``, ``response_head``,
  ``encode_chunk``).  ``frame_response`` decides how a relayed response travels to
  the client: ``Content-Length`` kept, else chunked, else (HTTP/1.0 client) delimited
  by closing the connection (RFC 9112 §6.1-6.3).

``read.py``, ``write.py`` and ``../headers.py`` are compiled by Cython as they are
(``setup.py``): the ``.py`` files are the source.

Heads are plain ``__slots__`` dataclasses, not frozen ones: building a frozen
dataclass of eight fields costs 2.7 µs, five times a plain one and half of parsing a
typical head.  Treat them as read-only.

h11, which this replaced, is kept as the oracle of
``tests/gateway/test_h1_differential.py``; its docstring lists where this layer is
deliberately stricter or more lenient than h11, with the RFC sections.
"""

from .read import (
    BODY,
    CHUNKED,
    DONE,
    HEAD,
    LENGTH,
    NO_BODY,
    SWITCHED,
    UNTIL_CLOSE,
    Headers,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
)
from .write import (
    LAST_CHUNK,
    encode_chunk,
    frame_response,
    request_head,
    response_head,
    valid_target,
    verbatim_framing,
)

__all__ = [
    "BODY",
    "CHUNKED",
    "DONE",
    "HEAD",
    "LAST_CHUNK",
    "LENGTH",
    "NO_BODY",
    "SWITCHED",
    "UNTIL_CLOSE",
    "Headers",
    "ProtocolError",
    "RequestHead",
    "RequestReader",
    "ResponseHead",
    "ResponseReader",
    "encode_chunk",
    "frame_response",
    "request_head",
    "response_head",
    "valid_target",
    "verbatim_framing",
]
