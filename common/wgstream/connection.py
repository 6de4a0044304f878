"""One WebSocket connection carrying WireGuard datagrams: :class:`DatagramStream`.

Theory of operation
-------------------
A :class:`DatagramStream` is the ``asyncio.Protocol`` of one TLS (or plain TCP)
connection once it speaks WebSocket: the agent's side opens it with
:func:`open_stream` (which also runs the opening handshake), the gateway's side is
handed the connection by its HTTP listener after the upgrade request
(``gateway/wgstream.py``).  The WebSocket framing itself is websockets' sans-IO
``Protocol``; records inside the binary messages are :mod:`.records`.

* in: every binary message (fragments reassembled, up to ``records.MAX_MESSAGE``) is
  unpacked and its datagrams go to ``on_datagrams`` in one call, synchronously.  A text
  message, a message that is not WireGuard records, an oversized message or a framing
  error closes the connection (1003, 1007, 1009, 1002): such a peer is not ours.
* out: :meth:`DatagramStream.send_datagrams` packs a batch into as few messages as
  fit (one flush of the engine usually becomes one message, one TLS write).  The
  outer path's queue is bounded so that tunnelled TCP never sees latency grow without
  limit (TCP over TCP: the inner connections must see loss, not an ever longer
  queue): the kernel holds at most ``notsent_lowat`` unsent bytes
  (``TCP_NOTSENT_LOWAT``: a write beyond it stays in user space), and once user space
  holds ``max_buffered`` bytes or the transport asked us to pause, transport messages
  are dropped -- as a full UDP queue drops them -- while handshake messages always go.
  Drops are counted (``dropped``).
* liveness and queueing delay: a WebSocket ping goes out every ``ping_interval``;
  its pong's round trip (``rtt``, ``rtt_min``) is queued behind whatever data waits
  in both directions' buffers, so ``rtt - rtt_min`` is the queueing delay the tunnel
  sees.  No pong within ``ping_timeout``, or nothing at all received for
  ``idle_timeout``, and the connection is closed as dead.  One timer per connection.
* close: :meth:`close` sends a close frame and ends the connection; ``on_closed``
  runs once with a short reason, whoever ended it.

Nothing here knows which peer the datagrams belong to: the owner decides that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import OPEN, Protocol, State
from websockets.uri import parse_uri

from . import records

#: the WebSocket subprotocol: records of WireGuard datagrams, version 1
SUBPROTOCOL = "kakuremichi.wireguard.v1"
#: the path the gateway's HTTP(S) listener hands to the stream transport
PATH = "/.well-known/kakuremichi-wireguard"

#: websockets logs every opened connection at INFO; ours say what matters themselves
WEBSOCKET_LOG = logging.getLogger("kakuremichi.wgstream.websocket")
WEBSOCKET_LOG.setLevel(logging.WARNING)

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # linux/tcp.h

OnDatagrams = Callable[[list[bytes]], None]
OnClosed = Callable[[str], None]


class StreamError(Exception):
    """The stream could not be opened; the message says why."""


@dataclass(frozen=True)
class StreamSettings:
    """Bounds of one stream connection (see the module docstring)."""

    #: bytes user space may hold unsent before transport messages are dropped
    max_buffered: int = 256 * 1024
    #: unsent bytes the kernel may hold (TCP_NOTSENT_LOWAT); 0 leaves the default
    notsent_lowat: int = 128 * 1024
    ping_interval: float = 5.0
    ping_timeout: float = 15.0
    idle_timeout: float = 30.0


def tune_socket(transport: asyncio.BaseTransport, notsent_lowat: int) -> None:
    """No Nagle delay (a 64-byte packet must not wait for an ACK) and a bounded
    kernel send queue, on the connection's socket (TLS or not)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if notsent_lowat > 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, notsent_lowat)


