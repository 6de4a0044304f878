"""The agent process: Control client → WireGuard peers + forwarding table; health.

Theory of operation
-------------------
``Agent.start()`` opens the outbound UDP socket of the user-space WireGuard device,
starts the forwarders on the user-space stack and connects to Control (outbound
WebSocket).  Every change of Control's view marks the agent dirty; one reconcile task
applies the newest view (virtual IP, gateway peers, tunnel table) so a burst of
changes costs one pass, and stores it in the state directory (``last-config.json``,
0600) so that an agent restarted while Control is away still serves its tunnels.
While Control is unreachable nothing is torn down: the last good view keeps serving.

The health task checks each tunnel's local target periodically and reports changes to
Control as ``status``; the watch task logs each gateway's handshake state.  On stop:
listeners stop accepting, in-flight HTTP requests get a bounded grace period, the
Control connection closes with 1001, the UDP socket closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.device import PERSISTENT_KEEPALIVE, PROBE_INTERVAL, AgentDataPlane, gateways_from_config
from agent.forward import Forwarder
from agent.health import HealthMonitor
from common import __version__
from common.controlclient import ControlClient, ControlClientSettings, ControlView
from common.keys import load_or_create
from common.logs import kv
from common.protocol import TunnelSpec
from common.relay.admin import AdminServer

log = logging.getLogger("agent")

STATE_FILE = "last-config.json"


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
    probe_interval: float = PROBE_INTERVAL
    mtu: int = 1420
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics and /healthz listener


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
        self.device = AgentDataPlane(
            self.keys,
            settings.wireguard_host,
            settings.wireguard_port,
            mtu=settings.mtu,
            keepalive=settings.keepalive,
            probe_interval=settings.probe_interval,
        )
        self.forwarder = Forwarder(
            self.device.tunnel,
            http_port=settings.http_port,
            connect_timeout=settings.connect_timeout,
            udp_idle_timeout=settings.udp_idle_timeout,
        )
        self.admin = AdminServer(self.forwarder.metrics, self._health)
        self.client = ControlClient(
            ControlClientSettings(
                control_url=settings.control_url,
                api_key=settings.api_key,
                client_type="agent",
                public_key=self.keys.public_b64,
                version=f"kakuremichi-agent/{__version__}",
            ),
            on_change=self._changed,
        )
        self.health = HealthMonitor(
            lambda: self.client.view.tunnels,
            lambda payload: self.client.send("status", payload),
            interval=settings.health_interval,
        )
        self._dirty = asyncio.Event()
        self._applied_tunnels: dict[str, TunnelSpec] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.applied = 0  # reconcile passes done (tests wait on it)
        self.ready = asyncio.Event()

    def _health(self) -> bool | str:
        if not self.client.view.has_config and not self.client.connected.is_set():
            return "no configuration from control yet"
        if self.device.gateways and not self.device.connected_gateways():
            return "no gateway has completed a WireGuard handshake"
        return True

    # -- state --------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.settings.data_dir / STATE_FILE

    def _load_state(self) -> None:
        if self.client.view.restore(self.state_path, "agent"):
            self._dirty.set()

    def _store_state(self, view: ControlView) -> None:
        view.store(self.state_path)

    # -- reconciliation -------------------------------------------------------------------

    def _changed(self, view: ControlView) -> None:
        self._dirty.set()

    def apply(self) -> None:
        """Make the data plane match the current view (one pass)."""
        view = self.client.view
        config = view.agent_config()
        if config is None:
            return
        self.device.apply(config.agent.virtual_ip, gateways_from_config(config.gateways))
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
        self._store_state(view)
        self.applied += 1

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                self.apply()
            except Exception:
                log.exception("applying the configuration failed; keeping the previous one")

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.device.start()
        await self.forwarder.start()
        if self.settings.metrics_port:
            await self.admin.start(self.settings.metrics_host, self.settings.metrics_port)
        self._load_state()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.client.run()),
            loop.create_task(self._reconcile_loop()),
            loop.create_task(self.health.run()),
            loop.create_task(self.device.watch()),
        ]
        log.info(
            "agent started",
            extra=kv(
                control=self.client.url,
                public_key=self.keys.public_b64,
                udp_port=self.device.tunnel.port,
            ),
        )
        self.ready.set()

    async def stop(self) -> None:
        log.info("agent stopping")
        started = time.monotonic()
        await self.forwarder.close()
        await self.client.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.close()
        self.device.close()
        log.info("agent stopped", extra=kv(total_s=round(time.monotonic() - started, 2)))
