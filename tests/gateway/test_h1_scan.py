"""The Cython head scanner (``gateway/proxy/h1/_scan.pyx``) judged against llhttp.

The scanner only ever *accepts*: a head it does not take goes to llhttp unchanged.  So
the contract is exact agreement: whatever bytes arrive, a reader that tries the
scanner first and one that leaves every head to llhttp (``_scan = False``) must yield
the same heads (every field), the same bodies, the same refusal (status and reason)
and the same state after it.  Hypothesis builds request and response heads near the
subset the scanner takes (its methods, origin-form targets, HTTP/1.0 and 1.1, plain
field lines) and far from it (other methods and versions, control characters,
obs-text, obs-fold, bare CR or LF, spaces around the colon, doubled framing fields),
then mutates bytes.  A second set of tests pins that ordinary heads really are taken
by the scanner, so this file fails if it ever silently declined everything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.proxy import h1
from gateway.proxy.h1._scan import scan_request, scan_response
from gateway.proxy.headers import (
    get_header,
    is_upgrade_request,
    request_headers_for_agent,
    response_headers_for_client,
    verbatim_request_head,
)

MAX = 8 * 1024
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class LlhttpRequestReader(h1.RequestReader):
    __slots__ = ()
    _scan = False


class LlhttpResponseReader(h1.ResponseReader):
    __slots__ = ()
    _scan = False


def _events(reader: Any, *, response: tuple[bytes, bool] | None = None) -> list[Any]:
    """Everything a reader makes of its buffer: heads, bodies, a refusal, its state."""
    out: list[Any] = []
    try:
        for _ in range(4):
            if response is not None:
                reader.start(response[0], upgrade=response[1])
            head = reader.next_head()
            if head is None:
                break
            # (raw is the scanner's alone: checked against the rewrite by test_raw_*)
            out.append(("head", repr(dataclasses.replace(head, raw=None))))
            while reader.state == h1.BODY:
                body = reader.body()
                if not body:
                    break
                out.append(("body", body))
            if reader.state != h1.DONE:
                break
    except h1.ProtocolError as exc:
        out.append(("refused", exc.status, exc.reason))
    except RuntimeError as exc:
        out.append(("runtime", str(exc)))
    out.append(("state", reader.state, reader.framing, reader.buffered))
    return out


def judge_request(data: bytes) -> None:
    scanned, plain = h1.RequestReader(MAX), LlhttpRequestReader(MAX)
    scanned.receive(data)
    plain.receive(data)
    assert _events(scanned) == _events(plain)


def judge_response(data: bytes, method: bytes, upgrade: bool) -> None:
    scanned, plain = h1.ResponseReader(MAX), LlhttpResponseReader(MAX)
    scanned.receive(data)
    plain.receive(data)
    assert _events(scanned, response=(method, upgrade)) == _events(
        plain, response=(method, upgrade)
    )


# -- strategies

_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NAMES = [
    b"Host",
    b"host",
    b"HOST",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"Connection",
    b"Upgrade",
    b"User-Agent",
    b"Accept",
    b"X-Forwarded-For",
    b"Expect",
    b"Cookie",
    b"Date",
    b"Server",
    b"Content-Type",
    b"Keep-Alive",
    b"TE",
    b"Trailer",
    b"Proxy-Connection",
    b"Proxy-Authorization",
    b"X-Real-IP",
    b"X-Forwarded-Host",
    b"x-forwarded-proto",
]
_SPECIAL = [b"\r", b"\n", b"\t", b" ", b"\x00", b"\x7f", b"\x80", b"\xff", b"#", b":", b'"', b","]
_VALUE_BYTES = st.sampled_from(
    [bytes([c]) for c in range(0x21, 0x7F)] + [b" ", b"\t", b" ", b"a", b"0", b"5"] + _SPECIAL
)


@st.composite
def field_value(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked", b"identity"]))
    if kind == 1:
        return draw(
            st.sampled_from(
                [b"close", b"keep-alive", b"Keep-Alive", b"Upgrade", b"close, upgrade", b"te"]
            )
        )
    if kind == 2:
        return str(draw(st.integers(0, 10**21))).encode()
    if kind == 3:
        return draw(st.sampled_from([b"0", b"00012", b" 5", b"5 ", b"+5", b"-1", b"5, 5", b""]))
    return b"".join(draw(st.lists(_VALUE_BYTES, max_size=24)))


@st.composite
def field_lines(draw: st.DrawFn, host: bool) -> bytes:
    fields: list[tuple[bytes, bytes]] = []
    if host:
        fields.append((b"Host", draw(st.sampled_from([b"app.example.com", b"a:8080", b""]))))
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(_NAMES))
        else:
            name = draw(st.text(_TOKEN + " \t\x01é", min_size=0, max_size=12)).encode()
        fields.append((name, draw(field_value())))
    fields = draw(st.permutations(fields))
    lines = []
    for name, value in fields:
        sep = draw(st.sampled_from([b": ", b":", b":\t", b" : ", b":  ", b": \t"]))
        end = draw(st.sampled_from([b"", b"", b"", b" ", b"\t", b"  "]))
        lines.append(name + sep + value + end + b"\r\n")
    if draw(st.integers(0, 15)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), b" folded\r\n")
    return b"".join(lines)


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.integers(0, 2))
        byte = draw(st.sampled_from([*_SPECIAL, b"A", b"/", b"1"]))
        if how == 0:
            data = data[:at] + byte + data[at + 1 :]
        elif how == 1:
            data = data[:at] + byte + data[at:]
        else:
            data = data[:at] + data[at + 1 :]
    return data


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from(
            [
                b"GET",
                b"GET",
                b"HEAD",
                b"POST",
                b"PUT",
                b"DELETE",
                b"OPTIONS",
                b"PATCH",
                b"TRACE",
                b"CONNECT",
                b"get",
                b"PRI",
                b"FOO",
                b"GETX",
                b"",
            ]
        )
    )
    target = draw(
        st.one_of(
            st.just(b"/"),
            st.text("abcAZ09-._~!$&'()*+,;=:@/%?#\"<>\\^`{|}[] é\x01", min_size=0, max_size=20).map(
                lambda t: b"/" + t.encode()
            ),
            st.sampled_from([b"*", b"http://a/b", b"a:443", b"?x", b"x", b"//x"]),
        )
    )
    version = draw(
        st.sampled_from(
            [b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.10"]
        )
    )
    sp1 = draw(st.sampled_from([b" "] * 6 + [b"  ", b"\t"]))
    line = method + sp1 + target + b" " + version + b"\r\n"
    data = line + draw(field_lines(host=draw(st.integers(0, 5)) > 0)) + b"\r\n"
    if draw(st.booleans()):
        data = _mutate(draw, data)
    # a body or the next request may follow
    tail = draw(st.sampled_from([b"", b"", b"hello", b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"]))
    lead = draw(st.sampled_from([b""] * 6 + [b"\r\n", b"\n\r\n"]))
    return lead + data + tail


@st.composite
def response_bytes(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"]))
    status = draw(
        st.sampled_from(
            [
                b"200",
                b"200",
                b"204",
                b"304",
                b"101",
                b"100",
                b"103",
                b"404",
                b"502",
                b"099",
                b"600",
                b"20",
                b"2000",
                b"abc",
            ]
        )
    )
    reason = draw(
        st.sampled_from([b" OK", b" Not Found", b" ", b"", b" \tx", b" caf\xc3\xa9", b" a\x01b"])
    )
    line = version + b" " + status + reason + b"\r\n"
    data = line + draw(field_lines(host=False)) + b"\r\n"
    if draw(st.booleans()):
        data = _mutate(draw, data)
    tail = draw(st.sampled_from([b"", b"hello, world\n", b"5\r\nhello\r\n0\r\n\r\n"]))
    return data + tail


# -- agreement


@FUZZ
@given(request_bytes())
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX: 1\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
@example(b"GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX: \t \r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n")
def test_requests_scanned_like_llhttp(data: bytes) -> None:
    judge_request(data)


@FUZZ
@given(response_bytes(), st.sampled_from([b"GET", b"HEAD"]), st.booleans())
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world\n", b"GET", False)
@example(b"HTTP/1.1 204 \r\nContent-Length: 0\r\n\r\n", b"GET", False)
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"GET", False)
def test_responses_scanned_like_llhttp(data: bytes, method: bytes, upgrade: bool) -> None:
    judge_response(data, method, upgrade)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40))
def test_heads_split_anywhere_like_llhttp(cut: int) -> None:
    """A head arriving in two reads: the first read is llhttp's, the rest carries on."""
    data = b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
    scanned, plain = h1.RequestReader(MAX), LlhttpRequestReader(MAX)
    for reader in (scanned, plain):
        reader.receive(data[:cut])
        assert reader.next_head() is None or cut >= len(data)
        reader.receive(data[cut:])
    assert _events(scanned) == _events(plain)


