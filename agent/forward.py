"""Forwarding on the agent: connections arriving through WireGuard → local targets.

Theory of operation
-------------------
The agent never parses HTTP: the gateway has already routed, rewritten and admitted
every request before a byte enters the tunnel.

* HTTP tunnels: the user-space stack listens on ``agentIP:80``.  Every connection
  starts with a PROXY v2 header naming its tunnel (``kakuremichi.relay.proxyproto``);
  the agent reads it (bounded in size and time), looks the tunnel up by id, dials its
  target (``host:port``, or the host and port of an ``http(s)://`` URL target: the
  gateway already applied the URL's path prefix) and splices bytes both ways with
  half-close and back-pressure (``kakuremichi.relay.splice``).  A connection whose
  header is missing, malformed, late, or names a tunnel this agent does not serve (or
  has disabled) is reset without dialling anything; a target that refuses or does not
  answer within ``connect_timeout`` resets the tunnelled connection too, which the
  gateway turns into its 502 page.  The gateway pools these connections per tunnel,
  so one connection carries many requests of that tunnel.
* raw TCP tunnels: a :class:`~kakuremichi.relay.tcp.TcpForwarder` whose listeners are
  on the user-space stack (``agentIP:publicPort``) and whose dialer reaches the target
  (connect timeout; a refused target resets the tunnelled connection);
* UDP tunnels: a :class:`~kakuremichi.relay.udp.UdpForwarder` bound on the stack, with
  one kernel UDP socket per flow towards the target and an idle timeout per flow.

``https://`` targets are dialled with TLS (SNI = the target host, no certificate
verification: the service is local and usually self-signed; the public side of the
tunnel is where trust is established).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from kakuremichi.relay import proxyproto
from kakuremichi.relay.metrics import Metrics
from kakuremichi.relay.router import Router
from kakuremichi.relay.splice import close_writer, splice
from kakuremichi.relay.targets import Target
from kakuremichi.relay.tcp import TcpForwarder, TcpSettings
from kakuremichi.relay.udp import UdpForwarder, UdpSettings
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

    def update(self, tunnels: list[dict[str, Any]]) -> None:
        tls = set()
        for tunnel in tunnels:
            try:
                target = Target.parse(str(tunnel.get("target", "")))
            except ValueError:
                continue
            if target.tls:
                tls.add((target.host, target.port))
        self.tls = tls

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
    """The agent's HTTP-tunnel listener: PROXY header → tunnel → splice to its target."""

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
        self._connections: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one tunnelled connection until both directions end; never raises."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        target_writer: asyncio.StreamWriter | None = None
        reset = True
        self.metrics.connection_opened("http_tunnel")
        try:
            try:
                header = await proxyproto.read_header(reader, self.header_timeout)
            except proxyproto.ProxyHeaderError as exc:
                self.metrics.rejected.inc(reason="proxy_header")
                log.warning("refused a tunnelled connection: %s", exc)
                return
            tunnel_id = header.tunnel_id
            route = self.router.lookup_tunnel(tunnel_id) if tunnel_id is not None else None
            if route is None or not route.enabled:
                self.metrics.rejected.inc(reason="unknown_tunnel")
                log.warning(
                    "refused a connection for a tunnel this agent does not serve: %r",
                    (tunnel_id or "")[:64],
                )
                return
            tunnel = route.tunnel_id
            self.metrics.http_tunnel_connections.inc(tunnel=tunnel)
            try:
                target_reader, target_writer = await self.dialer(
                    route.agent_ip, route.upstream_port or 80, self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                kind = "refused" if isinstance(exc, ConnectionRefusedError) else "unreachable"
                self.metrics.upstream_errors.inc(tunnel=tunnel, kind=kind)
                return
            reset = False
            try:
                await splice(
                    reader,
                    writer,
                    target_reader,
                    target_writer,
                    idle_timeout=self.idle_timeout,
                    on_a_to_b=lambda n: self.metrics.http_tunnel_bytes.inc(
                        n, tunnel=tunnel, direction="in"
                    ),
                    on_b_to_a=lambda n: self.metrics.http_tunnel_bytes.inc(
                        n, tunnel=tunnel, direction="out"
                    ),
                )
            except (ConnectionError, OSError, TimeoutError):
                reset = True  # a broken side: the other must not see a clean end
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error in a tunnelled HTTP connection")
        finally:
            self.metrics.connection_closed("http_tunnel")
            self._connections.discard(task)
            if target_writer is not None:
                await close_writer(target_writer, abort=reset)
            await close_writer(writer, abort=reset)

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Let open connections end on their own for ``grace`` seconds, then end them."""
        tasks = list(self._connections)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
            ),
            metrics=self.metrics,
            bind=tunnel.create_datagram_endpoint,
        )
        self._http: NetstackServer | None = None

    def update(self, tunnels: list[dict[str, Any]]) -> None:
        """Install Control's current tunnel list (malformed entries are skipped)."""
        self.dialer.update(tunnels)
        self.router.replace_all(tunnels)

    async def start(self) -> None:
        self._http = await self.tunnel.start_server(self.http.serve, self.http_port)
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
