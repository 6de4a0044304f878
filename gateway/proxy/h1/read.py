"""Reading HTTP/1.1: ``RequestReader`` (server role) and ``ResponseReader`` (client role).

Heads go to llhttp, bodies are framed here; see the package docstring (``h1/__init__``)
for the theory of operation and ``tests/gateway/test_h1_differential.py`` for where
this is stricter or more lenient than h11.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import httptools

from ._scan import scan_request, scan_response

__all__ = [
    "BODY",
    "CHUNKED",
    "DONE",
    "HEAD",
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
]

Headers = list[tuple[bytes, bytes]]

# -- reader states
#: waiting for (the rest of) a message head
HEAD = "head"
#: inside a message body
BODY = "body"
#: the message ended (``next_head`` starts the next one)
DONE = "done"
#: protocol switched (101): the rest of the stream is not HTTP/1.1
SWITCHED = "switched"

# -- body framings (RFC 9112 §6.3)
NO_BODY = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3

# chunked decoder steps
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
#: request-line = method SP request-target SP HTTP-version (RFC 9112 §3)
_REQUEST_LINE = re.compile(b"[" + _TCHAR + rb"]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")
#: a field value after OWS: VCHAR, obs-text, SP and HTAB, nothing else (RFC 9110 §5.5)
_FIELD_CHARS = rb"[\t\x20-\x7e\x80-\xff]"
#: chunk-size [ chunk-ext ] (RFC 9112 §7.1); extensions are dropped, so only their
#: characters are checked; 20 hex digits at most, like h11
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;" + _FIELD_CHARS + rb"*)?[ \t]*")
#: reason-phrase = *( HTAB / SP / VCHAR / obs-text ) (RFC 9112 §4); llhttp takes NUL
_REASON = re.compile(_FIELD_CHARS + b"*")
_TRAILER_FIELD = re.compile(b"[" + _TCHAR + b"]+:" + _FIELD_CHARS + b"*")
_BAD_HEAD = "The request could not be parsed as HTTP/1.1."
_TOO_LARGE = "The request headers are too large."


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status`` is what a server answers (400, 431, 501, 505)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    """A parsed request head (names lower-case, values stripped; read-only)."""

    method: bytes
    target: bytes
    #: b"1.0" or b"1.1" (1.2-1.9 are read as 1.1, RFC 9110 §2.5)
    version: bytes
    headers: Headers
    #: bytes on the wire, request line to blank line
    size: int
    content_length: int | None
    chunked: bool
    #: the client may send another request on this connection (RFC 9112 §9.3)
    keep_alive: bool
    #: the head as it arrived, without its blank line, when it may go to the agent as
    #: it is with the gateway's forwarding fields after it (``_scan.scan_request``)
    raw: bytes | None = None


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head, informational (1xx) or final (read-only)."""

    status: int
    reason: bytes
    version: bytes
    headers: Headers
    content_length: int | None
    chunked: bool
    keep_alive: bool
    #: the whole head as it arrived when a client may get it as it is
    #: (``_scan.scan_response``; the request decides whether it does)
    raw: bytes | None = None


