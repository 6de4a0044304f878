"""Access policies at the gateway (``gateway/access``): the pieces on their own, then
requests through a real ``ProxyServer`` to a stand-in agent that echoes what it got.

Every attack the issue names has a test here or in ``test_access_oidc.py``: tampered,
expired and replayed cookies, a session used on a tunnel it was not for, open
redirects through the return address, CSRF on the sign-in form, spoofed ``X-Auth-*``
and ``X-Forwarded-For``, brute force on a PIN, and a policy change while a session is
open.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.passwords import hash_password
from common.protocol import (
    AccessPolicy,
    BasicUser,
    OidcSpec,
    PathRule,
    ProtocolError,
    SessionKey,
    ShareLink,
    parse_access_policy,
)
from gateway.access.policy import (
    ALLOW,
    CHALLENGE,
    DENY,
    ENDPOINT,
    REDIRECT,
    VERIFY,
    AccessControl,
    canonical_path,
    safe_return,
    strictest_rule,
)
from gateway.access.session import SessionSigner
from gateway.proxy import LimitSettings
from tests.gateway.agentapp import ProxyHarness, Uvicorn, tunnel

KEY = SessionKey("k1", b"k" * 32)
OTHER_KEY = SessionKey("k2", b"o" * 32)
PIN_HASH = hash_password("2468")
ALICE_HASH = hash_password("correct horse")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(tunnel_id: str = "t1", **fields: Any) -> AccessPolicy:
    return AccessPolicy(tunnel_id=tunnel_id, epoch=fields.pop("epoch", 1), **fields)


# -- sessions -------------------------------------------------------------------------


def test_a_session_round_trips_and_any_change_to_it_is_refused() -> None:
    clock = Clock()
    signer = SessionSigner(clock)
    signer.set_keys((KEY,))
    value, session = signer.issue("password", ttl=3600, tunnel_id="t1", user="u", epoch=3)
    assert signer.verify(value) == session
    version, payload, mac = value.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["t"] = "t2"  # the same session, claimed for another tunnel
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    assert signer.verify(f"{version}.{forged}.{mac}") is None
    assert signer.verify(f"{version}.{payload}.{mac[:-2]}AA") is None
    assert signer.verify(value + "x") is None
    clock.now += 3601  # expired
    assert signer.verify(value) is None


def test_keys_rotate_and_a_removed_key_ends_its_sessions() -> None:
    signer = SessionSigner(Clock())
    signer.set_keys((KEY,))
    old, _ = signer.issue("share", ttl=600, tunnel_id="t1", link_id="l1")
    signer.set_keys((OTHER_KEY, KEY))  # a new key signs; the old one still verifies
    new, _ = signer.issue("share", ttl=600, tunnel_id="t1", link_id="l1")
    assert signer.verify(old) is not None and signer.verify(new) is not None
    signer.set_keys((OTHER_KEY,))
    assert signer.verify(old) is None and signer.verify(new) is not None


def test_a_revoked_session_is_refused_until_it_would_have_expired() -> None:
    clock = Clock()
    signer = SessionSigner(clock)
    signer.set_keys((KEY,))
    value, session = signer.issue("password", ttl=600, tunnel_id="t1")
    signer.revocations.revoke(session)
    assert signer.verify(value) is None  # replayed after sign-out
    clock.now += 700
    assert signer.verify(value) is None  # expired anyway


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_garbage_cookies_are_no_session_and_never_raise(value: str) -> None:
    signer = SessionSigner(Clock())
    signer.set_keys((KEY,))
    assert signer.verify(value) is None
    assert signer.verify("v1." + value) is None


# -- paths and returns ------------------------------------------------------------------


RULES = (
    PathRule("/admin/", "deny"),
    PathRule("/public/", "bypass"),
    PathRule("/api/", "bearer", hashlib.sha256(b"s3cret-token").hexdigest()),
)


@pytest.mark.parametrize(
    ("path", "action"),
    [
        ("/admin/x", "deny"),
        ("/%61dmin/x", "deny"),
        ("//admin/x", "deny"),
        ("/public/../admin/x", "deny"),
        ("/public/%2e%2e/admin/x", "deny"),
        ("/public/..%2fadmin/x", "deny"),
        ("/public\\..\\admin/x", "deny"),
        ("/public/page", "bypass"),
        ("/public/..%2fsecret", None),  # not bypassed: the app may read it as /secret
        ("/api/v1", "bearer"),
        ("/public/../api/v1", "bearer"),
        ("/", None),
    ],
)
def test_every_spelling_of_a_path_gets_at_least_its_own_rule(path: str, action: str | None) -> None:
    rule = strictest_rule(RULES, path)
    assert (rule.action if rule is not None else None) == action, (path, canonical_path(path))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/app?x=1", "/app?x=1"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("http:/evil.example", "/"),
        ("evil", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("/caf\u00e9", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_the_return_address_never_leaves_the_site(target: str | None, expected: str) -> None:
    assert safe_return(target) == expected


# -- the policy check ----------------------------------------------------------------


def access_with(*policies: AccessPolicy, clock: Clock | None = None) -> AccessControl:
    access = AccessControl(clock=clock or Clock())
    access.update(policies, (KEY,))
    return access


def check(access: AccessControl, pol: AccessPolicy, **request: Any) -> Any:
    fields: dict[str, Any] = {
        "host": "app.example.com",
        "client_ip": "203.0.113.5",
        "method": b"GET",
        "path": "/",
        "headers": [],
    }
    fields.update(request)
    return access.check(pol, **fields)


def test_ip_rules_for_v4_v6_and_mapped_addresses() -> None:
    pol = policy(ip_allow=("203.0.113.0/24", "2001:db8::/32"), ip_deny=("203.0.113.66/32",))
    access = access_with(pol)
    assert check(access, pol, client_ip="203.0.113.5").kind == ALLOW
    assert check(access, pol, client_ip="::ffff:203.0.113.5").kind == ALLOW
    assert check(access, pol, client_ip="2001:db8::1").kind == ALLOW
    for refused in ("203.0.113.66", "::ffff:203.0.113.66", "198.51.100.1", "2001:db9::1", "?"):
        outcome = check(access, pol, client_ip=refused)
        assert (outcome.kind, outcome.status) == (DENY, 403), refused


def test_path_rules_and_bearer_tokens() -> None:
    pol = policy(paths=RULES, password_hash=PIN_HASH)
    access = access_with(pol)
    assert check(access, pol, path="/admin/").kind == DENY
    assert check(access, pol, path="/public/a").kind == ALLOW
    assert check(access, pol, path="/api/x").kind == CHALLENGE
    good = [(b"authorization", b"Bearer s3cret-token")]
    bad = [(b"authorization", b"Bearer s3cret-tokeN")]
    allowed = check(access, pol, path="/api/x", headers=good)
    assert allowed.kind == ALLOW and allowed.identity.user == "bearer"
    assert check(access, pol, path="/api/x", headers=bad).kind == CHALLENGE
    assert check(access, pol, path="/.kakuremichi/login").kind == ENDPOINT


def test_a_browser_is_sent_to_sign_in_and_a_script_gets_401() -> None:
    pol = policy(password_hash=PIN_HASH)
    access = access_with(pol)
    browser = check(access, pol, path="/a b", headers=[(b"accept", b"text/html,*/*")])
    assert browser.kind == REDIRECT and browser.location == "/.kakuremichi/login?rd=/a%20b"
    assert check(access, pol).kind == CHALLENGE
    oidc_only = policy(oidc=OidcSpec("https://idp", "c", "s", (), (), (), (), "groups"))
    access = access_with(oidc_only)
    browser = check(access, oidc_only, headers=[(b"accept", b"text/html")])
    assert browser.location.startswith("/.kakuremichi/oidc/start?rd=")


def test_basic_auth_is_verified_once_then_remembered() -> None:
    pol = policy(basic_users=(BasicUser("alice", ALICE_HASH),))
    access = access_with(pol)
    right = [(b"authorization", b"Basic " + base64.b64encode(b"alice:correct horse"))]
    wrong = [(b"authorization", b"Basic " + base64.b64encode(b"alice:wrong"))]
    nobody = [(b"authorization", b"Basic " + base64.b64encode(b"mallory:correct horse"))]
    assert check(access, pol).headers[0][0] == b"www-authenticate"
    assert check(access, pol, headers=right).kind == VERIFY
    assert access.verify_basic(pol, right[0][1])
    outcome = check(access, pol, headers=right)
    assert outcome.kind == ALLOW and outcome.identity.user == "alice"
    assert not access.verify_basic(pol, wrong[0][1])
    assert not access.verify_basic(pol, nobody[0][1])
    assert not access.verify_basic(pol, b"Basic !!!")
    # a new epoch (the password changed) forgets what was remembered
    newer = policy(basic_users=pol.basic_users, epoch=2)
    access.update((newer,), (KEY,))
    assert check(access, newer, headers=right).kind == VERIFY


def test_sign_in_attempts_are_limited_per_client_and_per_tunnel() -> None:
    clock = Clock()
    pol = policy(basic_users=(BasicUser("alice", ALICE_HASH),))
    access = access_with(pol, clock=clock)
    tries = [check(access, pol, headers=[(b"authorization", b"Basic eDp5")]) for _ in range(12)]
    assert [t.kind for t in tries[:10]] == [VERIFY] * 10
    assert tries[10].status == 429 and tries[10].headers[0][0] == b"retry-after"
    other = check(
        access, pol, client_ip="198.51.100.9", headers=[(b"authorization", b"Basic eDp5")]
    )
    assert other.kind == VERIFY  # another client has its own budget
    for n in range(200):  # many clients: the tunnel's own budget runs out too
        last = check(
            access,
            pol,
            client_ip=f"10.0.{n // 250}.{n % 250}",
            headers=[(b"authorization", b"Basic eDp5")],
        )
    assert last.status == 429
    clock.now += 120
    assert check(access, pol, headers=[(b"authorization", b"Basic eDp5")]).kind == VERIFY


def cookie(name: str, value: str) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"theme=dark; {name}={value}".encode())]


def test_sessions_are_only_accepted_where_and_while_the_policy_allows() -> None:
    pol = policy(password_hash=PIN_HASH)
    access = access_with(pol)
    value, _ = access.sessions.issue("password", ttl=600, tunnel_id="t1", user="password", epoch=1)
    assert check(access, pol, headers=cookie("kkm_session", value)).kind == ALLOW
    other = policy("t2", password_hash=PIN_HASH)
    access.update((pol, other), (KEY,))
    assert check(access, other, headers=cookie("kkm_session", value)).kind == CHALLENGE
    changed = policy(password_hash=hash_password("1357"), epoch=2)  # the PIN changed
    access.update((changed,), (KEY,))
    assert check(access, changed, headers=cookie("kkm_session", value)).kind == CHALLENGE


def test_a_share_session_ends_with_its_link() -> None:
    link = ShareLink("l1", "0" * 64, 2_000_000_000, None)
    pol = policy(share_links=(link,))
    access = access_with(pol)
    value, _ = access.sessions.issue("share", ttl=600, tunnel_id="t1", epoch=1, link_id="l1")
    assert check(access, pol, headers=cookie("kkm_session", value)).kind == ALLOW
    gone = policy(share_links=(ShareLink("l2", "1" * 64, 2_000_000_000, None),))
    access.update((gone,), (KEY,))
    assert check(access, gone, headers=cookie("kkm_session", value)).kind == CHALLENGE


def test_single_sign_on_covers_the_session_domain_and_the_current_lists() -> None:
    spec = OidcSpec("https://idp", "c", "s", (), ("ann@example.com",), (), ("ops",), "groups")
    a = policy("ta", oidc=spec, session_domain="apps.example.com")
    b = policy("tb", oidc=spec, session_domain="apps.example.com")
    c = policy("tc", oidc=spec)  # not under the SSO domain's sessions
    access = access_with(a, b, c)
    value, _ = access.sessions.issue(
        "oidc", ttl=600, domain="apps.example.com", user="ann", email="ann@example.com"
    )
    sso = cookie("kkm_sso", value)
    assert check(access, a, host="one.apps.example.com", headers=sso).kind == ALLOW
    assert check(access, b, host="two.apps.example.com", headers=sso).kind == ALLOW
    assert check(access, b, host="evilapps.example.com", headers=sso).kind == CHALLENGE
    assert check(access, c, host="three.example.com", headers=sso).kind == CHALLENGE
    identity = check(access, a, host="one.apps.example.com", headers=sso).identity
    assert (identity.email, identity.method) == ("ann@example.com", "oidc")
    narrowed = policy(
        "ta",
        oidc=OidcSpec("https://idp", "c", "s", (), ("bob@example.com",), (), (), "groups"),
        session_domain="apps.example.com",
    )
    access.update((narrowed,), (KEY,))
    assert check(access, narrowed, host="one.apps.example.com", headers=sso).kind == CHALLENGE


def test_no_session_key_fails_closed() -> None:
    pol = policy(password_hash=PIN_HASH)
    access = AccessControl(clock=Clock())
    access.update((pol,), ())
    outcome = check(access, pol)
    assert (outcome.kind, outcome.status) == (DENY, 503)


def test_policies_round_trip_and_bad_ones_are_refused_whole() -> None:
    pol = policy(
        ip_allow=("10.0.0.0/8",),
        basic_users=(BasicUser("alice", ALICE_HASH),),
        password_hash=PIN_HASH,
        oidc=OidcSpec(
            "https://idp.example", "c", "s", ("openid",), ("a@b.c",), ("b.c",), ("g",), "groups"
        ),
        share_links=(ShareLink("l1", "a" * 64, 2e9, 3),),
        paths=RULES,
        session_domain="example.com",
        session_ttl=3600,
    )
    assert parse_access_policy(pol.to_wire()) == pol
    for broken in (
        {**pol.to_wire(), "passwordHash": "plaintext"},
        {**pol.to_wire(), "ipAllow": ["10.0.0.0/33"]},
        {**pol.to_wire(), "paths": [{"prefix": "nope", "action": "deny"}]},
        {**pol.to_wire(), "paths": [{"prefix": "/x", "action": "bearer", "bearerHash": "zz"}]},
        {**pol.to_wire(), "sessionTtl": 10**9},
        {**pol.to_wire(), "oidc": {"issuer": "javascript:x", "clientId": "c"}},
        {**pol.to_wire(), "shareLinks": [{"id": "l", "tokenHash": "a" * 64, "expiresAt": 1e99}]},
    ):
        with pytest.raises(ProtocolError):
            parse_access_policy(broken)
    assert "hash" not in repr(pol).lower() and "s3cret" not in repr(pol)


# -- through the proxy ----------------------------------------------------------------

HOST = "app.example.com"


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ProxyHarness, httpx.AsyncClient]]:
    agent = await Uvicorn().start()
    harness = ProxyHarness(agent.port, limits=LimitSettings(rate=0))
    harness.router.replace_all([tunnel("t1", HOST), tunnel("t2", "open.example.com")])
    await harness.start()
    async with httpx.AsyncClient(base_url=harness.url, timeout=10) as client:
        # every test says which cookies a request carries: the client keeps none
        client.cookies.extract_cookies = lambda response: None  # type: ignore[method-assign]
        yield harness, client
    await harness.close()
    await agent.stop()


def set_policies(harness: ProxyHarness, *policies: AccessPolicy) -> None:
    harness.proxy.access.update(policies, (KEY,))


def seen_headers(response: httpx.Response) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name, []).append(value)
    return seen


async def test_spoofed_identity_fields_never_reach_the_app(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    harness, client = proxy
    spoof = {"X-Auth-User": "admin", "x-auth-email": "root@example.com", "X-Auth-Groups": "wheel"}
    for host in (HOST, "open.example.com"):  # with and without a policy
        set_policies(harness, policy(ip_allow=("127.0.0.0/8",)))
        response = await client.get("/headers", headers={"Host": host, **spoof})
        seen = seen_headers(response)
        assert not any(name.startswith("x-auth-") for name in seen), seen
    # a spoofed X-Forwarded-For does not move the client past an IP rule
    set_policies(harness, policy(ip_allow=("203.0.113.0/24",)))
    response = await client.get(
        "/headers", headers={"Host": HOST, "X-Forwarded-For": "203.0.113.9"}
    )
    assert response.status_code == 403


async def test_basic_auth_through_the_proxy(proxy: tuple[ProxyHarness, httpx.AsyncClient]) -> None:
    harness, client = proxy
    set_policies(harness, policy(basic_users=(BasicUser("alice", ALICE_HASH),)))
    response = await client.get("/headers", headers={"Host": HOST})
    assert response.status_code == 401 and "Basic" in response.headers["www-authenticate"]
    response = await client.get("/headers", headers={"Host": HOST}, auth=("alice", "nope"))
    assert response.status_code == 401
    for _ in range(3):  # verified once, then remembered: same answer each time
        response = await client.get(
            "/headers", headers={"Host": HOST}, auth=("alice", "correct horse")
        )
        assert response.status_code == 200
        seen = seen_headers(response)
        assert seen["x-auth-user"] == ["alice"]
    assert harness.proxy.access._basic_ok


async def login(client: httpx.AsyncClient, pin: str, rd: str = "/headers") -> httpx.Response:
    page = await client.get(f"/.kakuremichi/login?rd={rd}", headers={"Host": HOST})
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    jar = page.headers["set-cookie"].split(";")[0]
    return await client.post(
        "/.kakuremichi/login",
        headers={"Host": HOST, "Cookie": jar},
        data={"csrf": csrf[1], "password": pin, "rd": rd},
    )


def session_of(response: httpx.Response) -> str:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith("kkm_session="):
            return value.split(";")[0]
    raise AssertionError(response.headers)


async def test_password_sign_in_session_and_sign_out(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    harness, client = proxy
    set_policies(harness, policy(password_hash=PIN_HASH))
    first = await client.get("/headers", headers={"Host": HOST, "Accept": "text/html"})
    assert first.status_code == 302
    assert first.headers["location"] == "/.kakuremichi/login?rd=/headers"
    assert (await login(client, "1111")).status_code == 401
    signed_in = await login(client, "2468")
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/headers"
    set_cookie = next(
        v for v in signed_in.headers.get_list("set-cookie") if v.startswith("kkm_session")
    )
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    jar = session_of(signed_in)
    response = await client.get("/headers", headers={"Host": HOST, "Cookie": f"a=1; {jar}; b=2"})
    assert response.status_code == 200
    seen = seen_headers(response)
    assert seen["x-auth-user"] == ["password"]
    assert seen["cookie"] == ["a=1; b=2"]  # the gateway's own cookie stays at the gateway
    # tampered: another byte in the MAC
    tampered = jar[:-3] + ("A" if jar[-3] != "A" else "B") + jar[-2:]
    response = await client.get("/headers", headers={"Host": HOST, "Cookie": tampered})
    assert response.status_code == 401
    out = await client.get("/.kakuremichi/logout", headers={"Host": HOST, "Cookie": jar})
    assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
    replayed = await client.get("/headers", headers={"Host": HOST, "Cookie": jar})
    assert replayed.status_code == 401


async def test_the_sign_in_form_refuses_csrf_and_open_redirects(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    harness, client = proxy
    set_policies(harness, policy(password_hash=PIN_HASH))
    forged = await client.post(
        "/.kakuremichi/login",
        headers={"Host": HOST, "Cookie": "kkm_csrf=aaaaaaaaaaaaaaaaaaaaaaaa"},
        data={"csrf": "bbbbbbbbbbbbbbbbbbbbbbbb", "password": "2468"},
    )
    assert forged.status_code == 403 and "kkm_session" not in forged.headers.get("set-cookie", "")
    cross_site = await client.post(
        "/.kakuremichi/login",
        headers={
            "Host": HOST,
            "Origin": "https://evil.example",
            "Cookie": "kkm_csrf=aaaaaaaaaaaaaaaaaaaaaaaa",
        },
        data={"csrf": "aaaaaaaaaaaaaaaaaaaaaaaa", "password": "2468"},
    )
    assert cross_site.status_code == 403
    for rd in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        response = await login(client, "2468", rd=rd)
        assert response.status_code == 303 and response.headers["location"] == "/"


async def test_a_pin_cannot_be_brute_forced(proxy: tuple[ProxyHarness, httpx.AsyncClient]) -> None:
    harness, client = proxy
    set_policies(harness, policy(password_hash=PIN_HASH))
    statuses = [(await login(client, f"{n:04d}")).status_code for n in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    assert (await login(client, "2468")).status_code == 429  # even the right one, for now


async def test_a_policy_change_applies_to_an_open_session_at_once(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    harness, client = proxy
    set_policies(harness, policy(password_hash=PIN_HASH))
    jar = session_of(await login(client, "2468"))
    assert (await client.get("/headers", headers={"Host": HOST, "Cookie": jar})).status_code == 200
    set_policies(harness, policy(password_hash=hash_password("9999"), epoch=2))
    assert (await client.get("/headers", headers={"Host": HOST, "Cookie": jar})).status_code == 401
    set_policies(harness, policy(ip_deny=("127.0.0.0/8",)))
    assert (await client.get("/headers", headers={"Host": HOST})).status_code == 403


async def test_share_links_open_a_session_and_run_out(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    harness, client = proxy
    token = "t0ken-for-a-friend-0123456789"
    link = ShareLink("l1", hashlib.sha256(token.encode()).hexdigest(), 2e9, 1)
    used: list[tuple[str, str]] = []
    harness.proxy.endpoints.on_share_used = lambda tunnel_id, link_id: used.append(
        (tunnel_id, link_id)
    )
    set_policies(harness, policy(share_links=(link,)))
    page = await client.get("/.kakuremichi/share", headers={"Host": HOST})
    assert page.status_code == 200 and "location.hash" in page.text
    assert page.headers["referrer-policy"] == "no-referrer"
    wrong = await client.post(
        "/.kakuremichi/share", headers={"Host": HOST}, data={"token": "x" * 20}
    )
    assert wrong.status_code == 403
    opened = await client.post("/.kakuremichi/share", headers={"Host": HOST}, data={"token": token})
    assert opened.status_code == 303 and used == [("t1", "l1")]
    jar = session_of(opened)
    response = await client.get("/headers", headers={"Host": HOST, "Cookie": jar})
    assert response.status_code == 200 and seen_headers(response)["x-auth-user"] == ["share:l1"]
    again = await client.post("/.kakuremichi/share", headers={"Host": HOST}, data={"token": token})
    assert again.status_code == 403  # one use only
    expired = ShareLink("l2", hashlib.sha256(b"another-token-0123456789").hexdigest(), 1.0, None)
    set_policies(harness, policy(share_links=(link, expired)))
    late = await client.post(
        "/.kakuremichi/share", headers={"Host": HOST}, data={"token": "another-token-0123456789"}
    )
    assert late.status_code == 403


async def test_denied_requests_never_reach_the_agent(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    harness, client = proxy
    set_policies(harness, policy(ip_deny=("127.0.0.1/32",), paths=(PathRule("/x", "bypass"),)))
    before = harness.proxy.pool.idle_count()
    for path in ("/headers", "/x", "/.kakuremichi/login"):
        response = await client.get(path, headers={"Host": HOST})
        assert response.status_code == 403, path
    assert harness.proxy.pool.idle_count() == before == 0
    # a big body on a refused request: answered, and the connection is not left hanging
    response = await client.post("/upload", headers={"Host": HOST}, content=b"x" * 200_000)
    assert response.status_code == 403


class CheckCounter:
    """Counts the policy checks an ``AccessControl`` makes (what a memo saves)."""

    def __init__(self, access: AccessControl) -> None:
        self.calls = 0
        check = access.check

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return check(*args, **kwargs)

        access.check = counting  # type: ignore[method-assign]


async def test_a_connection_reuses_its_sign_in_while_it_holds(
    proxy: tuple[ProxyHarness, httpx.AsyncClient],
) -> None:
    """A keep-alive client's same cookie is checked once; a new policy, a sign-out or
    an Authorization field makes the gateway check again."""
    harness, client = proxy
    set_policies(harness, policy(password_hash=PIN_HASH))
    jar = session_of(await login(client, "2468"))
    access = harness.proxy.access
    checks = CheckCounter(access)
    headers = {"Host": HOST, "Cookie": jar}
    async with httpx.AsyncClient(base_url=harness.url, timeout=10) as one:
        one.cookies.extract_cookies = lambda response: None  # type: ignore[method-assign]
        for _ in range(5):
            response = await one.get("/headers", headers=headers)
            assert response.status_code == 200
            assert seen_headers(response)["x-auth-user"] == ["password"]
        assert checks.calls == 1
        await one.get("/headers", headers={**headers, "Authorization": "Bearer x"})
        assert checks.calls == 2
        set_policies(harness, policy(password_hash=PIN_HASH))  # the same, as a new object
        assert (await one.get("/headers", headers=headers)).status_code == 200
        assert checks.calls == 3
        await one.get("/.kakuremichi/logout", headers=headers)
        assert (await one.get("/headers", headers=headers)).status_code == 401


def test_a_repeated_head_reuses_the_answer_until_the_session_ends() -> None:
    """``access_for`` with a verbatim head: the same bytes again are let in without a
    check, while the session lasts and is not signed out; any other head is checked."""
    from types import SimpleNamespace

    from gateway.proxy.edge import AccessMemo, access_for

    clock = Clock()
    pol = policy(password_hash=PIN_HASH)
    access = access_with(pol, clock=clock)
    value, session = access.sessions.issue(
        "password", ttl=600, tunnel_id="t1", user="password", epoch=1
    )
    checks = CheckCounter(access)
    server: Any = SimpleNamespace(access=access)
    route: Any = SimpleNamespace(tunnel_id="t1", domain="app.example.com")
    fields = [(b"host", b"app.example.com"), (b"cookie", f"kkm_session={value}".encode())]
    raw = b"GET / HTTP/1.1\r\nHost: app.example.com\r\nCookie: kkm_session=" + value.encode()
    memo = AccessMemo()

    def ask(head: bytes | None, ip: str = "203.0.113.5") -> int:
        return access_for(server, route, ip, b"GET", "/", fields, memo, head).outcome.kind

    assert ask(raw) == ALLOW and checks.calls == 1
    assert ask(bytes(raw)) == ALLOW and checks.calls == 1  # equal bytes, another object
    assert ask(raw, ip="203.0.113.6") == ALLOW and checks.calls == 2  # another client address
    assert ask(raw + b"\r\nAccept: */*") == ALLOW and checks.calls == 3  # another head
    assert ask(raw + b"\r\nAccept: */*") == ALLOW and checks.calls == 3
    access.sessions.revocations.revoke(session)  # signed out
    assert ask(raw + b"\r\nAccept: */*") == CHALLENGE and checks.calls == 4
    fresh, _ = access.sessions.issue("password", ttl=600, tunnel_id="t1", user="password", epoch=1)
    fields[1] = (b"cookie", f"kkm_session={fresh}".encode())
    raw = raw.replace(value.encode(), fresh.encode())
    assert ask(raw) == ALLOW and checks.calls == 5
    assert ask(raw) == ALLOW and checks.calls == 5
    clock.now += 601  # the session expired
    assert ask(raw) == CHALLENGE and checks.calls == 6
