"""WireGuard datagrams over a WebSocket (``common.wgstream``): the record format against
its definition (round trips, every refusal, fuzzed bytes) and two ``DatagramStream``
ends over real loopback TCP: datagrams both ways in order, the round trip measured,
the bounded buffer dropping transport messages but never handshakes, dead and
misbehaving peers closed, refused handshakes reported."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from common.wgstream import (
    MAX_MESSAGE,
    PATH,
    SUBPROTOCOL,
    DatagramStream,
    RecordError,
    StreamError,
    StreamSettings,
    is_droppable,
    open_stream,
    pack,
    unpack,
)
from common.wgstream.records import MAX_DATAGRAM, PACK_LIMIT


def transport_message(size: int, fill: int = 0) -> bytes:
    return b"\x04\x00\x00\x00" + bytes([fill % 256]) * (size - 4)


INITIATION = b"\x01\x00\x00\x00" + bytes(144)
RESPONSE = b"\x02\x00\x00\x00" + bytes(88)
COOKIE = b"\x03\x00\x00\x00" + bytes(60)

datagrams = st.one_of(
    st.integers(32, 2000).map(transport_message),
    st.sampled_from([INITIATION, RESPONSE, COOKIE, transport_message(MAX_DATAGRAM)]),
)


# -- records ---------------------------------------------------------------------------


@given(st.lists(datagrams, min_size=1, max_size=80))
def test_records_round_trip_within_the_limit(batch: list[bytes]) -> None:
    messages = pack(batch)
    assert [d for m in messages for d in unpack(m)] == batch
    for message in messages:
        assert len(message) <= max(PACK_LIMIT, 2 + MAX_DATAGRAM) <= MAX_MESSAGE
    # as few messages as the limit allows: no two neighbours would have fitted in one
    for first, second in itertools.pairwise(messages):
        assert len(first) + 2 + len(unpack(second)[0]) > PACK_LIMIT


def test_the_record_layout() -> None:
    assert pack([RESPONSE, transport_message(32)]) == [
        b"\x00\x5c" + RESPONSE + b"\x00\x20" + transport_message(32)
    ]
    with pytest.raises(ValueError):
        pack([b""])
    with pytest.raises(ValueError):
        pack([bytes(MAX_DATAGRAM + 1)])


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"", "empty"),
        (b"\x00", "cut off"),
        (b"\x00\x00", "length 0"),
        (b"\x00\x21" + transport_message(32), "runs past"),
        (b"\x00\x20" + transport_message(32) + b"\x00", "cut off"),
        (b"\x00\x04" + b"\x05\x00\x00\x00", "not a WireGuard"),  # type 5
        (b"\x00\x20" + b"\x04\x01\x00\x00" + bytes(28), "not a WireGuard"),  # reserved set
        (b"\x00\x1f" + transport_message(31), "not a WireGuard"),  # shorter than a tag
        (b"\x00\x5b" + RESPONSE[:91], "not a WireGuard"),  # a response of 91 bytes
        (b"\x00\x94" + INITIATION + b"\x00\x41" + COOKIE + b"\x00", "not a WireGuard"),
    ],
)
def test_every_malformed_message_is_refused(message: bytes, why: str) -> None:
    with pytest.raises(RecordError, match=why):
        unpack(message)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_any_bytes_unpack_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        for datagram in unpack(data):
            assert 4 <= len(datagram) <= MAX_DATAGRAM


def test_only_transport_messages_may_be_dropped() -> None:
    assert is_droppable(transport_message(100))
    assert not any(is_droppable(d) for d in (INITIATION, RESPONSE, COOKIE))


# -- two ends over loopback TCP ------------------------------------------------------------


class _Upgrade(asyncio.Protocol):
    """The test's server side: websockets' sans-IO server answers the upgrade, then the
    connection becomes a DatagramStream (what the gateway does after its HTTP parse)."""

    def __init__(self, make: Callable[[ServerProtocol], DatagramStream | None]) -> None:
        self.make = make
        self.server = ServerProtocol(
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=MAX_MESSAGE,
        )
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.server.receive_data(data)
        for event in self.server.events_received():
            if isinstance(event, Request):
                response = self.server.accept(event)
                if event.path != PATH:
                    response = self.server.reject(404, "not here\n")
                self.server.send_response(response)
                if response.status_code != 101:
                    for chunk in self.server.data_to_send():
                        if chunk:
                            self.transport.write(chunk)
                    self.transport.close()
                    return
                stream = self.make(self.server)
                if stream is None:
                    return  # the test answers nothing more (a silent server)
                self.transport.set_protocol(stream)
                stream.connection_made(self.transport)


class Ends:
    """A client stream, the server stream and what each received."""

    def __init__(self) -> None:
        self.client_got: list[bytes] = []
        self.server_got: list[bytes] = []
        self.server: DatagramStream | None = None
        self.client: DatagramStream | None = None
        self.server_ready = asyncio.Event()
        self.port = 0


@contextlib.asynccontextmanager
async def ends(
    server_settings: StreamSettings | None = None,
    client_settings: StreamSettings | None = None,
    *,
    answer: bool = True,
) -> AsyncIterator[Ends]:
    loop = asyncio.get_running_loop()
    pair = Ends()

    def make(server: ServerProtocol) -> DatagramStream | None:
        if not answer:
            return None
        pair.server = DatagramStream(
            server,
            on_datagrams=pair.server_got.extend,
            settings=server_settings,
        )
        pair.server_ready.set()
        return pair.server

    listener = await loop.create_server(lambda: _Upgrade(make), "127.0.0.1", 0)
    pair.port = listener.sockets[0].getsockname()[1]
    try:
        yield pair
    finally:
        for stream in (pair.client, pair.server):
            if stream is not None:
                stream.abort()
        listener.close()
        await listener.wait_closed()


async def connected(pair: Ends, settings: StreamSettings | None = None) -> DatagramStream:
    pair.client = await open_stream(
        "127.0.0.1",
        pair.port,
        on_datagrams=pair.client_got.extend,
        tls=False,
        settings=settings,
        timeout=5,
    )
    await asyncio.wait_for(pair.server_ready.wait(), 5)
    return pair.client


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def test_datagrams_both_ways_in_order() -> None:
    async with ends() as pair:
        client = await connected(pair)
        assert pair.server is not None
        sent = [transport_message(100 + i, i) for i in range(500)] + [INITIATION]
        for start in range(0, len(sent), 37):
            client.send_datagrams(sent[start : start + 37])
        big = [transport_message(MAX_DATAGRAM, 7)] * 3
        pair.server.send_datagrams(big)
        await until(lambda: len(pair.server_got) == len(sent) and len(pair.client_got) == 3)
        assert pair.server_got == sent and pair.client_got == big
        assert client.datagrams_out == len(sent) and pair.server.datagrams_in == len(sent)
        assert client.dropped == 0
        client.ping_now()
        await until(lambda: client.rtt is not None)
        assert client.rtt is not None and 0 <= client.rtt < 1 and client.queueing_delay == 0
        client.close("done")
        assert await asyncio.wait_for(pair.server.closed, 5) == "closed by peer (1000)"
        assert await asyncio.wait_for(client.closed, 5) == "done"


async def test_a_full_buffer_drops_transport_messages_not_handshakes() -> None:
    """The peer stops reading: the kernel queues fill, then user space up to
    max_buffered; beyond it transport messages are dropped and handshakes still go."""
    bounded = StreamSettings(max_buffered=64 * 1024, notsent_lowat=16 * 1024)
    async with ends() as pair:
        client = await connected(pair, bounded)
        assert pair.server is not None and pair.server.transport is not None
        pair.server.transport.pause_reading()
        chunk = [transport_message(1400, i) for i in range(40)]
        for _ in range(400):  # 22 MB offered: far beyond every buffer on the way
            client.send_datagrams(chunk)
            await asyncio.sleep(0)
        assert client.dropped > 0
        assert client.buffered() <= 64 * 1024 + 40 * 1402 + 256
        dropped = client.dropped
        client.send_datagrams([INITIATION])
        assert client.dropped == dropped  # a handshake is never dropped
        pair.server.transport.resume_reading()
        await until(lambda: INITIATION in pair.server_got, 10)
        assert pair.server_got[-1] == INITIATION


async def test_a_silent_peer_is_closed_as_dead() -> None:
    quick = StreamSettings(ping_interval=0.1, ping_timeout=0.3, idle_timeout=0.5)
    async with ends() as pair:
        client = await connected(pair, quick)
        assert pair.server is not None and pair.server.transport is not None
        pair.server.transport.pause_reading()  # no pong will come
        reason = await asyncio.wait_for(client.closed, 5)
        assert reason.startswith(("no pong", "nothing received"))


@pytest.mark.parametrize(
    ("frame", "code", "why"),
    [
        (Frame(Opcode.TEXT, b"hello"), 1003, "text messages"),
        (Frame(Opcode.BINARY, b"\x00\x04abcd"), 1007, "not a WireGuard"),
        (Frame(Opcode.BINARY, bytes(MAX_MESSAGE + 1)), 1009, "too big"),
    ],
)
async def test_a_peer_breaking_the_protocol_is_closed(frame: Frame, code: int, why: str) -> None:
    async with ends() as pair:
        client = await connected(pair)
        server = pair.server
        assert server is not None and client.transport is not None
        # frames no conforming client sends, written under its WebSocket
        client.ws.send_frame(frame)
        for data in client.ws.data_to_send():
            client.transport.write(data)
        reason = await asyncio.wait_for(server.closed, 5)
        assert why in reason
        assert server.ws.close_sent is not None and server.ws.close_sent.code == code
        assert pair.server_got == []


async def test_fragmented_messages_are_reassembled() -> None:
    async with ends() as pair:
        client = await connected(pair)
        assert client.transport is not None
        message = pack([transport_message(300), RESPONSE])[0]
        client.ws.send_binary(message[:100], fin=False)
        client.ws.send_continuation(message[100:], fin=True)
        for data in client.ws.data_to_send():
            client.transport.write(data)
        await until(lambda: len(pair.server_got) == 2)
        assert pair.server_got == [transport_message(300), RESPONSE]


async def test_refused_and_silent_handshakes_raise_stream_error() -> None:
    # the server refuses the path: its 404 is the reason
    async with ends() as pair:
        with pytest.raises(StreamError, match="404"):
            await _open_elsewhere(pair.port)
    # a server that accepts TCP and never answers: the handshake deadline
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        with pytest.raises(StreamError, match="within"):
            await open_stream(
                "127.0.0.1",
                silent.getsockname()[1],
                on_datagrams=lambda _: None,
                tls=False,
                timeout=0.5,
            )
    finally:
        silent.close()
    # nothing listening: the OSError as it is
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(OSError):
        await open_stream("127.0.0.1", port, on_datagrams=lambda _: None, tls=False, timeout=2)


async def _open_elsewhere(port: int) -> None:
    """A client asking for another path (the test server answers 404)."""
    client = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:{port}/elsewhere"),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
    )
    client.send_request(client.connect())
    stream = DatagramStream(client, on_datagrams=lambda _: None)
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: stream, "127.0.0.1", port)
    try:
        await asyncio.wait_for(stream.opened, 5)
    finally:
        stream.abort()


def test_the_protocol_constants_are_what_gateways_expect() -> None:
    assert PATH == "/.well-known/kakuremichi-wireguard"
    assert SUBPROTOCOL == "kakuremichi.wireguard.v1"
    assert MAX_DATAGRAM == 65535 and MAX_MESSAGE == PACK_LIMIT + 2 + MAX_DATAGRAM
