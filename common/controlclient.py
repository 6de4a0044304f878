"""The client side of the Control protocol, shared by the gateway and the agent.

Theory of operation
-------------------
``ControlClient.run()`` connects to Control's ``/ws``, sends ``auth`` (API key, public
key, version; a gateway adds its public IP and WireGuard port), and then applies what
Control sends to a :class:`ControlView`:

* ``config`` replaces the whole view (it is a full snapshot);
* ``tunnel_create`` / ``tunnel_update`` upsert one tunnel, ``tunnel_delete`` removes one;
  applying any of them twice changes nothing (idempotent).

After every applied frame ``on_change(view)`` is called; the program reconciles its
data plane to the view.  A heartbeat carrying the last ``configVersion`` goes out every
``heartbeatInterval`` seconds (Control resends a full config if it is stale).

The client never gives up: any failure (refused connection, DNS, TLS, close, auth
error) leads to a reconnect after an exponential back-off with full jitter, from 1 s
up to 60 s, reset after a connection that lived long enough.  While disconnected the
view keeps its last good content, so traffic keeps flowing.  Frames that do not parse
are logged and skipped; they never end the connection or the process.

Several Control replicas: ``--control-url`` may name several URLs (comma-separated) of
replicas sharing one database; the client uses the first and moves to the next one
whenever a connection ends, so a dead replica's clients come back at another (one URL
in front of a load balancer works as well).  A busy Control refuses the upgrade
with HTTP 503 and ``Retry-After: N`` (or closes with 1013 and ``retry after N``): the
client then waits N seconds plus a quarter of N (at least a second) of jitter, without
growing its back-off.  Control hands a crowd it turns away in a reconnect storm
successive waits at the rate it takes clients in, so they come back spread out.

One refusal is not transient: an admin disabled this agent or gateway (``auth_error``
code ``disabled``, or close code 4008 on a live connection).  The view is then marked
``disabled`` and serves every tunnel as disabled (also from the state file after a
restart), the client keeps retrying with the same key, and the first ``config`` after
Control lets it in again is applied whatever it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

from common import jsonsafe
from common import protocol as p
from common.config import ENV_PREFIX, ConfigError, Setting
from common.logs import OncePer, kv
from common.token import TokenError, spki_pin_of_der
from common.token import decode as decode_token

log = logging.getLogger("kakuremichi.controlclient")

STABLE_AFTER = 30.0  # a connection that lived this long resets the back-off


def control_urls(text: str) -> list[str]:
    """``--control-url``: one URL, or several (comma-separated) of Control replicas
    serving the same database; a client uses the first and moves to the next one
    whenever a connection ends.  ValueError for an empty list."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"{text!r} names no URL")
    if len(urls) > 16:
        raise ValueError("at most 16 Control URLs")
    return urls


def websocket_url(control_url: str) -> str:
    """``http(s)://host[:port][/prefix]`` or ``ws(s)://…`` → the hub's ``ws(s)://…/ws``."""
    parts = urlsplit(control_url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"{control_url!r} is not an http(s):// or ws(s):// URL")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class PinMismatch(Exception):
    """Control's certificate is not the one the enrollment token pins."""


def is_loopback_url(url: str) -> bool:
    """True if the URL's host is ``localhost`` or a loopback address."""
    host = (urlsplit(url.strip()).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_warning(url: str) -> str | None:
    """A warning to print at start when ``url`` reaches a non-loopback Control in clear."""
    scheme = urlsplit(url.strip()).scheme
    if scheme not in ("http", "ws") or is_loopback_url(url):
        return None
    return (
        f"Control URL {url} is plain {scheme}:// to a host that is not loopback: the API "
        "key, the configuration (certificate keys included) and admin tokens cross the "
        "network unencrypted; serve Control over HTTPS (--tls-cert/--tls-key or "
        "--acme-domain) and use https://"
    )


def client_ssl_context(ca_file: str | None = None, pin: str | None = None) -> ssl.SSLContext:
    """How a gateway, agent or admin command verifies Control's certificate.

    Without a pin: the system's trust store, or only ``ca_file`` (PEM) for a private
    CA, with the host name checked.  With a pin (from an enrollment token) the chain is
    not checked against any CA: :func:`check_pin` must accept the peer's key before
    anything secret is sent.  ``ssl.SSLError``/``OSError`` for a CA file that cannot be
    read are the caller's to turn into a configuration error."""
    if pin is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, pin: str | None) -> None:
    """Raise :class:`PinMismatch` unless the peer's certificate key has ``pin``."""
    if pin is None:
        return
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PinMismatch("Control presented no certificate, but the token pins one")
    seen = spki_pin_of_der(der)
    if seen != pin:
        raise PinMismatch(
            f"Control's certificate key (sha256 {seen}) is not the one the enrollment "
            f"token pins (sha256 {pin}); refusing to send the API key. Was Control's "
            "certificate replaced with a new key? Then issue a new token (rotate-key)."
        )


