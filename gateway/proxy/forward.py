"""Forwarding one admitted request to its agent and relaying the answer.

Theory of operation
-------------------
``ForwardingMixin`` is the agent-facing half of a client session (``http.py`` holds the
client-facing half: reading heads, admission, the gateway's own pages).

1. **Connect**: take a keep-alive connection of this tunnel to
   ``agent_ip:upstream_port`` from the pool (``pool.py``); a new one starts with a
   PROXY v2 header naming the tunnel (``common.relay.proxyproto``), after which
   the agent splices the connection to the tunnel's target.  Dial errors become 502
   ("refused" / "unreachable"); so does a connection the agent resets before any
   response byte, which is how it says the local service refused or is unreachable.  A request
   that cannot be replayed only takes a connection used within the last second; an
   idempotent bodiless one that meets a connection the agent just closed is retried
   once on a fresh connection.
2. **Send**: the rewritten head (``headers.py``, serialised by ``h1.request_head``)
   is written, and the connection's ``h1.ResponseReader`` is told what it answers
   (HEAD: no body; an upgrade request: a 101 may come).  The body is pumped in a task
   while the session waits for the response head, so an agent may answer early (413,
   401, a streaming echo) and ``Expect: 100-continue`` works end to end: the agent's
   ``100 Continue`` is relayed and only then does the client send its body.  A
   ``Content-Length`` body goes on as the bytes read; a chunked one is decoded and
   re-chunked, one chunk per read (extensions and trailers dropped).  Requests
   without a body skip the task.  The response-head deadline (504) starts once the
   request is fully sent.
3. **Relay**: the response head is re-framed for the client by ``h1.frame_response``
   (``Content-Length`` kept, otherwise chunked, or close-delimited for HTTP/1.0;
   chunked wins over ``Content-Length``).  Bytes the agent already sent are gathered
   and written before the next read, at most ``CHUNK`` at a time with a bounded
   drain, so nothing is buffered whole and a slow client back-pressures the agent.
   A failure after the head was sent aborts the client connection: a truncated body
   must never look complete.  If the client's body fails mid-way (too large,
   stalled) after the response started, the agent connection is reset so neither
   side waits forever.
4. **Upgrade**: a ``101`` is relayed and the streams are spliced with half-close
   (``splice.py``), including bytes either reader had already buffered.
5. The agent connection returns to the pool only if the request went out whole and
   the response ended cleanly with keep-alive (``UpstreamConnection.reusable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.relay import proxyproto
from common.relay.limits import LimitSettings
from common.relay.metrics import Metrics
from common.relay.router import Route, another_replica
from common.relay.splice import CHUNK, drain, splice

from . import h1
from .headers import response_headers_for_client
from .pool import PoolBusy, UpstreamConnection
from .settings import ProxySettings

if TYPE_CHECKING:
    from .http import ProxyServer

_UNSAFE_REUSE_MAX_IDLE = 1.0


@functools.lru_cache(maxsize=4096)
def tunnel_preamble(tunnel_id: str) -> bytes:
    """The PROXY v2 header a new connection of this tunnel starts with (built once)."""
    return proxyproto.encode(tunnel_id=tunnel_id)


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
class ForwardPlan:
    """An admitted request, ready to go to its agent (built by ``http._admit``)."""

    #: the rewritten request head, as it goes on the wire
    head: bytes
    method: bytes
    upgrade: bool
    route: Route
    plain: bool
    has_body: bool
    #: replaying it on a fresh connection is safe (idempotent and bodiless)
    retry_allowed: bool
    started: float


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
    requests: h1.RequestReader
    request: h1.RequestHead | None
    response_started: bool
    response_done: bool
    keep_alive: bool
    loop: asyncio.AbstractEventLoop
    #: request body bytes read from the client for the current request (access log)
    body_in: int
    #: the agent address the access log names
    _upstream: str
    #: a sticky-replica cookie the response sets (``edge.replica_for``)
    _set_cookie: tuple[bytes, bytes] | None
    client_ip: str

    @property
    def reader(self) -> asyncio.StreamReader:
        raise NotImplementedError

    @property
    def writer(self) -> asyncio.StreamWriter:
        raise NotImplementedError

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

    async def _forward(self, plan: ForwardPlan, *, fresh: bool = False) -> None:
        """Send an admitted request to its agent and relay the answer (``fresh``: not
        on a pooled connection, as when the fast path met a stale one).

        A replica (issue 17) that fails is reported to its tunnel's balancer; the
        request then goes once to another replica if it can be replayed (idempotent
        and bodiless), or whatever it is if the failure was the dial (nothing was
        sent).  A stale pooled connection is retried once on a fresh one as before."""
        head, method, upgrade, route = plan.head, plan.method, plan.upgrade, plan.route
        plain, has_body, started = plan.plain, plan.has_body, plan.started
        retry_allowed = plan.retry_allowed
        port = route.upstream_port or self.settings.upstream_port
        preamble = tunnel_preamble(route.tunnel_id) if self.settings.tunnel_header else b""
        moved = stale_retried = False
        for _attempt in range(4):
            replica = route.replica
            if fresh and replica is not None and not moved and not replica.usable(self.loop.time()):
                # it went away meanwhile (its agent offline: abort_agent ended the
                # connection this request was waiting on)
                other = another_replica(route, self.loop.time(), self.client_ip)
                if other is not None:
                    route, moved, fresh = other, True, False
                    replica = route.replica
                    self._moved(route, "replica_unavailable")
            try:
                upstream = await self.server.pool.acquire(
                    route.upstream_host,
                    port,
                    self.settings.connect_timeout,
                    fresh=fresh,
                    # a request we cannot replay only takes a recently used connection:
                    # the older one is, the likelier the agent is closing it right now
                    max_idle_age=None if retry_allowed else _UNSAFE_REUSE_MAX_IDLE,
                    # a changed target must not be reached through connections the
                    # agent spliced to the old one: they stay in their own pool slot
                    tunnel=route.pool_key,
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
                if replica is not None:
                    self._replica_failed(route, kind)
                    # nothing was sent: any request may go to another replica
                    other = None if moved else self._retry_route(route)
                    if other is not None:
                        route, moved, fresh = other, True, False
                        continue
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
                await self._exchange(exchange, head, method, upgrade, has_body, started)
                if replica is not None and replica.backoff:
                    replica.balance.succeeded(replica)
                return
            except UpstreamFailed as failure:
                self.server.pool.discard(upstream)
                if (
                    failure.kind == "closed"
                    and upstream.reused
                    and retry_allowed
                    and not exchange.response_started
                    and not stale_retried
                ):
                    fresh = stale_retried = True
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
                if replica is not None and failure.kind != "timeout":
                    if not upstream.reused:
                        self._replica_failed(route, failure.kind)
                    other = None if moved or not retry_allowed else self._retry_route(route)
                    if other is not None:
                        route, moved, fresh = other, True, False
                        continue
                status = 504 if failure.kind == "timeout" else 502
                await self._send_page(
                    status, failure.reason, plain=plain, route=route, started=started
                )
                return
            except BaseException:
                self.server.pool.discard(upstream)
                raise

    def _replica_failed(self, route: Route, kind: str) -> None:
        """Passive check: a replica failed a dial or reset before answering."""
        replica = route.replica
        if replica is not None and replica.balance.failed(replica, self.loop.time(), kind):
            self.metrics.replica_ejections.inc(tunnel=route.tunnel_id, agent=replica.agent_id)

    def _retry_route(self, route: Route) -> Route | None:
        """Another replica for a request that failed on ``route``'s (None: none)."""
        other = another_replica(route, self.loop.time(), self.client_ip)
        if other is not None:
            self._moved(other, "replica_failed")
        return other

    def _moved(self, route: Route, reason: str) -> None:
        self.metrics.replica_retries.inc(tunnel=route.tunnel_id, reason=reason)
        self._upstream = route.upstream_host

    async def _exchange(
        self,
        ex: Exchange,
        head: bytes,
        method: bytes,
        upgrade: bool,
        has_body: bool,
        started: float,
    ) -> None:
        upstream = ex.upstream
        upstream.begin(method, upgrade=upgrade)
        upstream.writer.write(head)
        pump: asyncio.Task[None] | None = None
        if has_body:
            pump = asyncio.ensure_future(self._pump_request_body(ex))
        else:
            self._request_sent(ex)
        try:
            response = await self._await_response_head(ex, pump)
            if response.status == 101:
                await self._upgrade(ex, response, started)
                return
            await self._stream_response(ex, response, started)
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

    def _request_sent(self, ex: Exchange) -> None:
        ex.request_sent_at = self.loop.time()
        ex.upstream.request_done = True

    # -- request body: client -> agent -----------------------------------------------

    async def _pump_request_body(self, ex: Exchange) -> None:
        try:
            await self._pump_body(ex)
        except (BodyTooLarge, ClientTimeout, ClientProtocolError, ClientGone):
            if ex.response_started:
                # the agent would wait forever for the rest: reset it, which also
                # ends the response we are relaying (the client sees the abort)
                abort = getattr(ex.upstream.writer.transport, "abort", None)
                if abort is not None:
                    abort()
            raise

    async def _pump_body(self, ex: Exchange) -> None:
        requests = self.requests
        writer = ex.upstream.writer
        chunked = requests.framing == h1.CHUNKED
        received = 0
        max_body = self.limits.max_body_bytes
        timeout = self.settings.body_idle_timeout
        tunnel = ex.route.tunnel_id
        while True:
            try:
                data = requests.body()
            except h1.ProtocolError:
                raise ClientProtocolError from None
            done = requests.state != h1.BODY
            if data:
                received += len(data)
                self.body_in += len(data)
                if max_body is not None and received > max_body:
                    raise BodyTooLarge
                self.metrics.request_bytes.inc(len(data), tunnel=tunnel)
                if chunked:
                    data = h1.encode_chunk(data)
            if done and chunked:
                data += h1.LAST_CHUNK
            if data:
                try:
                    writer.write(data)
                    await drain(writer, timeout)
                except (ConnectionError, OSError, TimeoutError):
                    # the agent stopped reading (it may have answered early, e.g. 413):
                    # stop sending and let the response side report what it said
                    return
            if done:
                self._request_sent(ex)
                return
            try:
                async with asyncio.timeout(timeout):
                    more = await self.reader.read(CHUNK)
            except TimeoutError:
                raise ClientTimeout from None
            except (ConnectionError, OSError):
                raise ClientGone from None
            if not more:
                try:
                    requests.eof()  # in the middle of the body: always an error
                except h1.ProtocolError:
                    raise ClientProtocolError from None
            requests.receive(more)

    # -- response head ---------------------------------------------------------------

    async def _await_response_head(
        self, ex: Exchange, pump: asyncio.Task[None] | None
    ) -> h1.ResponseHead:
        timeout = self.settings.response_header_timeout
        while True:
            if pump is None or pump.done():
                head = await self._response_head(ex, pump, timeout)
            else:
                head = await self._response_head_with_pump(ex, pump, timeout)
            if head.status >= 200 or head.status == 101:
                return head
            await self._relay_informational(head)

    def _timeout_failure(self, timeout: float) -> UpstreamFailed:
        return UpstreamFailed("timeout", f"The agent did not answer within {timeout:g} seconds.")

    async def _response_head(
        self, ex: Exchange, pump: asyncio.Task[None] | None, limit: float
    ) -> h1.ResponseHead:
        """The request is completely sent (or its pump ended): wait with the deadline."""
        if pump is not None:
            await self._pump_outcome(ex, pump)
        sent = ex.request_sent_at or self.loop.time()
        try:
            async with asyncio.timeout_at(sent + limit):
                return await next_response_head(ex.upstream)
        except TimeoutError:
            raise self._timeout_failure(limit) from None

    async def _response_head_with_pump(
        self, ex: Exchange, pump: asyncio.Task[None], limit: float
    ) -> h1.ResponseHead:
        """The body is still flowing: the agent may answer before it ends (early 413,
        100 Continue, a streaming echo), so wait for whichever comes first."""
        read = asyncio.ensure_future(next_response_head(ex.upstream))
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

    def _informational_head(self, head: h1.ResponseHead) -> bytes:
        """A 1xx as relayed to the client (nothing for an HTTP/1.0 one, RFC 9110 §15.2)."""
        request = self.request
        if request is None or request.version != b"1.1":
            return b""
        headers = response_headers_for_client(head.headers)
        return h1.response_head(head.status, head.reason, headers)

    async def _relay_informational(self, head: h1.ResponseHead) -> None:
        data = self._informational_head(head)
        if data:
            await self._write(data)

    # -- response body: agent -> client ----------------------------------------------

    def _final_head(self, head: h1.ResponseHead) -> tuple[bytes, int]:
        """The final response head as the client gets it, and the client-side framing
        of its body (``h1.frame_response``); the response has started from here on."""
        request = self.request
        assert request is not None
        raw = head.raw
        if (
            raw is not None
            and self.keep_alive
            and request.version == b"1.1"
            and request.method != b"HEAD"
            and not self.server.closing
            and self._set_cookie is None
        ):
            # a plain HTTP/1.1 head (h1.scan_response) to a client that keeps the
            # connection: it goes as it arrived when its framing stays the same
            framing = h1.verbatim_framing(head)
            if framing is not None:
                self.response_started = True
                return raw, framing
        headers = response_headers_for_client(head.headers)
        if self._set_cookie is not None:
            headers.append(self._set_cookie)
        if head.chunked:
            # chunked wins over Content-Length (RFC 9112 §6.3); the body is re-framed
            headers = [(k, v) for k, v in headers if k != b"content-length"]
        data, framing, self.keep_alive = h1.frame_response(
            head.status,
            head.reason,
            headers,
            content_length=head.content_length is not None,
            head_request=request.method == b"HEAD",
            http10=request.version == b"1.0",
            keep_alive=self.keep_alive and not self.server.closing,
        )
        self.response_started = True
        return data, framing

    async def _stream_response(self, ex: Exchange, head: h1.ResponseHead, started: float) -> None:
        data, framing = self._final_head(head)
        ex.response_started = True
        ex.status = head.status
        tunnel = ex.route.tunnel_id
        upstream = ex.upstream
        responses = upstream.responses
        chunked = framing == h1.CHUNKED
        # Output is gathered while the agent's bytes are already here and written
        # before waiting for more: a small response leaves in one send, a large one
        # in CHUNK-sized writes with back-pressure.
        out = [data]
        timeout = self.settings.body_idle_timeout
        try:
            while True:
                try:
                    body = responses.body()
                except h1.ProtocolError:
                    raise UpstreamFailed("closed", "The agent broke off its response.") from None
                if body:
                    self.metrics.response_bytes.inc(len(body), tunnel=tunnel)
                    out.append(h1.encode_chunk(body) if chunked else body)
                if responses.state != h1.BODY:
                    if chunked:
                        out.append(h1.LAST_CHUNK)
                    if out:
                        await self._write(b"".join(out))
                    break
                if out:
                    await self._write(out[0] if len(out) == 1 else b"".join(out))
                    out = []
                try:
                    async with asyncio.timeout(timeout):
                        received = await upstream.reader.read(CHUNK)
                except TimeoutError:
                    raise UpstreamFailed("timeout", "The agent stalled mid-response.") from None
                except (ConnectionError, OSError):
                    raise UpstreamFailed("closed", "The connection to the agent broke.") from None
                if received:
                    responses.receive(received)
                    continue
                try:
                    responses.eof()  # the end of a close-delimited body, or a cut
                except h1.ProtocolError:
                    raise UpstreamFailed("closed", "The agent broke off its response.") from None
        finally:
            self._record(tunnel, ex.route.domain, ex.status, self.loop.time() - started)
        self.response_done = True

    # -- upgrade (WebSocket) ---------------------------------------------------------

    async def _upgrade(self, ex: Exchange, head: h1.ResponseHead, started: float) -> None:
        route = ex.route
        headers = response_headers_for_client(head.headers, upgrade=True)
        ex.response_started = self.response_started = True
        ex.status = 101
        self._record(route.tunnel_id, route.domain, 101, self.loop.time() - started)
        await self._write(h1.response_head(101, head.reason, headers))
        client_pending = self.requests.trailing()
        agent_pending = ex.upstream.responses.trailing()
        tunnel = route.tunnel_id
        self.metrics.connection_opened("websocket")
        try:
            await splice(
                self.reader,
                self.writer,
                ex.upstream.reader,
                ex.upstream.writer,
                idle_timeout=self.settings.tunnel_idle_timeout,
                a_to_b_prefix=client_pending,
                b_to_a_prefix=agent_pending,
                on_a_to_b=lambda n: self.metrics.request_bytes.inc(n, tunnel=tunnel),
                on_b_to_a=lambda n: self.metrics.response_bytes.inc(n, tunnel=tunnel),
            )
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self.metrics.connection_closed("websocket")
            self.server.pool.discard(ex.upstream)
        raise Abort


async def next_response_head(upstream: UpstreamConnection) -> h1.ResponseHead:
    """The agent's next response head on ``upstream`` (HTTP/1.1, for either edge)."""
    responses = upstream.responses
    while True:
        try:
            head = responses.next_head()
        except h1.ProtocolError:
            raise UpstreamFailed(
                "closed", "The agent closed the connection or sent an invalid response."
            ) from None
        if head is not None:
            return head
        try:
            data = await upstream.reader.read(CHUNK)
        except (ConnectionError, OSError):
            raise UpstreamFailed("closed", "The connection to the agent broke.") from None
        if not data:
            raise UpstreamFailed("closed", "The agent closed the connection without answering.")
        responses.receive(data)
