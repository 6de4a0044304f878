"""``config`` frame data for tests, as Control sends it: one agent ("a", laptop,
100.64.0.0/24) and one gateway ("g", edge, slot 1), with the tunnels given."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def agent_config_data(
    *tunnels: dict[str, Any], gateway_key: str, endpoint: str = "192.0.2.1:51820"
) -> dict[str, Any]:
    """An agent's view: itself and the gateway (``gateway_key`` at ``endpoint``)."""
    return {
        "agent": {
            "id": "a",
            "name": "laptop",
            "subnet": "100.64.0.0/24",
            "virtualIp": "100.64.0.100",
        },
        "gateways": [
            {
                "id": "g",
                "name": "edge",
                "publicKey": gateway_key,
                "endpoint": endpoint,
                "virtualIp": "100.64.0.1",
                "allowedIps": ["100.64.0.1/32"],
            }
        ],
        "tunnels": list(tunnels),
    }


def gateway_config_data(
    *tunnels: dict[str, Any], agent_key: str, certificates: Iterable[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A gateway's view: itself, the agent (``agent_key``), tunnels and certificates."""
    return {
        "gateway": {
            "id": "g",
            "name": "edge",
            "slot": 1,
            "publicIp": "192.0.2.1",
            "wireguardPort": 51820,
            "addresses": ["100.64.0.1/24"],
        },
        "agents": [
            {
                "id": "a",
                "name": "laptop",
                "publicKey": agent_key,
                "subnet": "100.64.0.0/24",
                "virtualIp": "100.64.0.100",
                "allowedIps": ["100.64.0.100/32"],
                "gatewayIp": "100.64.0.1",
            }
        ],
        "tunnels": list(tunnels),
        "certificates": list(certificates),
    }