def describe_tls_error(exc: BaseException) -> str:
    """A connection error, explained when it (or its cause, as httpx wraps them) is
    about Control's certificate."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or isinstance(cause, ssl.SSLCertVerificationError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"Control's certificate is not trusted ({cause.verify_message or cause}): pass "
            "--control-ca FILE for a private CA, or join with an enrollment token "
            "(--token), which pins Control's key"
        )
    return f"{type(exc).__name__}: {exc}"


#: the settings every program that talks to Control has (agent, gateway, admin, apply)
CONTROL_CA = Setting(
    "control-ca",
    "PEM file of the CA that signed Control's certificate, for a private CA (default: "
    "the system's trust store; not needed with a --token, which pins Control's key)",
    None,
    metavar="FILE",
)
TOKEN = Setting(
    "token",
    "enrollment token (kmt_…, printed by 'admin agent|gateway create'): Control's URL, "
    "this program's API key and Control's certificate pin in one; replaces --api-key "
    "(a --control-url given too overrides the token's URL, the pin still applies)",
    None,
    secret=True,
    metavar="TOKEN",
)


@dataclass(frozen=True)
class ControlTarget:
    """Where Control is and how to trust it, resolved from the settings."""

    url: str
    api_key: str
    ssl_context: ssl.SSLContext | None
    pin: str | None


def control_target(values: dict[str, Any], kind: str) -> ControlTarget:
    """``--token`` / ``--control-url`` / ``--api-key`` / ``--control-ca`` of an agent
    (``kind="agent"``, keys ``agt_``) or gateway (``gtw_``) made one
    :class:`ControlTarget`; :class:`ConfigError` names the setting that is wrong.  A
    plain-text URL to a non-loopback host is allowed but logged as a warning."""
    prefix = {"agent": "agt_", "gateway": "gtw_"}[kind]
    url, api_key, pin = values.get("control_url"), values.get("api_key"), None
    if values.get("token"):
        if api_key:
            raise ConfigError("--token and --api-key: give one of them (the token holds the key)")
        try:
            token = decode_token(values["token"])
        except TokenError as exc:
            raise ConfigError(f"--token: {exc}") from None
        if token.kind != kind:
            raise ConfigError(f"--token: this is a {token.kind}'s token, not a {kind}'s")
        url, api_key, pin = url or token.control_url, token.api_key, token.pin
    for name, value in (("control-url", url), ("api-key", api_key)):
        if not value:
            env = ENV_PREFIX + name.replace("-", "_").upper()
            raise ConfigError(f"--{name} (or {env}), or a --token, is required")
    assert url is not None and api_key is not None
    try:
        ws_urls = [websocket_url(u) for u in control_urls(url)]
    except ValueError as exc:
        raise ConfigError(f"--control-url: {exc}") from exc
    if len({u.startswith("wss://") for u in ws_urls}) > 1:
        raise ConfigError("--control-url: give every Control URL the same scheme")
    ws_url = ws_urls[0]
    if not api_key.startswith(prefix):
        raise ConfigError(
            f"--api-key: {'an' if kind == 'agent' else 'a'} {kind} key starts with {prefix}"
        )
    secure = ws_url.startswith("wss://")
    if pin is not None and not secure:
        raise ConfigError(
            f"--control-url: {url} is not https://, but the token pins Control's "
            "certificate; use Control's https:// URL"
        )
    context = None
    if secure:
        ca_file = values.get("control_ca")
        if ca_file and pin is not None:
            log.info("--control-ca is not used: the token pins Control's key")
        try:
            context = client_ssl_context(None if pin else ca_file, pin)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--control-ca: cannot load {ca_file}: {exc}") from exc
    for one in control_urls(url):
        warning = plaintext_warning(one)
        if warning:
            log.warning(warning)
    return ControlTarget(url, api_key, context, pin)


@dataclass
class ControlView:
    """What Control last told us, parsed (``common.protocol``); survives disconnects.

    ``config`` is the last full snapshot, ``tunnels`` its tunnels with every
    ``tunnel_*`` event since applied; :meth:`agent_config` / :meth:`gateway_config`
    give both together."""

    config: p.AgentConfig | p.GatewayConfig | None = None
    tunnels: dict[str, p.TunnelSpec] = field(default_factory=dict)
    config_version: int = 0
    #: Control said an admin disabled us (``auth_error`` code ``disabled`` or close
    #: code 4008): every tunnel is served as disabled until Control lets us in again
    disabled: bool = False

    @property
    def has_config(self) -> bool:
        return self.config is not None

    def current(self) -> p.AgentConfig | p.GatewayConfig | None:
        """The snapshot with the tunnels as they stand now.  While we are disabled every
        tunnel is disabled, and an agent peers with no gateway (none peers with it): let
        in again, it adds them afresh and, as the side that initiates, handshakes at
        once (a gateway keeps its peers: agents re-add it and handshake with it)."""
        if self.config is None:
            return None
        tunnels = tuple(self.tunnels.values())
        if not self.disabled:
            return replace(self.config, tunnels=tunnels)
        tunnels = tuple(replace(t, enabled=False) for t in tunnels)
        if isinstance(self.config, p.AgentConfig):
            return replace(self.config, tunnels=tunnels, gateways=())
        return replace(self.config, tunnels=tunnels)

    def agent_config(self) -> p.AgentConfig | None:
        current = self.current()
        return current if isinstance(current, p.AgentConfig) else None

    def gateway_config(self) -> p.GatewayConfig | None:
        current = self.current()
        return current if isinstance(current, p.GatewayConfig) else None

    # -- the last good configuration, kept across restarts ---------------------------

    def store(self, path: Path, config: p.AgentConfig | p.GatewayConfig | None = None) -> None:
        """Write ``config`` (default: the current one) as a ``config`` frame's data to
        ``path`` atomically, readable by the owner only (a gateway's holds certificate
        keys); an error is logged, never raised."""
        current = self.current() if config is None else config
        if current is None:
            return
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(current.to_wire(), handle)
            os.chmod(tmp, 0o600)  # an older file of ours may have had other bits
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not store the configuration", extra=kv(error=str(exc)))

    def restore(self, path: Path, client_type: str) -> bool:
        """Load what :meth:`store` wrote, parsed as a ``config`` frame is; False (and a
        warning) if there is none or it is unreadable.  The view keeps its
        ``config_version`` of 0, so Control's first config replaces it."""
        try:
            data = jsonsafe.loads(path.read_bytes())
            self.apply(p.Frame("config", data if isinstance(data, dict) else {}, None), client_type)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, p.ProtocolError) as exc:
            log.warning(
                "stored configuration unreadable; waiting for control",
                extra=kv(file=str(path), error=str(exc)[:200]),
            )
            return False
        log.info(
            "serving the stored configuration until control answers",
            extra=kv(tunnels=len(self.tunnels)),
        )
        return True

    def apply(self, frame: p.Frame, client_type: str) -> bool:
        """Apply one frame; True if the view changed.  A frame that does not parse
        raises :class:`~common.protocol.ProtocolError` and changes nothing."""
        if frame.type == "config":
            config = p.parse_config(client_type, frame.data)
            changed = config != self.current()
            self.config = config
            self.tunnels = {t.id: t for t in config.tunnels}
        elif frame.type in ("tunnel_create", "tunnel_update"):
            tunnel = p.parse_tunnel(frame.data)
            changed = self.tunnels.get(tunnel.id) != tunnel
            self.tunnels[tunnel.id] = tunnel
        elif frame.type == "tunnel_delete":
            changed = self.tunnels.pop(p.parse_tunnel_delete(frame.data).id, None) is not None
        else:
            return False
        if frame.config_version is not None:
            self.config_version = frame.config_version
        return changed


