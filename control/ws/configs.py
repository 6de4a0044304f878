"""What each client is told: full ``config`` snapshots and tunnel objects on the wire.

Pure functions over database rows.  No WireGuard private key exists in Control, so
none can appear here; TLS private keys go to gateways only (they terminate TLS).
"""

from __future__ import annotations

from typing import Any

from control.db.store import Row, Store


def tunnel_wire(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "protocol": row["protocol"],
        "domain": row["domain"],
        "publicPort": row["public_port"],
        "target": row["target"],
        "agentId": row["agent_id"],
        "agentIp": row["agent_ip"],
        "enabled": bool(row["enabled"]),
    }


def _endpoint(gateway: Row) -> str | None:
    ip, port = gateway["public_ip"], gateway["wireguard_port"]
    if not ip or not port:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def agent_config(
    store: Store, agent: Row, gateways: list[Row], tunnels: list[Row]
) -> dict[str, Any]:
    """An agent's view: itself, every gateway it should peer with, its own tunnels."""
    return {
        "agent": {
            "id": agent["id"],
            "name": agent["name"],
            "subnet": agent["subnet"],
            "virtualIp": agent["virtual_ip"],
        },
        "gateways": [
            {
                "id": gateway["id"],
                "name": gateway["name"],
                "publicKey": gateway["public_key"],
                "endpoint": _endpoint(gateway),
                "virtualIp": store.gateway_address(agent["subnet"], gateway["slot"]),
                "allowedIps": [store.gateway_address(agent["subnet"], gateway["slot"]) + "/32"],
            }
            for gateway in gateways
            if gateway["public_key"]
        ],
        "tunnels": [tunnel_wire(t) for t in tunnels if t["agent_id"] == agent["id"]],
    }


def gateway_config(
    store: Store, gateway: Row, agents: list[Row], tunnels: list[Row], certificates: list[Row]
) -> dict[str, Any]:
    """A gateway's view: itself, every agent (peer), all tunnels, all certificates."""
    peers = [a for a in agents if a["public_key"]]
    return {
        "gateway": {
            "id": gateway["id"],
            "name": gateway["name"],
            "slot": gateway["slot"],
            "publicIp": gateway["public_ip"],
            "wireguardPort": gateway["wireguard_port"],
            "addresses": [
                store.gateway_address(a["subnet"], gateway["slot"])
                + "/"
                + a["subnet"].split("/")[1]
                for a in peers
            ],
        },
        "agents": [
            {
                "id": agent["id"],
                "name": agent["name"],
                "publicKey": agent["public_key"],
                "subnet": agent["subnet"],
                "virtualIp": agent["virtual_ip"],
                "allowedIps": [agent["virtual_ip"] + "/32"],
                "gatewayIp": store.gateway_address(agent["subnet"], gateway["slot"]),
            }
            for agent in peers
        ],
        "tunnels": [tunnel_wire(t) for t in tunnels],
        "certificates": [
            {
                "domain": cert["domain"],
                "certificate": cert["certificate_pem"],
                "privateKey": cert["private_key_pem"],
                "notAfter": cert["not_after"],
            }
            for cert in certificates
        ],
    }
