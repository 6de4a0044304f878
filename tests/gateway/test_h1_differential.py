"""Differential fuzz of the gateway's HTTP/1.1 layer (``gateway/proxy/h1/``) against h11.

Hypothesis builds request streams (one to three pipelined requests with bodies framed by
Content-Length or chunked) and response streams (1xx, then a final response, for a
GET, HEAD or upgrade request), valid ones and mutated ones: bad characters, obs-fold,
duplicate or invalid Content-Length, Transfer-Encoding variants, bare LF, missing or
doubled Host, chunk-size edge cases, trailers, huge heads.  Each stream is fed to our
readers and to h11 (the oracle), whole and byte by byte; the verdict is the list of
messages accepted (method or status, target or reason, fields, body, keep-alive) and
how the stream ended (clean end, close, refusal).  The oracle is h11 plus the one
framing rule the gateway added on top of it before this layer existed:
``Content-Length`` together with ``Transfer-Encoding`` in a request is refused.

Every generated mutation that our layer judges differently from h11 is tagged, and a
tagged message must be refused by us (all messages before it judged alike).  The
deliberate differences, ours being stricter than h11 (h11 accepts, we refuse):

* ``bare-lf``: a line ended by LF alone (RFC 9112 §2.2 allows a recipient to accept
  it, it does not have to; llhttp refuses, and so no two parsers on the path can
  disagree about where a line ends).
* ``obs-fold``: a field value continued on the next line (RFC 9112 §5.2: a server
  may reject with 400; a proxy may answer such a response with 502).
* ``ctl``, ``trailer-ctl``: control characters other than HTAB in a field value, in
  the head or the trailer section (RFC 9110 §5.5: field values are VCHAR, obs-text,
  SP and HTAB; h11 lets most CTLs through on purpose), or in a reason phrase (RFC 9112
  §4, the same characters).
* ``dup-cl``: two Content-Length fields with the same value, or a list ``5, 5``
  (RFC 9110 §8.6: a recipient may reject either; llhttp does).
* ``method``: a token method llhttp does not know (``get``, ``FOO``): 501 (RFC 9110
  §9.1, §15.6.2), where h11 passes any token on.
* ``target``: a request target that is not origin-form, absolute-form or asterisk-form
  (RFC 9112 §3.2; authority-form is for CONNECT only, which the gateway refuses
  anyway): llhttp refuses ``a:443``, ``?x``, ``x``; h11 takes any visible ASCII.
* ``version``: a version other than HTTP/1.x, such as HTTP/0.9 or HTTP/2.0: 505
  (RFC 9110 §2.5, §15.6.6), where h11 takes any ``d.d``.  HTTP/1.2-1.9 are read as
  1.1 (RFC 9110 §2.5), so need a Host (h11 asks for one only with exactly 1.1).
* ``chunk-ext``: control characters in a chunk extension (RFC 9112 §7.1.1 grammar:
  tokens and quoted strings); h11 takes anything after the ``;``.
* ``cl-digits``: a Content-Length of 20 digits above 2**64-1 (llhttp's limit; h11
  takes 20 digits).

More lenient than h11 (we accept, h11 refuses):

* empty lines (CRLF) before a request line or status line are skipped (RFC 9112 §2.2:
  a server SHOULD ignore at least one); h11 refuses them.  Tested on its own below.

Representation differences that are not verdicts: h11 lower-cases the
``Transfer-Encoding`` value and collapses a repeated ``Content-Length``; we keep the
value as sent (the gateway strips the field anyway), so the comparison lower-cases it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import h11
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from gateway.proxy import h1

MAX = 64 * 1024
REJECT = "reject"
CLOSE = "close"
END = "end"
SWITCHED = "switched"

Verdict = list[Any]

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _norm(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v.lower() if n == b"transfer-encoding" else bytes(v)) for n, v in headers]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- the two sides, request direction -----------------------------------------------


def ours_requests(chunks: list[bytes], max_head: int = MAX) -> Verdict:
    """Our RequestReader's verdict; a complete head above ``max_head`` is refused as
    the gateway's admission does."""
    reader = h1.RequestReader(max_head)
    out: Verdict = []
    head: h1.RequestHead | None = None
    body: list[bytes] = []
    try:
        for chunk in [*chunks, None]:
            if chunk is None:
                reader.eof()
            else:
                reader.receive(chunk)
            while True:
                if head is None:
                    head = reader.next_head()
                    if head is None:
                        break
                    if head.size > max_head:
                        return [*out, REJECT]
                    body = []
                if reader.state == h1.BODY:
                    body.append(reader.body())
                    if reader.state == h1.BODY:
                        break
                out.append(
                    (
                        head.method,
                        head.target,
                        head.version,
                        _norm(head.headers),
                        b"".join(body),
                        head.keep_alive,
                    )
                )
                if not head.keep_alive:
                    return [*out, CLOSE]
                head = None
    except h1.ProtocolError:
        return [*out, REJECT]
    return [*out, END]


