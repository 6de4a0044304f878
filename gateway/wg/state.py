"""The desired WireGuard state of a gateway, derived from Control's config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.protocol import AgentPeerSpec, GatewaySelf


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
    def from_config(cls, me: GatewaySelf, agents: Sequence[AgentPeerSpec]) -> WgState:
        """From the gateway's config (parsed and checked by ``common.protocol``)."""
        peers = (WgPeer(a.public_key, tuple(sorted(a.allowed_ips)), a.name) for a in agents)
        return cls(tuple(sorted(me.addresses)), tuple(sorted(peers, key=lambda p: p.public_key)))


@dataclass(frozen=True)
class PeerStats:
    """What the data plane reports about one peer (for metrics and logs)."""

    public_key: str
    endpoint: str | None
    latest_handshake: float  # epoch seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
