"""The agent process: Control → WireGuard peers + forwarding table; health.

Theory of operation
-------------------
``Agent.start()`` opens the outbound UDP socket of the user-space WireGuard data plane
(:class:`~agent.device.AgentDataPlane`), starts the forwarders on the user-space stack
and hands the rest to a :class:`~common.runtime.ControlRuntime`: the outbound WebSocket
to Control, one reconcile pass per burst of changes (:meth:`Agent.apply`: virtual IP,
gateway peers, tunnel table), the last configuration applied stored in the state
directory (``last-config.json``, 0600) and served after a restart while Control is
away, a failed pass logged and retried with back-off while the previous configuration
keeps serving, and every background task supervised.  While Control is unreachable
nothing is torn down.

Background tasks (all restarted if they end): ``control`` (the client),
``reconcile``, ``target-health`` (each tunnel's local target checked periodically,
changes reported to Control as ``status``), ``wireguard-watch`` (each gateway's
handshake state logged, gateways probed) and ``control-stats`` (each gateway's
handshake age sent to Control as ``stats``, for its dashboard).  ``/healthz`` has
the runtime's parts (``control``, ``config``, ``tasks``) and ``wireguard``: down while no configured
gateway has a live session, degraded while some have none.  On stop: listeners stop
accepting, in-flight HTTP requests get a bounded grace period, the Control connection
closes with 1001, the tasks are cancelled and awaited, the UDP socket closes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.device import (
    DEFAULT_CONGESTION,
    PERSISTENT_KEEPALIVE,
    PROBE_INTERVAL,
    STALE_AFTER,
    AgentDataPlane,
    gateways_from_config,
)
from agent.forward import Forwarder
from agent.health import HealthMonitor
from common import __version__
from common.controlclient import ControlClient, ControlClientSettings, ControlView
from common.health import DEGRADED, DOWN, OK, PartHealth
from common.keys import load_or_create
from common.logs import kv
from common.protocol import STATS_INTERVAL, AgentConfig, PeerHandshake, TunnelSpec
from common.relay.admin import AdminServer
from common.relay.metrics import Metrics
from common.runtime import ControlRuntime
from common.stats import StatsReporter

log = logging.getLogger("agent")


@dataclass
class AgentSettings:
    """Everything ``kakuremichi agent`` is configured with."""

    control_url: str
    api_key: str
    data_dir: Path
    wireguard_host: str = "0.0.0.0"
    wireguard_port: int = 0  # 0: any free port (the agent only sends first)
    http_port: int = 80  # inside the tunnel
    keepalive: int = PERSISTENT_KEEPALIVE
    connect_timeout: float = 5.0
    udp_idle_timeout: float = 60.0
    health_interval: float = 15.0
    #: seconds between ``stats`` reports (gateway handshake ages) to Control
    stats_interval: float = STATS_INTERVAL
    probe_interval: float = PROBE_INTERVAL
    mtu: int = 1420
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics and /healthz listener
    #: how WireGuard reaches the gateways: auto (UDP, the stream when UDP is blocked), udp, tcp
    transport: str = "auto"
    #: TCP congestion control of the user-space stack (netstack.congestion.NAMES)
    congestion: str = DEFAULT_CONGESTION
    #: how Control's certificate is verified (None: the system's trust store)
    control_ssl: ssl.SSLContext | None = None
    #: the enrollment token's pin of Control's key
    control_pin: str | None = None


def _describe(tunnel: TunnelSpec) -> dict[str, Any]:
    return {
        "tunnel": tunnel.id,
        "protocol": tunnel.protocol,
        "public": tunnel.domain or tunnel.public_port,
        "target": tunnel.target,
        "enabled": tunnel.enabled,
    }


class Agent:
    """One agent process (see the module docstring)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.keys = load_or_create(settings.data_dir)
        metrics = Metrics()
        self.data_plane = AgentDataPlane(
            self.keys,
            settings.wireguard_host,
            settings.wireguard_port,
            mtu=settings.mtu,
            keepalive=settings.keepalive,
            probe_interval=settings.probe_interval,
            transport=settings.transport,
            congestion=settings.congestion,
            registry=metrics.registry,
        )
        self.forwarder = Forwarder(
            self.data_plane.tunnel,
            http_port=settings.http_port,
            connect_timeout=settings.connect_timeout,
            udp_idle_timeout=settings.udp_idle_timeout,
            metrics=metrics,
        )
        self.runtime = ControlRuntime(
            ControlClientSettings(
                control_url=settings.control_url,
                api_key=settings.api_key,
                client_type="agent",
                public_key=self.keys.public_b64,
                version=f"kakuremichi-agent/{__version__}",
                ssl_context=settings.control_ssl,
                pin=settings.control_pin,
            ),
            settings.data_dir,
            ControlView.agent_config,
            self.apply,
        )
        self.runtime.health.probe("wireguard", self._wireguard_health)
        self.client: ControlClient = self.runtime.client
        self.admin = AdminServer(self.forwarder.metrics, self.runtime.health)
        self.target_health = HealthMonitor(
            lambda: self.client.view.tunnels,
            lambda payload: self.client.send("status", payload),
            interval=settings.health_interval,
        )
        # handshake ages only: the gateways report the tunnels' traffic (common.stats)
        self.stats = StatsReporter(
            dict, self._handshakes, self.client.send, settings.stats_interval
        )
        self._applied_tunnels: dict[str, TunnelSpec] = {}
        self.ready = asyncio.Event()

    @property
    def applied(self) -> int:
        """Reconcile passes that succeeded (tests wait on it)."""
        return self.runtime.applied

    @property
    def state_path(self) -> Path:
        """The last configuration applied (0600)."""
        return self.runtime.state_path

    def _wireguard_health(self) -> PartHealth:
        sessions = self.data_plane.sessions()
        if not sessions:
            # nothing can reach the tunnels: alive (/livez), not ready (/readyz 503)
            return PartHealth(DOWN, "no gateway in the configuration yet")
        live = [g.label for g, age in sessions if age is not None and age < STALE_AFTER]
        silent = sorted(g.label for g, age in sessions if age is None or age >= STALE_AFTER)
        if not live:
            if all(age is None for _, age in sessions):
                return PartHealth(DOWN, "no gateway has completed a WireGuard handshake")
            return PartHealth(
                DOWN, f"no gateway has a live WireGuard session (none within {STALE_AFTER:g}s)"
            )
        if silent:
            return PartHealth(
                DEGRADED,
                f"{len(live)} of {len(sessions)} gateways have a live WireGuard session; "
                f"not answering: {', '.join(silent)}",
            )
        return PartHealth(
            OK,
            f"{len(live)} of {len(sessions)} gateways have a live session{self._streamed()}",
        )

    def _streamed(self) -> str:
        """Which gateways WireGuard reaches over the stream transport (UDP blocked)."""
        names = sorted(
            g.label
            for g, _ in self.data_plane.sessions()
            if self.data_plane.transport_of(g.public_key)[0] == "tcp"
        )
        return f"; over the stream transport (tcp): {', '.join(names)}" if names else ""

    async def _handshakes(self) -> list[PeerHandshake]:
        plane = self.data_plane
        return [
            PeerHandshake(g.public_key, age, plane.transport_of(g.public_key)[0])
            for g, age in plane.sessions()
        ]

    # -- reconciliation -------------------------------------------------------------------

    async def apply(self, config: AgentConfig) -> None:
        """Make the data plane match one configuration (a reconcile pass)."""
        self.data_plane.apply(config.agent.virtual_ip, gateways_from_config(config.gateways))
        tunnels = {t.id: t for t in config.tunnels}
        self.forwarder.update(config.tunnels)
        for tid in self._applied_tunnels.keys() - tunnels.keys():
            log.info("tunnel removed", extra=kv(**_describe(self._applied_tunnels[tid])))
        for tid, tunnel in tunnels.items():
            before = self._applied_tunnels.get(tid)
            if before is None:
                log.info("tunnel added", extra=kv(**_describe(tunnel)))
            elif before != tunnel:
                log.info("tunnel updated", extra=kv(**_describe(tunnel)))
        self._applied_tunnels = tunnels

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.data_plane.start()
        await self.forwarder.start()
        if self.settings.metrics_port:
            await self.admin.start(self.settings.metrics_host, self.settings.metrics_port)
        self.runtime.start()
        self.runtime.supervise("target-health", self.target_health.run)
        self.runtime.supervise("wireguard-watch", self.data_plane.watch)
        self.runtime.supervise("control-stats", self.stats.run)
        log.info(
            "agent started",
            extra=kv(
                control=self.client.url,
                public_key=self.keys.public_b64,
                udp_port=self.data_plane.tunnel.port,
                congestion=self.settings.congestion,
            ),
        )
        self.ready.set()

    async def stop(self) -> None:
        log.info("agent stopping")
        started = time.monotonic()
        await self.forwarder.close()
        await self.runtime.stop()
        await self.admin.close()
        await self.data_plane.aclose()
        log.info("agent stopped", extra=kv(total_s=round(time.monotonic() - started, 2)))
