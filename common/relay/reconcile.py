"""Keeping a set of public port listeners equal to the router's raw tunnels.

Theory of operation
-------------------
``PortReconciler`` is the shared skeleton of the TCP and UDP forwarders.  The router
calls ``_on_change`` synchronously after every update; that only marks the table dirty
and wakes one reconcile task, which diffs the wanted ports (enabled tunnels of one
protocol) against the open listeners and opens/closes listeners one at a time under a
lock, so a burst of updates costs one pass and no two passes race.  A port that cannot
be bound (in use, privileged) is logged once per distinct error, kept in
``bind_errors`` and retried every ``retry_interval`` seconds.  Subclasses implement
``_open_port`` (raise ``OSError`` to report a bind failure) and ``_close_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .router import Router

log = logging.getLogger(__name__)


class PortReconciler:
    """Listeners on public ports, following the router's tunnels of one protocol."""

    protocol = ""

    def __init__(self, router: Router, retry_interval: float = 10.0) -> None:
        self.router = router
        self.retry_interval = retry_interval
        self.listeners: dict[int, Any] = {}
        self.bind_errors: dict[int, str] = {}
        self._dirty = asyncio.Event()
        self._settled = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._subscribed = False

    async def start(self) -> None:
        """Open listeners for the current table and follow later router changes."""
        if not self._subscribed:
            self._subscribed = True
            self.router.add_listener(self._on_change)
        await self.reconcile()
        if not self._dirty.is_set():
            self._settled.set()
        if self._task is None:
            self._task = asyncio.ensure_future(self._reconcile_loop())

    async def wait_reconciled(self, within: float = 5.0) -> None:
        """Wait until the listeners match the router's latest change (tests, tools)."""
        async with asyncio.timeout(within):
            await self._settled.wait()

    def _on_change(self) -> None:
        self._settled.clear()
        self._dirty.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciling %s listeners failed", self.protocol)
            if not self._dirty.is_set():
                self._settled.set()

    async def reconcile(self) -> None:
        """Open listeners for enabled tunnels of our protocol, close the others."""
        async with self._lock:
            routes = self.router.port_routes(self.protocol)
            wanted = {r.public_port for r in routes if r.enabled}
            for port in sorted(set(self.listeners) - wanted):
                handle = self.listeners.pop(port)
                await self._close_port(port, handle)
                log.info("stopped %s tunnel listener on port %d", self.protocol, port)
            for port in set(self.bind_errors) - wanted:
                del self.bind_errors[port]
            for port in sorted(wanted - set(self.listeners)):
                try:
                    self.listeners[port] = await self._open_port(port)
                except OSError as exc:
                    if self.bind_errors.get(port) != str(exc):
                        log.warning("cannot listen on %s port %d: %s", self.protocol, port, exc)
                    self.bind_errors[port] = str(exc)
                    continue
                self.bind_errors.pop(port, None)
                log.info("listening for %s tunnel on port %d", self.protocol, port)
            if self.bind_errors and self._retry is None and self._task is not None:
                loop = asyncio.get_running_loop()
                self._retry = loop.call_later(self.retry_interval, self._retry_binds)

    def _retry_binds(self) -> None:
        self._retry = None
        self._dirty.set()

    async def close(self) -> None:
        """Stop following the router and close every listener and its connections."""
        if self._subscribed:
            self._subscribed = False
            self.router.remove_listener(self._on_change)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        async with self._lock:
            for port in list(self.listeners):
                await self._close_port(port, self.listeners.pop(port))

    def _collect(self) -> None:
        """Scrape-time metrics (subclasses have ``self.metrics``)."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.listener_bind_errors.set(len(self.bind_errors), protocol=self.protocol)

    async def _open_port(self, port: int) -> Any:
        raise NotImplementedError

    async def _close_port(self, port: int, handle: Any) -> None:
        raise NotImplementedError