class DatagramStream(asyncio.Protocol):
    """WireGuard datagrams over one WebSocket connection (see the module docstring)."""

    def __init__(
        self,
        websocket: Protocol,
        *,
        on_datagrams: OnDatagrams,
        on_closed: OnClosed | None = None,
        settings: StreamSettings | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.ws = websocket
        self.on_datagrams = on_datagrams
        self.on_closed = on_closed
        self.settings = settings or StreamSettings()
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        #: resolved when the WebSocket is open (at once on the server side), or failed
        self.opened: asyncio.Future[None] = self.loop.create_future()
        #: resolved with the reason once the connection is gone
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.close_reason = ""
        # statistics
        self.datagrams_in = self.datagrams_out = 0
        self.bytes_in = self.bytes_out = 0
        self.dropped = 0
        self.rtt: float | None = None
        self.rtt_min: float | None = None
        self.pongs = 0  # round trips measured
        self.last_received = self.loop.time()
        self._paused = False
        self._parts: list[bytes] = []  # a fragmented message so far
        self._ping_seq = 0
        self._ping_sent: float | None = None  # on the loop's clock (deadlines)
        self._ping_clock = 0.0  # on a fine one (the round trip)
        self._next_ping = 0.0
        self._timer: asyncio.TimerHandle | None = None
        if websocket.state is OPEN:
            self.opened.set_result(None)

    # -- state -------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.ws.state is OPEN and self.transport is not None and not self.closed.done()

    @property
    def queueing_delay(self) -> float | None:
        """The last ping's round trip above the smallest seen (seconds)."""
        if self.rtt is None or self.rtt_min is None:
            return None
        return max(0.0, self.rtt - self.rtt_min)

    def buffered(self) -> int:
        """Bytes written and not yet handed to the kernel."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        tune_socket(transport, self.settings.notsent_lowat)
        self.last_received = now = self.loop.time()
        self._next_ping = now + self.settings.ping_interval
        self._flush()
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.last_received = self.loop.time()
        ws = self.ws
        try:
            ws.receive_data(data)
        except Exception:  # pragma: no cover - websockets reports errors as state
            self._finish("websocket error")
            return
        events = ws.events_received()
        if not self.opened.done():
            self._opening(events)
            events = [e for e in events if isinstance(e, Frame)]
        batch: list[bytes] = []
        for event in events:
            if isinstance(event, Frame) and not self._frame(event, batch):
                break
        if batch:
            self.datagrams_in += len(batch)
            self.on_datagrams(batch)
        self._flush()

    def eof_received(self) -> bool | None:
        with contextlib.suppress(Exception):
            self.ws.receive_eof()
        self._flush()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.close_reason
        if not reason:
            code = self.ws.close_rcvd.code if self.ws.close_rcvd is not None else None
            reason = f"closed by peer ({code})" if code else "connection lost"
            if exc is not None:
                reason = f"connection lost: {type(exc).__name__}"
        self._finish(reason)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    # -- sending -----------------------------------------------------------------------

    def send_datagrams(self, datagrams: list[bytes]) -> None:
        """Send a batch (in order); over the bound, transport messages are dropped."""
        if not self.is_open:
            self.dropped += len(datagrams)
            return
        assert self.transport is not None
        if self._paused or self.transport.get_write_buffer_size() >= self.settings.max_buffered:
            kept = [d for d in datagrams if not records.is_droppable(d)]
            self.dropped += len(datagrams) - len(kept)
            if not kept:
                return
            datagrams = kept
        ws = self.ws
        for message in records.pack(datagrams):
            ws.send_binary(message)
            self.bytes_out += len(message)
        self.datagrams_out += len(datagrams)
        self._flush()

    def close(self, reason: str = "closed", code: int = 1000) -> None:
        """Close the WebSocket (a close frame, then the connection)."""
        if self.closed.done():
            return
        self.close_reason = self.close_reason or reason
        if self.ws.state is OPEN:
            with contextlib.suppress(Exception):
                self.ws.send_close(code, reason[:100])
            self._flush()
        if self.transport is not None:
            self.transport.close()
            # a peer that never reads our close must not hold the connection open
            self.loop.call_later(2.0, self.abort)
        else:
            self._finish(reason)

    def abort(self) -> None:
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    # -- internals -----------------------------------------------------------------------

    def _opening(self, events: Sequence[object]) -> None:
        """The client's opening handshake: the server's response arrived (or did not
        parse)."""
        for event in events:
            if isinstance(event, Response) and self.ws.state is OPEN:
                self.opened.set_result(None)
                return
        exc = self.ws.handshake_exc
        if exc is not None or self.ws.state is not OPEN:
            status = next((e.status_code for e in events if isinstance(e, Response)), None)
            why = f"HTTP {status}" if status else str(exc or "no response")
            if isinstance(exc, InvalidHandshake) and status == 101:
                why = str(exc)
            self.opened.set_exception(StreamError(f"the gateway refused the stream ({why})"))
            self.close_reason = f"handshake failed ({why})"

    def _frame(self, frame: Frame, batch: list[bytes]) -> bool:
        opcode = frame.opcode
        if opcode is Opcode.BINARY or (opcode is Opcode.CONT and self._parts):
            data = bytes(frame.data)
            if not frame.fin:
                self._parts.append(data)
                return True
            if self._parts:
                self._parts.append(data)
                data = b"".join(self._parts)
                self._parts = []
            self.bytes_in += len(data)
            try:
                batch.extend(records.unpack(data))
            except records.RecordError as exc:
                self._fail(1007, str(exc))
                return False
            return True
        if opcode is Opcode.TEXT:
            self._fail(1003, "text messages are not part of this protocol")
            return False
        if opcode is Opcode.PONG:
            self._pong(bytes(frame.data))
        return True  # ping (answered by websockets), close (handled by it)

    def _fail(self, code: int, reason: str) -> None:
        self.close_reason = f"protocol error: {reason}"
        with contextlib.suppress(Exception):
            self.ws.fail(code, reason[:100])
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        """Write what websockets produced; end the connection when it says so."""
        ws = self.ws
        error = ws.parser_exc
        if error is not None and not self.close_reason:
            if isinstance(error, PayloadTooBig):
                self.close_reason = "protocol error: message too big"
            elif isinstance(error, ProtocolError):
                self.close_reason = f"protocol error: {error}"
            else:
                self.close_reason = f"protocol error: {type(error).__name__}"
        transport = self.transport
        if transport is None:
            return
        eof = False
        for data in ws.data_to_send():
            if data:
                if not transport.is_closing():
                    transport.write(data)
            else:
                eof = True
        if eof or error is not None or ws.state is State.CLOSED:
            transport.close()

    def _arm(self) -> None:
        settings = self.settings
        due = min(self.last_received + settings.idle_timeout, self._next_ping)
        if self._ping_sent is not None:
            due = min(due, self._ping_sent + settings.ping_timeout)
        self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed.done():
            return
        now = self.loop.time()
        settings = self.settings
        if now >= self.last_received + settings.idle_timeout:
            self.close(f"nothing received for {settings.idle_timeout:g}s", 1011)
            return
        if self._ping_sent is not None and now >= self._ping_sent + settings.ping_timeout:
            self.close(f"no pong within {settings.ping_timeout:g}s", 1011)
            return
        if now >= self._next_ping and self.ws.state is OPEN:
            self._next_ping = now + settings.ping_interval
            if self._ping_sent is None:
                self._send_ping()
        self._arm()

    def _send_ping(self) -> None:
        self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
        self._ping_sent = self.loop.time()
        self._ping_clock = time.perf_counter()
        self.ws.send_ping(self._ping_seq.to_bytes(4, "big"))
        self._flush()

    def _pong(self, data: bytes) -> None:
        if self._ping_sent is None or data != self._ping_seq.to_bytes(4, "big"):
            return  # unsolicited, or an old one
        self._ping_sent = None
        # (the loop's clock may tick in milliseconds, as uvloop's does)
        rtt = time.perf_counter() - self._ping_clock
        self.pongs += 1
        self.rtt = rtt
        self.rtt_min = rtt if self.rtt_min is None else min(self.rtt_min, rtt)

    def ping_now(self) -> None:
        """Measure the round trip now (unless a ping is already out)."""
        if self._ping_sent is None and self.is_open:
            self._send_ping()
            if self._timer is not None:
                self._timer.cancel()
            self._arm()

    def _finish(self, reason: str) -> None:
        if self.closed.done():
            return
        self.close_reason = self.close_reason or reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.opened.done():
            self.opened.set_exception(StreamError(self.close_reason))
            self.opened.exception()  # retrieved: nobody may be waiting any more
        self.closed.set_result(self.close_reason)
        if self.on_closed is not None:
            self.on_closed(self.close_reason)


def client_ssl_context() -> ssl.SSLContext:
    """TLS for the stream, without certificate checks: WireGuard authenticates every
    datagram end to end (the gateway's static key), so TLS here only carries the
    stream through networks that pass nothing but HTTPS; a man in the middle sees
    WireGuard ciphertext, as on the UDP path."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_stream(
    host: str,
    port: int,
    *,
    on_datagrams: OnDatagrams,
    on_closed: OnClosed | None = None,
    tls: ssl.SSLContext | bool | None = True,
    settings: StreamSettings | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (the handshake's own deadline)
    user_agent: str = "kakuremichi",
    sock: socket.socket | None = None,
) -> DatagramStream:
    """Connect to a gateway's stream endpoint and open the WebSocket (``PATH``,
    subprotocol ``SUBPROTOCOL``); raises :class:`StreamError` or ``OSError``.

    ``tls`` True uses :func:`client_ssl_context`, False/None plain TCP (ws://, tests);
    ``sock`` is an unconnected or connected socket to use (namespaced benches)."""
    loop = asyncio.get_running_loop()
    context = client_ssl_context() if tls is True else (tls or None)
    scheme = "wss" if context is not None else "ws"
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    client = ClientProtocol(
        parse_uri(f"{scheme}://{authority}{PATH}"),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        max_size=records.MAX_MESSAGE,
        logger=WEBSOCKET_LOG,
    )
    request = client.connect()
    request.headers["User-Agent"] = user_agent
    client.send_request(request)
    stream = DatagramStream(
        client, on_datagrams=on_datagrams, on_closed=on_closed, settings=settings, loop=loop
    )
    try:
        async with asyncio.timeout(timeout):
            # no SNI: the gateway's default certificate is fine (see client_ssl_context)
            hostname = "" if context is not None else None
            if sock is not None:
                if not _connected(sock):
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (host, port))
                await loop.create_connection(
                    lambda: stream, sock=sock, ssl=context, server_hostname=hostname
                )
            else:
                await loop.create_connection(
                    lambda: stream, host, port, ssl=context, server_hostname=hostname
                )
            await stream.opened
    except TimeoutError:
        stream.abort()
        raise StreamError(f"no stream from {authority} within {timeout:g}s") from None
    except BaseException:  # refused, TLS failed, cancelled: nothing may stay open
        stream.abort()
        raise
    return stream


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
