"""What each client is told: full ``config`` snapshots and tunnel objects, built as the
typed messages of ``common.protocol`` from database rows.

Pure functions over rows.  No WireGuard private key exists in Control, so none can
appear here; TLS private keys go to gateways only (they terminate TLS).

Most of a gateway's view is the same for every gateway: all tunnels, certificates,
access policies and session keys; only itself and its agent peers (their addresses
depend on its slot) are its own.  :class:`GatewayCommon` builds the common part once
per snapshot of the rows, and :class:`AgentTunnels` indexes the tunnels by agent once
for every agent's view, so a reconnect storm of N clients builds them once, not N
times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common import protocol as p
from control.db.store import Row, Store


def tunnel_spec(row: Row) -> p.TunnelSpec:
    return p.TunnelSpec(
        id=row["id"],
        protocol=row["protocol"],
        domain=row["domain"] if row["protocol"] == "http" else None,
        public_port=row["public_port"] if row["protocol"] != "http" else None,
        target=row["target"],
        agent_id=row["agent_id"],
        agent_ip=row["agent_ip"],
        # a disabled agent's tunnels are answered as disabled tunnels by the gateways
        enabled=bool(row["enabled"]) and bool(row.get("agent_enabled", True)),
        proxy_protocol=row["proxy_protocol"] if row["protocol"] != "http" else None,
        replicas=replica_specs(row),
        balance=row.get("balance") or "round_robin",
        sticky=row.get("sticky"),
    )


def replica_specs(row: Row) -> tuple[p.ReplicaSpec, ...]:
    """A tunnel row's replicas as gateways get them (none for a single agent)."""
    replicas = row.get("replicas") or []
    if len(replicas) < 2:
        return ()
    return tuple(
        p.ReplicaSpec(
            agent_id=r["agent_id"],
            agent_ip=r["agent_ip"],
            weight=r["weight"],
            role=r["role"],
            draining=bool(r["draining"]),
            health=r["health"] or "unknown",
        )
        for r in replicas
    )


def certificate_spec(cert: Row) -> p.CertificateSpec:
    return p.CertificateSpec(
        domain=cert["domain"],
        certificate=cert["certificate_pem"],
        private_key=cert["private_key_pem"],
        not_after=cert["not_after"],
    )


def tunnel_agents(row: Row) -> list[str]:
    """The agents serving a tunnel: its replicas, or its one agent."""
    replicas = row.get("replicas") or []
    return [r["agent_id"] for r in replicas] if replicas else [row["agent_id"]]


def tunnel_wire(row: Row) -> dict[str, object]:
    return tunnel_spec(row).to_wire()


def _endpoint(gateway: Row, port_column: str = "wireguard_port") -> str | None:
    ip, port = gateway["public_ip"], gateway.get(port_column)
    if not ip or not port:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def agent_config(
    store: Store, agent: Row, gateways: list[Row], tunnels: list[Row]
) -> p.AgentConfig:
    """An agent's view: itself, every enabled gateway it should peer with, its own
    tunnels."""
    peers = []
    for gateway in gateways:
        if not gateway["public_key"] or not gateway.get("enabled", True):
            continue
        address = store.gateway_address(agent["subnet"], gateway["slot"])
        peers.append(
            p.GatewayPeerSpec(
                id=gateway["id"],
                name=gateway["name"],
                public_key=gateway["public_key"],
                endpoint=_endpoint(gateway),
                virtual_ip=address,
                allowed_ips=(address + "/32",),
                stream_endpoint=_endpoint(gateway, "https_port"),
            )
        )
    return p.AgentConfig(
        agent=p.AgentSelf(
            id=agent["id"],
            name=agent["name"],
            subnet=agent["subnet"],
            virtual_ip=agent["virtual_ip"],
        ),
        gateways=tuple(peers),
        tunnels=tuple(tunnel_spec(t) for t in tunnels if agent["id"] in tunnel_agents(t)),
    )


def gateway_config(
    store: Store,
    gateway: Row,
    agents: list[Row],
    tunnels: list[Row],
    certificates: list[Row],
    policies: tuple[p.AccessPolicy, ...] = (),
    session_keys: tuple[p.SessionKey, ...] = (),
) -> p.GatewayConfig:
    """A gateway's view: itself, every enabled agent (peer), all tunnels (a disabled
    agent's as disabled), all certificates, the tunnels' access policies and the
    session keys."""
    peers = [a for a in agents if a["public_key"] and a.get("enabled", True)]
    return p.GatewayConfig(
        gateway=p.GatewaySelf(
            id=gateway["id"],
            name=gateway["name"],
            slot=gateway["slot"],
            public_ip=gateway["public_ip"],
            wireguard_port=gateway["wireguard_port"],
            addresses=tuple(
                store.gateway_address(a["subnet"], gateway["slot"])
                + "/"
                + a["subnet"].split("/")[1]
                for a in peers
            ),
        ),
        agents=tuple(
            p.AgentPeerSpec(
                id=agent["id"],
                name=agent["name"],
                public_key=agent["public_key"],
                subnet=agent["subnet"],
                virtual_ip=agent["virtual_ip"],
                allowed_ips=(agent["virtual_ip"] + "/32",),
                gateway_ip=store.gateway_address(agent["subnet"], gateway["slot"]),
            )
            for agent in peers
        ),
        tunnels=tuple(tunnel_spec(t) for t in tunnels),
        certificates=tuple(certificate_spec(cert) for cert in certificates),
        policies=policies,
        session_keys=session_keys,
    )


class AgentTunnels:
    """The tunnels of one snapshot by the agents serving them (alone or as replicas),
    indexed once for every agent's view."""

    def __init__(self, tunnels: list[Row]) -> None:
        self.tunnels = tunnels
        self._by_agent: dict[str, list[Row]] = {}
        for tunnel in tunnels:
            for serving in tunnel_agents(tunnel):
                self._by_agent.setdefault(serving, []).append(tunnel)

    def of(self, agent_id: str) -> list[Row]:
        return self._by_agent.get(agent_id, [])


@dataclass
class GatewayCommon:
    """What every gateway's view holds alike: all tunnels, certificates, access
    policies and session keys; their wire form is built with the first gateway's
    view and shared by the others (read-only: the frame encoder only reads it)."""

    tunnels: list[Row]
    certificates: list[Row]
    policies: tuple[p.AccessPolicy, ...]
    session_keys: tuple[p.SessionKey, ...]
    _wire: dict[str, Any] | None = field(default=None, repr=False)

    def same(
        self,
        tunnels: list[Row],
        certificates: list[Row],
        policies: tuple[p.AccessPolicy, ...],
        session_keys: tuple[p.SessionKey, ...],
    ) -> bool:
        """Built from these very snapshots (each is reloaded only after a write)."""
        return (
            self.tunnels is tunnels
            and self.certificates is certificates
            and self.policies is policies
            and self.session_keys is session_keys
        )

    def gateway_wire(self, store: Store, gateway: Row, agents: list[Row]) -> dict[str, Any]:
        """``gateway_config(...).to_wire()`` for one gateway."""
        if self._wire is None:
            wire = gateway_config(
                store,
                gateway,
                agents,
                self.tunnels,
                self.certificates,
                self.policies,
                self.session_keys,
            ).to_wire()
            self._wire = {k: v for k, v in wire.items() if k not in _OWN}
            return wire
        own = gateway_config(store, gateway, agents, [], []).to_wire()
        return {**own, **self._wire}


#: the parts of a gateway's config that are its own (the rest is every gateway's)
_OWN = ("gateway", "agents")
