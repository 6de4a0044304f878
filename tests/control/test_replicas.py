"""A tunnel served by several agents (issue 17) in Control: created, shown, changed and
drained through the REST API, stored with each replica's health and presence, and
pushed as ``TunnelSpec.replicas`` to every gateway and to each replica's agent (a
replica that leaves the set gets ``tunnel_delete``); a single-agent tunnel looks as it
always did."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from common import protocol
from kakuremichi import cli
from tests.control.test_api import assert_error
from tests.control.web.test_pages import client as web_client
from tests.control.web.test_pages import csrf_of, sign_up
from tests.controlserver import ADMIN_TOKEN, Peer, RunningControl, connect_client, create
from tests.pgserver import PostgresServer, postgres

__all__ = ["postgres"]

HTTP = {"domain": "app.example.com", "target": "127.0.0.1:8080"}
TWO = [{"agent": "a"}, {"agent": "b", "weight": 3, "role": "standby"}]


def _states(tunnel: dict[str, Any]) -> dict[str, str]:
    return {r["agentName"]: r["state"] for r in tunnel["replicas"]}


async def admin(control: RunningControl, *args: str) -> tuple[int, str, str]:
    """The admin CLI in this process (a thread: the Control it talks to runs in this
    loop), much faster than a process per call; the CLI as a process is
    test_tunnel_proxy_protocol's."""

    def call() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        env = {"KAKUREMICHI_CONTROL_URL": control.url, "KAKUREMICHI_ADMIN_TOKEN": ADMIN_TOKEN}
        with (
            mock.patch.dict(os.environ, env),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = cli.main(["admin", *args])
            except SystemExit as exc:  # argparse: usage errors
                code = exc.code if isinstance(exc.code, int) else 2
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(call)


async def _no_tunnel_frame(peer: Peer, wait: float) -> None:
    """No tunnel_* frame within ``wait`` seconds (the config push the agents' new keys
    cause may come at any moment: it is skipped)."""
    deadline = asyncio.get_running_loop().time() + wait
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            frame = await peer.recv(left)
        except TimeoutError:
            return
        assert not frame["type"].startswith("tunnel_"), frame


async def test_created_shown_listed_and_validated(api: httpx.AsyncClient) -> None:
    for name in ("a", "b", "c"):
        await create(api, "agent", name)
    single = await api.post("/api/tunnels", json={**HTTP, "agent": "a"})
    assert single.status_code == 201, single.text
    body = single.json()
    assert body["balance"] == "round_robin" and body["sticky"] is None
    assert [(r["agentName"], r["weight"], r["role"]) for r in body["replicas"]] == [
        ("a", 1, "active")
    ]
    made = await api.post(
        "/api/tunnels",
        json={
            **HTTP,
            "domain": "ha.example.com",
            "replicas": TWO,
            "balance": "least_connections",
            "sticky": "cookie",
        },
    )
    assert made.status_code == 201, made.text
    tunnel = made.json()
    assert tunnel["agentName"] == "a"  # the first replica is the one older gateways use
    assert [(r["agentName"], r["weight"], r["role"]) for r in tunnel["replicas"]] == [
        ("a", 1, "active"),
        ("b", 3, "standby"),
    ]
    assert _states(tunnel) == {"a": "unknown", "b": "standby"}
    assert tunnel["balance"] == "least_connections" and tunnel["sticky"] == "cookie"
    # agent names the primary among the replicas
    primary_b = await api.post(
        "/api/tunnels", json={**HTTP, "domain": "b.example.com", "agent": "b", "replicas": TWO}
    )
    assert primary_b.json()["agentName"] == "b", primary_b.text
    # a tunnel is listed under each of its agents
    listed = (await api.get("/api/tunnels", params={"agent": "b"})).json()
    assert {t["domain"] for t in listed["items"]} == {"ha.example.com", "b.example.com"}
    refused = {
        "no agent": {**HTTP, "domain": "x.example.com"},
        "agent not a replica": {**HTTP, "domain": "x.example.com", "agent": "c", "replicas": TWO},
        "twice": {**HTTP, "domain": "x.example.com", "replicas": [{"agent": "a"}, {"agent": "a"}]},
        "empty": {**HTTP, "domain": "x.example.com", "replicas": []},
        "weight 0": {**HTTP, "domain": "x.example.com", "replicas": [{"agent": "a", "weight": 0}]},
        "role": {**HTTP, "domain": "x.example.com", "replicas": [{"agent": "a", "role": "spare"}]},
        "balance": {**HTTP, "domain": "x.example.com", "agent": "a", "balance": "random"},
        "cookie on tcp": {
            "protocol": "tcp",
            "publicPort": 2222,
            "target": "127.0.0.1:22",
            "replicas": TWO,
            "sticky": "cookie",
        },
        "65 replicas": {
            **HTTP,
            "domain": "x.example.com",
            "replicas": [{"agent": f"n{i}"} for i in range(65)],
        },
    }
    for name, body in refused.items():
        response = await api.post("/api/tunnels", json=body)
        assert response.status_code == 422, (name, response.text)
    unknown = await api.post(
        "/api/tunnels", json={**HTTP, "domain": "x.example.com", "replicas": [{"agent": "zz"}]}
    )
    assert unknown.status_code == 404, unknown.text
    assert (await api.get("/api/tunnels")).json()["total"] == 3


async def test_changes_drain_and_agent_deletion(api: httpx.AsyncClient) -> None:
    for name in ("a", "b", "c"):
        await create(api, "agent", name)
    tunnel = (await api.post("/api/tunnels", json={**HTTP, "replicas": TWO})).json()
    url = f"/api/tunnels/{tunnel['id']}"
    # agent alone cannot change a replicated tunnel
    alone = await api.patch(url, json={"agent": "c"})
    assert alone.status_code == 422 and "replicas" in alone.text, alone.text
    drained = await api.post(f"{url}/replicas/b/drain")
    assert drained.status_code == 200 and _states(drained.json())["b"] == "draining"
    # a new set keeps a staying agent's draining flag; the primary stays if it stays
    changed = await api.patch(url, json={"replicas": [{"agent": "c"}, {"agent": "b"}]})
    assert changed.status_code == 200, changed.text
    after = changed.json()
    assert after["agentName"] == "c"  # a left the set: the first of the new one
    assert _states(after) == {"c": "unknown", "b": "draining"}
    undrained = await api.post(f"{url}/replicas/b/undrain")
    assert _states(undrained.json())["b"] == "unknown"
    assert (await api.post(f"{url}/replicas/a/drain")).status_code == 404  # not a replica
    assert (await api.post(f"{url}/replicas/zz/drain")).status_code == 404
    # deleting the primary's agent hands the tunnel to another replica
    assert (await api.delete("/api/agents/c")).status_code == 204
    kept = (await api.get(url)).json()
    assert kept["agentName"] == "b" and [r["agentName"] for r in kept["replicas"]] == ["b"]
    # back to one agent
    one = await api.patch(url, json={"replicas": [{"agent": "a"}]})
    assert one.status_code == 200 and [r["agentName"] for r in one.json()["replicas"]] == ["a"]
    single = (
        await api.post("/api/tunnels", json={**HTTP, "domain": "s.example.com", "agent": "a"})
    ).json()
    refused = await api.post(f"/api/tunnels/{single['id']}/replicas/a/drain")
    assert_error(refused, 409, "conflict")
    assert "one agent" in refused.json()["error"]["message"]


async def test_pushed_to_each_replica_and_the_gateways(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    a = await create(api, "agent", "a")
    b = await create(api, "agent", "b")
    gateway = await create(api, "gateway", "edge")
    peer_a = await connect_client(control, a["apiKey"], "agent", 1)
    peer_b = await connect_client(control, b["apiKey"], "agent", 2)
    peer_g = await connect_client(control, gateway["apiKey"], "gateway", 3)
    try:
        tunnel = (
            await api.post("/api/tunnels", json={**HTTP, "replicas": TWO, "sticky": "cookie"})
        ).json()
        for peer in (peer_a, peer_b, peer_g):
            spec = protocol.parse_tunnel((await peer.expect("tunnel_create"))["data"])
            assert spec.id == tunnel["id"] and spec.sticky == "cookie"
            assert [(r.agent_id, r.weight, r.role) for r in spec.replicas] == [
                (a["id"], 1, "active"),
                (b["id"], 3, "standby"),
            ]
        # b's target check fails: the gateways hear it
        await peer_b.send(
            "status",
            {"tunnels": [{"tunnelId": tunnel["id"], "health": "unhealthy", "detail": "refused"}]},
        )
        spec = protocol.parse_tunnel((await peer_g.expect("tunnel_update"))["data"])
        assert {r.agent_id: r.health for r in spec.replicas}[b["id"]] == "unhealthy"
        await peer_b.send(  # the same again changes nothing: nothing pushed
            "status",
            {"tunnels": [{"tunnelId": tunnel["id"], "health": "unhealthy", "detail": "refused"}]},
        )
        await _no_tunnel_frame(peer_g, 0.3)
        # b leaves Control: offline at the gateways; back: unknown until it reports
        await peer_b.close()
        spec = protocol.parse_tunnel((await peer_g.expect("tunnel_update"))["data"])
        assert {r.agent_id: r.health for r in spec.replicas}[b["id"]] == "offline"
        shown = (await api.get(f"/api/tunnels/{tunnel['id']}")).json()
        assert _states(shown)["b"] == "offline"
        peer_b = await connect_client(control, b["apiKey"], "agent", 2)
        spec = protocol.parse_tunnel((await peer_g.expect("tunnel_update"))["data"])
        assert {r.agent_id: r.health for r in spec.replicas}[b["id"]] == "unknown"
        # drained: the gateways hear it, the agent keeps serving its connections
        await api.post(f"/api/tunnels/{tunnel['id']}/replicas/b/drain")
        spec = protocol.parse_tunnel((await peer_g.expect("tunnel_update"))["data"])
        assert {r.agent_id: r.draining for r in spec.replicas}[b["id"]] is True
        for peer in (peer_a, peer_b):  # both agents serve it: both hear
            await peer.expect("tunnel_update")
        # b leaves the set: it is told to delete the tunnel, a and the gateway get it
        # with one agent, in the frame an older gateway always got
        await api.patch(f"/api/tunnels/{tunnel['id']}", json={"replicas": [{"agent": "a"}]})
        deleted = await peer_b.expect("tunnel_delete")
        assert deleted["data"]["id"] == tunnel["id"]
        for peer in (peer_a, peer_g):
            wire = (await peer.expect("tunnel_update"))["data"]
            assert "replicas" not in wire or wire["replicas"] == []
        # a full config holds the replicated tunnel for each of its agents
        await api.patch(f"/api/tunnels/{tunnel['id']}", json={"replicas": TWO})
        await peer_b.expect("tunnel_create")
        await peer_b.heartbeat(version=0)
        config = await peer_b.expect("config")
        assert [t["id"] for t in config["data"]["tunnels"]] == [tunnel["id"]]
    finally:
        for peer in (peer_a, peer_b, peer_g):
            await peer.close()


async def test_openapi_documents_replicas(api: httpx.AsyncClient) -> None:
    schemas = (await api.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("TunnelCreate", "TunnelUpdate", "TunnelOut"):
        assert {"replicas", "balance", "sticky"} <= set(schemas[name]["properties"]), name
    paths = (await api.get("/openapi.json")).json()["paths"]
    assert "/api/tunnels/{id}/replicas/{agent}/drain" in paths


async def test_admin_cli_replicas_and_drain(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    for name in ("a", "b"):
        await create(api, "agent", name)
    code, out, err = await admin(
        control,
        "tunnel",
        "create",
        "--domain",
        "cli.example.com",
        "--target",
        "127.0.0.1:8080",
        "--replica",
        "a",
        "--replica",
        "b:3:standby",
        "--sticky",
        "client_ip",
    )
    assert code == 0, err
    tunnel = (await api.get("/api/tunnels")).json()["items"][0]
    assert [(r["agentName"], r["weight"], r["role"]) for r in tunnel["replicas"]] == [
        ("a", 1, "active"),
        ("b", 3, "standby"),
    ]
    assert tunnel["sticky"] == "client_ip"
    code, out, err = await admin(control, "tunnel", "drain", tunnel["id"], "--agent", "b")
    assert code == 0, err
    assert "b" in out and "draining" in out
    assert _states((await api.get(f"/api/tunnels/{tunnel['id']}")).json())["b"] == "draining"
    code, out, err = await admin(control, "tunnel", "get", tunnel["id"])
    assert code == 0, err
    assert [line.split()[:4] for line in out.splitlines() if line.startswith("b ")] == [
        ["b", "3", "standby", "draining"]
    ], out
    code, out, err = await admin(control, "tunnel", "undrain", tunnel["id"], "--agent", "b")
    assert code == 0, err
    code, out, err = await admin(control, "tunnel", "list")
    assert code == 0 and "a, b" in out, out
    code, out, err = await admin(
        control,
        "tunnel",
        "create",
        "--domain",
        "x.example.com",
        "--target",
        "127.0.0.1:1",
        "--replica",
        "a:zero",
    )
    assert code == 2 and "--replica" in err, err


async def test_dashboard_shows_replicas_and_pushes_to_each(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    a = await create(api, "agent", "a")
    b = await create(api, "agent", "b")
    tunnel = (await api.post("/api/tunnels", json={**HTTP, "replicas": TWO})).json()
    await api.post(f"/api/tunnels/{tunnel['id']}/replicas/b/drain")
    peer_a = await connect_client(control, a["apiKey"], "agent", 1)
    peer_b = await connect_client(control, b["apiKey"], "agent", 2)
    async with web_client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get(f"/tunnels/{tunnel['id']}")
        assert page.status_code == 200
        states = re.findall(r'data-replica-state="([a-z]+)"', page.text)
        assert states == ["unknown", "draining"], page.text
        # disabled from the dashboard: both replicas' agents hear it, not only the first
        disabled = await browser.post(
            f"/tunnels/{tunnel['id']}/disable", data={"csrf": csrf_of(page.text)}
        )
        assert disabled.status_code == 303, disabled.text
    try:
        for peer in (peer_a, peer_b):
            update = await peer.expect("tunnel_update")
            assert update["data"]["id"] == tunnel["id"] and update["data"]["enabled"] is False
    finally:
        for peer in (peer_a, peer_b):
            await peer.close()


async def test_an_agent_joining_the_set_on_another_control_replica(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.database()
    first = await RunningControl(tmp_path / "a.db", database_url=url, replica_timeout=2.0).start()
    second = await RunningControl(tmp_path / "b.db", database_url=url, replica_timeout=2.0).start()
    try:
        async with first.api() as api:
            for name in ("a", "b"):
                await create(api, "agent", name)
            c = await create(api, "agent", "c")
            tunnel = (await api.post("/api/tunnels", json={**HTTP, "replicas": TWO})).json()
            # c is connected to the other replica when the set changes to a and c
            peer_c = await connect_client(second, c["apiKey"], "agent", 3)
            try:
                changed = await api.patch(
                    f"/api/tunnels/{tunnel['id']}",
                    json={"replicas": [{"agent": "a"}, {"agent": "c"}]},
                )
                assert changed.status_code == 200, changed.text
                config = await peer_c.expect("config")
                assert [t["id"] for t in config["data"]["tunnels"]] == [tunnel["id"]]
            finally:
                await peer_c.close()
    finally:
        for server in (second, first):
            await server.stop()
