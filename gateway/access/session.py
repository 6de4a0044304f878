"""Signed session cookies: who signed in to a tunnel (or to every tunnel under a parent
domain), how, and until when.

Theory of operation
-------------------
A session is a small JSON object signed with HMAC-SHA256 under one of the session
keys Control gives every gateway (``GatewayConfig.session_keys``; the first signs,
the others still verify, so keys can be rotated).  Any gateway verifies any other's
cookie; nothing is stored per session except, after a logout, the session's id until
the session would have expired anyway (``Revocations``).

The cookie value is ``v1.<payload>.<mac>`` (both unpadded base64url).  The payload
names the key (``k``), the session id (``i``), how the client signed in (``m``:
``password``, ``share``, ``oidc``), the scope (``t``: a tunnel id, for the tunnel's own
password or share link; ``d``: a parent domain, for single sign-on across the
tunnels under it), the identity (``u`` user, ``e`` e-mail, ``g`` groups), when it was
issued and when it ends (``a``, ``x``, Unix seconds), the tunnel's policy epoch
(``p``: a password change ends the sessions signed in with the old one) and the share
link (``l``: deleting the link ends its sessions).  Whether the session still lets the
client in is the policy's question, asked on every request (``policy.py``): a user
taken off the allowed list is out at the next request.

Verifying costs one HMAC; a cookie verified once is remembered (a bounded table keyed
by the cookie's exact bytes), so a keep-alive client pays a dictionary lookup.  A
value that does not parse, names no known key, has a wrong MAC or has expired is not
a session; nothing about why is told to the client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from common.protocol import SessionKey

__all__ = [
    "MAX_COOKIE_BYTES",
    "Revocations",
    "Session",
    "SessionSigner",
]

#: a session cookie longer than this is not one of ours
MAX_COOKIE_BYTES = 3072
#: seconds a clock may run ahead of another's when checking ``issued``/``expires``
CLOCK_SKEW = 60.0
_VERIFIED_CACHE = 4096
_METHODS = ("password", "share", "oidc")


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session (see the module docstring for the fields)."""

    id: str
    method: str
    tunnel_id: str | None
    domain: str | None
    user: str
    email: str
    groups: tuple[str, ...]
    issued: float
    expires: float
    epoch: int
    link_id: str | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Revocations:
    """Session ids ended by a logout, each kept until the session would have expired."""

    def __init__(self, limit: int = 100_000) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._limit = limit

    def revoke(self, session: Session) -> None:
        self._until[session.id] = session.expires
        self._until.move_to_end(session.id)
        while len(self._until) > self._limit:
            self._until.popitem(last=False)

    def revoked(self, session_id: str, now: float) -> bool:
        until = self._until.get(session_id)
        if until is None:
            return False
        if until + CLOCK_SKEW < now:
            del self._until[session_id]
            return False
        return True


class SessionSigner:
    """Signs and verifies session cookies with the current session keys."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, bytes] = {}
        self._signing: SessionKey | None = None
        self._verified: OrderedDict[str, Session] = OrderedDict()
        self.revocations = Revocations()

    def set_keys(self, keys: tuple[SessionKey, ...]) -> None:
        """The keys from Control's latest config (the first signs)."""
        fresh = {key.id: key.secret for key in keys}
        if fresh != self._keys:
            self._keys = fresh
            self._verified.clear()  # a key gone must not keep its sessions alive
        self._signing = keys[0] if keys else None

    @property
    def ready(self) -> bool:
        """Whether a session can be signed (Control sent a key)."""
        return self._signing is not None

    def issue(
        self,
        method: str,
        *,
        ttl: float,
        tunnel_id: str | None = None,
        domain: str | None = None,
        user: str = "",
        email: str = "",
        groups: tuple[str, ...] = (),
        epoch: int = 0,
        link_id: str | None = None,
    ) -> tuple[str, Session]:
        """A new signed cookie value and the session it holds."""
        key = self._signing
        if key is None:
            raise RuntimeError("no session key from Control yet")
        if method not in _METHODS:
            raise ValueError(f"unknown sign-in method {method!r}")
        now = self._clock()
        session = Session(
            _b64(secrets.token_bytes(16)),
            method,
            tunnel_id,
            domain,
            user,
            email,
            groups,
            float(int(now)),
            float(int(now + ttl)),
            epoch,
            link_id,
        )
        body = {
            "k": key.id,
            "i": session.id,
            "m": method,
            "t": tunnel_id,
            "d": domain,
            "u": user,
            "e": email,
            "g": list(groups),
            "a": int(session.issued),
            "x": int(session.expires),
            "p": epoch,
            "l": link_id,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        mac = hmac.new(key.secret, b"v1." + payload.encode(), hashlib.sha256).digest()
        value = f"v1.{payload}.{_b64(mac)}"
        if len(value) > MAX_COOKIE_BYTES:
            raise ValueError("the session does not fit in a cookie (too many groups?)")
        return value, session

    def verify(self, value: str) -> Session | None:
        """The session in a cookie value, or None (forged, expired, revoked, garbage)."""
        now = self._clock()
        session = self._verified.get(value)
        if session is None:
            session = self._parse(value)
            if session is None:
                return None
            self._verified[value] = session
            if len(self._verified) > _VERIFIED_CACHE:
                self._verified.popitem(last=False)
        if session.expires <= now or session.issued > now + CLOCK_SKEW:
            return None
        if self.revocations.revoked(session.id, now):
            return None
        return session

    def _parse(self, value: str) -> Session | None:
        if len(value) > MAX_COOKIE_BYTES or not value.startswith("v1."):
            return None
        payload, _, mac_text = value[3:].partition(".")
        if not payload or not mac_text or "." in mac_text:
            return None
        try:
            raw = _unb64(payload)
            mac = _unb64(mac_text)
            body = json.loads(raw)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict):
            return None
        key_id = body.get("k")
        secret = self._keys.get(key_id) if isinstance(key_id, str) else None
        if secret is None:
            return None
        expected = hmac.new(secret, b"v1." + payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            return _session(body)
        except (TypeError, ValueError):
            return None  # signed by us, so this is a bug or an old format: not a session


def _session(body: dict[str, object]) -> Session:
    def text(key: str) -> str:
        value = body.get(key)
        if not isinstance(value, str):
            raise TypeError(key)
        return value

    def optional(key: str) -> str | None:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(key)
        return value

    def integer(key: str) -> int:
        value = body.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(key)
        return value

    groups = body.get("g")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise TypeError("g")
    method = text("m")
    if method not in _METHODS:
        raise ValueError(method)
    return Session(
        text("i"),
        method,
        optional("t"),
        optional("d"),
        text("u"),
        text("e"),
        tuple(groups),
        float(integer("a")),
        float(integer("x")),
        integer("p"),
        optional("l"),
    )
