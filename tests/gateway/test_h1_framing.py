"""The gateway's HTTP/1.1 layer (``gateway/proxy/h1/``) on its own: body framing,
response framing towards the client, keep-alive and upgrade rules, limits, and the
statuses of refusals.  The comparison with h11 is ``test_h1_differential.py``."""

from __future__ import annotations

import pytest

from gateway.proxy import h1

HEAD = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def read_all(reader: h1.RequestReader | h1.ResponseReader, pieces: list[bytes]) -> bytes:
    body = []
    for piece in pieces:
        reader.receive(piece)
        body.append(reader.body())
    return b"".join(body)


def request(data: bytes, max_head: int = 4096) -> tuple[h1.RequestReader, h1.RequestHead]:
    reader = h1.RequestReader(max_head)
    reader.receive(data)
    head = reader.next_head()
    assert head is not None
    return reader, head


def refusal(data: bytes, max_head: int = 4096) -> int:
    reader = h1.RequestReader(max_head)
    reader.receive(data)
    with pytest.raises(h1.ProtocolError) as info:
        reader.next_head()
    return info.value.status


# -- request bodies ------------------------------------------------------------------


CHUNKED = b"5\r\nhello\r\n1A;name=value\r\n" + b"x" * 26 + b"\r\n000\r\nX-Trailer: t\r\n\r\n"


@pytest.mark.parametrize("split", range(len(CHUNKED) + 1))
def test_chunked_body_split_anywhere(split: int) -> None:
    reader, head = request(HEAD)
    assert head.chunked and reader.state == h1.BODY
    body = read_all(reader, [CHUNKED[:split], CHUNKED[split:] + b"GET / HTTP/1.1\r\n"])
    assert body == b"hello" + b"x" * 26
    assert reader.state == h1.DONE
    reader.receive(b"Host: b\r\n\r\n")
    after = reader.next_head()  # the pipelined request after the body
    assert after is not None and after.target == b"/"


@pytest.mark.parametrize(
    "bad",
    [
        b"5\r\nhelloXX",  # no CRLF after the data
        b"Z\r\n",  # not a size
        b"5 ;x\r\nhello\r\n",  # whitespace before the extension
        b"5\nhello\r\n",  # bare LF ends no line: refused at once
        b"1" * 21 + b"\r\n",  # more than 20 digits
        b"5;a\x00b\r\nhello\r\n",  # a control character in an extension
        b"0\r\nX: a\x01\r\n\r\n",  # ... in a trailer
        b"0\r\n folded\r\n\r\n",  # obs-fold in the trailer section
        b"0\r\n\n",  # bare LF as the last line
    ],
)
def test_broken_chunked_framing_is_refused(bad: bytes) -> None:
    reader, _ = request(HEAD)
    reader.receive(bad)
    with pytest.raises(h1.ProtocolError):
        reader.body()


def test_chunk_line_and_trailer_section_are_bounded() -> None:
    reader, _ = request(HEAD, max_head=1024)
    reader.receive(b"5;" + b"e" * 2000)
    with pytest.raises(h1.ProtocolError):
        reader.body()
    reader, _ = request(HEAD, max_head=1024)
    reader.receive(b"0\r\n" + b"X-T: v\r\n" * 200)
    with pytest.raises(h1.ProtocolError):
        reader.body()


