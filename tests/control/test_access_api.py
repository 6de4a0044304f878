"""Access policies and share links in Control: the REST API (validation, secrets kept
hashed and never shown, the epoch), the push to gateways (typed, parsed as a gateway
parses it, with the session keys), share-link uses reported by a gateway, and the admin
CLI.  The gateway's side is tests/gateway/test_access.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from typing import Any

import httpx
import pytest

from common import protocol as p
from common.passwords import verify_password
from tests.controlserver import ADMIN_TOKEN, RunningControl, connect_client, create


async def http_tunnel(api: httpx.AsyncClient, domain: str = "app.example.com") -> dict[str, Any]:
    await api.post("/api/agents", json={"name": "laptop"})
    response = await api.post(
        "/api/tunnels", json={"domain": domain, "agent": "laptop", "target": "127.0.0.1:8080"}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


POLICY = {
    "ipAllow": ["203.0.113.0/24", "2001:db8::/32"],
    "ipDeny": ["203.0.113.66"],
    "basicAuth": [{"user": "alice", "password": "correct horse"}],
    "password": "2468",
    "oidc": {
        "issuer": "https://idp.example.com",
        "clientId": "kakuremichi",
        "clientSecret": "idp-client-secret",
        "allowedEmails": ["Ann@Example.com"],
        "allowedDomains": ["example.org"],
        "allowedGroups": ["ops"],
    },
    "paths": [
        {"prefix": "/public/", "action": "bypass"},
        {"prefix": "/api/", "action": "bearer", "bearerToken": "a-long-bearer-token-1234"},
    ],
    "sessionDomain": "example.com",
    "sessionTtl": 7200,
}


def gateway_policies(frame: dict[str, Any]) -> p.GatewayConfig:
    return p.parse_gateway_config(frame["data"])


async def test_a_policy_is_stored_hashed_shown_without_secrets_and_pushed(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    tunnel = await http_tunnel(api)
    gateway = await create(api, "gateway", "edge")
    peer = await connect_client(control, gateway["apiKey"], "gateway", 7)
    response = await api.put(f"/api/tunnels/{tunnel['id']}/access", json=POLICY)
    assert response.status_code == 200, response.text
    shown = response.json()
    text = json.dumps(shown)
    for secret in ("2468", "correct horse", "idp-client-secret", "a-long-bearer-token", "argon2"):
        assert secret not in text, secret
    assert shown["password"] is True and shown["basicAuth"] == [{"user": "alice"}]
    assert shown["oidc"]["clientSecretSet"] is True
    assert shown["oidc"]["allowedEmails"] == ["ann@example.com"]
    assert shown["ipDeny"] == ["203.0.113.66/32"] and shown["epoch"] == 1
    config = gateway_policies(await peer.expect("config"))
    (policy,) = config.policies
    assert policy.tunnel_id == tunnel["id"] and policy.epoch == 1
    assert policy.password_hash is not None and verify_password(policy.password_hash, "2468")
    assert verify_password(policy.basic_users[0].hash, "correct horse")
    assert policy.oidc is not None and policy.oidc.client_secret == "idp-client-secret"
    bearer = next(r for r in policy.paths if r.action == "bearer")
    assert bearer.bearer_hash == hashlib.sha256(b"a-long-bearer-token-1234").hexdigest()
    assert len(config.session_keys) == 1 and len(config.session_keys[0].secret) == 32
    await peer.close()


async def test_secrets_left_out_are_kept_and_credentials_move_the_epoch(
    api: httpx.AsyncClient,
) -> None:
    tunnel = await http_tunnel(api)
    path = f"/api/tunnels/{tunnel['id']}/access"
    assert (await api.put(path, json=POLICY)).json()["epoch"] == 1
    keep = {
        **POLICY,
        "ipAllow": ["198.51.100.0/24"],
        "basicAuth": [{"user": "alice"}],
        "oidc": {**POLICY["oidc"], "clientSecret": None},  # type: ignore[dict-item]
        "paths": [{"prefix": "/api/", "action": "bearer"}],
    }
    del keep["password"]
    changed = await api.put(path, json=keep)
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["epoch"] == 1 and body["password"] is True  # nothing secret changed
    assert body["paths"] == [{"prefix": "/api/", "action": "bearer", "bearerTokenSet": True}]
    new_pin = await api.put(path, json={**keep, "password": "1357"})
    assert new_pin.json()["epoch"] == 2
    removed = await api.put(path, json={**keep, "password": None})
    assert removed.json()["password"] is False and removed.json()["epoch"] == 3
    assert (await api.delete(path)).status_code == 204
    assert (await api.get(path)).json()["enabled"] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ipAllow": ["10.0.0.0/33"]}, "ipAllow"),
        ({"basicAuth": [{"user": "bob"}]}, "needs a password"),
        ({"basicAuth": [{"user": "a:b", "password": "x"}]}, "basicAuth"),
        ({"paths": [{"prefix": "/x/", "action": "bearer"}]}, "without a token"),
        ({"paths": [{"prefix": "x", "action": "deny"}]}, "paths"),
        ({"paths": [{"prefix": "/x", "action": "nope"}]}, "paths"),
        ({"sessionDomain": "other.org"}, "not the tunnel's domain"),
        ({"sessionTtl": 10}, "sessionTtl"),
        ({"oidc": {"issuer": "ftp://idp", "clientId": "c"}}, "oidc"),
        ({"oidc": {"issuer": "https://idp", "clientId": "c", "scopes": ["email"]}}, "openid"),
        ({"unknown": 1}, "unknown"),
        ({"password": 1234}, "password"),
    ],
)
async def test_bad_policies_are_422_naming_the_field(
    api: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    tunnel = await http_tunnel(api)
    response = await api.put(f"/api/tunnels/{tunnel['id']}/access", json={"ipDeny": [], **change})
    assert response.status_code == 422, response.text
    assert field in response.text


async def test_raw_tunnels_take_ip_rules_only(api: httpx.AsyncClient) -> None:
    await api.post("/api/agents", json={"name": "laptop"})
    tcp = (
        await api.post(
            "/api/tunnels",
            json={
                "protocol": "tcp",
                "publicPort": 2222,
                "agent": "laptop",
                "target": "127.0.0.1:22",
            },
        )
    ).json()
    path = f"/api/tunnels/{tcp['id']}/access"
    assert (await api.put(path, json={"ipAllow": ["10.0.0.0/8"]})).status_code == 200
    assert (await api.put(path, json={"password": "x"})).status_code == 422
    assert (await api.post(f"/api/tunnels/{tcp['id']}/share-links", json={})).status_code == 422
    assert (await api.put("/api/tunnels/nope/access", json={})).status_code == 404


async def test_share_links_are_shown_once_and_their_uses_counted(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    tunnel = await http_tunnel(api)
    gateway = await create(api, "gateway", "edge")
    peer = await connect_client(control, gateway["apiKey"], "gateway", 7)
    # an empty policy: only share-link holders get in
    assert (await api.put(f"/api/tunnels/{tunnel['id']}/access", json={})).status_code == 200
    await peer.expect("config")
    created = await api.post(
        f"/api/tunnels/{tunnel['id']}/share-links", json={"expiresIn": 3600, "maxUses": 2}
    )
    assert created.status_code == 201, created.text
    link = created.json()
    assert link["url"].startswith("https://app.example.com/.kakuremichi/share#t=")
    token = link["url"].split("#t=", 1)[1]
    listed = (await api.get(f"/api/tunnels/{tunnel['id']}/share-links")).json()["items"]
    assert listed == [{k: v for k, v in link.items() if k != "url"}]
    assert token not in json.dumps(listed)
    # the link makes the policy ask for a sign-in
    config = gateway_policies(await peer.expect("config"))
    (policy,) = config.policies
    (shared,) = policy.share_links
    assert shared.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert shared.uses_left == 2
    await peer.send("share_link_used", {"tunnelId": tunnel["id"], "linkId": link["id"]})
    config = gateway_policies(await peer.expect("config"))
    assert config.policies[0].share_links[0].uses_left == 1
    listed = (await api.get(f"/api/tunnels/{tunnel['id']}/share-links")).json()["items"]
    assert listed[0]["uses"] == 1
    # a use of a link that is gone is counted nowhere and breaks nothing
    await peer.send("share_link_used", {"tunnelId": tunnel["id"], "linkId": "gone"})
    await peer.nothing()
    gone = await api.delete(f"/api/tunnels/{tunnel['id']}/share-links/{link['id']}")
    assert gone.status_code == 204
    config = gateway_policies(await peer.expect("config"))
    assert config.policies == () or config.policies[0].share_links == ()
    await peer.close()


async def test_a_share_link_needs_a_policy_and_goes_with_it(api: httpx.AsyncClient) -> None:
    tunnel = await http_tunnel(api)
    links = f"/api/tunnels/{tunnel['id']}/share-links"
    refused = await api.post(links, json={})
    assert refused.status_code == 422 and "open to anyone" in refused.text
    await api.put(f"/api/tunnels/{tunnel['id']}/access", json={})
    assert (await api.post(links, json={})).status_code == 201
    assert (await api.delete(f"/api/tunnels/{tunnel['id']}/access")).status_code == 204
    assert (await api.get(links)).json()["items"] == []


async def test_deleting_the_tunnel_deletes_its_policy(api: httpx.AsyncClient) -> None:
    tunnel = await http_tunnel(api)
    await api.put(f"/api/tunnels/{tunnel['id']}/access", json={"password": "2468"})
    assert (await api.delete(f"/api/tunnels/{tunnel['id']}")).status_code == 204
    assert (await api.get(f"/api/tunnels/{tunnel['id']}/access")).status_code == 404


def admin(
    control: RunningControl, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", "admin", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "KAKUREMICHI_ADMIN_TOKEN": ADMIN_TOKEN,
            "KAKUREMICHI_CONTROL_URL": control.url,
            "PATH": "/usr/bin:/bin",
        },
    )


async def test_the_admin_cli_sets_shows_and_shares(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    import asyncio

    tunnel = await http_tunnel(api)
    done = await asyncio.to_thread(
        admin,
        control,
        "tunnel",
        "access",
        tunnel["id"],
        "--allow-ip",
        "10.0.0.0/8",
        "--basic-auth",
        "alice:correct horse",
        "--password-stdin",
        "--path",
        "/public/=bypass",
        "--path",
        "/api/=bearer:a-long-bearer-token-1234",
        "--session-ttl",
        "12h",
        stdin="2468\n",
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["password"] is True and shown["sessionTtl"] == 43200
    assert "2468" not in done.stdout and "correct horse" not in done.stdout
    done = await asyncio.to_thread(
        admin, control, "tunnel", "share", tunnel["id"], "--expires", "2h", "--uses", "1"
    )
    assert done.returncode == 0, done.stderr
    assert "/.kakuremichi/share#t=" in done.stdout
    done = await asyncio.to_thread(admin, control, "tunnel", "shares", tunnel["id"])
    assert done.returncode == 0 and "#t=" not in done.stdout
    done = await asyncio.to_thread(
        admin, control, "tunnel", "share", tunnel["id"], "--expires", "soon"
    )
    assert done.returncode == 2 and "--expires" in done.stderr
    done = await asyncio.to_thread(admin, control, "tunnel", "access", tunnel["id"], "--clear")
    assert done.returncode == 0
    assert (await api.get(f"/api/tunnels/{tunnel['id']}/access")).json()["enabled"] is False
