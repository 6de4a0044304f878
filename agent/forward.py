"""Forwarding on the agent: connections arriving through WireGuard → local targets.

Theory of operation
-------------------
The gateway's proxy already does everything an HTTP hop needs (h11 on both sides,
keep-alive, streaming and chunked bodies, ``Expect: 100-continue``, WebSocket upgrade,
clear error pages), and its TCP/UDP forwarders splice raw tunnels with half-close and
back-pressure.  The agent reuses them, pointed the other way:

* one routing table (:class:`gateway.proxy.router.Router`) built with an upstream
  resolver, so a tunnel's route leads to its ``target`` (``host:port`` or an
  ``http(s)://host:port/prefix`` URL on this machine) instead of its ``agentIp``;
* HTTP tunnels: the user-space stack listens on ``agentIP:80``; each accepted stream is
  served by a :class:`~gateway.proxy.http.ProxyServer` that routes on Host, keeps the
  gateway's ``X-Forwarded-*`` as they are, applies no per-client limits (every peer is
  a gateway speaking for many clients) and calls the upstream "local service" in its
  pages: 404 for a host with no tunnel, 503 for a disabled one, 502 when the local
  service refuses or is unreachable, 504 when it does not answer;
* raw TCP tunnels: a :class:`~gateway.proxy.tcp.TcpForwarder` whose listeners are on
  the user-space stack (``agentIP:publicPort``) and whose dialer reaches the target
  (connect timeout; a refused target resets the tunnelled connection);
* UDP tunnels: a :class:`~gateway.proxy.udp.UdpForwarder` bound on the stack, with one
  kernel UDP socket per flow towards the target and an idle timeout per flow.

``https://`` targets are dialled with TLS (SNI = the target host, no certificate
verification: the service is local and usually self-signed; the public side of the
tunnel is where trust is established).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from agent.targets import Target
from gateway.proxy.http import ProxyServer
from gateway.proxy.limits import LimitSettings
from gateway.proxy.metrics import Metrics
from gateway.proxy.router import Router
from gateway.proxy.settings import ProxySettings
from gateway.proxy.tcp import TcpForwarder, TcpSettings
from gateway.proxy.udp import UdpForwarder, UdpSettings
from netstack.aio import NetstackServer
from netstack.tunnel import UserspaceTunnel

log = logging.getLogger("agent.forward")

#: the agent's peers are gateways: per-client limits would throttle everybody at once
_NO_CLIENT_LIMITS = LimitSettings(
    rate=0, max_connections_per_client=0, max_connections=0, max_body_bytes=None
)


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
        self.proxy = ProxyServer(
            self.router,
            self.dialer,
            settings=ProxySettings(
                connect_timeout=connect_timeout,
                preserve_forwarded=True,
                upstream_name="local service",
                limits=_NO_CLIENT_LIMITS,
            ),
            metrics=self.metrics,
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
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.proxy.serve_connection(reader, writer, "http")

        self._http = await self.tunnel.start_server(on_connect, self.http_port)
        await self.tcp.start()
        await self.udp.start()

    async def wait_reconciled(self, within: float = 5.0) -> None:
        """Until the TCP/UDP listeners match the routing table (tests, tools)."""
        await self.tcp.wait_reconciled(within)
        await self.udp.wait_reconciled(within)

    async def close(self) -> None:
        """Stop accepting; let in-flight HTTP requests finish (bounded); end the rest."""
        if self._http is not None:
            self._http.close()
        await self.proxy.close()
        await self.tcp.close()
        await self.udp.close()