class _Fields:
    """llhttp's callbacks for one head at a time.

    The parser holds this object, not the reader, so readers form no reference cycle.
    """

    __slots__ = (
        "complete",
        "connection",
        "content_length",
        "headers",
        "hosts",
        "message_complete",
        "reason",
        "target",
        "transfer_encodings",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.target = b""
        self.reason = b""
        self.headers: Headers = []
        self.complete = False
        self.message_complete = False
        self.hosts = 0
        self.content_length: bytes | None = None
        self.transfer_encodings: list[bytes] = []
        self.connection: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp drops leading OWS, keeps trailing
        self.headers.append((name, value))
        if name in _FRAMING_FIELDS:
            if name == b"host":
                self.hosts += 1
            elif name == b"content-length":
                self.content_length = value  # llhttp refuses a second one
            elif name == b"transfer-encoding":
                self.transfer_encodings.append(value)
            else:
                self.connection.append(value)

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.message_complete = True


_FRAMING_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


def _has_token(values: list[bytes], token: bytes) -> bool:
    """Whether a comma-separated list field (``Connection``) names ``token``."""
    for value in values:
        if b"," not in value:
            if value.strip().lower() == token:  # the usual single token
                return True
        elif any(t.strip().lower() == token for t in value.split(b",")):
            return True
    return False


def _version(text: str) -> bytes:
    """llhttp's ``major.minor`` as we treat it: only HTTP/1.x is spoken here."""
    if text == "1.1":
        return b"1.1"
    if text == "1.0":
        return b"1.0"
    if text.startswith("1."):
        return b"1.1"  # a later 1.x is read as 1.1 (RFC 9110 §2.5)
    raise ProtocolError(505, "Only HTTP/1.0 and HTTP/1.1 are supported.")


def _transfer_coding(values: list[bytes]) -> bool:
    """Whether the message is chunked; only ``chunked`` alone is understood: a server
    answers other transfer codings with 501 (RFC 9112 §6.1, RFC 9110 §15.6.2), like h11."""
    if not values:
        return False
    if len(values) > 1 or values[0].lower() != b"chunked":
        raise ProtocolError(501, "Transfer-Encoding other than chunked is not supported.")
    return True


def _content_length(value: bytes | None) -> int | None:
    # llhttp checked the digits and that there is only one field (RFC 9110 §8.6)
    if value is None:
        return None
    if len(value) > 20:
        raise ProtocolError(400, "The Content-Length is not a valid length.")
    return int(value)


_ParserType = httptools.HttpRequestParser | httptools.HttpResponseParser


class _Reader:
    """The buffer, head feeding and body framing both readers share."""

    #: plain heads go to the scanner first (``KAKUREMICHI_H1_SCAN=0``: all to llhttp)
    _scan = os.environ.get("KAKUREMICHI_H1_SCAN", "1") != "0"

    __slots__ = (
        "_buf",
        "_eof",
        "_fed",
        "_fields",
        "_kind",
        "_left",
        "_max_head",
        "_parser",
        "_step",
        "_trailer",
        "framing",
        "state",
    )

    def __init__(self, max_head_bytes: int, kind: type[_ParserType]) -> None:
        self._max_head = max_head_bytes
        self._kind = kind
        self._buf = b""
        #: bytes at the start of ``_buf`` that llhttp has seen (a head in progress)
        self._fed = 0
        self._fields = _Fields()
        self._parser: _ParserType | None = None
        #: LENGTH: body bytes still due; CHUNKED: bytes left in the current chunk
        self._left = 0
        self._step = _SIZE
        self._trailer = 0
        self._eof = False
        self.state = HEAD
        self.framing = NO_BODY

    def receive(self, data: bytes) -> None:
        """Bytes from the peer (``eof()`` for its end of stream)."""
        if data:
            self._buf = self._buf + data if self._buf else data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf)

    def trailing(self) -> bytes:
        """Take what was received beyond the current message (after an upgrade)."""
        data, self._buf = self._buf, b""
        return data

    def eof(self) -> None:
        """The peer closed its side: this ends a close-delimited body; in the middle of
        any other message it is a ``ProtocolError`` (a truncated message)."""
        self._eof = True
        state = self.state
        if state == BODY and self.framing == UNTIL_CLOSE:
            if not self._buf:
                self.state = DONE
            return
        if state in (DONE, SWITCHED) or (state == HEAD and not self._buf):
            return
        raise ProtocolError(400, "The connection closed in the middle of a message.")

    # -- heads ------------------------------------------------------------------------

    def _skip_empty_lines(self) -> bytes:
        """The buffer, without the empty lines before a message (RFC 9112 §2.2)."""
        buf = self._buf
        if buf[:1] in (b"\r", b"\n"):
            buf = self._buf = buf.lstrip(b"\r\n")
        return buf

    def _read_head(self) -> int | None:
        """Feed what arrived of a head to llhttp; the head's length once complete."""
        buf = self._buf
        fed = self._fed
        fields = self._fields
        if fed == 0:
            buf = self._skip_empty_lines()
            if not buf:
                return None
            if self._parser is None or not fields.message_complete:
                # a new parser: the old one still expects the last message's body, or
                # refuses more after a message without keep-alive (see ``_reuse``);
                # lenient only where the rules are checked here (module docstring)
                self._parser = new = self._kind(fields)
                new.set_dangerous_leniencies(
                    lenient_version=True,
                    lenient_chunked_length=True,
                    lenient_transfer_encoding=True,
                )
            fields.reset()
        end = buf.find(b"\r\n\r\n", fed - 3 if fed > 3 else 0)
        stop = len(buf) if end < 0 else end + 4
        if stop > fed:
            parser = self._parser
            assert parser is not None
            try:
                parser.feed_data(
                    buf if fed == 0 and stop == len(buf) else memoryview(buf)[fed:stop]
                )
            except httptools.HttpParserUpgrade:
                fields.message_complete = False  # paused after an upgrade's head: not reusable
            except httptools.HttpParserError as exc:
                complete = fields.complete
                fields.message_complete = False
                if not complete:
                    self._failed(exc)
                    return None
                # llhttp objected to what it expected after the head (a 101 that names
                # no protocol, say); what follows a head is framed here, not by llhttp
            self._fed = stop
        if end < 0:
            if len(buf) > self._max_head:
                raise ProtocolError(431, _TOO_LARGE)
            return None
        if not fields.complete:
            raise ProtocolError(400, _BAD_HEAD)
        self._fed = 0
        return stop

    def _failed(self, exc: httptools.HttpParserError) -> None:
        if isinstance(exc, httptools.HttpParserInvalidURLError):
            raise ProtocolError(400, "Bad request target.")
        raise ProtocolError(400, _BAD_HEAD)

    def _reuse(self, keep_alive: bool) -> None:
        """llhttp refuses bytes after a message without keep-alive (even a 1xx with
        ``Connection: close``, which ends nothing): such a parser is not reused."""
        if not keep_alive:
            self._fields.message_complete = False

    def _consume(self, stop: int) -> None:
        buf = self._buf
        self._buf = buf[stop:] if stop < len(buf) else b""

    def _frame_body(self, chunked: bool, length: int | None) -> None:
        if chunked:
            self.state, self.framing = BODY, CHUNKED
            self._step, self._left, self._trailer = _SIZE, 0, 0
        elif length:
            self.state, self.framing = BODY, LENGTH
            self._left = length
        else:
            self.state, self.framing = DONE, NO_BODY

    # -- bodies -----------------------------------------------------------------------

    def body(self) -> bytes:
        """The body bytes available now (``b""`` if none); ``state`` is DONE after the
        last.  Raises ``ProtocolError`` for broken chunked framing."""
        if self.state != BODY:
            return b""
        framing = self.framing
        buf = self._buf
        if framing == LENGTH:
            left = self._left
            if len(buf) <= left:
                self._buf = b""
                left -= len(buf)
            else:
                self._buf = buf[left:]
                buf = buf[:left]
                left = 0
            self._left = left
            if not left:
                self.state = DONE
            return buf
        if framing == CHUNKED:
            return self._dechunk()
        self._buf = b""  # UNTIL_CLOSE
        if self._eof:
            self.state = DONE
        return buf

    def _dechunk(self) -> bytes:
        """Decode the chunked framing in the buffer (RFC 9112 §7.1); trailers and chunk
        extensions are checked and dropped."""
        buf = self._buf
        size = len(buf)
        pos = 0
        pieces: list[bytes] = []
        step = self._step
        while pos < size:
            if step == _DATA:
                stop = pos + self._left
                if stop >= size:
                    pieces.append(buf[pos:] if pos else buf)
                    self._left = stop - size
                    pos = size
                    if not self._left:
                        step = _DATA_END
                    break
                pieces.append(buf[pos:stop])
                pos = stop
                self._left = 0
                step = _DATA_END
            elif step == _DATA_END:
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                    step = _SIZE
                elif size - pos == 1 and buf[pos] == 13:
                    break
                else:
                    raise ProtocolError(400, "A chunk did not end with CRLF.")
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    # a bare LF never ends a line here (RFC 9112 §2.2); say so at once
                    if buf.find(b"\n", pos) >= 0 or size - pos > self._max_head:
                        raise ProtocolError(400, "Malformed chunked framing.")
                    break
                if step == _SIZE:
                    match = _CHUNK_LINE.fullmatch(buf, pos, eol)
                    if match is None:
                        raise ProtocolError(400, "Malformed chunk size line.")
                    pos = eol + 2
                    self._left = int(match.group(1), 16)
                    step = _DATA if self._left else _TRAILER
                elif eol == pos:  # the blank line after the trailer section
                    pos += 2
                    self.state = DONE
                    break
                else:
                    self._trailer += eol - pos
                    if _TRAILER_FIELD.fullmatch(buf, pos, eol) is None:
                        raise ProtocolError(400, "Malformed trailer field.")
                    if self._trailer > self._max_head:
                        raise ProtocolError(400, "The trailer section is too large.")
                    pos = eol + 2
        self._step = step
        self._buf = buf[pos:] if pos < size else b""
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class RequestReader(_Reader):
    """The server side of one client connection: request heads, then their bodies."""

    __slots__ = ("_undecided",)

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes, httptools.HttpRequestParser)
        #: llhttp refused the method; waiting for the request line to judge it
        self._undecided = False

    def next_head(self) -> RequestHead | None:
        """The next request's head, or None until more data arrives.

        Raises ``ProtocolError`` (with the status to answer) for a malformed head.
        Call it in state HEAD or DONE (the previous request and its body fully read).
        """
        if self.state == DONE:
            self.state = HEAD
        elif self.state != HEAD:
            raise RuntimeError("the previous request's body was not read")
        if self._undecided:
            self._method_verdict()
            return None
        if self._fed == 0 and self._scan:
            scanned = scan_request(self._skip_empty_lines(), self._max_head)
            if scanned is not None:
                self._parser = None  # llhttp saw nothing: a fresh one for what it judges
                return self._request(*scanned)
        stop = self._read_head()
        if stop is None:
            return None
        return self._request_head(stop)

    def _request_head(self, stop: int) -> RequestHead:
        fields = self._fields
        parser = self._parser
        assert isinstance(parser, httptools.HttpRequestParser)
        buf = self._buf
        # request-line = method SP request-target SP HTTP-version: exactly one SP
        # between them (RFC 9112 §3); llhttp would take several
        if buf.count(b" ", 0, buf.find(b"\r\n")) != 2:
            raise ProtocolError(400, _BAD_HEAD)
        return self._request(
            stop,
            parser.get_method(),
            fields.target,
            _version(parser.get_http_version()),
            fields.headers,
            fields.hosts,
            fields.content_length,
            fields.transfer_encodings,
            fields.connection,
        )

    def _request(
        self,
        stop: int,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        hosts: int,
        content_length: bytes | None,
        transfer_encodings: list[bytes],
        connection: list[bytes],
        raw: bytes | None = None,
    ) -> RequestHead:
        """The framing rules on a parsed head (from llhttp or the scanner alike)."""
        # RFC 9112 §3.2: a request with two Host fields, or an HTTP/1.1 one without,
        # is a 400 (and the Host picks the route: no ambiguity allowed)
        if hosts != 1:
            if hosts:
                raise ProtocolError(400, "More than one Host header.")
            if version == b"1.1":
                raise ProtocolError(400, "The request has no Host header.")
        chunked = _transfer_coding(transfer_encodings)
        length = _content_length(content_length)
        if chunked and length is not None:
            # RFC 9112 §6.3 ¶3: both is how requests get smuggled; refuse, then close
            raise ProtocolError(400, "Both Content-Length and Transfer-Encoding were sent.")
        head = RequestHead(
            method,
            target,
            version,
            headers,
            stop,
            length,
            chunked,
            # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 does not here
            version == b"1.1" and not (connection and _has_token(connection, b"close")),
            raw,
        )
        self._reuse(head.keep_alive)
        self._consume(stop)
        self._frame_body(chunked, length)
        return head

    def _failed(self, exc: httptools.HttpParserError) -> None:
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            self._undecided = True
            self._method_verdict()
            return
        super()._failed(exc)

    def _method_verdict(self) -> None:
        """llhttp does not know the method: 501 if the request line is well-formed
        otherwise (RFC 9110 §9.1: an unrecognized method), else 400.  Returns (None)
        while the line is incomplete and could still be well-formed."""
        buf = self._buf
        eol = buf.find(b"\r\n")
        if eol < 0:
            if buf[0] in _TCHARS and len(buf) <= self._max_head and buf.find(b"\n") < 0:
                return None
            raise ProtocolError(400, _BAD_HEAD)
        if _REQUEST_LINE.fullmatch(buf, 0, eol) is not None:
            raise ProtocolError(501, "The request method is not supported.")
        raise ProtocolError(400, _BAD_HEAD)


