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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

from control import protocol as p
from kakuremichi import jsonsafe
from kakuremichi.logs import kv

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
    """What Control last told us; survives disconnects."""

    me: dict[str, Any] = field(default_factory=dict)
    peers: list[dict[str, Any]] = field(default_factory=list)
    tunnels: dict[str, dict[str, Any]] = field(default_factory=dict)
    certificates: list[dict[str, Any]] = field(default_factory=list)
    config_version: int = 0
    has_config: bool = False

    # -- the last good configuration, kept across restarts ---------------------------

    def snapshot(self, client_type: str) -> dict[str, Any]:
        """The view as the data of a ``config`` frame (what :meth:`restore` reads)."""
        data: dict[str, Any] = {
            client_type: self.me,
            "gateways" if client_type == "agent" else "agents": self.peers,
            "tunnels": list(self.tunnels.values()),
        }
        if client_type == "gateway":
            data["certificates"] = self.certificates
        return data

    def store(self, path: Path, client_type: str) -> None:
        """Write :meth:`snapshot` to ``path`` atomically, readable by the owner only (a
        gateway's holds certificate keys); an error is logged, never raised."""
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(self.snapshot(client_type), handle)
            os.chmod(tmp, 0o600)  # an older file of ours may have had other bits
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not store the configuration", extra=kv(error=str(exc)))

    def restore(self, path: Path, client_type: str) -> bool:
        """Load what :meth:`store` wrote, checked as a ``config`` frame is; False (and a
        warning) if there is none or it is unreadable.  The view keeps its
        ``config_version`` of 0, so Control's first config replaces it."""
        try:
            data = jsonsafe.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self.apply(p.Frame("config", data, None), client_type)
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
            extra=kv(peers=len(self.peers), tunnels=len(self.tunnels)),
        )
        return True

    def apply(self, frame: p.Frame, client_type: str) -> bool:
        """Apply one frame; True if the view changed."""
        if frame.config_version is not None:
            self.config_version = frame.config_version
        data = frame.data
        if frame.type == "config":
            me = data.get(client_type)
            peers = data.get("gateways" if client_type == "agent" else "agents")
            tunnels = data.get("tunnels")
            certificates = data.get("certificates", [])
            if (
                not isinstance(me, dict)
                or not isinstance(peers, list)
                or not isinstance(tunnels, list)
            ):
                raise p.ProtocolError("malformed_config", "config lacks its sections")
            if not all(isinstance(t, dict) and isinstance(t.get("id"), str) for t in tunnels):
                raise p.ProtocolError("malformed_config", "config has a malformed tunnel")
            if not all(isinstance(x, dict) for x in peers) or not isinstance(certificates, list):
                raise p.ProtocolError("malformed_config", "config has malformed peers")
            new = (me, peers, {t["id"]: t for t in tunnels}, certificates)
            old = (self.me, self.peers, self.tunnels, self.certificates)
            self.me, self.peers, self.tunnels, self.certificates = new
            self.has_config = True
            return new != old
        if frame.type in ("tunnel_create", "tunnel_update"):
            if not isinstance(data.get("id"), str):
                raise p.ProtocolError("malformed_tunnel", "tunnel without an id")
            if self.tunnels.get(data["id"]) == data:
                return False
            self.tunnels[data["id"]] = data
            return True
        if frame.type == "tunnel_delete":
            if not isinstance(data.get("id"), str):
                raise p.ProtocolError("malformed_tunnel", "tunnel_delete without an id")
            return self.tunnels.pop(data["id"], None) is not None
        return False


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
        self.identity: dict[str, Any] = {}
        self.attempts = 0
        self.last_error = ""
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._heartbeat_interval = p.HEARTBEAT_INTERVAL

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
            auth: dict[str, Any] = {
                "apiKey": self.settings.api_key,
                "clientType": self.settings.client_type,
                "publicKey": self.settings.public_key,
                "version": self.settings.version,
            }
            if self.settings.client_type == "gateway":
                auth["publicIp"] = self.settings.public_ip
                auth["wireguardPort"] = self.settings.wireguard_port
            await ws.send(p.encode("auth", auth))
            first = p.decode(await asyncio.wait_for(ws.recv(), p.AUTH_TIMEOUT * 2))
            if first.type != "auth_success":
                message = first.data.get("message", first.type)
                self.last_error = f"authentication refused: {message}"
                log.error("control refused our credentials", extra=kv(reason=str(message)[:200]))
                return
            self.identity = first.data
            interval = first.data.get("heartbeatInterval")
            if isinstance(interval, int | float) and 1 <= interval <= 3600:
                self._heartbeat_interval = float(interval)
            if first.config_version is not None:
                self.view.config_version = first.config_version
            self.connected.set()
            self.last_error = ""
            log.info(
                "connected to control",
                extra=kv(url=self.url, id=first.data.get("id"), name=first.data.get("name")),
            )
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(ws))
            try:
                async for raw in ws:
                    self._handle(raw)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if ws.close_code is not None:
                self.last_error = f"closed by control ({ws.close_code} {ws.close_reason})"

    def _handle(self, raw: str | bytes) -> None:
        try:
            frame = p.decode(raw)
            if frame.type == "error":
                log.warning(
                    "control reported an error",
                    extra=kv(
                        code=str(frame.data.get("code"))[:64],
                        message=str(frame.data.get("message"))[:200],
                    ),
                )
                return
            if frame.type not in ("config", "tunnel_create", "tunnel_update", "tunnel_delete"):
                log.info("ignoring unknown frame from control", extra=kv(type=frame.type[:64]))
                return
            changed = self.view.apply(frame, self.settings.client_type)
        except p.ProtocolError as exc:
            log.warning(
                "malformed frame from control, skipped", extra=kv(code=exc.code, reason=exc.message)
            )
            return
        if changed and self.on_change is not None:
            try:
                self.on_change(self.view)
            except Exception:
                log.exception("applying the new configuration failed")

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            await ws.send(
                p.encode(
                    "heartbeat",
                    {"timestamp": time.time(), "configVersion": self.view.config_version},
                )
            )
