"""Forwarding on the agent: connections arriving through WireGuard → local targets.

Theory of operation
-------------------
The agent never parses HTTP: the gateway has already routed, rewritten and admitted
every request before a byte enters the tunnel.

* HTTP tunnels: the user-space stack listens on ``agentIP:80``.  Every connection
  starts with a PROXY v2 header naming its tunnel (``common.relay.proxyproto``);
  the agent reads it (bounded in size and time), looks the tunnel up by id, dials its
  target (``host:port``, or the host and port of an ``http(s)://`` URL target: the
  gateway already applied the URL's path prefix) and splices bytes both ways with
  half-close and back-pressure (``common.relay.splice``).  A connection whose
  header is missing, malformed, late, or names a tunnel this agent does not serve (or
  has disabled) is reset without dialling anything; a target that refuses or does not
  answer within ``connect_timeout`` resets the tunnelled connection too, which the
  gateway turns into its 502 page.  The gateway pools these connections per tunnel,
  so one connection carries many requests of that tunnel.  Hence a change of
  Control's tunnel list also ends open connections (``HttpTunnels.reconcile``): those
  of a tunnel deleted or disabled, and those whose tunnel's target moved (a pooled
  connection would otherwise keep reaching the old target for as long as requests
  keep it busy).  The gateway's next request of such a tunnel dials afresh.
* raw TCP tunnels: a :class:`~common.relay.tcp.TcpForwarder` whose listeners are
  on the user-space stack (``agentIP:publicPort``) and whose dialer reaches the target
  (connect timeout; a refused target resets the tunnelled connection).  A tunnel with
  ``proxyProtocol`` comes to the HTTP tunnels' port instead, its PROXY header carrying
  the client's address (command PROXY) besides the tunnel id; the agent sends the
  target that address in the tunnel's version (v1 text, v2 binary) before the client's
  bytes (``common.relay.tcp`` says why, and what happens during a change);
* UDP tunnels: a :class:`~common.relay.udp.UdpForwarder` bound on the stack, with
  one kernel UDP socket per flow towards the target and an idle timeout per flow
  (those with ``proxyProtocol`` also on the tunnel port, over UDP, with a header per
  datagram).

``https://`` targets are dialled with TLS (SNI = the target host, no certificate
verification: the service is local and usually self-signed; the public side of the
tunnel is where trust is established).  A connection whose PROXY header carries the
ALPN TLV ``h2`` (the gateway speaks HTTP/2 through it, for gRPC) offers ``h2`` in that
handshake, so the service answers in HTTP/2 over TLS; without it no ALPN is offered
(the gateway speaks HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence

from common.protocol import TunnelSpec
from common.relay import proxyproto
from common.relay.metrics import Metrics
from common.relay.pipe import TransportSplice
from common.relay.router import PortRoute, Route, Router
from common.relay.targets import Target
from common.relay.tcp import TcpForwarder, TcpSettings
from common.relay.udp import UdpForwarder, UdpSettings
from netstack.aio import NetstackServer
from netstack.tunnel import UserspaceTunnel

log = logging.getLogger("agent.forward")

#: a gateway writes its PROXY header with the connection's first bytes
HEADER_TIMEOUT = 10.0
#: how long ``close()`` lets spliced HTTP connections end on their own (the gateway
#: closes its idle pooled ones within seconds)
SHUTDOWN_GRACE = 5.0


def resolve_target(text: str) -> tuple[str, int, str]:
    """A tunnel's target → (host, port, path prefix) for the router."""
    target = Target.parse(text)
    return target.host, target.port, target.path_prefix


