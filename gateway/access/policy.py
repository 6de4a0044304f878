"""Who may reach a tunnel: a request checked against its tunnel's access policy.

Theory of operation
-------------------
Control sends every gateway each tunnel's ``AccessPolicy`` (``common.protocol``) and
the session keys; ``AccessControl.update`` takes them from each new config, so a
policy change is in force for the next request (no session is trusted beyond what
the current policy allows).  ``check`` runs in the request's admission, after the
route is known and before any byte goes to the agent, cheapest and least trusting
first:

1. **IP rules** on the client address the gateway trusts (the TCP peer, or behind a
   configured trusted proxy the address it names; ``headers.client_address``): a
   match in ``ip_deny`` is refused, and with an ``ip_allow`` list only a match in it
   passes (403).  These hold for every path, also bypassed ones, also the gateway's
   own sign-in pages.
2. **The gateway's own pages** under ``/.kakuremichi/`` (sign-in, sign-out, share
   links, the OIDC callback) are served by the gateway (``endpoints.py``) when the
   policy asks anybody to sign in.
3. **Path rules**, the longest matching prefix first: ``deny`` (403), ``bypass`` (in
   without signing in: a public ``/.well-known/``), ``bearer`` (an
   ``Authorization: Bearer`` token whose SHA-256 the rule holds, for API clients; 401
   otherwise), ``auth`` or no rule (step 4).
4. **Sign-in**, when the policy has any way to sign in: HTTP basic auth (argon2id
   hashes; a right password is remembered for a while by a keyed digest, so a
   client that sends it with every request costs one HMAC, not one argon2), or a
   session cookie (``session.py``) that this policy still accepts: a password
   session of this tunnel under the policy's current epoch, a share-link session of
   a link that still exists, or an OIDC session (of this tunnel, or of the policy's
   ``session_domain`` for single sign-on) whose user the OIDC rules still allow.
   Without one, a browser asking for a page is sent to the sign-in page (or straight
   to the identity provider when that is the only way in); anything else gets 401
   (``WWW-Authenticate: Basic`` when basic auth is on).
5. An allowed request carries the identity to the app in ``X-Auth-User``,
   ``X-Auth-Email`` and ``X-Auth-Groups`` (``policy.identity_headers``); the gateway
   always removes these fields, and its own cookies, from what clients send.

**Fail closed**: a policy the gateway cannot evaluate - no session key from Control
yet, an identity provider that cannot be reached - refuses with a page that says so
(503), never lets the request through.  Sign-in attempts are rate-limited per client
and per tunnel (429 with ``Retry-After``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from common.passwords import verify_nobody, verify_password
from common.protocol import AccessPolicy, PathRule, SessionKey
from common.relay.limits import RateLimiter

from .session import Session, SessionSigner

if TYPE_CHECKING:
    from .oidc import OidcClients

__all__ = [
    "ALLOW",
    "CHALLENGE",
    "DENY",
    "ENDPOINT",
    "PREFIX",
    "REDIRECT",
    "SESSION_COOKIE",
    "SSO_COOKIE",
    "VERIFY",
    "AccessControl",
    "Identity",
    "Outcome",
]

#: the gateway's own pages on every tunnel that asks for a sign-in
PREFIX = "/.kakuremichi/"
#: a session for one tunnel (host-only cookie)
SESSION_COOKIE = "kkm_session"
#: a single sign-on session for every tunnel under a parent domain
SSO_COOKIE = "kkm_sso"
#: cookies the gateway owns: never passed to an app
OWN_COOKIES = frozenset({SESSION_COOKIE, SSO_COOKIE, "kkm_csrf", "kkm_oidc"})
#: fields only the gateway may state towards an app
IDENTITY_FIELDS = (b"x-auth-user", b"x-auth-email", b"x-auth-groups")

# outcome kinds
ALLOW = 0
DENY = 1
CHALLENGE = 2
REDIRECT = 3
ENDPOINT = 4
#: basic-auth credentials not seen before: verify them (argon2, off the loop), then
#: check again
VERIFY = 5

#: a right basic-auth password is remembered this long
_BASIC_REMEMBER = 600.0
_BASIC_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is from, as the app is told."""

    user: str
    email: str = ""
    groups: tuple[str, ...] = ()
    method: str = ""

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The identity header fields (values reduced to visible ASCII)."""
        return [
            (b"x-auth-user", _field_value(self.user)),
            (b"x-auth-email", _field_value(self.email)),
            (b"x-auth-groups", _field_value(",".join(self.groups))),
        ]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``check`` decided for a request."""

    kind: int
    status: int = 200
    reason: str = ""
    identity: Identity | None = None
    location: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: what the access log says about it (``allow`` or why not)
    decision: str = "allow"
    #: the session that let the request in (a connection may reuse the answer while
    #: the session and the policy stay the same: ``gateway/proxy/edge.AccessMemo``)
    session: Session | None = None


