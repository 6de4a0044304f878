"""The agent's data plane: one user-space WireGuard device, every gateway a peer.

Theory of operation
-------------------
:class:`AgentDataPlane` owns a :class:`netstack.tunnel.UserspaceTunnel` (our WireGuard and
our TCP/IP stack on one outbound UDP socket: no root, no TUN, no inbound port).  Control's
``config`` lists the gateways; :meth:`AgentDataPlane.apply` reconciles the tunnel to it:
the stack holds the agent's virtual IP, each gateway is a peer with its endpoint, its
address as allowed-IPs and a persistent keepalive (the agent is behind NAT: it must
speak first and keep the mapping open).  Peers are added, updated and removed one by
one, so the other gateways' sessions are never disturbed.  When a gateway's endpoint
changes (it restarted on a new port, or moved) a fresh handshake starts at once
instead of waiting for the old session to time out.

:meth:`AgentDataPlane.watch` turns WireGuard's state into the log lines an operator
needs: a gateway's first handshake, a gateway that went quiet (no handshake for
longer than a session may live), and its recovery.  It also probes each gateway
through the tunnel every ``probe_interval`` seconds (a TCP SYN to its address on the
discard port, which a live gateway answers with a reset): that is data, so a gateway
that lost our session (restarted on the same port) makes WireGuard start a new
handshake after 15 s of silence, instead of the gateway staying unreachable until the
next rekey, minutes later (the gateway cannot initiate: it does not know our address).

Where UDP is blocked, a gateway's datagrams take the stream transport instead
(WireGuard over a WebSocket to the gateway's HTTPS port): :class:`agent.streams.Transports`
chooses per gateway (``--transport auto|udp|tcp``) and is ticked from :meth:`watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from common.keys import KeyPair
from common.logs import kv
from common.protocol import GatewayPeerSpec, check_endpoint
from common.relay.metrics import Registry
from netstack.tcp import TcpConfig
from netstack.tunnel import UserspaceTunnel
from netstack.wireguard.errors import ConfigError

from .paths import AUTO
from .streams import Gateway, Transports

log = logging.getLogger("agent.wireguard")

PERSISTENT_KEEPALIVE = 25
PROBE_INTERVAL = 30.0
PROBE_PORT = 9  # discard: nothing listens there, a live host answers with a reset
#: WireGuard's REJECT_AFTER_TIME: with keepalives flowing a session is renewed every
#: ~2 minutes, so a handshake older than this means the gateway does not answer
STALE_AFTER = 180.0
#: how the agent sends unless ``--congestion`` says otherwise: BBR, where the stack's own
#: default is CUBIC.  An agent's downloads cross home and cloud uplinks, where random
#: loss and tens of milliseconds are the rule: at 1% loss BBR sends 2.1x CUBIC's rate,
#: with 10 ms each way added 23x, and on a clean sub-millisecond path 0.94-0.99x
#: (bench/test_agent_bench.py, bench/test_e2e_bench.py; figures in the README).
DEFAULT_CONGESTION = "bbr"
# Before Control tells us our address the stack needs one; nothing routes to it.
_PLACEHOLDER = "169.254.255.253"


def parse_endpoint(text: str) -> tuple[str, int]:
    """``ip:port`` or ``[v6]:port`` → (ip, port); ValueError with the reason."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"endpoint {text!r} is not ip:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return str(ipaddress.ip_address(host)), int(port)


@dataclass(frozen=True)
class GatewayPeer:
    """One gateway as the agent peers with it."""

    id: str
    name: str
    public_key: str
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    #: the gateway's HTTPS listener, for the stream transport (None: it offers none)
    stream_endpoint: tuple[str, int] | None = None

    @property
    def label(self) -> str:
        return self.name or self.id

    @property
    def address(self) -> str | None:
        """Its address inside the tunnel (what probes go to)."""
        for prefix in self.allowed_ips[:1]:
            return str(ipaddress.ip_network(prefix, strict=False).network_address)
        return None


def gateways_from_config(entries: Iterable[GatewayPeerSpec]) -> list[GatewayPeer]:
    """The ``gateways`` section of an agent's config (parsed by ``common.protocol``)."""
    return [
        GatewayPeer(
            g.id,
            g.name,
            g.public_key,
            check_endpoint(g.endpoint) if g.endpoint is not None else None,
            g.allowed_ips,
            check_endpoint(g.stream_endpoint) if g.stream_endpoint is not None else None,
        )
        for g in entries
    ]


