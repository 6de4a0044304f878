"""Access policies as Control keeps them: what an admin sends, what is stored, what the
gateways get (``common.protocol.AccessPolicy``) and what the API shows.

Theory of operation
-------------------
An admin sends a whole policy (``PUT /api/tunnels/{id}/access``, the dashboard, or
``kakuremichi admin tunnel access``) with passwords, a PIN and bearer tokens in clear;
Control keeps only their hashes - argon2id for passwords and PINs (the gateways verify
them), SHA-256 for bearer and share-link tokens (high-entropy secrets: a fast hash is
enough, and the gateway checks one per API request).  A secret left out of an update
keeps its stored hash (a basic-auth user without a password, a bearer rule without a
token, the OIDC client secret, the password when the field is absent; ``password:
null`` removes it), so an admin never has to resend secrets to change an IP rule.

The stored JSON is the gateway's wire form without the tunnel id, epoch and share links
(those have their own columns and table).  The epoch grows when what a session rests on
changes (the password, the basic-auth users, the OIDC provider or client, the session
domain): every session signed in under the old one ends at its next request; a change
to IP rules, path rules, bearer tokens or the allowed lists keeps sessions (and applies
to them at once, as gateways check those on every request).

``session_domain`` must be the tunnel's domain or a parent of it: sign-in is shared by
every tunnel under it that names the same session domain.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic.alias_generators import to_camel

from common import protocol as p
from common.passwords import hash_password
from control.api.models import check_domain
from control.db.store import Row

__all__ = [
    "AccessIn",
    "ShareLinkCreate",
    "access_out",
    "build_stored",
    "new_share_token",
    "policy_spec",
    "share_link_out",
]

_Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_Secret = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, strict=True
    )


class BasicUserIn(_Body):
    """An HTTP basic-auth user; without ``password`` the stored one is kept."""

    user: Annotated[str, StringConstraints(pattern=r"^[^:\x00-\x1f\x7f]{1,128}$")]
    password: _Secret | None = None


class OidcIn(_Body):
    """Single sign-on with an OIDC provider (``clientSecret`` left out: kept)."""

    issuer: Annotated[str, StringConstraints(pattern=r"^https?://[^\s#?]{1,500}$")]
    client_id: _Text
    client_secret: _Secret | None = None
    scopes: list[Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,64}$")]] = Field(
        default_factory=lambda: ["openid", "email", "profile"], max_length=20
    )
    allowed_emails: list[_Text] = Field(default_factory=list, max_length=1000)
    allowed_domains: list[_Text] = Field(default_factory=list, max_length=1000)
    allowed_groups: list[_Text] = Field(default_factory=list, max_length=1000)
    groups_claim: Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,64}$")] = "groups"

    @field_validator("scopes")
    @classmethod
    def _openid(cls, scopes: list[str]) -> list[str]:
        if "openid" not in scopes:
            raise ValueError("scopes must include openid")
        return scopes


class PathRuleIn(_Body):
    """A path prefix and what it asks (``bearerToken`` left out: the stored one kept)."""

    prefix: Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]{0,1023}$")]
    action: Literal["auth", "bypass", "deny", "bearer"]
    bearer_token: Annotated[str, StringConstraints(min_length=16, max_length=256)] | None = None


class AccessIn(_Body):
    """A tunnel's whole access policy (``PUT /api/tunnels/{id}/access``)."""

    ip_allow: list[str] = Field(default_factory=list, max_length=1000)
    ip_deny: list[str] = Field(default_factory=list, max_length=1000)
    basic_auth: list[BasicUserIn] = Field(default_factory=list, max_length=1000)
    password: _Secret | None = Field(
        default=None, description="the sign-in page's password or PIN; null removes it"
    )
    oidc: OidcIn | None = None
    paths: list[PathRuleIn] = Field(default_factory=list, max_length=1000)
    session_domain: str | None = None
    session_ttl: int = Field(default=86400, ge=60, le=p.MAX_SESSION_TTL)
    identity_headers: bool = True

    @field_validator("ip_allow", "ip_deny")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            try:
                out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{value[:64]!r} is not an IP address or network") from None
        return out

    @field_validator("session_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        return None if value is None else check_domain(value)


class ShareLinkCreate(_Body):
    """A new share link: valid for ``expiresIn`` seconds, ``maxUses`` times (null: any)."""

    expires_in: int = Field(default=86400, ge=60, le=365 * 86400)
    max_uses: int | None = Field(default=None, ge=1, le=1_000_000)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_stored(
    body: AccessIn, fields_set: set[str], current: dict[str, Any] | None, tunnel_domain: str | None
) -> tuple[dict[str, Any], bool]:
    """The JSON to store for ``body`` and whether a credential changed (the epoch
    grows); ``current`` is what is stored now.  ValueError names a field that cannot
    be accepted."""
    old = current or {}
    if body.session_domain is not None:
        domain = tunnel_domain or ""
        if domain != body.session_domain and not domain.endswith("." + body.session_domain):
            raise ValueError(
                f"sessionDomain: {body.session_domain!r} is not the tunnel's domain or a "
                f"parent of it ({domain or 'a raw tunnel has none'})"
            )
    if body.password is not None:
        password_hash: str | None = hash_password(body.password)
    elif "password" in fields_set:
        password_hash = None  # null: removed
    else:
        password_hash = old.get("passwordHash")
    old_users = {u["user"]: u["hash"] for u in old.get("basicUsers", [])}
    users = []
    seen: set[str] = set()
    for entry in body.basic_auth:
        if entry.user in seen:
            raise ValueError(f"basicAuth: user {entry.user!r} appears twice")
        seen.add(entry.user)
        if entry.password is not None:
            users.append({"user": entry.user, "hash": hash_password(entry.password)})
        elif entry.user in old_users:
            users.append({"user": entry.user, "hash": old_users[entry.user]})
        else:
            raise ValueError(f"basicAuth: user {entry.user!r} needs a password")
    old_bearers = {
        r["prefix"]: r["bearerHash"] for r in old.get("paths", []) if r.get("bearerHash")
    }
    paths = []
    for rule in body.paths:
        bearer_hash = None
        if rule.action == "bearer":
            if rule.bearer_token is not None:
                bearer_hash = _sha256(rule.bearer_token)
            elif rule.prefix in old_bearers:
                bearer_hash = old_bearers[rule.prefix]
            else:
                raise ValueError(f"paths: {rule.prefix!r} is a bearer rule without a token")
        elif rule.bearer_token is not None:
            raise ValueError(f"paths: {rule.prefix!r} has a token but is not a bearer rule")
        paths.append({"prefix": rule.prefix, "action": rule.action, "bearerHash": bearer_hash})
    oidc = None
    if body.oidc is not None:
        old_oidc = old.get("oidc") or {}
        secret = body.oidc.client_secret
        if secret is None and old_oidc.get("clientId") == body.oidc.client_id:
            secret = old_oidc.get("clientSecret", "")
        oidc = {
            "issuer": body.oidc.issuer,
            "clientId": body.oidc.client_id,
            "clientSecret": secret or "",
            "scopes": body.oidc.scopes,
            "allowedEmails": [e.lower() for e in body.oidc.allowed_emails],
            "allowedDomains": [d.lower() for d in body.oidc.allowed_domains],
            "allowedGroups": body.oidc.allowed_groups,
            "groupsClaim": body.oidc.groups_claim,
        }
    stored = {
        "ipAllow": body.ip_allow,
        "ipDeny": body.ip_deny,
        "basicUsers": users,
        "passwordHash": password_hash,
        "oidc": oidc,
        "paths": paths,
        "sessionDomain": body.session_domain,
        "sessionTtl": body.session_ttl,
        "identityHeaders": body.identity_headers,
    }

    def credentials(policy: dict[str, Any]) -> object:
        provider = policy.get("oidc") or {}
        return (
            policy.get("passwordHash"),
            sorted((u["user"], u["hash"]) for u in policy.get("basicUsers", [])),
            provider.get("issuer"),
            provider.get("clientId"),
            policy.get("sessionDomain"),
        )

    return stored, current is None or credentials(stored) != credentials(old)


def policy_spec(row: Row, links: list[Row]) -> p.AccessPolicy:
    """What gateways get for a stored policy row and the tunnel's share links (parsed
    as a gateway parses it, so Control never sends what a gateway would refuse)."""
    stored = json.loads(row["policy"])
    wire = {
        **stored,
        "tunnelId": row["tunnel_id"],
        "epoch": row["epoch"],
        "shareLinks": [
            {
                "id": link["id"],
                "tokenHash": link["token_hash"],
                "expiresAt": link["expires_at"],
                "usesLeft": None
                if link["max_uses"] is None
                else max(0, link["max_uses"] - link["uses"]),
            }
            for link in links
        ],
    }
    return p.parse_access_policy(wire)


def access_out(row: Row | None, links: list[Row]) -> dict[str, Any]:
    """The API's view of a policy: no hash, no secret, only whether each is set."""
    if row is None:
        return {"enabled": False, "shareLinks": [share_link_out(link) for link in links]}
    stored = json.loads(row["policy"])
    oidc = stored.get("oidc")
    return {
        "enabled": True,
        "epoch": row["epoch"],
        "ipAllow": stored["ipAllow"],
        "ipDeny": stored["ipDeny"],
        "basicAuth": [{"user": u["user"]} for u in stored["basicUsers"]],
        "password": stored["passwordHash"] is not None,
        "oidc": None
        if oidc is None
        else {
            **{k: v for k, v in oidc.items() if k != "clientSecret"},
            "clientSecretSet": bool(oidc.get("clientSecret")),
        },
        "paths": [
            {"prefix": r["prefix"], "action": r["action"], "bearerTokenSet": bool(r["bearerHash"])}
            for r in stored["paths"]
        ],
        "sessionDomain": stored["sessionDomain"],
        "sessionTtl": stored["sessionTtl"],
        "identityHeaders": stored["identityHeaders"],
        "shareLinks": [share_link_out(link) for link in links],
    }


def share_link_out(link: Row, url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": link["id"],
        "expiresAt": link["expires_at"],
        "maxUses": link["max_uses"],
        "uses": link["uses"],
    }
    if url is not None:
        out["url"] = url  # shown once, at creation: it holds the token
    return out


def new_share_token() -> tuple[str, str]:
    """A share-link token (43 URL-safe characters) and its SHA-256."""
    token = secrets.token_urlsafe(32)
    return token, _sha256(token)
