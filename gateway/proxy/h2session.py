"""HTTP/2 at the edge: one client connection that negotiated ``h2`` in TLS ALPN.

Theory of operation
-------------------
The TLS listener offers ``h2`` and ``http/1.1`` (``gateway/tls.py``); a connection
whose handshake chose ``h2`` is handed by ``http._ClientSession.connection_made`` to an
``H2Session`` (``take_over``), which owns it from then on.  The frames are the ``h2``
library's job (sans-IO: bytes in, events out, bytes to send); this module is the
thin adapter around it: it feeds what the transport reads, turns the events into
per-stream state (``H2Stream``), writes what the library has to send, and keeps the
connection within its budgets.  Each request stream is served by a task
(``h2stream.serve``): the same admission as HTTP/1.1 (``edge.py``), then an HTTP/1.1
exchange with the agent through the pool, or, for gRPC, an HTTP/2 stream to the
agent (``h2upstream.py``).

Flow control (RFC 9113 §5.2) is end to end: request body bytes are acknowledged to
the client (WINDOW_UPDATE) only once they went on to the agent, so a client can have
at most ``stream_window`` bytes per stream and ``connection_window`` per connection
buffered here; response bytes go out only within the client's windows and while the
transport is not paused, so an agent's answer never piles up for a client that does
not read.

Budgets (``H2Settings``), each breach answered with GOAWAY and the connection closed:

* ``max_concurrent_streams`` (SETTINGS_MAX_CONCURRENT_STREAMS): the library refuses
  more open streams; streams the client reset but whose task is still ending count
  too, so a stream beyond gets RST_STREAM(REFUSED_STREAM);
* **rapid reset** (CVE-2023-44487): streams the client reset, or that we refused,
  before their answer was complete spend a token bucket (``reset_rate`` /
  ``reset_burst``); when it is empty: GOAWAY(ENHANCE_YOUR_CALM);
* **control floods**: PING, SETTINGS, PRIORITY, unknown frames and empty DATA
  frames cost us (an answer to write, or work) without carrying a request: another
  bucket (``control_rate`` / ``control_burst``), same answer;
* a client that does not read: our output waiting in the transport past
  ``max_unread_output`` while writing is paused, or writing paused with streams
  waiting for ``body_idle_timeout``, drops the connection;
* header list size (SETTINGS_MAX_HEADER_LIST_SIZE and HPACK's decoder bound: the
  limits' ``max_header_bytes``), frame size, CONTINUATION floods (the library's), and
  any protocol error: GOAWAY with the error code;
* deadlines, one timer per connection: the first request within ``header_timeout``,
  later an idle connection (no stream) closed after ``idle_timeout`` (GOAWAY
  NO_ERROR).

Shutdown (``shutdown``) sends GOAWAY(NO_ERROR) naming the last stream it will serve;
streams in flight finish (``ProxyServer.close`` gives them ``shutdown_timeout``), new
ones are refused, and the connection closes when the last one ends.  GOAWAY is
written as a frame of its own so the library keeps serving the open streams (it
would refuse to send on them once it sent a GOAWAY itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from common.logs import OncePer, kv

from .headers import Headers, is_trusted_proxy

if TYPE_CHECKING:
    from .http import ProxyServer

__all__ = ["H2Session", "H2Stream", "Serve", "StreamGone", "StreamStalled"]

log = logging.getLogger("gateway.proxy.h2")

#: budget breaches and protocol errors are logged once a minute per kind
_logged = OncePer(60.0, max_keys=32)


class StreamGone(Exception):
    """The client reset the stream, or the connection ended."""


class StreamStalled(Exception):
    """The client gave no flow-control window (or did not read) for too long."""


class _Budget:
    """A token bucket on the loop's clock: ``spend`` is False once it is empty."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def spend(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class H2Stream:
    """One request stream: what the client sent, and the answer's way back."""

    __slots__ = (
        "_arrived",
        "_pending",
        "_unacked",
        "authority",
        "body_in",
        "bytes_out",
        "ended",
        "fields",
        "gone",
        "header_size",
        "id",
        "method",
        "path",
        "response_done",
        "response_started",
        "scheme",
        "session",
        "started",
        "task",
        "trailers",
    )

    def __init__(
        self, session: H2Session, stream_id: int, headers: Headers, started: float
    ) -> None:
        self.session = session
        self.id = stream_id
        self.started = started
        self.method = self.scheme = self.authority = self.path = b""
        fields: Headers = []
        cookies: list[bytes] = []
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                if name == b":method":
                    self.method = value
                elif name == b":path":
                    self.path = value
                elif name == b":authority":
                    self.authority = value
                elif name == b":scheme":
                    self.scheme = value
            elif name == b"cookie":
                cookies.append(value)  # one field towards HTTP/1.1 (RFC 9113 §8.2.3)
            else:
                fields.append((name, value))
        if cookies:
            fields.append((b"cookie", b"; ".join(cookies)))
        #: the regular header fields (names in lower case, cookies joined)
        self.fields = fields
        self.header_size = size
        self.trailers: Headers | None = None
        #: the client ended its side (END_STREAM)
        self.ended = False
        #: the client reset the stream, or the connection is gone
        self.gone = False
        self.response_started = False
        self.response_done = False
        self.body_in = 0
        self.bytes_out = 0
        self.task: asyncio.Task[None] | None = None
        # request body pieces not read yet, and flow-controlled bytes read but not
        # acknowledged (they are once the reader comes back for more)
        self._pending: deque[tuple[bytes, int]] = deque()
        self._unacked = 0
        self._arrived: asyncio.Future[None] | None = None

    # -- fed by the session ---------------------------------------------------------

    def _feed(self, data: bytes, flow_controlled: int) -> None:
        self._pending.append((data, flow_controlled))
        self.body_in += len(data)
        self._wake()

    def _end(self) -> None:
        self.ended = True
        self._wake()

    def _lose(self) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        arrived = self._arrived
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    # -- the request body -------------------------------------------------------------

    async def read(self, timeout: float) -> bytes:  # noqa: ASYNC109 - a silence limit
        """The next piece of the request body (b"" at its end); the piece before it is
        acknowledged to the client now, since the caller is done with it.  Raises
        ``StreamGone``, or ``TimeoutError`` after ``timeout`` seconds of silence."""
        self.ack()
        while not self._pending:
            if self.gone:
                raise StreamGone
            if self.ended:
                return b""
            self._arrived = self.session.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived
            finally:
                self._arrived = None
        data, flow_controlled = self._pending.popleft()
        self._unacked += flow_controlled
        return data

    def ack(self) -> None:
        """Give the client back the window of what was read (WINDOW_UPDATE)."""
        if self._unacked:
            amount, self._unacked = self._unacked, 0
            self.session.acknowledge(self.id, amount)

    def discard_body(self) -> None:
        """Acknowledge whatever body is buffered or still comes (the answer did not
        need it), so the connection's window is not lost."""
        pending = self._unacked + sum(n for _, n in self._pending)
        self._pending.clear()
        self._unacked = 0
        if pending:
            self.session.acknowledge(self.id, pending)

    # -- the answer ---------------------------------------------------------------------

    def respond(self, status: int, headers: Headers, *, end: bool = False) -> None:
        """Send a response head (``status`` < 200: an informational one)."""
        if self.gone:
            raise StreamGone
        if status >= 200:
            self.response_started = True
        self.session.send_headers(self, [(b":status", b"%d" % status), *headers], end)
        if end:
            self.response_done = True

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """Send response body bytes within the client's windows (waits for them)."""
        session = self.session
        view = memoryview(data)
        while len(view):
            window = await session.window(self)
            size = min(window, len(view))
            session.send_data(self, view[:size], end and size == len(view))
            self.bytes_out += size
            view = view[size:]
        if end:
            if not data:
                session.send_data(self, b"", True)
            self.response_done = True

    def send_trailers(self, headers: Headers) -> None:
        """End the stream with trailer fields (gRPC's status)."""
        if self.gone:
            raise StreamGone
        self.session.send_headers(self, headers, True)
        self.response_done = True

    def reset(self, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """Abort the stream (RST_STREAM): the client sees the answer did not complete."""
        self.session.reset_stream(self, code)


#: what serves one request stream (``h2stream.serve``); the task ends with it
Serve = Callable[["H2Stream"], Coroutine[Any, Any, None]]


class H2Session(asyncio.Protocol):
    """One HTTP/2 client connection (see the module docstring)."""

    def __init__(self, server: ProxyServer, proto: str, serve: Serve) -> None:
        self.server = server
        self.serve = serve
        self.settings = server.settings
        self.limits = server.settings.limits
        self.h2 = server.settings.http2
        self.metrics = server.metrics
        self.proto = proto
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "0.0.0.0"
        self.exempt = False
        self.admitted = False
        config = H2Configuration(client_side=False, header_encoding=None)
        conn = H2Connection(config)
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.h2.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
                SettingCodes.INITIAL_WINDOW_SIZE: self.h2.stream_window,
                SettingCodes.MAX_FRAME_SIZE: self.h2.max_frame_size,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        conn.max_inbound_frame_size = self.h2.max_frame_size
        conn.decoder.max_header_list_size = self.limits.max_header_bytes
        self.conn = conn
        #: streams being served (their tasks may outlive a reset by a moment)
        self.streams: dict[int, H2Stream] = {}
        self.closing = False
        #: resolved once the connection is gone and every stream's task has ended
        self.closed: asyncio.Future[None] = self.loop.create_future()
        now = self.loop.time()
        self._resets = _Budget(self.h2.reset_rate, self.h2.reset_burst, now)
        self._controls = _Budget(self.h2.control_rate, self.h2.control_burst, now)
        self._lost = False
        self._write_paused = False
        self._paused_at = 0.0
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = now
        self._served_any = False

    @property
    def task(self) -> asyncio.Task[None] | None:
        """(``ProxyServer.close`` cancels a session's task: the streams' end with the
        connection, see ``connection_lost``.)"""
        return None

    # -- transport callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "0.0.0.0"
        self.exempt = is_trusted_proxy(self.peer_ip, server.trusted_proxies)
        self.admitted = server.connection_limiter.try_acquire(self.peer_ip, exempt=self.exempt)
        server._sessions.add(self)
        self.metrics.connection_opened("h2")
        self.conn.initiate_connection()
        extra = self.h2.connection_window - 65_535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self._flush()
        self._arm(self.loop.time() + self.limits.header_timeout)
        if server.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.admitted:
            self.admitted = False
            self.server.connection_limiter.release(self.peer_ip, exempt=self.exempt)
        self.metrics.connection_closed("h2")
        self.server._sessions.discard(self)
        for stream in list(self.streams.values()):
            stream._lose()
            if stream.task is not None:
                stream.task.cancel()
        self._wake_all()
        self._maybe_closed()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            # the library queued a GOAWAY with the error's code
            code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)
            self._note("h2_protocol_error", f"protocol error: {str(exc)[:200]}", code=code)
            self._flush()
            self._close()
            return
        except H2Error as exc:
            self._note("h2_protocol_error", f"protocol error: {str(exc)[:200]}")
            self._goaway(ErrorCodes.PROTOCOL_ERROR)
            return
        try:
            for event in events:
                self._event(event)
                if self._lost or (self.transport is not None and self.transport.is_closing()):
                    return
        except Exception:
            log.exception("unexpected error serving an HTTP/2 connection")
            self.abort()
            return
        self._flush()

    def eof_received(self) -> bool:
        # the client will send nothing more (over TLS the transport closes anyway)
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._paused_at = self.loop.time()
        self._arm(self._paused_at + self.settings.body_idle_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_all()

    # -- events ----------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        kind = type(event)
        if kind is DataReceived:
            assert isinstance(event, DataReceived)
            self._data(event)
        elif kind is RequestReceived:
            assert isinstance(event, RequestReceived)
            self._request(event)
        elif kind is StreamEnded:
            assert isinstance(event, StreamEnded)
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream._end()
        elif kind is WindowUpdated:
            self._wake_all()
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            self._client_reset(event.stream_id or 0)
        elif kind is TrailersReceived:
            assert isinstance(event, TrailersReceived)
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = list(event.headers or [])
        elif kind is ConnectionTerminated:
            # the client's GOAWAY: it will open nothing more; the library takes no
            # more frames from us either, so what is in flight ends here
            self._close()
        elif kind in (PingReceived, RemoteSettingsChanged, PriorityUpdated, UnknownFrameReceived):
            self._control_frame()
            if kind is RemoteSettingsChanged:
                self._wake_all()  # the initial window may have grown

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id or 0
        now = self.loop.time()
        if self.closing or len(self.streams) >= self.h2.max_concurrent_streams:
            with contextlib.suppress(H2Error):
                self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._reset_spent(now)
            return
        stream = H2Stream(self, stream_id, list(event.headers or []), now)
        self.streams[stream_id] = stream
        self._served_any = True
        stream.task = self.loop.create_task(self.serve(stream))
        stream.task.add_done_callback(lambda _task: self._stream_done(stream))

    def _data(self, event: DataReceived) -> None:
        stream_id = event.stream_id or 0
        flow_controlled = event.flow_controlled_length or 0
        data = event.data or b""
        stream = self.streams.get(stream_id)
        if stream is None or stream.gone:
            if flow_controlled:
                self.acknowledge(stream_id, flow_controlled)
        else:
            stream._feed(data, flow_controlled)
        if not data and not event.stream_ended:
            self._control_frame()

    def _client_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not stream.response_done:
            self._reset_spent(self.loop.time())
        stream._lose()
        stream.discard_body()
        if stream.task is not None:
            stream.task.cancel()

    def _stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.id, None)
        if not self._lost:
            stream.discard_body()
            if not stream.response_done and not stream.gone:
                # the task ended without finishing its answer: never let it look whole
                self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            elif not stream.ended and not stream.gone:
                # answered before the request ended: the client may stop sending
                # (RFC 9113 §8.1)
                self.reset_stream(stream, ErrorCodes.NO_ERROR)
            stream.gone = True
            self._flush()
            if not self.streams:
                self._idle_since = self.loop.time()
                if self.closing:
                    self._close()
                else:
                    self._arm(self._idle_since + self.limits.idle_timeout)
        self._maybe_closed()

    # -- budgets -----------------------------------------------------------------------

    def _reset_spent(self, now: float) -> None:
        if not self._resets.spend(now):
            self._note("h2_rapid_reset", "too many streams reset (rapid reset)")
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _control_frame(self) -> None:
        if not self._controls.spend(self.loop.time()):
            self._note("h2_flood", "too many control frames (PING/SETTINGS/PRIORITY/empty)")
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _note(self, reason: str, text: str, *, code: int | None = None) -> None:
        self.metrics.rejected.inc(reason=reason)
        due, unlogged = _logged.due(reason, self.loop.time())
        if due:
            fields = kv(client=self.peer_ip, since_last_logged=unlogged)
            if code is not None:
                fields = kv(client=self.peer_ip, code=int(code), since_last_logged=unlogged)
            log.warning("HTTP/2 connection closed: %s", text, extra=fields)

    # -- output ------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self.transport
        if not data or transport is None or transport.is_closing():
            return
        transport.write(data)
        if self._write_paused and transport.get_write_buffer_size() > self.h2.max_unread_output:
            self._note("h2_unread", "the client does not read what it asks for")
            self.abort()

    def send_headers(self, stream: H2Stream, headers: Headers, end: bool) -> None:
        try:
            self.conn.send_headers(stream.id, headers, end_stream=end)
        except StreamClosedError:
            stream._lose()
            raise StreamGone from None
        self._flush()

    def send_data(self, stream: H2Stream, data: memoryview | bytes, end: bool) -> None:
        conn = self.conn
        frame = conn.max_outbound_frame_size
        try:
            if len(data) <= frame:
                conn.send_data(stream.id, data, end_stream=end)
            else:
                for at in range(0, len(data), frame):
                    piece = data[at : at + frame]
                    last = end and at + frame >= len(data)
                    conn.send_data(stream.id, piece, end_stream=last)
        except StreamClosedError:
            stream._lose()
            raise StreamGone from None
        self._flush()

    async def window(self, stream: H2Stream) -> int:
        """How many body bytes ``stream`` may send now (> 0): waits while the client's
        windows are closed or the transport is paused; ``StreamStalled`` after
        ``body_idle_timeout`` of that."""
        deadline = self.loop.time() + self.settings.body_idle_timeout
        while True:
            if stream.gone or self._lost:
                raise StreamGone
            if not self._write_paused:
                try:
                    window = self.conn.local_flow_control_window(stream.id)
                except (StreamClosedError, H2Error):
                    stream._lose()
                    raise StreamGone from None
                if window > 0:
                    return window
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise StreamStalled
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                raise StreamStalled from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def acknowledge(self, stream_id: int, amount: int) -> None:
        """The client may send ``amount`` more bytes (connection and stream windows)."""
        if self._lost:
            return
        with contextlib.suppress(H2Error):
            self.conn.acknowledge_received_data(amount, stream_id)
        self._flush()

    def reset_stream(self, stream: H2Stream, code: int) -> None:
        if not self._lost and not stream.gone:
            with contextlib.suppress(H2Error):
                self.conn.reset_stream(stream.id, code)
            self._flush()
        stream._lose()

    # -- the connection's one deadline -----------------------------------------------

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._lost:
            return
        now = self.loop.time()
        deadlines = []
        if self._write_paused:
            due = self._paused_at + self.settings.body_idle_timeout
            if now >= due:
                self._note("h2_unread", "the client stopped reading")
                self.abort()
                return
            deadlines.append(due)
        if not self.streams:
            limit = self.limits.idle_timeout if self._served_any else self.limits.header_timeout
            due = self._idle_since + limit
            if now >= due:
                self._goaway(ErrorCodes.NO_ERROR)
                return
            deadlines.append(due)
        if deadlines:
            self._arm(min(deadlines))

    # -- ending ------------------------------------------------------------------------

    def _goaway(self, code: int) -> None:
        """GOAWAY with ``code`` through the library (it then sends nothing more), close."""
        if self._lost:
            return
        with contextlib.suppress(H2Error):
            self.conn.close_connection(error_code=code)
        self._flush()
        self._close()

    def shutdown(self) -> None:
        """The server is closing: GOAWAY(NO_ERROR), finish the streams in flight."""
        if self.closing or self._lost:
            return
        self.closing = True
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _maybe_closed(self) -> None:
        if self._lost and not self.streams and not self.closed.done():
            self.closed.set_result(None)