def h11_requests(chunks: list[bytes], max_head: int = MAX) -> Verdict:
    """h11's verdict (server role, answering each request with an empty 200)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    out: Verdict = []
    request: h11.Request | None = None
    body: list[bytes] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return [*out, REJECT]
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.ConnectionClosed):
                return [*out, END]
            if isinstance(event, h11.Request):
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    return [*out, REJECT]  # the gateway's own rule, older than h1/
                request, body = event, []
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                conn.send(h11.EndOfMessage())
                keep = conn.our_state is h11.DONE
                out.append(
                    (
                        bytes(request.method),
                        bytes(request.target),
                        bytes(request.http_version),
                        _norm(list(request.headers)),
                        b"".join(body),
                        keep,
                    )
                )
                if not keep:
                    return [*out, CLOSE]
                conn.start_next_cycle()
            else:  # pragma: no cover - PAUSED cannot happen: every request is answered
                raise AssertionError(event)
    return [*out, END]


# -- generating request streams ----------------------------------------------------

PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%/?"
NAME_CHARS = string.ascii_letters + string.digits + "-_"
VALUE_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
#: control characters h11 lets through in field values (it refuses NUL, CR, LF, VT, FF)
CTLS = bytes([*range(0x01, 0x09), *range(0x0E, 0x20), 0x7F])


@st.composite
def field_value(draw: st.DrawFn) -> bytes:
    words = draw(st.lists(st.binary(min_size=1, max_size=8).map(_visible), max_size=3))
    gaps = [draw(st.sampled_from([b" ", b"\t", b"  "])) for _ in words]
    inner = b"".join(g + w for g, w in zip(gaps, words, strict=True)).lstrip(b" \t")
    edge = st.sampled_from([b"", b"", b" ", b"\t"])
    return draw(edge) + inner + draw(edge)


def _visible(raw: bytes) -> bytes:
    return bytes(VALUE_BYTES[b % len(VALUE_BYTES)] for b in raw)


class Message:
    """One generated message: its lines (without line ends), its body bytes as they
    go on the wire, and the deviations from h11 it carries."""

    def __init__(self, start: bytes) -> None:
        self.lines: list[bytes] = [start]
        self.body = b""
        self.tags: set[str] = set()
        self.line_ends: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"Message({self.render()!r}, tags={sorted(self.tags)})"

    def render(self) -> bytes:
        out = []
        for i, line in enumerate([*self.lines, b""]):
            out.append(line + self.line_ends.get(i, b"\r\n"))
        return b"".join(out) + self.body


@st.composite
def chunked_body(draw: st.DrawFn, message: Message) -> bytes:
    parts = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3)):
        size = b"%x" % len(data)
        style = draw(st.sampled_from(["plain", "upper", "zeros", "ext", "ows", "ext-ctl"]))
        if style == "upper":
            size = size.upper()
        elif style == "zeros":
            size = b"0" * draw(st.integers(1, 18 - len(size))) + size
        elif style == "ext":
            size += draw(st.sampled_from([b";a=b", b";", b';n="q v"', b";x\t"]))
        elif style == "ows":
            size += draw(st.sampled_from([b" ", b"\t", b"  "]))
        elif style == "ext-ctl":
            size += b";a" + bytes([draw(st.sampled_from([*CTLS, 0, 13]))]) + b"b"
            message.tags.add("chunk-ext")
        parts.append(size + b"\r\n" + data + b"\r\n")
    last = draw(st.sampled_from([b"0", b"000", b"0;end=1"]))
    parts.append(last + b"\r\n")
    for _ in range(draw(st.integers(0, 2))):
        trailer = b"X-Sum: " + draw(field_value()).strip(b" \t")
        if draw(st.integers(0, 5)) == 0:
            trailer += bytes([draw(st.sampled_from(CTLS))])
            message.tags.add("trailer-ctl")
        parts.append(trailer + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


@st.composite
def request_message(draw: st.DrawFn) -> Message:
    tags: set[str] = set()
    method = draw(
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"])
    )
    if draw(st.integers(0, 15)) == 0:
        method = draw(st.sampled_from([b"get", b"FOO", b"X-CUSTOM"]))
        tags.add("method")
    target = draw(
        st.one_of(
            st.text(PATH_CHARS, max_size=20).map(lambda p: ("/" + p).encode()),
            st.text(PATH_CHARS, max_size=10).map(lambda p: f"http://app.example.com/{p}".encode()),
            st.just(b"*"),
        )
    )
    if draw(st.integers(0, 20)) == 0:
        target = draw(st.sampled_from([b"a:443", b"?x=1", b"x"]))
        tags.add("target")
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    if draw(st.integers(0, 25)) == 0:
        version = draw(st.sampled_from([b"2.0", b"0.9"]))
        tags.add("version")
    message = Message(b"%s %s HTTP/%s" % (method, target, version))
    hosts = draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2]))
    fields: list[tuple[bytes, bytes]] = [(b"Host", b"app.example.com")] * hosts
    for _ in range(draw(st.integers(0, 4))):
        name = b"X-" + draw(st.text(NAME_CHARS, min_size=1, max_size=8)).encode()
        fields.append((name, draw(field_value())))
    if draw(st.integers(0, 6)) == 0:
        fields.append(
            (b"Connection", draw(st.sampled_from([b"close", b"keep-alive", b"x, Close"])))
        )

    body = b""
    framing = draw(st.sampled_from(["none", "none", "length", "chunked"]))
    if framing == "length":
        body = draw(st.binary(max_size=30))
        length = str(len(body)).encode()
        variant = draw(st.integers(0, 12))
        if variant == 0:
            fields.append((b"Content-Length", length))
            fields.append((b"Content-Length", length))
            tags.add("dup-cl")
        elif variant == 1:
            fields.append((b"Content-Length", length + b", " + length))
            tags.add("dup-cl")
        elif variant == 2:  # refused by both
            fields.append((b"Content-Length", draw(st.sampled_from([b"+1", b"-1", b"1a", b""]))))
        elif variant == 3:
            fields.append((b"Content-Length", b"0" * (20 - len(length)) + length))
        elif variant == 4:
            fields.append((b"Content-Length", b"99999999999999999999"))
            tags.add("cl-digits")
        else:
            fields.append((b"Content-Length", length))
    elif framing == "chunked":
        te = draw(
            st.sampled_from(
                [b"chunked", b"chunked", b"Chunked", b"CHUNKED", b"gzip", b"gzip, chunked"]
            )
        )
        fields.append((b"Transfer-Encoding", te))
        if draw(st.integers(0, 10)) == 0:
            fields.append((b"Transfer-Encoding", b"chunked"))  # twice: refused by both
        if draw(st.integers(0, 10)) == 0:
            fields.append((b"Content-Length", b"5"))  # smuggling shape: refused by both
        body = draw(chunked_body(message))
    order = draw(st.permutations(range(len(fields))))
    message.lines += [n + b": " + v for n, v in (fields[i] for i in order)]
    message.body = body

    # mutations of the head
    if len(message.lines) > 1 and draw(st.integers(0, 8)) == 0:
        at = draw(st.integers(1, len(message.lines) - 1))
        message.lines.insert(at + 1, draw(st.sampled_from([b" folded", b"\tmore"])))
        tags.add("obs-fold")
    if len(message.lines) > 1 and draw(st.integers(0, 8)) == 0:
        at = draw(st.integers(1, len(message.lines) - 1))
        message.lines[at] += bytes([draw(st.sampled_from(CTLS))]) + b"x"
        tags.add("ctl")
    if draw(st.integers(0, 10)) == 0:
        message.line_ends[draw(st.integers(0, len(message.lines)))] = b"\n"
        tags.add("bare-lf")
    if draw(st.integers(0, 12)) == 0:  # refused by both
        at = draw(st.integers(0, len(message.lines) - 1))
        message.lines[at] = message.lines[at].replace(b":", b" :", 1).replace(b" ", b"  ", 1)
    message.tags |= tags
    return message


@st.composite
def request_stream(draw: st.DrawFn) -> tuple[bytes, list[Message]]:
    messages = draw(st.lists(request_message(), min_size=1, max_size=3))
    data = b"".join(m.render() for m in messages)
    tail = draw(st.sampled_from([b"", b"", b"GET / HT", b"\x00junk", b"GET / HTTP/1.1\r\nHo"]))
    return data + tail, messages


def check_against_h11(ours: Verdict, theirs: Verdict, messages: list[Message]) -> None:
    """Equal verdicts, except that a message with a deviation tag must make us refuse
    the stream (having judged everything before alike), unless an earlier message
    closed the connection before it."""
    deviating = next((i for i, m in enumerate(messages) if m.tags), None)
    if deviating is None:
        assert ours == theirs
        return
    if ours[-1] == REJECT:
        assert ours[:-1] == theirs[: len(ours) - 1]
        return
    assert ours[-1] == CLOSE and len(ours) - 1 <= deviating, messages[deviating].tags
    assert ours == theirs


@FUZZ
@given(request_stream())
@example((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", []))
def test_requests_judged_like_h11(stream: tuple[bytes, list[Message]]) -> None:
    data, messages = stream
    note(repr(stream))
    ours = ours_requests(whole(data))
    assert ours_requests(bytewise(data)) == ours
    theirs = h11_requests(whole(data))
    assert h11_requests(bytewise(data)) == theirs
    check_against_h11(ours, theirs, messages)


MUTATION_BYTES = bytes(b for b in range(256) if b not in (10, 13))


@FUZZ
@given(request_stream(), st.data())
def test_mutated_requests_never_accepted_where_h11_refuses(
    stream: tuple[bytes, list[Message]], data: st.DataObject
) -> None:
    """Random byte edits (no CR or LF, so no empty lines before a message): whatever we
    accept, h11 accepts identically; we may only refuse more."""
    raw = bytearray(stream[0])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        edit = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = data.draw(st.sampled_from(MUTATION_BYTES))
        if edit == "insert" or at == len(raw):
            raw.insert(at, byte)
        elif edit == "replace":
            raw[at] = byte
        else:
            del raw[at]
    mutated = bytes(raw)
    note(repr(mutated))
    ours = ours_requests(whole(mutated))
    assert ours_requests(bytewise(mutated)) == ours
    theirs = h11_requests(whole(mutated))
    accepted = [m for m in ours if isinstance(m, tuple)]
    assert theirs[: len(accepted)] == accepted
    if ours[-1] != REJECT:
        assert theirs[: len(ours)] == ours


def test_empty_lines_before_a_request_are_skipped_where_h11_refuses() -> None:
    data = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    expected = [
        (b"GET", b"/", b"1.1", [(b"host", b"a")], b"", True),
        (b"GET", b"/2", b"1.1", [(b"host", b"a")], b"", True),
        END,
    ]
    assert ours_requests(whole(data)) == ours_requests(bytewise(data)) == expected
    assert h11_requests(whole(data)) == [REJECT]


@settings(max_examples=50, deadline=None)
@given(st.integers(5000, 20000), st.sampled_from([b"X-Big: ", b"GET /"]))
def test_huge_heads_like_h11(size: int, where: bytes) -> None:
    """Past the limit while incomplete: refused by both, when it arrives in pieces; a
    complete head in one read is measured by the gateway's admission (431)."""
    if where == b"GET /":
        data = b"GET /" + b"p" * size + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    else:
        data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    assert ours_requests(bytewise(data), 4096) == h11_requests(bytewise(data), 4096) == [REJECT]
    assert ours_requests(whole(data), 4096) == [REJECT]  # admission, see ours_requests
    assert h11_requests(whole(data), 4096)[0][0] == b"GET"  # h11 bounds only incomplete


