"""Raw TCP tunnels: listen on each tunnel's public port, splice to ``agentIp:port``.

Theory of operation
-------------------
The forwarder mirrors the router's enabled ``tcp`` tunnels as listening sockets (the
diffing, bind-error retries and change coalescing live in ``reconcile.py``).  Stopping
a listener also ends its open connections: a deleted or disabled tunnel stops carrying
traffic at once.

Each accepted connection looks its route up again (the agent may have changed since
the listener opened), counts against the per-client connection limit, dials
``upstream_host:public_port`` (or the route's / the settings' ``upstream_port`` when set)
through the same dialer as the HTTP proxy, and splices both ways with half-close and
back-pressure; when the upstream cannot be reached the client's connection is reset.
The agent uses the same forwarder with a ``listen`` function that
accepts on its user-space stack and routes that dial its local targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .accesslog import AccessLog
from .dial import Dialer, open_tcp
from .limits import ConnectionLimiter
from .metrics import Metrics
from .reconcile import PortReconciler
from .router import Router
from .splice import close_writer, splice

StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener(Protocol):
    """What ``listen`` returns: an ``asyncio.Server``-like handle."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


#: (callback, port) -> a listener accepting on ``port``
Listen = Callable[[StreamCallback, int], Awaitable[Listener]]
#: (tunnel id, client address) -> whether the tunnel's IP rules let the client in
Admit = Callable[[str, str], bool]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """Listen address, timeouts and limits of raw TCP tunnels."""

    bind_host: str = "0.0.0.0"  # public listener by design
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    max_connections_per_client: int = 256
    max_connections: int = 10_000
    #: dial this port on the agent instead of the tunnel's public port (tests)
    upstream_port: int | None = None


class TcpForwarder(PortReconciler):
    """Public listeners for raw TCP tunnels, reconciled from the router."""

    protocol = "tcp"

    def __init__(
        self,
        router: Router,
        dialer: Dialer | None = None,
        settings: TcpSettings | None = None,
        metrics: Metrics | None = None,
        listen: Listen | None = None,
        admit: Admit | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__(router)
        self.dialer = dialer if dialer is not None else open_tcp
        self.listen = listen
        #: the tunnels' IP rules (the gateway's access policies); None: all admitted
        self.admit = admit
        self.access_log = access_log
        self.settings = settings if settings is not None else TcpSettings()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.registry.add_collector(self._collect)
        self.limiter = ConnectionLimiter(
            self.settings.max_connections_per_client, self.settings.max_connections
        )
        self._connections: dict[int, set[asyncio.Task[None]]] = {}

    async def _open_port(self, port: int) -> Listener:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(port, reader, writer)

        if self.listen is not None:
            return await self.listen(on_connect, port)
        return await asyncio.start_server(on_connect, self.settings.bind_host, port)

    async def _close_port(self, port: int, handle: Listener) -> None:
        handle.close()
        tasks = self._connections.pop(port, set())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.wait_closed(), 1.0)

    async def _serve(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.setdefault(port, set()).add(task)
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "0.0.0.0"
        admitted = self.limiter.try_acquire(client_ip)
        upstream_writer: asyncio.StreamWriter | None = None
        failed = False
        self.metrics.connection_opened("tcp")
        loop = asyncio.get_running_loop()
        started = loop.time()
        counts = [0, 0]  # bytes in, out
        decision = "allow"
        route = None
        try:
            route = self.router.lookup_port("tcp", port)
            if not admitted:
                self.metrics.rejected.inc(reason="tcp_connections_per_client")
                decision = "connection_limit"
                return
            if route is None or not route.enabled:
                decision = "no_route"
                return
            tunnel = route.tunnel_id
            if self.admit is not None and not self.admit(tunnel, client_ip):
                self.metrics.rejected.inc(reason="access")
                decision = "deny_ip"
                failed = True  # a reset, as a refused connection would get
                return
            self.metrics.tcp_connections.inc(tunnel=tunnel)
            upstream_port = route.upstream_port or self.settings.upstream_port or port
            try:
                up_reader, upstream_writer = await self.dialer(
                    route.upstream_host, upstream_port, self.settings.connect_timeout
                )
            except (OSError, TimeoutError):
                self.metrics.upstream_errors.inc(tunnel=tunnel, kind="unreachable")
                failed = True  # reset the client: "refused", not an empty stream
                decision = "unreachable"
                return

            def inbound(n: int) -> None:
                counts[0] += n
                self.metrics.tcp_bytes.inc(n, tunnel=tunnel, direction="in")

            def outbound(n: int) -> None:
                counts[1] += n
                self.metrics.tcp_bytes.inc(n, tunnel=tunnel, direction="out")

            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await splice(
                    reader,
                    writer,
                    up_reader,
                    upstream_writer,
                    idle_timeout=self.settings.idle_timeout,
                    on_a_to_b=inbound,
                    on_b_to_a=outbound,
                )
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error in a TCP tunnel connection")
        finally:
            self.metrics.connection_closed("tcp")
            if self.access_log is not None and self.access_log.enabled:
                self.access_log.flow(
                    protocol="tcp",
                    client=client_ip,
                    tunnel=route.tunnel_id if route is not None else "",
                    port=port,
                    bytes_in=counts[0],
                    bytes_out=counts[1],
                    duration=loop.time() - started,
                    upstream=route.upstream_host if route is not None else "",
                    decision=decision,
                )
            if admitted:
                self.limiter.release(client_ip)
            conns = self._connections.get(port)
            if conns is not None:
                conns.discard(task)
            if upstream_writer is not None:
                await close_writer(upstream_writer)
            await close_writer(writer, abort=failed)
