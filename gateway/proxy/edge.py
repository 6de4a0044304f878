"""What both client sessions share: admitting a request, and the session interface.

Theory of operation
-------------------
A request reaches the gateway over HTTP/1.1 (``http._ClientSession``) or as an HTTP/2
stream (``h2session.H2Session``); either way it passes the same checks in the same
order (``http.py``'s module docstring, step 2).  The parts that do not depend on the
wire live here, as functions of the server and the request that return what was
decided, and each session writes the answer in its own framing:

* ``route_for``: the client's rate limit (429 with ``Retry-After``), then the tunnel
  for the host (404 unknown, 503 disabled);
* ``replica_for``: for a tunnel with replicas, the one this request goes to
  (``common.relay.balance``: 503 when every replica is draining), and whether the
  response sets the ``kkm_replica`` cookie of a tunnel sticky by cookie;
* ``access_for``: the tunnel's access policy (``gateway/access``): an ``Access``
  whose outcome is ``ALLOW`` carries the identity fields for the app, anything else
  is answered by the session (``access_refusal`` turns a page-shaped outcome into a
  ``Refusal``; sign-in pages and basic-auth credentials to verify take the session's
  coroutine path).

``ClientSession`` is what ``ProxyServer`` needs of every session it holds (shutdown,
abort, the ``closed`` future, the task it cancels at the end).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from common.protocol import AccessPolicy
from common.relay.balance import COOKIE_NAME
from common.relay.router import Route
from gateway.access.policy import ALLOW, PREFIX, REDIRECT, AccessControl, Outcome

from .headers import Headers

if TYPE_CHECKING:
    from .http import ProxyServer

__all__ = [
    "OPEN",
    "Access",
    "AccessMemo",
    "ClientSession",
    "Refusal",
    "access_for",
    "access_refusal",
    "replica_for",
    "route_for",
    "sticky_cookie",
]


class ClientSession(Protocol):
    """A client connection as ``ProxyServer`` holds it (HTTP/1.1 or HTTP/2)."""

    closed: asyncio.Future[None]

    @property
    def task(self) -> asyncio.Task[None] | None: ...

    def shutdown(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the gateway answers itself with one of its pages."""

    status: int
    reason: str
    #: what the access log says about it
    decision: str
    #: the tunnel it was for, if one was found
    route: Route | None = None
    #: the ``kakuremichi_rejected_total`` reason, if it counts as a rejection
    metric: str | None = None
    extra: tuple[tuple[bytes, bytes], ...] = ()


def route_for(server: ProxyServer, host: str, client_ip: str, now: float) -> Route | Refusal:
    """The client's rate limit, then the enabled tunnel serving ``host``."""
    decision = server.rate_limiter.check(client_ip, now)
    if not decision.allowed:
        return Refusal(
            429,
            "Too many requests from your address; slow down.",
            "rate_limited",
            metric="rate_limit",
            extra=((b"retry-after", str(decision.retry_after).encode()),),
        )
    route = server.router.lookup_host(host)
    if route is None:
        return Refusal(404, f"No tunnel is configured for the host {host[:255]!s}.", "no_route")
    if not route.enabled:
        return Refusal(503, f"The tunnel for {route.domain} is disabled.", "disabled", route)
    return route


_COOKIE_PREFIX = COOKIE_NAME.encode() + b"="


def _replica_token(headers: Headers) -> str | None:
    """The replica a request's ``kkm_replica`` cookie names (None: no such cookie)."""
    for name, value in headers:
        if name == b"cookie":
            start = value.find(_COOKIE_PREFIX)
            while start >= 0:
                if start == 0 or value[start - 1 : start] in (b" ", b";"):
                    token = value[start + len(_COOKIE_PREFIX) :].split(b";", 1)[0].strip()
                    return token.decode("latin-1")[:64]
                start = value.find(_COOKIE_PREFIX, start + 1)
    return None


def replica_for(
    route: Route, client_ip: str, headers: Headers, now: float
) -> tuple[Route, bool] | Refusal:
    """The replica of a replicated tunnel this request goes to, and whether the answer
    sets its sticky cookie (the tunnel is sticky by cookie and the request's cookie
    named no replica that takes traffic)."""
    balance = route.balance
    if balance is None:
        return route, False
    token = _replica_token(headers) if balance.sticky == "cookie" else None
    picked = balance.pick(now, client_ip, token)  # (pick_replica, one call less)
    if picked is None or picked.route is None:
        return Refusal(
            503,
            f"Every agent of the tunnel for {route.domain} is being drained.",
            "draining",
            route,
            extra=((b"retry-after", b"5"),),
        )
    chosen: Route = picked.route
    return chosen, balance.sticky == "cookie" and picked.token != token


def sticky_cookie(route: Route, secure: bool) -> tuple[bytes, bytes]:
    """The ``Set-Cookie`` field that keeps a client on ``route``'s replica (a session
    cookie for the whole site, not readable by scripts)."""
    token = route.replica.token if route.replica is not None else ""
    value = f"{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Lax"
    return b"set-cookie", (value + "; Secure" if secure else value).encode()