# -- the response direction --------------------------------------------------------


def ours_response(method: bytes, upgrade: bool, chunks: list[bytes]) -> Verdict:
    reader = h1.ResponseReader(MAX)
    reader.start(method, upgrade=upgrade)
    out: Verdict = []
    body: list[bytes] = []
    try:
        for chunk in [*chunks, None]:
            if chunk is None:
                reader.eof()
            else:
                reader.receive(chunk)
            while True:
                if reader.state == h1.HEAD:
                    head = reader.next_head()
                    if head is None:
                        break
                    out.append(("head", head.status, head.reason, _norm(head.headers)))
                    if reader.state == h1.SWITCHED:
                        return [*out, SWITCHED]
                    continue
                if reader.state == h1.BODY:
                    body.append(reader.body())
                    if reader.state == h1.BODY:
                        break
                out.append(("body", b"".join(body), reader.keep_alive))
                return [*out, END]
    except h1.ProtocolError:
        return [*out, REJECT]
    return [*out, END]


def h11_response(method: bytes, upgrade: bool, chunks: list[bytes]) -> Verdict:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX)
    headers = [(b"host", b"a")]
    if upgrade:
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    conn.send(h11.Request(method=method, target=b"/", headers=headers))
    conn.send(h11.EndOfMessage())
    out: Verdict = []
    body: list[bytes] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return [*out, REJECT]
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.InformationalResponse | h11.Response):
                out.append(
                    ("head", event.status_code, bytes(event.reason), _norm(list(event.headers)))
                )
                if event.status_code == 101:
                    return [*out, SWITCHED]
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                # a body that ended with the connection leaves nothing to reuse
                reusable = conn.their_state is h11.DONE and chunk != b""
                out.append(("body", b"".join(body), reusable))
                return [*out, END]
            else:
                return [*out, END]  # ConnectionClosed before any response
    return [*out, END]


