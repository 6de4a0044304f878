"""The public HTTP/1.1 reverse proxy: client connection -> Host route -> agent.

Theory of operation
-------------------
Each accepted client connection is one ``_ClientSession``, an ``asyncio.Protocol``
reading requests with an ``h1.RequestReader`` (llhttp parses the heads, ``h1/``).  The
session is a small state machine (``mode``) over a keep-alive connection:

1. **Heads** (``_HEAD``) are read in the transport's callback under one deadline per
   connection (slowloris protection): a fresh connection must deliver complete
   headers within ``header_timeout``; a keep-alive connection may idle up to
   ``idle_timeout`` for the first byte of its next request, then has
   ``header_timeout`` to finish the headers.  A partial head that misses its deadline
   gets 408; a silent idle connection is just closed.  The reader rejects malformed
   heads (400; 501 for an unknown method or transfer coding, 505 for a version other
   than HTTP/1.x), heads that grow past ``max_header_bytes`` while incomplete (431),
   and, being the place where message framing is decided, the smuggling shapes:
   ``Content-Length`` together with ``Transfer-Encoding``, two ``Content-Length`` or
   ``Host`` fields, obs-fold, bare CR or LF (all 400).
2. **Admit** (``_admit``, synchronous), cheapest and least trusting first: per-client
   connection limit (429), header count and size (431), ``CONNECT`` (405), Host (400
   if missing: only an HTTP/1.0 request gets this far without one; an absolute-form
   target's authority wins), ACME HTTP-01 challenges (answered here, before rate
   limits and routing, RFC 8555 §8.3), rate limit (429 + ``Retry-After``), route (404
   unknown host, 503 disabled tunnel), optional HTTP -> HTTPS redirect (308), the
   tunnel's access policy (``gateway/access``: IP rules 403, sign-in 401 or a 302 to
   the gateway's sign-in page, whose ``/.kakuremichi/`` pages, and basic-auth
   credentials not verified yet, take the coroutine path: argon2 runs in a thread),
   declared body size (413).  Every such answer is written at once, from the callback.
3. **Forward** an admitted request one of two ways:

   * the **fast path** (``_FAST``, this module), for what most requests are: no body,
     no upgrade, a method that may be replayed, and an idle pooled agent connection
     of the tunnel at hand.  The request head is written to that connection and its
     ``Tap`` (``pool.py``) hands the agent's bytes straight to this session, which
     relays the response as it arrives (``h1.frame_response``; 1xx relayed too) and
     back-pressures the agent (``pause_reading``) while the client's transport is
     paused.  No task, future or timer per request: the connection's one deadline
     covers the response head (504) and a stalled body (abort).  If the pooled
     connection turns out dead before any response byte, the request goes to the
     coroutine path on a fresh connection (replaying it is safe);
   * the **coroutine path** (``_SLOW``, ``forward.py``) for everything else: request
     bodies (pumped with ``Expect: 100-continue``), WebSocket upgrades, requests that
     must not be replayed, and the first request of a tunnel, which dials.  A task
     serves the one request over a ``StreamReader``/``StreamWriter`` pair made for the
     connection the first time it is needed; the session returns to reading heads in
     the callback afterwards.
4. Continue with the next request if the request was read to its end, the response
   was sent whole and neither side asked to close, else close (lingering briefly so
   an unread request body does not turn our answer into a reset: ``_LINGER``).  A
   response to HEAD never carries a body, not even the gateway's own pages.  A client
   that stops reading stops being read (``pause_writing`` pauses reading it), so
   nothing it asks for piles up.  ``close()`` stops the listeners, ends idle
   keep-alive connections at once and gives in-flight ones ``shutdown_timeout``
   seconds.

Every page the gateway writes itself comes from ``pages.py``.  No exception escapes a
session: unexpected ones are logged (without headers, which may carry credentials)
and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from common.logs import kv
from common.protocol import AccessPolicy
from common.relay.accesslog import AccessLog
from common.relay.limits import ConnectionLimiter, RateLimiter
from common.relay.metrics import Metrics
from common.relay.router import Route, Router, normalize_host
from common.relay.splice import CHUNK, drain
from gateway.access import endpoints as access_endpoints
from gateway.access.oidc import OidcClients
from gateway.access.policy import (
    ALLOW,
    ENDPOINT,
    VERIFY,
    AccessControl,
    Outcome,
    basic_user,
)

from . import h1, pages
from .edge import (
    AccessMemo,
    ClientSession,
    Refusal,
    access_for,
    access_refusal,
    replica_for,
    route_for,
    sticky_cookie,
)
from .forward import Abort, ForwardingMixin, ForwardPlan
from .h2stream import negotiated_h2, take_over
from .h2upstream import H2Upstreams
from .headers import (
    PROTO_FIELD,
    Headers,
    client_address,
    forwarding_fields,
    get_header,
    is_trusted_proxy,
    is_upgrade_request,
    parse_networks,
    request_headers_for_agent,
    without_own_cookies,
)
from .pool import Dialer, UpstreamConnection, UpstreamPool, open_tcp
from .settings import ProxySettings

if TYPE_CHECKING:
    from gateway.wgstream import StreamAcceptor

__all__ = ["ProxyServer", "ProxySettings"]

log = logging.getLogger(__name__)

ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024
#: pipelined bytes buffered while a fast exchange runs before the client is paused
_MAX_PIPELINED = 256 * 1024

# -- session modes
_HEAD = 0  # reading the next request head in the transport's callback
_FAST = 1  # a fast-path exchange is in flight
_SLOW = 2  # a task serves the current request (forward.py)
_LINGER = 3  # answered and half-closed; discarding what the client still sends
_CLOSED = 4

#: ``_admit`` answered the request itself: go on per keep-alive rules / close now
_ANSWERED = 0
_CLOSE = 1


@dataclass(slots=True)
class AccessPlan:
    """A request the gateway answers itself for its access policy (a sign-in page) or
    lets through only after verifying basic-auth credentials (``_access``)."""

    kind: int  # policy.ENDPOINT or policy.VERIFY
    policy: AccessPolicy
    route: Route
    plain: bool
    started: float


def _authority(host: bytes | None, domain: str) -> str:
    """The Host a client reached a tunnel at, for URLs back to it: the tunnel's domain
    with the port the client used (anything else in Host: just the domain)."""
    if host:
        text = host.decode("latin-1").strip().lower().rstrip(".")
        name, sep, port = text.rpartition(":")
        if (
            sep
            and name.rstrip(".") == domain
            and port.isascii()
            and port.isdigit()
            and len(port) <= 5
        ):
            return f"{domain}:{port}"
    return domain


def _ignore(amount: float) -> None:
    pass


def _now() -> float:
    """The loop's clock (the balancer's), or the monotonic clock outside a loop."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


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
        self.trusted_proxies = parse_networks(self.settings.trusted_proxies)
        self.pool = UpstreamPool(
            dialer if dialer is not None else open_tcp,
            max_idle_per_agent=self.settings.pool_max_idle_per_agent,
            idle_timeout=self.settings.pool_idle_timeout,
            max_active_per_agent=self.settings.max_active_per_agent,
        )
        self.rate_limiter = RateLimiter(limits.rate, limits.burst, limits.max_tracked_clients)
        #: the tunnels' access policies (``gateway/access/``), set from Control's config
        self.access_log = AccessLog(self.settings.access_log)
        self.access = AccessControl()
        self.access.oidc = OidcClients(self.access, verify=self.settings.oidc_ca_file or True)
        self.endpoints = access_endpoints.Endpoints(self.access)
        self.connection_limiter = ConnectionLimiter(
            limits.max_connections_per_client, limits.max_connections
        )
        self._servers: list[asyncio.Server] = []
        self._sessions: set[ClientSession] = set()
        #: HTTP/2 connections to origins, for gRPC (``h2upstream.py``)
        self.h2_upstreams = H2Upstreams(self.pool.dialer, self.settings, self.metrics)
        self.closing = False
        #: exchanges relayed by the fast path (module docstring, step 3)
        self.fast_exchanges = 0
        #: answers ACME HTTP-01 challenges: full request path -> key authorization
        self.challenge_responder: Callable[[str], str | None] | None = None
        #: on plain-HTTP listeners, send tunnel hosts to https:// (308) instead
        self.redirect_https = False
        self.redirect_https_port = 443
        #: takes over requests for the WireGuard stream path (``gateway/wgstream.py``)
        self.stream_acceptor: StreamAcceptor | None = None
        # replicated tunnels (issue 17): least connections counts this pool's requests
        # in flight, an agent Control reports offline has its waiting requests ended
        # (retried elsewhere), and /metrics shows every replica's state
        router.balancer.set_extra_load(self._agent_load)
        router.add_listener(self._replicas_changed)
        self.metrics.watch_replicas(lambda: router.balancer.states(_now()))

    def _agent_load(self, host: str) -> int:
        return self.pool.active_count(host, self.settings.upstream_port)

    def _replicas_changed(self) -> None:
        for replica in self.router.balancer.went_offline:
            ended = self.pool.abort_agent(replica.host)
            log.warning(
                "replica offline (its agent left Control): tunnel %s, agent %s; %d waiting "
                "or idle connections to it ended",
                replica.balance.tunnel_id[:64],
                replica.agent_id[:64],
                ended,
            )

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> asyncio.Server:
        """Listen on ``host:port`` (TLS if ``ssl_context``); may be called per listener."""
        proto = "https" if ssl_context is not None else "http"
        tls_options: dict[str, Any] = {}
        if ssl_context is not None:
            # a client that never finishes its TLS handshake is a slowloris too
            tls_options["ssl_handshake_timeout"] = max(self.settings.limits.header_timeout, 1.0)
        loop = asyncio.get_running_loop()
        self.access_log.start()
        server = await loop.create_server(
            lambda: _ClientSession(self, proto),
            host,
            port,
            ssl=ssl_context,
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
        sessions = list(self._sessions)
        for session in sessions:
            session.shutdown()
        waits = [s.closed for s in sessions if not s.closed.done()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.settings.shutdown_timeout)
            if pending:
                for session in sessions:
                    session.abort()
                await asyncio.wait(pending, timeout=1.0)
        tasks = [s.task for s in sessions if s.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        await self.pool.close()
        await self.h2_upstreams.close()
        await self.access_log.close()
        if self.access.oidc is not None:
            await self.access.oidc.close()


class _StreamReader(asyncio.StreamReader):
    """The coroutine path's reader; what it did not consume goes back to the session."""

    def take(self) -> bytes:
        data = bytes(self._buffer)  # type: ignore[attr-defined]
        self._buffer.clear()  # type: ignore[attr-defined]
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return data


class _ClientSession(asyncio.Protocol, ForwardingMixin):
    """One public client connection: requests read, admitted, forwarded (module docstring)."""

    def __init__(self, server: ProxyServer, proto: str) -> None:
        self.server = server
        self.settings = server.settings
        self.limits = server.settings.limits
        self.metrics = server.metrics
        self.proto = proto
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "0.0.0.0"
        #: the client as far as we can tell (see ``headers.client_address``), per request
        self.client_ip = self.peer_ip
        self.exempt = False
        self.admitted = False
        #: (method, host, path) of the request in progress, for the access log
        self.current: tuple[str, str, str] = ("", "", "")
        self.requests = h1.RequestReader(self.limits.max_header_bytes)
        #: the request being answered (None while reading the next head)
        self.request: h1.RequestHead | None = None
        #: a final response (or a page) was started for it / was sent whole
        self.response_started = False
        self.response_done = False
        #: the connection may carry another request after this one
        self.keep_alive = True
        self.mode = _HEAD
        #: resolved once the connection is gone
        self.closed: asyncio.Future[None] = self.loop.create_future()
        #: the coroutine path's task (``_SLOW``) and streams (made on first use)
        self.task: asyncio.Task[None] | None = None
        self._inner: asyncio.StreamReaderProtocol | None = None
        self._reader: _StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # the one deadline of the connection (see _on_timer); the timer may fire early
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: _HEAD: the deadline is the header deadline (else the idle one)
        self._header_due = True
        self._client_eof = False
        self._write_paused = False
        self._read_paused = False
        self._lingered = 0
        # the fast path's exchange
        self._up: UpstreamConnection | None = None
        self._plan: ForwardPlan | None = None
        self._up_paused = False
        self._sent_at = 0.0
        self._active_at = 0.0
        self._status = 0
        self._framing = h1.NO_BODY
        self._response_bytes: Callable[[float], None] = _ignore
        self._forwarding_fields: bytes | None = None
        #: the connection's last sign-in answer (``edge.AccessMemo``) and Cookie edit
        self._access_memo = AccessMemo()
        self._cookie_edit: tuple[bytes, bytes, bytes] | None = None
        #: the last head it was cut from, and the result
        self._cookie_raw: tuple[bytes, bytes] | None = None
        # the access log's view of the current request (``_admit``, ``_record``)
        self._decision = "allow"
        self._user = ""
        self._sent = 0
        self._upstream = ""
        self.body_in = 0
        #: the response sets this sticky-replica cookie (``edge.replica_for``)
        self._set_cookie: tuple[bytes, bytes] | None = None

    # -- the coroutine path's streams ----------------------------------------------

    @property
    def reader(self) -> asyncio.StreamReader:
        self._streams()
        assert self._reader is not None
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        self._streams()
        assert self._writer is not None
        return self._writer

    def _streams(self) -> None:
        if self._inner is not None:
            return
        transport = self.transport
        assert transport is not None
        reader = _StreamReader(limit=CHUNK * 2, loop=self.loop)
        inner = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        inner.connection_made(transport)
        if self._write_paused:
            inner.pause_writing()
        if self._client_eof:
            reader.feed_eof()
        self._inner, self._reader = inner, reader
        self._writer = asyncio.StreamWriter(transport, inner, reader, self.loop)

    # -- transport callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        if self.proto == "https" and negotiated_h2(transport):
            take_over(server, transport, self.proto)  # HTTP/2 (h2session.py) from here
            return
        peer = transport.get_extra_info("peername")
        self.peer_ip = self.client_ip = (
            str(peer[0]) if isinstance(peer, tuple) and peer else "0.0.0.0"
        )
        # a trusted load balancer speaks for many clients: only the total applies
        self.exempt = is_trusted_proxy(self.peer_ip, server.trusted_proxies)
        self.admitted = server.connection_limiter.try_acquire(self.peer_ip, exempt=self.exempt)
        server._sessions.add(self)
        self.metrics.connection_opened(self.proto)
        self._arm(self.loop.time() + self.limits.header_timeout)
        if server.closing:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        mode = self.mode
        self.mode = _CLOSED
        if self._inner is not None:
            self._inner.connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if mode == _FAST:
            self._fast_abandon()
        if self.admitted:
            self.admitted = False
            self.server.connection_limiter.release(self.peer_ip, exempt=self.exempt)
        self.metrics.connection_closed(self.proto)
        self.server._sessions.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == _HEAD:
            self.requests.receive(data)
            self._heads()
        elif mode == _FAST:
            self.requests.receive(data)  # pipelined: read after this exchange
            if self.requests.buffered > _MAX_PIPELINED:
                self._pause_reading()
        elif mode == _SLOW:
            assert self._inner is not None
            self._inner.data_received(data)
        elif mode == _LINGER:
            self._lingered += len(data)
            if self._lingered >= _LINGER_BYTES:
                self._close()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._inner is not None:
            self._inner.eof_received()
        if self.mode == _HEAD:
            self._heads()
        elif self.mode == _LINGER:
            self._close()
        return True  # half-open: an answer may still be on its way

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._inner is not None:
            self._inner.pause_writing()
        if self.mode == _FAST:
            self._pause_upstream()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._inner is not None:
            self._inner.resume_writing()
        mode = self.mode
        if mode == _FAST:
            self._active_at = self.loop.time()
            self._resume_upstream()
        elif mode == _HEAD and self._read_paused:
            self._resume_reading()
            self._heads()

    # -- the connection's one deadline -----------------------------------------------

    def _arm(self, deadline: float) -> None:
        """Make ``deadline`` the connection's; a timer set earlier only re-arms."""
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        mode = self.mode
        if mode in (_SLOW, _CLOSED):
            return  # the task keeps its own deadlines; leaving _SLOW arms again
        now = self.loop.time()
        if mode == _FAST:
            if self.response_started:
                deadline = self._active_at + self.settings.body_idle_timeout
            else:
                deadline = self._sent_at + self.settings.response_header_timeout
        else:
            deadline = self._deadline
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        if mode == _FAST:
            if self.response_started:
                self._fast_failed("timeout", "The agent stalled mid-response.")
            else:
                limit = self.settings.response_header_timeout
                self._fast_failed("timeout", f"The agent did not answer within {limit:g} seconds.")
        elif mode == _HEAD:
            if self._header_due:
                self.metrics.rejected.inc(reason="header_timeout")
                self._page_now(408, "The request headers did not arrive in time.", close=True)
            self._close()
        else:
            self._close()  # _LINGER

    # -- reading heads ---------------------------------------------------------------

    def _heads(self) -> None:
        """Take requests from what arrived while in ``_HEAD`` (several if pipelined)."""
        requests = self.requests
        while self.mode == _HEAD:
            if self._write_paused:
                self._pause_reading()  # the client does not read our answers: wait
                return
            try:
                head = requests.next_head() if requests.buffered else None
            except h1.ProtocolError as exc:
                too_large = exc.status == 431
                self.metrics.rejected.inc(reason="header_too_large" if too_large else "malformed")
                self._page_now(exc.status, exc.reason, close=True)
                self._linger()
                return
            if head is None:
                if self._client_eof:
                    try:
                        requests.eof()
                    except h1.ProtocolError:  # half a head, then EOF
                        self.metrics.rejected.inc(reason="malformed")
                        self._page_now(400, "The request was cut off.", close=True)
                    self._close()
                elif requests.buffered and not self._header_due:
                    self._header_due = True  # a new head started: it has header_timeout
                    self._arm(self.loop.time() + self.limits.header_timeout)
                if self._read_paused:
                    self._resume_reading()
                return
            self._header_due = False
            self.request = head
            self.keep_alive = head.keep_alive
            self.response_started = self.response_done = False
            try:
                outcome = self._admit(head)
                if isinstance(outcome, ForwardPlan):
                    self._dispatch(outcome)
                elif isinstance(outcome, AccessPlan):
                    self._go_access(outcome)
                elif outcome == _CLOSE:
                    # the rest of the request may still be on its way: closing now
                    # would answer it with a reset that can destroy the page
                    if requests.state == h1.BODY or requests.buffered:
                        self._linger()
                    else:
                        self._close()
                else:
                    self._request_finished()
            except Exception:
                log.exception("unexpected error serving a client connection")
                self.abort()
                return

    def _request_finished(self) -> None:
        """The response went out (``_HEAD`` again): next request, linger or close."""
        self.mode = _HEAD
        if self.server.closing:
            self._close()
        elif self.response_done and self.keep_alive and self.requests.state == h1.DONE:
            self.request = None
            self.response_started = self.response_done = False
            self._header_due = bool(self.requests.buffered)
            limit = self.limits.header_timeout if self._header_due else self.limits.idle_timeout
            self._arm(self.loop.time() + limit)
        elif self.requests.state == h1.BODY:
            self._linger()
        else:
            self._close()

    # -- admission (synchronous) -----------------------------------------------------

    def _admit(self, request: h1.RequestHead) -> ForwardPlan | AccessPlan | int:
        """Check a request head (module docstring, step 2): a plan to forward it, or
        ``_ANSWERED`` / ``_CLOSE`` once the answer was written here."""
        started = self.loop.time()
        # the access log's view of this request (``_record``)
        self._decision = "allow"
        self._user = ""
        self._sent = 0
        self._upstream = ""
        self._set_cookie = None
        headers: Headers = request.headers
        plain = pages.wants_plain(get_header(headers, b"accept"))

        if not self.admitted:
            self.metrics.rejected.inc(reason="connections_per_client")
            self._page_now(
                429,
                "Too many concurrent connections from your address.",
                plain=plain,
                close=True,
                extra=[(b"retry-after", b"1")],
            )
            return _CLOSE
        if len(headers) > self.limits.max_header_count:
            self.metrics.rejected.inc(reason="header_count")
            self._page_now(431, "Too many request header fields.", plain=plain, close=True)
            return _CLOSE
        # the reader only bounds an *incomplete* head; one read in one go is measured here
        if request.size > self.limits.max_header_bytes:
            self.metrics.rejected.inc(reason="header_too_large")
            self._page_now(431, "The request headers are too large.", plain=plain, close=True)
            return _CLOSE
        method = request.method
        if method == b"CONNECT":
            self._page_now(405, "CONNECT is not supported.", plain=plain, close=True)
            return _CLOSE

        # (both framing fields at once, two Host fields: refused by the reader)
        target = request.target
        host_value = get_header(headers, b"host")
        if not target.startswith(b"/") and target != b"*":
            # absolute-form (RFC 9112 §3.2.2): the target's authority wins over Host
            parts = urlsplit(target.decode("ascii", "replace"))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self._page_now(400, "Bad request target.", plain=plain, close=True)
                return _CLOSE
            host_value = parts.netloc.rpartition("@")[2].encode()  # drop any userinfo
            target = (parts.path or "/").encode() + (
                b"?" + parts.query.encode() if parts.query else b""
            )
            headers = [(k, v) for k, v in headers if k != b"host"] + [(b"host", host_value)]
        if not host_value:
            self._page_now(400, "The request has no Host header.", plain=plain, close=True)
            return _CLOSE
        host = host_value.decode("latin-1")
        path = target.split(b"?", 1)[0].decode("latin-1")
        self.current = (method.decode("latin-1"), host[:255], path[:1024])
        if self._answer_acme_challenge(method, target):
            return _ANSWERED
        streams = self.server.stream_acceptor
        if streams is not None and streams.claims(target):
            self.connection_lost(None)  # the WireGuard stream transport owns it from here
            rest = self.requests.trailing()
            streams.accept(cast(asyncio.Transport, self.transport), request, rest, self.proto)
            return _CLOSE
        self.client_ip = client_address(self.peer_ip, headers, self.server.trusted_proxies)
        found = route_for(self.server, host, self.client_ip, started)
        if isinstance(found, Refusal):
            self._refused(found, plain)
            return _ANSWERED
        route = found
        if route.balance is not None:
            picked = replica_for(route, self.client_ip, headers, started)
            if isinstance(picked, Refusal):
                self._refused(picked, plain)
                return _ANSWERED
            route, sticky = picked
            if sticky:
                self._set_cookie = sticky_cookie(route, self.proto == "https")
        self._upstream = route.upstream_host
        if self.proto == "http" and self.server.redirect_https:
            self._redirect_to_https(host, target, route)
            return _ANSWERED
        access = access_for(
            self.server,
            route,
            self.client_ip,
            method,
            path,
            headers,
            self._access_memo,
            request.raw,
        )
        self._decision = access.outcome.decision
        if access.outcome.kind != ALLOW:
            assert access.policy is not None
            return self._access_answer(access.outcome, access.policy, route, plain, started)
        self._user = access.user
        identity = access.identity
        own_cookies = access.own_cookies

        chunked = request.chunked
        length = request.content_length or 0
        max_body = self.limits.max_body_bytes
        if max_body is not None and length > max_body:
            self.metrics.rejected.inc(reason="body_too_large")
            self._page_now(
                413,
                "The request body is larger than allowed.",
                plain=plain,
                route=route,
                close=True,
            )
            return _CLOSE
        has_body = chunked or length > 0
        raw = request.raw
        if raw is not None and own_cookies:
            raw = self._without_own_cookies(raw) if access.one_cookie_field else None
        if raw is not None and not route.path_prefix:
            # an HTTP/1.1 head with Host first and no hop-by-hop, upgrade or forwarding
            # field (h1.scan_request): it goes as it came, followed by the forwarding
            # fields request_headers_for_agent would add (the client is the peer: no
            # X-Forwarded-For came to name another)
            upgrade = False
            # (headers.verbatim_request_head, with the peer's fields made once)
            end = PROTO_FIELD[self.proto] + access.identity_lines
            head = b"".join((raw, self._forwarding(), host_value, end, b"\r\n\r\n"))
        else:
            upgrade = is_upgrade_request(headers)
            forwarded = request_headers_for_agent(
                headers,
                client_ip=self.client_ip,
                peer_ip=self.peer_ip,
                proto=self.proto,
                chunked=chunked,
                upgrade=upgrade,
                identity=identity,
                strip_own_cookies=own_cookies,
            )
            if route.path_prefix and target.startswith(b"/"):
                target = route.path_prefix.encode("latin-1") + target
                if not h1.valid_target(target):
                    self._page_now(400, "Bad request target.", plain=plain, route=route, close=True)
                    return _CLOSE
            head = h1.request_head(method, target, forwarded)
        retry_allowed = not has_body and method in _IDEMPOTENT
        return ForwardPlan(head, method, upgrade, route, plain, has_body, retry_allowed, started)

    def _access_answer(
        self, outcome: Outcome, policy: AccessPolicy, route: Route, plain: bool, started: float
    ) -> AccessPlan | int:
        """What a request the access policy did not let straight through gets: a page
        (403, 401, 429, 503), a redirect to sign in, or the gateway's own handling."""
        if outcome.kind in (ENDPOINT, VERIFY):
            return AccessPlan(outcome.kind, policy, route, plain, started)
        self._refused(access_refusal(outcome, route), plain, started)
        return _ANSWERED

    def _refused(self, refusal: Refusal, plain: bool, started: float | None = None) -> None:
        """Write the page of a request refused at admission (``edge.py``)."""
        if refusal.metric is not None:
            self.metrics.rejected.inc(reason=refusal.metric)
        self._decision = refusal.decision
        route = refusal.route
        if route is not None:
            self._upstream = route.upstream_host
        self._page_now(
            refusal.status,
            refusal.reason,
            plain=plain,
            route=route,
            extra=list(refusal.extra),
            started=started,
        )

    def _go_access(self, plan: AccessPlan) -> None:
        self.mode = _SLOW
        self._streams()
        self.task = self.loop.create_task(self._access(plan))

    async def _access(self, plan: AccessPlan) -> None:
        """A sign-in page of the gateway's own, or basic-auth credentials to verify
        before the request goes on (the coroutine path: argon2 runs in a thread)."""
        close = False
        try:
            if plan.kind == VERIFY:
                await self._verify_basic(plan)
            else:
                await self._endpoint(plan)
        except (Abort, asyncio.CancelledError):
            close = True
        except Exception:
            log.exception("unexpected error serving a client connection")
            close = True
        finally:
            self.task = None
        if self.mode != _SLOW:
            return
        if self.transport is not None and self.transport.is_closing():
            return
        if close:
            if self.response_done and self.requests.state == h1.BODY:
                self._linger()
            else:
                self._close()
            return
        assert self._reader is not None
        self.requests.receive(self._reader.take())
        self._next_request()

    async def _verify_basic(self, plan: AccessPlan) -> None:
        request = self.request
        assert request is not None
        value = get_header(request.headers, b"authorization") or b""
        right = await self.loop.run_in_executor(
            None, self.server.access.verify_basic, plan.policy, value
        )
        if right:
            outcome = self._admit(request)  # the credentials are remembered now
            if isinstance(outcome, ForwardPlan):
                await self._forward(outcome)
            elif isinstance(outcome, AccessPlan):  # the policy changed meanwhile
                await self._send_page(
                    503, "Try again.", plain=plan.plain, route=plan.route, started=plan.started
                )
            return
        log.info(
            "basic auth refused",
            extra=kv(
                tunnel=plan.route.tunnel_id,
                client=self.client_ip,
                user=(basic_user(value) or "")[:64],
            ),
        )
        self.metrics.rejected.inc(reason="access")
        self._decision = "bad_basic"
        self._user = (basic_user(value) or "")[:64]
        await self._send_page(
            401,
            "The user name or password is not right.",
            plain=plan.plain,
            route=plan.route,
            started=plan.started,
            extra=[(b"www-authenticate", b'Basic realm="kakuremichi", charset="UTF-8"')],
        )

    async def _endpoint(self, plan: AccessPlan) -> None:
        request = self.request
        assert request is not None
        body = b""
        if self.server.endpoints.wants_body(request.method, ""):
            form = await self._read_form(plan)
            if form is None:
                return
            body = form
        target = request.target.decode("latin-1")
        response = await self.server.endpoints.handle(
            access_endpoints.EndpointRequest(
                plan.policy,
                plan.route.domain,
                self.proto,
                self.client_ip,
                request.method,
                target,
                request.headers,
                body,
                _authority(get_header(request.headers, b"host"), plan.route.domain),
            )
        )
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-frame-options", b"DENY"),
            (b"server", pages.SERVER_NAME),
            *response.headers,
        ]
        data = self._own(
            response.status, pages.reason_phrase(response.status), headers, response.body, False
        )
        route = plan.route
        if response.decision:
            self._decision = response.decision
        self._record(
            route.tunnel_id,
            route.domain,
            response.status,
            self.loop.time() - plan.started,
            pending=len(data),
        )
        await self._write(data)
        self.response_done = True

    async def _read_form(self, plan: AccessPlan) -> bytes | None:
        """A sign-in form's body (at most ``MAX_FORM_BYTES``; else a 413 page, None)."""
        requests = self.requests
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                data = requests.body()
            except h1.ProtocolError:
                raise Abort from None
            size += len(data)
            if size > access_endpoints.MAX_FORM_BYTES:
                await self._send_page(
                    413, "The form is too large.", plain=plan.plain, route=plan.route, close=True
                )
                return None
            parts.append(data)
            if requests.state != h1.BODY:
                return b"".join(parts)
            try:
                async with asyncio.timeout(self.settings.body_idle_timeout):
                    more = await self.reader.read(CHUNK)
            except (TimeoutError, ConnectionError, OSError):
                raise Abort from None
            if not more:
                raise Abort
            requests.receive(more)

    def _without_own_cookies(self, raw: bytes) -> bytes | None:
        """A verbatim head (``RequestHead.raw``) without the gateway's own cookies in
        its one Cookie field (the field dropped when nothing else is left), or None
        when that cannot be done by cutting bytes (then the head is rewritten).  The
        edit is remembered: a keep-alive client sends the same Cookie line each time."""
        last = self._cookie_raw
        if last is not None and last[0] == raw:  # the same head as last time
            return last[1]
        edit = self._cookie_edit
        if edit is not None:
            # the same line as last time (a short search, then one comparison)
            marker, line, replacement = edit
            start = raw.find(marker)
            if start >= 0 and raw.startswith(line, start):
                edited = b"".join((raw[:start], replacement, raw[start + len(line) :]))
                self._cookie_raw = (raw, edited)
                return edited
        start = raw.lower().find(b"\r\ncookie:")
        if start < 0:
            return None
        end = raw.find(b"\r\n", start + 2)
        if end < 0:
            return None
        line = raw[start:end]
        kept = without_own_cookies(line[9:].strip())
        replacement = b"\r\ncookie: " + kept if kept else b""
        self._cookie_edit = (line[:9], line, replacement)
        edited = raw[:start] + replacement + raw[end:]
        self._cookie_raw = (raw, edited)
        return edited

    def _forwarding(self) -> bytes:
        """``X-Forwarded-For`` and ``X-Real-IP`` (the peer) and the start of
        ``X-Forwarded-Host``, as ``headers.request_headers_for_agent`` states them for a
        request that names no other client (made once per connection)."""
        fields = self._forwarding_fields
        if fields is None:
            fields = self._forwarding_fields = forwarding_fields(self.peer_ip)
        return fields

    def _dispatch(self, plan: ForwardPlan) -> None:
        if plan.retry_allowed and not plan.upgrade and not self.server.closing:
            route = plan.route
            upstream = self.server.pool.take_idle(
                route.upstream_host,
                route.upstream_port or self.settings.upstream_port,
                route.pool_key,
                self,
                plan.started,  # the loop's time at admission, a moment ago
            )
            if upstream is not None:
                self._fast_start(plan, upstream)
                return
        self._go_slow(plan)

    # -- the coroutine path ------------------------------------------------------------

    def _go_slow(self, plan: ForwardPlan, *, fresh: bool = False) -> None:
        self.mode = _SLOW
        self._streams()
        self.task = self.loop.create_task(self._slow(plan, fresh))

    async def _slow(self, plan: ForwardPlan, fresh: bool) -> None:
        close = False
        try:
            await self._forward(plan, fresh=fresh)
        except (Abort, asyncio.CancelledError):
            close = True
        except Exception:
            log.exception("unexpected error serving a client connection")
            close = True
        finally:
            self.task = None
        if self.mode != _SLOW:
            return  # the connection is gone
        if self.transport is not None and self.transport.is_closing():
            return
        if close:
            if self.response_done and self.requests.state == h1.BODY:
                self._linger()  # a page answered an unfinished body (413, 408, 400)
            else:
                self._close()
            return
        assert self._reader is not None
        self.requests.receive(self._reader.take())
        self._next_request()

    async def _write(self, data: bytes) -> None:
        try:
            writer = self.writer
            writer.write(data)
            self._sent += len(data)
            await drain(writer, self.settings.body_idle_timeout)
        except (ConnectionError, OSError, TimeoutError, RuntimeError):
            raise Abort from None

    # -- the fast path ---------------------------------------------------------------

    def _fast_start(self, plan: ForwardPlan, upstream: UpstreamConnection) -> None:
        self.mode = _FAST
        self.server.fast_exchanges += 1
        self._up = upstream
        self._plan = plan
        self._status = 0
        self.metrics.upstream_reused(1.0)
        self._response_bytes = self.metrics.response_bytes_for(plan.route.tunnel_id)
        upstream.begin(plan.method)
        upstream.request_done = True
        self._sent_at = self._active_at = now = self.loop.time()
        if self._write_paused:
            self._pause_upstream()
        try:
            upstream.transport.write(plan.head)
        except (ConnectionError, OSError, RuntimeError):
            self._fast_failed("closed", "The connection to the agent broke.")
            return
        settings = self.settings
        self._arm(now + min(settings.response_header_timeout, settings.body_idle_timeout))

    def upstream_data(self, data: bytes) -> None:
        up = self._up
        if self.mode != _FAST or up is None:
            return
        up.responses.receive(data)
        self._active_at = self.loop.time()
        self._fast_relay(up)

    def upstream_eof(self) -> None:
        up = self._up
        if self.mode != _FAST or up is None:
            return
        try:
            up.responses.eof()  # the end of a close-delimited body, or a cut
        except h1.ProtocolError:
            self._fast_failed("closed", "The agent broke off its response.")
            return
        if not self.response_started:
            self._fast_failed("closed", "The agent closed the connection without answering.")
        else:
            self._fast_relay(up)

    def upstream_lost(self, exc: BaseException | None) -> None:
        if self.mode == _FAST and self._up is not None:
            self._fast_failed("closed", "The connection to the agent broke.")

    def _fast_relay(self, up: UpstreamConnection) -> None:
        """Relay what the agent sent of the response (head first, then body bytes)."""
        responses = up.responses
        plan = self._plan
        assert plan is not None and self.transport is not None
        out: list[bytes] = []
        try:
            if not self.response_started:
                while True:
                    head = responses.next_head()
                    if head is None:
                        return
                    if head.status >= 200:
                        break
                    self._informational_now(head)
                out.append(self._fast_head(head))
            if responses.state == h1.BODY:
                body = responses.body()
                if body:
                    self._response_bytes(len(body))
                    out.append(h1.encode_chunk(body) if self._framing == h1.CHUNKED else body)
        except h1.ProtocolError:
            if not self.response_started:
                self._fast_failed(
                    "closed", "The agent closed the connection or sent an invalid response."
                )
            else:
                self._fast_failed("closed", "The agent broke off its response.")
            return
        done = responses.state != h1.BODY
        if done and self._framing == h1.CHUNKED:
            out.append(h1.LAST_CHUNK)
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self._sent += len(data)
            self.transport.write(data)
        if done:
            self._fast_done()

    def _fast_head(self, head: h1.ResponseHead) -> bytes:
        data, self._framing = self._final_head(head)
        self._status = head.status
        return data

    def _informational_now(self, head: h1.ResponseHead) -> None:
        data = self._informational_head(head)
        if data and self.transport is not None:
            self._sent += len(data)
            self.transport.write(data)

    def _fast_end(self) -> tuple[UpstreamConnection | None, ForwardPlan | None]:
        """End the fast exchange: its agent connection (tap detached, reading resumed)
        and its plan, for the caller to pool or discard and to record."""
        up, self._up = self._up, None
        plan, self._plan = self._plan, None
        if up is not None:
            up.tap_sink(None)
            if self._up_paused:
                self._up_paused = False
                with contextlib.suppress(Exception):
                    up.transport.resume_reading()
        return up, plan

    def _fast_record(self, plan: ForwardPlan) -> None:
        route = plan.route
        self._record(route.tunnel_id, route.domain, self._status, self.loop.time() - plan.started)

    def _next_request(self) -> None:
        """The exchange is over: next request (pipelined ones at once), linger or close."""
        self._request_finished()
        self._heads()

    def _fast_done(self) -> None:
        up, plan = self._fast_end()
        assert up is not None and plan is not None
        self.response_done = True
        self._fast_record(plan)
        if up.reusable() and not self.server.closing:
            self.server.pool.release(up, self._active_at)  # (set as the last bytes came)
        else:
            self.server.pool.discard(up)
        self._next_request()

    def _fast_failed(self, kind: str, reason: str) -> None:
        up, plan = self._fast_end()
        assert up is not None and plan is not None
        self.server.pool.discard(up)
        route = plan.route
        if self.response_started:
            # a truncated body must never look complete: the client sees an abort
            self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=kind)
            self._fast_record(plan)
            self.abort()
            return
        if kind == "closed":
            # the pooled connection was stale: replay on a fresh one (safe: idempotent
            # and bodiless), with the coroutine path's errors if that fails too
            self._go_slow(plan, fresh=True)
            return
        self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=kind)
        self._page_now(504, reason, plain=plan.plain, route=route, started=plan.started)
        self._next_request()

    def _fast_abandon(self) -> None:
        """The client went away in the middle of a fast exchange."""
        up, plan = self._fast_end()
        if up is not None:
            self.server.pool.discard(up)
        if plan is not None and self.response_started:
            self._fast_record(plan)

    def _pause_upstream(self) -> None:
        up = self._up
        if up is not None and not self._up_paused:
            self._up_paused = True
            with contextlib.suppress(Exception):
                up.transport.pause_reading()

    def _resume_upstream(self) -> None:
        up = self._up
        if up is not None and self._up_paused:
            self._up_paused = False
            with contextlib.suppress(Exception):
                up.transport.resume_reading()

    # -- connection control ----------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and self.mode != _CLOSED:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (buffered output is lost)."""
        if self.transport is not None and self.mode != _CLOSED:
            self.transport.abort()

    def shutdown(self) -> None:
        """The server is closing: end the connection now if it is between requests."""
        if self.mode == _LINGER or (
            self.mode == _HEAD and not self.requests.buffered and self.request is None
        ):
            self._close()

    def _linger(self) -> None:
        """Half-close and discard what the client still sends, briefly, before closing.

        Closing with unread data makes the kernel send a reset, which can destroy the
        error page we just wrote before the client reads it.
        """
        transport = self.transport
        if transport is None or self.mode == _CLOSED:
            return
        if self._reader is not None:
            self._lingered = len(self._reader.take())
        self.mode = _LINGER
        self._lingered += self.requests.buffered
        self._resume_reading()
        try:
            if not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        if self._client_eof or self._lingered >= _LINGER_BYTES:
            transport.close()
            return
        self._arm(self.loop.time() + _LINGER_SECONDS)

    # -- answers the gateway gives itself -----------------------------------------------

    def _answer_acme_challenge(self, method: bytes, target: bytes) -> bool:
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
            self._page_now(404, "Unknown ACME challenge token.", plain=True)
            return True
        body = answer.encode()
        self._send_simple(200, body, b"text/plain")
        self._record("", "", 200, None)
        return True

    def _redirect_to_https(self, host: str, target: bytes, route: Route) -> None:
        name = normalize_host(host) or route.domain
        if ":" in name:
            name = f"[{name}]"
        port = self.server.redirect_https_port
        authority = name if port == 443 else f"{name}:{port}"
        location = f"https://{authority}".encode() + (target if target.startswith(b"/") else b"/")
        self._record(route.tunnel_id, route.domain, 308, None)
        page = pages.render(308, "This site is served over HTTPS.", plain=True)
        self._send_simple(
            308, page.body, b"text/plain; charset=utf-8", extra=[(b"location", location)]
        )

    def _send_simple(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        *,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"server", pages.SERVER_NAME),
            *(extra or []),
        ]
        self._send_own_now(self._own(status, pages.reason_phrase(status), headers, body, False))

    def _own(self, status: int, phrase: bytes, headers: Headers, body: bytes, close: bool) -> bytes:
        """A whole response the gateway makes itself (a page, a redirect, ACME)."""
        if self.response_started:
            raise Abort  # another response is under way: the client sees it cut off
        if close or self.server.closing or not self.keep_alive:
            self.keep_alive = False
            headers = [*headers, (b"connection", b"close")]
        data = h1.response_head(status, phrase, headers)
        request = self.request
        if body and (request is None or request.method != b"HEAD"):
            data += body  # a response to HEAD has no body (RFC 9110 §9.3.2)
        self.response_started = True
        return data

    def _send_own_now(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._sent += len(data)
            self.transport.write(data)
        self.response_done = True

    # -- gateway pages ---------------------------------------------------------------

    def _record(
        self, tunnel: str, domain: str, status: int, elapsed: float | None, *, pending: int = 0
    ) -> None:
        """Count one answered request and write its access-log line if the log is on
        (no query strings: they often carry tokens); ``pending``: bytes of the answer
        not written yet."""
        self.metrics.request_done(tunnel, domain, status, elapsed)
        access_log = self.server.access_log
        if access_log.enabled:
            method, host, path = self.current
            request = self.request
            access_log.http(
                client=self.client_ip,
                tunnel=tunnel,
                host=host,
                method=method,
                path=path,
                status=status,
                bytes_in=(request.size if request is not None else 0) + self.body_in,
                bytes_out=self._sent + pending,
                duration=elapsed,
                upstream=self._upstream,
                decision=self._decision,
                user=self._user,
            )
            # the answer's own bytes, written next, belong to this line
            self._sent = -pending
            self.body_in = 0

    def _page(
        self,
        status: int,
        reason: str,
        *,
        plain: bool,
        close: bool,
        route: Route | None,
        extra: list[tuple[bytes, bytes]] | None,
        started: float | None,
    ) -> bytes:
        tunnel = route.tunnel_id if route is not None else ""
        domain = route.domain if route is not None else ""
        elapsed = self.loop.time() - started if started is not None else None
        page = pages.render(status, reason, plain=plain, extra_headers=extra)
        data = self._own(page.status, page.reason, page.headers, page.body, close)
        self._record(tunnel, domain, status, elapsed, pending=len(data))
        return data

    def _page_now(
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
        """Write one of the gateway's pages from the transport's callback."""
        if self.response_started:
            self.abort()  # another response is under way: the client sees it cut off
            return
        data = self._page(
            status, reason, plain=plain, close=close, route=route, extra=extra, started=started
        )
        self._send_own_now(data)

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
        data = self._page(
            status, reason, plain=plain, close=close, route=route, extra=extra, started=started
        )
        await self._write(data)
        self.response_done = True
