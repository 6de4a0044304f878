"""Host routing table for the gateway's public listeners.

Theory of operation
-------------------
Control describes tunnels as JSON dicts (the wire format of the ``config`` and
``tunnel_create``/``tunnel_update``/``tunnel_delete`` messages).  The router keeps the
last good copy of every tunnel, keyed by id, and derives two read-only indexes from it:

* ``domain -> Route`` for HTTP tunnels (exact names, plus ``*.example.com`` wildcards
  that match exactly one extra label), and
* ``public port -> PortRoute`` for raw TCP/UDP tunnels.

The indexes are rebuilt as a whole after every change and swapped in with a single
assignment, so a lookup running between two awaits always sees one consistent table.
A malformed tunnel dict is logged (without its contents beyond the id) and skipped; it
never raises into the control client.  When two tunnels claim one domain (Control
should prevent it) the enabled one wins, then the smallest id, so the choice is
deterministic.  Disabled tunnels stay in the index so the proxy can answer "tunnel
disabled" instead of a confusing "unknown host".

The same table serves the agent: built with an ``upstream`` resolver, each route's
address, port and path prefix come from the tunnel's ``target`` (a local service)
instead of its ``agentIp``; a target the resolver rejects skips the tunnel.

Listeners (e.g. the TCP forwarder) subscribe with ``add_listener`` and are called
synchronously after every change.

Replicas (issue 17): on the gateway, a tunnel with two or more agents gets a route per
replica (the same tunnel, each with its agent's id and address) in ``Route.replicas``
/ ``PortRoute.replicas`` and its ``TunnelBalance`` (``balance.py``) in ``balance``;
the data path picks one replica route per request, connection or flow
(``pick_replica``).  The replicas' health and draining live in the balancer, not in
the routes, so a health change never makes a route compare unequal (UDP flows and
pooled connections of the other replicas carry on).  A tunnel with one agent has no
replicas and is routed exactly as before.  The agent ignores replicas: it serves its
own side of every tunnel it is given.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from common.protocol import ReplicaSpec, TunnelSpec

from .balance import Balancer, Replica, TunnelBalance
from .targets import Target

log = logging.getLogger(__name__)

_MAX_DOMAIN_LENGTH = 253


@dataclass(frozen=True, slots=True)
class Route:
    """Where requests for one HTTP tunnel's domain go."""

    tunnel_id: str
    domain: str
    agent_id: str
    #: the host to dial: on the gateway the agent's virtual IP (the tunnel's
    #: ``agentIp``), on the agent the local service from the tunnel's ``target``
    upstream_host: str
    enabled: bool
    #: the port to dial on ``upstream_host`` (None: the proxy's ``upstream_port``)
    upstream_port: int | None = None
    #: prepended to every request path (an agent's ``http://host:port/prefix`` target)
    path_prefix: str = ""
    #: the tunnel's target as Control gave it: a connection spliced by the agent leads
    #: to one target, so the gateway pools connections per (tunnel, target)
    target: str = ""
    #: that pool slot's key (computed once, not per request)
    pool_key: str = field(init=False, default="", compare=False, repr=False)
    #: a replicated tunnel's route: one route per replica (empty: one agent) and the
    #: balancer choosing among them
    replicas: tuple[Route, ...] = field(default=(), compare=False, repr=False)
    balance: TunnelBalance | None = field(default=None, compare=False, repr=False)
    #: a replica's route: its live state in the balancer
    replica: Replica | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_key", f"{self.tunnel_id} {self.target}")


@dataclass(frozen=True, slots=True)
class PortRoute:
    """Where connections (or datagrams) to one raw TCP/UDP tunnel's public port go."""

    tunnel_id: str
    protocol: str  # "tcp" or "udp"
    public_port: int
    agent_id: str
    #: the host to dial (see :attr:`Route.upstream_host`)
    upstream_host: str
    enabled: bool
    #: the port to dial on ``upstream_host`` (None: the tunnel's public port)
    upstream_port: int | None = None
    #: the tunnel's ``proxyProtocol`` ("v1", "v2" or None): the gateway sends such a
    #: tunnel's traffic to the agent's tunnel port with the client's address in a PROXY
    #: v2 header, the agent sends the target a header of this version
    proxy_protocol: str | None = None
    #: the tunnel's target as Control gave it (the agent ends connections it dialled
    #: when the target changes)
    target: str = ""
    #: as for :class:`Route`
    replicas: tuple[PortRoute, ...] = field(default=(), compare=False, repr=False)
    balance: TunnelBalance | None = field(default=None, compare=False, repr=False)
    replica: Replica | None = field(default=None, compare=False, repr=False)


_R = TypeVar("_R", Route, PortRoute)


