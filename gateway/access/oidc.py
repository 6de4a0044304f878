"""OIDC single sign-on: the gateway as a relying party (authorization code + PKCE).

Theory of operation
-------------------
``oidc/start`` sends the browser to the provider's authorization endpoint (found by
discovery, ``/.well-known/openid-configuration``) with a fresh ``state``, ``nonce``
and PKCE challenge (S256).  Those three, the tunnel and where to go back travel in a
short-lived ``kkm_oidc`` cookie signed like the sessions (``HttpOnly``,
``SameSite=Lax``, scoped to ``/.kakuremichi/``), so any gateway can finish the flow
and nothing is kept per attempt.  ``oidc/callback`` checks the returned ``state``
against the cookie, exchanges the code (with the PKCE verifier and the client
secret) at the token endpoint, and verifies the ID token: signature against the
provider's JWKS (fetched again when a token names a key not seen yet, at most once a
second: key rotation), issuer, audience, expiry and issue time with a minute of
clock skew, and the ``nonce``.  The user must then pass the tunnel's lists (allowed
e-mails, e-mail domains, groups from ``groups_claim``); then the gateway signs a
session (``session.py``) for the tunnel, or for its ``session_domain``, so that every
tunnel under that domain lets the same browser in without another round trip.

The redirect URI is ``https://<tunnel host>/.kakuremichi/oidc/callback`` (``http://``
when the request came over plain HTTP): register it with the provider for every
tunnel that signs in (or for the one a session domain is signed in through).

**Fail closed**: a provider that cannot be reached or answers nonsense, a token that
does not verify, a ``state`` or ``nonce`` that does not match: no session, and a page
saying which step failed (503 when the provider is away, 403 otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from common.logs import kv
from common.protocol import OidcSpec

from .endpoints import EndpointRequest, EndpointResponse, page, set_cookie
from .policy import PREFIX, AccessControl, oidc_allows, safe_return
from .session import CLOCK_SKEW

__all__ = ["OidcClients", "ProviderError"]

log = logging.getLogger(__name__)

FLOW_COOKIE = "kkm_oidc"
#: seconds a browser has to come back from the provider
FLOW_TTL = 600
#: discovery documents and key sets are fetched again after this long
_METADATA_TTL = 3600.0
#: an unknown key id refetches the key set at most this often (a rotation shows up
#: as an ID token signed with a key id not seen yet)
_JWKS_REFRESH = 1.0
_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
_MAX_DOCUMENT = 256 * 1024


class ProviderError(Exception):
    """The identity provider could not be used (unreachable, or answered nonsense)."""


@dataclass(slots=True)
class _Provider:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    fetched: float
    keys: dict[str, Any]
    keys_fetched: float = 0.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class OidcClients:
    """The OIDC relying party of every tunnel that signs in with OIDC."""

    def __init__(
        self,
        access: AccessControl,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
    ) -> None:
        self.access = access
        self._clock = clock
        self._http = httpx.AsyncClient(
            transport=transport, verify=verify, timeout=timeout, follow_redirects=False
        )
        self._providers: dict[str, _Provider] = {}

    async def close(self) -> None:
        await self._http.aclose()

    # -- provider metadata ---------------------------------------------------------

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ProviderError(f"cannot reach {url}: {type(exc).__name__}") from None
        if response.status_code != 200 or len(response.content) > _MAX_DOCUMENT:
            raise ProviderError(f"{url} answered {response.status_code}")
        try:
            value = json.loads(response.content)
        except ValueError:
            raise ProviderError(f"{url} did not answer JSON") from None
        if not isinstance(value, dict):
            raise ProviderError(f"{url} did not answer a JSON object")
        return value

    async def provider(self, issuer: str) -> _Provider:
        known = self._providers.get(issuer)
        now = self._clock()
        if known is not None and now - known.fetched < _METADATA_TTL:
            return known
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url)
        fields = {}
        for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = document.get(key)
            if not isinstance(value, str) or not value.startswith(("https://", "http://")):
                raise ProviderError(f"the discovery document has no usable {key!r}")
            fields[key] = value
        if fields["issuer"].rstrip("/") != issuer.rstrip("/"):
            raise ProviderError("the discovery document names another issuer")
        provider = _Provider(
            issuer,
            fields["authorization_endpoint"],
            fields["token_endpoint"],
            fields["jwks_uri"],
            now,
            known.keys if known is not None else {},
            known.keys_fetched if known is not None else 0.0,
        )
        self._providers[issuer] = provider
        return provider

    async def _refresh_keys(self, provider: _Provider) -> None:
        document = await self._get_json(provider.jwks_uri)
        keys = {}
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ProviderError("the key set has no 'keys' list")
        for entry in entries[:100]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                continue  # a key type we cannot use: others may do
            keys[str(entry.get("kid", ""))] = key
        provider.keys = keys
        provider.keys_fetched = self._clock()

    async def _key_for(self, provider: _Provider, kid: str) -> Any:
        key = provider.keys.get(kid)
        if key is None and self._clock() - provider.keys_fetched >= _JWKS_REFRESH:
            await self._refresh_keys(provider)  # a rotated key set, or the first time
            key = provider.keys.get(kid)
        if key is None and not kid and len(provider.keys) == 1:
            key = next(iter(provider.keys.values()))
        return key

    # -- the flow ---------------------------------------------------------------------

    def _redirect_uri(self, request: EndpointRequest) -> str:
        return f"{request.origin}{PREFIX}oidc/callback"

    def _flow_mac(self, payload: str) -> str | None:
        signer = self.access.sessions
        key = signer._signing
        if key is None:
            return None
        return _b64(hmac.new(key.secret, b"oidc." + payload.encode(), hashlib.sha256).digest())

    async def start(self, request: EndpointRequest) -> EndpointResponse:
        oidc = request.policy.oidc
        assert oidc is not None
        back = safe_return(request.query().get("rd", ["/"])[0])
        try:
            provider = await self.provider(oidc.issuer)
        except ProviderError as exc:
            return self._unavailable(request, str(exc))
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        flow = _b64(
            json.dumps(
                {
                    "s": state,
                    "n": nonce,
                    "v": verifier,
                    "t": request.policy.tunnel_id,
                    "r": back,
                    "x": int(self._clock()) + FLOW_TTL,
                },
                separators=(",", ":"),
            ).encode()
        )
        mac = self._flow_mac(flow)
        if mac is None:
            return page(
                "Sign-in unavailable",
                "<p>Sign-in is not available yet (no session key).</p>",
                status=503,
            )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": oidc.client_id,
                "redirect_uri": self._redirect_uri(request),
                "scope": " ".join(oidc.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in provider.authorization_endpoint else "?"
        response = EndpointResponse(302)
        response.headers.append(
            (b"location", f"{provider.authorization_endpoint}{separator}{query}".encode())
        )
        response.headers.append(
            set_cookie(
                FLOW_COOKIE,
                f"{flow}.{mac}",
                secure=request.proto == "https",
                max_age=FLOW_TTL,
                path=PREFIX.rstrip("/"),
            )
        )
        return response

    def _flow(self, request: EndpointRequest) -> dict[str, Any] | None:
        from .policy import cookie_values

        for value in cookie_values(request.headers, FLOW_COOKIE):
            payload, _, mac = value.partition(".")
            expected = self._flow_mac(payload)
            if expected is None or not hmac.compare_digest(mac.encode(), expected.encode()):
                continue
            try:
                data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            except ValueError:
                continue
            if not isinstance(data, dict) or not isinstance(data.get("x"), int):
                continue
            if data["x"] < self._clock() or data.get("t") != request.policy.tunnel_id:
                continue
            return data
        return None

    async def callback(self, request: EndpointRequest) -> EndpointResponse:
        policy = request.policy
        oidc = policy.oidc
        assert oidc is not None
        query = request.query()
        flow = self._flow(request)
        state = query.get("state", [""])[0]
        if flow is None or not isinstance(flow.get("s"), str):
            return self._refused(request, "The sign-in had expired or was not started here.")
        if not state or not hmac.compare_digest(state.encode(), str(flow["s"]).encode()):
            return self._refused(request, "The sign-in answer does not match (state).")
        if "error" in query:
            return self._refused(request, "The identity provider refused the sign-in.")
        code = query.get("code", [""])[0]
        if not code or len(code) > 4096:
            return self._refused(request, "The identity provider sent no code.")
        try:
            provider = await self.provider(oidc.issuer)
            claims = await self._redeem(request, oidc, provider, code, flow)
        except ProviderError as exc:
            return self._unavailable(request, str(exc))
        except _TokenRejected as exc:
            return self._refused(request, f"The sign-in could not be verified ({exc}).")
        claimed = claims.get("email")
        email = claimed if isinstance(claimed, str) else ""
        if email and claims.get("email_verified") is False:
            email = ""  # an address the provider has not verified names nobody
        raw_groups = claims.get(oidc.groups_claim, [])
        groups = tuple(
            str(g)[:128] for g in (raw_groups if isinstance(raw_groups, list) else [])[:100]
        )
        user = str(claims.get("preferred_username") or email or claims.get("sub", ""))[:256]
        if not oidc_allows(
            oidc.allowed_emails, oidc.allowed_domains, oidc.allowed_groups, email, groups
        ):
            log.info(
                "OIDC user not allowed",
                extra=kv(tunnel=policy.tunnel_id, user=user[:64], client=request.client_ip),
            )
            response = page(
                "Not allowed",
                f"<p>{html.escape(user or 'This account')} may not reach "
                f"{html.escape(request.host)}.</p>"
                f'<a class="button" href="{PREFIX}logout">Use another account</a>',
                status=403,
            )
            response.decision = "oidc_not_allowed"
            return response
        value, session = self.access.sessions.issue(
            "oidc",
            ttl=policy.session_ttl,
            tunnel_id=None if policy.session_domain else policy.tunnel_id,
            domain=policy.session_domain,
            user=user,
            email=email.lower(),
            groups=groups,
            epoch=policy.epoch,
        )
        response = EndpointResponse(303)
        response.headers.append((b"location", safe_return(str(flow.get("r", "/"))).encode()))
        endpoints = _endpoints_cookie(request, value, session.expires - self._clock())
        response.headers.extend(endpoints)
        response.decision = "signed_in"
        return response

    async def _redeem(
        self,
        request: EndpointRequest,
        oidc: OidcSpec,
        provider: _Provider,
        code: str,
        flow: dict[str, Any],
    ) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri(request),
            "code_verifier": str(flow.get("v", "")),
            "client_id": oidc.client_id,
        }
        try:
            if oidc.client_secret:  # client_secret_basic (RFC 6749 §2.3.1)
                response = await self._http.post(
                    provider.token_endpoint, data=form, auth=(oidc.client_id, oidc.client_secret)
                )
            else:  # a public client: PKCE alone
                response = await self._http.post(provider.token_endpoint, data=form)
        except httpx.HTTPError as exc:
            raise ProviderError(f"cannot reach the token endpoint: {type(exc).__name__}") from None
        if response.status_code != 200 or len(response.content) > _MAX_DOCUMENT:
            raise _TokenRejected(f"the token endpoint answered {response.status_code}")
        try:
            tokens = json.loads(response.content)
        except ValueError:
            raise _TokenRejected("the token endpoint did not answer JSON") from None
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str) or len(id_token) > 16384:
            raise _TokenRejected("no ID token")
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise _TokenRejected("the ID token does not parse") from None
        key = await self._key_for(provider, str(header.get("kid", "")))
        if key is None:
            raise _TokenRejected("the ID token is signed with an unknown key")
        try:
            claims = jwt.decode(
                id_token,
                key=key,
                algorithms=_ALGORITHMS,
                audience=oidc.client_id,
                issuer=provider.issuer,
                leeway=CLOCK_SKEW,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise _TokenRejected(type(exc).__name__) from None
        issued = claims.get("iat")
        if not isinstance(issued, int | float) or issued > self._clock() + CLOCK_SKEW:
            raise _TokenRejected("issued in the future")  # not left to the JWT library
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(
            nonce.encode(), str(flow.get("n", "")).encode()
        ):
            raise _TokenRejected("nonce")
        if not isinstance(claims, dict):
            raise _TokenRejected("claims")
        return claims

    def _unavailable(self, request: EndpointRequest, detail: str) -> EndpointResponse:
        log.warning(
            "OIDC provider unavailable",
            extra=kv(tunnel=request.policy.tunnel_id, detail=detail[:200]),
        )
        response = page(
            "Sign-in unavailable",
            "<p>The sign-in provider cannot be reached right now; please try again later.</p>",
            status=503,
        )
        response.decision = "provider_unavailable"
        return response

    def _refused(self, request: EndpointRequest, reason: str) -> EndpointResponse:
        log.info(
            "OIDC sign-in refused",
            extra=kv(tunnel=request.policy.tunnel_id, reason=reason, client=request.client_ip),
        )
        response = page(
            "Sign-in failed",
            f"<p>{html.escape(reason)}</p>"
            f'<a class="button" href="{PREFIX}oidc/start">Try again</a>',
            status=403,
        )
        response.decision = "oidc_refused"
        return response


class _TokenRejected(Exception):
    """The provider's answer did not verify."""


def _endpoints_cookie(
    request: EndpointRequest, value: str, max_age: float
) -> list[tuple[bytes, bytes]]:
    from .policy import SESSION_COOKIE, SSO_COOKIE

    secure = request.proto == "https"
    age = int(max(0, max_age))
    domain = request.policy.session_domain
    cookies = [set_cookie(FLOW_COOKIE, "", secure=secure, max_age=0, path=PREFIX.rstrip("/"))]
    if domain is not None:
        cookies.append(set_cookie(SSO_COOKIE, value, secure=secure, max_age=age, domain=domain))
    else:
        cookies.append(set_cookie(SESSION_COOKIE, value, secure=secure, max_age=age))
    return cookies