class ResponseReader(_Reader):
    """The client side of one agent connection: the response to each request sent."""

    __slots__ = ("_head_request", "_upgrade", "keep_alive")

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes, httptools.HttpResponseParser)
        self.state = DONE  # nothing asked yet
        self._head_request = False
        self._upgrade = False
        #: the connection may carry another exchange after this response
        self.keep_alive = True

    def start(self, method: bytes, *, upgrade: bool = False) -> None:
        """Expect the response to a request with ``method`` (HEAD: it has no body,
        RFC 9110 §9.3.2); ``upgrade``: the request asked to switch protocols, so a 101
        may answer it."""
        self.state = HEAD
        self._head_request = method == b"HEAD"
        self._upgrade = upgrade
        self.keep_alive = True

    def reusable(self) -> bool:
        """The last response ended cleanly and the connection may carry another."""
        return self.state == DONE and self.keep_alive and not self._buf and not self._eof

    def next_head(self) -> ResponseHead | None:
        """The next response head (1xx first, if any), or None until more data arrives.

        After a 1xx other than 101 the state stays HEAD: the final response follows
        (RFC 9110 §15.2).  Raises ``ProtocolError`` for anything malformed.
        """
        if self.state != HEAD:
            raise RuntimeError("no response is expected")
        if self._fed == 0 and self._scan:
            scanned = scan_response(self._skip_empty_lines(), self._max_head)
            if scanned is not None:
                self._parser = None  # llhttp saw nothing: a fresh one for what it judges
                return self._response(*scanned)
        stop = self._read_head()
        if stop is None:
            return None
        return self._response_head(stop)

    def _response_head(self, stop: int) -> ResponseHead:
        fields = self._fields
        parser = self._parser
        assert isinstance(parser, httptools.HttpResponseParser)
        status = parser.get_status_code()
        if status < 100:
            raise ProtocolError(400, "Invalid status code.")  # status-code = 3DIGIT, RFC 9110 §15
        if fields.reason and _REASON.fullmatch(fields.reason) is None:
            raise ProtocolError(400, "Invalid reason phrase.")
        return self._response(
            stop,
            status,
            fields.reason,
            _version(parser.get_http_version()),
            fields.headers,
            fields.content_length,
            fields.transfer_encodings,
            fields.connection,
        )

    def _response(
        self,
        stop: int,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        content_length: bytes | None,
        transfer_encodings: list[bytes],
        connection: list[bytes],
        raw: bytes | None = None,
    ) -> ResponseHead:
        """The framing rules on a parsed head (from llhttp or the scanner alike)."""
        chunked = _transfer_coding(transfer_encodings)
        length = _content_length(content_length)
        if chunked:
            length = None  # chunked wins over Content-Length (RFC 9112 §6.3 ¶3)
        keep_alive = version == b"1.1" and not (connection and _has_token(connection, b"close"))
        head = ResponseHead(status, reason, version, headers, length, chunked, keep_alive, raw)
        self._reuse(keep_alive)
        self._consume(stop)
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    raise ProtocolError(400, "Switching protocols was not asked for.")
                self.state = SWITCHED
            self.framing = NO_BODY
            return head
        self.keep_alive = keep_alive
        if self._head_request or status in (204, 304):
            self.state, self.framing = DONE, NO_BODY  # RFC 9112 §6.3 ¶1
        elif chunked or length is not None:
            self._frame_body(chunked, length)
        else:
            self.state, self.framing = BODY, UNTIL_CLOSE  # RFC 9112 §6.3 ¶8
            self.keep_alive = False
        return head