@dataclass
class ControlClientSettings:
    """Who we are and where Control is."""

    control_url: str
    api_key: str
    client_type: str  # "agent" | "gateway"
    public_key: str
    version: str
    public_ip: str | None = None
    wireguard_port: int | None = None
    https_port: int | None = None  # a gateway's, for agents' stream transport
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    open_timeout: float = 15.0
    ssl_context: ssl.SSLContext | None = None
    #: the enrollment token's pin of Control's key (base64url SHA-256 of the SPKI)
    pin: str | None = None


class ControlClient:
    """Keeps a :class:`ControlView` in sync with Control, forever."""

    def __init__(
        self,
        settings: ControlClientSettings,
        on_change: Callable[[ControlView], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        #: every Control replica we may use, in order; ``url`` is the one in use
        self.urls = [websocket_url(u) for u in control_urls(settings.control_url)]
        self.url = self.urls[0]
        #: what Control's last close asked for (CLOSE_TRY_AGAIN), in seconds
        self.retry_after: int | None = None
        self.view = ControlView()
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.connected = asyncio.Event()
        self.identity: p.AuthSuccess | None = None
        self.attempts = 0
        self.last_error = ""
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._heartbeat_interval = p.HEARTBEAT_INTERVAL
        self._reenabled = False  # let in again after being disabled: apply the next config
        self._bad_log = OncePer(60.0)  # malformed frames from Control, by code
        self._reported_log = OncePer(60.0)  # error frames from Control, by code
        #: a program's own frame types (the gateway's ``acme_*``), handled instead of
        #: applied to the view; a handler raises ProtocolError for a bad frame
        self.handlers: dict[str, Callable[[p.Frame], Awaitable[None]]] = {}
        #: run after every successful ``auth`` (a program announcing itself)
        self.on_connect: Callable[[], Awaitable[None]] | None = None

    # -- outbound messages --------------------------------------------------------------

    async def send(self, type_: str, data: dict[str, Any]) -> bool:
        """Send a frame if connected; False if not (callers retry on their schedule)."""
        ws = self._ws
        if ws is None or not self.connected.is_set():
            return False
        try:
            await ws.send(p.encode(type_, data))
        except websockets.ConnectionClosed:
            return False
        return True

    # -- the loop -----------------------------------------------------------------------

    def backoff(self, failures: int) -> float:
        """Exponential back-off with full jitter: uniform(min, min * 2**n) capped at max."""
        ceiling = min(self.settings.backoff_max, self.settings.backoff_min * 2 ** min(failures, 16))
        return self.rng.uniform(self.settings.backoff_min, max(self.settings.backoff_min, ceiling))

    def retry_wait(self, seconds: int) -> float:
        """The wait after Control said ``retry after N``: N plus a quarter of N (at
        least a second) of jitter.  Control's waits are slots on its own schedule
        (``control.ws.intake``), so a crowd it turned away is spread already; the
        jitter only smooths its whole seconds."""
        return self.rng.uniform(seconds, seconds + max(1.0, seconds / 4))

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            self.attempts += 1
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except PinMismatch as exc:
                self.last_error = str(exc)
                log.error("refusing Control: wrong certificate", extra=kv(error=str(exc)))
            except websockets.ConnectionClosed as exc:  # closed before auth_success
                self.last_error = describe_tls_error(exc)
                if exc.rcvd is not None and exc.rcvd.code == p.CLOSE_TRY_AGAIN:
                    self.retry_after = p.parse_retry_after(exc.rcvd.reason) or 1
            except websockets.InvalidStatus as exc:  # refused before the upgrade
                self.last_error = describe_tls_error(exc)
                header = exc.response.headers.get("Retry-After", "")
                if exc.response.status_code in (429, 503) and header.isdigit():
                    self.retry_after = p.parse_retry_after(f"retry after {header[:6]}")
            except Exception as exc:  # every failure is transient for us
                self.last_error = describe_tls_error(exc)
            finally:
                self.connected.clear()
                self._ws = None
            if self._stopping:
                return
            told, self.retry_after = self.retry_after, None
            if told is not None:
                # Control is busy and said when to come back: no failure, the back-off
                # does not grow (a crowd may be turned away more than once)
                delay = self.retry_wait(told)
            else:
                failures = 0 if time.monotonic() - started > STABLE_AFTER else failures + 1
                delay = self.backoff(failures)
            if len(self.urls) > 1:
                # the next replica: this one may be gone (or busy)
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            log.log(
                # disabled: said once when it happened; each refused retry is routine
                logging.DEBUG if self.view.disabled else logging.WARNING,
                "control connection lost; keeping last config, reconnecting",
                extra=kv(error=self.last_error or "closed", retry_in_s=round(delay, 1)),
            )
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(1001, "shutting down")

    def _ssl_context(self) -> ssl.SSLContext:
        if self.settings.ssl_context is None:
            self.settings.ssl_context = client_ssl_context(pin=self.settings.pin)
        return self.settings.ssl_context

    async def _session(self) -> None:
        async with connect(
            self.url,
            open_timeout=self.settings.open_timeout,
            max_size=p.MAX_FRAME_BYTES * 16,
            ssl=self._ssl_context() if self.url.startswith("wss") else None,
            compression=None,
        ) as ws:
            if self.url.startswith("wss"):
                check_pin(ws.transport.get_extra_info("ssl_object"), self.settings.pin)
            self._ws = ws
            auth = p.Auth(
                api_key=self.settings.api_key,
                client_type=self.settings.client_type,
                public_key=self.settings.public_key,
                version=self.settings.version,
                public_ip=self.settings.public_ip,
                wireguard_port=self.settings.wireguard_port,
                https_port=self.settings.https_port,
            )
            await ws.send(p.encode("auth", auth.to_wire()))
            first = p.decode(await asyncio.wait_for(ws.recv(), p.AUTH_TIMEOUT * 2))
            if first.type != "auth_success":
                refusal = p.parse_error(first.data)
                self.last_error = f"authentication refused: {refusal.message or refusal.code}"
                if refusal.code == p.AUTH_DISABLED:
                    self._set_disabled()
                    return
                log.error(
                    "control refused our credentials",
                    extra=kv(code=refusal.code, reason=refusal.message[:200]),
                )
                return
            self.identity = p.parse_auth_success(first.data)
            if self.view.disabled:
                # enabled again: the config that follows is applied whatever it holds
                self.view.disabled = False
                self._reenabled = True
                log.info(f"this {self.settings.client_type} is enabled again")
            self._heartbeat_interval = self.identity.heartbeat_interval
            if first.config_version is not None:
                self.view.config_version = first.config_version
            self.connected.set()
            self.last_error = ""
            log.info(
                "connected to control",
                extra=kv(url=self.url, id=self.identity.id, name=self.identity.name),
            )
            if self.on_connect is not None:
                try:
                    await self.on_connect()
                except Exception:
                    log.exception("announcing ourselves to control failed")
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(ws))
            try:
                async for raw in ws:
                    await self._handle(raw)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if ws.close_code == p.CLOSE_TRY_AGAIN:
                self.retry_after = p.parse_retry_after(ws.close_reason) or 1
            if ws.close_code is not None:
                self.last_error = f"closed by control ({ws.close_code} {ws.close_reason})"
            if ws.close_code == p.CLOSE_DISABLED:
                self._set_disabled()

    def _set_disabled(self) -> None:
        """Control says an admin disabled us: serve every tunnel as disabled (the gateway
        answers 503, the agent resets) until Control lets us in again."""
        if self.view.disabled:
            return
        self.view.disabled = True
        log.error(
            f"control says this {self.settings.client_type} is disabled: serving every "
            "tunnel as disabled; retrying with the same key until an admin enables it",
            extra=kv(url=self.url),
        )
        if self.on_change is not None:
            try:
                self.on_change(self.view)
            except Exception:
                log.exception("applying the new configuration failed")

    async def _handle(self, raw: str | bytes) -> None:
        """Apply one frame from Control.  One policy for a bad one: it is skipped (the
        view keeps its last good content), logged once per code per interval, and
        answered with an ``error`` frame so that Control's log shows it too; the
        session goes on."""
        try:
            frame = p.decode(raw)
            if frame.type == "error":
                report = p.parse_error(frame.data)
                due, unlogged = self._reported_log.due(report.code)
                if due:
                    log.warning(
                        "control reported an error",
                        extra=kv(
                            code=report.code,
                            message=report.message[:200],
                            since_last_logged=unlogged,
                        ),
                    )
                return
            handler = self.handlers.get(frame.type)
            if handler is not None:
                await handler(frame)
                return
            if frame.type not in ("config", "tunnel_create", "tunnel_update", "tunnel_delete"):
                raise p.ProtocolError("unknown_type", f"unknown frame type {frame.type[:64]!r}")
            changed = self.view.apply(frame, self.settings.client_type)
            if frame.type == "config" and self._reenabled:
                changed, self._reenabled = True, False
        except p.ProtocolError as exc:
            due, unlogged = self._bad_log.due(exc.code)
            if due:
                log.warning(
                    "malformed frame from control, skipped",
                    extra=kv(code=exc.code, reason=exc.message, since_last_logged=unlogged),
                )
            await self.send("error", p.ErrorReport(exc.code, exc.message[:512]).to_wire())
            return
        if changed and self.on_change is not None:
            try:
                self.on_change(self.view)
            except Exception:
                log.exception("applying the new configuration failed")

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            beat = p.Heartbeat(time.time(), self.view.config_version)
            await ws.send(p.encode("heartbeat", beat.to_wire()))
