"""The gateway process: Control client → WireGuard + router + certificates → listeners.

Theory of operation
-------------------
``Gateway.run()`` brings up the WireGuard interface, the public listeners (HTTP, and
HTTPS when enabled), raw TCP and UDP forwarders and the admin port, then connects to Control.
Every change of Control's view sets a flag; one reconcile task applies the newest view
(WireGuard peers and addresses, routing table, Control's certificates) so bursts of
changes cost one pass.  A failed pass is retried with back-off while the previous
state keeps serving (an unexpected error is logged with its traceback and retried
the same way).  The last configuration applied is stored (0600, ``last-config.json``
in the data directory) and served after a restart until Control answers.  The ACME
task orders certificates for enabled HTTP tunnel domains that lack a usable one (none, or expiring within ``renew_before``), persists
them in the state directory and reports them to Control (``certificate_obtained``),
backing off per domain after failures; it runs when Control's view changes (a new
domain is ordered at once) and every 15 s.  A stats task feeds WireGuard peer readings to
the metrics.  On stop: listeners stop accepting and drain, the Control connection
closes, the interface is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import __version__
from common.controlclient import ControlClient, ControlClientSettings, ControlView
from common.keys import load_or_create
from common.logs import kv
from common.protocol import CertificateObtained
from common.relay.admin import AdminServer
from common.relay.limits import LimitSettings
from common.relay.metrics import Metrics
from common.relay.router import Router
from common.relay.tcp import TcpForwarder, TcpSettings
from common.relay.udp import FlowDialer, UdpForwarder, UdpSettings
from gateway.acme import AcmeClient, AcmeFailure, ChallengeStore
from gateway.proxy.http import ProxyServer, ProxySettings
from gateway.tls import Certificate, CertificateStore
from gateway.wg.device import InterfaceBackend, WgError
from gateway.wg.state import WgState
from gateway.wg.userspace import UserspaceBackend

log = logging.getLogger("gateway")

#: the last configuration applied, in the data directory (see ``Gateway.state_path``)
STATE_FILE = "last-config.json"


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
    admin_port: int = 9090
    upstream_port: int = 80
    redirect_https: bool = False
    acme_directory: str | None = None
    acme_email: str | None = None
    acme_ca_file: str | None = None
    renew_before: float = 30 * 86400
    limits: LimitSettings = field(default_factory=LimitSettings)


class Gateway:
    """One gateway process (see the module docstring)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.keys = load_or_create(settings.data_dir)
        self.router = Router()
        self.metrics = Metrics()
        self.certificates = CertificateStore(settings.data_dir / "tls")
        self.challenges = ChallengeStore()
        self.wg: InterfaceBackend | UserspaceBackend
        use_userspace = settings.backend == "userspace" or (
            settings.backend == "auto" and os.geteuid() != 0
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
            settings=ProxySettings(upstream_port=settings.upstream_port, limits=settings.limits),
            metrics=self.metrics,
        )
        self.proxy.challenge_responder = self.challenges.respond
        self.proxy.redirect_https = settings.redirect_https and settings.https_port > 0
        self.proxy.redirect_https_port = settings.https_port
        self.tcp = TcpForwarder(
            self.router, dialer, settings=TcpSettings(bind_host=settings.host), metrics=self.metrics
        )
        self.udp = UdpForwarder(
            self.router,
            flow_dialer,
            settings=UdpSettings(bind_host=settings.host),
            metrics=self.metrics,
        )
        self.admin = AdminServer(self.metrics, self._health)
        self.client = ControlClient(
            ControlClientSettings(
                control_url=settings.control_url,
                api_key=settings.api_key,
                client_type="gateway",
                public_key=self.keys.public_b64,
                version=f"kakuremichi-gateway/{__version__}",
                public_ip=settings.public_ip,
                wireguard_port=settings.wireguard_port,
            ),
            on_change=self._changed,
        )
        self.acme = (
            AcmeClient(
                settings.acme_directory,
                settings.data_dir / "acme",
                self.challenges,
                email=settings.acme_email,
                verify=settings.acme_ca_file or True,
            )
            if settings.acme_directory
            else None
        )
        self._dirty = asyncio.Event()
        self._acme_wakeup = asyncio.Event()
        self._applied_wg: WgState | None = None
        self._acme_backoff: dict[str, tuple[float, float]] = {}  # domain → (next try, delay)
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready = asyncio.Event()

    # -- health -------------------------------------------------------------------------

    def _health(self) -> bool | str:
        if not self.client.view.has_config:
            return "no configuration from control yet"
        return True

    # -- reconciliation -------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        """The last configuration applied (0600: it holds certificate keys)."""
        return self.settings.data_dir / STATE_FILE

    def _changed(self, view: ControlView) -> None:
        self._dirty.set()
        self._acme_wakeup.set()

    async def _reconcile_loop(self) -> None:
        delay = 1.0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            config = self.client.view.gateway_config()
            if config is None:
                continue
            try:
                self.router.replace_all(config.tunnels)
                self.certificates.set_control_certificates(config.certificates)
                state = WgState.from_config(config.gateway, config.agents)
                if state != self._applied_wg:
                    await self.wg.apply(state)
                    self._applied_wg = state
                    log.info(
                        "configuration applied",
                        extra=kv(agents=len(state.peers), tunnels=len(config.tunnels)),
                    )
                # served after a restart while Control is away (like the agent's)
                self.client.view.store(self.state_path)
                delay = 1.0
            except Exception as exc:  # whatever it is, the task never ends silently
                if isinstance(exc, WgError | OSError):
                    log.error(
                        "applying configuration failed; retrying",
                        extra=kv(error=str(exc), retry_in_s=delay),
                    )
                else:  # a bug: its traceback, then the same retry
                    log.exception(
                        "applying configuration failed unexpectedly; retrying",
                        extra=kv(retry_in_s=delay),
                    )
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)
                self._dirty.set()

    async def _stats_loop(self) -> None:
        known: set[str] = set()
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(WgError, OSError, ValueError):
                config = self.client.view.gateway_config()
                agents = config.agents if config is not None else ()
                names = {a.public_key: a.id for a in agents}
                seen = set()
                now = time.time()
                for stat in await self.wg.stats():
                    agent = names.get(stat.public_key, stat.public_key)
                    seen.add(agent)
                    age = (
                        None
                        if stat.latest_handshake <= 0
                        else max(0.0, now - stat.latest_handshake)
                    )
                    self.metrics.set_wireguard_peer(agent, age, stat.rx_bytes, stat.tx_bytes)
                for agent in known - seen:
                    self.metrics.forget_wireguard_peer(agent)
                known = seen

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

    def domains_needing_certificates(self, now: float) -> list[str]:
        wanted = []
        for tunnel in self.client.view.tunnels.values():
            domain = tunnel.domain
            if tunnel.protocol != "http" or not tunnel.enabled or domain is None:
                continue
            cert = self.certificates.certificate_for(domain)
            if cert is None or cert.not_after - now < self.settings.renew_before:
                wanted.append(domain)
        return sorted(set(wanted))

    async def acme_pass(self) -> int:
        """Order what is missing now; returns how many certificates were obtained."""
        assert self.acme is not None
        obtained = 0
        now = time.time()
        for domain in self.domains_needing_certificates(now):
            next_try, delay = self._acme_backoff.get(domain, (0.0, 60.0))
            if now < next_try:
                continue
            try:
                cert = await self.acme.obtain(domain)
            except AcmeFailure as exc:
                log.error(
                    "certificate order failed",
                    extra=kv(domain=domain, error=str(exc)[:300], retry_in_s=delay),
                )
                self._acme_backoff[domain] = (time.time() + delay, min(6 * 3600.0, delay * 2))
                continue
            self._acme_backoff.pop(domain, None)
            self._store_acme_certificate(cert)
            self.certificates.add_acme_certificate(cert)
            obtained += 1
            report = CertificateObtained(cert.domain, cert.chain_pem, cert.key_pem, cert.not_after)
            await self.client.send("certificate_obtained", report.to_wire())
        return obtained

    async def _acme_loop(self) -> None:
        while True:
            if self.client.view.has_config:
                try:
                    await self.acme_pass()
                except Exception:
                    log.exception("ACME pass failed")
            # a new tunnel domain starts its order at once; otherwise look every 15 s
            # (renewals, back-offs expiring)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acme_wakeup.wait(), 15)
            self._acme_wakeup.clear()

    # -- lifecycle ----------------------------------------------------------------------

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
        if self.client.view.restore(self.state_path, "gateway"):
            self._dirty.set()  # serve it until Control answers
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.client.run()),
            loop.create_task(self._reconcile_loop()),
            loop.create_task(self._stats_loop()),
        ]
        if self.acme is not None:
            self._tasks.append(loop.create_task(self._acme_loop()))
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
        await self.tcp.close()
        await self.udp.close()
        drained = time.monotonic()
        await self.client.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.close()
        await self.wg.stop()
        log.info(
            "gateway stopped",
            extra=kv(
                drain_s=round(drained - started, 2), total_s=round(time.monotonic() - started, 2)
            ),
        )
