"""``kakuremichi gateway``: the public edge.

SIGTERM/SIGINT stop accepting, let in-flight requests finish, close the Control
connection and remove the WireGuard interface; exit code 0.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any

from common import eventloop, logs
from common.acme.dns import PROVIDERS, TSIG_ALGORITHMS, DnsError, DnsProvider, dns_provider
from common.config import (
    COMMON,
    ConfigError,
    Setting,
    add_settings,
    boolean,
    port,
    resolve,
)
from common.controlclient import CONTROL_CA, TOKEN, control_target
from common.eventloop import EVENT_LOOP
from common.relay.accesslog import AccessLogSettings
from common.relay.limits import LimitSettings
from common.service import raise_open_file_limit, run_until_signalled
from common.wgstream import PATH as STREAM_PATH
from gateway.proxy.h2settings import H2Settings
from gateway.runtime import Gateway, GatewaySettings
from gateway.wg.device import has_net_admin

SETTINGS: tuple[Setting, ...] = (
    TOKEN,
    Setting(
        "control-url",
        "Control's URL (https://host:port); several Control replicas' URLs, "
        "comma-separated, to move to the next one whenever a connection ends",
        None,
        metavar="URL",
    ),
    Setting("api-key", "this gateway's API key (gtw_…)", None, secret=True, metavar="KEY"),
    CONTROL_CA,
    Setting("data-dir", "state directory (WireGuard key, certificates)", "./data/gateway"),
    Setting(
        "public-ip", "address agents reach this gateway's WireGuard port at", None, metavar="IP"
    ),
    Setting("wireguard-port", "UDP port of the WireGuard interface", 51820, parse=port),
    Setting(
        "wireguard-backend",
        "WireGuard implementation (auto: kernel, else wireguard-go; userspace without CAP_NET_ADMIN)",
        "auto",
        choices=("auto", "kernel", "wireguard-go", "userspace"),
    ),
    Setting(
        "interface", "WireGuard interface name (at most 15 characters)", "kkm0", metavar="NAME"
    ),
    Setting(
        "host",
        "address the public listeners bind (HTTP(S), raw TCP/UDP tunnels and, on the "
        "userspace backend, WireGuard's UDP socket)",
        "0.0.0.0",
    ),
    Setting("http-port", "public HTTP port", 80, parse=port),
    Setting("https-port", "public HTTPS port (0 disables HTTPS)", 443, parse=port),
    Setting(
        "redirect-https",
        "answer plain HTTP with a redirect to HTTPS",
        False,
        parse=boolean,
        metavar="BOOL",
    ),
    Setting(
        "wireguard-over-https",
        "accept WireGuard from agents whose UDP is blocked, as a WebSocket on the HTTPS "
        f"port at {STREAM_PATH} (agents fall back to it on their own)",
        True,
        parse=boolean,
        metavar="BOOL",
    ),
    Setting("admin-host", "address of the /metrics and /healthz listener", "127.0.0.1"),
    Setting(
        "admin-port",
        "port of the /metrics, /livez, /readyz and /healthz listener (not 9090, "
        "Prometheus's own default)",
        9901,
        parse=port,
    ),
    Setting("upstream-port", "port agents accept HTTP on (inside the tunnel)", 80, parse=port),
    Setting(
        "rate-limit",
        "requests per second each client address may sustain (0: no limit; then 429)",
        50.0,
        parse=float,
        metavar="RPS",
    ),
    Setting("rate-burst", "requests a client may burst above --rate-limit", 100, parse=int),
    Setting(
        "max-connections-per-client",
        "concurrent connections per client address (0: unlimited)",
        256,
        parse=int,
    ),
    Setting(
        "max-connections",
        "concurrent client connections in all (0: unlimited; beyond: 429); the open-file "
        "limit is raised to fit at start",
        10_000,
        parse=int,
    ),
    Setting("acme-directory", "ACME directory URL; unset disables ACME", None, metavar="URL"),
    Setting("acme-email", "contact e-mail for the ACME account", None, metavar="EMAIL"),
    Setting(
        "acme-ca-file", "CA bundle to trust for the ACME server (e.g. Pebble)", None, metavar="FILE"
    ),
    Setting(
        "acme-dns-provider",
        "DNS-01 provider for certificates HTTP-01 cannot get (wildcards): rfc2136 (dynamic "
        "DNS updates with TSIG); unset: HTTP-01 only",
        None,
        choices=tuple(PROVIDERS),
        metavar="NAME",
    ),
    Setting(
        "acme-dns-server",
        "rfc2136: the zone's primary DNS server, HOST or HOST:PORT",
        None,
        metavar="HOST:PORT",
    ),
    Setting(
        "acme-dns-zone",
        "the zone the provider updates: certificates for names at or under it (and "
        "*.NAME wildcards) use DNS-01",
        None,
        metavar="ZONE",
    ),
    Setting("acme-dns-tsig-key", "rfc2136: the TSIG key's name", None, metavar="NAME"),
    Setting(
        "acme-dns-tsig-algorithm",
        "rfc2136: the TSIG algorithm",
        "hmac-sha256",
        choices=TSIG_ALGORITHMS,
    ),
    Setting(
        "acme-dns-tsig-secret",
        "rfc2136: the TSIG key's secret (base64)",
        None,
        secret=True,
        metavar="BASE64",
    ),
    Setting(
        "access-log",
        "access log, one line per HTTP request and per TCP/UDP flow: a file path, or - for "
        "standard output; unset: off",
        None,
        metavar="PATH",
    ),
    Setting(
        "access-log-format",
        "access log lines: logfmt or json",
        "logfmt",
        choices=("logfmt", "json"),
    ),
    Setting(
        "access-log-max-bytes", "rotate the access log file past this size", 100 << 20, parse=int
    ),
    Setting("access-log-backups", "rotated access log files kept", 5, parse=int),
    Setting(
        "http2",
        "offer HTTP/2 (ALPN h2) on the HTTPS listener, gRPC included; false: HTTP/1.1 only",
        True,
        parse=boolean,
        metavar="BOOL",
    ),
    Setting(
        "http2-max-streams",
        "concurrent HTTP/2 streams per client connection (SETTINGS_MAX_CONCURRENT_STREAMS)",
        100,
        parse=int,
    ),
    Setting(
        "oidc-ca-file",
        "CA bundle to trust for the tunnels' OIDC providers (default: the system's)",
        None,
        metavar="FILE",
    ),
    EVENT_LOOP,
    *COMMON,
)


def settings_from(values: dict[str, Any]) -> GatewaySettings:
    control = control_target(values, "gateway")
    if not values["public_ip"]:
        raise ConfigError("--public-ip (or KAKUREMICHI_PUBLIC_IP) is required")
    for name in ("public_ip", "host", "admin_host"):
        try:
            ipaddress.ip_address(values[name])
        except ValueError as exc:
            raise ConfigError(
                f"--{name.replace('_', '-')}: {values[name]!r} is not an IP address"
            ) from exc
    if not 1 <= len(values["interface"]) <= 15:
        raise ConfigError("--interface: 1-15 characters")
    backend = values["wireguard_backend"]
    if backend in ("kernel", "wireguard-go") and not has_net_admin():
        raise ConfigError(
            f"--wireguard-backend {backend}: creating a WireGuard interface needs "
            "CAP_NET_ADMIN (root, or e.g. docker run --cap-add NET_ADMIN --device "
            "/dev/net/tun), which this process lacks; --wireguard-backend userspace "
            "needs no capability"
        )
    try:
        limits = LimitSettings(
            rate=values["rate_limit"],
            burst=values["rate_burst"],
            max_connections_per_client=values["max_connections_per_client"],
            max_connections=values["max_connections"],
        )
    except ValueError as exc:
        raise ConfigError(
            f"--rate-limit/--rate-burst/--max-connections-per-client/--max-connections: {exc}"
        ) from exc
    try:
        access_log = AccessLogSettings(
            path=values["access_log"],
            format=values["access_log_format"],
            max_bytes=values["access_log_max_bytes"],
            backups=values["access_log_backups"],
        )
    except ValueError as exc:
        raise ConfigError(f"--access-log-*: {exc}") from exc
    try:
        http2 = H2Settings(
            enabled=values["http2"], max_concurrent_streams=values["http2_max_streams"]
        )
    except ValueError as exc:
        raise ConfigError(f"--http2-max-streams: {exc}") from exc
    return GatewaySettings(
        control_url=control.url,
        api_key=control.api_key,
        control_ssl=control.ssl_context,
        control_pin=control.pin,
        data_dir=Path(values["data_dir"]).expanduser(),
        public_ip=values["public_ip"],
        wireguard_port=values["wireguard_port"],
        backend=values["wireguard_backend"],
        interface=values["interface"],
        host=values["host"],
        http_port=values["http_port"],
        https_port=values["https_port"],
        admin_host=values["admin_host"],
        admin_port=values["admin_port"],
        upstream_port=values["upstream_port"],
        redirect_https=values["redirect_https"],
        wireguard_over_https=values["wireguard_over_https"],
        acme_directory=values["acme_directory"],
        acme_email=values["acme_email"],
        acme_ca_file=values["acme_ca_file"],
        acme_dns=acme_dns_from(values),
        limits=limits,
        access_log=access_log,
        oidc_ca_file=values["oidc_ca_file"],
        http2=http2,
    )


def acme_dns_from(values: dict[str, Any]) -> DnsProvider | None:
    """The DNS-01 provider of ``--acme-dns-*`` (None without ``--acme-dns-provider``)."""
    kind = values["acme_dns_provider"]
    if kind is None:
        return None
    if not values["acme_directory"]:
        raise ConfigError("--acme-dns-provider: needs --acme-directory")
    options = {
        key: values[f"acme_dns_{key}"]
        for key in ("server", "zone", "tsig_key", "tsig_algorithm", "tsig_secret")
    }
    try:
        return dns_provider(kind, options)
    except DnsError as exc:
        raise ConfigError(f"--acme-dns-provider {kind}: {exc}") from None


async def serve(settings: GatewaySettings) -> int:
    # a client connection and its connection to the agent, plus room for the rest
    cap = settings.limits.max_connections
    raise_open_file_limit(2 * cap + 1024 if cap else None, "gateway")
    gateway = Gateway(settings)
    return await run_until_signalled(gateway, "gateway")


def run(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    logs.setup(values["log_format"], values["log_level"])
    return eventloop.run(serve(settings_from(values)), values["event_loop"], "gateway")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run a gateway (the public edge)",
        description=(
            "Run a kakuremichi gateway: connects to Control with its API key, manages a "
            "WireGuard interface with one peer per agent, serves HTTP/HTTPS for every "
            "tunnel domain (certificates from Control or ACME) and raw TCP and UDP tunnels, and "
            "forwards through WireGuard to the agent that owns each tunnel. The kernel and "
            "wireguard-go backends need root (or CAP_NET_ADMIN); the userspace backend runs "
            "as any user."
        ),
    )
    add_settings(parser, SETTINGS)
    parser.set_defaults(run=run)