def test_content_length_body_passes_the_read_bytes_on_without_copying() -> None:
    reader, head = request(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert head.content_length == 10 and reader.state == h1.BODY
    assert reader.body() == b"abc"
    piece = b"defg"
    reader.receive(piece)
    assert reader.body() is piece
    reader.receive(b"hijGET")  # the rest of the body and the next request
    assert reader.body() == b"hij"
    assert reader.state == h1.DONE and reader.buffered == 3


def test_eof_mid_body_or_mid_head_is_a_protocol_error_but_not_between_requests() -> None:
    reader, _ = request(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    reader.body()
    with pytest.raises(h1.ProtocolError):
        reader.eof()
    reader = h1.RequestReader(4096)
    reader.receive(b"GET / HT")
    assert reader.next_head() is None
    with pytest.raises(h1.ProtocolError):
        reader.eof()
    reader, _ = request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    reader.eof()  # a request read whole, then the client half-closes: fine
    assert reader.next_head() is None


def test_pipelined_bodiless_requests_share_one_parser() -> None:
    reader = h1.RequestReader(4096)
    reader.receive(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n" * 3)
    parsers = set()
    for _ in range(3):
        assert reader.next_head() is not None
        parsers.add(id(reader._parser))
    assert len(parsers) == 1


# -- request heads ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 501),  # a token llhttp does not know
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 501),  # methods are case-sensitive
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00", 400),  # a TLS ClientHello on the plain port
        (b"G(T / HTTP/1.1\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # two spaces
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\n\r\n", 400),  # read as 1.1: needs a Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n" * 1, None),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 00000000000000000000001\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),  # bare CR
        (b"GET a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # authority-form, not CONNECT
    ],
)
def test_refusal_statuses(data: bytes, status: int | None) -> None:
    if status is None:  # incomplete: no verdict yet
        reader = h1.RequestReader(4096)
        reader.receive(data)
        assert reader.next_head() is None
        return
    assert refusal(data) == status


def test_unknown_method_waits_for_the_request_line_byte_by_byte() -> None:
    reader = h1.RequestReader(4096)
    data = b"FOO / HTTP/1.1\r\n"
    for i in range(len(data) - 2):
        reader.receive(data[i : i + 1])
        assert reader.next_head() is None
    reader.receive(data[-2:])
    with pytest.raises(h1.ProtocolError) as info:
        reader.next_head()
    assert info.value.status == 501


def test_head_limits() -> None:
    reader = h1.RequestReader(1024)
    reader.receive(b"GET / HTTP/1.1\r\nX: " + b"a" * 1100)
    with pytest.raises(h1.ProtocolError) as info:
        reader.next_head()
    assert info.value.status == 431
    # a complete head read at once is measured (the session answers 431 for it)
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 1100 + b"\r\n\r\n"
    _, head = request(data + b"body", 1024)
    assert head.size == len(data)


def test_fields_are_lower_cased_and_stripped_in_order() -> None:
    _, head = request(b"GET /p?q HTTP/1.1\r\nHost: a\r\nX-A:  1 \t\r\nx-a: 2\r\nX-Empty:\r\n\r\n")
    assert head.headers == [(b"host", b"a"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x-empty", b"")]
    assert head.method == b"GET" and head.target == b"/p?q" and head.version == b"1.1"


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x, Close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),  # as h11
    ],
)
def test_request_keep_alive(data: bytes, keep_alive: bool) -> None:
    assert request(data)[1].keep_alive is keep_alive


def test_upgrade_request_leaves_the_other_protocol_buffered() -> None:
    reader, _ = request(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05"
    )
    assert reader.state == h1.DONE
    assert reader.trailing() == b"\x81\x05"


def test_empty_lines_before_a_request_are_skipped() -> None:
    reader = h1.RequestReader(4096)
    for piece in (b"\r", b"\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"):
        reader.receive(piece)
        head = reader.next_head()
    assert head is not None and head.target == b"/"


# -- responses ----------------------------------------------------------------------


def response(method: bytes, data: bytes, *, upgrade: bool = False) -> h1.ResponseReader:
    reader = h1.ResponseReader(65536)
    reader.start(method, upgrade=upgrade)
    reader.receive(data)
    return reader


