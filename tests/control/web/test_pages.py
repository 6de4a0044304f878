"""The dashboard over HTTP against a real Control: setup link, sign-in, sessions, CSRF,
rate limits, escaping, the audit log (REST changes too), live events, /metrics."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from starlette.requests import Request
from websockets.asyncio.client import connect

from common import protocol
from control.web import session as web
from tests.controlserver import RunningControl, public_key

PASSWORD = "correct horse battery"
XSS = '<img src=x onerror="alert(1)">'


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def setup_path(control: RunningControl) -> str:
    found = re.search(r"(/setup\?token=stp_[A-Za-z0-9_-]+)", "\n".join(control.announced))
    assert found, control.announced
    return found.group(1)


async def sign_up(control: RunningControl, browser: httpx.AsyncClient) -> None:
    page = await browser.get(setup_path(control))
    assert page.status_code == 200
    # the token in the link is never sent to another site (nor is any page's address)
    assert page.headers["referrer-policy"] == "same-origin"
    token = re.search(r'name="token" value="([^"]+)"', page.text)
    assert token
    response = await browser.post(
        "/setup",
        data={
            "csrf": csrf_of(page.text),
            "token": token.group(1),
            "username": "alice",
            "password": PASSWORD,
            "confirm": PASSWORD,
        },
    )
    assert response.status_code == 303 and response.headers["location"] == "/"


def client(control: RunningControl) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=control.url, timeout=10)


async def test_setup_link_sign_in_and_out(control: RunningControl) -> None:
    async with client(control) as browser, client(control) as stranger:
        assert (await browser.get("/")).headers["location"] == "/login"
        login = await browser.get("/login")
        assert "one-time setup link" in login.text
        assert (await browser.get("/setup?token=stp_wrong")).status_code == 403
        await sign_up(control, browser)
        cookie = next(c for c in browser.cookies.jar if c.name == "km_session")
        assert cookie.has_nonstandard_attr("HttpOnly")
        overview = await browser.get("/")
        assert overview.status_code == 200 and "Overview" in overview.text
        csp = overview.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert overview.headers["cache-control"] == "no-store"
        # the link is spent
        again = await stranger.get(setup_path(control))
        assert again.status_code == 200 and "exists already" in again.text
        # a second browser without the cookie sees only the sign-in page
        for path in ("/", "/agents", "/tunnels", "/audit", "/users"):
            response = await stranger.get(path)
            assert response.status_code == 303 and response.headers["location"] == "/login"
        assert (await stranger.get("/events")).status_code == 401
        # sign out ends the session on the server, not only in this browser
        token = cookie.value
        page = await browser.get("/")
        assert (await browser.post("/logout", data={"csrf": csrf_of(page.text)})).status_code == 303
        stranger.cookies.set("km_session", token)
        assert (await stranger.get("/")).headers["location"] == "/login"
        # and signing in works
        login = await browser.get("/login")
        response = await browser.post(
            "/login", data={"csrf": csrf_of(login.text), "username": "alice", "password": PASSWORD}
        )
        assert response.status_code == 303
        assert (await browser.get("/")).status_code == 200


async def test_forms_without_their_csrf_token_are_refused(control: RunningControl) -> None:
    async with client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get("/agents")
        csrf = csrf_of(page.text)
        assert (await browser.post("/agents", data={"name": "a1"})).status_code == 403
        assert (
            await browser.post("/agents", data={"name": "a1", "csrf": "x" + csrf})
        ).status_code == 403
        evil = await browser.post(
            "/agents", data={"name": "a1", "csrf": csrf}, headers={"Origin": "https://evil.example"}
        )
        assert evil.status_code == 403
        assert "a1" not in (await browser.get("/agents")).text
        made = await browser.post("/agents", data={"name": "a1", "csrf": csrf})
        assert made.status_code == 201 and "agt_" in made.text
        # the sign-in form has its own (double-submit) token
        async with client(control) as other:
            await other.get("/login")
            refused = await other.post("/login", data={"username": "alice", "password": PASSWORD})
            assert refused.status_code == 403
        # bad bodies: a clear 4xx, never a 5xx
        assert (
            await browser.post(
                "/agents",
                content=b"\xff\xfe",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
        ).status_code == 400
        assert (
            await browser.post(
                "/agents",
                content=b"x" * 70_000,
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
        ).status_code == 413
        assert (await browser.post("/agents", json={"name": "x"})).status_code == 415


async def test_failed_sign_ins_are_limited(control: RunningControl) -> None:
    async with client(control) as browser:
        await sign_up(control, browser)
    async with client(control) as attacker:
        statuses = []
        for _ in range(11):
            login = await attacker.get("/login")
            response = await attacker.post(
                "/login",
                data={
                    "csrf": csrf_of(login.text),
                    "username": "alice",
                    "password": "wrong password",
                },
            )
            statuses.append(response.status_code)
        assert statuses[:10] == [401] * 10 and statuses[10] == 429
        login = await attacker.get("/login")
        right = await attacker.post(
            "/login", data={"csrf": csrf_of(login.text), "username": "alice", "password": PASSWORD}
        )
        assert right.status_code == 429 and int(right.headers["retry-after"]) > 0
    async with client(control) as scraper:
        metrics = (await scraper.get("/metrics")).text
    assert 'kakuremichi_control_dashboard_logins_total{result="failed"} 10' in metrics
    assert 'kakuremichi_control_dashboard_logins_total{result="limited"} 2' in metrics


async def test_untrusted_text_renders_inert(control: RunningControl) -> None:
    async with client(control) as browser:
        await sign_up(control, browser)
        # a name that breaks the rules is refused and shown back escaped
        page = await browser.get("/agents")
        refused = await browser.post("/agents", data={"csrf": csrf_of(page.text), "name": XSS})
        assert refused.status_code == 422
        assert XSS not in refused.text and "&lt;img src=x onerror=" in refused.text
        made = await browser.post("/agents", data={"csrf": csrf_of(page.text), "name": "laptop"})
        key = re.search(r"(agt_[A-Za-z0-9_-]+)", made.text)
        assert key
        # free text a client reports (its version) and a failed sign-in's user name
        async with connect(control.ws_url) as ws:
            auth = protocol.Auth(key.group(1), "agent", public_key(1), XSS)
            await ws.send(protocol.encode("auth", auth.to_wire()))
            assert json.loads(await ws.recv())["type"] == "auth_success"
            overview = await browser.get("/agents")
        assert XSS not in overview.text and "&lt;img" in overview.text
        async with client(control) as other:
            login = await other.get("/login")
            await other.post(
                "/login", data={"csrf": csrf_of(login.text), "username": XSS, "password": "x"}
            )
        audit = await browser.get("/audit")
        assert "session.login_failed" in audit.text and "<img" not in audit.text


async def test_rest_changes_are_in_the_audit_log(control: RunningControl) -> None:
    async with control.api() as api:
        created = (await api.post("/api/agents", json={"name": "via-api"})).json()
        tunnel = await api.post(
            "/api/tunnels",
            json={"agent": "via-api", "domain": "a.example.com", "target": "127.0.0.1:1"},
        )
        await api.patch(f"/api/tunnels/{tunnel.json()['id']}", json={"enabled": False})
        await api.post("/api/agents/via-api/rotate-key")
        assert (await api.post("/api/agents", json={"name": "BAD NAME"})).status_code == 422
        await api.delete(f"/api/tunnels/{tunnel.json()['id']}")
    async with client(control) as browser:
        await sign_up(control, browser)
        admins = control.app.state.dashboard.admins
        rows, _ = await admins.audit(50, 0)
        token_rows = [r for r in rows if r["actor_kind"] == "token"]
        assert [r["action"] for r in token_rows] == [
            "tunnel.delete",
            "agent.rotate_key",
            "tunnel.update",
            "tunnel.create",
            "agent.create",
        ]
        assert token_rows[-1]["object_id"] == created["id"]
        assert token_rows[-1]["object_name"] == "via-api"
        assert token_rows[-2]["object_name"] == "a.example.com"
        assert all(r["actor"] == "admin-token" and r["address"] == "127.0.0.1" for r in token_rows)
        page = (await browser.get("/audit")).text
        assert "admin-token" in page and created["apiKey"] not in page
        assert "agt_" not in json.dumps(rows)


async def test_live_events_tell_presence(control: RunningControl) -> None:
    async with client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get("/agents")
        made = await browser.post("/agents", data={"csrf": csrf_of(page.text), "name": "laptop"})
        key = re.search(r"(agt_[A-Za-z0-9_-]+)", made.text)
        assert key
        async with browser.stream("GET", "/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 3000"
            async with connect(control.ws_url) as ws:
                auth = protocol.Auth(key.group(1), "agent", public_key(2), "v1")
                await ws.send(protocol.encode("auth", auth.to_wire()))
                async with asyncio.timeout(5):
                    while await anext(lines) != "event: presence":
                        pass
                    data = json.loads((await anext(lines)).removeprefix("data: "))
                assert data["kind"] == "agent" and data["online"] is True


def _request(scheme: str, host: str) -> Request:
    return Request(
        {
            "type": "http",
            "scheme": scheme,
            "client": (host, 1),
            "headers": [],
            "path": "/",
            "server": ("x", 443),
            "method": "GET",
            "query_string": b"",
        }
    )


def test_plain_http_only_from_loopback_unless_allowed() -> None:
    strict, lax = web.WebSettings(), web.WebSettings(insecure_http=True)
    assert web.transport_allowed(_request("http", "127.0.0.1"), strict)
    assert web.transport_allowed(_request("http", "::1"), strict)
    assert not web.transport_allowed(_request("http", "192.0.2.7"), strict)
    assert web.transport_allowed(_request("https", "192.0.2.7"), strict)
    assert web.transport_allowed(_request("http", "192.0.2.7"), lax)
    assert web.cookie_name(_request("https", "192.0.2.7"), "km_session") == "__Host-km_session"
    assert web.cookie_name(_request("http", "127.0.0.1"), "km_session") == "km_session"


async def test_plain_http_from_elsewhere_gets_an_explanation(control: RunningControl) -> None:
    # uvicorn trusts X-Forwarded-For from loopback: the request looks like a remote one
    async with client(control) as browser:
        response = await browser.get("/login", headers={"X-Forwarded-For": "192.0.2.7"})
        assert response.status_code == 403 and "HTTPS" in response.text


async def test_users_passwords_and_changes_to_agents(control: RunningControl) -> None:
    async with client(control) as alice, client(control) as alice2, client(control) as bob:
        await sign_up(control, alice)
        login = await alice2.get("/login")
        await alice2.post(
            "/login", data={"csrf": csrf_of(login.text), "username": "alice", "password": PASSWORD}
        )
        page = await alice.get("/users")
        short = await alice.post(
            "/users", data={"csrf": csrf_of(page.text), "username": "bob", "password": "short"}
        )
        assert short.status_code == 422 and "at least 10" in short.text
        made = await alice.post(
            "/users", data={"csrf": csrf_of(page.text), "username": "bob", "password": PASSWORD}
        )
        assert made.status_code == 303
        login = await bob.get("/login")
        signed = await bob.post(
            "/login", data={"csrf": csrf_of(login.text), "username": "bob", "password": PASSWORD}
        )
        assert signed.status_code == 303 and (await bob.get("/")).status_code == 200
        # a new password ends alice's other sessions, not this one, not bob's
        wrong = await alice.post(
            "/account/password",
            data={
                "csrf": csrf_of(page.text),
                "current": "nope",
                "password": "x" * 12,
                "confirm": "x" * 12,
            },
        )
        assert wrong.status_code == 422 and "not your current password" in wrong.text
        changed = await alice.post(
            "/account/password",
            data={
                "csrf": csrf_of(page.text),
                "current": PASSWORD,
                "password": "y" * 12,
                "confirm": "y" * 12,
            },
        )
        assert changed.status_code == 303
        assert (await alice.get("/")).status_code == 200
        assert (await alice2.get("/")).headers["location"] == "/login"
        assert (await bob.get("/")).status_code == 200
        # removing bob ends his session; the last user cannot go
        users = await alice.get("/users")
        bob_id = re.search(
            r'action="/users/([0-9a-f-]{36})/delete"[^>]*>\s*<input[^>]*>\s*<button[^>]*aria-label="Remove bob"',
            users.text,
        )
        assert bob_id
        assert (
            await alice.post(f"/users/{bob_id.group(1)}/delete", data={"csrf": csrf_of(users.text)})
        ).status_code == 303
        assert (await bob.get("/")).headers["location"] == "/login"
        alice_id = re.search(
            r'action="/users/([0-9a-f-]{36})/delete"', (await alice.get("/users")).text
        )
        assert alice_id is None  # no remove button for the last user
        admins = control.app.state.dashboard.admins
        rows = await admins.list_users()
        last = await alice.post(
            f"/users/{rows[0]['id']}/delete", data={"csrf": csrf_of(users.text)}
        )
        assert last.status_code == 409 and "last admin user" in last.text

        # an agent renamed, re-keyed and deleted, each pushed and recorded
        page = await alice.get("/agents")
        made = await alice.post("/agents", data={"csrf": csrf_of(page.text), "name": "laptop"})
        old_key = re.search(r"(agt_[A-Za-z0-9_-]+)", made.text)
        agent_id = re.search(r'href="/agents/([0-9a-f-]{36})"', made.text)
        assert old_key and agent_id
        path = f"/agents/{agent_id.group(1)}"
        taken = await alice.post("/agents", data={"csrf": csrf_of(page.text), "name": "laptop"})
        assert taken.status_code == 422 and "already exists" in taken.text
        renamed = await alice.post(path, data={"csrf": csrf_of(page.text), "name": "desk"})
        assert renamed.status_code == 303
        assert "desk" in (await alice.get(path)).text
        rotated = await alice.post(path + "/rotate-key", data={"csrf": csrf_of(page.text)})
        new_key = re.search(r"(agt_[A-Za-z0-9_-]+)", rotated.text)
        assert rotated.status_code == 200 and new_key and new_key.group(1) != old_key.group(1)
        async with connect(control.ws_url) as ws:
            auth = protocol.Auth(old_key.group(1), "agent", public_key(3), "v1")
            await ws.send(protocol.encode("auth", auth.to_wire()))
            assert json.loads(await ws.recv())["type"] == "auth_error"
        assert (
            await alice.post(path + "/delete", data={"csrf": csrf_of(page.text)})
        ).status_code == 303
        assert (await alice.get(path)).status_code == 404
        rows, _ = await admins.audit(100, 0)
        actions = [r["action"] for r in rows]
        for action in (
            "user.create",
            "user.password",
            "user.delete",
            "agent.rename",
            "agent.rotate_key",
            "agent.delete",
        ):
            assert action in actions
        assert all(r["actor"] == "alice" for r in rows if r["action"].startswith("agent."))
        audit = await alice.get("/audit?page=1")
        assert "agent.rename" in audit.text and "was laptop" in audit.text
        assert (await alice.get("/audit?page=99999999999")).status_code == 200


async def test_metrics_are_prometheus_text(control: RunningControl) -> None:
    async with client(control) as scraper:
        response = await scraper.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'kakuremichi_control_connected_clients{kind="agent"} 0' in response.text
    assert "# TYPE kakuremichi_control_stats_reports_total counter" in response.text


async def test_browsers_get_pages_for_errors_and_programs_json(control: RunningControl) -> None:
    html = {"Accept": "text/html,application/xhtml+xml"}
    async with client(control) as browser:
        page = await browser.get("/no/such/page", headers=html)
        assert page.status_code == 404 and "Not found" in page.text and "<html" in page.text
        assert (await browser.put("/login", headers=html)).status_code == 405
        api = await browser.get("/api/nothing", headers=html)
        assert api.status_code in (401, 404) and api.json()["error"]
        assert (await browser.get("/no/such/page")).json()["error"]["code"] == "not_found"


async def test_https_from_a_trusted_proxy_makes_the_cookies_secure(control: RunningControl) -> None:
    # uvicorn applies X-Forwarded-Proto from a trusted proxy (loopback by default,
    # --trusted-proxies): the browser is on HTTPS, the cookies say so
    async with client(control) as browser:
        page = await browser.get("/login", headers={"X-Forwarded-Proto": "https"})
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("__Host-km_form=")
        assert "Secure" in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
        plain = await browser.get("/login")
        assert plain.headers["set-cookie"].startswith("km_form=")
        assert "Secure" not in plain.headers["set-cookie"]


def test_trusted_proxies_setting() -> None:
    from control.main import trusted_proxies

    assert trusted_proxies("127.0.0.1, 10.0.0.0/8 ,::1") == "127.0.0.1,10.0.0.0/8,::1"
    assert trusted_proxies("*") == "*"
    with pytest.raises(ValueError, match="nope"):
        trusted_proxies("10.0.0.1,nope")


async def test_access_policy_and_share_links(control: RunningControl) -> None:
    async with control.api() as api:
        await api.post("/api/agents", json={"name": "laptop"})
        tunnel = (
            await api.post(
                "/api/tunnels",
                json={"agent": "laptop", "domain": "app.example.com", "target": "127.0.0.1:1"},
            )
        ).json()
        # a path rule set through the API survives edits made on the page
        await api.put(
            f"/api/tunnels/{tunnel['id']}/access",
            json={"paths": [{"prefix": "/hook", "action": "bearer", "bearerToken": "t" * 20}]},
        )
    path = f"/tunnels/{tunnel['id']}"
    async with client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get(path + "/access")
        assert page.status_code == 200 and "/hook" in page.text
        bad = await browser.post(
            path + "/access", data={"csrf": csrf_of(page.text), "ip_allow": "not-an-ip"}
        )
        assert bad.status_code == 422 and "not an IP address" in bad.text
        saved = await browser.post(
            path + "/access",
            data={
                "csrf": csrf_of(page.text),
                "ip_allow": "203.0.113.0/24\n2001:db8::/32",
                "ip_deny": "",
                "password": "open sesame 1",
                "basic_auth": "carol:pw-for-carol",
                "session_hours": "2",
                "identity_headers": "on",
            },
        )
        assert saved.status_code == 303, saved.text[:500]
        async with control.api() as api:
            policy = (await api.get(f"/api/tunnels/{tunnel['id']}/access")).json()
        assert policy["ipAllow"] == ["203.0.113.0/24", "2001:db8::/32"]
        assert policy["password"] is True and policy["basicAuth"] == [{"user": "carol"}]
        assert policy["sessionTtl"] == 7200
        assert policy["paths"] == [{"prefix": "/hook", "action": "bearer", "bearerTokenSet": True}]
        shown = (await browser.get(path)).text
        assert "203.0.113.0/24" in shown and "password" in shown and "carol" in shown
        assert "open sesame" not in shown and "pw-for-carol" not in shown
        # a share link: its URL once, then only its id
        made = await browser.post(
            path + "/share-links", data={"csrf": csrf_of(page.text), "hours": "1", "uses": "3"}
        )
        assert made.status_code == 201
        url = re.search(r"https://app\.example\.com/\.kakuremichi/share#t=[\w-]{43}", made.text)
        assert url
        listing = (await browser.get(path)).text
        assert url.group(0) not in listing and "0 of 3" in listing
        link_id = re.search(r"/share-links/([0-9a-f-]{36})/delete", listing)
        assert link_id
        gone = await browser.post(
            path + f"/share-links/{link_id.group(1)}/delete", data={"csrf": csrf_of(page.text)}
        )
        assert gone.status_code == 303
        assert (
            "/share-links/"
            not in (await browser.get(path)).text.split("New share link")[0].split("Share links")[1]
        )
        removed = await browser.post(path + "/access/remove", data={"csrf": csrf_of(page.text)})
        assert removed.status_code == 303
        async with control.api() as api:
            assert (await api.get(f"/api/tunnels/{tunnel['id']}/access")).json()["enabled"] is False
        rows, _ = await control.app.state.dashboard.admins.audit(50, 0)
        actions = [r["action"] for r in rows if r["actor"] == "alice"]
        for action in (
            "tunnel.access_set",
            "tunnel.share_link_create",
            "tunnel.share_link_delete",
            "tunnel.access_remove",
        ):
            assert action in actions
        assert "access_set" in " ".join(r["action"] for r in rows if r["actor"] == "admin-token")


async def test_a_session_over_the_stream_transport_shows_as_tcp(control: RunningControl) -> None:
    """A gateway reports an agent's WireGuard session as going over the stream transport
    (``stats``, transport tcp): the overview, the list and the agent's page say so."""
    from tests.controlserver import connect_client, create

    async with client(control) as browser, control.api() as api:
        await sign_up(control, browser)
        agent = await create(api, "agent", "laptop")
        gateway = await create(api, "gateway", "edge")
        agent_peer = await connect_client(control, agent["apiKey"], "agent", 7)
        gateway_peer = await connect_client(control, gateway["apiKey"], "gateway", 8)
        stats = protocol.Stats((), (protocol.PeerHandshake(public_key(7), 2.0, "tcp"),))
        await gateway_peer.send("stats", stats.to_wire())
        async with asyncio.timeout(5):
            while "over TCP" not in (await browser.get("/")).text:
                await asyncio.sleep(0.05)
        assert "over TCP" in (await browser.get("/agents")).text
        page = (await browser.get(f"/agents/{agent['id']}")).text
        assert "TCP: WireGuard over a WebSocket on HTTPS" in page
        await agent_peer.close()
        await gateway_peer.close()


