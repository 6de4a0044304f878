"""REST API against a real uvicorn server: CRUD, validation, conflicts, auth, paging."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from typing import Any
from unittest.mock import ANY

import httpx
import pytest

from gateway.tls import self_signed
from tests.controlserver import RunningControl, create


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


async def test_admin_token_is_required_everywhere(control: RunningControl) -> None:
    async with (
        control.api(token=None) as anonymous,
        control.api(token="wrong-token-xxxxxxxx") as wrong,
    ):
        for client in (anonymous, wrong):
            for method, path in [
                ("GET", "/api/agents"),
                ("POST", "/api/tunnels"),
                ("GET", "/api/certificates"),
                ("DELETE", "/api/gateways/x"),
                ("GET", "/api/nothing-here"),
            ]:
                response = await client.request(method, path)
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/openapi.json")).json()["openapi"].startswith("3.1")


async def test_agent_crud_and_key_shown_once(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    agent = await create(api, "agent", "laptop")
    assert agent["apiKey"].startswith("agt_") and len(agent["apiKey"]) >= 4 + 43
    assert agent["subnet"] == "100.64.0.0/24" and agent["virtualIp"] == "100.64.0.100"
    assert agent["online"] is False and agent["publicKey"] is None
    fetched = (await api.get(f"/api/agents/{agent['id']}")).json()
    assert "apiKey" not in fetched
    by_name = (await api.get("/api/agents/laptop")).json()
    assert by_name["id"] == agent["id"]
    renamed = await api.patch("/api/agents/laptop", json={"name": "laptop-2"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "laptop-2"
    rotated = (await api.post("/api/agents/laptop-2/rotate-key")).json()
    assert rotated["apiKey"].startswith("agt_") and rotated["apiKey"] != agent["apiKey"]
    assert (await api.delete("/api/agents/laptop-2")).status_code == 204
    assert_error(await api.get(f"/api/agents/{agent['id']}"), 404, "not_found")
    # Only a hash of the key is in the database, never the key itself.
    with sqlite3.connect(control.db_path) as db:
        dump = "\n".join(db.iterdump())
    assert agent["apiKey"] not in dump and rotated["apiKey"] not in dump
    assert hashlib.sha256(agent["apiKey"].encode()).hexdigest() not in dump  # row deleted


async def test_gateway_slots_and_keys(api: httpx.AsyncClient) -> None:
    first = await create(api, "gateway", "edge-1")
    second = await create(api, "gateway", "edge-2")
    assert first["apiKey"].startswith("gtw_") and (first["slot"], second["slot"]) == (1, 2)
    await api.delete("/api/gateways/edge-1")
    third = await create(api, "gateway", "edge-3")
    assert third["slot"] == 1  # freed slot reused
    assert_error(await api.post("/api/gateways", json={"name": "edge-2"}), 409, "conflict")


async def test_concurrent_agent_creates_get_distinct_subnets(api: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(api.post("/api/agents", json={"name": f"a{i}"}) for i in range(25))
    )
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    subnets = {r.json()["subnet"] for r in responses}
    addresses = {r.json()["virtualIp"] for r in responses}
    assert len(subnets) == 25 and len(addresses) == 25
    assert subnets == {f"100.64.{i}.0/24" for i in range(25)}


async def test_pool_exhaustion_is_a_clear_409(tmp_path: Any) -> None:
    server = RunningControl(tmp_path / "small.db", address_pool="10.99.0.0/23", agent_prefix=24)
    await server.start()
    try:
        async with server.api() as api:
            await create(api, "agent", "one")
            await create(api, "agent", "two")
            error = assert_error(await api.post("/api/agents", json={"name": "three"}), 409)
            assert "no free /24" in error["message"]
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"domain": "app.example.com", "target": "127.0.0.1:8080"}, "agent"),
        ({"domain": "not a domain", "target": "127.0.0.1:8080", "agent": "a"}, "domain"),
        ({"domain": "nodot", "target": "127.0.0.1:8080", "agent": "a"}, "domain"),
        ({"domain": "-bad.example.com", "target": "127.0.0.1:8080", "agent": "a"}, "domain"),
        ({"domain": "1.2.3.4", "target": "127.0.0.1:8080", "agent": "a"}, "domain"),
        ({"domain": "a.example.com", "target": "127.0.0.1", "agent": "a"}, "body"),
        ({"domain": "a.example.com", "target": "127.0.0.1:0", "agent": "a"}, "body"),
        ({"domain": "a.example.com", "target": "127.0.0.1:70000", "agent": "a"}, "body"),
        ({"domain": "a.example.com", "target": "ftp://x.example.com", "agent": "a"}, "body"),
        ({"domain": "a.example.com", "target": "::1:80", "agent": "a"}, "body"),
        ({"domain": "a.example.com", "target": "999.1.1.1:80", "agent": "a"}, "body"),
        # digits that int() takes but no URL parser should: ASCII only
        ({"domain": "a.example.com", "target": "127.0.0.1:\u0668\u0660", "agent": "a"}, "body"),
        (
            {"domain": "a.example.com", "target": "http://h.example:\uff18\uff10", "agent": "a"},
            "body",
        ),
        ({"protocol": "tcp", "target": "127.0.0.1:22", "agent": "a"}, "body"),
        (
            {"protocol": "tcp", "publicPort": 0, "target": "127.0.0.1:22", "agent": "a"},
            "publicPort",
        ),
        (
            {"protocol": "tcp", "publicPort": 65536, "target": "127.0.0.1:22", "agent": "a"},
            "publicPort",
        ),
        (
            {"protocol": "tcp", "publicPort": 2222, "target": "http://x.example.com", "agent": "a"},
            "body",
        ),
        (
            {
                "protocol": "http",
                "domain": "a.example.com",
                "publicPort": 80,
                "target": "h:1",
                "agent": "a",
            },
            "body",
        ),
        ({"protocol": "ssh", "domain": "a.example.com", "target": "h:1", "agent": "a"}, "protocol"),
        ({"domain": "a.example.com", "target": "h:1", "agent": "a", "extra": 1}, "extra"),
        ({"domain": "a.example.com", "target": "h:1", "agent": "a", "enabled": "yes"}, "enabled"),
    ],
)
async def test_tunnel_validation(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    await create(api, "agent", "a")
    error = assert_error(await api.post("/api/tunnels", json=body), 422, "validation_failed")
    assert error["details"], error
    assert any(d["field"].split(".")[0] == field for d in error["details"]), error


async def test_tunnel_crud_conflicts_and_paging(api: httpx.AsyncClient) -> None:
    await create(api, "agent", "a")
    await create(api, "agent", "b")
    web = await api.post(
        "/api/tunnels",
        json={"domain": "App.Example.com", "target": "http://127.0.0.1:8080/", "agent": "a"},
    )
    assert web.status_code == 201, web.text
    tunnel = web.json()
    assert tunnel["domain"] == "app.example.com" and tunnel["agentIp"] == "100.64.0.100"
    assert_error(
        await api.post(
            "/api/tunnels", json={"domain": "app.example.com", "target": "h:1", "agent": "b"}
        ),
        409,
        "conflict",
    )
    ssh = await api.post(
        "/api/tunnels",
        json={"protocol": "tcp", "publicPort": 2222, "target": "[::1]:22", "agent": "b"},
    )
    assert ssh.status_code == 201, ssh.text
    assert_error(
        await api.post(
            "/api/tunnels",
            json={"protocol": "tcp", "publicPort": 2222, "target": "h:1", "agent": "a"},
        ),
        409,
    )
    udp = await api.post(
        "/api/tunnels", json={"protocol": "udp", "publicPort": 2222, "target": "h:53", "agent": "a"}
    )
    assert udp.status_code == 201  # same number, other protocol
    for i in range(7):
        r = await api.post(
            "/api/tunnels", json={"domain": f"s{i}.example.com", "target": "h:1", "agent": "a"}
        )
        assert r.status_code == 201
    page = (await api.get("/api/tunnels", params={"limit": 4, "offset": 8})).json()
    assert (
        page["total"] == 10
        and page["limit"] == 4
        and page["offset"] == 8
        and len(page["items"]) == 2
    )
    everything = []
    for offset in range(0, 10, 3):
        everything += (await api.get("/api/tunnels", params={"limit": 3, "offset": offset})).json()[
            "items"
        ]
    assert len({t["id"] for t in everything}) == 10
    mine = (await api.get("/api/tunnels", params={"agent": "b"})).json()
    assert [t["id"] for t in mine["items"]] == [ssh.json()["id"]]
    assert_error(await api.get("/api/tunnels", params={"limit": 0}), 422)
    assert_error(await api.get("/api/tunnels", params={"limit": "x"}), 422)
    assert_error(await api.get("/api/tunnels", params={"agent": "zzz"}), 404)

    changed = await api.patch(f"/api/tunnels/{tunnel['id']}", json={"enabled": False, "agent": "b"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["enabled"] is False and changed.json()["agentName"] == "b"
    assert_error(
        await api.patch(f"/api/tunnels/{tunnel['id']}", json={"domain": "s1.example.com"}), 409
    )
    assert_error(await api.patch(f"/api/tunnels/{tunnel['id']}", json={"publicPort": 80}), 422)
    assert_error(await api.patch(f"/api/tunnels/{tunnel['id']}", json={"target": None}), 422)
    assert_error(await api.patch(f"/api/tunnels/{tunnel['id']}", json={"protocol": "tcp"}), 422)
    moved = await api.patch(
        f"/api/tunnels/{tunnel['id']}",
        json={"protocol": "tcp", "publicPort": 8443, "target": "127.0.0.1:443"},
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["domain"] is None and moved.json()["publicPort"] == 8443
    assert (await api.delete(f"/api/tunnels/{tunnel['id']}")).status_code == 204
    assert_error(await api.delete(f"/api/tunnels/{tunnel['id']}"), 404)
    # Deleting an agent deletes its tunnels.
    await api.delete("/api/agents/a")
    left = (await api.get("/api/tunnels")).json()
    assert {t["agentName"] for t in left["items"]} == {"b"}


async def test_malformed_bodies(api: httpx.AsyncClient) -> None:
    assert_error(await api.post("/api/agents", content=b"{nope"), 400, "malformed_json")
    assert_error(await api.post("/api/agents", content=b"[1,2]"), 422)
    assert_error(await api.post("/api/agents", content=b""), 422)
    assert_error(await api.post("/api/agents", json={"name": "UPPER"}), 422)
    assert_error(await api.post("/api/agents", json={"name": "x" * 64}), 422)
    assert_error(await api.post("/api/agents", content=b"\xff\xfe"), 400)
    assert_error(await api.post("/api/agents", content=b"[" * 100000), 400)
    assert_error(await api.post("/api/agents", content=b'{"name":"' + b"a" * 300_000 + b'"}'), 413)
    assert_error(await api.put("/api/agents"), 405, "method_not_allowed")


def _self_signed(domain: str) -> tuple[str, str]:
    cert = self_signed(domain, days=30)
    return cert.chain_pem, cert.key_pem


async def test_certificates(api: httpx.AsyncClient) -> None:
    cert, key = _self_signed("app.example.com")
    other_cert, other_key = _self_signed("other.example.com")
    created = await api.post(
        "/api/certificates",
        json={"domain": "app.example.com", "certificate": cert, "privateKey": key},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert (
        "privateKey" not in body and body["source"] == "manual" and body["notAfter"].endswith("Z")
    )
    assert_error(
        await api.post(
            "/api/certificates",
            json={"domain": "app.example.com", "certificate": cert, "privateKey": key},
        ),
        409,
    )
    mismatch = await api.post(
        "/api/certificates",
        json={"domain": "other.example.com", "certificate": other_cert, "privateKey": key},
    )
    assert_error(mismatch, 422, "invalid_certificate")
    wrong_name = await api.post(
        "/api/certificates",
        json={"domain": "third.example.com", "certificate": other_cert, "privateKey": other_key},
    )
    assert "does not cover" in assert_error(wrong_name, 422)["message"]
    garbage = await api.post(
        "/api/certificates",
        json={"domain": "x.example.com", "certificate": "junk", "privateKey": "junk"},
    )
    assert_error(garbage, 422, "invalid_certificate")
    new_cert, new_key = _self_signed("app.example.com")
    updated = await api.patch(
        "/api/certificates/app.example.com", json={"certificate": new_cert, "privateKey": new_key}
    )
    assert updated.status_code == 200 and updated.json()["certificate"] == new_cert
    listing = (await api.get("/api/certificates")).json()
    assert listing["total"] == 1 and "privateKey" not in listing["items"][0]
    assert (await api.delete("/api/certificates/app.example.com")).status_code == 204


async def test_generated_admin_token_is_printed_once(tmp_path: Any) -> None:
    first = RunningControl(tmp_path / "gen.db", admin_token=None)
    await first.start()
    try:
        tokens = [a for a in first.announced if "admin token" in a]
        assert len(tokens) == 1
        token = tokens[0].split("\n")[1].strip()
        assert token.startswith("adm_")
        async with first.api(token) as api:
            assert (await api.get("/api/agents")).status_code == 200
    finally:
        await first.stop()
    second = RunningControl(tmp_path / "gen.db", admin_token=None)
    await second.start()
    try:
        # not generated (or shown) again (the dashboard's setup link is, no admin user yet)
        assert [a for a in second.announced if "admin token" in a] == []
        async with second.api(token) as api:
            assert (await api.get("/api/agents")).status_code == 200
    finally:
        await second.stop()
    with sqlite3.connect(tmp_path / "gen.db") as db:
        assert token not in "\n".join(db.iterdump())


async def test_numbers_no_field_can_hold_are_refused_not_500(api: httpx.AsyncClient) -> None:
    """Integers of thousands of digits and 1e400 in bodies: 422 naming the field; NaN
    (not JSON): 400 malformed_json (they used to be 500s); paging parameters with
    non-ASCII or too many digits: 422."""
    agent = await create(api, "agent", "numbers")
    tunnel = (
        await api.post(
            "/api/tunnels",
            json={"domain": "n.example.com", "target": "127.0.0.1:80", "agent": agent["id"]},
        )
    ).json()
    big = "9" * 5000
    bodies = [
        ('{"name": "x", "extra": ' + big + "}", "extra"),
        (
            '{"protocol": "tcp", "target": "127.0.0.1:80", "agent": "numbers", "publicPort": -'
            + big
            + "}",
            "publicPort",
        ),
        (
            '{"protocol": "tcp", "target": "127.0.0.1:80", "agent": "numbers", "publicPort": 1e400}',
            "publicPort",
        ),
        ('{"replicas": [{"agent": "numbers", "weight": 1' + "0" * 30 + "}]}", "replicas[0].weight"),
        ('{"enabled": NaN}', None),
    ]
    for method, path in [
        ("POST", "/api/agents"),
        ("POST", "/api/tunnels"),
        ("PATCH", f"/api/tunnels/{tunnel['id']}"),
        ("PATCH", f"/api/agents/{agent['id']}"),
        ("POST", "/api/certificates"),
    ]:
        for body, field in bodies:
            response = await api.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
            if field is None:
                error = assert_error(response, 400, "malformed_json")
            else:
                error = assert_error(response, 422, "validation_failed")
                assert error["details"] == [{"field": field, "message": ANY}]
            assert big not in error["message"]
    for path in ("/api/agents", "/api/tunnels", "/api/certificates"):
        for query in ("limit=\u00b2", "limit=\u0665", "offset=" + big, "offset=" + "0" * 13):
            error = assert_error(await api.get(f"{path}?{query}"), 422, "validation_failed")
            assert error["details"][0]["field"] in ("limit", "offset")


async def test_a_stored_time_no_clock_can_show_does_not_break_listing(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    cert, key = _self_signed("clock.example.com")
    created = await api.post(
        "/api/certificates",
        json={"domain": "clock.example.com", "certificate": cert, "privateKey": key},
    )
    assert created.status_code == 201, created.text
    with sqlite3.connect(control.db_path) as db:  # as an older version could have stored
        db.execute("UPDATE certificates SET not_after = 1e300")
    listing = await api.get("/api/certificates")
    assert listing.status_code == 200, listing.text
    assert listing.json()["items"][0]["notAfter"] is None


async def test_names_cannot_take_the_shape_of_an_id(api: httpx.AsyncClient) -> None:
    """/api/agents/{ref} takes an id or a name: a name equal to another agent's id would
    make the reference ambiguous, so no name may look like an id."""
    first = await create(api, "agent", "first")
    for kind in ("agents", "gateways"):
        refused = await api.post(f"/api/{kind}", json={"name": first["id"]})
        error = assert_error(refused, 422, "validation_failed")
        assert error["details"][0]["field"] == "name" and "shape of an id" in error["message"]
    renamed = await api.patch("/api/agents/first", json={"name": first["id"]})
    assert_error(renamed, 422, "validation_failed")
    # a near miss is an ordinary name
    near = first["id"][:-1]
    assert (await api.post("/api/agents", json={"name": near})).status_code == 201
    assert (await api.get(f"/api/agents/{first['id']}")).json()["name"] == "first"


async def test_internationalised_domains_are_stored_as_a_labels(api: httpx.AsyncClient) -> None:
    """What the router and ACME match is what clients send: A-labels, lower case, no
    trailing dot; names that IDNA refuses are a 422 on the domain field."""
    await create(api, "agent", "idn")
    made = await api.post(
        "/api/tunnels",
        json={"domain": "Caf\u00e9.Example.com.", "target": "127.0.0.1:80", "agent": "idn"},
    )
    assert made.status_code == 201, made.text
    assert made.json()["domain"] == "xn--caf-dma.example.com"
    again = await api.post(
        "/api/tunnels",
        json={"domain": "xn--caf-dma.example.com", "target": "127.0.0.1:80", "agent": "idn"},
    )
    assert_error(again, 409)  # the same name, however written
    for bad in ("\u2603.example.com", "a\u200d.example.com", "xn--zz.example.com"):
        refused = await api.post(
            "/api/tunnels", json={"domain": bad, "target": "127.0.0.1:80", "agent": "idn"}
        )
        assert assert_error(refused, 422)["details"][0]["field"] == "domain"
