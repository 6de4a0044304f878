"""Forwarding one admitted request to its agent and relaying the answer.

Theory of operation
-------------------
``ForwardingMixin`` is the agent-facing half of a client session (``http.py`` holds the
client-facing half: reading heads, admission, the gateway's own pages).

1. **Connect**: take a keep-alive connection of this tunnel to
   ``agent_ip:upstream_port`` from the pool (``pool.py``); a new one starts with a
   PROXY v2 header naming the tunnel (``kakuremichi.relay.proxyproto``), after which
   the agent splices the connection to the tunnel's target.  Dial errors become 502
   ("refused" / "unreachable"); so does a connection the agent resets before any
   response byte, which is how it says the local service refused or is unreachable.  A request
   that cannot be replayed only takes a connection used within the last second; an
   idempotent bodiless one that meets a connection the agent just closed is retried
   once on a fresh connection.
2. **Send**: the rewritten head (``headers.py``) goes out through a client-role h11
   machine; the body is pumped in a task while the session waits for the response
   head, so an agent may answer early (413, 401, a streaming echo) and
   ``Expect: 100-continue`` works end to end: the agent's ``100 Continue`` is relayed
   and only then does the client send its body.  Requests without a body skip the
   task.  The response-head deadline (504) starts once the request is fully sent.
3. **Relay**: the response streams through both h11 machines (``Content-Length``
   kept, otherwise re-chunked; trailers dropped).  Bytes the agent already sent are
   gathered and written before the next read, at most ``CHUNK`` at a time with a
   bounded drain, so nothing is buffered whole and a slow client back-pressures the
   agent.  A failure after the head was sent aborts the client connection: a
   truncated body must never look complete.  If the client's body fails mid-way
   (too large, stalled) after the response started, the agent connection is reset so
   neither side waits forever.
4. **Upgrade**: a ``101`` is relayed and the streams are spliced with half-close
   (``splice.py``), including bytes either h11 machine had already buffered.
5. The agent connection returns to the pool only if both its h11 sides are ``DONE``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

from kakuremichi.relay import proxyproto
from kakuremichi.relay.limits import LimitSettings
from kakuremichi.relay.metrics import Metrics
from kakuremichi.relay.router import Route
from kakuremichi.relay.splice import CHUNK, drain, splice

from .headers import get_header, response_headers_for_client
from .pool import PoolBusy, UpstreamConnection
from .settings import ProxySettings

if TYPE_CHECKING:
    from .http import ProxyServer

_UNSAFE_REUSE_MAX_IDLE = 1.0


class Abort(Exception):
    """Stop serving this client connection now (the reason is already handled)."""


class ClientTimeout(Exception):
    """The client stopped sending its request body."""


class ClientProtocolError(Exception):
    """The client's request body framing is malformed."""


class ClientGone(Exception):
    """The client closed or reset its connection."""


class BodyTooLarge(Exception):
    """The request body exceeded ``max_body_bytes``."""


