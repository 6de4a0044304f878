"""The public HTTP/1.1 reverse proxy: client connection -> Host route -> agent.

Theory of operation
-------------------
Each accepted client connection is one ``_ClientSession`` driving a server-role h11
state machine.  The session loops over requests (keep-alive):

1. **Read the request head** under two deadlines (slowloris protection): a fresh
   connection must deliver complete headers within ``header_timeout``; a keep-alive
   connection may idle up to ``idle_timeout`` for the first byte of its next request,
   then has ``header_timeout`` to finish the headers.  A partial head that misses its
   deadline gets 408; a silent idle connection is just closed.  h11 enforces the
   header byte limit (431) and rejects malformed or ambiguous framing (400, e.g.
   ``Content-Length`` together with ``Transfer-Encoding``: request smuggling).
2. **Admit**: connection limit, header count (431), rate limit (429 + Retry-After),
   method (``CONNECT`` 405), Host -> route (404 unknown, 503 disabled), declared body
   size (413).
3. **Forward**: take a keep-alive connection to ``agent_ip:upstream_port`` from the
   pool (dial errors -> 502), send the rewritten head (``headers.py``), and pump the
   request body in a task while the session waits for the agent's response head, so
   an agent may answer early and ``Expect: 100-continue`` works end to end: the agent's
   ``100 Continue`` is relayed to the client, which only then sends its body.  The
   response-head deadline (504) starts when the request is completely sent.
4. **Stream the response** through h11 (Content-Length kept, otherwise re-chunked),
   one read -> write -> drain at a time, so neither body is ever buffered whole and a
   slow reader back-pressures the agent.  An agent failure after the head was sent
   aborts the client connection (a truncated body must not look complete).
5. **Upgrade**: a ``101`` from the agent is relayed and the two streams are spliced
   with half-close (``splice.py``), bytes already buffered by either h11 included.
6. Return the agent connection to the pool if both h11 sides are ``DONE``; continue
   with the next client request if the client side is ``DONE`` too, else close
   (lingering briefly so an unread body does not turn our answer into a reset).

Every page the gateway writes itself comes from ``pages.py``.  No exception escapes a
session: unexpected ones are logged (without headers, which may carry credentials)
and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from . import pages
from .headers import (
    Headers,
    get_header,
    is_upgrade_request,
    request_headers_for_agent,
    response_headers_for_client,
)
from .limits import ConnectionLimiter, LimitSettings, RateLimiter
from .metrics import Metrics
from .pool import Dialer, UpstreamConnection, UpstreamPool, open_tcp
from .router import Route, Router, normalize_host
from .splice import CHUNK, close_writer, half_close, splice

log = logging.getLogger(__name__)

ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_LINGER_SECONDS = 1.0
_UNSAFE_REUSE_MAX_IDLE = 1.0
_LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Timeouts, pool size and limits of the HTTP proxy (seconds, bytes)."""

    #: port the agent accepts HTTP on (the agent routes by Host)
    upstream_port: int = 80
    #: dialling an agent (through WireGuard); exceeded -> 502 "agent unreachable"
    connect_timeout: float = 5.0
    #: from request fully sent to the agent's response head; exceeded -> 504
    response_header_timeout: float = 60.0
    #: longest silence while streaming a body in either direction
    body_idle_timeout: float = 60.0
    #: longest silence on an upgraded (WebSocket) connection in both directions
    tunnel_idle_timeout: float = 3600.0
    #: idle keep-alive connections kept per agent, and for how long
    pool_max_idle_per_agent: int = 8
    pool_idle_timeout: float = 4.0
    #: how long ``close()`` lets in-flight requests finish
    shutdown_timeout: float = 10.0
    limits: LimitSettings = field(default_factory=LimitSettings)


class _Abort(Exception):
    """Stop serving this client connection now (the reason is already handled)."""


class _ClientTimeout(Exception):
    pass


class _ClientProtocolError(Exception):
    pass


