"""The desired WireGuard state of a gateway, derived from Control's config."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WgPeer:
    """One agent as a WireGuard peer: its public key and the /32 it may use."""

    public_key: str
    allowed_ips: tuple[str, ...]
    name: str = ""


@dataclass(frozen=True)
class WgState:
    """Interface addresses (the gateway's address in each agent subnet) and peers."""

    addresses: tuple[str, ...]
    peers: tuple[WgPeer, ...]

    @classmethod
    def from_view(cls, me: dict[str, Any], peers: list[dict[str, Any]]) -> WgState:
        addresses = []
        for text in me.get("addresses") or []:
            try:
                addresses.append(str(ipaddress.ip_interface(text)))
            except ValueError:
                continue  # a malformed address from Control is skipped, not fatal
        wg_peers = []
        for peer in peers:
            key, allowed = peer.get("publicKey"), peer.get("allowedIps") or []
            if not isinstance(key, str) or not isinstance(allowed, list):
                continue
            clean = []
            for prefix in allowed:
                try:
                    clean.append(str(ipaddress.ip_network(prefix, strict=False)))
                except (TypeError, ValueError):
                    continue
            wg_peers.append(WgPeer(key, tuple(sorted(clean)), str(peer.get("name", ""))))
        return cls(tuple(sorted(addresses)), tuple(sorted(wg_peers, key=lambda p: p.public_key)))


@dataclass(frozen=True)
class PeerStats:
    """What the data plane reports about one peer (for metrics and logs)."""

    public_key: str
    endpoint: str | None
    latest_handshake: float  # epoch seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
