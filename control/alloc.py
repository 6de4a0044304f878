"""Address allocation (DESIGN.md, "Addressing").

Control owns one pool (default ``100.64.0.0/10``) and carves it into per-agent subnets
(default /24).  Inside agent subnet N the agent is host ``.100`` (``agent_host``) and
gateway k is host ``.k``: every gateway joins every agent's subnet, so a gateway slot k
must be below the agent's host number.  These functions are pure; the store calls them
inside its write transaction, and unique constraints on ``subnet`` and ``slot`` back
them up, so concurrent creates cannot receive the same address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_POOL = "100.64.0.0/10"
DEFAULT_PREFIX = 24
DEFAULT_AGENT_HOST = 100


class PoolExhausted(Exception):
    """No free subnet (or gateway slot) is left in the configured pool."""


class AddressPlan:
    """The pool, the per-agent prefix and the agent's host number, validated once."""

    def __init__(
        self,
        pool: str = DEFAULT_POOL,
        prefix: int = DEFAULT_PREFIX,
        agent_host: int = DEFAULT_AGENT_HOST,
    ) -> None:
        try:
            self.pool: IPNetwork = ipaddress.ip_network(pool, strict=True)
        except ValueError as exc:
            raise ValueError(f"address pool {pool!r}: {exc}") from exc
        if not self.pool.prefixlen <= prefix <= self.pool.max_prefixlen - 2:
            raise ValueError(
                f"agent subnet prefix /{prefix} must be between /{self.pool.prefixlen} "
                f"and /{self.pool.max_prefixlen - 2} for pool {self.pool}"
            )
        self.prefix = prefix
        hosts = 2 ** (self.pool.max_prefixlen - prefix)
        if not 2 <= agent_host < hosts - 1:
            raise ValueError(f"agent host number {agent_host} does not fit a /{prefix}")
        self.agent_host = agent_host

    @property
    def max_gateways(self) -> int:
        """Gateway slots are 1 .. agent_host-1."""
        return self.agent_host - 1

    @property
    def subnet_count(self) -> int:
        return int(2 ** (self.prefix - self.pool.prefixlen))

    def subnet(self, index: int) -> IPNetwork:
        size = 2 ** (self.pool.max_prefixlen - self.prefix)
        base = int(self.pool.network_address) + index * size
        return ipaddress.ip_network((base, self.prefix))

    def agent_address(self, subnet: IPNetwork) -> IPAddress:
        return subnet.network_address + self.agent_host

    def gateway_address(self, subnet: IPNetwork, slot: int) -> IPAddress:
        if not 1 <= slot <= self.max_gateways:
            raise ValueError(f"gateway slot {slot} out of range 1..{self.max_gateways}")
        return subnet.network_address + slot

    def index_of(self, subnet: str) -> int:
        """Position of an allocated subnet in the pool (inverse of :meth:`subnet`)."""
        network = ipaddress.ip_network(subnet)
        size = 2 ** (self.pool.max_prefixlen - self.prefix)
        return int((int(network.network_address) - int(self.pool.network_address)) // size)

    def first_free_index(self, used: set[int]) -> int:
        """Lowest subnet index not in ``used`` (integers: cheap at 10,000s of agents)."""
        for index in range(self.subnet_count):
            if index not in used:
                return index
        raise PoolExhausted(
            f"address pool {self.pool} has no free /{self.prefix} left ({self.subnet_count} agents)"
        )

    def first_free_subnet(self, used: Iterable[str]) -> IPNetwork:
        """Lowest subnet of the pool that is not in ``used``."""
        return self.subnet(self.first_free_index({self.index_of(text) for text in used}))

    def first_free_slot(self, used: Iterable[int]) -> int:
        taken = set(used)
        for slot in range(1, self.max_gateways + 1):
            if slot not in taken:
                return slot
        raise PoolExhausted(f"all {self.max_gateways} gateway slots are in use")
