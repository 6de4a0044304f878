"""Raw UDP tunnels: per-client flows from a tunnel's public port to ``agentIp:port``.

Theory of operation
-------------------
Listeners follow the router's enabled ``udp`` tunnels (``reconcile.py``).  UDP has no
connections, so the forwarder makes one *flow* per (public port, client address): the
first datagram from a client opens an upstream socket to the agent (through the flow
dialer: a connected kernel UDP socket by default; the userspace backend passes one
that goes through the netstack), datagrams are relayed both ways, and replies go back
out of the public socket to that client, so the agent sees one stable peer per client
and the client sees answers from the address it wrote to.

While the upstream socket is being opened, up to ``max_queued_datagrams`` datagrams
wait; more are dropped (UDP may drop).  A flow idle for ``flow_idle_timeout`` seconds
in both directions is closed: one timer per flow, re-armed lazily (when it fires it
re-checks the last activity instead of being rescheduled on every datagram).  Flows
are capped per port and per client key (``limits.client_key``); datagrams beyond a
cap or for a missing/disabled tunnel are dropped and counted.

PROXY protocol (a tunnel's ``proxyProtocol``: v2, the only version with a UDP form)
---------------------------------------------------------------------------------
As for TCP (``tcp.py`` explains why and what happens while a change has reached only
one side), the client's address never travels on the agent's raw port.  The gateway
(``proxy_port`` set) sends such a tunnel's flows to the agent's tunnel port instead,
every datagram prefixed with a PROXY v2 header (PROXY, DGRAM, the client as source, the
listener as destination: its port names the tunnel), built once per flow.  The agent
(``tunnel_port`` set) binds that port while it has such a tunnel (a plain UDP tunnel on
the same public port keeps it, with a warning), strips each datagram's header (a flow's
later datagrams must carry the same bytes) and sends the target a v2 header of its own
in front of every datagram.  A datagram on the tunnel port without a valid header, with
another flow's header or for a tunnel that is not there is dropped and counted
(``rejected{reason="proxy_header"}``).  Reached on the raw port by a gateway that sends
no header, the agent prefixes the target's datagrams with v2 ``LOCAL``.  A change of a
tunnel's route (its agent, target, setting) ends the flows opened under the old one.

A replicated tunnel (``balance.py``) picks a replica per flow (sticky by client
address if the tunnel says so); a flow whose replica left, went offline or became
unhealthy is ended at the next change of the table, so the client's next datagram opens
a flow to a replica that takes traffic.  A failed dial ejects the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from . import proxyproto
from .accesslog import AccessLog
from .balance import OFFLINE, UNHEALTHY, Replica
from .limits import client_key
from .metrics import Metrics
from .reconcile import PortReconciler
from .router import PortRoute, Router, pick_replica
from .tcp import note_unknown_client

log = logging.getLogger(__name__)

Address = tuple[Any, ...]


class UdpFlowHandle(Protocol):
    """The agent-side end of one flow, as returned by a flow dialer."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


#: (agent host, port, on_datagram) -> an open flow handle
FlowDialer = Callable[[str, int, Callable[[bytes], None]], Awaitable[UdpFlowHandle]]

#: (protocol factory, port) -> a bound (transport, protocol), like
#: ``loop.create_datagram_endpoint``; the agent binds on its user-space stack
Bind = Callable[
    [Callable[[], asyncio.DatagramProtocol], int],
    Awaitable[tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]],
]


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: UDP's "best effort", nothing to do
        log.debug("UDP flow error: %s", exc)


class _KernelFlow:
    """A connected kernel UDP socket towards the agent."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    def close(self) -> None:
        self.transport.close()


async def open_udp_flow(
    host: str, port: int, on_datagram: Callable[[bytes], None]
) -> UdpFlowHandle:
    """The default flow dialer: a connected kernel UDP socket."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UpstreamProtocol(on_datagram), remote_addr=(host, port)
    )
    return _KernelFlow(transport)


