"""``kakuremichi control``: run the management server under uvicorn.

SIGTERM/SIGINT close every WebSocket with 1001 (going away) before uvicorn stops, so
gateways and agents reconnect promptly to the next Control instead of waiting for a
timeout; they keep serving on their last config meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from common import eventloop, logs, protocol
from common.config import (
    COMMON,
    ConfigError,
    Setting,
    add_settings,
    boolean,
    port,
    positive_float,
    positive_int,
    resolve,
)
from common.controlclient import is_loopback_url
from common.eventloop import EVENT_LOOP
from control import cluster, listener
from control.alloc import DEFAULT_AGENT_HOST, DEFAULT_POOL, DEFAULT_PREFIX, AddressPlan
from control.api import authlimit
from control.api.models import check_domain
from control.app import ControlSettings, create_app
from control.selfacme import ControlAcme, prepare
from control.tls import ControlTls, TlsError, ensure_self_signed
from control.ws import intake
from control.ws.admission import DEFAULT_PER_ADDRESS

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


def trusted_proxies(text: str) -> str:
    """``--trusted-proxies``: '*' or addresses/networks, checked here (uvicorn would
    fail at the first request instead)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items != ["*"]:
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
    return ",".join(items)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "address to listen on", "0.0.0.0"),
    Setting("port", "TCP port for the API, dashboard and WebSocket hub", 7700, parse=port),
    Setting("data-dir", "state directory (SQLite database)", "./data/control"),
    Setting(
        "database-url",
        "database URL: sqlite+aiosqlite:///FILE (default: control.db in --data-dir; one "
        "Control) or postgresql+asyncpg://USER:PASSWORD@HOST/DB (also postgresql://), "
        "which several Control replicas can share",
        None,
        secret=True,
        metavar="URL",
    ),
    Setting(
        "admin-token",
        "bearer token for the REST API; generated and printed once if unset",
        None,
        secret=True,
        metavar="TOKEN",
    ),
    Setting(
        "address-pool", "address pool agents' subnets are carved from", DEFAULT_POOL, metavar="CIDR"
    ),
    Setting("agent-prefix", "prefix length of each agent's subnet", DEFAULT_PREFIX, parse=int),
    Setting(
        "agent-host",
        "host number of the agent in its subnet; gateways take 1 .. this-1",
        DEFAULT_AGENT_HOST,
        parse=int,
        metavar="N",
    ),
    Setting(
        "offline-after",
        "seconds without a heartbeat before a client is marked offline",
        60.0,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "max-unauthenticated-per-address",
        "WebSocket connections one address (IPv6: one /64) may hold open before they "
        "authenticate; more get HTTP 429",
        DEFAULT_PER_ADDRESS,
        parse=positive_int,
        metavar="N",
    ),
    Setting(
        "auth-queue",
        "WebSocket connections Control authenticates at once (a reconnect storm's "
        "queue); more are refused with HTTP 503 and Retry-After (or closed with 1013 "
        "'retry after N'), each told its own wait, which clients honour with a little "
        "jitter",
        intake.DEFAULT_LIMIT,
        parse=positive_int,
        metavar="N",
    ),
    Setting(
        "request-head-timeout",
        "seconds a connection has to complete its request line and headers (the first "
        "from connecting, a later one from its first byte); then it is closed",
        listener.DEFAULT_HEAD_TIMEOUT,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "max-pre-request-per-address",
        "connections one address (IPv6: one /64) may hold open before their first request "
        "head is complete; more get HTTP 429 and are closed",
        listener.DEFAULT_PRE_REQUEST_PER_ADDRESS,
        parse=positive_int,
        metavar="N",
    ),
    Setting(
        "admin-auth-failures",
        "failed admin-token attempts one address (IPv6: one /64) may make per minute on "
        "/api/; past it its requests get HTTP 429 until the oldest is a minute old",
        authlimit.DEFAULT_LIMIT,
        parse=positive_int,
        metavar="N",
    ),
    Setting(
        "replica-timeout",
        "with several Control replicas on one PostgreSQL database (--database-url "
        "postgresql+asyncpg://...): seconds without a heartbeat after which a replica "
        "counts as dead, its clients' presence is dropped and its once-only jobs move",
        cluster.DEFAULT_TIMEOUT,
        parse=positive_float,
        metavar="SECONDS",
    ),
    Setting(
        "public-url",
        "the URL agents and gateways reach Control at (https://control.example.com), put "
        "in enrollment tokens; default: the URL an admin request came to",
        None,
        metavar="URL",
    ),
    Setting(
        "tls-cert",
        "PEM certificate chain to serve HTTPS with (with --tls-key); reloaded when the "
        "file changes, no restart",
        None,
        metavar="FILE",
    ),
    Setting("tls-key", "PEM private key of --tls-cert", None, metavar="FILE"),
    Setting(
        "tls-self-signed",
        "serve HTTPS with a certificate generated once in --data-dir/tls for the "
        "--public-url host (enrollment tokens pin its key, so clients need no CA)",
        False,
        parse=boolean,
        metavar="BOOL",
    ),
    Setting(
        "acme-domain",
        "serve HTTPS with a certificate for this host name from ACME (Let's Encrypt by "
        "default), obtained at start and renewed 30 days before expiry without a restart; "
        "the CA validates over HTTP-01 on --acme-http-port (or on a gateway the name "
        "points at)",
        None,
        metavar="HOST",
    ),
    Setting("acme-email", "contact e-mail for Control's ACME account", None, metavar="EMAIL"),
    Setting(
        "acme-directory",
        "ACME directory URL for --acme-domain",
        LETS_ENCRYPT,
        metavar="URL",
    ),
    Setting(
        "acme-ca-file",
        "CA bundle to trust for the ACME server (e.g. Pebble); default: the system's",
        None,
        metavar="FILE",
    ),
    Setting(
        "acme-http-port",
        "plain-HTTP port answering --acme-domain's HTTP-01 challenges (and redirecting the "
        "rest to HTTPS); the CA connects to port 80, so anything else needs a port "
        "mapping; 0: no listener (gateways the name points at answer)",
        80,
        parse=port,
    ),
    Setting(
        "trusted-proxies",
        "comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
        "and X-Forwarded-Proto Control believes (the client's address for limits and "
        "logs; https makes the dashboard's cookies Secure); '*' trusts any",
        "127.0.0.1",
        parse=trusted_proxies,
        metavar="LIST",
    ),
    Setting(
        "dashboard-insecure-http",
        "let the dashboard sign users in over plain HTTP from other machines (its cookies "
        "then travel unencrypted); without it, plain HTTP works from loopback only",
        False,
        parse=boolean,
        metavar="BOOL",
    ),
    EVENT_LOOP,
    *COMMON,
)

