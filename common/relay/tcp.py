"""Raw TCP tunnels: listen on each tunnel's public port, splice to ``agentIp:port``.

Theory of operation
-------------------
The forwarder mirrors the router's enabled ``tcp`` tunnels as listening sockets (the
diffing, bind-error retries and change coalescing live in ``reconcile.py``).  Stopping
a listener also ends its open connections: a deleted or disabled tunnel stops carrying
traffic at once.

Each accepted connection looks its route up again (the agent may have changed since
the listener opened), counts against the per-client connection limit, picks a replica
of a replicated tunnel (``balance.py``: per connection; a failed dial ejects that
replica and tries another once), dials
``upstream_host:public_port`` (or the route's / the settings' ``upstream_port`` when set)
through the same dialer as the HTTP proxy, and splices both ways with half-close and
back-pressure; when the upstream cannot be reached the client's connection is reset.
The agent uses the same forwarder with a ``listen`` function that
accepts on its user-space stack and routes that dial its local targets.

PROXY protocol towards the target (a tunnel's ``proxyProtocol``, v1 or v2)
--------------------------------------------------------------------------
The specification forbids guessing whether a header is present ("the protocol
explicitly prevents port sharing between public and private access"), and the agent's
raw port carries whatever the client sent.  So the client's address never travels on
that port: on the gateway (``proxy_port`` set, the agent's tunnel port) a connection of
such a tunnel is dialled to the agent's tunnel port instead, and starts with a PROXY v2
header written before any client byte: command PROXY, the client's address and port as
source, the listener's address and port as destination, the tunnel id as a TLV.  The
agent reads it there like an HTTP tunnel's header (bounded, timed out, reset when
malformed; ``agent/forward.py``) and writes the target the header of the tunnel's
version, then the client's bytes.  A client cannot inject a header: on the tunnel port
the gateway's header always comes first, and on the raw port nothing is read as one.

Gateways and agents read the setting from the same ``TunnelSpec``, but a change reaches
them one after the other (or not at all while one is away from Control):

* the gateway has it, the agent not yet: the agent takes the connection on its tunnel
  port and, with no version to send, sends the target the bare stream, as before;
* the agent has it, the gateway not yet: the connection arrives on the raw port with no
  client address; the agent (``proxy_port`` None) sends the target the specification's
  "unknown" header (v1 ``PROXY UNKNOWN``, v2 ``LOCAL``), so a target that requires a
  header accepts it with the connection's own addresses instead of the client's.

A gateway older than the setting behaves like the second case; an agent older than it
resets the gateway's connections for a tunnel that is not an HTTP tunnel (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import proxyproto
from .accesslog import AccessLog
from .balance import OFFLINE, Replica
from .dial import Dialer, open_tcp
from .limits import ConnectionLimiter
from .metrics import Metrics
from .reconcile import PortReconciler
from .router import PortRoute, Router, another_replica, pick_replica
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
    #: the gateway: the agent's tunnel port, where connections of a tunnel with
    #: ``proxyProtocol`` go, after a PROXY v2 header with the client's address.  None
    #: (the agent): such a tunnel's connections on its raw port get the target's header
    #: without an address (see the module docstring)
    proxy_port: int | None = None


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
        #: tunnel -> when a connection without the client's address was last logged
        self._unknown_logged: dict[str, float] = {}
        #: dials in progress to each replica: given up when Control reports its agent
        #: offline (the connection goes to another replica at once instead of waiting
        #: out the connect timeout on an agent that is gone)
        self._dialing: dict[Replica, set[asyncio.Future[Any]]] = {}
        #: connections to each replica that have had nothing from it yet: ended (the
        #: client reset) when Control reports its agent offline, as the HTTP pool ends
        #: the requests still waiting for a response head; an agent killed between
        #: answering the dial and its first byte would otherwise hold the client until
        #: its own timeout.  Connections the agent has answered are left alone: an agent
        #: that only lost Control keeps serving them.
        self._unanswered: dict[Replica, set[asyncio.Task[None]]] = {}
        self._ended_offline: set[asyncio.Task[None]] = set()

    def _on_change(self) -> None:
        super()._on_change()
        for replica in self.router.balancer.went_offline:
            for dial in self._dialing.get(replica, ()):
                dial.cancel()
            for task in self._unanswered.pop(replica, ()):
                self._ended_offline.add(task)
                task.cancel()

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
        counted: Replica | None = None
        waiting: set[asyncio.Task[None]] | None = None
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
            header = b""
            if route.proxy_protocol is not None:
                if self.settings.proxy_port is not None:
                    upstream_port = self.settings.proxy_port
                    header = _client_header(tunnel, peer, writer.get_extra_info("sockname"))
                    if not header:
                        failed = True  # no address to give: refused, never sent without
                        decision = "unreachable"
                        return
                else:
                    header = proxyproto.target_header(route.proxy_protocol)
                    note_unknown_client(self._unknown_logged, tunnel, "tcp")
            chosen = pick_replica(route, loop.time(), client_ip)
            if chosen is None:  # every replica is being drained
                failed = True
                decision = "draining"
                return
            route = chosen
            dialled = await self._dial(route, upstream_port, client_ip)
            if dialled is None:
                failed = True  # reset the client: "refused", not an empty stream
                decision = "unreachable"
                return
            up_reader, upstream_writer, route = dialled
            counted = route.replica
            if counted is not None:
                counted.open += 1  # least connections
                waiting = self._unanswered.setdefault(counted, set())
                waiting.add(task)
            if header:
                upstream_writer.write(header)  # before any byte of the client's

            def inbound(n: int) -> None:
                counts[0] += n
                self.metrics.tcp_bytes.inc(n, tunnel=tunnel, direction="in")

            def outbound(n: int) -> None:
                if waiting is not None and not counts[1]:
                    waiting.discard(task)  # the agent answered
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
            if task in self._ended_offline:
                failed = True  # reset: the replica's agent is gone, the client may retry
                decision = "replica_offline"
                if route is not None:
                    self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind="offline")
        except Exception:
            log.exception("unexpected error in a TCP tunnel connection")
        finally:
            self._ended_offline.discard(task)
            if waiting is not None:
                waiting.discard(task)
                if not waiting and counted is not None and self._unanswered.get(counted) is waiting:
                    del self._unanswered[counted]
            if counted is not None:
                counted.open -= 1
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

    async def _dial(
        self, route: PortRoute, port: int, client_ip: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, PortRoute] | None:
        """Dial ``route``'s agent; a replica that fails is ejected and the connection
        goes once to another replica (issue 17; nothing of the client's was sent)."""
        loop = asyncio.get_running_loop()
        for _attempt in range(2):
            try:
                reader, writer = await self._dial_once(route, port)
                replica = route.replica
                if replica is not None and replica.health == OFFLINE:
                    # reported gone while its answer to the dial was on the way
                    writer.transport.abort()
                    writer.close()
                    raise ConnectionAbortedError("the replica's agent went offline")
                if replica is not None and replica.backoff:
                    replica.balance.succeeded(replica)
                return reader, writer, route
            except (OSError, TimeoutError):
                self.metrics.upstream_errors.inc(tunnel=route.tunnel_id, kind="unreachable")
                replica = route.replica
                if replica is None:
                    return None
                if replica.balance.failed(replica, loop.time(), "unreachable"):
                    self.metrics.replica_ejections.inc(
                        tunnel=route.tunnel_id, agent=replica.agent_id
                    )
                other = another_replica(route, loop.time(), client_ip)
                if other is None:
                    return None
                self.metrics.replica_retries.inc(tunnel=route.tunnel_id, reason="replica_failed")
                route = other
        return None

    async def _dial_once(
        self, route: PortRoute, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """One dial of ``route``'s agent; a replica's dial ends with ConnectionAbortedError
        as soon as Control reports its agent offline (``_on_change``)."""
        replica = route.replica
        if replica is None:
            return await self.dialer(route.upstream_host, port, self.settings.connect_timeout)
        dial = asyncio.ensure_future(
            self.dialer(route.upstream_host, port, self.settings.connect_timeout)
        )
        dials = self._dialing.setdefault(replica, set())
        dials.add(dial)
        try:
            return await dial
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if dial.cancelled() and (task is None or not task.cancelling()):
                raise ConnectionAbortedError("the replica's agent went offline") from None
            raise
        finally:
            dials.discard(dial)
            if not dials and self._dialing.get(replica) is dials:
                del self._dialing[replica]


def note_unknown_client(logged: dict[str, float], tunnel: str, protocol: str) -> None:
    """Log (once a minute per tunnel) that a tunnel with ``proxyProtocol`` was reached
    on its raw port, so its target got no client address: a gateway that has not seen
    the setting yet, or one older than it."""
    now = time.monotonic()
    if now - logged.get(tunnel, float("-inf")) < 60:
        return
    if len(logged) >= 10_000:
        logged.clear()
    logged[tunnel] = now
    log.warning(
        "a %s connection of tunnel %s came without the client's address (a gateway that "
        "does not send it yet?): the target gets the PROXY header for an unknown address",
        protocol,
        tunnel[:64],
    )


def _client_header(tunnel: str, peer: object, sockname: object) -> bytes:
    """The PROXY v2 header the gateway puts in front of a raw connection of a tunnel
    with ``proxyProtocol``: the client as source, the listener as destination, the
    tunnel by id; empty (and logged) when the socket gives no IP addresses."""
    try:
        if not (isinstance(peer, tuple) and isinstance(sockname, tuple)):
            raise ValueError("the socket has no IP addresses")
        source, destination = proxyproto.address_pair(
            (str(peer[0]), int(peer[1])), (str(sockname[0]), int(sockname[1]))
        )
        return proxyproto.encode(tunnel_id=tunnel, source=source, destination=destination)
    except (IndexError, ValueError) as exc:
        log.warning("no PROXY header for a connection of tunnel %s: %s", tunnel[:64], exc)
        return b""
