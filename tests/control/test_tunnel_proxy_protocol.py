"""A raw tunnel's ``proxyProtocol`` (issue 15) in Control: stored, shown, validated by
the REST API (v1 only for tcp, nothing for http: 422 with the reason), documented in
the OpenAPI document, pushed to the agent and every gateway as the typed
``TunnelSpec`` field, and set through ``kakuremichi admin tunnel create/update
--proxy-protocol``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import httpx

from common import protocol
from tests.control.test_api import assert_error
from tests.controlserver import ADMIN_TOKEN, RunningControl, connect_client, create

TCP = {"protocol": "tcp", "publicPort": 2222, "target": "127.0.0.1:22", "agent": "a"}
UDP = {"protocol": "udp", "publicPort": 5353, "target": "127.0.0.1:53", "agent": "a"}


async def test_created_shown_and_listed(api: httpx.AsyncClient) -> None:
    await create(api, "agent", "a")
    plain = await api.post("/api/tunnels", json=TCP)
    assert plain.status_code == 201, plain.text
    assert plain.json()["proxyProtocol"] is None  # off unless asked for
    v1 = await api.post("/api/tunnels", json={**TCP, "publicPort": 2223, "proxyProtocol": "v1"})
    v2 = await api.post("/api/tunnels", json={**UDP, "proxyProtocol": "v2"})
    assert (v1.status_code, v2.status_code) == (201, 201), (v1.text, v2.text)
    assert v1.json()["proxyProtocol"] == "v1" and v2.json()["proxyProtocol"] == "v2"
    shown = (await api.get(f"/api/tunnels/{v2.json()['id']}")).json()
    assert shown["proxyProtocol"] == "v2"
    listed = {
        t["publicPort"]: t["proxyProtocol"] for t in (await api.get("/api/tunnels")).json()["items"]
    }
    assert listed == {2222: None, 2223: "v1", 5353: "v2"}


REFUSED = {
    "v1 on udp": ({**UDP, "proxyProtocol": "v1"}, "no UDP form"),
    "v2 on http": (
        {"domain": "a.example.com", "target": "127.0.0.1:80", "agent": "a", "proxyProtocol": "v2"},
        "tcp and udp tunnels",
    ),
    "v3": ({**TCP, "proxyProtocol": "v3"}, "proxyProtocol"),
    "a number": ({**TCP, "proxyProtocol": 2}, "proxyProtocol"),
    "upper case": ({**TCP, "proxyProtocol": "V1"}, "proxyProtocol"),
    "off as a word": ({**TCP, "proxyProtocol": "off"}, "proxyProtocol"),
}


async def test_bad_values_are_422_with_the_reason(api: httpx.AsyncClient) -> None:
    await create(api, "agent", "a")
    for name, (body, reason) in REFUSED.items():
        error = assert_error(await api.post("/api/tunnels", json=body), 422, "validation_failed")
        text = error["message"] + " ".join(f"{d['field']} {d['message']}" for d in error["details"])
        assert reason in text, (name, error)
    assert (await api.get("/api/tunnels")).json()["total"] == 0


async def test_updates_keep_the_rule(api: httpx.AsyncClient) -> None:
    await create(api, "agent", "a")
    tunnel = (await api.post("/api/tunnels", json={**TCP, "proxyProtocol": "v1"})).json()
    url = f"/api/tunnels/{tunnel['id']}"
    # a change of something else keeps it
    kept = await api.patch(url, json={"target": "127.0.0.1:2022"})
    assert kept.json()["proxyProtocol"] == "v1", kept.text
    assert (await api.patch(url, json={"proxyProtocol": "v2"})).json()["proxyProtocol"] == "v2"
    assert (await api.patch(url, json={"proxyProtocol": None})).json()["proxyProtocol"] is None
    await api.patch(url, json={"proxyProtocol": "v1"})
    # the tunnel's new protocol must take the version it has
    to_udp = await api.patch(url, json={"protocol": "udp"})
    assert to_udp.status_code == 422 and "no UDP form" in to_udp.text, to_udp.text
    to_http = await api.patch(url, json={"protocol": "http", "domain": "b.example.com"})
    assert to_http.status_code == 422 and "tcp and udp" in to_http.text, to_http.text
    both = await api.patch(
        url, json={"protocol": "http", "domain": "b.example.com", "proxyProtocol": None}
    )
    assert both.status_code == 200 and both.json()["proxyProtocol"] is None, both.text
    on_http = await api.patch(url, json={"proxyProtocol": "v2"})
    assert on_http.status_code == 422, on_http.text
    bad = await api.patch(url, json={"proxyProtocol": "v9"})
    assert_error(bad, 422, "validation_failed")
    assert (await api.get(url)).json()["protocol"] == "http"


async def test_openapi_documents_the_field(api: httpx.AsyncClient) -> None:
    schemas = (await api.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("TunnelCreate", "TunnelUpdate", "TunnelOut"):
        field = schemas[name]["properties"]["proxyProtocol"]
        assert "PROXY protocol" in json.dumps(field), (name, field)
    choices = json.dumps(schemas["TunnelCreate"]["properties"]["proxyProtocol"])
    assert '"v1"' in choices and '"v2"' in choices


async def test_pushed_to_the_agent_and_the_gateways(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "a")
    gateway = await create(api, "gateway", "edge")
    peer_a = await connect_client(control, agent["apiKey"], "agent", 1)
    peer_g = await connect_client(control, gateway["apiKey"], "gateway", 2)
    try:
        tunnel = (await api.post("/api/tunnels", json={**UDP, "proxyProtocol": "v2"})).json()
        for peer in (peer_a, peer_g):
            frame = await peer.expect("tunnel_create")
            spec = protocol.parse_tunnel(frame["data"])
            assert spec.id == tunnel["id"] and spec.proxy_protocol == "v2"
        await api.patch(f"/api/tunnels/{tunnel['id']}", json={"proxyProtocol": None})
        for peer in (peer_a, peer_g):
            frame = await peer.expect("tunnel_update")
            assert frame["data"]["proxyProtocol"] is None
            assert protocol.parse_tunnel(frame["data"]).proxy_protocol is None
        # and in the full snapshot a reconnecting client gets
        await api.patch(f"/api/tunnels/{tunnel['id']}", json={"proxyProtocol": "v2"})
        await peer_g.expect("tunnel_update")
        await peer_g.heartbeat(version=0)  # stale: a full config comes back
        config = await peer_g.expect("config")
        [wire] = config["data"]["tunnels"]
        assert protocol.parse_tunnel(wire).proxy_protocol == "v2"
    finally:
        await peer_a.close()
        await peer_g.close()


async def admin(control: RunningControl, *args: str) -> tuple[int, str, str]:
    """The admin CLI as a process (async: the Control it talks to runs in this loop)."""
    env = {
        **os.environ,
        "KAKUREMICHI_CONTROL_URL": control.url,
        "KAKUREMICHI_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakuremichi.cli",
        "admin",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_admin_cli(control: RunningControl, api: httpx.AsyncClient) -> None:
    await create(api, "agent", "laptop")
    raw = ("--agent", "laptop", "--target", "127.0.0.1:22", "--json")
    code, out, err = await admin(
        control, "tunnel", "create", "--protocol", "tcp", "--public-port", "2222",
        "--proxy-protocol", "v2", *raw,
    )  # fmt: skip
    assert code == 0, err
    tunnel: dict[str, Any] = json.loads(out)
    assert tunnel["proxyProtocol"] == "v2"
    code, out, err = await admin(
        control, "tunnel", "update", tunnel["id"], "--proxy-protocol", "v1"
    )
    assert code == 0 and "proxyProtocol: v1" in out, err
    code, out, err = await admin(
        control, "tunnel", "update", tunnel["id"], "--proxy-protocol", "off", "--json"
    )
    assert code == 0 and json.loads(out)["proxyProtocol"] is None, err
    code, out, err = await admin(
        control, "tunnel", "create", "--protocol", "udp", "--public-port", "53",
        "--proxy-protocol", "v1", *raw,
    )  # fmt: skip
    assert code == 1 and "422" in err and "no UDP form" in err and "Traceback" not in err
    code, out, err = await admin(
        control, "tunnel", "create", "--protocol", "tcp", "--public-port", "2223",
        "--proxy-protocol", "v3", *raw,
    )  # fmt: skip
    assert code == 2 and "--proxy-protocol" in err  # argparse names the choices
    code, out, _ = await admin(control, "tunnel", "create", "--help")
    assert code == 0 and "--proxy-protocol {v1,v2,off}" in out and "PROXY protocol" in out