log = logging.getLogger("control")


class _Server(uvicorn.Server):
    """uvicorn, but WebSockets get 1001 before the listener stops."""

    def __init__(
        self, config: uvicorn.Config, app: Any, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(config)
        self._app = app
        self._ssl_context = ssl_context

    async def startup(self, sockets: Any = None) -> None:
        if self._ssl_context is not None:
            # our context, not one uvicorn builds from file names: control.tls swaps
            # its certificate when the files change
            self.config.ssl = self._ssl_context
        await super().startup(sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        log.info("shutting down: closing client connections")
        try:
            await asyncio.wait_for(self._app.state.hub.close_all(), 5.0)
        except Exception:
            log.exception("error while closing connections")
        await super().shutdown(sockets)


def settings_from(values: dict[str, Any]) -> tuple[ControlSettings, Path]:
    data_dir = Path(values["data_dir"]).expanduser()
    url = values["database_url"]
    if url is None:
        url = f"sqlite+aiosqlite:///{data_dir.resolve() / 'control.db'}"
    url = database_url(url)
    try:
        if values["host"] != "localhost":
            ipaddress.ip_address(values["host"])
    except ValueError as exc:
        raise ConfigError(f"--host: {values['host']!r} is not an IP address") from exc
    try:
        AddressPlan(values["address_pool"], values["agent_prefix"], values["agent_host"])
    except ValueError as exc:
        raise ConfigError(f"--address-pool/--agent-prefix/--agent-host: {exc}") from exc
    token = values["admin_token"]
    if token is not None and len(token) < 16:
        raise ConfigError("--admin-token: must be at least 16 characters")
    public_url = values["public_url"]
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--public-url: {public_url!r} is not an http(s):// URL")
        public_url = public_url.rstrip("/")

    def announce(text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    tls = tls_from(values, data_dir, public_url)
    acme = acme_from(values, data_dir, tls)

    return (
        ControlSettings(
            database_url=url,
            admin_token=token,
            address_pool=values["address_pool"],
            agent_prefix=values["agent_prefix"],
            agent_host=values["agent_host"],
            offline_after=values["offline_after"],
            max_unauthenticated_per_address=values["max_unauthenticated_per_address"],
            admin_auth_failures=values["admin_auth_failures"],
            announce=announce,
            tls=tls,
            acme=acme,
            public_url=public_url,
            listen_url=listen_url(values),
            dashboard_insecure_http=values["dashboard_insecure_http"],
            replica_timeout=values["replica_timeout"],
            auth_queue=values["auth_queue"],
        ),
        data_dir,
    )


def database_url(url: str) -> str:
    """``--database-url`` checked: SQLite through aiosqlite or PostgreSQL through
    asyncpg (``postgresql://`` and ``postgres://`` mean asyncpg)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ConfigError(
            "--database-url: not a URL (sqlite+aiosqlite:///FILE or postgresql://...)"
        )
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return "postgresql+asyncpg://" + rest
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return "sqlite+aiosqlite://" + rest
    raise ConfigError(
        f"--database-url: {scheme}:// is not supported; use sqlite+aiosqlite:///FILE or "
        "postgresql+asyncpg://USER:PASSWORD@HOST/DB"
    )


def listen_url(values: dict[str, Any]) -> str:
    """Control's URL on this machine (the dashboard's setup link without --public-url)."""
    tls = values["tls_cert"] or values["tls_self_signed"] or values["acme_domain"]
    scheme = "https" if tls else "http"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(values["host"], values["host"])
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{values['port']}"


def tls_from(values: dict[str, Any], data_dir: Path, public_url: str | None) -> ControlTls | None:
    """Control's HTTPS from ``--tls-cert``/``--tls-key`` or ``--tls-self-signed``."""
    cert, key, self_signed = values["tls_cert"], values["tls_key"], values["tls_self_signed"]
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key: give both or neither")
    if cert and self_signed:
        raise ConfigError("--tls-self-signed: not with --tls-cert (which certificate?)")
    domain = values["acme_domain"]
    if domain:
        if cert or self_signed:
            raise ConfigError(
                "--acme-domain: not with --tls-cert or --tls-self-signed (which certificate?)"
            )
        try:
            domain = values["acme_domain"] = check_domain(domain)
        except ValueError as exc:
            raise ConfigError(f"--acme-domain: {exc}") from None
        try:
            cert, key = prepare(data_dir, domain)
        except OSError as exc:
            raise ConfigError(f"--acme-domain: cannot write to {data_dir}: {exc}") from exc
    if self_signed:
        host = urlsplit(public_url).hostname if public_url else None
        names = {"localhost", "127.0.0.1", "::1"} | ({host} if host else set())
        try:
            cert, key = ensure_self_signed(data_dir / "tls", sorted(names))
        except OSError as exc:
            raise ConfigError(f"--tls-self-signed: cannot write to {data_dir}: {exc}") from exc
    if not cert:
        return None
    try:
        return ControlTls(Path(cert).expanduser(), Path(key).expanduser())
    except TlsError as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from exc


def acme_from(values: dict[str, Any], data_dir: Path, tls: ControlTls | None) -> ControlAcme | None:
    """Control's own ACME from ``--acme-domain`` (its files are already in ``tls``)."""
    if not values["acme_domain"] or tls is None:
        if values["acme_email"] or values["acme_ca_file"]:
            raise ConfigError("--acme-email/--acme-ca-file: only with --acme-domain")
        return None
    directory = values["acme_directory"]
    if urlsplit(directory).scheme != "https":
        raise ConfigError(f"--acme-directory: {directory!r} is not an https:// URL")
    return ControlAcme(
        values["acme_domain"],
        directory,
        data_dir,
        tls,
        email=values["acme_email"],
        ca_file=values["acme_ca_file"],
        http_host=values["host"],
        http_port=values["acme_http_port"],
        https_port=values["port"],
    )


def run(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    logs.setup(values["log_format"], values["log_level"])
    settings, data_dir = settings_from(values)
    if settings.database_url.startswith("sqlite"):
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"--data-dir: cannot create {data_dir}: {exc.strerror}") from exc
        if not os.access(data_dir, os.W_OK):
            raise ConfigError(f"--data-dir: {data_dir} is not writable")
    server = server_for(
        create_app(settings),
        values["host"],
        values["port"],
        values["event_loop"],
        head_timeout=values["request_head_timeout"],
        pre_request_per_address=values["max_pre_request_per_address"],
        ssl_context=settings.tls.context if settings.tls else None,
        trusted=values["trusted_proxies"],
    )
    tls = settings.tls
    log.info(
        "starting control",
        extra=logs.kv(
            host=values["host"],
            port=values["port"],
            https=bool(tls),
            pin_sha256=tls.pin if tls else None,
        ),
    )
    if tls is None:
        url = settings.public_url or f"http://{values['host']}:{values['port']}"
        if not is_loopback_url(url):
            log.warning(
                "Control serves plain HTTP on an address that is not loopback: the admin "
                "token, API keys and certificate keys cross the network unencrypted "
                "unless a TLS proxy is in front; use --tls-cert/--tls-key, "
                "--tls-self-signed or --acme-domain",
                extra=logs.kv(host=values["host"], port=values["port"]),
            )
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op
    # handlers in place that re-raise is harmless and a SIGTERM ends with exit code 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    # What ``server.run()`` does, with the loop made by the helper every command uses.
    eventloop.run(server.serve(), values["event_loop"], "control")
    # uvicorn leaves ``started`` False when binding or the lifespan failed.
    return 0 if server.started else 1


def server_for(
    app: Any,
    host: str,
    port: int,
    event_loop: str = "auto",
    *,
    head_timeout: float = listener.DEFAULT_HEAD_TIMEOUT,
    pre_request_per_address: int = listener.DEFAULT_PRE_REQUEST_PER_ADDRESS,
    ssl_context: ssl.SSLContext | None = None,
    trusted: str = "127.0.0.1",
) -> _Server:
    """The uvicorn server Control runs on (also used in-process by ``kakuremichi demo``).

    ``event_loop`` is an ``--event-loop`` choice; uvicorn's ``loop`` setting gets the
    loop it stands for, the same one :func:`common.eventloop.run` creates.  Every
    connection runs under the request-head deadline and the per-address cap on
    connections without a request (``control.listener``).  ``trusted``: the proxies
    whose ``X-Forwarded-For``/``-Proto`` uvicorn applies (``--trusted-proxies``)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=listener.protocol_class(listener.HeadRules(head_timeout, pre_request_per_address)),
        loop=eventloop.resolve(event_loop),
        log_config=None,
        ws_max_size=protocol.MAX_FRAME_BYTES,
        # Frames are small JSON and broadcasts go to thousands of clients: compressing
        # each copy separately costs more CPU than it saves bandwidth.
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=10,
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips=trusted,
    )
    return _Server(config, app, ssl_context)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "control",
        help="run the control server (REST API, WebSocket hub)",
        description=(
            "Run kakuremichi Control: stores agents, gateways, tunnels and certificates in "
            "SQLite, serves the REST API under /api/ (admin bearer token), the OpenAPI "
            "document at /openapi.json and the WebSocket hub at /ws that configures "
            "gateways and agents."
        ),
    )
    add_settings(parser, SETTINGS)
    parser.set_defaults(run=run)
