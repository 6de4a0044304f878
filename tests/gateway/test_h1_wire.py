"""One proxied exchange's HTTP/1.1 work, ``h1`` next to h11, both roles: the same wire
bytes.  (``bench/test_h1_bench.py`` times the same two roles against each other.)

One exchange is what the gateway does per proxied request: parse the client's request
head (server role) and write the response head and body for it; write the forwarded
head and parse the agent's response head and 13-byte body (client role).  Before
``h1``, each side ran an h11 machine.
"""

from __future__ import annotations

from collections.abc import Callable

import h11

from gateway.proxy import h1

REQUEST = (
    b"GET /headers HTTP/1.1\r\nHost: app.example.com\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n\r\n"
)
BODY = b'{"hello":"x"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ndate: Tue, 02 Dec 2025 06:00:00 GMT\r\nserver: uvicorn\r\n"
    b"content-type: application/json\r\ncontent-length: 13\r\n\r\n" + BODY
)
FORWARDED = [
    (b"host", b"app.example.com"),
    (b"user-agent", b"curl/8.5.0"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-real-ip", b"127.0.0.1"),
    (b"x-forwarded-host", b"app.example.com"),
    (b"x-forwarded-proto", b"http"),
]
RELAYED = [
    (b"date", b"Tue, 02 Dec 2025 06:00:00 GMT"),
    (b"server", b"uvicorn"),
    (b"content-type", b"application/json"),
    (b"content-length", b"13"),
]


def h11_roles() -> tuple[Callable[[], bytes], Callable[[], bytes]]:
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)

    def server_role() -> bytes:
        server.receive_data(REQUEST)
        assert isinstance(server.next_event(), h11.Request)
        assert isinstance(server.next_event(), h11.EndOfMessage)
        out = server.send(h11.Response(status_code=200, headers=RELAYED, reason=b"OK")) or b""
        out += server.send(h11.Data(data=BODY)) or b""
        out += server.send(h11.EndOfMessage()) or b""
        server.start_next_cycle()
        return out

    def client_role() -> bytes:
        out = client.send(h11.Request(method=b"GET", target=b"/headers", headers=FORWARDED))
        out = (out or b"") + (client.send(h11.EndOfMessage()) or b"")
        client.receive_data(RESPONSE)
        assert isinstance(client.next_event(), h11.Response)
        event = client.next_event()
        assert isinstance(event, h11.Data) and event.data == BODY
        assert isinstance(client.next_event(), h11.EndOfMessage)
        client.start_next_cycle()
        return out

    return server_role, client_role


def h1_roles() -> tuple[Callable[[], bytes], Callable[[], bytes]]:
    requests = h1.RequestReader(32 * 1024)
    responses = h1.ResponseReader(64 * 1024)

    def server_role() -> bytes:
        requests.receive(REQUEST)
        request = requests.next_head()
        assert request is not None and requests.state == h1.DONE
        head, _, _ = h1.frame_response(
            200,
            b"OK",
            RELAYED,
            content_length=True,
            head_request=False,
            http10=False,
            keep_alive=request.keep_alive,
        )
        return head + BODY

    def client_role() -> bytes:
        out = h1.request_head(b"GET", b"/headers", FORWARDED)
        responses.start(b"GET")
        responses.receive(RESPONSE)
        head = responses.next_head()
        assert head is not None and head.status == 200
        assert responses.body() == BODY and responses.reusable()
        return out

    return server_role, client_role


def test_both_write_the_same_wire_bytes() -> None:
    (h11_server, h11_client), (h1_server, h1_client) = h11_roles(), h1_roles()
    assert h1_server().lower() == h11_server().lower()
    assert h1_client() == h11_client()