class _ClientGone(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


class _UpstreamFailed(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(slots=True)
class _Exchange:
    """Mutable bookkeeping of one request/response exchange."""

    route: Route
    upstream: UpstreamConnection
    plain: bool
    request_sent_at: float | None = None
    response_started: bool = False
    status: int = 0


class ProxyServer:
    """Public HTTP(S) listener(s) proxying by Host to agents (see module docstring)."""

    def __init__(
        self,
        router: Router,
        dialer: Dialer | None = None,
        settings: ProxySettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.router = router
        self.settings = settings if settings is not None else ProxySettings()
        self.metrics = metrics if metrics is not None else Metrics()
        limits = self.settings.limits
        self.pool = UpstreamPool(
            dialer if dialer is not None else open_tcp,
            max_idle_per_agent=self.settings.pool_max_idle_per_agent,
            idle_timeout=self.settings.pool_idle_timeout,
        )
        self.rate_limiter = RateLimiter(limits.rate, limits.burst, limits.max_tracked_clients)
        self.connection_limiter = ConnectionLimiter(
            limits.max_connections_per_client, limits.max_connections
        )
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[asyncio.Task[None], _ClientSession] = {}
        self.closing = False
        #: answers ACME HTTP-01 challenges: full request path -> key authorization
        self.challenge_responder: Callable[[str], str | None] | None = None
        #: on plain-HTTP listeners, send tunnel hosts to https:// (308) instead
        self.redirect_https = False
        self.redirect_https_port = 443

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> asyncio.Server:
        """Listen on ``host:port`` (TLS if ``ssl_context``); may be called per listener."""
        proto = "https" if ssl_context is not None else "http"

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(reader, writer, proto)

        tls_options: dict[str, Any] = {}
        if ssl_context is not None:
            # a client that never finishes its TLS handshake is a slowloris too
            tls_options["ssl_handshake_timeout"] = max(self.settings.limits.header_timeout, 1.0)
        server = await asyncio.start_server(
            on_connect,
            host,
            port,
            ssl=ssl_context,
            limit=CHUNK * 2,
            backlog=1024,
            **tls_options,
        )
        self._servers.append(server)
        return server

    @property
    def ports(self) -> list[int]:
        """The bound ports of all listeners (useful with port 0)."""
        return [int(s.getsockname()[1]) for srv in self._servers for s in srv.sockets]

    async def close(self) -> None:
        """Stop accepting, close idle connections, give in-flight ones a grace period."""
        self.closing = True
        for server in self._servers:
            server.close()
        for task, session in list(self._sessions.items()):
            if session.idle:
                task.cancel()
        tasks = list(self._sessions)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        await self.pool.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "0.0.0.0"
        admitted = self.connection_limiter.try_acquire(client_ip)
        session = _ClientSession(self, reader, writer, client_ip, proto, admitted)
        task = asyncio.current_task()
        assert task is not None
        self._sessions[task] = session
        self.metrics.connection_opened(proto)
        try:
            await session.run()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error serving a client connection")
        finally:
            self.metrics.connection_closed(proto)
            if admitted:
                self.connection_limiter.release(client_ip)
            self._sessions.pop(task, None)
            await close_writer(writer)


class _ClientSession:
    """One public client connection: a server-role h11 loop (see module docstring)."""

    def __init__(
        self,
        server: ProxyServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_ip: str,
        proto: str,
        admitted: bool,
    ) -> None:
        self.server = server
        self.settings = server.settings
        self.limits = server.settings.limits
        self.metrics = server.metrics
        self.reader = reader
        self.writer = writer
        self.client_ip = client_ip
        self.proto = proto
        self.admitted = admitted
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )
        self.loop = asyncio.get_running_loop()
        self.idle = True

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        with contextlib.suppress(_Abort):
            await self._run()

    async def _run(self) -> None:
        first = True
        while True:
            self.idle = True
            request = await self._read_request_head(first)
            self.idle = False
            first = False
            if request is None:
                return
            await self._handle(request)
            if self.server.closing:
                return
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
                continue
            if self.conn.their_state is h11.SEND_BODY:
                await self._linger()
            return

    async def _read_request_head(self, first: bool) -> h11.Request | None:
        now = self.loop.time()
        header_deadline: float | None = None
        if first or self.conn.trailing_data[0]:
            header_deadline = now + self.limits.header_timeout
        idle_deadline = now + self.limits.idle_timeout
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431:
                    self.metrics.rejected.inc(reason="header_too_large")
                    reason = "The request headers are too large."
                else:
                    self.metrics.rejected.inc(reason="malformed")
                    reason = "The request could not be parsed as HTTP/1.1."
                await self._send_page(status, reason, close=True)
                await self._linger()
                return None
            if event is h11.NEED_DATA:
                deadline = header_deadline if header_deadline is not None else idle_deadline
                remaining = deadline - self.loop.time()
                data: bytes | None = None
                if remaining > 0:
                    try:
                        data = await asyncio.wait_for(self.reader.read(CHUNK), remaining)
                    except TimeoutError:
                        data = None
                    except (ConnectionError, OSError):
                        return None
                if data is None:
                    if header_deadline is None:
                        return None  # quiet keep-alive connection: just close
                    self.metrics.rejected.inc(reason="header_timeout")
                    await self._send_page(
                        408, "The request headers did not arrive in time.", close=True
                    )
                    return None
                if data and header_deadline is None:
                    header_deadline = self.loop.time() + self.limits.header_timeout
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed (or PAUSED, which cannot happen here)

    # -- one request -----------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> None:
        started = self.loop.time()
        headers: Headers = list(request.headers)
        plain = pages.wants_plain(get_header(headers, b"accept"))

        if not self.admitted:
            self.metrics.rejected.inc(reason="connections_per_client")
            await self._send_page(
                429,
                "Too many concurrent connections from your address.",
                plain=plain,
                close=True,
                extra=[(b"retry-after", b"1")],
            )
            raise _Abort
        if len(headers) > self.limits.max_header_count:
            self.metrics.rejected.inc(reason="header_count")
            await self._send_page(431, "Too many request header fields.", plain=plain, close=True)
            raise _Abort
        # h11 only bounds an *incomplete* head; a complete one read in one go is
        # measured here (request line + fields, as they were on the wire, roughly)
        head_size = len(request.method) + len(request.target) + 12
        head_size += sum(len(k) + len(v) + 4 for k, v in headers)
        if head_size > self.limits.max_header_bytes:
            self.metrics.rejected.inc(reason="header_too_large")
            await self._send_page(
                431, "The request headers are too large.", plain=plain, close=True
            )
            raise _Abort
        if request.method == b"CONNECT":
            await self._send_page(405, "CONNECT is not supported.", plain=plain, close=True)
            raise _Abort

        chunked = get_header(headers, b"transfer-encoding") is not None
        length_value = get_header(headers, b"content-length")
        if chunked and length_value is not None:
            # RFC 9112 §6.3: ambiguous framing is how requests get smuggled; refuse it
            self.metrics.rejected.inc(reason="malformed")
            await self._send_page(
                400,
                "Both Content-Length and Transfer-Encoding were sent.",
                plain=plain,
                close=True,
            )
            raise _Abort

        target = request.target
        host_value = get_header(headers, b"host")
        if not target.startswith(b"/") and target != b"*":
            # absolute-form (RFC 9112 §3.2.2): the target's authority wins over Host
            parts = urlsplit(target.decode("ascii", "replace"))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                await self._send_page(400, "Bad request target.", plain=plain, close=True)
                raise _Abort
            host_value = parts.netloc.rpartition("@")[2].encode()  # drop any userinfo
            target = (parts.path or "/").encode() + (
                b"?" + parts.query.encode() if parts.query else b""
            )
            headers = [(k, v) for k, v in headers if k != b"host"] + [(b"host", host_value)]
        if not host_value:
            await self._send_page(400, "The request has no Host header.", plain=plain, close=True)
            raise _Abort
        host = host_value.decode("latin-1")
        if await self._answer_acme_challenge(request.method, target):
            return
        decision = self.server.rate_limiter.check(self.client_ip, started)
        if not decision.allowed:
            self.metrics.rejected.inc(reason="rate_limit")
            await self._send_page(
                429,
                "Too many requests from your address; slow down.",
                plain=plain,
                extra=[(b"retry-after", str(decision.retry_after).encode())],
            )
            return
        route = self.server.router.lookup_host(host)
        if route is None:
            await self._send_page(
                404, f"No tunnel is configured for the host {host[:255]!s}.", plain=plain
            )
            return
        if not route.enabled:
            await self._send_page(
                503, f"The tunnel for {route.domain} is disabled.", plain=plain, route=route
            )
            return
        if self.proto == "http" and self.server.redirect_https:
            await self._redirect_to_https(host, target, route)
            return

        length = int(length_value) if length_value is not None else 0
        max_body = self.limits.max_body_bytes
        if max_body is not None and length > max_body:
            self.metrics.rejected.inc(reason="body_too_large")
            await self._send_page(
                413,
                "The request body is larger than allowed.",
                plain=plain,
                route=route,
                close=True,
            )
            raise _Abort
        has_body = chunked or length > 0
        upgrade = is_upgrade_request(headers)
        forwarded = request_headers_for_agent(
            headers, client_ip=self.client_ip, proto=self.proto, chunked=chunked, upgrade=upgrade
        )
        try:
            upstream_request = h11.Request(method=request.method, target=target, headers=forwarded)
        except h11.LocalProtocolError:
            await self._send_page(400, "Bad request target.", plain=plain, route=route, close=True)
            raise _Abort from None
        retry_allowed = not has_body and request.method in _IDEMPOTENT
        await self._forward(upstream_request, route, plain, has_body, retry_allowed, started)

    async def _forward(
        self,
        upstream_request: h11.Request,
        route: Route,
        plain: bool,
        has_body: bool,
        retry_allowed: bool,
        started: float,
    ) -> None:
        port = self.settings.upstream_port
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
                )
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
            exchange = _Exchange(route, upstream, plain)
            try:
                await self._exchange(exchange, upstream_request, has_body, started)
                return
            except _UpstreamFailed as failure:
                self.server.pool.discard(upstream)
                if (
                    failure.kind == "closed"
                    and upstream.reused
                    and retry_allowed
                    and not exchange.response_started
                ):
                    fresh = True
                    continue  # a stale keep-alive connection: retry once on a new one
                self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=failure.kind)
                if exchange.response_started:
                    raise _Abort from None
                status = 504 if failure.kind == "timeout" else 502
                await self._send_page(
                    status, failure.reason, plain=plain, route=route, started=started
                )
                return
            except BaseException:
                self.server.pool.discard(upstream)
                raise

    async def _exchange(
        self, ex: _Exchange, upstream_request: h11.Request, has_body: bool, started: float
    ) -> None:
        upstream = ex.upstream
        try:
            upstream.writer.write(upstream.conn.send(upstream_request) or b"")
        except h11.LocalProtocolError:
            raise _UpstreamFailed("protocol", "The request could not be forwarded.") from None
        pump: asyncio.Task[None] | None = None
        if has_body:
            pump = asyncio.ensure_future(self._pump_request_body(ex))
        else:
            try:
                await self._pump_request_body(ex)
            except _ClientProtocolError:
                await self._send_page(400, "Malformed request.", plain=ex.plain, close=True)
                raise _Abort from None
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
                raise _ClientProtocolError from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await asyncio.wait_for(self.reader.read(CHUNK), idle)
            except TimeoutError:
                raise _ClientTimeout from None
            except (ConnectionError, OSError):
                raise _ClientGone from None
            self.conn.receive_data(data)

    async def _pump_request_body(self, ex: _Exchange) -> None:
        upstream = ex.upstream
        if self.conn.their_state is not h11.SEND_BODY:
            # the body was already consumed (a retry on a fresh agent connection)
            upstream.writer.write(upstream.conn.send(h11.EndOfMessage()) or b"")
            ex.request_sent_at = self.loop.time()
            return
        try:
            await self._pump_body_events(ex)
        except (_BodyTooLarge, _ClientTimeout, _ClientProtocolError, _ClientGone):
            if ex.response_started:
                # the agent would wait forever for the rest: reset it, which also
                # ends the response we are relaying (the client sees the abort)
                abort = getattr(upstream.writer.transport, "abort", None)
                if abort is not None:
                    abort()
            raise

    async def _pump_body_events(self, ex: _Exchange) -> None:
        upstream = ex.upstream
        received = 0
        max_body = self.limits.max_body_bytes
        timeout = self.settings.body_idle_timeout
        while True:
            event = await self._next_client_event(timeout)
            if isinstance(event, h11.Data):
                received += len(event.data)
                if max_body is not None and received > max_body:
                    raise _BodyTooLarge
                self.metrics.request_bytes.inc(len(event.data), tunnel=ex.route.tunnel_id)
                payload = upstream.conn.send(h11.Data(data=event.data)) or b""
            elif isinstance(event, h11.EndOfMessage):
                payload = upstream.conn.send(h11.EndOfMessage()) or b""
            else:
                raise _ClientGone
            try:
                upstream.writer.write(payload)
                await asyncio.wait_for(upstream.writer.drain(), timeout)
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
                raise _UpstreamFailed(
                    "closed", "The agent closed the connection or sent an invalid response."
                ) from None
            if event is h11.NEED_DATA:
                try:
                    data = await upstream.reader.read(CHUNK)
                except (ConnectionError, OSError):
                    raise _UpstreamFailed("closed", "The connection to the agent broke.") from None
                upstream.conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise _UpstreamFailed(
                    "closed", "The agent closed the connection without answering."
                )
            return event  # type: ignore[return-value]

    async def _await_response_head(
        self, ex: _Exchange, pump: asyncio.Task[None] | None
    ) -> h11.Response | h11.InformationalResponse:
        timeout = self.settings.response_header_timeout
        while True:
            read = asyncio.ensure_future(self._next_upstream_event(ex.upstream))
            try:
                while pump is not None and not pump.done() and not read.done():
                    await asyncio.wait({read, pump}, return_when=asyncio.FIRST_COMPLETED)
                if pump is not None and pump.done() and not read.done():
                    await self._pump_outcome(ex, pump)
                if not read.done():
                    sent = ex.request_sent_at or self.loop.time()
                    remaining = sent + timeout - self.loop.time()
                    if remaining > 0:
                        await asyncio.wait({read}, timeout=remaining)
                    if not read.done():
                        raise _UpstreamFailed(
                            "timeout", f"The agent did not answer within {timeout:g} seconds."
                        )
                event = read.result()
            finally:
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(BaseException):
                        await read
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    return event
                await self._relay_informational(event)
                continue
            raise _UpstreamFailed("protocol", "The agent sent an unexpected message.")

    async def _pump_outcome(self, ex: _Exchange, pump: asyncio.Task[None]) -> None:
        """Turn a finished request-body pump's failure into the right client answer."""
        exc = pump.exception()
        if exc is None:
            return
        if isinstance(exc, _BodyTooLarge):
            self.metrics.rejected.inc(reason="body_too_large")
            await self._send_page(
                413,
                "The request body is larger than allowed.",
                plain=ex.plain,
                route=ex.route,
                close=True,
            )
        elif isinstance(exc, _ClientTimeout):
            self.metrics.rejected.inc(reason="body_timeout")
            await self._send_page(
                408,
                "The request body did not arrive in time.",
                plain=ex.plain,
                route=ex.route,
                close=True,
            )
        elif isinstance(exc, _ClientProtocolError):
            await self._send_page(
                400, "The request body is malformed.", plain=ex.plain, route=ex.route, close=True
            )
        self.server.pool.discard(ex.upstream)
        raise _Abort from None

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

    async def _stream_response(self, ex: _Exchange, head: h11.Response, started: float) -> None:
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
            raise _UpstreamFailed("protocol", "The agent sent an invalid response.") from None
        ex.response_started = True
        ex.status = head.status_code
        tunnel = ex.route.tunnel_id
        try:
            await self._write(data or b"")
            timeout = self.settings.body_idle_timeout
            while True:
                try:
                    event = await asyncio.wait_for(self._next_upstream_event(ex.upstream), timeout)
                except TimeoutError:
                    raise _UpstreamFailed("timeout", "The agent stalled mid-response.") from None
                try:
                    if isinstance(event, h11.Data):
                        self.metrics.response_bytes.inc(len(event.data), tunnel=tunnel)
                        out = self.conn.send(h11.Data(data=event.data)) or b""
                    elif isinstance(event, h11.EndOfMessage):
                        out = self.conn.send(h11.EndOfMessage()) or b""
                    else:
                        raise _UpstreamFailed("protocol", "The agent sent an unexpected message.")
                except h11.LocalProtocolError:
                    raise _UpstreamFailed(
                        "protocol", "The agent's body did not match its framing."
                    ) from None
                await self._write(out)
                if isinstance(event, h11.EndOfMessage):
                    break
        finally:
            self.metrics.request_done(
                tunnel, ex.route.domain, ex.status, self.loop.time() - started
            )

    async def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.settings.body_idle_timeout)
        except (ConnectionError, OSError, TimeoutError):
            raise _Abort from None

    # -- upgrade (WebSocket) ---------------------------------------------------------

    async def _upgrade(
        self, ex: _Exchange, head: h11.InformationalResponse, started: float
    ) -> None:
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
            raise _UpstreamFailed(
                "protocol", "The agent switched protocols unexpectedly."
            ) from None
        ex.response_started = True
        ex.status = 101
        self.metrics.request_done(route.tunnel_id, route.domain, 101, self.loop.time() - started)
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
        raise _Abort

    # -- answers the gateway gives itself -----------------------------------------------

    async def _answer_acme_challenge(self, method: bytes, target: bytes) -> bool:
        """Serve an ACME HTTP-01 key authorization (RFC 8555 §8.3) if we hold one."""
        responder = self.server.challenge_responder
        if responder is None or method not in (b"GET", b"HEAD"):
            return False
        path = target.split(b"?", 1)[0]
        if not path.startswith(ACME_CHALLENGE_PREFIX):
            return False
        try:
            answer = responder(path.decode("ascii"))
        except Exception:
            log.exception("ACME challenge responder failed")
            answer = None
        if answer is None:
            await self._send_page(404, "Unknown ACME challenge token.", plain=True)
            return True
        body = answer.encode()
        await self._send_simple(200, body, b"text/plain", body_allowed=method != b"HEAD")
        self.metrics.request_done("", "", 200, None)
        return True

    async def _redirect_to_https(self, host: str, target: bytes, route: Route) -> None:
        name = normalize_host(host) or route.domain
        if ":" in name:
            name = f"[{name}]"
        port = self.server.redirect_https_port
        authority = name if port == 443 else f"{name}:{port}"
        location = f"https://{authority}".encode() + (target if target.startswith(b"/") else b"/")
        self.metrics.request_done(route.tunnel_id, route.domain, 308, None)
        page = pages.render(308, "This site is served over HTTPS.", plain=True)
        await self._send_simple(
            308, page.body, b"text/plain; charset=utf-8", extra=[(b"location", location)]
        )

    async def _send_simple(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        *,
        extra: list[tuple[bytes, bytes]] | None = None,
        body_allowed: bool = True,
    ) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _Abort
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"server", pages.SERVER_NAME),
            *(extra or []),
        ]
        if self.server.closing:
            headers.append((b"connection", b"close"))
        try:
            data = self.conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if body_allowed and body:
                data += self.conn.send(h11.Data(data=body)) or b""
            data += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            raise _Abort from None
        await self._write(data)

    # -- gateway pages ---------------------------------------------------------------

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
        tunnel = route.tunnel_id if route is not None else ""
        domain = route.domain if route is not None else ""
        elapsed = self.loop.time() - started if started is not None else None
        self.metrics.request_done(tunnel, domain, status, elapsed)
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _Abort
        extra_headers = list(extra or [])
        if close or self.server.closing:
            extra_headers.append((b"connection", b"close"))
        page = pages.render(status, reason, plain=plain, extra_headers=extra_headers)
        try:
            head = h11.Response(status_code=page.status, headers=page.headers, reason=page.reason)
            data = self.conn.send(head)
            data = (data or b"") + (self.conn.send(h11.Data(data=page.body)) or b"")
            data += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            raise _Abort from None
        await self._write(data)

    async def _linger(self) -> None:
        """Half-close and discard what the client still sends, briefly, before closing.

        Closing with unread data makes the kernel send a reset, which can destroy the
        error page we just wrote before the client reads it.
        """
        half_close(self.writer)
        deadline = self.loop.time() + _LINGER_SECONDS
        drained = 0
        with contextlib.suppress(Exception):
            while drained < _LINGER_BYTES:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    break
                data = await asyncio.wait_for(self.reader.read(CHUNK), remaining)
                if not data:
                    break
                drained += len(data)
