"""The public HTTP/1.1 reverse proxy: client connection -> Host route -> agent.

Theory of operation
-------------------
Each accepted client connection is one ``_ClientSession`` reading requests with an
``h1.RequestReader`` (llhttp parses the heads, ``h1/``).  The session loops over
requests (keep-alive):

1. **Read the request head** under two deadlines (slowloris protection): a fresh
   connection must deliver complete headers within ``header_timeout``; a keep-alive
   connection may idle up to ``idle_timeout`` for the first byte of its next request,
   then has ``header_timeout`` to finish the headers.  A partial head that misses its
   deadline gets 408; a silent idle connection is just closed.  The reader rejects
   malformed heads (400; 501 for an unknown method or transfer coding, 505 for a
   version other than HTTP/1.x), heads that grow past ``max_header_bytes`` while
   incomplete (431), and, being the place where message framing is decided, the
   smuggling shapes: ``Content-Length`` together with ``Transfer-Encoding``, two
   ``Content-Length`` or ``Host`` fields, obs-fold, bare CR or LF (all 400).
2. **Admit**, cheapest and least trusting first: per-client connection limit (429),
   header count and size (431), ``CONNECT`` (405), Host (400 if missing: only an
   HTTP/1.0 request gets this far without one; an absolute-form target's authority
   wins), ACME
   HTTP-01 challenges (answered here, before rate limits and routing, RFC 8555 §8.3),
   rate limit (429 + ``Retry-After``), route (404 unknown host, 503 disabled tunnel),
   optional HTTP -> HTTPS redirect (308), declared body size (413).
3. **Forward** to the agent and relay its answer, streaming both bodies, with
   ``Expect: 100-continue`` and WebSocket upgrades: ``forward.py``.
4. Continue with the next request if the request was read to its end, the response
   was sent whole and neither side asked to close, else close (lingering briefly so
   an unread request body does not turn our answer into a reset).  A response to
   HEAD never carries a body, not even the gateway's own pages.  ``close()`` stops
   the listeners, ends idle keep-alive connections at once and gives in-flight ones
   ``shutdown_timeout`` seconds.

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
from typing import Any
from urllib.parse import urlsplit

from kakuremichi.relay.limits import ConnectionLimiter, RateLimiter
from kakuremichi.relay.metrics import Metrics
from kakuremichi.relay.router import Route, Router, normalize_host
from kakuremichi.relay.splice import CHUNK, close_writer, drain, half_close

from . import h1, pages
from .forward import Abort, ForwardingMixin
from .headers import (
    Headers,
    client_address,
    get_header,
    is_trusted_proxy,
    is_upgrade_request,
    parse_networks,
    request_headers_for_agent,
)
from .pool import Dialer, UpstreamPool, open_tcp
from .settings import ProxySettings

__all__ = ["ProxyServer", "ProxySettings"]

log = logging.getLogger(__name__)

ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024


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
            await self.serve_connection(reader, writer, proto)

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

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: str = "http"
    ) -> None:
        """Serve one accepted connection until it ends (also for streams accepted
        elsewhere, e.g. by a user-space TCP/IP stack); never raises."""
        peer = writer.get_extra_info("peername")
        peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "0.0.0.0"
        # a trusted load balancer speaks for many clients: only the total applies
        exempt = is_trusted_proxy(peer_ip, self.trusted_proxies)
        admitted = self.connection_limiter.try_acquire(peer_ip, exempt=exempt)
        session = _ClientSession(self, reader, writer, peer_ip, proto, admitted)
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
                self.connection_limiter.release(peer_ip, exempt=exempt)
            self._sessions.pop(task, None)
            await close_writer(writer)


class _ClientSession(ForwardingMixin):
    """One public client connection: requests read, admitted, forwarded (module docstring)."""

    def __init__(
        self,
        server: ProxyServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_ip: str,
        proto: str,
        admitted: bool,
    ) -> None:
        self.server = server
        self.settings = server.settings
        self.limits = server.settings.limits
        self.metrics = server.metrics
        self.reader = reader
        self.writer = writer
        self.peer_ip = peer_ip
        #: the client as far as we can tell (see ``headers.client_address``), per request
        self.client_ip = peer_ip
        self.proto = proto
        #: (method, host, path) of the request in progress, for the access log
        self.current: tuple[str, str, str] = ("", "", "")
        self.admitted = admitted
        self.requests = h1.RequestReader(self.limits.max_header_bytes)
        #: the request being answered (None while reading the next head)
        self.request: h1.RequestHead | None = None
        #: a final response (or a page) was started for it / was sent whole
        self.response_started = False
        self.response_done = False
        #: the connection may carry another request after this one
        self.keep_alive = True
        self.loop = asyncio.get_running_loop()
        self.idle = True

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        with contextlib.suppress(Abort):
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
            self.request = request
            self.keep_alive = request.keep_alive
            await self._handle(request)
            if self.server.closing:
                return
            if self.response_done and self.keep_alive and self.requests.state == h1.DONE:
                continue
            if self.requests.state == h1.BODY:
                await self._linger()
            return

    async def _read_request_head(self, first: bool) -> h1.RequestHead | None:
        now = self.loop.time()
        header_deadline: float | None = None
        if first or self.requests.buffered:
            header_deadline = now + self.limits.header_timeout
        idle_deadline = now + self.limits.idle_timeout
        requests = self.requests
        self.request = None
        self.response_started = self.response_done = False
        while True:
            try:
                head = requests.next_head()
            except h1.ProtocolError as exc:
                too_large = exc.status == 431
                self.metrics.rejected.inc(reason="header_too_large" if too_large else "malformed")
                await self._send_page(exc.status, exc.reason, close=True)
                await self._linger()
                return None
            if head is None:
                deadline = header_deadline if header_deadline is not None else idle_deadline
                remaining = deadline - self.loop.time()
                data: bytes | None = None
                if remaining > 0:
                    try:
                        async with asyncio.timeout(remaining):
                            data = await self.reader.read(CHUNK)
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
                if not data:
                    try:
                        requests.eof()
                    except h1.ProtocolError:  # half a head, then EOF
                        self.metrics.rejected.inc(reason="malformed")
                        await self._send_page(400, "The request was cut off.", close=True)
                    return None
                if header_deadline is None:
                    header_deadline = self.loop.time() + self.limits.header_timeout
                requests.receive(data)
                continue
            return head

    # -- one request -----------------------------------------------------------------

    async def _handle(self, request: h1.RequestHead) -> None:
        started = self.loop.time()
        headers: Headers = request.headers
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
            raise Abort
        if len(headers) > self.limits.max_header_count:
            self.metrics.rejected.inc(reason="header_count")
            await self._send_page(431, "Too many request header fields.", plain=plain, close=True)
            raise Abort
        # the reader only bounds an *incomplete* head; one read in one go is measured here
        if request.size > self.limits.max_header_bytes:
            self.metrics.rejected.inc(reason="header_too_large")
            await self._send_page(
                431, "The request headers are too large.", plain=plain, close=True
            )
            raise Abort
        method = request.method
        if method == b"CONNECT":
            await self._send_page(405, "CONNECT is not supported.", plain=plain, close=True)
            raise Abort

        # (both framing fields at once, two Host fields: refused by the reader)
        target = request.target
        host_value = get_header(headers, b"host")
        if not target.startswith(b"/") and target != b"*":
            # absolute-form (RFC 9112 §3.2.2): the target's authority wins over Host
            parts = urlsplit(target.decode("ascii", "replace"))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                await self._send_page(400, "Bad request target.", plain=plain, close=True)
                raise Abort
            host_value = parts.netloc.rpartition("@")[2].encode()  # drop any userinfo
            target = (parts.path or "/").encode() + (
                b"?" + parts.query.encode() if parts.query else b""
            )
            headers = [(k, v) for k, v in headers if k != b"host"] + [(b"host", host_value)]
        if not host_value:
            await self._send_page(400, "The request has no Host header.", plain=plain, close=True)
            raise Abort
        host = host_value.decode("latin-1")
        path = target.split(b"?", 1)[0].decode("latin-1")
        self.current = (method.decode("latin-1"), host[:255], path[:1024])
        if await self._answer_acme_challenge(method, target):
            return
        self.client_ip = client_address(self.peer_ip, headers, self.server.trusted_proxies)
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

        chunked = request.chunked
        length = request.content_length or 0
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
            raise Abort
        has_body = chunked or length > 0
        upgrade = is_upgrade_request(headers)
        forwarded = request_headers_for_agent(
            headers,
            client_ip=self.client_ip,
            peer_ip=self.peer_ip,
            proto=self.proto,
            chunked=chunked,
            upgrade=upgrade,
        )
        if route.path_prefix and target.startswith(b"/"):
            target = route.path_prefix.encode("latin-1") + target
            if not h1.valid_target(target):
                await self._send_page(
                    400, "Bad request target.", plain=plain, route=route, close=True
                )
                raise Abort
        head = h1.request_head(method, target, forwarded)
        retry_allowed = not has_body and method in _IDEMPOTENT
        await self._forward(head, method, upgrade, route, plain, has_body, retry_allowed, started)

    async def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await drain(self.writer, self.settings.body_idle_timeout)
        except (ConnectionError, OSError, TimeoutError):
            raise Abort from None

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
        await self._send_simple(200, body, b"text/plain")
        self._record("", "", 200, None)
        return True

    async def _redirect_to_https(self, host: str, target: bytes, route: Route) -> None:
        name = normalize_host(host) or route.domain
        if ":" in name:
            name = f"[{name}]"
        port = self.server.redirect_https_port
        authority = name if port == 443 else f"{name}:{port}"
        location = f"https://{authority}".encode() + (target if target.startswith(b"/") else b"/")
        self._record(route.tunnel_id, route.domain, 308, None)
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
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"server", pages.SERVER_NAME),
            *(extra or []),
        ]
        await self._send_own(status, pages.reason_phrase(status), headers, body, close=False)

    async def _send_own(
        self, status: int, phrase: bytes, headers: Headers, body: bytes, *, close: bool
    ) -> None:
        """Write a whole response the gateway makes itself (a page, a redirect, ACME)."""
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
        await self._write(data)
        self.response_done = True

    # -- gateway pages ---------------------------------------------------------------

    def _record(self, tunnel: str, domain: str, status: int, elapsed: float | None) -> None:
        """Count one answered request; log it if the access log is on (no query
        strings: they often carry tokens)."""
        self.metrics.request_done(tunnel, domain, status, elapsed)
        if self.settings.access_log:
            method, host, path = self.current
            log.info(
                "%s %s %s %s %d %s",
                self.client_ip,
                method or "-",
                host or "-",
                path or "-",
                status,
                f"{elapsed * 1000:.1f}ms" if elapsed is not None else "-",
            )

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
        self._record(tunnel, domain, status, elapsed)
        page = pages.render(status, reason, plain=plain, extra_headers=extra)
        await self._send_own(page.status, page.reason, page.headers, page.body, close=close)

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
                async with asyncio.timeout(remaining):
                    data = await self.reader.read(CHUNK)
                if not data:
                    break
                drained += len(data)
