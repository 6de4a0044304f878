"""Settings of the HTTP proxy (a frozen value shared by the listener and forwarding code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.relay.accesslog import AccessLogSettings
from common.relay.limits import LimitSettings

from .h2settings import H2Settings


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Timeouts, pool size and limits of the HTTP proxy (seconds, bytes)."""

    #: port the agent accepts HTTP tunnels' connections on inside WireGuard
    upstream_port: int = 80
    #: open each agent connection with a PROXY v2 header naming the tunnel
    #: (``common.relay.proxyproto``): the agent splices it to that tunnel's
    #: target without parsing HTTP.  Off only in front of a plain HTTP upstream.
    tunnel_header: bool = True
    #: dialling an agent (through WireGuard); exceeded -> 502 "agent unreachable"
    connect_timeout: float = 5.0
    #: from request fully sent to the agent's response head; exceeded -> 504
    response_header_timeout: float = 60.0
    #: longest silence while streaming a body in either direction
    body_idle_timeout: float = 60.0
    #: longest silence on an upgraded (WebSocket) connection in both directions
    tunnel_idle_timeout: float = 3600.0
    #: idle keep-alive connections kept per agent, and for how long
    pool_max_idle_per_agent: int = 64
    pool_idle_timeout: float = 4.0
    #: connections to one agent in use at once (beyond: 503, protecting the agent)
    max_active_per_agent: int = 1024
    #: how long ``close()`` lets in-flight requests finish
    shutdown_timeout: float = 10.0
    #: networks (CIDR) of load balancers in front of the gateway whose
    #: X-Forwarded-For is believed; empty = the TCP peer is always the client
    trusted_proxies: tuple[str, ...] = ()
    #: the access log (``common.relay.accesslog``; off unless it has a path)
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    #: CA bundle for the tunnels' OIDC providers (None: the system's trust store)
    oidc_ca_file: str | None = None
    limits: LimitSettings = field(default_factory=LimitSettings)
    #: HTTP/2 at the edge (``h2session.py``)
    http2: H2Settings = field(default_factory=H2Settings)

    def __post_init__(self) -> None:
        positive = (
            "connect_timeout",
            "response_header_timeout",
            "body_idle_timeout",
            "tunnel_idle_timeout",
            "pool_idle_timeout",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if not 0 < self.upstream_port < 65536:
            raise ValueError("upstream_port must be a TCP port (1-65535)")
        for name in ("pool_max_idle_per_agent", "max_active_per_agent", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
