"""HTTP/2 to the agent, for what needs it end to end (gRPC: trailers, streams both ways).

Theory of operation
-------------------
The agent never parses HTTP: it splices each tunnel connection to the tunnel's
target after the PROXY v2 preamble (``forward.tunnel_preamble``).  So the gateway
can speak HTTP/2 *through* it: an ``AgentConnection`` is one TCP connection to the
agent, opened with the tunnel's preamble plus the standard ALPN TLV
(``proxyproto.TLV_ALPN`` = ``h2``, haproxy's ``proxy-protocol.txt`` §2.2.1), then the
HTTP/2 connection preface in clear text: h2c with prior knowledge (RFC 9113 §3.3)
towards a ``host:port`` or ``http://`` target.  For an ``https://`` target the agent
dials TLS and, seeing the ALPN TLV, offers ``h2`` in its own handshake, so the
origin speaks HTTP/2 over TLS while the gateway's bytes stay the same.

The connection is ready once the origin's SETTINGS arrived.  An origin that does not
speak HTTP/2 answers the preface with something that is not a frame (an HTTP/1.1
``400``) or closes: the streams waiting on it fail with ``UpstreamFailed("not_h2")``
or ``("closed")``, which ``h2stream`` turns into a 502 page saying so (and logs).
Connections are shared per (agent, port, tunnel) by up to the origin's
SETTINGS_MAX_CONCURRENT_STREAMS streams each, and closed after ``pool_idle_timeout``
without a stream, or when the origin sends GOAWAY (streams it did not take fail as
``closed`` and are not retried: they may not be idempotent).

Flow control is end to end as on the client side: response bytes are acknowledged
to the origin once the client's connection took them (``UpstreamStream.next``), and
request bytes go out within the origin's windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError, StreamClosedError, TooManyStreamsError
from h2.settings import SettingCodes, Settings

from common.logs import kv
from common.relay import proxyproto
from common.relay.dial import Dialer
from common.relay.metrics import Metrics
from common.relay.splice import close_writer

from .forward import UpstreamFailed
from .headers import Headers
from .settings import ProxySettings

__all__ = ["AgentConnection", "H2Upstreams", "UpstreamStream", "h2_preamble"]

log = logging.getLogger("gateway.proxy.h2")

#: our receive window per stream and per connection towards the origin
_STREAM_WINDOW = 256 * 1024
_CONNECTION_WINDOW = 1024 * 1024
#: connections per (agent, port, tunnel) at most
_MAX_CONNECTIONS_PER_KEY = 8
_READ = 64 * 1024

NOT_H2 = (
    "The tunnel's service does not speak HTTP/2, which gRPC needs end to end "
    "(h2c with prior knowledge, or h2 over TLS)."
)


def h2_preamble(tunnel_id: str) -> bytes:
    """The PROXY v2 header of an HTTP/2 tunnel connection: the tunnel and ALPN h2."""
    return proxyproto.encode(tunnel_id=tunnel_id, tlvs=((proxyproto.TLV_ALPN, b"h2"),))


def _settings_start(data: bytes) -> bool:
    """Whether ``data`` (up to 9 bytes) can start the server connection preface: a
    SETTINGS frame (type 4, no ACK flag, stream 0, a length that is a multiple of 6;
    RFC 9113 §3.4, §6.5).  An HTTP/1.1 answer (``HTTP/1.1 400``) is refused at its
    first bytes, before the library would wait for a "frame" megabytes long."""
    if len(data) >= 3:
        length = int.from_bytes(data[:3], "big")
        if length % 6 or length > 16_384:
            return False
    if len(data) >= 4 and data[3] != 0x04:
        return False
    if len(data) >= 5 and data[4] & 0x01:
        return False
    return len(data) < 9 or int.from_bytes(data[5:9], "big") & 0x7FFF_FFFF == 0


class UpstreamStream:
    """One stream to the origin: what it answered, in order, for ``next``."""

    __slots__ = ("_arrived", "_events", "_unacked", "conn", "id", "local_ended")

    def __init__(self, conn: AgentConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        #: ("head", headers, ended) | ("data", bytes, flow-controlled) |
        #: ("trailers", headers) | ("end",) | ("reset", code) | ("failed", UpstreamFailed)
        self._events: deque[tuple[Any, ...]] = deque()
        self._arrived: asyncio.Future[None] | None = None
        self._unacked = 0
        #: our side of the stream is ended (END_STREAM or reset sent)
        self.local_ended = False

    def _push(self, item: tuple[Any, ...]) -> None:
        self._events.append(item)
        arrived = self._arrived
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    async def next(self, timeout: float) -> tuple[Any, ...]:  # noqa: ASYNC109
        """The origin's next event (``TimeoutError`` after ``timeout`` of silence);
        the data before it is acknowledged to the origin now."""
        if self._unacked:
            amount, self._unacked = self._unacked, 0
            self.conn.acknowledge(self.id, amount)
        while not self._events:
            self._arrived = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived
            finally:
                self._arrived = None
        item = self._events.popleft()
        if item[0] == "data":
            self._unacked += item[2]
        return item

    async def send(self, data: bytes, timeout: float) -> None:  # noqa: ASYNC109
        await self.conn.send_data(self, data, timeout)

    def end(self, trailers: Headers | None = None) -> None:
        """End our side: trailers, or an empty END_STREAM."""
        if not self.local_ended:
            self.local_ended = True
            self.conn.end_stream(self, trailers)

    def cancel(self, code: int = ErrorCodes.CANCEL) -> None:
        """Reset the stream (the client went away, or the answer is over)."""
        self.local_ended = True
        self.conn.reset(self, code)


class AgentConnection:
    """One HTTP/2 client connection to an origin through the agent's splice."""

    def __init__(
        self,
        owner: H2Upstreams,
        key: tuple[str, int, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.owner = owner
        self.key = key
        self.reader = reader
        self.writer = writer
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        self.conn = conn
        self.streams: dict[int, UpstreamStream] = {}
        loop = asyncio.get_running_loop()
        self.loop = loop
        #: resolved once the origin's SETTINGS came (or failed: it does not speak h2)
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed = False
        #: the origin sent GOAWAY: no new streams here
        self.draining = False
        self._waiters: list[asyncio.Future[None]] = []
        self._idle: asyncio.TimerHandle | None = None
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
        self._flush()
        self.task = loop.create_task(self._read())

    # -- choosing a connection ---------------------------------------------------------

    def has_room(self) -> bool:
        if self.closed or self.draining or not self.ready.done() or self.ready.exception():
            return False
        limit = self.conn.remote_settings.max_concurrent_streams
        return len(self.streams) < limit

    # -- reading -------------------------------------------------------------------------

    async def _read(self) -> None:
        failure = UpstreamFailed("closed", "The connection to the agent broke.")
        first = b""  # the origin's first frame header, until it is known to be SETTINGS
        try:
            while True:
                data = await self.reader.read(_READ)
                if data and len(first) < 9:
                    first = (first + data)[:9]
                    if not _settings_start(first):
                        failure = UpstreamFailed("not_h2", NOT_H2)
                        return
                if not data:
                    if not self.ready.done():
                        failure = UpstreamFailed(
                            "closed",
                            "The local service refused the connection, is unreachable, or "
                            "closed it without speaking HTTP/2 (reported by the agent).",
                        )
                    else:
                        failure = UpstreamFailed("closed", "The service closed the connection.")
                    return
                try:
                    events = self.conn.receive_data(data)
                except ProtocolError as exc:
                    if not self.ready.done():
                        failure = UpstreamFailed("not_h2", NOT_H2)
                    else:
                        failure = UpstreamFailed("closed", f"HTTP/2 error from the service: {exc}")
                    self._flush()
                    return
                for event in events:
                    self._event(event)
                self._flush()
        except (ConnectionError, OSError):
            return
        finally:
            self._fail(failure)

    def _event(self, event: Event) -> None:
        kind = type(event)
        stream_id = getattr(event, "stream_id", None) or 0
        stream = self.streams.get(stream_id)
        if kind is DataReceived:
            assert isinstance(event, DataReceived)
            if stream is None:
                self.acknowledge(stream_id, event.flow_controlled_length or 0)
            else:
                stream._push(("data", event.data or b"", event.flow_controlled_length or 0))
        elif kind is ResponseReceived:
            assert isinstance(event, ResponseReceived)
            if stream is not None:
                stream._push(("head", list(event.headers or []), event.stream_ended is not None))
        elif kind is TrailersReceived:
            assert isinstance(event, TrailersReceived)
            if stream is not None:
                stream._push(("trailers", list(event.headers or [])))
        elif kind is StreamEnded:
            if stream is not None:
                stream._push(("end",))
                self._forget(stream_id)
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            if stream is not None:
                stream._push(("reset", int(event.error_code or 0)))
                self._forget(stream_id)
        elif kind in (WindowUpdated, RemoteSettingsChanged):
            if kind is RemoteSettingsChanged and not self.ready.done():
                self.ready.set_result(None)
            self._wake()
        elif kind is ConnectionTerminated:
            assert isinstance(event, ConnectionTerminated)
            self.draining = True
            last = event.last_stream_id or 0
            for sid in [s for s in self.streams if s > last]:
                self.streams[sid]._push(
                    ("failed", UpstreamFailed("closed", "The service went away (GOAWAY)."))
                )
                self._forget(sid)
        elif kind is InformationalResponseReceived:
            pass  # 1xx from a gRPC service: nothing the client needs

    def _fail(self, failure: UpstreamFailed) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(failure)
            self.ready.exception()  # retrieved: the waiters read it from the future
        for stream in list(self.streams.values()):
            stream._push(("failed", failure))
        self.streams.clear()
        self._wake()
        self.owner._gone(self)
        if failure.kind == "not_h2":
            self.owner.report_not_h2(self.key)
        with contextlib.suppress(Exception):
            self.writer.close()

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.streams and not self.closed:
            self._arm_idle()
        if self.draining and not self.streams:
            self.close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.owner.settings.pool_idle_timeout, self._idle_end)

    def _idle_end(self) -> None:
        self._idle = None
        if not self.streams:
            self.close()

    # -- writing -------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def open(self, headers: Headers, end: bool) -> UpstreamStream:
        """Send a request head on a new stream (``TooManyStreamsError`` if full)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=end)
        stream = UpstreamStream(self, stream_id)
        stream.local_ended = end
        self.streams[stream_id] = stream
        self._flush()
        return stream

    async def send_data(self, stream: UpstreamStream, data: bytes, timeout: float) -> None:  # noqa: ASYNC109
        view = memoryview(data)
        while len(view):
            window = await self._window(stream, timeout)
            size = min(window, len(view), self.conn.max_outbound_frame_size)
            try:
                self.conn.send_data(stream.id, view[:size])
            except (StreamClosedError, H2Error):
                raise UpstreamFailed("closed", "The service ended the stream.") from None
            view = view[size:]
            self._flush()
            try:
                async with asyncio.timeout(timeout):
                    await self.writer.drain()
            except (ConnectionError, OSError, TimeoutError):
                raise UpstreamFailed("closed", "The connection to the agent broke.") from None

    async def _window(self, stream: UpstreamStream, timeout: float) -> int:  # noqa: ASYNC109
        deadline = self.loop.time() + timeout
        while True:
            if self.closed or stream.id not in self.streams:
                raise UpstreamFailed("closed", "The service ended the stream.")
            try:
                window = self.conn.local_flow_control_window(stream.id)
            except (StreamClosedError, H2Error):
                raise UpstreamFailed("closed", "The service ended the stream.") from None
            if window > 0:
                return window
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise UpstreamFailed("timeout", "The service stopped taking the request.")
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def end_stream(self, stream: UpstreamStream, trailers: Headers | None) -> None:
        with contextlib.suppress(H2Error):
            if trailers:
                self.conn.send_headers(stream.id, trailers, end_stream=True)
            else:
                self.conn.end_stream(stream.id)
        self._flush()

    def reset(self, stream: UpstreamStream, code: int) -> None:
        if stream.id in self.streams:
            with contextlib.suppress(H2Error):
                self.conn.reset_stream(stream.id, code)
            self._forget(stream.id)
            self._flush()

    def acknowledge(self, stream_id: int, amount: int) -> None:
        if amount and not self.closed:
            with contextlib.suppress(H2Error):
                self.conn.acknowledge_received_data(amount, stream_id)
            self._flush()

    def close(self) -> None:
        """Say GOAWAY and close (no stream left, or the gateway is stopping)."""
        if self.closed:
            return
        with contextlib.suppress(H2Error):
            self.conn.close_connection()
        self._flush()
        self.task.cancel()


class H2Upstreams:
    """The gateway's HTTP/2 connections to origins, per (agent, port, tunnel)."""

    def __init__(self, dialer: Dialer, settings: ProxySettings, metrics: Metrics) -> None:
        self.dialer = dialer
        self.settings = settings
        self.metrics = metrics
        self._connections: dict[tuple[str, int, str], list[AgentConnection]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._not_h2_logged: dict[str, float] = {}

    async def open(
        self,
        host: str,
        port: int,
        tunnel_id: str,
        pool_key: str,
        headers: Headers,
        end: bool,
    ) -> UpstreamStream:
        """A new stream carrying ``headers`` on a connection of this tunnel (dialled if
        none has room).  Dial errors propagate (``OSError``, ``TimeoutError``);
        ``UpstreamFailed`` when the origin does not speak HTTP/2."""
        key = (host, port, pool_key)
        timeout = self.settings.connect_timeout
        for conn in list(self._connections.get(key, ())):
            if not conn.ready.done() and not conn.closed:
                with contextlib.suppress(UpstreamFailed, TimeoutError):
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(conn.ready)
            if conn.has_room():
                with contextlib.suppress(TooManyStreamsError):
                    self.metrics.upstream_reused(1.0)
                    return conn.open(headers, end)
        connections = self._connections.setdefault(key, [])
        if len(connections) >= _MAX_CONNECTIONS_PER_KEY:
            raise UpstreamFailed("busy", "The service has too many streams in progress.")
        reader, writer = await self.dialer(host, port, timeout)
        if self.settings.tunnel_header:
            writer.write(h2_preamble(tunnel_id))
        conn = AgentConnection(self, key, reader, writer)
        self._connections.setdefault(key, []).append(conn)
        self.metrics.upstream_connections.inc(result="dialed")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(conn.ready)
        except TimeoutError:
            conn.close()
            raise UpstreamFailed(
                "timeout", f"The service did not start HTTP/2 within {timeout:g} seconds."
            ) from None
        return conn.open(headers, end)

    def _gone(self, conn: AgentConnection) -> None:
        connections = self._connections.get(conn.key)
        if connections is not None and conn in connections:
            connections.remove(conn)
            if not connections:
                del self._connections[conn.key]
        task = asyncio.ensure_future(close_writer(conn.writer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def report_not_h2(self, key: tuple[str, int, str]) -> None:
        """Log (at most once a minute per tunnel) an origin that is not HTTP/2."""
        tunnel = key[2].split(" ", 1)[0]
        now = asyncio.get_running_loop().time()
        if now - self._not_h2_logged.get(tunnel, -1e9) >= 60.0:
            if len(self._not_h2_logged) > 1024:
                self._not_h2_logged.clear()
            self._not_h2_logged[tunnel] = now
            log.warning(
                "a gRPC request's tunnel target does not speak HTTP/2 (502)",
                extra=kv(tunnel=tunnel[:64]),
            )

    async def close(self) -> None:
        connections = [c for cs in self._connections.values() for c in cs]
        for conn in connections:
            conn.close()
        tasks = [c.task for c in connections]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
