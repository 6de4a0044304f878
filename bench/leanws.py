"""A minimal RFC 6455 client for the hub benchmarks' swarm.

Why not ``websockets``: the swarm shares the machine's two cores with the Control it
measures, and in a reconnect storm its ten thousand clients' handshakes (a request
built and a response parsed in Python by a general-purpose library, with its tasks and
timers per connection) kept the swarm busy alone for seconds at the start of a restart
round while Control sat at 0-40% of its core (both sampled every 0.5 s), so the round
timed the load generator as much as Control.  Real clients run on thousands
of machines; what a benchmark of Control must spend on each is as little as possible.
With this client, 10,000 clients are back on a restarted SQLite Control in 6.7-7.1 s
(five runs), against 10.2-13.4 s with ``websockets``; Control is unchanged.

What it does: the opening handshake (``Sec-WebSocket-Accept`` checked; any other answer
raises :class:`Refused` with the status and headers, e.g. a busy Control's 503 and
``Retry-After``); text and binary messages, fragmented or not, in; masked text frames
out; a ping answered with a pong; the closing handshake either way (``close_code``,
``close_reason`` as the server sent them; 1006 when the connection just ended).  No
extensions (Control turns compression off), no subprotocols, no TLS.  Protocol errors
from the server end the connection with 1002 (``error`` says why).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import os
import struct
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

__all__ = ["LeanWebSocket", "Refused", "connect"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 16 * 1024
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class Refused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        super().__init__(f"server rejected WebSocket connection: HTTP {status}")
        self.status = status
        #: header names in lower case
        self.headers = headers


def mask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``key`` (RFC 6455 §5.3)."""
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + mask(payload, key)


class LeanWebSocket(asyncio.Protocol):
    """One client connection (module docstring); made by :func:`connect`."""

    def __init__(self, host_header: str, path: str) -> None:
        self._key = base64.b64encode(os.urandom(16))
        self._request = (
            (
                f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: "
            ).encode()
            + self._key
            + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._buffer = bytearray()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open = False
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._writable: asyncio.Future[None] | None = None
        self._closed = asyncio.get_running_loop().create_future()
        self._close_sent = False
        #: the server's close code and reason (1006, "": the connection just ended)
        self.close_code: int | None = None
        self.close_reason = ""
        #: a protocol error the server made (the connection was ended with 1002)
        self.error: str | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not registered as asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._open and not self._handshake():
            return
        self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self._opened.done():
            self._opened.set_exception(exc or ConnectionResetError("closed during the handshake"))
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- the API the swarm uses ---------------------------------------------------------

    async def send(self, text: str) -> None:
        if self.close_code is not None or self._close_sent:
            raise ConnectionResetError("the connection is closed")
        self.transport.write(encode_frame(OP_TEXT, text.encode()))
        if self._writable is not None:
            await self._writable

    async def recv(self) -> str | bytes:
        """The next message; ``EOFError`` once the connection has ended."""
        while not self._messages:
            if self._closed.done():
                raise EOFError("the connection is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._messages.popleft()

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.recv()
            except EOFError:
                return

    async def close(self, code: int = 1000, timeout: float = 5.0) -> None:
        """The closing handshake: our close frame, then the server's (or ``timeout``)."""
        if not self._closed.done() and not self._close_sent:
            self._close_sent = True
            self.transport.write(encode_frame(OP_CLOSE, struct.pack("!H", code)))
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except TimeoutError:
            self.transport.abort()

    # -- internals ------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._waiter = None

    def _handshake(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self._fail_open(ConnectionError("response head too large"))
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        parts = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            status = int(parts[1]) if parts[0].startswith("HTTP/1.") else -1
        except (IndexError, ValueError):
            status = -1
        if status != 101:
            self._fail_open(Refused(status, headers))
            return False
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            self._fail_open(ConnectionError("wrong Sec-WebSocket-Accept"))
            return False
        self._open = True
        self._opened.set_result(None)
        return True

    def _fail_open(self, exc: Exception) -> None:
        if not self._opened.done():
            self._opened.set_exception(exc)
        self.transport.abort()

    def _frames(self) -> None:
        buf = self._buffer
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            if second & 0x80 or first & 0x70:
                self._protocol_error("masked or reserved-bit frame from the server")
                return
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length = int.from_bytes(buf[2:4], "big")
                offset = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length = int.from_bytes(buf[2:10], "big")
                offset = 10
            if len(buf) < offset + length:
                return
            payload = bytes(buf[offset : offset + length])
            del buf[: offset + length]
            if not self._frame(first & 0x80, first & 0x0F, payload):
                return

    def _frame(self, fin: int, opcode: int, payload: bytes) -> bool:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if (opcode == OP_CONT) != bool(self._fragment_op):  # 0: between messages
                self._protocol_error("unexpected continuation or interleaved message")
                return False
            if opcode != OP_CONT:
                self._fragment_op = opcode
            self._fragments.append(payload)
            if fin:
                data = b"".join(self._fragments)
                op, self._fragments, self._fragment_op = self._fragment_op, [], 0
                if op == OP_TEXT:
                    try:
                        self._messages.append(data.decode())
                    except UnicodeDecodeError:
                        self._protocol_error("a text message that is not UTF-8")
                        return False
                else:
                    self._messages.append(data)
                self._wake()
            return True
        if opcode == OP_PING:
            self.transport.write(encode_frame(OP_PONG, payload))
            return True
        if opcode == OP_PONG:
            return True
        if opcode == OP_CLOSE:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode(errors="replace")
            else:
                self.close_code = 1005
            if not self._close_sent:
                self._close_sent = True
                self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
            self.transport.close()
            return False
        self._protocol_error(f"unknown opcode {opcode}")
        return False

    def _protocol_error(self, why: str) -> None:
        self.error = why
        self.close_code = 1002
        if not self._close_sent:
            self._close_sent = True
            self.transport.write(encode_frame(OP_CLOSE, struct.pack("!H", 1002)))
        self.transport.close()


async def connect(url: str, timeout: float = 120) -> LeanWebSocket:
    """Open ``ws://host:port/path``; returns once the server accepted the upgrade.

    Raises :class:`Refused` for any answer but 101, ``OSError`` when the connection
    fails or ends during the handshake, ``TimeoutError`` after ``timeout``."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"not a ws:// URL: {url!r}")
    port = parts.port or 80
    host_header = parts.netloc
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, ws = await loop.create_connection(
            lambda: LeanWebSocket(host_header, path), parts.hostname, port
        )
        try:
            await ws._opened
        except BaseException:
            transport.abort()
            raise
    return ws