@dataclass(frozen=True, slots=True)
class Access:
    """What a tunnel's access policy says about one request."""

    outcome: Outcome
    #: the policy that decided (None: the tunnel has none)
    policy: AccessPolicy | None = None
    #: the ``X-Auth-*`` fields the app gets (None: none)
    identity: list[tuple[bytes, bytes]] | None = None
    #: the request carries the gateway's own cookies, to be removed before the app
    own_cookies: bool = False
    #: ...in its one Cookie field (so they can be cut out of the head's bytes)
    one_cookie_field: bool = False
    #: ``identity`` as header lines (each ``\r\nname: value``), for a head relayed as
    #: it came
    identity_lines: bytes = b""
    #: who the access log says the request is from ("" for nobody in particular)
    user: str = ""


@dataclass(slots=True)
class AccessMemo:
    """The last request a session cookie let in on one connection.

    A keep-alive client sends the same cookie with every request; while the tunnel's
    policy is the same object (a new config replaces it), the client address is the
    same, the request has no ``Authorization``, the policy no path rules and the path
    is not one of the gateway's own pages (``/.kakuremichi/``), and the session has
    neither expired nor been signed out, the answer is the same: it is reused instead
    of parsing and checking the cookie again.  A request whose verbatim head (``raw``)
    is the last one's byte for byte (a client repeating a request) is recognised by one
    comparison, without looking at its fields.
    """

    policy: AccessPolicy | None = None
    client_ip: str = ""
    cookie: bytes | None = None
    #: the verbatim head that let it in (None: not relayed verbatim)
    raw: bytes | None = None
    access: Access | None = None
    session_id: str = ""
    expires: float = 0.0


#: a tunnel without a policy
OPEN = Access(Outcome(ALLOW))


def _memo_answer(access: AccessControl, memo: AccessMemo) -> Access | None:
    """The connection's remembered answer while its session lasts and has not been
    signed out, else None."""
    now = access.now()
    if now < memo.expires and not access.sessions.revocations.revoked(memo.session_id, now):
        return memo.access
    return None


def access_for(
    server: ProxyServer,
    route: Route,
    client_ip: str,
    method: bytes,
    path: str,
    headers: Headers,
    memo: AccessMemo | None = None,
    raw: bytes | None = None,
) -> Access:
    """Check a request against its tunnel's access policy (``AccessControl.check``);
    ``memo``: the connection's last answer, reused when it still holds; ``raw``: the
    request's verbatim head, if it has one (``RequestHead.raw``)."""
    access = server.access
    if not access.policies:
        return OPEN
    policy = access.policies.get(route.tunnel_id)
    if policy is None:
        return OPEN
    stale = False
    if (
        raw is not None
        and memo is not None
        and memo.policy is policy
        and memo.raw == raw  # the same head: the same cookie, path and fields
        and memo.client_ip == client_ip
        and memo.access is not None
        and not policy.paths
    ):
        answer = _memo_answer(access, memo)
        if answer is not None:
            return answer
        stale = True  # the session ended: the cookie below is the same, so check anew
    cookie: bytes | None = None
    cookies = 0
    authorization = False
    for name, value in headers:
        if name == b"cookie":
            cookie = value
            cookies += 1
        elif name == b"authorization":
            authorization = True
    if (
        not stale
        and memo is not None
        and memo.policy is policy
        and memo.cookie is not None
        and memo.cookie == cookie
        and cookies == 1
        and not authorization
        and memo.client_ip == client_ip
        and not policy.paths
        and not path.startswith(PREFIX)
        and memo.access is not None
    ):
        answer = _memo_answer(access, memo)
        if answer is not None:
            return answer
    outcome = access.check(
        policy, host=route.domain, client_ip=client_ip, method=method, path=path, headers=headers
    )
    if outcome.kind != ALLOW:
        return Access(outcome, policy)
    identity = None
    lines = b""
    if outcome.identity is not None and policy.identity_headers:
        identity = outcome.identity.fields()
        lines = b"".join(b"\r\n%s: %s" % field for field in identity)
    own_cookies = policy.sign_in and cookie is not None and b"kkm_" in cookie
    user = outcome.identity.user if outcome.identity is not None else ""
    result = Access(outcome, policy, identity, own_cookies, cookies == 1, lines, user)
    session = outcome.session
    if memo is not None and session is not None and cookies == 1 and not authorization:
        memo.policy, memo.client_ip, memo.cookie, memo.raw = policy, client_ip, cookie, raw
        memo.access, memo.session_id, memo.expires = result, session.id, session.expires
    return result


def access_refusal(outcome: Outcome, route: Route) -> Refusal:
    """The page for an outcome that is one (403, 401, 429, 503, or the 302 to sign in)."""
    if outcome.kind == REDIRECT:
        return Refusal(
            302,
            "Sign in to reach this site.",
            outcome.decision,
            route,
            "access",
            ((b"location", outcome.location.encode("latin-1")),),
        )
    return Refusal(
        outcome.status, outcome.reason, outcome.decision, route, "access", tuple(outcome.headers)
    )
