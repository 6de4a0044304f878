"""The gateway's own pages under ``/.kakuremichi/`` on a tunnel that asks for a sign-in.

Theory of operation
-------------------
``GET login`` shows a password (or PIN) form; ``POST login`` checks it (argon2id, in a
thread) and answers with a session cookie and a redirect back to where the client was
going; ``logout`` ends the sessions the request carries (they stay refused by every
request this gateway sees until they would have expired) and clears the cookies;
``GET share`` is the page a share link opens: the token travels in the URL's fragment
(``…/.kakuremichi/share#t=TOKEN``), which browsers never send to a server, so no
server or proxy log ever holds it, and a few lines of script post it back here, where
``POST share`` exchanges it for a session.  ``oidc/start`` and ``oidc/callback`` are
the single sign-on flow (``oidc.py``).

Forms carry a CSRF token that must equal the ``kkm_csrf`` cookie (double submit; the
cookie is ``SameSite=Strict`` and scoped to ``/.kakuremichi/``), and a POST whose
``Origin`` names another site is refused.  The address to return to after signing in
is a path on the same host (``policy.safe_return``), never another site.  Sign-in
attempts count against the client's and the tunnel's budget (``AccessControl.attempt``).

Cookies: the session cookie is ``HttpOnly``, ``SameSite=Lax``, ``Path=/``, and
``Secure`` when the request came over HTTPS (a browser refuses a ``Secure`` cookie over
plain HTTP); an OIDC session under a policy's ``session_domain`` is the ``kkm_sso``
cookie with that ``Domain``, so every tunnel under it shares the sign-in.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlsplit

from common.protocol import AccessPolicy

from .policy import (
    PREFIX,
    SESSION_COOKIE,
    SSO_COOKIE,
    AccessControl,
    cookie_values,
    safe_return,
    sha256_hex,
)

__all__ = ["MAX_FORM_BYTES", "EndpointRequest", "EndpointResponse", "Endpoints"]

#: a sign-in form is small; more is refused (413)
MAX_FORM_BYTES = 8192
CSRF_COOKIE = "kkm_csrf"


@dataclass(frozen=True, slots=True)
class EndpointRequest:
    """What an endpoint sees of a request (the body already read, bounded)."""

    policy: AccessPolicy
    #: the tunnel's domain (what the route matched)
    host: str
    proto: str
    client_ip: str
    method: bytes
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    #: the host and port the client reached us at (its Host), for URLs back to us
    authority: str = ""

    @property
    def origin(self) -> str:
        """``scheme://host[:port]`` the client reached this tunnel at."""
        return f"{self.proto}://{self.authority or self.host}"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, max_num_fields=20)

    def form(self) -> dict[str, list[str]]:
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            return {}
        return parse_qs(text, max_num_fields=20)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class EndpointResponse:
    """What an endpoint answers."""

    status: int
    body: bytes = b""
    content_type: bytes = b"text/html; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: the request was a sign-in attempt that failed (for the access log)
    decision: str = ""


def _first(values: dict[str, list[str]], key: str) -> str:
    found = values.get(key)
    return found[0] if found else ""


def set_cookie(
    name: str,
    value: str,
    *,
    secure: bool,
    max_age: int,
    path: str = "/",
    domain: str | None = None,
    same_site: str = "Lax",
) -> tuple[bytes, bytes]:
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly"]
    parts.append(f"SameSite={same_site}")
    if domain:
        parts.append(f"Domain={domain}")
    if secure:
        parts.append("Secure")
    return (b"set-cookie", "; ".join(parts).encode("latin-1"))


def page(title: str, body_html: str, *, status: int = 200) -> EndpointResponse:
    """A small self-contained page in the gateway's style (no external resources)."""
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;background:#f4f5f7;color:#1d2330;margin:0}"
        "main{max-width:24rem;margin:12vh auto;background:#fff;padding:2rem;"
        "border-radius:.75rem;box-shadow:0 1px 4px #0002}"
        "h1{font-size:1.3rem;margin-top:0}label{display:block;margin:.8rem 0 .3rem}"
        "input{width:100%;box-sizing:border-box;padding:.6rem;font-size:1rem;"
        "border:1px solid #8a93a6;border-radius:.4rem}"
        "button,.button{box-sizing:border-box;margin-top:1rem;width:100%;padding:.65rem;"
        "font-size:1rem;border:0;"
        "border-radius:.4rem;background:#1f4fd1;color:#fff;cursor:pointer;display:block;"
        "text-align:center;text-decoration:none}"
        "p.error{color:#a4161a}small{color:#5a6275}"
        "</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>{body_html}"
        "<p><small>kakuremichi gateway</small></p></main></body></html>\n"
    )
    return EndpointResponse(status, document.encode())