STATUS_LINES = [b"200 OK", b"201 Created", b"404 Not Found", b"500", b"299 Odd Reason", b"999 X"]


@st.composite
def response_message(draw: st.DrawFn, informational: bool) -> Message:
    tags: set[str] = set()
    version = b"1.1" if draw(st.integers(0, 4)) else b"1.0"
    if draw(st.integers(0, 25)) == 0:
        version = draw(st.sampled_from([b"2.0", b"0.9"]))
        tags.add("version")
    if informational:
        status_line = draw(st.sampled_from([b"100 Continue", b"103 Early Hints", b"102"]))
    else:
        status_line = draw(st.sampled_from([*STATUS_LINES, b"204 No Content", b"304 NM"]))
    message = Message(b"HTTP/%s %s" % (version, status_line))
    fields: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 4))):
        name = b"X-" + draw(st.text(NAME_CHARS, min_size=1, max_size=8)).encode()
        fields.append((name, draw(field_value())))
    if draw(st.integers(0, 6)) == 0:
        fields.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    framing = "none" if informational else draw(st.sampled_from(["length", "chunked", "close"]))
    body = b""
    if framing == "length":
        body = draw(st.binary(max_size=30))
        length = str(len(body)).encode()
        variant = draw(st.integers(0, 12))
        if variant == 0:
            fields += [(b"Content-Length", length)] * 2
            tags.add("dup-cl")
        elif variant == 1:
            fields.append((b"Content-Length", draw(st.sampled_from([b"+1", b"x", b""]))))
        else:
            fields.append((b"Content-Length", length))
    elif framing == "chunked":
        te = draw(st.sampled_from([b"chunked", b"chunked", b"Chunked", b"gzip", b"gzip, chunked"]))
        fields.append((b"Transfer-Encoding", te))
        if draw(st.integers(0, 6)) == 0:
            fields.append((b"Content-Length", b"3"))  # chunked wins, for both
        body = draw(chunked_body(message))
    elif framing == "close":
        body = draw(st.binary(max_size=30))
    order = draw(st.permutations(range(len(fields))))
    message.lines += [n + b": " + v for n, v in (fields[i] for i in order)]
    message.body = body
    if len(message.lines) > 1 and draw(st.integers(0, 8)) == 0:
        at = draw(st.integers(1, len(message.lines) - 1))
        message.lines.insert(at + 1, b" folded")
        tags.add("obs-fold")
    if len(message.lines) > 1 and draw(st.integers(0, 8)) == 0:
        at = draw(st.integers(1, len(message.lines) - 1))
        message.lines[at] += bytes([draw(st.sampled_from(CTLS))])
        tags.add("ctl")
    if draw(st.integers(0, 10)) == 0:
        message.line_ends[draw(st.integers(0, len(message.lines)))] = b"\n"
        tags.add("bare-lf")
    message.tags |= tags
    return message