@dataclass(frozen=True, slots=True)
class UdpSettings:
    """Listen address, flow lifetime and caps of raw UDP tunnels."""

    bind_host: str = "0.0.0.0"  # public listener by design
    flow_idle_timeout: float = 60.0
    max_flows_per_port: int = 4096
    max_flows_per_client: int = 64
    max_queued_datagrams: int = 64
    #: send to this port on the agent instead of the tunnel's public port (tests)
    upstream_port: int | None = None
    #: the gateway: the agent's tunnel port, where flows of a tunnel with
    #: ``proxyProtocol`` go, each datagram after a PROXY v2 header naming the client
    proxy_port: int | None = None
    #: the gateway: the address clients reach, the destination in those headers when
    #: ``bind_host`` is a wildcard (None: the unspecified address)
    public_ip: str | None = None
    #: the agent: the port where gateways send such datagrams (see the module docstring)
    tunnel_port: int | None = None


@dataclass(slots=True)
class _Flow:
    port: int
    client: Address
    tunnel_id: str
    last_activity: float
    upstream: str = ""
    handle: UdpFlowHandle | None = None
    pending: list[bytes] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    closed: bool = False
    started: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    #: the route the flow was opened under (a change of it ends the flow)
    route: PortRoute | None = None
    #: sent in front of every datagram towards the agent or the target (PROXY header)
    prefix: bytes = b""
    #: on the agent's tunnel port: the gateway's header every datagram starts with
    header_in: bytes = b""
    #: the replica of a replicated tunnel the flow goes to (``balance.py``)
    replica: Replica | None = None


def _replica_gone(replica: Replica) -> bool:
    """A flow's replica no longer takes traffic: left the tunnel, offline, unhealthy
    (a draining replica keeps its flows until they go idle)."""
    return (
        replica.balance.by_agent.get(replica.agent_id) is not replica
        or replica.health == OFFLINE
        or replica.health == UNHEALTHY
    )


class _PublicProtocol(asyncio.DatagramProtocol):
    def __init__(self, forwarder: UdpForwarder, port: int, headed: bool = False) -> None:
        self.forwarder = forwarder
        self.port = port
        #: the agent's tunnel port: every datagram starts with a gateway's PROXY header
        self.headed = headed
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            if self.headed:
                self.forwarder._from_gateway(self, data, addr)
            else:
                self.forwarder._from_client(self, data, addr)
        except Exception:
            log.exception("unexpected error handling a UDP datagram")

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP listener error on port %d: %s", self.port, exc)