class Endpoints:
    """Serves ``/.kakuremichi/…`` for the tunnels whose policy asks for a sign-in."""

    def __init__(
        self,
        access: AccessControl,
        *,
        clock: Callable[[], float] = time.time,
        on_share_used: Callable[[str, str], None] | None = None,
    ) -> None:
        self.access = access
        self._clock = clock
        #: told (tunnel id, link id) each time a share link is used (Control counts)
        self.on_share_used = on_share_used

    @staticmethod
    def wants_body(method: bytes, path: str) -> bool:
        """Whether the endpoint reads a form body (the caller reads it, bounded)."""
        return method == b"POST"

    async def handle(self, request: EndpointRequest) -> EndpointResponse:
        name = request.path[len(PREFIX) :]
        method = request.method
        if name == "login":
            if method in (b"GET", b"HEAD"):
                return self._login_page(request)
            if method == b"POST":
                return await self._login(request)
        elif name == "logout" and method in (b"GET", b"HEAD", b"POST"):
            return self._logout(request)
        elif name == "share":
            if method in (b"GET", b"HEAD"):
                return self._share_page(request)
            if method == b"POST":
                return self._share(request)
        elif name in ("oidc/start", "oidc/callback") and method in (b"GET", b"HEAD"):
            oidc = self.access.oidc
            if request.policy.oidc is None or oidc is None:
                return page("Not found", "<p>This site has no single sign-on.</p>", status=404)
            if name == "oidc/start":
                return await oidc.start(request)
            return await oidc.callback(request)
        else:
            return page("Not found", "<p>There is no such page here.</p>", status=404)
        response = page("Method not allowed", "<p>That is not how this page is used.</p>")
        response.status = 405
        return response

    # -- CSRF -------------------------------------------------------------------------

    def _csrf(self, request: EndpointRequest) -> tuple[str, tuple[bytes, bytes] | None]:
        """The client's CSRF token, and a cookie to set when it has none yet."""
        for value in cookie_values(request.headers, CSRF_COOKIE):
            if 20 <= len(value) <= 64 and value.isascii():
                return value, None
        token = secrets.token_urlsafe(24)
        cookie = set_cookie(
            CSRF_COOKIE,
            token,
            secure=request.proto == "https",
            max_age=3600,
            path=PREFIX.rstrip("/"),
            same_site="Strict",
        )
        return token, cookie

    def _csrf_ok(self, request: EndpointRequest, form: dict[str, list[str]]) -> bool:
        origin = request.header(b"origin")
        if origin is not None and origin != b"null":
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
            if netloc.rsplit(":", 1)[0].strip("[]") != request.host:
                return False
        sent = _first(form, "csrf")
        return bool(sent) and any(
            hmac.compare_digest(sent.encode(), value.encode())
            for value in cookie_values(request.headers, CSRF_COOKIE)
        )

    # -- password ---------------------------------------------------------------------

    def _login_page(self, request: EndpointRequest, *, error: str = "") -> EndpointResponse:
        policy = request.policy
        back = safe_return(_first(request.query(), "rd") or _first(request.form(), "rd"))
        if policy.password_hash is None:
            if policy.oidc is not None:
                response = EndpointResponse(302)
                response.headers.append((b"location", _location(PREFIX + "oidc/start", back)))
                return response
            return page("Sign in", "<p>This site has no sign-in page.</p>", status=404)
        token, cookie = self._csrf(request)
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        sso = ""
        if policy.oidc is not None:
            link = html.escape(_location(PREFIX + "oidc/start", back).decode())
            sso = f'<a class="button" href="{link}">Sign in with single sign-on</a>'
        body = (
            f"<p>{html.escape(request.host)} asks for a password.</p>{message}"
            f'<form method="post" action="{PREFIX}login">'
            f'<input type="hidden" name="csrf" value="{html.escape(token)}">'
            f'<input type="hidden" name="rd" value="{html.escape(back)}">'
            '<label for="password">Password or PIN</label>'
            '<input id="password" name="password" type="password" autocomplete="current-password"'
            " required autofocus>"
            '<button type="submit">Sign in</button></form>'
            f"{sso}"
        )
        response = page("Sign in", body, status=401 if error else 200)
        if cookie is not None:
            response.headers.append(cookie)
        return response

    async def _login(self, request: EndpointRequest) -> EndpointResponse:
        policy = request.policy
        form = request.form()
        if policy.password_hash is None:
            return page("Sign in", "<p>This site has no password.</p>", status=404)
        if not self._csrf_ok(request, form):
            response = page(
                "Sign in",
                "<p>The form had expired or came from another site. Please try again.</p>",
                status=403,
            )
            response.decision = "csrf"
            return response
        limited = self.access.attempt(policy, request.client_ip, self._clock())
        if limited is not None:
            response = page("Sign in", f"<p>{html.escape(limited.reason)}</p>", status=429)
            response.headers.extend(limited.headers)
            response.decision = "rate_limited"
            return response
        password = _first(form, "password")
        loop = asyncio.get_running_loop()
        from common.passwords import verify_password

        right = bool(password) and await loop.run_in_executor(
            None, verify_password, policy.password_hash, password
        )
        if not right:
            response = self._login_page(request, error="That password is not right.")
            response.decision = "bad_password"
            return response
        value, _ = self.access.sessions.issue(
            "password",
            ttl=policy.session_ttl,
            tunnel_id=policy.tunnel_id,
            user="password",
            epoch=policy.epoch,
        )
        response = EndpointResponse(303)
        response.headers.append((b"location", safe_return(_first(form, "rd")).encode()))
        response.headers.append(
            set_cookie(
                SESSION_COOKIE,
                value,
                secure=request.proto == "https",
                max_age=policy.session_ttl,
            )
        )
        response.decision = "signed_in"
        return response

    # -- sign-out ---------------------------------------------------------------------

    def _logout(self, request: EndpointRequest) -> EndpointResponse:
        signer = self.access.sessions
        for name in (SESSION_COOKIE, SSO_COOKIE):
            for value in cookie_values(request.headers, name):
                session = signer.verify(value)
                if session is not None:
                    signer.revocations.revoke(session)
        secure = request.proto == "https"
        response = page(
            "Signed out",
            f"<p>You are signed out of {html.escape(request.host)}.</p>"
            f'<a class="button" href="/">Sign in again</a>',
        )
        response.headers.append(set_cookie(SESSION_COOKIE, "", secure=secure, max_age=0))
        domain = request.policy.session_domain
        if domain is not None:
            response.headers.append(
                set_cookie(SSO_COOKIE, "", secure=secure, max_age=0, domain=domain)
            )
        response.decision = "signed_out"
        return response

    # -- share links ------------------------------------------------------------------

    def _share_page(self, request: EndpointRequest) -> EndpointResponse:
        token, cookie = self._csrf(request)
        body = (
            "<p>Opening the shared link…</p>"
            f'<form id="share" method="post" action="{PREFIX}share">'
            f'<input type="hidden" name="csrf" value="{html.escape(token)}">'
            '<input type="hidden" id="token" name="token" value=""></form>'
            "<noscript><p>This link needs JavaScript to open.</p></noscript>"
            "<script>(function(){var m=/[#&]t=([A-Za-z0-9_-]{16,128})/.exec(location.hash);"
            "if(!m){document.querySelector('p').textContent="
            "'This link is incomplete: ask for it again.';return}"
            "history.replaceState(null,'',location.pathname);"
            "document.getElementById('token').value=m[1];"
            "document.getElementById('share').submit()})();</script>"
        )
        response = page("Shared link", body)
        response.headers.append((b"referrer-policy", b"no-referrer"))
        response.headers.append(
            (
                b"content-security-policy",
                b"default-src 'none'; script-src 'unsafe-inline'; "
                b"style-src 'unsafe-inline'; form-action 'self'",
            )
        )
        if cookie is not None:
            response.headers.append(cookie)
        return response

    def _share(self, request: EndpointRequest) -> EndpointResponse:
        policy = request.policy
        form = request.form()
        limited = self.access.attempt(policy, request.client_ip, self._clock())
        if limited is not None:
            response = page("Shared link", f"<p>{html.escape(limited.reason)}</p>", status=429)
            response.headers.extend(limited.headers)
            response.decision = "rate_limited"
            return response
        token = _first(form, "token")
        digest = sha256_hex(token) if 16 <= len(token) <= 128 else ""
        now = self._clock()
        uses = self.access.link_uses
        for link in policy.share_links:
            if not digest or not hmac.compare_digest(digest, link.token_hash):
                continue
            used = uses.get(link.id, 0)
            if link.expires_at <= now or (link.uses_left is not None and used >= link.uses_left):
                break
            uses[link.id] = used + 1
            if self.on_share_used is not None:
                self.on_share_used(policy.tunnel_id, link.id)
            ttl = int(max(60, min(policy.session_ttl, link.expires_at - now)))
            value, _ = self.access.sessions.issue(
                "share",
                ttl=ttl,
                tunnel_id=policy.tunnel_id,
                user="share:" + link.id,
                epoch=policy.epoch,
                link_id=link.id,
            )
            response = EndpointResponse(303)
            response.headers.append((b"location", b"/"))
            response.headers.append(
                set_cookie(SESSION_COOKIE, value, secure=request.proto == "https", max_age=ttl)
            )
            response.decision = "signed_in"
            return response
        response = page(
            "Shared link", "<p>This link has expired, was used up or is not valid.</p>", status=403
        )
        response.decision = "bad_share_link"
        return response


def _location(path: str, back: str) -> bytes:
    return f"{path}?rd={quote(back, safe='/')}".encode("latin-1")