async def test_the_stream_starts_where_the_page_left_off(control: RunningControl) -> None:
    # a client connecting between a page's rendering and its stream's start is not missed
    async with client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get("/agents")
        made = await browser.post("/agents", data={"csrf": csrf_of(page.text), "name": "laptop"})
        key = re.search(r"(agt_[A-Za-z0-9_-]+)", made.text)
        assert key
        overview = await browser.get("/")
        after = re.search(r'data-events-after="(\d+)"', overview.text)
        assert after
        async with connect(control.ws_url) as ws:
            auth = protocol.Auth(key.group(1), "agent", public_key(4), "v1")
            await ws.send(protocol.encode("auth", auth.to_wire()))
            assert json.loads(await ws.recv())["type"] == "auth_success"
            for start in (
                {"params": {"after": after.group(1)}},
                {"headers": {"Last-Event-ID": after.group(1)}},
            ):
                async with browser.stream("GET", "/events", **start) as stream:  # type: ignore[arg-type]
                    lines = stream.aiter_lines()
                    async with asyncio.timeout(5):
                        while not (line := await anext(lines)).startswith("id: "):
                            pass
                        assert int(line[4:]) > int(after.group(1))
                        assert await anext(lines) == "event: presence"
                        data = json.loads((await anext(lines)).removeprefix("data: "))
                    assert data["online"] is True and data["kind"] == "agent"