def pick_replica(
    route: _R,
    now: float,
    client_ip: str = "",
    token: str | None = None,
    exclude: _R | None = None,
) -> _R | None:
    """The replica route for a new request/connection of a replicated tunnel (``route``
    itself for a tunnel with one agent; None when every replica is draining)."""
    balance = route.balance
    if balance is None:
        return route
    chosen = balance.pick(now, client_ip, token, exclude.replica if exclude is not None else None)
    return None if chosen is None else chosen.route


def another_replica(route: _R, now: float, client_ip: str = "") -> _R | None:
    """Another replica route of the tunnel for a retry after ``route`` (a replica's)
    failed, or None when there is no other to go to."""
    replica = route.replica
    if replica is None:
        return None
    other = replica.balance.pick(now, client_ip, None, replica)
    return None if other is None or other is replica else other.route


#: a tunnel's ``target`` -> (host, port, path prefix) to dial; ValueError if unusable
UpstreamResolver = Callable[[str], tuple[str, int, str]]


@dataclass(frozen=True, slots=True)
class _Tunnel:
    tunnel_id: str
    protocol: str
    domain: str | None
    public_port: int | None
    agent_id: str
    upstream_host: str
    enabled: bool
    upstream_port: int | None = None
    path_prefix: str = ""
    target: str = ""
    proxy_protocol: str | None = None
    replicas: tuple[ReplicaSpec, ...] = ()
    balance: str = "round_robin"
    sticky: str | None = None


class TunnelError(ValueError):
    """A tunnel from Control that this side cannot serve (its target does not parse)."""