def test_response_to_head_has_no_body_whatever_it_says() -> None:
    reader = response(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    head = reader.next_head()
    assert head is not None and head.content_length == 5000
    assert reader.state == h1.DONE and reader.reusable()


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status: int) -> None:
    reader = response(b"GET", b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n" % status)
    assert reader.next_head() is not None
    assert reader.state == h1.DONE and reader.reusable()


def test_informational_responses_come_before_the_final_one() -> None:
    reader = response(
        b"POST",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    statuses = []
    while reader.state == h1.HEAD:
        head = reader.next_head()
        assert head is not None
        statuses.append(head.status)
    assert statuses == [100, 103, 200]
    assert reader.body() == b"ok" and reader.state == h1.DONE


def test_101_switches_only_an_upgrade_request() -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nframe"
    reader = response(b"GET", data, upgrade=True)
    head = reader.next_head()
    assert head is not None and head.status == 101
    assert reader.state == h1.SWITCHED and reader.trailing() == b"frame"
    with pytest.raises(h1.ProtocolError):
        response(b"GET", data).next_head()


def test_close_delimited_body_ends_with_the_connection() -> None:
    reader = response(b"GET", b"HTTP/1.0 200 OK\r\n\r\npart")
    head = reader.next_head()
    assert head is not None and reader.framing == h1.UNTIL_CLOSE
    assert reader.body() == b"part"
    reader.receive(b"-two")
    assert reader.body() == b"-two"
    reader.eof()
    assert reader.state == h1.DONE and not reader.reusable()


def test_truncated_response_bodies_are_errors() -> None:
    for data in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ):
        reader = response(b"GET", data)
        reader.next_head()
        reader.body()
        with pytest.raises(h1.ProtocolError):
            reader.eof()


def test_chunked_wins_over_content_length_in_a_response() -> None:
    reader = response(
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    head = reader.next_head()
    assert head is not None and head.chunked and head.content_length is None
    assert reader.body() == b"hello" and reader.reusable()


@pytest.mark.parametrize(
    ("data", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", False),  # junk after it
    ],
)
def test_response_reuse(data: bytes, reusable: bool) -> None:
    reader = response(b"GET", data)
    reader.next_head()
    reader.body()
    assert reader.state == h1.DONE and reader.reusable() is reusable


def test_a_reused_connection_reads_the_next_response() -> None:
    reader = response(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    reader.next_head()
    assert reader.body() == b"a"
    reader.start(b"GET")
    reader.receive(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nb")
    head = reader.next_head()
    assert head is not None and head.status == 404 and reader.body() == b"b"


# -- serialising ---------------------------------------------------------------------


def test_request_head_and_chunks() -> None:
    assert h1.request_head(b"GET", b"/x", [(b"host", b"a"), (b"x", b"1")]) == (
        b"GET /x HTTP/1.1\r\nhost: a\r\nx: 1\r\n\r\n"
    )
    assert h1.encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert h1.encode_chunk(b"") == b""  # an empty chunk would end the body


@pytest.mark.parametrize(
    ("status", "length", "head_request", "http10", "keep", "framing", "fields", "kept"),
    [
        (200, True, False, False, True, h1.LENGTH, [], True),
        (200, False, False, False, True, h1.CHUNKED, [b"transfer-encoding: chunked"], True),
        (200, False, False, True, False, h1.UNTIL_CLOSE, [b"connection: close"], False),
        (200, True, True, False, True, h1.NO_BODY, [], True),
        # a HEAD response announces the GET's framing (RFC 9110 §9.3.2)
        (200, False, True, False, True, h1.NO_BODY, [b"transfer-encoding: chunked"], True),
        (204, False, False, False, True, h1.NO_BODY, [], True),
        (304, False, False, False, False, h1.NO_BODY, [b"connection: close"], False),
    ],
)
def test_frame_response(
    status: int,
    length: bool,
    head_request: bool,
    http10: bool,
    keep: bool,
    framing: int,
    fields: list[bytes],
    kept: bool,
) -> None:
    headers = [(b"content-length", b"5")] if length else []
    data, got_framing, got_keep = h1.frame_response(
        status,
        b"R",
        headers,
        content_length=length,
        head_request=head_request,
        http10=http10,
        keep_alive=keep,
    )
    lines = data.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 %d R" % status and data.endswith(b"\r\n\r\n")
    assert [line for line in lines[1:-2] if not line.startswith(b"content-length")] == fields
    assert (got_framing, got_keep) == (framing, kept)