class LocalDialer:
    """Opens streams to local targets; TLS for those given as ``https://`` URLs."""

    def __init__(self) -> None:
        self.tls: set[tuple[str, int]] = set()
        self._context = ssl.create_default_context()
        self._context.check_hostname = False
        self._context.verify_mode = ssl.CERT_NONE
        self._h2_context = ssl.create_default_context()
        self._h2_context.check_hostname = False
        self._h2_context.verify_mode = ssl.CERT_NONE
        self._h2_context.set_alpn_protocols(["h2"])

    def update(self, tunnels: Iterable[TunnelSpec]) -> None:
        tls = set()
        for tunnel in tunnels:
            try:
                target = Target.parse(tunnel.target)
            except ValueError:
                continue
            if target.tls:
                tls.add((target.host, target.port))
        self.tls = tls

    async def connect(
        self,
        protocol: asyncio.Protocol,
        host: str,
        port: int,
        timeout: float,  # noqa: ASYNC109 - like the dialer interface
        *,
        h2: bool = False,
    ) -> asyncio.Transport:
        """Connect ``protocol`` to a target (no streams): the HTTP tunnels' splice
        (``h2``: offer ALPN h2 if the target is TLS)."""
        secure = (host, port) in self.tls
        loop = asyncio.get_running_loop()
        context = self._h2_context if h2 else self._context
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: protocol,
                host,
                port,
                ssl=context if secure else None,
                server_hostname=host if secure else None,
            ),
            timeout,
        )
        return transport

    async def __call__(
        self,
        host: str,
        port: int,
        timeout: float,  # noqa: ASYNC109 - the dialer interface takes a timeout
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        secure = (host, port) in self.tls
        return await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=self._context if secure else None,
                server_hostname=host if secure else None,
            ),
            timeout,
        )


