"""What every dashboard page shares: the request as a handler sees it (:class:`Ctx`),
and :class:`DashboardCore`, the state the pages hold (Control's stores and hub, the
templates, the sign-in limiter, the setup link) with the steps every handler goes
through.

:meth:`DashboardCore.page` wraps a handler: it applies the transport rule (HTTPS, or
plain HTTP from loopback), finds the session, sends anyone without one to the
sign-in page, reads and CSRF-checks the form of a POST before the handler runs, and
adds the security headers.  Handlers render Jinja2 templates (autoescaped); changes go
through :class:`control.web.actions.Actions`.  After a successful POST the browser is
redirected (303) to a page that shows the result, so a reload never repeats a change;
the one exception is a new API key or share link, shown once on the response itself
and never stored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from common.logs import kv
from control.api.errors import from_validation
from control.db.admins import AdminStore, SessionUser
from control.db.store import ClientKind, Row, Store, StoreError
from control.events import EventBus
from control.web import auth, render
from control.web import session as web
from control.web.actions import Actions
from control.ws.admission import address_key
from control.ws.hub import Hub

log = logging.getLogger("control.dashboard")

Handler = Callable[["Ctx"], Awaitable[Response]]


class Ctx:
    """One request as a handler sees it: the user (if signed in) and the form."""

    def __init__(self, request: Request, user: SessionUser | None, form: dict[str, str]) -> None:
        self.request = request
        self.user = user
        self.form = form
        self.token = web.session_token(request) if user is not None else None

    @property
    def address(self) -> str | None:
        return self.request.client.host if self.request.client else None

    @property
    def base_url(self) -> str:
        return str(self.request.base_url).rstrip("/")

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])


class DashboardCore:
    """The state and the steps every page shares (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        admins: AdminStore,
        settings: web.WebSettings,
        announce: Callable[[str], None],
        public_url: str = "",
        enrollment: Callable[[Request], tuple[str, str | None]] | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.admins = admins
        self.bus: EventBus = hub.events
        self.settings = settings
        self.announce = announce
        self.public_url = public_url.rstrip("/")
        #: (Control's URL, pin of its key) that enrollment tokens carry, per request
        #: (``control.app``: --public-url and Control's own TLS); default: the URL the
        #: browser used, no pin
        self.enrollment = enrollment or _request_url
        self.env = render.environment()
        self.limiter = auth.LoginLimiter()
        self.setup: auth.SetupLink | None = None
        #: the link printed at start (the demo shows it); None once an admin exists
        self.setup_url: str | None = None
        #: sign-ins by result, for /metrics
        self.logins = {"ok": 0, "failed": 0, "limited": 0}

    def _html(
        self, ctx: Ctx | None, template: str, status: int = 200, /, **values: Any
    ) -> Response:
        request = ctx.request if ctx else None
        user = ctx.user if ctx else None
        csrf = auth.csrf_token(ctx.token) if ctx and ctx.token else values.pop("csrf", "")
        body = self.env.get_template(template).render(
            user=user,
            csrf=csrf,
            path=request.url.path if request else "/",
            # the live stream starts after the newest event this page reflects
            events_after=self.bus.seq,
            **values,
        )
        return HTMLResponse(body, status_code=status, headers=web.SECURITY_HEADERS)

    def _refusal(self, status: int, title: str, message: str) -> Response:
        return self._html(None, "message.html", status, title=title, message=message)

    @staticmethod
    def wants_page(request: Request) -> bool:
        """A browser asking for a page (not the API, the hub, metrics or health)."""
        path = request.url.path
        machine = ("/api/", "/ws", "/openapi.json", "/metrics", "/healthz", "/livez", "/readyz")
        return not path.startswith(machine) and "text/html" in request.headers.get("accept", "")

    def error_page(self, status: int) -> Response:
        """The page for an HTTP error on a dashboard address (404, 405, ...)."""
        titles = {404: "Not found", 405: "Not allowed"}
        messages = {
            404: "There is no page at this address.",
            405: "This page does not take that kind of request.",
        }
        return self._refusal(
            status,
            titles.get(status, "Error"),
            messages.get(status, f"The request could not be served (HTTP {status})."),
        )

    def page(
        self, handler: Handler, *, signed_in: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not web.transport_allowed(request, self.settings):
                return self._refusal(
                    403,
                    "HTTPS needed",
                    "The dashboard signs in only over HTTPS, or over plain HTTP from this "
                    "machine (for example through an SSH tunnel: ssh -L 7700:127.0.0.1:7700). "
                    "Start Control with a certificate, put it behind an HTTPS proxy, or "
                    "allow plain HTTP on a network you trust (--dashboard-insecure-http).",
                )
            user = await web.current_user(request, self.admins)
            if signed_in and user is None:
                if request.method == "GET" and request.url.path != "/events":
                    return RedirectResponse("/login", 303, headers=web.SECURITY_HEADERS)
                return self._refusal(401, "Signed out", "Your session has ended; sign in again.")
            form: dict[str, str] = {}
            if request.method == "POST":
                try:
                    form = await web.read_form(request)
                    web.check_csrf(request, form, web.session_token(request) if user else None)
                except web.FormError as exc:
                    return self._refusal(exc.status, "Bad form", exc.message)
                except web.CsrfRefused as exc:
                    log.warning(
                        "dashboard form refused (CSRF)",
                        extra=kv(
                            path=request.url.path,
                            address=address_key(request.client.host if request.client else None),
                            reason=str(exc),
                        ),
                    )
                    return self._refusal(403, "Refused", str(exc))
            ctx = Ctx(request, user, form)
            try:
                return await handler(ctx)
            except StoreError as exc:
                return self._refusal(exc.status, "Not done", str(exc))

        return endpoint

    def _actions(self, ctx: Ctx) -> Actions:
        assert ctx.user is not None
        return Actions(self.store, self.hub, self.admins, self.bus, ctx.user.username, ctx.address)

    @staticmethod
    def _back(to: str, notice: str | None = None) -> Response:
        target = to if notice is None else f"{to}?notice={notice}"
        return RedirectResponse(target, 303, headers=web.SECURITY_HEADERS)

    def _form_page(self, ctx: Ctx, template: str, status: int = 200, /, **values: Any) -> Response:
        """A pre-sign-in form with a fresh double-submit token."""
        token = auth.new_form_token()
        response = self._html(ctx, template, status, csrf=token, **values)
        web.set_cookie(ctx.request, response, auth.FORM_COOKIE, token, max_age=3600)
        return response

    def _client_view(self, kind: ClientKind, row: Row, now: float) -> dict[str, Any]:
        online, seen = self.hub.presence(kind, row["id"])
        return {
            **row,
            "online": online,
            "seen_age": None
            if not (seen or row["last_seen"])
            else now - (seen or row["last_seen"]),
            "handshake_age": self.hub.traffic.handshake_age(row.get("public_key"), now),
            # udp, or tcp: WireGuard over the stream transport (UDP blocked on the way)
            "transport": self.hub.traffic.transport(row.get("public_key")),
        }

    def _tunnel_view(self, row: Row, now: float) -> dict[str, Any]:
        totals = self.hub.traffic.totals(row["id"], now)
        return {**row, "traffic": totals}


def form_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()][:1000]


def _request_url(request: Request) -> tuple[str, str | None]:
    return str(request.base_url).rstrip("/"), None


def field_errors(exc: ValidationError) -> dict[str, str]:
    """Pydantic's complaints by form field (camelCase aliases back to the form's names)."""
    out: dict[str, str] = {}
    for detail in from_validation(exc).details:
        field = detail["field"]
        field = {"publicPort": "public_port", "body": "form"}.get(field, field)
        out.setdefault(field, detail["message"])
    return out
