"""Writing HTTP/1.1: heads as one bytes join, chunks, and how a relayed response is
framed towards the client (see the package docstring, ``h1/__init__``)."""

from __future__ import annotations

import re

from .read import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, Headers, ResponseHead

__all__ = [
    "LAST_CHUNK",
    "encode_chunk",
    "frame_response",
    "request_head",
    "response_head",
    "valid_target",
    "verbatim_framing",
]

LAST_CHUNK = b"0\r\n\r\n"

_TARGET = re.compile(rb"[\x21-\x7e]+")


_name_value = b": ".join


def _fields(headers: Headers) -> bytes:
    """``name: value`` lines, each ending in CRLF, then the empty line that ends a head
    (one ``join`` per field and one for the lot: a third cheaper than ``%`` per field)."""
    if not headers:
        return b"\r\n"
    return b"\r\n".join(map(_name_value, headers)) + b"\r\n\r\n"


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """The request line and ``headers`` (already valid) as they go on the wire."""
    return b"%s %s HTTP/1.1\r\n%s" % (method, target, _fields(headers))


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A status line and ``headers`` (a 1xx, a page, or a head ``frame_response`` framed)."""
    return b"HTTP/1.1 %d %s\r\n%s" % (status, reason, _fields(headers))


def frame_response(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    content_length: bool,
    head_request: bool,
    http10: bool,
    keep_alive: bool,
) -> tuple[bytes, int, bool]:
    """The head for relaying a final response to the client, the framing of its body
    on the client's side, and whether the connection persists after it.

    ``headers`` carry no framing fields except a ``Content-Length`` that describes the
    body (``content_length``); ``keep_alive`` is what the request allows.  As RFC 9112
    §6.1-6.3 ask: 204/304 and responses to HEAD carry no body (a HEAD response keeps
    the GET's framing fields, RFC 9110 §9.3.2); a ``Content-Length`` is kept; else the
    body is chunked, or for an HTTP/1.0 client ends with the connection.
    """
    if status in (204, 304):
        framing = NO_BODY
    elif content_length:
        framing = LENGTH
    elif http10:
        framing = UNTIL_CLOSE
        if not head_request:
            keep_alive = False
    else:
        headers = [*headers, (b"transfer-encoding", b"chunked")]
        framing = CHUNKED
    if head_request:
        framing = NO_BODY
    if not keep_alive:
        headers = [*headers, (b"connection", b"close")]
    return response_head(status, reason, headers), framing, keep_alive


def verbatim_framing(head: ResponseHead) -> int | None:
    """How a final response travels when its head goes to the client as it arrived
    (``head.raw``, see ``_scan.scan_response``), or None when it must be rewritten.

    For an HTTP/1.1 client that keeps its connection and did not send HEAD this is
    what ``frame_response`` decides for the rewritten head: chunked stays chunked, a
    ``Content-Length`` is kept, 204 and 304 have no body; a response delimited by
    closing its connection is not relayed as it is (the client gets it chunked).
    """
    if head.raw is None:
        return None
    if head.chunked:
        return CHUNKED
    if head.content_length is not None:
        return LENGTH
    if head.status in (204, 304):
        return NO_BODY
    return None


def encode_chunk(data: bytes) -> bytes:
    """``data`` as one chunk (nothing for empty data: that would end the body)."""
    if not data:
        return b""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


def valid_target(target: bytes) -> bool:
    """Whether a request target we built is still sendable (visible ASCII only)."""
    return _TARGET.fullmatch(target) is not None