def normalize_host(host: str) -> str | None:
    """Lower-case a Host header value and strip its port and trailing dot.

    Returns None for values that cannot be a host name (empty, too long, bad brackets).
    ``[::1]:8080`` becomes ``::1``; ``Example.COM.:443`` becomes ``example.com``.
    """
    host = host.strip().lower()
    if not host or len(host) > _MAX_DOMAIN_LENGTH + 8:
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        rest = host[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        host = host[1:end]
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if port and not port.isdigit():
            return None
    host = host.rstrip(".")
    return host or None


def _parse_tunnel(spec: TunnelSpec, upstream: UpstreamResolver | None = None) -> _Tunnel:
    """A tunnel from Control (already parsed and bounded by ``common.protocol``) as the
    table holds it; TunnelError when this side cannot use its target."""
    if upstream is None:
        # the gateway dials the agent; only a URL target's path prefix matters here,
        # since every HTTP rewrite happens once, at the gateway
        prefix = ""
        if spec.protocol == "http":
            with contextlib.suppress(ValueError):
                prefix = Target.parse(spec.target).path_prefix
        return _Tunnel(
            spec.id,
            spec.protocol,
            spec.domain,
            spec.public_port,
            spec.agent_id,
            spec.agent_ip,
            spec.enabled,
            None,
            prefix,
            spec.target,
            spec.proxy_protocol,
            spec.replicas if len(spec.replicas) > 1 else (),
            spec.balance,
            spec.sticky,
        )
    try:
        host, upstream_port, prefix = upstream(spec.target)
    except ValueError as exc:
        raise TunnelError(f"tunnel {spec.id}: unusable target ({exc})") from None
    return _Tunnel(
        spec.id,
        spec.protocol,
        spec.domain,
        spec.public_port,
        spec.agent_id,
        host,
        spec.enabled,
        upstream_port,
        prefix,
        spec.target,
        spec.proxy_protocol,
    )


def _preferred(a: _Tunnel, b: _Tunnel) -> _Tunnel:
    """Deterministic winner when two tunnels claim one domain or port."""
    return min(a, b, key=lambda t: (not t.enabled, t.tunnel_id))


class Router:
    """Tunnel table fed by Control messages; answers "which agent serves this Host?"."""

    def __init__(self, upstream: UpstreamResolver | None = None) -> None:
        #: None: connections go to the tunnel's ``agentIp`` (the gateway); otherwise to
        #: what this returns for the tunnel's ``target`` (the agent, to local services)
        self._upstream = upstream
        self._tunnels: dict[str, _Tunnel] = {}
        self._domains: dict[str, Route] = {}
        self._http_by_id: dict[str, Route] = {}
        self._ports: dict[tuple[str, int], PortRoute] = {}
        self._raw_by_id: dict[str, PortRoute] = {}
        self._listeners: list[Callable[[], None]] = []
        self.version = 0
        #: the replicated tunnels' balancers (gateway side; the agent has no replicas)
        self.balancer = Balancer()

    # -- updates (from the control client) -------------------------------------------

    def replace_all(self, tunnels: Iterable[TunnelSpec]) -> None:
        """Install a full ``config`` snapshot; a tunnel whose target this side cannot
        use is skipped (and logged)."""
        table: dict[str, _Tunnel] = {}
        for spec in tunnels:
            try:
                tunnel = _parse_tunnel(spec, self._upstream)
            except TunnelError as exc:
                log.warning("ignoring tunnel from config: %s", exc)
                continue
            table[tunnel.tunnel_id] = tunnel
        self._tunnels = table
        self._rebuild()

    def upsert(self, spec: TunnelSpec) -> bool:
        """Add or replace one tunnel; returns False (and changes nothing) if this side
        cannot use its target."""
        try:
            parsed = _parse_tunnel(spec, self._upstream)
        except TunnelError as exc:
            log.warning("ignoring tunnel update: %s", exc)
            return False
        self._tunnels = {**self._tunnels, parsed.tunnel_id: parsed}
        self._rebuild()
        return True

    def remove(self, tunnel_id: str) -> bool:
        """Delete a tunnel; returns whether it existed."""
        if tunnel_id not in self._tunnels:
            return False
        self._tunnels = {k: v for k, v in self._tunnels.items() if k != tunnel_id}
        self._rebuild()
        return True

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change to the table."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (no error if it was not registered)."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    # -- lookups (from the data path) ------------------------------------------------

    def lookup_host(self, host: str) -> Route | None:
        """The route for a Host header value (any case, with or without port/trailing dot)."""
        name = normalize_host(host)
        if name is None:
            return None
        route = self._domains.get(name)
        if route is not None:
            return route
        _, dot, parent = name.partition(".")
        if dot and parent:
            return self._domains.get("*." + parent)
        return None

    def lookup_tunnel(self, tunnel_id: str) -> Route | None:
        """The route of an HTTP tunnel by its id (how the agent finds the tunnel a
        PROXY header names), whether or not it won its domain."""
        return self._http_by_id.get(tunnel_id)

    def lookup_port(self, protocol: str, port: int) -> PortRoute | None:
        """The raw TCP/UDP tunnel listening on ``port``."""
        return self._ports.get((protocol, port))

    def lookup_raw_tunnel(self, tunnel_id: str) -> PortRoute | None:
        """The route of a raw tunnel by its id (how the agent finds the tunnel a PROXY
        header on its tunnel port names), if it holds its port."""
        return self._raw_by_id.get(tunnel_id)

    def port_routes(self, protocol: str) -> list[PortRoute]:
        """All raw tunnels of one protocol (enabled or not), sorted by port."""
        return sorted(
            (r for (proto, _), r in self._ports.items() if proto == protocol),
            key=lambda r: r.public_port,
        )

    def routes(self) -> list[Route]:
        """All HTTP routes, sorted by domain."""
        return [self._domains[d] for d in sorted(self._domains)]

    def __len__(self) -> int:
        return len(self._tunnels)

    # -- internals -------------------------------------------------------------------

    def _rebuild(self) -> None:
        self.balancer.begin_change()
        by_domain: dict[str, _Tunnel] = {}
        by_port: dict[tuple[str, int], _Tunnel] = {}
        for tunnel in self._tunnels.values():
            if tunnel.domain is not None:
                old = by_domain.get(tunnel.domain)
                by_domain[tunnel.domain] = tunnel if old is None else _preferred(old, tunnel)
            elif tunnel.public_port is not None:
                key = (tunnel.protocol, tunnel.public_port)
                old = by_port.get(key)
                by_port[key] = tunnel if old is None else _preferred(old, tunnel)
        replicated = {t.tunnel_id for t in self._tunnels.values() if t.replicas}
        self.balancer.keep_only(replicated)
        http_by_id = {
            t.tunnel_id: self._replicated(
                t,
                Route(
                    t.tunnel_id,
                    t.domain,
                    t.agent_id,
                    t.upstream_host,
                    t.enabled,
                    t.upstream_port,
                    t.path_prefix,
                    t.target,
                ),
            )
            for t in self._tunnels.values()
            if t.domain is not None
        }
        self._domains = {d: http_by_id[t.tunnel_id] for d, t in by_domain.items()}
        self._http_by_id = http_by_id
        self._ports = {
            key: self._replicated(
                t,
                PortRoute(
                    t.tunnel_id,
                    t.protocol,
                    key[1],
                    t.agent_id,
                    t.upstream_host,
                    t.enabled,
                    t.upstream_port,
                    t.proxy_protocol,
                    t.target,
                ),
            )
            for key, t in by_port.items()
        }
        self._raw_by_id = {route.tunnel_id: route for route in self._ports.values()}
        self.version += 1
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("router listener failed")

    def _replicated(self, tunnel: _Tunnel, route: _R) -> _R:
        """``route`` with a route per replica and the tunnel's balancer, if it has
        replicas (the gateway; the agent's tunnels never do)."""
        if not tunnel.replicas or self._upstream is not None:
            return route
        balance = self.balancer.configure(
            tunnel.tunnel_id, tunnel.balance, tunnel.sticky, tunnel.replicas
        )
        replicas = []
        for replica in balance.replicas:
            one = replace(
                route, agent_id=replica.agent_id, upstream_host=replica.host, replica=replica
            )
            replica.route = one
            replicas.append(one)
        return replace(route, replicas=tuple(replicas), balance=balance)
