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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

from common import jsonsafe
from common import protocol as p
from common.logs import OncePer, kv

log = logging.getLogger("kakuremichi.controlclient")

STABLE_AFTER = 30.0  # a connection that lived this long resets the back-off


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


@dataclass
class ControlView:
    """What Control last told us, parsed (``common.protocol``); survives disconnects.

    ``config`` is the last full snapshot, ``tunnels`` its tunnels with every
    ``tunnel_*`` event since applied; :meth:`agent_config` / :meth:`gateway_config`
    give both together."""

    config: p.AgentConfig | p.GatewayConfig | None = None
    tunnels: dict[str, p.TunnelSpec] = field(default_factory=dict)
    config_version: int = 0

    @property
    def has_config(self) -> bool:
        return self.config is not None

    def current(self) -> p.AgentConfig | p.GatewayConfig | None:
        """The snapshot with the tunnels as they stand now."""
        if self.config is None:
            return None
        return replace(self.config, tunnels=tuple(self.tunnels.values()))

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
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    open_timeout: float = 15.0
    ssl_context: ssl.SSLContext | None = None


class ControlClient:
    """Keeps a :class:`ControlView` in sync with Control, forever."""

    def __init__(
        self,
        settings: ControlClientSettings,
        on_change: Callable[[ControlView], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.url = websocket_url(settings.control_url)
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
        self._bad_log = OncePer(60.0)  # malformed frames from Control, by code
        self._reported_log = OncePer(60.0)  # error frames from Control, by code

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

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            self.attempts += 1
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is transient for us
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected.clear()
                self._ws = None
            if self._stopping:
                return
            failures = 0 if time.monotonic() - started > STABLE_AFTER else failures + 1
            delay = self.backoff(failures)
            log.warning(
                "control connection lost; keeping last config, reconnecting",
                extra=kv(error=self.last_error or "closed", retry_in_s=round(delay, 1)),
            )
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(1001, "shutting down")

    async def _session(self) -> None:
        async with connect(
            self.url,
            open_timeout=self.settings.open_timeout,
            max_size=p.MAX_FRAME_BYTES * 16,
            ssl=self.settings.ssl_context if self.url.startswith("wss") else None,
            compression=None,
        ) as ws:
            self._ws = ws
            auth = p.Auth(
                api_key=self.settings.api_key,
                client_type=self.settings.client_type,
                public_key=self.settings.public_key,
                version=self.settings.version,
                public_ip=self.settings.public_ip,
                wireguard_port=self.settings.wireguard_port,
            )
            await ws.send(p.encode("auth", auth.to_wire()))
            first = p.decode(await asyncio.wait_for(ws.recv(), p.AUTH_TIMEOUT * 2))
            if first.type != "auth_success":
                refusal = p.parse_error(first.data)
                self.last_error = f"authentication refused: {refusal.message or refusal.code}"
                log.error(
                    "control refused our credentials",
                    extra=kv(code=refusal.code, reason=refusal.message[:200]),
                )
                return
            self.identity = p.parse_auth_success(first.data)
            self._heartbeat_interval = self.identity.heartbeat_interval
            if first.config_version is not None:
                self.view.config_version = first.config_version
            self.connected.set()
            self.last_error = ""
            log.info(
                "connected to control",
                extra=kv(url=self.url, id=self.identity.id, name=self.identity.name),
            )
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(ws))
            try:
                async for raw in ws:
                    await self._handle(raw)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if ws.close_code is not None:
                self.last_error = f"closed by control ({ws.close_code} {ws.close_reason})"

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
            if frame.type not in ("config", "tunnel_create", "tunnel_update", "tunnel_delete"):
                raise p.ProtocolError("unknown_type", f"unknown frame type {frame.type[:64]!r}")
            changed = self.view.apply(frame, self.settings.client_type)
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