class UpstreamFailed(Exception):
    """Reaching or reading from the agent failed; ``kind`` names how (metrics label)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(slots=True)
class Exchange:
    """Mutable bookkeeping of one request/response exchange."""

    route: Route
    upstream: UpstreamConnection
    plain: bool
    request_sent_at: float | None = None
    response_started: bool = False
    status: int = 0


class ForwardingMixin:
    """The agent-facing half of ``http._ClientSession`` (see the module docstring)."""

    server: ProxyServer
    settings: ProxySettings
    limits: LimitSettings
    metrics: Metrics
    conn: h11.Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    loop: asyncio.AbstractEventLoop

    async def _send_page(
        self,
        status: int,
        reason: str,
        *,
        plain: bool = False,
        close: bool = False,
        route: Route | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        started: float | None = None,
    ) -> None:
        raise NotImplementedError

    async def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _record(self, tunnel: str, domain: str, status: int, elapsed: float | None) -> None:
        raise NotImplementedError

    async def _forward(
        self,
        upstream_request: h11.Request,
        route: Route,
        plain: bool,
        has_body: bool,
        retry_allowed: bool,
        started: float,
    ) -> None:
        port = route.upstream_port or self.settings.upstream_port
        preamble = (
            proxyproto.encode(tunnel_id=route.tunnel_id) if self.settings.tunnel_header else b""
        )
        fresh = False
        for _attempt in range(2):
            try:
                upstream = await self.server.pool.acquire(
                    route.agent_ip,
                    port,
                    self.settings.connect_timeout,
                    fresh=fresh,
                    # a request we cannot replay only takes a recently used connection:
                    # the older one is, the likelier the agent is closing it right now
                    max_idle_age=None if retry_allowed else _UNSAFE_REUSE_MAX_IDLE,
                    tunnel=route.tunnel_id,
                    preamble=preamble,
                )
            except PoolBusy:
                self.metrics.rejected.inc(reason="agent_busy")
                await self._send_page(
                    503,
                    "The agent for this tunnel has too many requests in progress.",
                    plain=plain,
                    route=route,
                    started=started,
                    extra=[(b"retry-after", b"1")],
                )
                return
            except (TimeoutError, OSError) as exc:
                refused = isinstance(exc, ConnectionRefusedError)
                kind = "refused" if refused else "unreachable"
                self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=kind)
                reason = (
                    "The agent refused the connection."
                    if refused
                    else "The agent for this tunnel is unreachable."
                )
                await self._send_page(502, reason, plain=plain, route=route, started=started)
                return
            self.metrics.upstream_connections.inc(result="reused" if upstream.reused else "dialed")
            exchange = Exchange(route, upstream, plain)
            try:
                await self._exchange(exchange, upstream_request, has_body, started)
                return
            except UpstreamFailed as failure:
                self.server.pool.discard(upstream)
                if (
                    failure.kind == "closed"
                    and upstream.reused
                    and retry_allowed
                    and not exchange.response_started
                ):
                    fresh = True
                    continue  # a stale keep-alive connection: retry once on a new one
                if exchange.response_started:
                    self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=failure.kind)
                    raise Abort from None
                if failure.kind == "closed" and not upstream.reused and preamble:
                    # a new tunnel connection ended before any answer: the agent
                    # resets it when the tunnel's local service cannot be reached
                    failure = UpstreamFailed(
                        "target",
                        "The local service refused the connection or is unreachable "
                        "(reported by the agent).",
                    )
                self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=failure.kind)
                status = 504 if failure.kind == "timeout" else 502
                await self._send_page(
                    status, failure.reason, plain=plain, route=route, started=started
                )
                return
            except BaseException:
                self.server.pool.discard(upstream)
                raise

    async def _exchange(
        self, ex: Exchange, upstream_request: h11.Request, has_body: bool, started: float
    ) -> None:
        upstream = ex.upstream
        try:
            upstream.writer.write(upstream.conn.send(upstream_request) or b"")
        except h11.LocalProtocolError:
            raise UpstreamFailed("protocol", "The request could not be forwarded.") from None
        pump: asyncio.Task[None] | None = None
        if has_body:
            pump = asyncio.ensure_future(self._pump_request_body(ex))
        else:
            try:
                await self._pump_request_body(ex)
            except ClientProtocolError:
                await self._send_page(400, "Malformed request.", plain=ex.plain, close=True)
                raise Abort from None
        try:
            head = await self._await_response_head(ex, pump)
            if isinstance(head, h11.InformationalResponse):  # 101 Switching Protocols
                await self._upgrade(ex, head, started)
                return
            await self._stream_response(ex, head, started)
            if pump is not None and not pump.done():
                pump.cancel()
            if upstream.reusable() and not self.server.closing:
                self.server.pool.release(upstream)
            else:
                self.server.pool.discard(upstream)
        finally:
            if pump is not None:
                if not pump.done():
                    pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump  # also marks a stored exception as retrieved

    # -- request body: client -> agent -----------------------------------------------

    async def _next_client_event(self, idle: float) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                raise ClientProtocolError from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                async with asyncio.timeout(idle):
                    data = await self.reader.read(CHUNK)
            except TimeoutError:
                raise ClientTimeout from None
            except (ConnectionError, OSError):
                raise ClientGone from None
            self.conn.receive_data(data)

    async def _pump_request_body(self, ex: Exchange) -> None:
        upstream = ex.upstream
        if self.conn.their_state is not h11.SEND_BODY:
            # the body was already consumed (a retry on a fresh agent connection)
            upstream.writer.write(upstream.conn.send(h11.EndOfMessage()) or b"")
            ex.request_sent_at = self.loop.time()
            return
        try:
            await self._pump_body_events(ex)
        except (BodyTooLarge, ClientTimeout, ClientProtocolError, ClientGone):
            if ex.response_started:
                # the agent would wait forever for the rest: reset it, which also
                # ends the response we are relaying (the client sees the abort)
                abort = getattr(upstream.writer.transport, "abort", None)
                if abort is not None:
                    abort()
            raise

    async def _pump_body_events(self, ex: Exchange) -> None:
        upstream = ex.upstream
        received = 0
        max_body = self.limits.max_body_bytes
        timeout = self.settings.body_idle_timeout
        while True:
            event = await self._next_client_event(timeout)
            try:
                if isinstance(event, h11.Data):
                    received += len(event.data)
                    if max_body is not None and received > max_body:
                        raise BodyTooLarge
                    self.metrics.request_bytes.inc(len(event.data), tunnel=ex.route.tunnel_id)
                    payload = upstream.conn.send(h11.Data(data=event.data)) or b""
                elif isinstance(event, h11.EndOfMessage):
                    payload = upstream.conn.send(h11.EndOfMessage()) or b""
                else:
                    raise ClientGone
            except h11.LocalProtocolError:
                # the body does not fit the framing we announced to the agent
                raise UpstreamFailed(
                    "protocol", "The request body could not be forwarded."
                ) from None
            try:
                if payload:
                    upstream.writer.write(payload)
                    await drain(upstream.writer, timeout)
            except (ConnectionError, OSError, TimeoutError):
                # the agent stopped reading (it may have answered early, e.g. 413):
                # stop sending and let the response side report what it said
                return
            if isinstance(event, h11.EndOfMessage):
                ex.request_sent_at = self.loop.time()
                return

    # -- response head ---------------------------------------------------------------

    async def _next_upstream_event(self, upstream: UpstreamConnection) -> h11.Event:
        while True:
            try:
                event = upstream.conn.next_event()
            except h11.RemoteProtocolError:
                raise UpstreamFailed(
                    "closed", "The agent closed the connection or sent an invalid response."
                ) from None
            if event is h11.NEED_DATA:
                try:
                    data = await upstream.reader.read(CHUNK)
                except (ConnectionError, OSError):
                    raise UpstreamFailed("closed", "The connection to the agent broke.") from None
                upstream.conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamFailed("closed", "The agent closed the connection without answering.")
            return event  # type: ignore[return-value]

    async def _await_response_head(
        self, ex: Exchange, pump: asyncio.Task[None] | None
    ) -> h11.Response | h11.InformationalResponse:
        timeout = self.settings.response_header_timeout
        while True:
            if pump is None or pump.done():
                event = await self._response_head_event(ex, pump, timeout)
            else:
                event = await self._response_head_event_with_pump(ex, pump, timeout)
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    return event
                await self._relay_informational(event)
                continue
            raise UpstreamFailed("protocol", "The agent sent an unexpected message.")

    def _timeout_failure(self, timeout: float) -> UpstreamFailed:
        return UpstreamFailed("timeout", f"The agent did not answer within {timeout:g} seconds.")

    async def _response_head_event(
        self, ex: Exchange, pump: asyncio.Task[None] | None, limit: float
    ) -> h11.Event:
        """The request is completely sent (or its pump ended): wait with the deadline."""
        if pump is not None:
            await self._pump_outcome(ex, pump)
        sent = ex.request_sent_at or self.loop.time()
        try:
            async with asyncio.timeout_at(sent + limit):
                return await self._next_upstream_event(ex.upstream)
        except TimeoutError:
            raise self._timeout_failure(limit) from None

    async def _response_head_event_with_pump(
        self, ex: Exchange, pump: asyncio.Task[None], limit: float
    ) -> h11.Event:
        """The body is still flowing: the agent may answer before it ends (early 413,
        100 Continue, a streaming echo), so wait for whichever comes first."""
        read = asyncio.ensure_future(self._next_upstream_event(ex.upstream))
        try:
            while not pump.done() and not read.done():
                await asyncio.wait({read, pump}, return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                return read.result()
            await self._pump_outcome(ex, pump)
            sent = ex.request_sent_at or self.loop.time()
            remaining = sent + limit - self.loop.time()
            if remaining > 0:
                await asyncio.wait({read}, timeout=remaining)
            if not read.done():
                raise self._timeout_failure(limit)
            return read.result()
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read

    async def _pump_outcome(self, ex: Exchange, pump: asyncio.Task[None]) -> None:
        """Turn a finished request-body pump's failure into the right client answer."""
        exc = pump.exception()
        if exc is None:
            return
        if isinstance(exc, BodyTooLarge):
            self.metrics.rejected.inc(reason="body_too_large")
            await self._send_page(
                413,
                "The request body is larger than allowed.",
                plain=ex.plain,
                route=ex.route,
                close=True,
            )
        elif isinstance(exc, ClientTimeout):
            self.metrics.rejected.inc(reason="body_timeout")
            await self._send_page(
                408,
                "The request body did not arrive in time.",
                plain=ex.plain,
                route=ex.route,
                close=True,
            )
        elif isinstance(exc, ClientProtocolError):
            await self._send_page(
                400, "The request body is malformed.", plain=ex.plain, route=ex.route, close=True
            )
        elif isinstance(exc, UpstreamFailed):
            raise exc  # answered as 502 by _forward
        elif not isinstance(exc, ClientGone):
            raise exc  # a bug: let the session log it
        self.server.pool.discard(ex.upstream)
        raise Abort from None

    async def _relay_informational(self, event: h11.InformationalResponse) -> None:
        if self.conn.their_http_version != b"1.1":
            return  # 1xx must not be sent to HTTP/1.0 clients (RFC 9110 §15.2)
        with contextlib.suppress(h11.LocalProtocolError):
            info = h11.InformationalResponse(
                status_code=event.status_code,
                headers=response_headers_for_client(list(event.headers)),
                reason=event.reason,
            )
            await self._write(self.conn.send(info))

    # -- response body: agent -> client ----------------------------------------------

    async def _stream_response(self, ex: Exchange, head: h11.Response, started: float) -> None:
        upstream_headers = list(head.headers)
        headers = response_headers_for_client(upstream_headers)
        if get_header(upstream_headers, b"transfer-encoding") is not None:
            # chunked wins over Content-Length (RFC 9112 §6.3); h11 re-frames it
            headers = [(k, v) for k, v in headers if k != b"content-length"]
        if self.server.closing:
            headers.append((b"connection", b"close"))
        try:
            response = h11.Response(
                status_code=head.status_code, headers=headers, reason=head.reason
            )
            data = self.conn.send(response)
        except h11.LocalProtocolError:
            raise UpstreamFailed("protocol", "The agent sent an invalid response.") from None
        ex.response_started = True
        ex.status = head.status_code
        tunnel = ex.route.tunnel_id
        upstream = ex.upstream
        # Output is gathered while the agent's bytes are already here and written
        # before waiting for more: a small response leaves in one send, a large one
        # in CHUNK-sized writes with back-pressure.
        out = [data or b""]
        pending = len(out[0])
        timeout = self.settings.body_idle_timeout
        try:
            while True:
                try:
                    event = upstream.conn.next_event()
                except h11.RemoteProtocolError:
                    raise UpstreamFailed("closed", "The agent broke off its response.") from None
                if event is h11.NEED_DATA:
                    if pending:
                        await self._write(b"".join(out))
                        out, pending = [], 0
                    try:
                        async with asyncio.timeout(timeout):
                            received = await upstream.reader.read(CHUNK)
                    except TimeoutError:
                        raise UpstreamFailed("timeout", "The agent stalled mid-response.") from None
                    except (ConnectionError, OSError):
                        raise UpstreamFailed(
                            "closed", "The connection to the agent broke."
                        ) from None
                    upstream.conn.receive_data(received)
                    continue
                try:
                    if isinstance(event, h11.Data):
                        self.metrics.response_bytes.inc(len(event.data), tunnel=tunnel)
                        chunk = self.conn.send(h11.Data(data=event.data)) or b""
                    elif isinstance(event, h11.EndOfMessage):
                        chunk = self.conn.send(h11.EndOfMessage()) or b""
                    else:
                        raise UpstreamFailed("protocol", "The agent sent an unexpected message.")
                except h11.LocalProtocolError:
                    raise UpstreamFailed(
                        "protocol", "The agent's body did not match its framing."
                    ) from None
                out.append(chunk)
                pending += len(chunk)
                if isinstance(event, h11.EndOfMessage):
                    await self._write(b"".join(out))
                    break
                if pending >= CHUNK:
                    await self._write(b"".join(out))
                    out, pending = [], 0
        finally:
            self._record(tunnel, ex.route.domain, ex.status, self.loop.time() - started)

    # -- upgrade (WebSocket) ---------------------------------------------------------

    async def _upgrade(self, ex: Exchange, head: h11.InformationalResponse, started: float) -> None:
        route = ex.route
        try:
            data = self.conn.send(
                h11.InformationalResponse(
                    status_code=101,
                    headers=response_headers_for_client(list(head.headers), upgrade=True),
                    reason=head.reason,
                )
            )
        except h11.LocalProtocolError:
            raise UpstreamFailed("protocol", "The agent switched protocols unexpectedly.") from None
        ex.response_started = True
        ex.status = 101
        self._record(route.tunnel_id, route.domain, 101, self.loop.time() - started)
        await self._write(data or b"")
        client_pending, _ = self.conn.trailing_data
        agent_pending, _ = ex.upstream.conn.trailing_data
        tunnel = route.tunnel_id
        self.metrics.connection_opened("websocket")
        try:
            await splice(
                self.reader,
                self.writer,
                ex.upstream.reader,
                ex.upstream.writer,
                idle_timeout=self.settings.tunnel_idle_timeout,
                a_to_b_prefix=bytes(client_pending),
                b_to_a_prefix=bytes(agent_pending),
                on_a_to_b=lambda n: self.metrics.request_bytes.inc(n, tunnel=tunnel),
                on_b_to_a=lambda n: self.metrics.response_bytes.inc(n, tunnel=tunnel),
            )
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self.metrics.connection_closed("websocket")
            self.server.pool.discard(ex.upstream)
        raise Abort
