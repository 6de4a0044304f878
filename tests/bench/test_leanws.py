"""``bench.leanws``, the hub swarm's minimal WebSocket client, against the ``websockets``
server: what the benchmarks rely on (messages in both directions, fragments, pings,
both closing handshakes, a refused upgrade's status and ``Retry-After``) and what a
broken server gets (a clear error, never a hang)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from bench import leanws

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler, **kwargs: Any) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, compression=None, **kwargs) as srv:
        port = srv.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws?x=1"


async def test_messages_both_ways_and_a_normal_close() -> None:
    seen: list[Any] = []

    async def echo(ws: ServerConnection) -> None:
        seen.append(ws.request.path if ws.request else None)
        async for message in ws:
            await ws.send(message)
            await ws.send(b"\x00\xff")  # a binary message comes out as bytes

    async with server(echo) as url:
        ws = await leanws.connect(url, timeout=5)
        sizes = [0, 1, 125, 126, 65535, 65536, 200_000]
        for size in sizes:
            text = "é" * size
            await ws.send(text)
            assert await ws.recv() == text
            assert await ws.recv() == b"\x00\xff"
        await ws.close()
        assert ws.close_code == 1000
        with pytest.raises(EOFError):
            await ws.recv()
        with pytest.raises(ConnectionResetError):
            await ws.send("late")
    assert seen == ["/ws?x=1"]


async def test_fragments_pings_and_the_servers_close() -> None:
    async def talk(ws: ServerConnection) -> None:
        await ws.send(["frag", "mented", " ☃"])  # one text message in three frames
        await ws.ping(b"are you there")
        await ws.send("after the ping")
        await ws.close(4001, "unauthorized: who are you")

    async with server(talk) as url:
        ws = await leanws.connect(url, timeout=5)
        got = [m async for m in ws]
        assert got == ["fragmented ☃", "after the ping"]
        assert (ws.close_code, ws.close_reason) == (4001, "unauthorized: who are you")
        assert ws.error is None


async def test_a_refused_upgrade_names_its_status_and_retry_after() -> None:
    def busy(conn: ServerConnection, request: Request) -> Response:
        return conn.respond(503, "busy\n")

    async def never(ws: ServerConnection) -> None:  # pragma: no cover - never upgraded
        raise AssertionError

    def with_retry(conn: ServerConnection, request: Request, response: Response) -> None:
        response.headers["Retry-After"] = "7"

    async with server(never, process_request=busy, process_response=with_retry) as url:
        with pytest.raises(leanws.Refused) as refused:
            await leanws.connect(url, timeout=5)
    assert refused.value.status == 503
    assert refused.value.headers["retry-after"] == "7"


@asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[str]:
    """A TCP server that reads the request head, writes ``answer`` (no WebSocket), then
    waits (at most a second) for the client to hang up; on leaving, every connection
    it took has ended."""
    handlers: list[asyncio.Task[None]] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key")
            )
            accept = base64.b64encode(hashlib.sha1(key + leanws._GUID).digest())
            writer.write(answer.replace(b"ACCEPT", accept))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 1.0)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.ensure_future(session(reader, writer)))

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/ws"
    await asyncio.gather(*handlers)


UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (UPGRADE + b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n\x82\x81\x00\x00\x00\x00x", "masked"),
        (UPGRADE + b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n\xc1\x01x", "reserved"),
        (UPGRADE + b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n\x80\x01x", "continuation"),
        (UPGRADE + b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n\x83\x00", "opcode 3"),
        (UPGRADE + b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n\x81\x02\xff\xfe", "UTF-8"),
    ],
    ids=["masked", "rsv", "stray-continuation", "unknown-opcode", "bad-utf8"],
)
async def test_a_broken_server_ends_the_connection_with_1002(answer: bytes, why: str) -> None:
    async with raw_server(answer) as url:
        ws = await leanws.connect(url, timeout=5)
        assert [m async for m in ws] == []
        assert ws.close_code == 1002
        assert ws.error is not None and why in ws.error


@pytest.mark.parametrize(
    "answer",
    [
        UPGRADE + b"Sec-WebSocket-Accept: wrong\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n",  # then the connection ends
        b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"a" * 20_000,  # a head without end
    ],
    ids=["wrong-accept", "garbage", "cut-short", "head-too-large"],
)
async def test_a_failed_handshake_raises_at_once(answer: bytes) -> None:
    async with raw_server(answer) as url:
        with pytest.raises((leanws.Refused, OSError)):
            await leanws.connect(url, timeout=5)


async def test_nothing_listening_and_a_silent_server() -> None:
    async with raw_server(b"") as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError):
        await leanws.connect(f"ws://127.0.0.1:{port}/ws", timeout=5)

    gave_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()
        gave_up.set()

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with quiet:
        with pytest.raises(TimeoutError):
            await leanws.connect(f"ws://127.0.0.1:{quiet.sockets[0].getsockname()[1]}/", 0.3)
        await asyncio.wait_for(gave_up.wait(), 5)  # it hung up: its connection is gone
    with pytest.raises(ValueError):
        await leanws.connect("http://127.0.0.1/ws")


def test_masking_matches_the_rfc_example() -> None:
    # RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d
    frame = leanws.mask(b"Hello", bytes.fromhex("37fa213d"))
    assert frame == bytes.fromhex("7f9f4d5158")
    assert leanws.mask(frame, bytes.fromhex("37fa213d")) == b"Hello"
    assert leanws.mask(b"", b"abcd") == b""
    head = leanws.encode_frame(leanws.OP_TEXT, b"x" * 70_000)
    assert head[0] == 0x81 and head[1] == 0x80 | 127
    assert struct.unpack("!Q", head[2:10])[0] == 70_000


def test_under_uvloop() -> None:
    """The swarm runs on uvloop, whose transports are not ``asyncio.Transport``s."""

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> tuple[Any, ...]:
        async with server(echo) as url:
            ws = await leanws.connect(url, timeout=5)
            await ws.send("over uvloop")
            answer = await ws.recv()
            await ws.close()
            return answer, ws.close_code

    assert uvloop.run(main()) == ("over uvloop", 1000)
