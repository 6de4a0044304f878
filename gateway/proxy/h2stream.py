"""One HTTP/2 request stream, served: admitted like HTTP/1.1, then forwarded.

Theory of operation
-------------------
``serve`` runs as the task of one ``H2Stream`` (``h2session.py``):

1. **Admit** (``_Served.admit``), the checks of ``http.py``'s step 2 in the same
   order, the wire-independent ones shared through ``edge.py``: the connection
   limit per client (429, then GOAWAY), header count and size (431), ``CONNECT``
   (405), the authority (``:authority``, else ``Host``; 400 without), a path and
   field values that can be written into an HTTP/1.1 head (400: no CR, LF or NUL
   smuggled through HPACK, RFC 9113 §8.2.1), ACME challenges, the rate limit, the
   route (404, 503), the tunnel's access policy (403/401/302/429/503; sign-in pages
   and basic-auth verification as over HTTP/1.1), the declared body size (413).
   Every answer of the gateway's own is one of ``pages.py``'s, as a response on the
   stream; every request is counted and logged like an HTTP/1.1 one.
2. **Forward** to the agent:

   * **as HTTP/1.1** (everything but gRPC) through the same pool of keep-alive
     tunnel connections (``pool.py``): the head is built by the same
     ``headers.request_headers_for_agent`` (``Host`` from ``:authority``, cookies
     joined, forwarding and identity fields), a body without ``Content-Length`` goes
     chunked; the body is pumped while the response is awaited (an agent may answer
     early), each piece acknowledged to the client (WINDOW_UPDATE) only once the
     agent took it; request trailers are dropped (HTTP/1.1 agents do not get them).
     The response head loses its hop-by-hop fields, the body goes out as DATA
     within the client's windows.  Failures are those of ``forward.py``: 502 for
     an agent that refuses, is unreachable or breaks off before answering, 504 when
     it does not answer in time, a reset stream when it fails mid-answer (never a
     truncated body that looks whole), one retry on a fresh connection for an
     idempotent bodiless request that met a stale pooled one;
   * **as HTTP/2** for gRPC (``content-type: application/grpc``, ``+proto`` and the
     like; gRPC-Web is HTTP/1.1-shaped and goes the first way): a stream on an
     HTTP/2 connection through the agent (``h2upstream.py``), request and response
     streaming concurrently, trailers passed both ways (``grpc-status``), resets
     passed both ways.  The silence limit of a gRPC stream is
     ``tunnel_idle_timeout`` (a stream of notifications may be quiet for long); the
     response-head deadline starts when the client ended its side.  An origin that
     does not speak HTTP/2 is a 502 page naming the reason, logged; gRPC clients
     also get ``grpc-status: 14`` (UNAVAILABLE) with the reason on gateway pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from common.logs import kv
from common.relay.router import Route, another_replica
from common.relay.splice import CHUNK, drain
from gateway.access import endpoints as access_endpoints
from gateway.access.policy import ALLOW, ENDPOINT, VERIFY, basic_user

from . import h1, pages
from .edge import (
    Access,
    Refusal,
    access_for,
    access_refusal,
    replica_for,
    route_for,
    sticky_cookie,
)
from .forward import (
    BodyTooLarge,
    ClientTimeout,
    UpstreamFailed,
    next_response_head,
    tunnel_preamble,
)
from .h2session import H2Session, H2Stream, StreamGone, StreamStalled
from .h2upstream import UpstreamStream
from .headers import (
    Headers,
    client_address,
    get_header,
    request_headers_for_agent,
    response_headers_for_client,
)
from .pool import PoolBusy, UpstreamConnection

if TYPE_CHECKING:
    from .http import ProxyServer

__all__ = ["negotiated_h2", "serve", "take_over"]

log = logging.getLogger("gateway.proxy.h2")

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_UNSAFE_REUSE_MAX_IDLE = 1.0
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_TOKEN_ANY_CASE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: a field value that HTTP/1.1 can carry: no CR, LF, NUL or other controls but HTAB
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


def negotiated_h2(transport: Any) -> bool:
    """Whether a TLS connection's handshake chose ``h2`` in ALPN."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"