#: the common answers, made once
_ALLOW_ANONYMOUS = Outcome(ALLOW)
_ENDPOINT = Outcome(ENDPOINT, decision="gateway_page")


def _field_value(text: str) -> bytes:
    """A header field value from untrusted text: visible ASCII and spaces only (an
    identity provider's claims never break a head), at most 1024 bytes."""
    data = text.encode("utf-8", "replace")[:1024]
    if all(0x20 <= b < 0x7F for b in data):
        return data.strip()
    return bytes(b if 0x20 <= b < 0x7F else 0x3F for b in data).strip()


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=1024)
def _networks(
    prefixes: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in prefixes)


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefixes: tuple[str, ...]) -> bool:
    return any(address in net for net in _networks(prefixes))


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def cookie_values(headers: list[tuple[bytes, bytes]], name: str) -> list[str]:
    """Every value of cookie ``name`` in the request's Cookie fields."""
    found = []
    needle = name.encode() + b"="
    for key, value in headers:
        if key != b"cookie" or needle not in value:
            continue
        for pair in value.split(b";"):
            pair = pair.strip()
            if pair.startswith(needle):
                found.append(pair[len(needle) :].decode("latin-1"))
    return found


def strip_own_cookies(value: bytes) -> bytes:
    """A Cookie field's value without the gateway's own cookies (b"" if none is left)."""
    kept = [
        pair
        for pair in (p.strip() for p in value.split(b";"))
        if pair and pair.split(b"=", 1)[0].decode("latin-1") not in OWN_COOKIES
    ]
    return b"; ".join(kept)


def longest_rule(rules: tuple[PathRule, ...], path: str) -> PathRule | None:
    best: PathRule | None = None
    for rule in rules:
        if path.startswith(rule.prefix) and (best is None or len(rule.prefix) > len(best.prefix)):
            best = rule
    return best


#: how strict a path rule is, when a path and its canonical form match different ones
_STRICTNESS = {"bypass": 0, "bearer": 1, "auth": 2, "deny": 3}


def canonical_path(path: str) -> str:
    """The path as an application is likely to read it: percent-decoded once,
    backslashes as slashes, runs of slashes as one, ``.`` and ``..`` segments resolved
    (RFC 3986 §5.2.4)."""
    text = unquote(path, errors="replace").replace("\\", "/")
    out: list[str] = []
    for segment in text.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    tail = "/" if text.endswith(("/", "/.", "/..")) and out else ""
    return "/" + "/".join(out) + tail


def strictest_rule(rules: tuple[PathRule, ...], path: str) -> PathRule | None:
    """The rule for ``path``: the longest matching prefix; when the path is not in
    canonical form (``/public/%2e%2e/admin``, ``//admin``), the stricter of the rules of
    the path as sent and as the application may read it, so that no spelling of a
    path reaches it with less than its own rule asks."""
    rule = longest_rule(rules, path)
    canonical = canonical_path(path)
    if canonical == path:
        return rule
    other = longest_rule(rules, canonical)
    if other is None:
        return rule if rule is not None and rule.action == "deny" else None
    if rule is None or _STRICTNESS[other.action] > _STRICTNESS[rule.action]:
        return other
    return rule