BODY_TAGS = {"chunk-ext", "trailer-ctl"}


@st.composite
def response_stream(draw: st.DrawFn) -> tuple[bytes, bool, bytes, list[Message]]:
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST"]))
    upgrade = draw(st.booleans()) and method == b"GET"
    messages = draw(st.lists(response_message(True), max_size=2))
    if upgrade and draw(st.booleans()):
        final = Message(b"HTTP/1.1 101 Switching Protocols")
        final.lines += [b"Connection: upgrade", b"Upgrade: websocket"]
        final.body = draw(st.binary(max_size=10))
    else:
        final = draw(response_message(False))
    status = final.lines[0].split(b" ")[1]
    if method == b"HEAD" or status in (b"204", b"304"):
        final.tags -= BODY_TAGS  # a body that is not there is not read
    messages.append(final)
    cut = draw(st.sampled_from([None, None, None, 1, 5]))
    data = b"".join(m.render() for m in messages)
    if cut is not None:
        data = data[:-cut]
    return method, upgrade, data, messages


@FUZZ
@given(response_stream())
def test_responses_judged_like_h11(stream: tuple[bytes, bool, bytes, list[Message]]) -> None:
    method, upgrade, data, messages = stream
    note(repr(stream))
    ours = ours_response(method, upgrade, whole(data))
    assert ours_response(method, upgrade, bytewise(data)) == ours
    theirs = h11_response(method, upgrade, whole(data))
    assert h11_response(method, upgrade, bytewise(data)) == theirs
    check_against_h11(ours, theirs, messages)


