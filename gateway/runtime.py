"""The gateway process: Control → WireGuard + router + certificates → listeners.

Theory of operation
-------------------
``Gateway.start()`` brings up the WireGuard interface, the public listeners (HTTP, and
HTTPS when enabled), raw TCP and UDP forwarders and the admin port, then hands the
rest to a :class:`~common.runtime.ControlRuntime`: the WebSocket to Control, one
reconcile pass per burst of changes (:meth:`Gateway._apply`: routing table, Control's
certificates, WireGuard peers and addresses), the last configuration applied stored
(0600, ``last-config.json`` in the data directory: it holds certificate keys) and
served after a restart until Control answers, a failed pass logged (the traceback
when the error is not a ``WgError``/``OSError``) and retried with back-off while the
previous state keeps serving, and every background task supervised.

Background tasks (all restarted if they end): ``control``, ``reconcile``,
``wireguard-stats`` (peer readings every 10 s into the metrics and the ``wireguard``
health part), ``control-stats`` (per-tunnel traffic and handshake ages sent to Control
as ``stats``, for its dashboard).  With ACME configured the gateway orders the
certificates Control leases it (``gateway/acme.py``: one gateway per domain at a time,
its HTTP-01 responses served by every gateway), keeps them in the state directory and
reports them to Control, which pushes them to all gateways.
``/healthz`` has the runtime's parts (``control``, ``config``, ``tasks``),
``wireguard`` (degraded while the interface cannot be read) and ``acme`` (degraded
while an order is failing).  On stop: listeners stop accepting and drain, the Control
connection closes, the tasks are cancelled and awaited, the interface is removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import __version__
from common import protocol as p
from common.acme import AcmeClient, ChallengeStore, DnsProvider, LocalHttp01
from common.controlclient import ControlClient, ControlClientSettings, ControlView
from common.health import DEGRADED, OK, PartHealth
from common.keys import load_or_create
from common.logs import kv
from common.protocol import GatewayConfig, ShareLinkUsed
from common.relay.accesslog import AccessLogSettings
from common.relay.admin import AdminServer
from common.relay.limits import LimitSettings
from common.relay.metrics import Metrics
from common.relay.router import Router
from common.relay.tcp import TcpForwarder, TcpSettings
from common.relay.udp import FlowDialer, UdpForwarder, UdpSettings
from common.runtime import ControlRuntime
from common.stats import StatsReporter
from gateway.acme import GatewayAcme
from gateway.proxy.h2settings import H2Settings
from gateway.proxy.http import ProxyServer, ProxySettings
from gateway.tls import Certificate, CertificateStore
from gateway.wg.device import InterfaceBackend, WgError, has_net_admin
from gateway.wg.state import WgState
from gateway.wg.userspace import UserspaceBackend
from gateway.wgstream import StreamAcceptor, engine_binding, relay_binding

log = logging.getLogger("gateway")

STATS_INTERVAL = 10.0
STATS_INTERVAL_TO_CONTROL = p.STATS_INTERVAL
#: WireGuard's REJECT_AFTER_TIME: an agent whose last handshake is older has no session
STALE_AFTER = 180.0


@dataclass
class GatewaySettings:
    """Everything ``kakuremichi gateway`` is configured with."""

    control_url: str
    api_key: str
    data_dir: Path
    public_ip: str
    wireguard_port: int = 51820
    backend: str = "auto"
    interface: str = "kkm0"
    host: str = "0.0.0.0"
    http_port: int = 80
    https_port: int = 443  # 0 disables HTTPS
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901  # not 9090: Prometheus's own default
    #: seconds between ``stats`` reports to Control (traffic per tunnel, handshakes)
    stats_interval: float = STATS_INTERVAL_TO_CONTROL
    upstream_port: int = 80
    redirect_https: bool = False
    #: agents whose UDP is blocked may bring WireGuard over a WebSocket on HTTPS
    wireguard_over_https: bool = True
    acme_directory: str | None = None
    acme_email: str | None = None
    acme_ca_file: str | None = None
    #: DNS-01 (wildcard certificates) through this provider (None: HTTP-01 only)
    acme_dns: DnsProvider | None = None
    limits: LimitSettings = field(default_factory=LimitSettings)
    #: one line per request and per TCP/UDP flow (off unless it has a path)
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    #: CA bundle for the tunnels' OIDC providers (None: the system's trust store)
    oidc_ca_file: str | None = None
    #: HTTP/2 on the HTTPS listener (ALPN h2) and its limits
    http2: H2Settings = field(default_factory=H2Settings)
    #: how Control's certificate is verified (None: the system's trust store)
    control_ssl: ssl.SSLContext | None = None
    #: the enrollment token's pin of Control's key
    control_pin: str | None = None


class Gateway:
    """One gateway process (see the module docstring)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.keys = load_or_create(settings.data_dir)
        self.router = Router()
        self.metrics = Metrics()
        alpn = ("h2", "http/1.1") if settings.http2.enabled else ("http/1.1",)
        self.certificates = CertificateStore(settings.data_dir / "tls", alpn)
        self.challenges = ChallengeStore()
        self.wg: InterfaceBackend | UserspaceBackend
        use_userspace = settings.backend == "userspace" or (
            settings.backend == "auto" and not has_net_admin()
        )
        dialer = None  # the kernel's TCP, through the WireGuard interface
        flow_dialer: FlowDialer | None = None  # likewise the kernel's UDP
        if use_userspace:
            self.wg = UserspaceBackend(self.keys, settings.wireguard_port, settings.host)
            dialer = self.wg.dial
            flow_dialer = self.wg.udp_flow
        else:
            self.wg = InterfaceBackend(
                settings.interface, self.keys, settings.wireguard_port, settings.backend
            )
        self.proxy = ProxyServer(
            self.router,
            dialer,
            settings=ProxySettings(
                upstream_port=settings.upstream_port,
                limits=settings.limits,
                access_log=settings.access_log,
                oidc_ca_file=settings.oidc_ca_file,
                http2=settings.http2,
            ),
            metrics=self.metrics,
        )
        self.proxy.challenge_responder = self.challenges.respond
        self.proxy.redirect_https = settings.redirect_https and settings.https_port > 0
        self.proxy.redirect_https_port = settings.https_port
        # share-link uses go to Control, which counts them against the link's limit
        self._share_uses: list[ShareLinkUsed] = []
        self._share_wakeup = asyncio.Event()
        self.proxy.endpoints.on_share_used = self._share_used
        # agents whose UDP is blocked bring WireGuard over a WebSocket on these listeners
        wg = self.wg
        self.streams = StreamAcceptor(
            engine_binding(lambda: wg.tunnel.udp)
            if isinstance(wg, UserspaceBackend)
            else relay_binding(settings.wireguard_port),
            self.metrics,
        )
        if settings.wireguard_over_https:
            self.proxy.stream_acceptor = self.streams
        self.tcp = TcpForwarder(
            self.router,
            dialer,
            # tunnels with proxyProtocol go to the agent's tunnel port, client first
            settings=TcpSettings(bind_host=settings.host, proxy_port=settings.upstream_port),
            metrics=self.metrics,
            admit=self.proxy.access.ip_allowed,
            access_log=self.proxy.access_log,
        )
        self.udp = UdpForwarder(
            self.router,
            flow_dialer,
            settings=UdpSettings(
                bind_host=settings.host,
                proxy_port=settings.upstream_port,
                public_ip=settings.public_ip,
            ),
            metrics=self.metrics,
            admit=self.proxy.access.ip_allowed,
            access_log=self.proxy.access_log,
        )
        self.runtime = ControlRuntime(
            ControlClientSettings(
                control_url=settings.control_url,
                api_key=settings.api_key,
                client_type="gateway",
                public_key=self.keys.public_b64,
                version=f"kakuremichi-gateway/{__version__}",
                public_ip=settings.public_ip,
                wireguard_port=settings.wireguard_port,
                # where agents find the stream transport (None: they have none)
                https_port=(settings.https_port or None) if settings.wireguard_over_https else None,
                ssl_context=settings.control_ssl,
                pin=settings.control_pin,
            ),
            settings.data_dir,
            ControlView.gateway_config,
            self._apply,
            expected_errors=(WgError, OSError),
        )
        self.client: ControlClient = self.runtime.client
        self.admin = AdminServer(self.metrics, self.runtime.health)
        self.stats = StatsReporter(
            self.metrics.tunnel_totals, self._handshakes, self.client.send, settings.stats_interval
        )
        self.acme = (
            GatewayAcme(
                AcmeClient(
                    settings.acme_directory,
                    settings.data_dir / "acme",
                    http01=LocalHttp01(self.challenges),
                    dns01=settings.acme_dns,
                    email=settings.acme_email,
                    verify=settings.acme_ca_file or True,
                    user_agent=f"kakuremichi-gateway/{__version__}",
                ),
                self.client,
                self.challenges,
                self._acme_issued,
            )
            if settings.acme_directory
            else None
        )
        self._applied_wg: WgState | None = None
        self._wg_reading = ""  # what the last reading of the peers found
        self._wg_error = ""  # why the last reading failed ("" when it worked)
        self.runtime.health.probe("wireguard", self._wireguard_health)
        if self.acme is not None:
            self.runtime.health.probe("acme", self.acme.health)
        self.ready = asyncio.Event()

    @property
    def state_path(self) -> Path:
        """The last configuration applied (0600: it holds certificate keys)."""
        return self.runtime.state_path

    # -- health -------------------------------------------------------------------------

    def _wireguard_health(self) -> PartHealth:
        if self._wg_error:
            return PartHealth(DEGRADED, f"cannot read the interface: {self._wg_error}")
        return PartHealth(OK, self._wg_reading or f"{self.wg.kind} backend up")

    # -- reconciliation -------------------------------------------------------------------

    async def _apply(self, config: GatewayConfig) -> None:
        """One reconcile pass (run by the runtime, which retries it on failure)."""
        self.router.replace_all(config.tunnels)
        self.proxy.access.update(config.policies, config.session_keys)
        self.certificates.set_control_certificates(config.certificates)
        state = WgState.from_config(config.gateway, config.agents)
        if state != self._applied_wg:
            await self.wg.apply(state)
            self._applied_wg = state
            log.info(
                "configuration applied",
                extra=kv(agents=len(state.peers), tunnels=len(config.tunnels)),
            )

    async def _handshakes(self) -> list[p.PeerHandshake]:
        """Each agent peer's handshake age, for ``stats`` (an unreadable interface: none)."""
        try:
            peers = await self.wg.stats()
        except (WgError, OSError, ValueError):
            return []
        now = time.time()
        return [
            p.PeerHandshake(
                s.public_key,
                None if s.latest_handshake <= 0 else max(0.0, now - s.latest_handshake),
                self.streams.transport_of(s.endpoint),
            )
            for s in peers
        ]

    async def _stats_loop(self) -> None:
        known: set[str] = set()
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            try:
                stats = await self.wg.stats()
            except (WgError, OSError, ValueError) as exc:
                if str(exc) != self._wg_error:
                    log.warning("reading WireGuard peers failed", extra=kv(error=str(exc)[:300]))
                self._wg_error = str(exc)[:300]
                continue
            if self._wg_error:
                log.info("reading WireGuard peers works again")
            self._wg_error = ""
            config = self.client.view.gateway_config()
            agents = config.agents if config is not None else ()
            names = {a.public_key: a.id for a in agents}
            seen = set()
            live = streamed = 0
            now = time.time()
            for stat in stats:
                agent = names.get(stat.public_key, stat.public_key)
                seen.add(agent)
                age = None if stat.latest_handshake <= 0 else max(0.0, now - stat.latest_handshake)
                if age is not None and age < STALE_AFTER:
                    live += 1
                    streamed += self.streams.record_peer(agent, stat.endpoint) == "tcp"
                else:
                    self.streams.forget_peer(agent)
                self.metrics.set_wireguard_peer(agent, age, stat.rx_bytes, stat.tx_bytes)
            for agent in known - seen:
                self.metrics.forget_wireguard_peer(agent)
                self.streams.forget_peer(agent)
            known = seen
            self._wg_reading = f"{live} of {len(stats)} agents have a live session" + (
                f" ({streamed} over the stream transport, tcp)" if streamed else ""
            )

    # -- ACME ---------------------------------------------------------------------------

    def _acme_file(self, domain: str) -> Path:
        return self.settings.data_dir / "acme" / "certs" / f"{domain}.json"

    def _load_acme_certificates(self) -> None:
        folder = self.settings.data_dir / "acme" / "certs"
        if not folder.is_dir():
            return
        for path in folder.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                self.certificates.add_acme_certificate(
                    Certificate(
                        data["domain"], data["chain"], data["key"], float(data["not_after"]), "acme"
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("unreadable stored certificate skipped", extra=kv(file=str(path)))

    def _store_acme_certificate(self, cert: Certificate) -> None:
        path = self._acme_file(cert.domain)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {
                    "domain": cert.domain,
                    "chain": cert.chain_pem,
                    "key": cert.key_pem,
                    "not_after": cert.not_after,
                },
                handle,
            )

    def _acme_issued(self, cert: Certificate) -> None:
        """A certificate this gateway ordered: used at once, kept for restarts."""
        self._store_acme_certificate(cert)
        self.certificates.add_acme_certificate(cert)

    # -- lifecycle ----------------------------------------------------------------------

    def _share_used(self, tunnel_id: str, link_id: str) -> None:
        if len(self._share_uses) < 10_000:  # Control away for long: the oldest are kept
            self._share_uses.append(ShareLinkUsed(tunnel_id, link_id))
        self._share_wakeup.set()

    async def _report_share_uses(self) -> None:
        """Send each share-link use to Control, retrying while it is away."""
        while True:
            await self._share_wakeup.wait()
            self._share_wakeup.clear()
            while self._share_uses:
                if not await self.client.send("share_link_used", self._share_uses[0].to_wire()):
                    await asyncio.sleep(2.0)
                    self._share_wakeup.set()
                    break
                self._share_uses.pop(0)

    async def start(self) -> None:
        await self.wg.start()
        s = self.settings
        await self.proxy.start(s.host, s.http_port)
        if s.https_port:
            await self.proxy.start(s.host, s.https_port, self.certificates.server_context())
        await self.admin.start(s.admin_host, s.admin_port)
        await self.tcp.start()
        await self.udp.start()
        self._load_acme_certificates()
        self.runtime.start()  # serves the stored configuration until Control answers
        self.runtime.supervise("wireguard-stats", self._stats_loop)
        self.runtime.supervise("share-uses", self._report_share_uses)
        self.runtime.supervise("control-stats", self.stats.run)
        log.info(
            "gateway started",
            extra=kv(
                public_key=self.keys.public_b64,
                http=s.http_port,
                https=s.https_port or "off",
                admin=f"{s.admin_host}:{s.admin_port}",
                wireguard=f"{s.public_ip}:{s.wireguard_port}",
            ),
        )
        self.ready.set()

    async def stop(self) -> None:
        log.info("gateway stopping")
        started = time.monotonic()
        await self.proxy.close()
        await self.streams.close()
        await self.tcp.close()
        await self.udp.close()
        # the raw connections and flows just ended wrote their lines after the proxy
        # closed the access log: write them too
        self.proxy.access_log.shutdown()
        drained = time.monotonic()
        if self.acme is not None:
            await self.acme.close()
        await self.runtime.stop()
        await self.admin.close()
        await self.wg.stop()
        log.info(
            "gateway stopped",
            extra=kv(
                drain_s=round(drained - started, 2), total_s=round(time.monotonic() - started, 2)
            ),
        )
