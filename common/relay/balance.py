"""Spreading a tunnel's requests and connections over its replicas (issue 17).

Theory of operation
-------------------
A tunnel served by two or more agents (``TunnelSpec.replicas``) gets one
``TunnelBalance`` here, kept by the router across configuration changes: a replica's
live state (its ejection, its back-off, its open connections) belongs to the agent and
survives a new ``config`` as long as the agent stays a replica.  Nothing here reads a
clock or a socket: callers pass the loop's time.

**Who may take traffic.**  A replica is *usable* unless an operator is draining it, its
health from Control is ``unhealthy`` (its agent's check of the local target failed) or
``offline`` (its agent is not connected to Control), or the gateway ejected it.  The
usable active replicas take everything; standby replicas take traffic only while no
active one is usable.  When nobody is usable the balancer does not refuse: it falls
back to every replica that is not draining (those Control does not call offline first),
since a check can be wrong and a request that reaches a sick replica may still be
answered.  Only when every replica is draining is there nothing to pick.

**Passive checks.**  The data path reports a failed dial, or a connection the agent
reset before any answer (``failed``): the replica is ejected for a back-off (1 s, then
doubled per consecutive failure up to 30 s).  When the back-off ends it is usable again
and the next request or connection that lands on it is the probe: a success
(``succeeded``) clears the back-off, another failure ejects it for twice as long.

**Picking.**  Among the candidates, by the tunnel's ``balance``: ``round_robin`` walks
a wheel in which each replica appears ``weight`` times, interleaved (nginx's smooth
weighted round-robin), so two replicas of weight 1 alternate; ``least_connections``
takes the replica with the fewest open requests or connections per unit of weight
(ties go round the wheel).  ``sticky``: ``client_ip`` hashes the client's address over
the candidates (weighted rendezvous hashing: a replica leaving moves only its own
clients, and they come back when it returns); ``cookie`` honours the replica a
``kkm_replica`` cookie names while that replica is a candidate, else picks anew (the
HTTP proxy then sets the cookie).  The candidate list and the wheel are rebuilt only
when something changed or an ejection ended, so a pick is a few attribute reads.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from common.protocol import ReplicaSpec

log = logging.getLogger(__name__)

#: the states a replica is shown in (metrics, dashboard, CLI)
HEALTHY = "healthy"
EJECTED = "ejected"
STANDBY = "standby"
DRAINING = "draining"
UNHEALTHY = "unhealthy"
OFFLINE = "offline"
STATES = (HEALTHY, EJECTED, STANDBY, DRAINING, UNHEALTHY, OFFLINE)

#: the cookie that keeps a client on its replica (``sticky: cookie``)
COOKIE_NAME = "kkm_replica"
_MAX_STICKY_CACHE = 4096
_MAX_WHEEL = 1 << 16


def replica_token(tunnel_id: str, agent_id: str) -> str:
    """The ``kkm_replica`` cookie value naming one replica of one tunnel (names neither
    the agent nor the tunnel to the client; the same on every gateway)."""
    return hashlib.sha256(f"{tunnel_id}\0{agent_id}".encode()).hexdigest()[:16]


class Replica:
    """One agent serving one tunnel, as this gateway sees it."""

    __slots__ = (
        "agent_id",
        "backoff",
        "balance",
        "draining",
        "ejected_until",
        "health",
        "host",
        "open",
        "role",
        "route",
        "token",
        "weight",
    )

    def __init__(self, balance: TunnelBalance, spec: ReplicaSpec) -> None:
        #: the tunnel's balancer (a retry asks it for another replica)
        self.balance = balance
        self.agent_id = spec.agent_id
        self.host = spec.agent_ip
        self.weight = spec.weight
        self.role = spec.role
        self.draining = spec.draining
        self.health = spec.health
        self.token = replica_token(balance.tunnel_id, spec.agent_id)
        #: the loop time until which the gateway's passive checks keep it out
        self.ejected_until = -math.inf
        #: the current ejection's length (0: not failing)
        self.backoff = 0.0
        #: raw connections and UDP flows open to it now (``opened``/``closed``)
        self.open = 0
        #: what the data path dials for it (the router's per-replica route)
        self.route: Any = None

    def usable(self, now: float) -> bool:
        return (
            not self.draining
            and self.health != UNHEALTHY
            and self.health != OFFLINE
            and now >= self.ejected_until
        )

    def state(self, now: float) -> str:
        """What the replica is shown as (one of ``STATES``)."""
        if self.draining:
            return DRAINING
        if self.health == OFFLINE:
            return OFFLINE
        if self.health == UNHEALTHY:
            return UNHEALTHY
        if now < self.ejected_until:
            return EJECTED
        return STANDBY if self.role == "standby" else HEALTHY


def _wheel(replicas: list[Replica]) -> list[Replica]:
    """Smooth weighted round-robin: each replica ``weight`` times, interleaved."""
    weights = [r.weight for r in replicas]
    divisor = 0
    for w in weights:
        divisor = math.gcd(divisor, w)
    weights = [w // max(divisor, 1) for w in weights]
    total = sum(weights)
    if total > _MAX_WHEEL:  # weights too fine-grained to unroll: one turn each
        return list(replicas)
    current = [0] * len(replicas)
    wheel = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(replicas)), key=lambda i: current[i])
        current[best] -= total
        wheel.append(replicas[best])
    return wheel


def _rendezvous(key: str, replica: Replica) -> float:
    digest = hashlib.blake2b(f"{key}\0{replica.token}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -replica.weight / math.log(unit)


class TunnelBalance:
    """The replicas of one tunnel and the choice among them (module docstring)."""

    __slots__ = (
        "_candidates",
        "_dirty",
        "_next",
        "_plain",
        "_sticky_cache",
        "_valid_until",
        "_wheel",
        "by_agent",
        "by_token",
        "extra_load",
        "mode",
        "replicas",
        "sticky",
        "tunnel_id",
    )

    def __init__(self, tunnel_id: str) -> None:
        self.tunnel_id = tunnel_id
        self.mode = "round_robin"
        self.sticky: str | None = None
        self.replicas: list[Replica] = []
        self.by_agent: dict[str, Replica] = {}
        self.by_token: dict[str, Replica] = {}
        #: requests in flight to an agent address that the balancer does not count
        #: itself (the HTTP proxy's pool), for ``least_connections``
        self.extra_load: Callable[[str], int] | None = None
        self._candidates: list[Replica] = []
        self._wheel: list[Replica] = []
        self._next = 0
        #: round robin and not sticky by address: a pick without a cookie's token or
        #: a replica to avoid is the next one on the wheel (``pick``)
        self._plain = True
        self._dirty = True
        self._valid_until = math.inf
        self._sticky_cache: dict[str, Replica] = {}

    # -- configuration --------------------------------------------------------------

    def configure(
        self, mode: str, sticky: str | None, specs: Iterable[ReplicaSpec]
    ) -> list[Replica]:
        """Take Control's replicas (state of agents that stay is kept); returns the
        replicas that just went ``offline`` (the caller ends what waits on them)."""
        self.mode = mode
        self.sticky = sticky
        went_offline = []
        replicas = []
        for spec in specs:
            replica = self.by_agent.get(spec.agent_id)
            if replica is None or replica.host != spec.agent_ip:
                replica = Replica(self, spec)
            else:
                if spec.health == OFFLINE and replica.health != OFFLINE:
                    went_offline.append(replica)
                replica.weight, replica.role = spec.weight, spec.role
                replica.draining, replica.health = spec.draining, spec.health
            replicas.append(replica)
        self.replicas = replicas
        self.by_agent = {r.agent_id: r for r in replicas}
        self.by_token = {r.token: r for r in replicas}
        self._dirty = True
        return went_offline

    # -- the data path --------------------------------------------------------------

    def pick(
        self,
        now: float,
        client_ip: str = "",
        token: str | None = None,
        exclude: Replica | None = None,
    ) -> Replica | None:
        """The replica for a new request or connection (None: every one is draining).

        ``client_ip`` keys ``sticky: client_ip``; ``token`` is the replica a
        ``kkm_replica`` cookie names; ``exclude`` is a replica that just failed this
        request (a retry goes elsewhere when there is anywhere else)."""
        if self._dirty or now >= self._valid_until:
            self._refresh(now)
        if self._plain and token is None and exclude is None:
            # the common case: every replica on the wheel is a candidate
            wheel = self._wheel
            if not wheel:
                return None
            turn = self._next
            self._next = turn + 1
            return wheel[turn % len(wheel)]
        candidates = self._candidates
        if exclude is not None and exclude in candidates and len(candidates) > 1:
            candidates = [r for r in candidates if r is not exclude]
        elif not candidates:
            return None
        if token is not None:
            chosen = self.by_token.get(token)
            if chosen is not None and chosen in candidates:
                return chosen
        if self.sticky == "client_ip" and client_ip:
            return self._by_client(client_ip, candidates, exclude is None)
        if self.mode == "least_connections":
            return self._least_loaded(candidates)
        wheel = self._wheel
        for _ in range(len(wheel)):
            replica = wheel[self._next % len(wheel)]
            self._next += 1
            if replica in candidates:
                return replica
        return candidates[0]

    def failed(self, replica: Replica, now: float, reason: str) -> bool:
        """A dial to the replica failed, or it reset a connection before answering:
        eject it for its back-off (module docstring); False if it already was."""
        if now < replica.ejected_until or replica.health == OFFLINE:
            # already out (several requests fail at once when an agent dies, and those
            # waiting on an agent Control reported offline are ended on purpose)
            return False
        replica.backoff = min(30.0, replica.backoff * 2) if replica.backoff else 1.0
        replica.ejected_until = now + replica.backoff
        self._dirty = True
        log.warning(
            "replica ejected for %gs: tunnel %s, agent %s (%s)",
            replica.backoff,
            self.tunnel_id[:64],
            replica.agent_id[:64],
            reason,
        )
        return True

    def succeeded(self, replica: Replica) -> None:
        """The replica answered: a probe after an ejection passed."""
        if replica.backoff:
            replica.backoff = 0.0
            log.info(
                "replica answers again: tunnel %s, agent %s",
                self.tunnel_id[:64],
                replica.agent_id[:64],
            )

    def states(self, now: float) -> list[tuple[Replica, str]]:
        return [(r, r.state(now)) for r in self.replicas]

    # -- internals ------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        usable = [r for r in self.replicas if r.usable(now)]
        chosen = [r for r in usable if r.role != "standby"] or usable
        if not chosen:
            # nobody passes every check: better a replica that may answer than none
            open_ = [r for r in self.replicas if not r.draining]
            chosen = [r for r in open_ if r.health != OFFLINE] or open_
            active = [r for r in chosen if r.role != "standby"]
            chosen = active or chosen
        if chosen != self._candidates:
            self._candidates = chosen
            self._wheel = _wheel(chosen) if chosen else []
            self._sticky_cache = {}
        later = [r.ejected_until for r in self.replicas if r.ejected_until > now]
        self._valid_until = min(later) if later else math.inf
        self._plain = self.mode == "round_robin" and self.sticky != "client_ip"
        self._dirty = False

    def _by_client(self, client_ip: str, candidates: list[Replica], cache: bool) -> Replica:
        if cache:
            chosen = self._sticky_cache.get(client_ip)
            if chosen is not None:
                return chosen
        chosen = max(candidates, key=lambda r: _rendezvous(client_ip, r))
        if cache:
            if len(self._sticky_cache) >= _MAX_STICKY_CACHE:
                self._sticky_cache.clear()
            self._sticky_cache[client_ip] = chosen
        return chosen

    def _least_loaded(self, candidates: list[Replica]) -> Replica:
        extra = self.extra_load
        start = self._next
        self._next += 1
        best: Replica | None = None
        best_load = math.inf
        count = len(candidates)
        for i in range(count):
            replica = candidates[(start + i) % count]
            load = replica.open + (extra(replica.host) if extra is not None else 0)
            score = (load + 1) / replica.weight
            if score < best_load:
                best, best_load = replica, score
        assert best is not None
        return best


class Balancer:
    """Every replicated tunnel's ``TunnelBalance``, by tunnel id (the router's)."""

    def __init__(self) -> None:
        self.tunnels: dict[str, TunnelBalance] = {}
        #: replicas Control reported offline in the router's latest change (its
        #: listeners read it: their waiting requests and dials to those are ended)
        self.went_offline: list[Replica] = []
        self.extra_load: Callable[[str], int] | None = None

    def configure(
        self, tunnel_id: str, mode: str, sticky: str | None, specs: Iterable[ReplicaSpec]
    ) -> TunnelBalance:
        balance = self.tunnels.get(tunnel_id)
        if balance is None:
            balance = self.tunnels[tunnel_id] = TunnelBalance(tunnel_id)
        balance.extra_load = self.extra_load
        self.went_offline.extend(balance.configure(mode, sticky, specs))
        return balance

    def keep_only(self, tunnel_ids: set[str]) -> None:
        """Forget tunnels that are gone or have one agent again."""
        for tunnel_id in [t for t in self.tunnels if t not in tunnel_ids]:
            del self.tunnels[tunnel_id]

    def set_extra_load(self, extra_load: Callable[[str], int] | None) -> None:
        self.extra_load = extra_load
        for balance in self.tunnels.values():
            balance.extra_load = extra_load

    def begin_change(self) -> None:
        """A new change of the router's table starts: ``went_offline`` starts empty."""
        self.went_offline = []

    def states(self, now: float) -> list[tuple[str, str, str]]:
        """(tunnel, agent, state) of every replica (metrics)."""
        return [
            (tunnel_id, replica.agent_id, state)
            for tunnel_id, balance in self.tunnels.items()
            for replica, state in balance.states(now)
        ]