class HttpTunnels:
    """The agent's HTTP-tunnel listener: PROXY header → tunnel → splice to its target.

    ``protocol`` is the protocol factory for the listener (the user-space stack's
    ``create_server``, or ``loop.create_server`` in tests); each connection is a
    :class:`_TunnelledConnection` until its header is read, then one end of a
    :class:`~common.relay.pipe.TransportSplice` with the target's connection.
    """

    def __init__(
        self,
        router: Router,
        dialer: LocalDialer,
        metrics: Metrics,
        *,
        connect_timeout: float,
        idle_timeout: float = 3600.0,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.router = router
        self.dialer = dialer
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        #: connections being read, dialled or spliced (ended by ``close``)
        self.open: set[_TunnelledConnection] = set()
        self._byte_counters: dict[tuple[str, str, bool], Callable[[float], None]] = {}

    def protocol(self) -> asyncio.Protocol:
        return _TunnelledConnection(self)

    def count_bytes(
        self, tunnel: str, direction: str, raw: bool = False
    ) -> Callable[[float], None]:
        """The metrics counter of one (tunnel, direction), its label key built once
        (``raw``: a raw TCP tunnel's, counted with the other raw TCP bytes)."""
        key = (tunnel, direction, raw)
        counter = self._byte_counters.get(key)
        if counter is None:
            family = self.metrics.tcp_bytes if raw else self.metrics.http_tunnel_bytes
            counter = family.child(tunnel=tunnel, direction=direction)
            self._byte_counters[key] = counter
        return counter

    def current(self, route: Route | PortRoute) -> Route | PortRoute | None:
        """The router's route now for the tunnel a connection was dialled for."""
        if isinstance(route, PortRoute):
            return self.router.lookup_raw_tunnel(route.tunnel_id)
        return self.router.lookup_tunnel(route.tunnel_id)

    def reconcile(self) -> int:
        """End open connections the router no longer allows as they were dialled:
        tunnel deleted or disabled, or its target changed.  Returns how many."""
        ended = 0
        for connection in list(self.open):
            route = connection.route
            # no route yet: still reading its header, judged by the new table then
            if route is None or connection.aborted:
                continue
            now = self.current(route)
            if now is None or not now.enabled or now.target != route.target:
                why = "deleted" if now is None else "disabled" if not now.enabled else "retargeted"
                log.info(
                    "ending a tunnelled connection of tunnel %s: %s", route.tunnel_id[:64], why
                )
                connection.abort()
                ended += 1
        return ended

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Let open connections end on their own for ``grace`` seconds, then end them."""
        waiting = [c.finished for c in self.open]
        if waiting:
            await asyncio.wait(waiting, timeout=grace)
        for connection in list(self.open):
            connection.abort()
        if waiting:
            await asyncio.wait(waiting, timeout=1.0)


class _TunnelledConnection(asyncio.Protocol):
    """One connection from a gateway until its PROXY header is read and its target
    dialled (see the module docstring); then its transport belongs to the splice."""

    def __init__(self, owner: HttpTunnels) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.splice: TransportSplice | None = None
        #: the route the connection was dialled for (set once its header is read)
        self.route: Route | PortRoute | None = None
        self.aborted = False
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self._deadline: asyncio.TimerHandle | None = None
        self._dial: asyncio.Task[None] | None = None

    # -- the header phase (asyncio.Protocol) ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.open.add(self)
        self.owner.metrics.connection_opened("http_tunnel")
        self._deadline = self.loop.call_later(self.owner.header_timeout, self._header_late)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < proxyproto.FIXED_BYTES:
            if not proxyproto.SIGNATURE.startswith(bytes(self.buffer[:12])):
                self._refuse("proxy_header", "no PROXY v2 signature")
            return
        try:
            total = proxyproto.header_length(bytes(self.buffer[: proxyproto.FIXED_BYTES]))
            if len(self.buffer) < total:
                return
            header = proxyproto.decode(bytes(self.buffer[:total]))
        except proxyproto.ProxyHeaderError as exc:
            self._refuse("proxy_header", str(exc))
            return
        rest = bytes(self.buffer[total:])
        self.buffer.clear()
        self._header_done(header, rest)

    def eof_received(self) -> bool:
        self._refuse("proxy_header", "connection ended inside the PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    # -- after the header -------------------------------------------------------------

    def _header_done(self, header: proxyproto.ProxyHeader, rest: bytes) -> None:
        owner = self.owner
        tunnel_id = header.tunnel_id
        route: Route | PortRoute | None = (
            owner.router.lookup_tunnel(tunnel_id) if tunnel_id is not None else None
        )
        prefix = b""
        raw = route is None and tunnel_id is not None
        if raw and tunnel_id is not None:
            route = owner.router.lookup_raw_tunnel(tunnel_id)
            if route is not None and route.protocol != "tcp":
                route = None
        if route is None or not route.enabled:
            self._refuse(
                "unknown_tunnel",
                f"for a tunnel this agent does not serve: {(tunnel_id or '')[:64]!r}",
            )
            return
        if isinstance(route, PortRoute):  # a raw TCP tunnel with proxyProtocol
            if (
                header.command != proxyproto.COMMAND_PROXY
                or header.transport != "tcp"
                or header.source is None
                or header.destination is None
            ):
                self._refuse(
                    "unknown_tunnel",
                    f"for raw tunnel {route.tunnel_id[:64]!r} without the client's address",
                )
                return
            if route.proxy_protocol is not None:  # None: the gateway saw the setting first
                prefix = proxyproto.target_header(
                    route.proxy_protocol, header.source, header.destination
                )
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.route = route
        tunnel = route.tunnel_id
        if raw:
            owner.metrics.tcp_connections.inc(tunnel=tunnel)
        else:
            owner.metrics.http_tunnel_connections.inc(tunnel=tunnel)
        splice = TransportSplice(
            idle_timeout=owner.idle_timeout,
            on_a_to_b=owner.count_bytes(tunnel, "in", raw),
            on_b_to_a=owner.count_bytes(tunnel, "out", raw),
        )
        assert self.transport is not None
        self.transport.pause_reading()
        splice.attach(splice.a, self.transport)  # from now on the splice reads this connection
        self.splice = splice
        h2 = header.tlv(proxyproto.TLV_ALPN) == b"h2"
        self._dial = self.loop.create_task(self._connect(route, rest, h2, prefix))

    async def _connect(
        self, route: Route | PortRoute, rest: bytes, h2: bool, header: bytes = b""
    ) -> None:
        owner, splice = self.owner, self.splice
        assert splice is not None
        try:
            await owner.dialer.connect(
                splice.b,
                route.upstream_host,
                route.upstream_port or 80,
                owner.connect_timeout,
                h2=h2,
            )
        except (OSError, TimeoutError) as exc:
            kind = "refused" if isinstance(exc, ConnectionRefusedError) else "unreachable"
            owner.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind=kind)
            splice.abort()  # the gateway turns the reset into its 502 page
        except asyncio.CancelledError:
            splice.abort()
        else:
            if header and splice.b.transport is not None and not splice.b.lost:
                splice.b.transport.write(header)  # the target's PROXY header: not counted
            splice.start(rest)
        try:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await splice.done
        finally:
            self._end()

    def abort(self) -> None:
        """End this connection now (shutdown, or its tunnel changed)."""
        self.aborted = True
        if self.splice is not None:
            if not self.splice.started and self._dial is not None:
                self._dial.cancel()  # still dialling (once spliced, its end ends the task)
            self.splice.abort()
        elif self.transport is not None:
            self.transport.abort()

    def _header_late(self) -> None:
        self._deadline = None
        self._refuse("proxy_header", "no PROXY header in time")

    def _refuse(self, reason: str, detail: str) -> None:
        self.owner.metrics.rejected.inc(reason=reason)
        log.warning("refused a tunnelled connection: %s", detail)
        if self.transport is not None:
            self.transport.abort()
        self._end()

    def _end(self) -> None:
        if self.splice is not None and not self.splice.done.done():
            return  # the splice owns the transport now; it ends via _connect
        if self.finished.done():
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.owner.open.discard(self)
        self.owner.metrics.connection_closed("http_tunnel")
        self.finished.set_result(None)


class Forwarder:
    """HTTP, TCP and UDP tunnels of one agent (see the module docstring)."""

    def __init__(
        self,
        tunnel: UserspaceTunnel,
        *,
        http_port: int = 80,
        connect_timeout: float = 5.0,
        udp_idle_timeout: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.tunnel = tunnel
        self.http_port = http_port
        self.metrics = metrics if metrics is not None else Metrics()
        self.router = Router(upstream=resolve_target)
        self.dialer = LocalDialer()
        self.http = HttpTunnels(
            self.router, self.dialer, self.metrics, connect_timeout=connect_timeout
        )
        self.tcp = TcpForwarder(
            self.router,
            self.dialer,
            settings=TcpSettings(
                connect_timeout=connect_timeout, max_connections_per_client=0, max_connections=0
            ),
            metrics=self.metrics,
            listen=tunnel.start_server,
        )
        self.udp = UdpForwarder(
            self.router,
            settings=UdpSettings(
                flow_idle_timeout=udp_idle_timeout,
                max_flows_per_client=4096,
                max_flows_per_port=8192,
                tunnel_port=http_port,  # proxyProtocol datagrams: the same number, UDP
            ),
            metrics=self.metrics,
            bind=tunnel.create_datagram_endpoint,
        )
        self._http: NetstackServer | None = None

    def update(self, tunnels: Sequence[TunnelSpec]) -> None:
        """Install Control's current tunnels (one whose target does not parse is
        skipped, with a log line)."""
        self.dialer.update(tunnels)
        self.router.replace_all(tunnels)
        self.http.reconcile()

    async def start(self) -> None:
        self._http = await self.tunnel.create_server(self.http.protocol, self.http_port)
        await self.tcp.start()
        await self.udp.start()

    async def wait_reconciled(self, within: float = 5.0) -> None:
        """Until the TCP/UDP listeners match the routing table (tests, tools)."""
        await self.tcp.wait_reconciled(within)
        await self.udp.wait_reconciled(within)

    async def close(self) -> None:
        """Stop accepting; let open HTTP connections end (bounded); end the rest."""
        if self._http is not None:
            self._http.close()
        await self.http.close()
        await self.tcp.close()
        await self.udp.close()
