"""The gateway's public data path: Host routing, HTTP reverse proxy, raw TCP tunnels,
protection limits and metrics.

Wiring (see each module's docstring for the theory of operation)::

    router = Router()                          # fed by the control client
    metrics = Metrics()                        # shared by everything below
    proxy = ProxyServer(router, dialer, ProxySettings(), metrics)
    proxy.challenge_responder = store.respond  # ACME HTTP-01 (path -> key authz)
    proxy.redirect_https = True                # optional, plain-HTTP listeners only
    await proxy.start("0.0.0.0", 80)           # and/or 443 with an ssl_context
    tcp = TcpForwarder(router, dialer, TcpSettings(), metrics)
    await tcp.start()                          # follows the router's tcp tunnels
    udp = UdpForwarder(router, None, UdpSettings(), metrics)   # flow dialer: kernel UDP
    await udp.start()
    admin = AdminServer(metrics)
    await admin.start("127.0.0.1", 9901)       # /metrics and /healthz
"""

from common.relay.admin import AdminServer
from common.relay.dial import Dialer, open_tcp
from common.relay.limits import LimitSettings
from common.relay.metrics import Metrics, Registry
from common.relay.router import PortRoute, Route, Router
from common.relay.tcp import TcpForwarder, TcpSettings
from common.relay.udp import FlowDialer, UdpForwarder, UdpSettings, open_udp_flow

from .http import ProxyServer, ProxySettings

__all__ = [
    "AdminServer",
    "Dialer",
    "FlowDialer",
    "LimitSettings",
    "Metrics",
    "PortRoute",
    "ProxyServer",
    "ProxySettings",
    "Registry",
    "Route",
    "Router",
    "TcpForwarder",
    "TcpSettings",
    "UdpForwarder",
    "UdpSettings",
    "open_tcp",
    "open_udp_flow",
]