def test_too_large_heads_are_llhttps() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX + b"\r\n\r\n"
    assert scan_request(head, MAX) is None
    judge_request(head)


# -- the scanner takes what ordinary clients and servers send


def test_ordinary_requests_are_scanned() -> None:
    heads = [
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n",  # wrk
        b"GET /index.html?q=a%20b&x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/7.88.1\r\n"
        b"Accept: */*\r\n\r\n",
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        b"HEAD / HTTP/1.0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ]
    for data in heads:
        scanned = scan_request(data, MAX)
        assert scanned is not None, data
        judge_request(data)
    stop, method, target, version, headers, hosts, length, te, connection, raw = (
        scan_request(heads[2], MAX) or (0,) * 10
    )
    assert raw == heads[2][: stop - 2]  # relayed as it came (test_raw_*)
    assert (stop, method, target, version, hosts, length) == (
        len(heads[2]) - 2,
        b"POST",
        b"/api",
        b"1.1",
        1,
        b"2",
    )
    assert headers == [
        (b"host", b"a"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
    ]
    assert te == [] and connection == []


def test_ordinary_responses_are_scanned() -> None:
    heads = [
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 12:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ]
    for data in heads:
        assert scan_response(data, MAX) is not None, data
        judge_response(data, b"GET", True)
    scanned = scan_response(heads[0], MAX)
    assert scanned is not None
    assert scanned[1:4] == (200, b"OK", b"1.1")
    assert scanned[5] == b"13" and scanned[7] == [b"keep-alive"]


def test_unusual_heads_are_left_to_llhttp() -> None:
    for data in [
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",  # absolute-form
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n",  # obs-text
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # incomplete
    ]:
        assert scan_request(data, MAX) is None, data
        judge_request(data)


# -- heads relayed as they came (``raw``)

PEER = "192.0.2.7"


def _without_keep_alive(headers: h1.Headers) -> h1.Headers:
    """A lone ``Connection: keep-alive`` goes as it came (the gateway's own option on a
    kept connection, RFC 9110 §7.6.1) where the rewrite drops it: the one difference."""
    return [(k, v) for k, v in headers if not (k == b"connection" and v.lower() == b"keep-alive")]


def _one_request(data: bytes) -> h1.RequestHead:
    reader = LlhttpRequestReader(MAX)
    reader.receive(data)
    head = reader.next_head()
    assert head is not None and reader.buffered == 0, data
    return head


@FUZZ
@given(request_bytes())
@example(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX-Real-IP: 10.0.0.1\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: 5\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x\r\nX: 1\r\n\r\n")
def test_raw_request_heads_say_what_the_rewrite_says(data: bytes) -> None:
    """Whenever the scanner offers a request head as it came, that head plus the
    forwarding fields is, to the agent's parser, the head the rewrite would send."""
    reader = h1.RequestReader(MAX)
    reader.receive(data)
    try:
        head = reader.next_head()
    except h1.ProtocolError:
        return
    if head is None or head.raw is None:
        return
    assert head.version == b"1.1" and not head.chunked and not is_upgrade_request(head.headers)
    host = get_header(head.headers, b"host")
    assert host is not None and head.headers[0][0] == b"host"
    for proto in ("http", "https"):
        verbatim = _one_request(verbatim_request_head(head.raw, PEER, host, proto))
        forwarded = request_headers_for_agent(
            head.headers, client_ip=PEER, proto=proto, chunked=False, upgrade=False
        )
        rewritten = _one_request(h1.request_head(head.method, head.target, forwarded))
        assert _without_keep_alive(verbatim.headers) == rewritten.headers
        assert dataclasses.replace(verbatim, headers=[], size=0) == dataclasses.replace(
            rewritten, headers=[], size=0
        )


@FUZZ
@given(response_bytes())
@example(
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 13\r\n"
    b"Connection: keep-alive\r\n\r\nhello, world\n"
)
@example(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\n\r\n")
def test_raw_response_heads_say_what_the_rewrite_says(data: bytes) -> None:
    """A response head relayed as it came reads, to the client's parser, like the
    head ``frame_response`` writes for a kept HTTP/1.1 connection, with the same
    framing; heads without a framing of their own are never relayed as they came."""
    reader = h1.ResponseReader(MAX)
    reader.start(b"GET")
    reader.receive(data)
    try:
        head = reader.next_head()
    except h1.ProtocolError:
        return
    if head is None:
        return
    framing = h1.verbatim_framing(head)
    if head.raw is None or framing is None:
        assert framing is None
        return
    assert head.version == b"1.1" and head.status >= 200
    headers = response_headers_for_client(head.headers)
    if head.chunked:
        headers = [(k, v) for k, v in headers if k != b"content-length"]
    written, expected, keep_alive = h1.frame_response(
        head.status,
        head.reason,
        headers,
        content_length=head.content_length is not None,
        head_request=False,
        http10=False,
        keep_alive=True,
    )
    assert (framing, keep_alive) == (expected, True)
    heads = []
    for wire in (head.raw, written):
        client = LlhttpResponseReader(MAX)
        client.start(b"HEAD")  # heads only: no body follows here
        client.receive(wire)
        parsed = client.next_head()
        assert parsed is not None and client.buffered == 0
        heads.append(parsed)
    verbatim, rewritten = heads
    assert _without_keep_alive(verbatim.headers) == rewritten.headers
    assert dataclasses.replace(verbatim, headers=[]) == dataclasses.replace(rewritten, headers=[])


def test_which_heads_go_as_they_came() -> None:
    browser = (
        b"GET /app?q=1 HTTP/1.1\r\nHost: app.example.com\r\nUser-Agent: Mozilla/5.0\r\n"
        b"Accept: text/html\r\nConnection: keep-alive\r\nCookie: a=b\r\n\r\n"
    )
    assert (scan_request(browser, MAX) or ())[-1] == browser[:-2]
    for data in [
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: a\r\n\r\n",  # Host not first
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x\r\nX: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic eA==\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nx-real-ip: 10.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: b\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ]:
        scanned = scan_request(data, MAX)
        assert scanned is not None and scanned[-1] is None, data
    nginx = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    )
    assert (scan_response(nginx, MAX) or ())[-1] == nginx
    for data in [
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nKeep-Alive: timeout=5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ]:
        scanned = scan_response(data, MAX)
        assert scanned is not None and scanned[-1] is None, data