class UdpForwarder(PortReconciler):
    """Public UDP listeners for raw UDP tunnels, with per-client flows."""

    protocol = "udp"

    def __init__(
        self,
        router: Router,
        flow_dialer: FlowDialer | None = None,
        settings: UdpSettings | None = None,
        metrics: Metrics | None = None,
        bind: Bind | None = None,
        admit: Callable[[str, str], bool] | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__(router)
        self.flow_dialer = flow_dialer if flow_dialer is not None else open_udp_flow
        self.bind = bind
        #: the tunnels' IP rules (the gateway's access policies); None: all admitted
        self.admit = admit
        self.access_log = access_log
        #: (port, client key) -> when a refused client was last logged
        self._refused_logged: dict[tuple[int, str], float] = {}
        self.settings = settings if settings is not None else UdpSettings()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.registry.add_collector(self._collect)
        self.flows: dict[tuple[int, Address], _Flow] = {}
        self._per_port: dict[int, int] = {}
        self._per_client: dict[tuple[int, str], int] = {}
        self._dials: set[asyncio.Task[None]] = set()
        #: the agent's tunnel port listener (bound while a tunnel has proxyProtocol)
        self._tunnel_listener: _PublicProtocol | None = None
        self._tunnel_port_note = ""  # why it is not bound, as last logged
        self._header_logged = float("-inf")  # when a dropped datagram was last logged
        self._tunnel_retry: asyncio.TimerHandle | None = None
        self._unknown_logged: dict[str, float] = {}  # see tcp.note_unknown_client

    # -- listeners ---------------------------------------------------------------------

    async def _open_port(self, port: int) -> _PublicProtocol:
        if self.bind is not None:
            _, bound = await self.bind(lambda: _PublicProtocol(self, port), port)
            return cast(_PublicProtocol, bound)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: _PublicProtocol(self, port), local_addr=(self.settings.bind_host, port)
        )
        return protocol

    async def _close_port(self, port: int, handle: _PublicProtocol) -> None:
        for key in [k for k in self.flows if k[0] == port]:
            self._close_flow(self.flows[key])
        if handle.transport is not None:
            handle.transport.close()

    async def reconcile(self) -> None:
        """The raw ports (``PortReconciler``), the agent's tunnel port, and the flows
        whose tunnel changed since they were opened."""
        wanted = self._tunnel_port_wanted()
        if not wanted:
            await self._close_tunnel_port()
        await super().reconcile()
        if wanted:
            await self._open_tunnel_port()
        for flow in list(self.flows.values()):
            now = (
                self.router.lookup_port("udp", flow.port)
                if flow.header_in == b""
                else self.router.lookup_raw_tunnel(flow.tunnel_id)
            )
            if flow.route is not None and now != flow.route:
                self._close_flow(flow)
            elif flow.replica is not None and _replica_gone(flow.replica):
                self._close_flow(flow)  # the client's next datagram opens a new flow

    def _tunnel_port_wanted(self) -> bool:
        port = self.settings.tunnel_port
        if port is None:
            return False
        routes = self.router.port_routes("udp")
        if not any(r.enabled and r.proxy_protocol for r in routes):
            return False
        holder = self.router.lookup_port("udp", port)
        note = (
            f"UDP tunnels with proxyProtocol cannot be served: tunnel {holder.tunnel_id} "
            f"uses the agent's tunnel port {port}"
            if holder is not None and holder.enabled
            else ""
        )
        if note != self._tunnel_port_note:
            self._tunnel_port_note = note
            if note:
                log.warning("%s", note)
        return not note

    async def _open_tunnel_port(self) -> None:
        port = self.settings.tunnel_port
        if self._tunnel_listener is not None or port is None:
            return
        loop = asyncio.get_running_loop()
        async with self._lock:
            for attempt in range(2):
                try:
                    if self.bind is not None:
                        _, bound = await self.bind(lambda: _PublicProtocol(self, port, True), port)
                        self._tunnel_listener = cast(_PublicProtocol, bound)
                    else:
                        _, self._tunnel_listener = await loop.create_datagram_endpoint(
                            lambda: _PublicProtocol(self, port, True),
                            local_addr=(self.settings.bind_host, port),
                        )
                    break
                except OSError as exc:
                    if attempt == 0:  # a listener closed just now lets go of it a moment later
                        await asyncio.sleep(0.05)
                        continue
                    log.warning("cannot listen on the UDP tunnel port %d: %s", port, exc)
                    if self._tunnel_retry is None:
                        self._tunnel_retry = loop.call_later(
                            self.retry_interval, self._retry_tunnel_port
                        )
                    return
        log.info("listening for PROXY-headed UDP tunnel datagrams on port %d", port)

    def _retry_tunnel_port(self) -> None:
        self._tunnel_retry = None
        self._on_change()

    async def _close_tunnel_port(self) -> None:
        listener, self._tunnel_listener = self._tunnel_listener, None
        if listener is None:
            return
        await self._close_port(listener.port, listener)
        log.info("stopped the UDP tunnel port listener on port %d", listener.port)

    async def close(self) -> None:
        if self._tunnel_retry is not None:
            self._tunnel_retry.cancel()
            self._tunnel_retry = None
        await self._close_tunnel_port()
        await super().close()
        for task in list(self._dials):
            task.cancel()
        if self._dials:
            await asyncio.gather(*self._dials, return_exceptions=True)

    # -- flows -------------------------------------------------------------------------

    def _from_client(self, public: _PublicProtocol, data: bytes, addr: Address) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        key = (public.port, addr)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._new_flow(public, addr, now)
            if flow is None:
                return
        self._relay(flow, data, now)

    def _from_gateway(self, public: _PublicProtocol, data: bytes, addr: Address) -> None:
        """A datagram on the agent's tunnel port: a gateway's PROXY header, then the
        client's payload (see the module docstring)."""
        now = asyncio.get_running_loop().time()
        flow = self.flows.get((public.port, addr))
        if flow is not None and data.startswith(flow.header_in):
            self._relay(flow, data[len(flow.header_in) :], now)
            return
        try:
            if flow is not None:
                raise proxyproto.ProxyHeaderError("a datagram with another header in a flow")
            header, payload = proxyproto.split_datagram(data)
            if (
                header.command != proxyproto.COMMAND_PROXY
                or header.transport != "udp"
                or header.source is None
                or header.destination is None
            ):
                raise proxyproto.ProxyHeaderError("no client UDP address in the header")
            route = self.router.lookup_port("udp", header.destination[1])
            if route is None or not route.enabled:
                raise proxyproto.ProxyHeaderError(
                    f"no UDP tunnel on port {header.destination[1]} here"
                )
            prefix = b""
            if route.proxy_protocol is not None:
                prefix = proxyproto.target_header(
                    route.proxy_protocol, header.source, header.destination, "udp"
                )
        except (proxyproto.ProxyHeaderError, ValueError) as exc:
            self.metrics.rejected.inc(reason="proxy_header")
            if now - self._header_logged >= 60:
                self._header_logged = now
                log.warning("dropped a datagram on the UDP tunnel port: %s", exc)
            return
        flow = self._new_flow(public, addr, now, route, prefix)
        if flow is None:
            return
        flow.header_in = data[: len(data) - len(payload)]
        self._relay(flow, payload, now)

    def _relay(self, flow: _Flow, data: bytes, now: float) -> None:
        flow.last_activity = now
        flow.bytes_in += len(data)
        self.metrics.udp_bytes.inc(len(data), tunnel=flow.tunnel_id, direction="in")
        if flow.prefix:
            data = flow.prefix + data
        if flow.handle is not None:
            try:
                flow.handle.send(data)
            except OSError:  # too large for the tunnel, refused by ICMP: UDP may drop
                self.metrics.rejected.inc(reason="udp_send_failed")
        elif len(flow.pending) < self.settings.max_queued_datagrams:
            flow.pending.append(data)
        else:
            self.metrics.rejected.inc(reason="udp_queue_full")

    def _new_flow(
        self,
        public: _PublicProtocol,
        addr: Address,
        now: float,
        route: PortRoute | None = None,
        prefix: bytes = b"",
    ) -> _Flow | None:
        """A flow for a client's first datagram; ``route`` and ``prefix`` are given on
        the agent's tunnel port (found from the gateway's header)."""
        port = public.port
        upstream_port = None
        if route is None:
            route = self.router.lookup_port("udp", port)
            if route is None or not route.enabled:
                return None
            if route.proxy_protocol is not None:
                if self.settings.proxy_port is None:  # the agent, reached without a header
                    prefix = proxyproto.target_header("v2", transport="udp")
                    note_unknown_client(self._unknown_logged, route.tunnel_id, "udp")
                else:
                    upstream_port = self.settings.proxy_port
                    prefix = self._client_header(addr, port)
                    if not prefix:
                        return None
        client = (port, client_key(str(addr[0])))
        if self.admit is not None and not self.admit(route.tunnel_id, str(addr[0])):
            self.metrics.rejected.inc(reason="access")
            self._log_refused(client, route.tunnel_id, str(addr[0]), now)
            return None
        if self._per_port.get(port, 0) >= self.settings.max_flows_per_port:
            self.metrics.rejected.inc(reason="udp_flows_per_port")
            return None
        if self._per_client.get(client, 0) >= self.settings.max_flows_per_client:
            self.metrics.rejected.inc(reason="udp_flows_per_client")
            return None
        # a replicated tunnel balances per flow (the route stays the tunnel's: a change
        # of one replica's health must not end the other replicas' flows)
        dial_route = pick_replica(route, now, str(addr[0]))
        if dial_route is None:
            self.metrics.rejected.inc(reason="udp_no_replica")
            return None
        flow = _Flow(
            port, addr, route.tunnel_id, now, dial_route.upstream_host, started=now, route=route
        )
        flow.replica = dial_route.replica
        if flow.replica is not None:
            flow.replica.open += 1
        flow.prefix = prefix
        self.flows[(port, addr)] = flow
        self._per_port[port] = self._per_port.get(port, 0) + 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self.metrics.udp_flows.inc(tunnel=route.tunnel_id)
        loop = asyncio.get_running_loop()
        flow.timer = loop.call_later(self.settings.flow_idle_timeout, self._check_idle, flow)

        def deliver(data: bytes) -> None:
            if flow.closed or public.transport is None:
                return
            flow.last_activity = loop.time()
            flow.bytes_out += len(data)
            self.metrics.udp_bytes.inc(len(data), tunnel=flow.tunnel_id, direction="out")
            public.transport.sendto(data, addr)

        if upstream_port is None:
            upstream_port = route.upstream_port or self.settings.upstream_port or route.public_port
        task = asyncio.ensure_future(
            self._dial(flow, dial_route.upstream_host, upstream_port, deliver)
        )
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)
        return flow

    async def _dial(
        self, flow: _Flow, host: str, port: int, deliver: Callable[[bytes], None]
    ) -> None:
        try:
            handle = await self.flow_dialer(host, port, deliver)
        except (OSError, TimeoutError):
            self.metrics.upstream_errors.inc(tunnel=flow.tunnel_id, kind="unreachable")
            replica = flow.replica
            if replica is not None and replica.balance.failed(
                replica, asyncio.get_running_loop().time(), "unreachable"
            ):
                self.metrics.replica_ejections.inc(tunnel=flow.tunnel_id, agent=replica.agent_id)
            self._close_flow(flow)
            return
        if flow.closed:
            handle.close()
            return
        flow.handle = handle
        pending, flow.pending = flow.pending, []
        for data in pending:
            with contextlib.suppress(OSError):
                handle.send(data)

    def _check_idle(self, flow: _Flow) -> None:
        if flow.closed:
            return
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - flow.last_activity
        remaining = self.settings.flow_idle_timeout - idle_for
        if remaining > 0:
            flow.timer = loop.call_later(remaining, self._check_idle, flow)
            return
        self._close_flow(flow)

    def _close_flow(self, flow: _Flow) -> None:
        if flow.closed:
            return
        flow.closed = True
        if flow.replica is not None:
            flow.replica.open -= 1
        if flow.timer is not None:
            flow.timer.cancel()
        if flow.handle is not None:
            with contextlib.suppress(Exception):
                flow.handle.close()
        self.flows.pop((flow.port, flow.client), None)
        port_count = self._per_port.get(flow.port, 1) - 1
        if port_count > 0:
            self._per_port[flow.port] = port_count
        else:
            self._per_port.pop(flow.port, None)
        client = (flow.port, client_key(str(flow.client[0])))
        client_count = self._per_client.get(client, 1) - 1
        if client_count > 0:
            self._per_client[client] = client_count
        else:
            self._per_client.pop(client, None)
        self.metrics.udp_flows.dec(tunnel=flow.tunnel_id)
        if self.access_log is not None and self.access_log.enabled:
            self.access_log.flow(
                protocol="udp",
                client=str(flow.client[0]),
                tunnel=flow.tunnel_id,
                port=flow.port,
                bytes_in=flow.bytes_in,
                bytes_out=flow.bytes_out,
                duration=max(0.0, flow.last_activity - flow.started),
                upstream=flow.upstream,
                decision="allow",
            )

    def _client_header(self, addr: Address, port: int) -> bytes:
        """The gateway's PROXY v2 header for a flow: the client, and the address it
        wrote to (``bind_host``, or ``public_ip`` when that is a wildcard); empty (and
        logged) when there is no IP address to give."""
        listener = self.settings.bind_host
        if listener in ("", "0.0.0.0", "::"):
            listener = self.settings.public_ip or "0.0.0.0"
        try:
            try:
                ipaddress.ip_address(listener)
            except ValueError:
                listener = "0.0.0.0"  # a name: the header holds addresses only
            source, destination = proxyproto.address_pair(
                (str(addr[0]), int(addr[1])), (listener, port)
            )
            return proxyproto.encode(source=source, destination=destination, transport="udp")
        except (IndexError, ValueError) as exc:
            log.warning("no PROXY header for a UDP client on port %d: %s", port, exc)
            return b""

    def _log_refused(self, key: tuple[int, str], tunnel: str, client: str, now: float) -> None:
        """One access-log line per refused client and port per minute (datagrams from a
        refused address would otherwise each write one)."""
        if self.access_log is None or not self.access_log.enabled:
            return
        last = self._refused_logged.get(key)
        if last is not None and now - last < 60:
            return
        if len(self._refused_logged) >= 10_000:
            self._refused_logged.clear()
        self._refused_logged[key] = now
        self.access_log.flow(
            protocol="udp",
            client=client,
            tunnel=tunnel,
            port=key[0],
            bytes_in=0,
            bytes_out=0,
            duration=0.0,
            upstream="",
            decision="deny_ip",
        )
