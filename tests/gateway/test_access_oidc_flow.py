"""The OIDC relying party (``gateway/access/oidc.py``) against a provider faked in
process (httpx's MockTransport): every check of the callback is made to fail once.
The real provider and browser are in tests/gateway_core/test_access_oidc.py."""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from common.protocol import AccessPolicy, OidcSpec, SessionKey
from gateway.access.endpoints import EndpointRequest
from gateway.access.oidc import OidcClients
from gateway.access.policy import AccessControl

ISSUER = "https://idp.example"
CLIENT = "kakuremichi"


class FakeIdp:
    """Discovery, a key set and a token endpoint that signs what the test says."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "k1"
        self.claims: dict[str, Any] = {}
        self.codes: list[dict[str, Any]] = []
        self.fail_discovery = False

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": CLIENT,
            "sub": "ann",
            "iat": now,
            "exp": now + 300,
            "email": "ann@example.com",
            "groups": ["ops"],
            **self.claims,
            **overrides,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.fail_discovery:
            raise httpx.ConnectError("provider down")
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "authorization_endpoint": f"{ISSUER}/auth",
                    "token_endpoint": f"{ISSUER}/token",
                    "jwks_uri": f"{ISSUER}/jwks",
                },
            )
        if request.url.path == "/jwks":
            return httpx.Response(200, json=self.jwks())
        if request.url.path == "/token":
            form = parse_qs(request.content.decode())
            self.codes.append({k: v[0] for k, v in form.items()})
            assert request.headers["authorization"].startswith("Basic ")
            return httpx.Response(200, json={"id_token": self.token(nonce=self.nonce)})
        return httpx.Response(404)

    nonce = ""


POLICY = AccessPolicy(
    "t1",
    1,
    oidc=OidcSpec(
        ISSUER, CLIENT, "secret", ("openid", "email"), ("ann@example.com",), (), (), "groups"
    ),
)


def request(target: str, cookie: str = "") -> EndpointRequest:
    headers = [(b"cookie", cookie.encode())] if cookie else []
    return EndpointRequest(
        POLICY, "app.example.com", "https", "203.0.113.5", b"GET", target, headers, b"", ""
    )


@pytest.fixture
def rp() -> tuple[OidcClients, FakeIdp]:
    idp = FakeIdp()
    access = AccessControl()
    access.update((POLICY,), (SessionKey("k", b"k" * 32),))
    clients = OidcClients(access, transport=httpx.MockTransport(idp.handler))
    access.oidc = clients
    return clients, idp


async def start(clients: OidcClients, idp: FakeIdp) -> tuple[str, dict[str, str]]:
    """The flow cookie and the authorization request's parameters."""
    response = await clients.start(request("/.kakuremichi/oidc/start?rd=/app"))
    assert response.status == 302
    location = dict(response.headers)[b"location"].decode()
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert params["code_challenge_method"] == "S256" and params["redirect_uri"] == (
        "https://app.example.com/.kakuremichi/oidc/callback"
    )
    cookie = next(v for k, v in response.headers if k == b"set-cookie").decode()
    assert "HttpOnly" in cookie and "Path=/.kakuremichi" in cookie
    idp.nonce = params["nonce"]
    return cookie.split(";")[0], params


async def callback(clients: OidcClients, cookie: str, state: str) -> Any:
    return await clients.callback(
        request(f"/.kakuremichi/oidc/callback?code=c0de&state={state}", cookie)
    )


async def test_a_good_sign_in_gives_a_session(rp: tuple[OidcClients, FakeIdp]) -> None:
    clients, idp = rp
    cookie, params = await start(clients, idp)
    response = await callback(clients, cookie, params["state"])
    assert response.status == 303 and dict(response.headers)[b"location"] == b"/app"
    assert any(v.startswith(b"kkm_session=v1.") for k, v in response.headers if k == b"set-cookie")
    sent = idp.codes[0]
    assert sent["code_verifier"] and sent["redirect_uri"].endswith("/oidc/callback")
    # PKCE: the challenge sent first is the verifier's SHA-256
    import hashlib

    challenge = base64.urlsafe_b64encode(hashlib.sha256(sent["code_verifier"].encode()).digest())
    assert challenge.rstrip(b"=").decode() == params["code_challenge"]


async def test_a_state_mismatch_is_refused(rp: tuple[OidcClients, FakeIdp]) -> None:
    clients, idp = rp
    cookie, params = await start(clients, idp)
    assert (await callback(clients, cookie, params["state"] + "x")).status == 403
    other_cookie, _ = await start(clients, idp)  # another browser's flow
    assert (await callback(clients, other_cookie, params["state"])).status == 403
    assert (await callback(clients, "", params["state"])).status == 403
    tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
    assert (await callback(clients, tampered, params["state"])).status == 403
    assert idp.codes == []  # no code was ever exchanged


@pytest.mark.parametrize(
    ("claims", "name"),
    [
        ({"nonce": "someone-elses-nonce"}, "nonce"),
        ({"aud": "another-client"}, "audience"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"exp": -3600}, "expired"),  # times: seconds from when the test runs
        ({"iat": 600}, "issued in the future"),
        ({"email": "mallory@example.com"}, "not allowed"),
    ],
)
async def test_a_token_that_does_not_verify_gives_no_session(
    rp: tuple[OidcClients, FakeIdp], claims: dict[str, Any], name: str
) -> None:
    clients, idp = rp
    cookie, params = await start(clients, idp)
    now = int(time.time())
    idp.claims = {k: now + v if k in ("exp", "iat") else v for k, v in claims.items()}
    if "nonce" in claims:
        idp.nonce = claims["nonce"]
    response = await callback(clients, cookie, params["state"])
    assert response.status == 403, name
    assert not any(k == b"set-cookie" and b"kkm_session=v1" in v for k, v in response.headers)


async def test_clock_skew_within_a_minute_is_accepted(rp: tuple[OidcClients, FakeIdp]) -> None:
    clients, idp = rp
    cookie, params = await start(clients, idp)
    idp.claims = {"iat": int(time.time()) + 30}
    assert (await callback(clients, cookie, params["state"])).status == 303


async def test_a_token_signed_with_another_key_is_refused(rp: tuple[OidcClients, FakeIdp]) -> None:
    clients, idp = rp
    cookie, params = await start(clients, idp)
    honest = idp.key
    idp.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # forger
    jwks = idp.jwks

    def published() -> dict[str, Any]:
        idp.key, forged = honest, idp.key
        try:
            return jwks()
        finally:
            idp.key = forged

    idp.jwks = published  # type: ignore[method-assign]
    assert (await callback(clients, cookie, params["state"])).status == 403


async def test_an_unreachable_provider_fails_closed(rp: tuple[OidcClients, FakeIdp]) -> None:
    clients, idp = rp
    idp.fail_discovery = True
    response = await clients.start(request("/.kakuremichi/oidc/start"))
    assert response.status == 503 and b"cannot be reached" in response.body
