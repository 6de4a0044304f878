"""``kakuremichi agent``: the rootless connector next to your services.

SIGTERM/SIGINT stop accepting tunnelled connections, let in-flight HTTP requests
finish, close the Control connection; exit code 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Any

from agent.device import DEFAULT_CONGESTION
from agent.runtime import Agent, AgentSettings
from common import eventloop, logs
from common.config import (
    COMMON,
    ConfigError,
    Setting,
    add_settings,
    port,
    positive_float,
    resolve,
)
from common.controlclient import CONTROL_CA, TOKEN, control_target
from common.eventloop import EVENT_LOOP
from common.service import run_until_signalled
from netstack.congestion import NAMES as CONGESTION_CONTROLS


def _keepalive(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 3600:
        raise ValueError("must be 1..3600 seconds")
    return number


def _mtu(value: str) -> int:
    number = int(value)
    if not 1280 <= number <= 9000:
        raise ValueError("must be 1280..9000")
    return number


SETTINGS: tuple[Setting, ...] = (
    TOKEN,
    Setting(
        "control-url",
        "Control's URL (https://host:port); several Control replicas' URLs, "
        "comma-separated, to move to the next one whenever a connection ends",
        None,
        metavar="URL",
    ),
    Setting("api-key", "this agent's API key (agt_…)", None, secret=True, metavar="KEY"),
    CONTROL_CA,
    Setting("data-dir", "state directory (WireGuard key, last configuration)", "./data/agent"),
    Setting(
        "wireguard-port",
        "local UDP port for WireGuard (0: any; the agent only connects out)",
        0,
        parse=port,
    ),
    Setting("wireguard-host", "local address of the WireGuard UDP socket", "0.0.0.0"),
    Setting(
        "keepalive",
        "seconds between WireGuard keepalives (keeps NAT mappings open)",
        25,
        parse=_keepalive,
        metavar="SECONDS",
    ),
    Setting("mtu", "MTU of the tunnel", 1420, parse=_mtu),
    Setting(
        "connect-timeout",
        "seconds to connect to a local target before giving up (502 / reset)",
        5.0,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "udp-idle-timeout",
        "seconds a UDP flow may stay silent before it is closed",
        60.0,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "health-interval",
        "seconds between health checks of local targets (reported to Control)",
        15.0,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "probe-interval",
        "seconds between liveness probes of each gateway through the tunnel "
        "(a gateway that lost the session is re-handshaken 15 s after a probe)",
        30.0,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "transport",
        "how WireGuard reaches the gateways: auto (UDP; where no handshake completes "
        "within 4 s or UDP goes silent, a WebSocket over TLS to the gateway's HTTPS port, "
        "while UDP is probed every 10 s and used again once it answers), udp (never the "
        "WebSocket) or tcp (only the WebSocket)",
        "auto",
        choices=("auto", "udp", "tcp"),
    ),
    Setting(
        "congestion",
        "TCP congestion control of the tunnelled connections, i.e. how fast the agent sends "
        "to the gateways (downloads from your services): bbr (model-based and paced: keeps "
        "its rate through random loss and long paths), cubic (loss-based, as Linux's "
        "default) or newreno; the README's benchmarks compare them",
        DEFAULT_CONGESTION,
        choices=CONGESTION_CONTROLS,
    ),
    Setting("metrics-host", "address of the /metrics and /healthz listener", "127.0.0.1"),
    Setting(
        "metrics-port",
        "port of the /metrics (Prometheus) and /healthz listener (0: off)",
        0,
        parse=port,
    ),
    EVENT_LOOP,
    *COMMON,
)


def settings_from(values: dict[str, Any]) -> AgentSettings:
    control = control_target(values, "agent")
    for name in ("wireguard_host", "metrics_host"):
        try:
            ipaddress.ip_address(values[name])
        except ValueError as exc:
            flag = name.replace("_", "-")
            raise ConfigError(f"--{flag}: {values[name]!r} is not an IP address") from exc
    return AgentSettings(
        control_url=control.url,
        api_key=control.api_key,
        control_ssl=control.ssl_context,
        control_pin=control.pin,
        data_dir=Path(values["data_dir"]).expanduser(),
        wireguard_host=values["wireguard_host"],
        wireguard_port=values["wireguard_port"],
        keepalive=values["keepalive"],
        mtu=values["mtu"],
        connect_timeout=values["connect_timeout"],
        udp_idle_timeout=values["udp_idle_timeout"],
        health_interval=values["health_interval"],
        probe_interval=values["probe_interval"],
        metrics_host=values["metrics_host"],
        metrics_port=values["metrics_port"],
        transport=values["transport"],
        # (a hand-built dict may leave it out: the stack's default)
        congestion=values.get("congestion", DEFAULT_CONGESTION),
    )


async def serve(settings: AgentSettings) -> int:
    log = logging.getLogger("agent")
    try:
        agent = Agent(settings)
    except OSError as exc:
        log.error("cannot use the state directory", extra=logs.kv(error=str(exc)))
        return 1
    return await run_until_signalled(agent, "agent")


def run(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    logs.setup(values["log_format"], values["log_level"])
    return eventloop.run(serve(settings_from(values)), values["event_loop"], "agent")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run an agent (the rootless connector next to your services)",
        description=(
            "Run a kakuremichi agent: connects out to Control with its API key, speaks "
            "WireGuard (pure Python, user space) to every gateway, and forwards the "
            "gateways' connections to local targets: HTTP tunnels by Host, raw TCP and UDP "
            "tunnels by port. Needs no root, no TUN device and no inbound port; keeps "
            "serving its last configuration while Control is unreachable."
        ),
    )
    add_settings(parser, SETTINGS)
    parser.set_defaults(run=run)