class AgentDataPlane:
    """WireGuard to every gateway plus the stack owning the agent's address."""

    def __init__(
        self,
        keys: KeyPair,
        host: str = "0.0.0.0",
        port: int = 0,
        mtu: int = 1420,
        keepalive: int = PERSISTENT_KEEPALIVE,
        probe_interval: float = PROBE_INTERVAL,
        transport: str = AUTO,
        registry: Registry | None = None,
        congestion: str = DEFAULT_CONGESTION,
    ) -> None:
        self.keys = keys
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.probe_interval = probe_interval
        # congestion: how the tunnelled connections send (cubic, newreno or bbr)
        self.tunnel = UserspaceTunnel(
            keys.private,
            [_PLACEHOLDER],
            mtu=mtu,
            tcp_config=TcpConfig(congestion_control=congestion),
        )
        self.address: str | None = None
        self.gateways: dict[str, GatewayPeer] = {}  # public key → peer
        self._up: dict[str, bool] = {}  # public key → had a live session at the last look
        #: UDP or the stream transport, per gateway
        self.transports = Transports(
            self.tunnel, transport, registry=registry, probe=self.probe_address
        )

    async def start(self) -> None:
        await self.tunnel.start(self.host, self.port)
        log.info(
            "WireGuard ready", extra=kv(udp_port=self.tunnel.port, public_key=self.keys.public_b64)
        )

    def apply(self, address: str | None, gateways: list[GatewayPeer]) -> bool:
        """Reconcile to Control's view; True if anything changed."""
        changed = False
        if address != self.address:
            try:
                ip = str(ipaddress.ip_address(address)) if address else _PLACEHOLDER
            except ValueError:
                log.error("config carries an invalid virtual IP", extra=kv(virtual_ip=address))
                ip = _PLACEHOLDER
            self.tunnel.set_addresses([ip])
            log.info("virtual IP set", extra=kv(virtual_ip=ip))
            self.address = address
            changed = True
        wanted = {g.public_key: g for g in gateways}
        for key in set(self.gateways) - set(wanted):
            gone = self.gateways.pop(key)
            self._up.pop(key, None)
            self.tunnel.remove_peer(key)
            log.info("gateway removed", extra=kv(gateway=gone.label))
            changed = True
        # before any peer exists: with --transport tcp, not even its first packet is UDP
        self.transports.update(
            [
                Gateway(key, g.label, g.endpoint, g.stream_endpoint, g.address)
                for key, g in wanted.items()
            ]
        )
        for key, gateway in wanted.items():
            before = self.gateways.get(key)
            if before == gateway:
                continue
            try:
                self.tunnel.set_peer(
                    key, gateway.allowed_ips, gateway.endpoint, persistent_keepalive=self.keepalive
                )
            except (ValueError, ConfigError) as exc:  # a bad or low-order key
                log.error("gateway rejected", extra=kv(gateway=gateway.label, reason=str(exc)))
                continue
            self.gateways[key] = gateway
            changed = True
            endpoint = f"{gateway.endpoint[0]}:{gateway.endpoint[1]}" if gateway.endpoint else None
            if before is None:
                log.info("gateway added", extra=kv(gateway=gateway.label, endpoint=endpoint))
            else:
                log.info("gateway updated", extra=kv(gateway=gateway.label, endpoint=endpoint))
                if gateway.endpoint is not None and gateway.endpoint != before.endpoint:
                    self.tunnel.initiate_handshake(key)
        return changed

    def check(self) -> None:
        """Log gateways whose session came up or went quiet since the last call."""
        for stat in self.tunnel.stats():
            gateway = self.gateways.get(stat.public_key)
            if gateway is None:
                continue
            up = stat.handshake_age is not None and stat.handshake_age < STALE_AFTER
            was = self._up.get(stat.public_key)
            if up and not was:
                log.info(
                    "gateway handshake complete",
                    extra=kv(
                        gateway=gateway.label,
                        endpoint=stat.endpoint,
                        transport=self.transports.describe(stat.public_key)[0],
                    ),
                )
            elif was and not up:
                log.warning(
                    "gateway not answering; retrying handshakes",
                    extra=kv(gateway=gateway.label, endpoint=stat.endpoint),
                )
            self._up[stat.public_key] = up

    def sessions(self) -> list[tuple[GatewayPeer, float | None]]:
        """Each configured gateway with the age of its last handshake in seconds
        (None: never); a session is live while that age is below ``STALE_AFTER``."""
        ages = {stat.public_key: stat.handshake_age for stat in self.tunnel.stats()}
        return [(gateway, ages.get(key)) for key, gateway in self.gateways.items()]

    async def probe(self, gateway: GatewayPeer) -> None:
        """One SYN to the gateway's tunnel address; any answer (or none) is fine."""
        if gateway.address is not None:
            await self.probe_address(gateway.address)

    async def probe_address(self, address: str) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            _, writer = await self.tunnel.open_connection(address, PROBE_PORT, timeout=5)
            writer.close()

    def transport_of(self, public_key: str) -> tuple[str, str]:
        """(``udp``/``tcp``, why) for one gateway."""
        return self.transports.describe(public_key)

    async def watch(self, interval: float = 0.5) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.probe_interval
        probes: set[asyncio.Task[None]] = set()
        try:
            while True:
                await asyncio.sleep(interval)
                self.transports.tick()
                self.check()
                if loop.time() >= next_probe and self.address:
                    next_probe = loop.time() + self.probe_interval
                    for gateway in list(self.gateways.values()):
                        task = loop.create_task(self.probe(gateway))
                        probes.add(task)
                        task.add_done_callback(probes.discard)
        finally:
            for task in probes:
                task.cancel()

    async def aclose(self) -> None:
        """Close the gateways' streams, then the tunnel."""
        await self.transports.close()
        self.tunnel.close()

    def close(self) -> None:
        self.tunnel.close()