def under(host: str, domain: str) -> bool:
    """Whether ``host`` is ``domain`` or one of its subdomains."""
    return host == domain or host.endswith("." + domain)


def safe_return(target: str | None) -> str:
    """Where to send a client back after signing in: a path on the same host only
    (no scheme, no authority, no backslash tricks), else ``/``."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    if any(c in target for c in "\\\r\n\t") or not target.isascii() or len(target) > 2048:
        return "/"
    return target


class AccessControl:
    """The gateway's access policies and sessions (see the module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        attempts_per_client: tuple[float, int] = (10 / 60, 10),
        attempts_per_tunnel: tuple[float, int] = (100 / 60, 100),
    ) -> None:
        self._clock = clock
        self.policies: dict[str, AccessPolicy] = {}
        self.sessions = SessionSigner(clock)
        self.oidc: OidcClients | None = None
        self._client_attempts = RateLimiter(*attempts_per_client, max_tracked=100_000)
        self._tunnel_attempts = RateLimiter(*attempts_per_tunnel, max_tracked=100_000)
        #: HMAC key for remembering basic-auth credentials (never leaves the process)
        self._basic_key = secrets.token_bytes(32)
        #: keyed digest of a right Authorization value -> (until, user, its hash then)
        self._basic_ok: OrderedDict[bytes, tuple[float, str, str]] = OrderedDict()
        #: uses of each share link on this gateway (Control's count comes with the policy)
        self.link_uses: dict[str, int] = {}

    # -- configuration ------------------------------------------------------------

    def update(self, policies: tuple[AccessPolicy, ...], keys: tuple[SessionKey, ...]) -> None:
        """The policies and session keys of Control's latest config."""
        self.policies = {policy.tunnel_id: policy for policy in policies}
        self.sessions.set_keys(keys)
        live = {link.id for policy in policies for link in policy.share_links}
        for link_id in list(self.link_uses):
            if link_id not in live:
                del self.link_uses[link_id]

    def now(self) -> float:
        """The clock sessions are checked against."""
        return self._clock()

    @property
    def active(self) -> bool:
        """Whether any tunnel has a policy (else ``check`` is never needed)."""
        return bool(self.policies)

    # -- the check ----------------------------------------------------------------

    def check(
        self,
        policy: AccessPolicy,
        *,
        host: str,
        client_ip: str,
        method: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
    ) -> Outcome:
        """Whether a request may reach ``policy``'s tunnel (module docstring)."""
        if policy.ip_deny or policy.ip_allow:
            address = _address(client_ip)
            if not self._ip_ok(policy, address):
                return Outcome(
                    DENY, 403, "Your address may not reach this site.", decision="deny_ip"
                )
        if not policy.sign_in:
            return _ALLOW_ANONYMOUS
        if path.startswith(PREFIX):
            return _ENDPOINT
        rule = strictest_rule(policy.paths, path) if policy.paths else None
        if rule is not None:
            if rule.action == "deny":
                return Outcome(DENY, 403, "This path is not served.", decision="deny_path")
            if rule.action == "bypass":
                return _ALLOW_ANONYMOUS
            if rule.action == "bearer":
                return self._bearer(rule, headers)
        return self._signed_in(policy, host, client_ip, method, path, headers)

    @staticmethod
    def _ip_ok(
        policy: AccessPolicy, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ) -> bool:
        if address is None or (policy.ip_deny and _in(address, policy.ip_deny)):
            return False
        return not policy.ip_allow or _in(address, policy.ip_allow)

    def ip_allowed(self, tunnel_id: str, client_ip: str) -> bool:
        """Whether a raw TCP/UDP tunnel's IP rules let ``client_ip`` in (no policy: yes)."""
        policy = self.policies.get(tunnel_id)
        if policy is None or not (policy.ip_deny or policy.ip_allow):
            return True
        return self._ip_ok(policy, _address(client_ip))

    def _bearer(self, rule: PathRule, headers: list[tuple[bytes, bytes]]) -> Outcome:
        for key, value in headers:
            if key == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and rule.bearer_hash is not None:
                    digest = sha256_hex(token.strip())
                    if hmac.compare_digest(digest, rule.bearer_hash):
                        return Outcome(ALLOW, identity=Identity("bearer", method="bearer"))
        return Outcome(
            CHALLENGE,
            401,
            "This path needs a bearer token.",
            headers=((b"www-authenticate", b'Bearer realm="kakuremichi"'),),
            decision="bad_bearer"
            if any(k == b"authorization" for k, _ in headers)
            else "unauthenticated",
        )

    def _signed_in(
        self,
        policy: AccessPolicy,
        host: str,
        client_ip: str,
        method: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
    ) -> Outcome:
        if policy.basic_users:
            for key, value in headers:
                if key == b"authorization" and value[:6].lower() == b"basic ":
                    return self._basic(policy, value, client_ip)
        session = self.session_for(policy, host, headers)
        if session is not None:
            identity = self.admits(policy, session)
            if identity is not None:
                return Outcome(ALLOW, identity=identity, session=session)
        if not self.sessions.ready and (policy.password_hash or policy.oidc or policy.share_links):
            return Outcome(
                DENY, 503, "Sign-in is not available yet (no session key).", decision="unavailable"
            )
        return self._unauthenticated(policy, method, path, headers)

    def _unauthenticated(
        self,
        policy: AccessPolicy,
        method: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
    ) -> Outcome:
        browser = method in (b"GET", b"HEAD") and any(
            key == b"accept" and b"text/html" in value for key, value in headers
        )
        if browser and (policy.password_hash or policy.oidc):
            only_oidc = policy.oidc is not None and not (policy.password_hash or policy.basic_users)
            page = "oidc/start" if only_oidc else "login"
            return Outcome(
                REDIRECT,
                302,
                location=f"{PREFIX}{page}?rd={_quote(path)}",
                decision="unauthenticated",
            )
        if policy.basic_users:
            return Outcome(
                CHALLENGE,
                401,
                "Sign in to reach this site.",
                headers=((b"www-authenticate", b'Basic realm="kakuremichi", charset="UTF-8"'),),
                decision="unauthenticated",
            )
        return Outcome(CHALLENGE, 401, "Sign in to reach this site.", decision="unauthenticated")

    # -- basic auth -----------------------------------------------------------------

    def _basic_digest(self, policy: AccessPolicy, value: bytes) -> bytes:
        data = f"{policy.tunnel_id}\0{policy.epoch}\0".encode() + value
        return hmac.new(self._basic_key, data, hashlib.sha256).digest()

    def _basic(self, policy: AccessPolicy, value: bytes, client_ip: str) -> Outcome:
        digest = self._basic_digest(policy, value)
        now = self._clock()
        remembered = self._basic_ok.get(digest)
        if remembered is not None and remembered[0] > now:
            _until, user, hashed = remembered
            # still a user of this policy, with the same password hash
            if any(u.user == user and u.hash == hashed for u in policy.basic_users):
                return Outcome(ALLOW, identity=Identity(user, method="basic"))
        limited = self.attempt(policy, client_ip, now)
        if limited is not None:
            return limited
        return Outcome(VERIFY, decision="verify_basic")

    def verify_basic(self, policy: AccessPolicy, value: bytes) -> bool:
        """Check basic-auth credentials against the argon2id hashes (slow: call it off
        the event loop) and remember them if right."""
        parsed = basic_credentials(value)
        if parsed is None:
            return False
        user, password = parsed
        for entry in policy.basic_users:
            if hmac.compare_digest(entry.user.encode(), user.encode()):
                if verify_password(entry.hash, password):
                    self._remember_basic(policy, value, entry.user, entry.hash)
                    return True
                return False
        return verify_nobody(password)  # the same time for an unknown user

    def _remember_basic(self, policy: AccessPolicy, value: bytes, user: str, hashed: str) -> None:
        digest = self._basic_digest(policy, value)
        self._basic_ok[digest] = (self._clock() + _BASIC_REMEMBER, user, hashed)
        self._basic_ok.move_to_end(digest)
        while len(self._basic_ok) > _BASIC_CACHE:
            self._basic_ok.popitem(last=False)

    # -- sessions -----------------------------------------------------------------

    def session_for(
        self, policy: AccessPolicy, host: str, headers: list[tuple[bytes, bytes]]
    ) -> Session | None:
        """The first session cookie on the request that this policy could accept."""
        for name in (SESSION_COOKIE, SSO_COOKIE):
            for value in cookie_values(headers, name):
                session = self.sessions.verify(value)
                if session is not None and self.admits(policy, session, host) is not None:
                    return session
        return None

    def admits(
        self, policy: AccessPolicy, session: Session, host: str | None = None
    ) -> Identity | None:
        """The identity a session gives on ``policy``'s tunnel, if the policy (as it is
        now) still lets it in."""
        if session.method == "password":
            if policy.password_hash is None or session.tunnel_id != policy.tunnel_id:
                return None
            if session.epoch != policy.epoch:
                return None
        elif session.method == "share":
            if session.tunnel_id != policy.tunnel_id or session.epoch != policy.epoch:
                return None
            if not any(link.id == session.link_id for link in policy.share_links):
                return None
        elif session.method == "oidc":
            oidc = policy.oidc
            if oidc is None:
                return None
            if session.tunnel_id != policy.tunnel_id:
                domain = policy.session_domain
                if domain is None or session.domain != domain:
                    return None
                if host is not None and not under(host, domain):
                    return None
            if not oidc_allows(
                oidc.allowed_emails,
                oidc.allowed_domains,
                oidc.allowed_groups,
                session.email,
                session.groups,
            ):
                return None
        else:
            return None
        return Identity(session.user, session.email, session.groups, session.method)

    # -- rate limits ------------------------------------------------------------------

    def attempt(self, policy: AccessPolicy, client_ip: str, now: float) -> Outcome | None:
        """Count one sign-in attempt; a 429 outcome when the client or the tunnel has
        made too many."""
        for limiter, key in (
            (self._client_attempts, client_ip),
            (self._tunnel_attempts, "tunnel " + policy.tunnel_id),
        ):
            decision = limiter.check(key, now)
            if not decision.allowed:
                return Outcome(
                    DENY,
                    429,
                    "Too many sign-in attempts; wait a little.",
                    headers=((b"retry-after", str(decision.retry_after).encode()),),
                    decision="rate_limited",
                )
        return None


def oidc_allows(
    emails: tuple[str, ...],
    domains: tuple[str, ...],
    groups: tuple[str, ...],
    email: str,
    member_of: tuple[str, ...],
) -> bool:
    """Whether an OIDC user passes a tunnel's lists (no list at all: any user of the
    provider; otherwise a match in any of them)."""
    if not (emails or domains or groups):
        return True
    address = email.lower()
    if address and address in emails:
        return True
    if address and "@" in address and address.rpartition("@")[2] in domains:
        return True
    return any(group in groups for group in member_of)


def _quote(path: str) -> str:
    return quote(path, safe="/")


def basic_credentials(value: bytes) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic`` field value."""
    scheme, _, encoded = value.partition(b" ")
    if scheme.lower() != b"basic" or len(encoded) > 2048:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def basic_user(value: bytes) -> str | None:
    parsed = basic_credentials(value)
    return parsed[0] if parsed is not None else None
