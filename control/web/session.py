"""Per-request sign-in state: which session a request carries, its cookies, its CSRF
check, and the headers every dashboard response gets (``control.web.auth`` explains
the rules)."""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from control.db.admins import AdminStore, SessionUser
from control.web import auth

#: a form body larger than this is refused (413)
MAX_FORM = 64 * 1024
MAX_FIELDS = 64

#: scripts, styles and images from Control itself only; no frames, no plugins
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class FormError(Exception):
    """A form that cannot be read: too large, not UTF-8, too many fields."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CsrfRefused(Exception):
    """A state-changing request without its form's token (or from another origin)."""


@dataclass
class WebSettings:
    """How the dashboard treats plain HTTP."""

    #: allow signing in over plain HTTP from non-loopback addresses (cookies not Secure)
    insecure_http: bool = False


def secure(request: Request) -> bool:
    """Whether the browser reached us over HTTPS (uvicorn applies a trusted proxy's
    ``X-Forwarded-Proto`` to the scheme)."""
    return request.url.scheme == "https"


def transport_allowed(request: Request, settings: WebSettings) -> bool:
    """HTTPS always; plain HTTP from loopback (an SSH tunnel, the demo) or when the
    operator allowed it."""
    if secure(request) or settings.insecure_http:
        return True
    return auth.is_loopback(request.client.host if request.client else None)


def cookie_name(request: Request, base: str) -> str:
    # __Host-: the browser keeps it only if Secure, for this host, path / (no subdomain
    # can plant or overwrite it)
    return f"__Host-{base}" if secure(request) else base


def set_cookie(
    request: Request, response: Response, base: str, value: str, max_age: int | None
) -> None:
    response.set_cookie(
        cookie_name(request, base),
        value,
        max_age=max_age,
        path="/",
        secure=secure(request),
        httponly=True,
        samesite="lax",
    )


def clear_cookie(request: Request, response: Response, base: str) -> None:
    response.delete_cookie(
        cookie_name(request, base), path="/", secure=secure(request), httponly=True, samesite="lax"
    )


def session_token(request: Request) -> str | None:
    token = request.cookies.get(cookie_name(request, auth.SESSION_COOKIE))
    if not token or not token.startswith(auth.SESSION_PREFIX) or len(token) > 128:
        return None
    return token


async def current_user(request: Request, admins: AdminStore) -> SessionUser | None:
    token = session_token(request)
    if token is None:
        return None
    return await admins.session(token, time.time())


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body, bounded; the last value of a
    repeated field wins."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise FormError(415, "forms must be sent as application/x-www-form-urlencoded")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM):
        raise FormError(413, f"form larger than {MAX_FORM} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FORM:
            raise FormError(413, f"form larger than {MAX_FORM} bytes")
    try:
        text = body.decode("utf-8")
        pairs = urllib.parse.parse_qsl(
            text, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "the form is not valid UTF-8 or has too many fields") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        try:
            value.encode()
        except UnicodeEncodeError:
            raise FormError(400, "the form is not valid UTF-8") from None
        out[key] = value
    return out


def check_origin(request: Request) -> None:
    """A browser's ``Origin`` (when sent) must be this dashboard's own."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.url.netloc}"
    if origin != own:
        raise CsrfRefused(f"request from another origin ({origin[:100]})")


def check_csrf(request: Request, form: dict[str, str], user_token: str | None) -> None:
    """The form's ``csrf`` field against the session's token, or before sign-in the
    double-submit cookie."""
    check_origin(request)
    if user_token is not None:
        expected: str | None = auth.csrf_token(user_token)
    else:
        expected = request.cookies.get(cookie_name(request, auth.FORM_COOKIE))
    if not auth.tokens_match(expected, form.get("csrf")):
        raise CsrfRefused("the form's security token is missing or wrong; reload the page")