@FUZZ
@given(response_stream(), st.data())
def test_mutated_responses_never_accepted_where_h11_refuses(
    stream: tuple[bytes, bool, bytes, list[Message]], data: st.DataObject
) -> None:
    method, upgrade, raw_bytes, _ = stream
    raw = bytearray(raw_bytes)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        byte = data.draw(st.sampled_from(MUTATION_BYTES))
        if at == len(raw) or data.draw(st.booleans()):
            raw.insert(at, byte)
        else:
            raw[at] = byte
    mutated = bytes(raw)
    note(repr((method, upgrade, mutated)))
    ours = ours_response(method, upgrade, whole(mutated))
    assert ours_response(method, upgrade, bytewise(mutated)) == ours
    theirs = h11_response(method, upgrade, whole(mutated))
    accepted = [m for m in ours if isinstance(m, tuple)]
    assert theirs[: len(accepted)] == accepted
    if ours[-1] != REJECT:
        assert theirs == ours


def test_empty_lines_before_a_status_line_are_skipped_where_h11_refuses() -> None:
    data = b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    expected = [("head", 200, b"OK", [(b"content-length", b"2")]), ("body", b"ok", True), END]
    for feed in (whole, bytewise):
        assert ours_response(b"GET", False, feed(data)) == expected
    assert h11_response(b"GET", False, whole(data)) == [REJECT]


# -- what we write, read back by h11 ------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.text(NAME_CHARS, min_size=1, max_size=8), field_value()), max_size=5),
    st.lists(st.binary(max_size=40), max_size=4),
    st.booleans(),
)
def test_what_we_write_h11_reads_back(
    fields: list[tuple[str, bytes]], pieces: list[bytes], chunked: bool
) -> None:
    """Request heads and re-chunked bodies towards the agent, and re-framed responses
    towards the client, as h11 reads them."""
    headers = [(b"host", b"app.example.com")]
    headers += [(b"x-" + name.lower().encode(), value.strip(b" \t")) for name, value in fields]
    body = b"".join(pieces)
    framing = [(b"transfer-encoding", b"chunked")] if chunked else []
    if not chunked:
        framing = [(b"content-length", str(len(body)).encode())]
    wire = h1.request_head(b"POST", b"/up?x=1", headers + framing)
    wire += b"".join(map(h1.encode_chunk, pieces)) + h1.LAST_CHUNK if chunked else body
    assert h11_requests(whole(wire)) == [
        (b"POST", b"/up?x=1", b"1.1", headers + framing, body, True),
        END,
    ]

    head, framed, keep = h1.frame_response(
        200,
        b"OK",
        headers[1:],
        content_length=False,
        head_request=False,
        http10=False,
        keep_alive=True,
    )
    assert framed == h1.CHUNKED and keep
    wire = head + b"".join(map(h1.encode_chunk, pieces)) + h1.LAST_CHUNK
    seen = h11_response(b"GET", False, whole(wire))
    assert seen == [
        ("head", 200, b"OK", [*headers[1:], (b"transfer-encoding", b"chunked")]),
        ("body", body, True),
        END,
    ]