def take_over(server: ProxyServer, transport: asyncio.Transport, proto: str) -> None:
    """Serve a connection that negotiated ``h2`` (called from the HTTP/1.1 session's
    ``connection_made`` before it did anything with the connection)."""
    session = H2Session(server, proto, serve)
    transport.set_protocol(session)
    session.connection_made(transport)


def is_grpc(content_type: bytes | None) -> bool:
    """gRPC over HTTP/2 (not gRPC-Web, which HTTP/1.1 carries)."""
    if not content_type:
        return False
    value = content_type.lower()
    return value == b"application/grpc" or value.startswith(
        (b"application/grpc+", b"application/grpc;")
    )


#: a gateway answer's status as a gRPC status code (gRPC's "HTTP to gRPC Status Code
#: Mapping"; 413 and 431 as RESOURCE_EXHAUSTED), UNKNOWN for the rest
_GRPC_CODES = {
    400: 13,
    401: 16,
    403: 7,
    404: 12,
    413: 8,
    429: 14,
    431: 8,
    502: 14,
    503: 14,
    504: 14,
}


def grpc_message(text: str) -> bytes:
    """``grpc-message``: UTF-8, percent-encoded outside printable ASCII and ``%``."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
        for b in text.encode("utf-8")
    )


async def serve(stream: H2Stream) -> None:
    """The task of one request stream (module docstring)."""
    served = _Served(stream)
    try:
        await served.run()
    except (StreamGone, asyncio.CancelledError):
        served.abandoned()
    except StreamStalled:
        served.abandoned()
        stream.reset(ErrorCodes.CANCEL)
    except Exception:
        log.exception("unexpected error serving an HTTP/2 stream")
        served.abandoned()
        stream.reset(ErrorCodes.INTERNAL_ERROR)


class _Served:
    """The serving of one stream: its admission, forwarding and log line."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        session = stream.session
        self.session = session
        self.server = session.server
        self.settings = session.settings
        self.limits = session.limits
        self.metrics = session.metrics
        self.loop = session.loop
        self.client_ip = session.peer_ip
        self.plain = pages.wants_plain(get_header(stream.fields, b"accept"))
        self.grpc = is_grpc(get_header(stream.fields, b"content-type"))
        self.method = stream.method
        self.host = ""
        self.path = ""
        self.route: Route | None = None
        self.decision = "allow"
        self.user = ""
        self.upstream = ""
        self.status = 0
        self.recorded = False
        self.sent_at: float | None = None
        #: the response sets this sticky-replica cookie (``edge.replica_for``)
        self.set_cookie: tuple[bytes, bytes] | None = None

    # -- the log line ----------------------------------------------------------------

    def record(self, status: int, elapsed: float | None = None) -> None:
        if self.recorded:
            return
        self.recorded = True
        route = self.route
        tunnel = route.tunnel_id if route is not None else ""
        domain = route.domain if route is not None else ""
        self.metrics.request_done(tunnel, domain, status, elapsed)
        access_log = self.server.access_log
        if access_log.enabled:
            stream = self.stream
            access_log.http(
                client=self.client_ip,
                tunnel=tunnel,
                host=self.host[:255],
                method=self.method.decode("latin-1"),
                path=self.path[:1024],
                status=status,
                bytes_in=stream.header_size + stream.body_in,
                bytes_out=stream.bytes_out,
                duration=elapsed,
                upstream=self.upstream,
                decision=self.decision,
                user=self.user,
            )

    def abandoned(self) -> None:
        """The client reset the stream or left: log what was answered so far."""
        if not self.recorded and self.status:
            self.record(self.status, self.loop.time() - self.stream.started)

    # -- pages -------------------------------------------------------------------------

    async def page(
        self,
        status: int,
        reason: str,
        *,
        extra: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
        elapsed: bool = True,
    ) -> None:
        """One of the gateway's pages as the answer (gRPC clients also read the reason
        in ``grpc-status`` / ``grpc-message``)."""
        stream = self.stream
        if stream.response_started:
            stream.reset(ErrorCodes.INTERNAL_ERROR)
            return
        headers = list(extra)
        if self.grpc and status >= 400:
            # a gRPC client reads the status from trailers: a trailers-only answer
            # (gRPC over HTTP/2, "Responses"), the reason in grpc-message
            headers = [
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % _GRPC_CODES.get(status, 2)),
                (b"grpc-message", grpc_message(reason)),
                (b"server", pages.SERVER_NAME),
                *headers,
            ]
            await self.answer(status, headers, b"", elapsed=elapsed)
            return
        rendered = pages.render(status, reason, plain=self.plain, extra_headers=headers)
        await self.answer(status, rendered.headers, rendered.body, elapsed=elapsed)

    async def answer(
        self, status: int, headers: Headers, body: bytes, *, elapsed: bool = True
    ) -> None:
        stream = self.stream
        self.status = status
        self.record(status, self.loop.time() - stream.started if elapsed else None)
        if self.method == b"HEAD" or not body:
            stream.respond(status, headers, end=True)
            return
        stream.respond(status, headers)
        await stream.send(body, end=True)

    async def refuse(self, refusal: Refusal) -> None:
        if refusal.metric is not None:
            self.metrics.rejected.inc(reason=refusal.metric)
        self.decision = refusal.decision
        if refusal.route is not None:
            self.route = refusal.route
            self.upstream = refusal.route.upstream_host
        elapsed = refusal.metric == "access"
        await self.page(refusal.status, refusal.reason, extra=refusal.extra, elapsed=elapsed)

    # -- admission ---------------------------------------------------------------------

    async def run(self) -> None:
        stream = self.stream
        limits = self.limits
        if not self.session.admitted:
            self.metrics.rejected.inc(reason="connections_per_client")
            await self.page(
                429,
                "Too many concurrent connections from your address.",
                extra=((b"retry-after", b"1"),),
                elapsed=False,
            )
            self.session.shutdown()
            return
        if len(stream.fields) > limits.max_header_count:
            self.metrics.rejected.inc(reason="header_count")
            await self.page(431, "Too many request header fields.", elapsed=False)
            return
        if stream.header_size > limits.max_header_bytes:
            self.metrics.rejected.inc(reason="header_too_large")
            await self.page(431, "The request headers are too large.", elapsed=False)
            return
        method = stream.method
        if method == b"CONNECT":
            await self.page(405, "CONNECT is not supported.", elapsed=False)
            return
        authority = stream.authority or get_header(stream.fields, b"host") or b""
        target = stream.path
        self.host = authority.decode("latin-1")
        self.path = target.split(b"?", 1)[0].decode("latin-1")
        if not _TOKEN_ANY_CASE.fullmatch(method) or not self._fields_ok():
            self.metrics.rejected.inc(reason="malformed")
            await self.page(400, "The request has a malformed field.", elapsed=False)
            return
        if not authority or not _VALUE.fullmatch(authority) or b" " in authority:
            await self.page(400, "The request has no authority (Host).", elapsed=False)
            return
        if not (target.startswith(b"/") or (target == b"*" and method == b"OPTIONS")):
            await self.page(400, "Bad request target.", elapsed=False)
            return
        if not h1.valid_target(target):
            await self.page(400, "Bad request target.", elapsed=False)
            return
        if await self._acme(method, target):
            return
        fields = [(b"host", authority), *(f for f in stream.fields if f[0] != b"host")]
        self.client_ip = client_address(self.session.peer_ip, fields, self.server.trusted_proxies)
        found = route_for(self.server, self.host, self.client_ip, stream.started)
        if isinstance(found, Refusal):
            await self.refuse(found)
            return
        route = found
        if route.balance is not None:
            picked = replica_for(route, self.client_ip, fields, stream.started)
            if isinstance(picked, Refusal):
                await self.refuse(picked)
                return
            route, sticky = picked
            if sticky:
                self.set_cookie = sticky_cookie(route, self.session.proto == "https")
        self.route = route
        self.upstream = route.upstream_host
        await self._admitted(route, fields, target)

    def _fields_ok(self) -> bool:
        for name, value in self.stream.fields:
            if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
                return False
        return True

    async def _acme(self, method: bytes, target: bytes) -> bool:
        responder = self.server.challenge_responder
        if responder is None or method not in (b"GET", b"HEAD"):
            return False
        path = target.split(b"?", 1)[0]
        if not path.startswith(ACME_CHALLENGE_PREFIX):
            return False
        try:
            answer = responder(path.decode("ascii", "replace"))
        except Exception:
            log.exception("ACME challenge responder failed")
            answer = None
        if answer is None:
            self.plain = True
            await self.page(404, "Unknown ACME challenge token.", elapsed=False)
            return True
        body = answer.encode()
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"server", pages.SERVER_NAME),
        ]
        await self.answer(200, headers, body, elapsed=False)
        return True

    async def _admitted(self, route: Route, fields: Headers, target: bytes) -> None:
        """Past the route: the access policy, the body size, then forwarding."""
        stream = self.stream
        access = access_for(self.server, route, self.client_ip, stream.method, self.path, fields)
        self.decision = access.outcome.decision
        kind = access.outcome.kind
        if kind != ALLOW:
            assert access.policy is not None
            if kind == VERIFY:
                await self._verify_basic(access, route, fields, target)
            elif kind == ENDPOINT:
                await self._endpoint(access, route, fields, target)
            else:
                await self.refuse(access_refusal(access.outcome, route))
            return
        self.user = access.user
        length_text = get_header(fields, b"content-length")
        length = int(length_text) if length_text is not None and length_text.isdigit() else None
        max_body = self.limits.max_body_bytes
        if max_body is not None and length is not None and length > max_body:
            self.metrics.rejected.inc(reason="body_too_large")
            await self.page(413, "The request body is larger than allowed.")
            return
        if self.grpc:
            await self._forward_h2(route, fields, target, access)
        else:
            await self._forward_h1(route, fields, target, access, length)

    async def _verify_basic(
        self, access: Access, route: Route, fields: Headers, target: bytes
    ) -> None:
        assert access.policy is not None
        value = get_header(fields, b"authorization") or b""
        server = self.server
        right = await self.loop.run_in_executor(
            None, server.access.verify_basic, access.policy, value
        )
        if right:
            again = access_for(server, route, self.client_ip, self.method, self.path, fields)
            if again.outcome.kind == ALLOW:
                await self._admitted(route, fields, target)  # remembered: ALLOW now
            else:
                await self.page(503, "Try again.")
            return
        user = (basic_user(value) or "")[:64]
        log.info(
            "basic auth refused", extra=kv(tunnel=route.tunnel_id, client=self.client_ip, user=user)
        )
        self.metrics.rejected.inc(reason="access")
        self.decision = "bad_basic"
        self.user = user
        await self.page(
            401,
            "The user name or password is not right.",
            extra=((b"www-authenticate", b'Basic realm="kakuremichi", charset="UTF-8"'),),
        )

    async def _endpoint(self, access: Access, route: Route, fields: Headers, target: bytes) -> None:
        assert access.policy is not None
        stream = self.stream
        endpoints = self.server.endpoints
        body = b""
        if endpoints.wants_body(stream.method, ""):
            parts: list[bytes] = []
            size = 0
            while True:
                try:
                    data = await stream.read(self.settings.body_idle_timeout)
                except TimeoutError:
                    await self.page(408, "The request body did not arrive in time.")
                    return
                if not data:
                    break
                size += len(data)
                if size > access_endpoints.MAX_FORM_BYTES:
                    await self.page(413, "The form is too large.")
                    return
                parts.append(data)
            body = b"".join(parts)
        response = await endpoints.handle(
            access_endpoints.EndpointRequest(
                access.policy,
                route.domain,
                self.session.proto,
                self.client_ip,
                stream.method,
                target.decode("latin-1"),
                fields,
                body,
            )
        )
        if response.decision:
            self.decision = response.decision
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-frame-options", b"DENY"),
            (b"server", pages.SERVER_NAME),
            *response.headers,
        ]
        await self.answer(response.status, headers, response.body)

    # -- forwarding as HTTP/1.1 --------------------------------------------------------

    async def _forward_h1(
        self,
        route: Route,
        fields: Headers,
        target: bytes,
        access: Access,
        length: int | None,
    ) -> None:
        stream = self.stream
        has_body = (length or 0) > 0 if length is not None else not stream.ended
        chunked = has_body and length is None
        forwarded = request_headers_for_agent(
            fields,
            client_ip=self.client_ip,
            peer_ip=self.session.peer_ip,
            proto=self.session.proto,
            chunked=chunked,
            upgrade=False,
            identity=access.identity,
            strip_own_cookies=access.own_cookies,
        )
        if route.path_prefix and target.startswith(b"/"):
            target = route.path_prefix.encode("latin-1") + target
            if not h1.valid_target(target):
                await self.page(400, "Bad request target.")
                return
        head = h1.request_head(stream.method, target, forwarded)
        retry_allowed = not has_body and stream.method in _IDEMPOTENT
        settings = self.settings
        port = route.upstream_port or settings.upstream_port
        preamble = tunnel_preamble(route.tunnel_id) if settings.tunnel_header else b""
        pool = self.server.pool
        fresh = moved = False
        for _attempt in range(3):
            try:
                upstream = await pool.acquire(
                    route.upstream_host,
                    port,
                    settings.connect_timeout,
                    fresh=fresh,
                    max_idle_age=None if retry_allowed else _UNSAFE_REUSE_MAX_IDLE,
                    tunnel=route.pool_key,
                    preamble=preamble,
                )
            except PoolBusy:
                self.metrics.rejected.inc(reason="agent_busy")
                await self.page(
                    503,
                    "The agent for this tunnel has too many requests in progress.",
                    extra=((b"retry-after", b"1"),),
                )
                return
            except (TimeoutError, OSError) as exc:
                # a replica that cannot be dialled is ejected; nothing was sent, so
                # the request may go to another (issue 17)
                other = None if moved else self._replica_failed(route, "unreachable")
                if other is not None:
                    route, moved, fresh = other, True, False
                    continue
                await self._dial_failed(route, exc)
                return
            self.metrics.upstream_connections.inc(result="reused" if upstream.reused else "dialed")
            try:
                await self._exchange_h1(route, upstream, head, has_body, chunked)
                replica = route.replica
                if replica is not None and replica.backoff:
                    replica.balance.succeeded(replica)
                return
            except UpstreamFailed as failure:
                pool.discard(upstream)
                if (
                    failure.kind == "closed"
                    and upstream.reused
                    and retry_allowed
                    and not stream.response_started
                    and not fresh
                ):
                    fresh = True
                    continue  # a stale keep-alive connection: once more on a new one
                if (
                    failure.kind == "closed"
                    and not upstream.reused
                    and not stream.response_started
                    and not moved
                ):
                    other = self._replica_failed(route, "target", retry=retry_allowed)
                    if other is not None:
                        route, moved, fresh = other, True, False
                        continue
                await self._upstream_failed(route, failure, fresh_tunnel=not upstream.reused)
                return
            except BaseException:
                pool.discard(upstream)
                raise

    def _replica_failed(self, route: Route, kind: str, *, retry: bool = True) -> Route | None:
        """Passive check on a replica (``forward.py`` does the same for HTTP/1.1): eject
        it, and (``retry``) the tunnel's other replica to go to, if any."""
        replica = route.replica
        if replica is None:
            return None
        if replica.balance.failed(replica, self.loop.time(), kind):
            self.metrics.replica_ejections.inc(tunnel=route.tunnel_id, agent=replica.agent_id)
        other = another_replica(route, self.loop.time(), self.client_ip) if retry else None
        if other is not None:
            self.metrics.replica_retries.inc(tunnel=route.tunnel_id, reason="replica_failed")
            self.route, self.upstream = other, other.upstream_host
        return other

    async def _dial_failed(self, route: Route, exc: BaseException) -> None:
        refused = isinstance(exc, ConnectionRefusedError)
        kind = "refused" if refused else "unreachable"
        self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=kind)
        reason = (
            "The agent refused the connection."
            if refused
            else "The agent for this tunnel is unreachable."
        )
        await self.page(502, reason)

    async def _upstream_failed(
        self, route: Route, failure: UpstreamFailed, *, fresh_tunnel: bool
    ) -> None:
        stream = self.stream
        self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=failure.kind)
        if stream.response_started:
            # a truncated answer must never look complete: the client sees a reset
            self.record(self.status, self.loop.time() - stream.started)
            stream.reset(ErrorCodes.INTERNAL_ERROR)
            return
        if failure.kind == "closed" and fresh_tunnel and self.settings.tunnel_header:
            failure = UpstreamFailed(
                "target",
                "The local service refused the connection or is unreachable "
                "(reported by the agent).",
            )
        await self.page(504 if failure.kind == "timeout" else 502, failure.reason)

    async def _exchange_h1(
        self,
        route: Route,
        upstream: UpstreamConnection,
        head: bytes,
        has_body: bool,
        chunked: bool,
    ) -> None:
        stream = self.stream
        upstream.begin(stream.method)
        upstream.writer.write(head)
        pump: asyncio.Task[None] | None = None
        if has_body:
            pump = asyncio.ensure_future(self._pump_h1(route, upstream, chunked))
        else:
            upstream.request_done = True
            self.sent_at = self.loop.time()
        try:
            while True:
                response = await self._h1_head(upstream, pump)
                if response is None:
                    return  # the body failed; answered
                if response.status >= 200:
                    break
                if response.status != 101:
                    stream.respond(response.status, _client_fields(response.headers))
            await self._relay_h1(route, upstream, response)
            if upstream.reusable() and not self.server.closing:
                self.server.pool.release(upstream)
            else:
                self.server.pool.discard(upstream)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            if pump is not None:
                with contextlib.suppress(BaseException):
                    await pump

    async def _pump_h1(self, route: Route, upstream: UpstreamConnection, chunked: bool) -> None:
        stream = self.stream
        writer = upstream.writer
        timeout = self.settings.body_idle_timeout
        max_body = self.limits.max_body_bytes
        received = 0
        count = self.metrics.request_bytes
        while True:
            try:
                data = await stream.read(timeout)
            except TimeoutError:
                raise ClientTimeout from None
            if not data:
                if chunked:
                    writer.write(h1.LAST_CHUNK)  # (the client's trailers are dropped)
                upstream.request_done = True
                self.sent_at = self.loop.time()
                return
            received += len(data)
            if max_body is not None and received > max_body:
                raise BodyTooLarge
            count.inc(len(data), tunnel=route.tunnel_id)
            writer.write(h1.encode_chunk(data) if chunked else data)
            try:
                await drain(writer, timeout)
            except (ConnectionError, OSError, TimeoutError):
                stream.discard_body()  # the agent stopped reading: it may have answered
                return

    async def _h1_head(
        self, upstream: UpstreamConnection, pump: asyncio.Task[None] | None
    ) -> h1.ResponseHead | None:
        """The agent's next response head, while the body may still be pumped; None
        when the body failed and a page answered it."""
        read = asyncio.ensure_future(next_response_head(upstream))
        limit = self.settings.response_header_timeout
        try:
            while pump is not None and not pump.done() and not read.done():
                await asyncio.wait({read, pump}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done() and pump is not None and pump.done():
                exc = pump.exception()
                if exc is not None:
                    await self._body_failed(upstream, exc)
                    return None
            if not read.done():
                sent = self.sent_at if self.sent_at is not None else self.loop.time()
                remaining = sent + limit - self.loop.time()
                if remaining > 0:
                    await asyncio.wait({read}, timeout=remaining)
            if not read.done():
                raise UpstreamFailed(
                    "timeout", f"The agent did not answer within {limit:g} seconds."
                )
            return read.result()
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read

    async def _body_failed(self, upstream: UpstreamConnection, exc: BaseException) -> None:
        self.server.pool.discard(upstream)
        if isinstance(exc, BodyTooLarge):
            self.metrics.rejected.inc(reason="body_too_large")
            await self.page(413, "The request body is larger than allowed.")
        elif isinstance(exc, ClientTimeout):
            self.metrics.rejected.inc(reason="body_timeout")
            await self.page(408, "The request body did not arrive in time.")
        else:
            raise exc

    async def _relay_h1(
        self, route: Route, upstream: UpstreamConnection, response: h1.ResponseHead
    ) -> None:
        stream = self.stream
        responses = upstream.responses
        headers = _client_fields(response.headers)
        if response.chunked:
            headers = [(k, v) for k, v in headers if k != b"content-length"]
        if self.set_cookie is not None:
            headers.append(self.set_cookie)
        self.status = response.status
        count = self.metrics.response_bytes_for(route.tunnel_id)
        timeout = self.settings.body_idle_timeout
        started = stream.started
        if responses.state != h1.BODY:
            stream.respond(response.status, headers, end=True)
            self.record(response.status, self.loop.time() - started)
            return
        stream.respond(response.status, headers)
        try:
            while True:
                try:
                    body = responses.body()
                except h1.ProtocolError:
                    raise UpstreamFailed("closed", "The agent broke off its response.") from None
                done = responses.state != h1.BODY
                if body or done:
                    if body:
                        count(len(body))
                    await stream.send(body, end=done)
                if done:
                    break
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
                    responses.eof()
                except h1.ProtocolError:
                    raise UpstreamFailed("closed", "The agent broke off its response.") from None
        finally:
            if stream.response_done:
                self.record(response.status, self.loop.time() - started)

    # -- forwarding as HTTP/2 (gRPC) ---------------------------------------------------

    async def _forward_h2(
        self, route: Route, fields: Headers, target: bytes, access: Access
    ) -> None:
        stream = self.stream
        settings = self.settings
        forwarded = request_headers_for_agent(
            fields,
            client_ip=self.client_ip,
            peer_ip=self.session.peer_ip,
            proto=self.session.proto,
            chunked=False,
            upgrade=False,
            identity=access.identity,
            strip_own_cookies=access.own_cookies,
        )
        if route.path_prefix and target.startswith(b"/"):
            target = route.path_prefix.encode("latin-1") + target
        authority = forwarded[0][1] if forwarded and forwarded[0][0] == b"host" else b""
        headers = [
            (b":method", stream.method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", target),
            *(f for f in forwarded if f[0] != b"host"),
        ]
        if get_header(fields, b"te") == b"trailers":
            headers.append((b"te", b"trailers"))
        end = stream.ended and stream.body_in == 0
        try:
            upstream = await self.server.h2_upstreams.open(
                route.upstream_host,
                route.upstream_port or settings.upstream_port,
                route.tunnel_id,
                route.pool_key,
                headers,
                end,
            )
        except (TimeoutError, OSError) as exc:
            await self._dial_failed(route, exc)
            return
        except UpstreamFailed as failure:
            self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=failure.kind)
            await self.page(504 if failure.kind == "timeout" else 502, failure.reason)
            return
        if end:
            self.sent_at = self.loop.time()
        pump = None if end else asyncio.ensure_future(self._pump_h2(route, upstream))
        try:
            await self._relay_h2(route, upstream, pump)
        finally:
            if not upstream.local_ended:
                upstream.cancel()
            if pump is not None and not pump.done():
                pump.cancel()
            if pump is not None:
                with contextlib.suppress(BaseException):
                    await pump

    async def _pump_h2(self, route: Route, upstream: UpstreamStream) -> None:
        stream = self.stream
        timeout = self.settings.tunnel_idle_timeout
        count = self.metrics.request_bytes
        while True:
            data = await stream.read(timeout)
            if not data:
                upstream.end(stream.trailers)
                self.sent_at = self.loop.time()
                return
            count.inc(len(data), tunnel=route.tunnel_id)
            await upstream.send(data, timeout)

    async def _relay_h2(
        self, route: Route, upstream: UpstreamStream, pump: asyncio.Task[None] | None
    ) -> None:
        stream = self.stream
        first = await self._h2_head(upstream, pump)
        if first is None:
            return
        kind = first[0]
        if kind != "head":
            failure = (
                first[1]
                if kind == "failed"
                else UpstreamFailed("closed", "The service reset the stream before answering.")
            )
            self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=failure.kind)
            await self.page(504 if failure.kind == "timeout" else 502, failure.reason)
            return
        status, headers = _h2_response_fields(first[1])
        if status < 200 or status == 101:
            upstream.cancel(ErrorCodes.PROTOCOL_ERROR)
            await self.page(502, "The service sent an invalid HTTP/2 response.")
            return
        self.status = status
        started = stream.started
        try:
            stream.respond(status, headers, end=first[2])
        except Exception:
            await self.page(502, "The service sent an invalid HTTP/2 response.")
            raise
        if first[2]:
            upstream.local_ended = True
            self.record(status, self.loop.time() - started)
            return
        count = self.metrics.response_bytes_for(route.tunnel_id)
        timeout = self.settings.tunnel_idle_timeout
        try:
            while True:
                try:
                    item = await upstream.next(timeout)
                except TimeoutError:
                    stream.reset(ErrorCodes.CANCEL)
                    return
                kind = item[0]
                if kind == "data":
                    if item[1]:
                        count(len(item[1]))
                        await stream.send(item[1])
                elif kind == "trailers":
                    stream.send_trailers(_h2_trailer_fields(item[1]))
                elif kind == "end":
                    if not stream.response_done:
                        await stream.send(b"", end=True)
                    if pump is not None and not pump.done() and not stream.ended:
                        pump.cancel()  # the service is done; the client may stop (NO_ERROR)
                    upstream.local_ended = upstream.local_ended or stream.ended
                    return
                else:  # reset, failed
                    code = item[1] if kind == "reset" else ErrorCodes.INTERNAL_ERROR
                    if kind == "failed":
                        self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=item[1].kind)
                    upstream.local_ended = True
                    stream.reset(code)
                    return
        finally:
            self.record(status, self.loop.time() - started)

    async def _h2_head(
        self, upstream: UpstreamStream, pump: asyncio.Task[None] | None
    ) -> tuple[Any, ...] | None:
        """The origin's first event, while the client may still be streaming: the
        response-head deadline counts from the end of the client's side."""
        read = asyncio.ensure_future(upstream.next(self.settings.tunnel_idle_timeout))
        limit = self.settings.response_header_timeout
        try:
            while pump is not None and not pump.done() and not read.done():
                await asyncio.wait({read, pump}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done() and pump is not None and pump.done():
                exc = pump.exception()
                if isinstance(exc, UpstreamFailed):
                    pass  # the origin's own event says more; wait for it below
                elif exc is not None:
                    raise exc
            if not read.done():
                sent = self.sent_at if self.sent_at is not None else self.loop.time()
                remaining = sent + limit - self.loop.time()
                if remaining > 0:
                    await asyncio.wait({read}, timeout=remaining)
            if not read.done():
                return (
                    "failed",
                    UpstreamFailed(
                        "timeout", f"The service did not answer within {limit:g} seconds."
                    ),
                )
            try:
                return read.result()
            except TimeoutError:
                return ("failed", UpstreamFailed("timeout", "The service stalled."))
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read


#: fields HTTP/2 forbids in a response (RFC 9113 §8.2.2), beyond the hop-by-hop ones
_H2_FORBIDDEN = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def _client_fields(headers: Headers) -> Headers:
    """An HTTP/1.1 response's fields as an HTTP/2 client gets them."""
    return [
        (name, value)
        for name, value in response_headers_for_client(headers)
        if name not in _H2_FORBIDDEN and name[:1] != b":" and _TOKEN.fullmatch(name)
    ]


def _h2_response_fields(headers: Headers) -> tuple[int, Headers]:
    status = 0
    out: Headers = []
    for name, value in headers:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif name[:1] != b":" and name not in _H2_FORBIDDEN:
            out.append((name, value))
    return status, out


def _h2_trailer_fields(headers: Headers) -> Headers:
    return [(n, v) for n, v in headers if n[:1] != b":" and n not in _H2_FORBIDDEN]
