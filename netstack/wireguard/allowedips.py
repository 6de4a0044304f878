"""Cryptokey routing table: allowed-IPs longest-prefix match (whitepaper 2).

Theory of operation: each address family keeps one hash table per prefix length,
mapping the address's top ``prefixlen`` bits to a value (a peer), plus the list of
prefix lengths in use, longest first.  A lookup tries each length in use, so it costs
at most 33 (IPv4) or 129 (IPv6) dict probes and in practice one or two.  As in
WireGuard, inserting a prefix that another peer holds moves it to the new peer.
Outbound packets are routed by destination; inbound packets are accepted only if
their source maps back to the peer whose key decrypted them.  Results are memoised
per packed address (a bounded cache, cleared on every change) because a tunnel sees
the same few addresses over and over.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")
_CACHE_LIMIT = 8192
_MISSING = object()
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``"10.0.0.1/32"`` or ``"fd00::/64"``; host bits are masked off, as ``wg`` does."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"invalid allowed IP {text!r}: {exc}") from exc


class _Family(Generic[T]):
    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: list[int] = []

    def _refresh(self) -> None:
        self.lengths = sorted((n for n, t in self.tables.items() if t), reverse=True)

    def insert(self, prefix: int, length: int, value: T) -> None:
        table = self.tables.setdefault(length, {})
        table[prefix] = value
        if length not in self.lengths:
            self._refresh()

    def remove(self, prefix: int, length: int) -> None:
        table = self.tables.get(length)
        if table is not None and table.pop(prefix, None) is not None and not table:
            self._refresh()

    def lookup(self, address: int) -> T | None:
        bits = self.bits
        tables = self.tables
        for length in self.lengths:
            value = tables[length].get(address >> (bits - length))
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[T]):
    """Longest-prefix-match map from IPv4/IPv6 prefixes to values."""

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)
        self._cache: dict[bytes, T | None] = {}

    @property
    def cache(self) -> dict[bytes, T | None]:
        """The memo of past lookups (read-only use: a hot path may probe it first)."""
        return self._cache

    def _family(self, network: Network) -> _Family[T]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: Network, value: T) -> None:
        self._cache.clear()
        fam = self._family(network)
        fam.insert(
            int(network.network_address) >> (fam.bits - network.prefixlen), network.prefixlen, value
        )

    def remove(self, network: Network) -> None:
        self._cache.clear()
        fam = self._family(network)
        fam.remove(
            int(network.network_address) >> (fam.bits - network.prefixlen), network.prefixlen
        )

    def remove_value(self, value: T) -> None:
        """Remove every prefix that maps to ``value``."""
        for network in list(self.networks_of(value)):
            self.remove(network)

    def networks_of(self, value: T) -> Iterator[Network]:
        for fam, cls in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for length, table in fam.tables.items():
                for prefix, held in table.items():
                    if held is value:
                        yield cls((prefix << (fam.bits - length), length))

    def lookup(self, address: bytes) -> T | None:
        """Longest match for a 4- or 16-byte packed address; None if no prefix covers it."""
        cached = self._cache.get(address, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        if len(address) == 4:
            value = self._v4.lookup(int.from_bytes(address, "big"))
        elif len(address) == 16:
            value = self._v6.lookup(int.from_bytes(address, "big"))
        else:
            return None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[bytes(address)] = value
        return value
