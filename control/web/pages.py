"""The dashboard's pages: sign-in, first-run setup, overview, agents, gateways,
tunnels, audit log, admin users, and the live event stream.

Every handler goes through :meth:`Dashboard._page`, which applies the transport rule
(HTTPS, or plain HTTP from loopback), finds the session, sends anyone without one to
the sign-in page, reads and CSRF-checks the form of a POST before the handler runs,
and adds the security headers.  Handlers render Jinja2 templates (autoescaped);
changes go through :class:`control.web.actions.Actions`.  After a successful POST the
browser is redirected (303) to a page that shows the result, so a reload never
repeats a change; the one exception is a new API key, shown once on the response
itself and never stored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from common.logs import kv
from common.token import EnrollmentToken
from control import access
from control.api import models as m
from control.api.errors import from_validation
from control.db.admins import SESSION_MAX_AGE, AdminStore, AuditEntry, SessionUser
from control.db.store import ClientKind, Row, Store, StoreError
from control.events import EventBus
from control.web import auth, render
from control.web import session as web
from control.web.actions import Actions
from control.ws.admission import address_key
from control.ws.hub import Hub

log = logging.getLogger("control.dashboard")

STATIC = render.TEMPLATES.parent / "static"
#: a live stream sends a comment this often so proxies keep it open
SSE_KEEPALIVE = 15.0
#: audit entries per page
AUDIT_PAGE = 50
#: certificates expiring within this many days are flagged
EXPIRY_WARNING_DAYS = 14

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


class Dashboard:
    """The pages, bound to Control's store, hub and admin store."""

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

    # -- start-up -----------------------------------------------------------------------

    async def start(self) -> None:
        """Print the one-time setup link if there is no admin user yet."""
        if self.settings.insecure_http:
            log.warning(
                "the dashboard signs users in over plain HTTP from any address "
                "(--dashboard-insecure-http): sessions and passwords cross the network "
                "unencrypted unless a TLS proxy is in front"
            )
        if await self.admins.count_users():
            return
        self.setup, token = auth.SetupLink.create(time.monotonic())
        self.setup_url = f"{self.public_url}/setup?token={token}"
        minutes = int(auth.SETUP_TTL // 60)
        self.announce(
            "No dashboard user exists yet. Open this one-time link within "
            f"{minutes} minutes to create the first one (a restart makes a new link):\n"
            f"  {self.setup_url}"
        )
        log.info("dashboard setup link printed on stdout", extra=kv(valid_min=minutes))

    # -- plumbing -------------------------------------------------------------------------

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

    def _page(
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

    # -- setup, sign-in, sign-out --------------------------------------------------------

    def _form_page(self, ctx: Ctx, template: str, status: int = 200, /, **values: Any) -> Response:
        """A pre-sign-in form with a fresh double-submit token."""
        token = auth.new_form_token()
        response = self._html(ctx, template, status, csrf=token, **values)
        web.set_cookie(ctx.request, response, auth.FORM_COOKIE, token, max_age=3600)
        return response

    async def setup_page(self, ctx: Ctx) -> Response:
        token = ctx.request.query_params.get("token") or ctx.form.get("token")
        state = "invalid" if self.setup is None else self.setup.state(token, time.monotonic())
        if await self.admins.count_users():
            state = "done"
        if state != "ok":
            messages = {
                "done": "An admin user exists already: sign in instead.",
                "spent": "This setup link has been used. Sign in with the user it created.",
                "expired": "This setup link has expired. Restart Control for a new one "
                "(it prints it at start while no admin user exists).",
                "invalid": "This is not a valid setup link. Use the link Control printed at start.",
            }
            response = self._html(
                ctx,
                "message.html",
                403 if state != "done" else 200,
                title="Setup",
                message=messages[state],
                sign_in=True,
            )
            return response
        errors: dict[str, str] = {}
        username = ctx.form.get("username", "")
        if ctx.request.method == "POST":
            password = ctx.form.get("password", "")
            try:
                username = auth.check_username(username)
            except ValueError as exc:
                errors["username"] = str(exc)
            try:
                auth.check_password(password)
                if password != ctx.form.get("confirm", ""):
                    errors["confirm"] = "the two passwords differ"
            except ValueError as exc:
                errors["password"] = str(exc)
            if not errors:
                assert self.setup is not None
                self.setup.spend()
                user = await self.admins.create_user(
                    username, await auth.hash_password(password), only_if_none=True
                )
                self.setup_url = None
                await self.admins.record(
                    AuditEntry(
                        "user",
                        username,
                        "user.create",
                        "user",
                        user["id"],
                        username,
                        "first admin user, through the setup link",
                        ctx.address,
                    )
                )
                return await self._sign_in(ctx, user)
        response = self._form_page(
            ctx, "setup.html", 422 if errors else 200, token=token, username=username, errors=errors
        )
        return response

    async def login_page(self, ctx: Ctx) -> Response:
        if ctx.user is not None and ctx.request.method == "GET":
            return self._back("/")
        if ctx.request.method == "GET":
            first_run = self.setup is not None and not self.setup.spent
            return self._form_page(ctx, "login.html", first_run=first_run)
        username = ctx.form.get("username", "").strip().lower()[:63]
        password = ctx.form.get("password", "")
        address = address_key(ctx.address)
        now = time.monotonic()
        wait = self.limiter.retry_after(address, username, now)
        if wait:
            self.logins["limited"] += 1
            response = self._form_page(
                ctx,
                "login.html",
                429,
                username=username,
                error=f"Too many failed sign-ins. Try again in {wait} s.",
            )
            response.headers["Retry-After"] = str(wait)
            return response
        row = await self.admins.user_by_name(username) if username else None
        if not await auth.verify_password(row["password_hash"] if row else None, password):
            self.limiter.failed(address, username, now)
            self.logins["failed"] += 1
            log.warning("dashboard sign-in failed", extra=kv(address=address))
            await self.admins.record(
                AuditEntry(
                    "user",
                    username or "-",
                    "session.login_failed",
                    "user",
                    row["id"] if row else None,
                    username or None,
                    None,
                    ctx.address,
                )
            )
            return self._form_page(
                ctx, "login.html", 401, username=username, error="Wrong user name or password."
            )
        assert row is not None
        return await self._sign_in(ctx, row)

    async def _sign_in(self, ctx: Ctx, user: Row) -> Response:
        token = auth.new_session_token()
        now = time.time()
        await self.admins.create_session(
            user["id"], token, ctx.address, ctx.request.headers.get("user-agent"), now
        )
        self.logins["ok"] += 1
        await self.admins.record(
            AuditEntry(
                "user",
                user["username"],
                "session.login",
                "user",
                user["id"],
                user["username"],
                None,
                ctx.address,
            )
        )
        log.info(
            "dashboard sign-in", extra=kv(user=user["username"], address=address_key(ctx.address))
        )
        response = self._back("/")
        # the browser keeps it as long as a session can live; the server ends it sooner
        # when it is idle (control.db.admins: SESSION_IDLE) or signed out
        web.set_cookie(ctx.request, response, auth.SESSION_COOKIE, token, int(SESSION_MAX_AGE))
        web.clear_cookie(ctx.request, response, auth.FORM_COOKIE)
        return response

    async def logout(self, ctx: Ctx) -> Response:
        assert ctx.user is not None
        await self.admins.end_session(ctx.user.session_id)
        await self.admins.record(
            AuditEntry(
                "user",
                ctx.user.username,
                "session.logout",
                "user",
                ctx.user.user_id,
                ctx.user.username,
                None,
                ctx.address,
            )
        )
        response = self._back("/login")
        web.clear_cookie(ctx.request, response, auth.SESSION_COOKIE)
        return response

    # -- overview -------------------------------------------------------------------------

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

    async def overview(self, ctx: Ctx) -> Response:
        now = time.time()
        agents = [self._client_view("agent", r, now) for r in await self.store.all_clients("agent")]
        gateways = [
            self._client_view("gateway", r, now) for r in await self.store.all_clients("gateway")
        ]
        tunnels = [self._tunnel_view(r, now) for r in await self.store.all_tunnels()]
        certificates = [
            {**c, "days_left": (c["not_after"] - now) / 86400}
            for c in await self.store.all_certificates()
        ]
        return self._html(
            ctx,
            "overview.html",
            agents=agents,
            gateways=gateways,
            tunnels=tunnels,
            certificates=certificates,
            warn_days=EXPIRY_WARNING_DAYS,
            notice=ctx.request.query_params.get("notice"),
        )

    # -- agents and gateways ----------------------------------------------------------------

    def _commands(self, kind: ClientKind, key: str, request: Request) -> dict[str, str]:
        """How to run it: with the enrollment token (``common.token``: Control's URL, the
        key and, with Control's own TLS, its key's pin), as a container, with Compose,
        and the long form."""
        base, pin = self.enrollment(request)
        token = EnrollmentToken(base, key, pin).encode()
        image = f"kakuremichi-{kind}"
        public_ip = "<this machine's public IP>"
        gateway = kind == "gateway"
        extra = f" --public-ip {public_ip}" if gateway else ""
        return {
            "cli": f"kakuremichi {kind} --token {token}{extra}",
            "long": f"kakuremichi {kind} --control-url {base} --api-key {key}{extra}",
            "docker": (
                f"docker run -d --name kakuremichi-{kind} --restart unless-stopped "
                f"--network host -v kakuremichi-{kind}:/var/lib/kakuremichi "
                f"-e KAKUREMICHI_TOKEN={token}"
                + (f" -e KAKUREMICHI_PUBLIC_IP={public_ip}" if gateway else "")
                + f" {image}"
            ),
            "compose": (
                "services:\n"
                f"  kakuremichi-{kind}:\n"
                f"    image: {image}\n"
                "    restart: unless-stopped\n"
                "    network_mode: host\n"
                "    environment:\n"
                f"      KAKUREMICHI_TOKEN: {token}\n"
                + (f"      KAKUREMICHI_PUBLIC_IP: {public_ip}\n" if gateway else "")
                + "    volumes:\n"
                f"      - kakuremichi-{kind}:/var/lib/kakuremichi\n"
                "volumes:\n"
                f"  kakuremichi-{kind}: {{}}\n"
            ),
        }

    async def clients(self, ctx: Ctx, kind: ClientKind) -> Response:
        now = time.time()
        rows = [self._client_view(kind, r, now) for r in await self.store.all_clients(kind)]
        errors: dict[str, str] = {}
        name = ""
        if ctx.request.method == "POST":
            name = ctx.form.get("name", "").strip()
            try:
                body = m.ClientCreate.model_validate({"name": name})
            except ValidationError as exc:
                errors = _field_errors(exc)
            else:
                try:
                    row, key = await self._actions(ctx).create_client(kind, body.name)
                except StoreError as exc:
                    errors = {"name": str(exc)}
                else:
                    return self._key_page(ctx, kind, row, key, created=True)
        return self._html(
            ctx,
            "clients.html",
            422 if errors else 200,
            kind=kind,
            rows=rows,
            errors=errors,
            name=name,
            notice=ctx.request.query_params.get("notice"),
        )

    def _key_page(
        self, ctx: Ctx, kind: ClientKind, row: Row, key: str, *, created: bool
    ) -> Response:
        return self._html(
            ctx,
            "key.html",
            201 if created else 200,
            kind=kind,
            row=row,
            key=key,
            created=created,
            commands=self._commands(kind, key, ctx.request),
        )

    async def client_detail(self, ctx: Ctx, kind: ClientKind) -> Response:
        row = await self.store.get_client(kind, ctx.param("id"))
        errors: dict[str, str] = {}
        name = row["name"]
        if ctx.request.method == "POST":
            name = ctx.form.get("name", "").strip()
            try:
                body = m.ClientUpdate.model_validate({"name": name})
            except ValidationError as exc:
                errors = _field_errors(exc)
            else:
                try:
                    await self._actions(ctx).rename_client(kind, row["id"], body.name)
                except StoreError as exc:
                    errors = {"name": str(exc)}
                else:
                    return self._back(f"/{kind}s/{row['id']}", "saved")
        now = time.time()
        tunnels = (
            [self._tunnel_view(t, now) for t in await self.store.all_tunnels(row["id"])]
            if kind == "agent"
            else []
        )
        history, _ = await self.admins.audit(20, 0, row["id"])
        return self._html(
            ctx,
            "client.html",
            422 if errors else 200,
            kind=kind,
            row=self._client_view(kind, row, now),
            name=name,
            errors=errors,
            tunnels=tunnels,
            history=history,
            notice=ctx.request.query_params.get("notice"),
        )

    async def client_rotate(self, ctx: Ctx, kind: ClientKind) -> Response:
        row, key = await self._actions(ctx).rotate_key(kind, ctx.param("id"))
        return self._key_page(ctx, kind, row, key, created=False)

    async def client_delete(self, ctx: Ctx, kind: ClientKind) -> Response:
        await self._actions(ctx).delete_client(kind, ctx.param("id"))
        return self._back(f"/{kind}s", "deleted")

    # -- tunnels ------------------------------------------------------------------------

    async def tunnels(self, ctx: Ctx) -> Response:
        now = time.time()
        rows = [self._tunnel_view(r, now) for r in await self.store.all_tunnels()]
        return self._html(
            ctx, "tunnels.html", rows=rows, notice=ctx.request.query_params.get("notice")
        )

    async def tunnel_form(self, ctx: Ctx) -> Response:
        """New tunnel (``/tunnels/new``) or edit one (``/tunnels/{id}/edit``)."""
        tunnel_id = ctx.request.path_params.get("id")
        current = await self.store.get_tunnel(tunnel_id) if tunnel_id else None
        agents = await self.store.all_clients("agent")
        values: dict[str, Any] = {
            "protocol": current["protocol"] if current else "http",
            "domain": (current or {}).get("domain") or "",
            "public_port": (current or {}).get("public_port") or "",
            "target": (current or {}).get("target") or "",
            "agent": current["agent_name"]
            if current
            else ctx.request.query_params.get("agent", ""),
            "enabled": bool(current["enabled"]) if current else True,
        }
        errors: dict[str, str] = {}
        if ctx.request.method == "POST":
            f = ctx.form
            protocol = f.get("protocol", "http")
            values = {
                "protocol": protocol,
                "domain": f.get("domain", "").strip(),
                "public_port": f.get("public_port", "").strip(),
                "target": f.get("target", "").strip(),
                "agent": f.get("agent", "").strip(),
                "enabled": f.get("enabled") == "on",
            }
            body: dict[str, Any] = {
                "protocol": protocol,
                "target": values["target"],
                "agent": values["agent"],
                "enabled": values["enabled"],
            }
            if protocol == "http":
                body["domain"] = values["domain"] or None
            else:
                port = values["public_port"]
                body["publicPort"] = (
                    int(port) if port.isascii() and port.isdigit() and len(port) < 7 else port
                )
            try:
                parsed = m.TunnelCreate.model_validate(body)
            except ValidationError as exc:
                errors = _field_errors(exc)
            else:
                fields = parsed.model_dump()
                try:
                    if current is None:
                        row = await self._actions(ctx).create_tunnel(fields)
                        return self._back(f"/tunnels/{row['id']}", "created")
                    changes = {k: v for k, v in fields.items() if k != "agent"}
                    if values["agent"] not in (current["agent_name"], current["agent_id"]):
                        changes["agent"] = values["agent"]
                    await self._actions(ctx).update_tunnel(current["id"], changes, "tunnel.update")
                    return self._back(f"/tunnels/{current['id']}", "saved")
                except StoreError as exc:
                    errors = {"form": str(exc)}
        return self._html(
            ctx,
            "tunnel_form.html",
            422 if errors else 200,
            current=current,
            values=values,
            errors=errors,
            agents=agents,
        )

    async def tunnel_detail(self, ctx: Ctx) -> Response:
        row = await self.store.get_tunnel(ctx.param("id"))
        history, _ = await self.admins.audit(20, 0, row["id"])
        policy = access.access_out(
            await self.store.get_access(row["id"]), await self.store.share_links(row["id"])
        )
        return self._html(
            ctx,
            "tunnel.html",
            row=self._tunnel_view(row, time.time()),
            policy=policy,
            history=history,
            notice=ctx.request.query_params.get("notice"),
        )

    async def tunnel_enable(self, ctx: Ctx) -> Response:
        enabled = ctx.request.url.path.endswith("/enable")
        row = await self._actions(ctx).update_tunnel(
            ctx.param("id"), {"enabled": enabled}, "tunnel.enable" if enabled else "tunnel.disable"
        )
        return self._back(f"/tunnels/{row['id']}", "enabled" if enabled else "disabled")

    async def tunnel_delete(self, ctx: Ctx) -> Response:
        await self._actions(ctx).delete_tunnel(ctx.param("id"))
        return self._back("/tunnels", "deleted")

    # -- access policies ------------------------------------------------------------------

    async def tunnel_access(self, ctx: Ctx) -> Response:
        """Edit a tunnel's access policy: IP rules, the sign-in password, basic-auth
        users, session length and identity headers; OIDC and path rules are kept as they
        are (set through the API or ``kakuremichi apply``); share links."""
        tunnel = await self.store.get_tunnel(ctx.param("id"))
        row = await self.store.get_access(tunnel["id"])
        stored = json.loads(row["policy"]) if row is not None else None
        policy = access.access_out(row, await self.store.share_links(tunnel["id"]))
        errors: dict[str, str] = {}
        form = ctx.form
        if ctx.request.method == "POST":
            try:
                data = _access_input(form, stored, tunnel["protocol"] == "http")
                body = access.AccessIn.model_validate(data)
            except ValueError as exc:  # ValidationError is a ValueError
                errors["form"] = (
                    "; ".join(_field_errors(exc).values())
                    if isinstance(exc, ValidationError)
                    else str(exc)
                )
            else:
                try:
                    await self._actions(ctx).set_access(tunnel, body, set(body.model_fields_set))
                except ValueError as exc:
                    errors["form"] = str(exc)
                else:
                    return self._back(f"/tunnels/{tunnel['id']}", "saved")
        return self._html(
            ctx,
            "access.html",
            422 if errors else 200,
            tunnel=tunnel,
            policy=policy,
            errors=errors,
            form=form,
            now=time.time(),
        )

    async def tunnel_access_remove(self, ctx: Ctx) -> Response:
        tunnel = await self.store.get_tunnel(ctx.param("id"))
        await self._actions(ctx).delete_access(tunnel)
        return self._back(f"/tunnels/{tunnel['id']}", "saved")

    async def share_link_create(self, ctx: Ctx) -> Response:
        tunnel = await self.store.get_tunnel(ctx.param("id"))
        if tunnel["protocol"] != "http" or await self.store.get_access(tunnel["id"]) is None:
            return self._refusal(
                422,
                "Not done",
                "Share links are for HTTP tunnels with an access policy (an empty one lets "
                "only share-link holders in).",
            )
        hours, uses = ctx.form.get("hours", "24").strip(), ctx.form.get("uses", "").strip()
        try:
            body = access.ShareLinkCreate.model_validate(
                {
                    "expiresIn": int(float(hours) * 3600) if len(hours) < 10 else -1,
                    "maxUses": int(uses) if uses else None,
                }
            )
        except (ValueError, OverflowError):
            return self._refusal(
                422, "Not done", "A share link lasts 1 minute to 365 days and 1 to 1,000,000 uses."
            )
        link, url = await self._actions(ctx).create_share_link(tunnel, body)
        return self._html(ctx, "share_link.html", 201, tunnel=tunnel, link=link, url=url)

    async def share_link_delete(self, ctx: Ctx) -> Response:
        tunnel = await self.store.get_tunnel(ctx.param("id"))
        await self._actions(ctx).delete_share_link(tunnel, ctx.param("link"))
        return self._back(f"/tunnels/{tunnel['id']}", "deleted")

    async def tunnel_chart(self, ctx: Ctx) -> Response:
        tunnel_id = ctx.param("id")
        row = await self.store.get_tunnel(tunnel_id)
        svg = render.traffic_svg(
            self.hub.traffic.series(tunnel_id, time.time()),
            row["domain"] or f"port {row['public_port']}",
        )
        return Response(svg, media_type="image/svg+xml", headers=web.SECURITY_HEADERS)

    # -- audit log and users ------------------------------------------------------------

    async def audit(self, ctx: Ctx) -> Response:
        text = ctx.request.query_params.get("page", "1")
        page = int(text) if text.isascii() and text.isdigit() and 0 < len(text) < 7 else 1
        page = max(1, page)
        rows, total = await self.admins.audit(AUDIT_PAGE, (page - 1) * AUDIT_PAGE)
        pages = max(1, -(-total // AUDIT_PAGE))
        return self._html(ctx, "audit.html", rows=rows, page=page, pages=pages, total=total)

    async def users(self, ctx: Ctx) -> Response:
        assert ctx.user is not None
        errors: dict[str, str] = {}
        username = ""
        if ctx.request.method == "POST":
            username = ctx.form.get("username", "")
            password = ctx.form.get("password", "")
            try:
                username = auth.check_username(username)
            except ValueError as exc:
                errors["username"] = str(exc)
            try:
                auth.check_password(password)
            except ValueError as exc:
                errors["password"] = str(exc)
            if not errors:
                try:
                    row = await self.admins.create_user(
                        username, await auth.hash_password(password)
                    )
                except StoreError as exc:
                    errors["username"] = str(exc)
                else:
                    await self._actions(ctx).audit("user.create", "user", row)
                    return self._back("/users", "created")
        rows = await self.admins.list_users()
        return self._html(
            ctx,
            "users.html",
            422 if errors else 200,
            rows=rows,
            errors=errors,
            username=username,
            notice=ctx.request.query_params.get("notice"),
        )

    async def user_delete(self, ctx: Ctx) -> Response:
        row = await self.admins.delete_user(ctx.param("id"))
        await self._actions(ctx).audit("user.delete", "user", row)
        if ctx.user is not None and row["id"] == ctx.user.user_id:
            return self._back("/login")
        return self._back("/users", "deleted")

    async def password(self, ctx: Ctx) -> Response:
        assert ctx.user is not None
        errors: dict[str, str] = {}
        user = await self.admins.get_user(ctx.user.user_id)
        if not await auth.verify_password(user["password_hash"], ctx.form.get("current", "")):
            errors["current"] = "that is not your current password"
        try:
            new = auth.check_password(ctx.form.get("password", ""))
            if new != ctx.form.get("confirm", ""):
                errors["confirm"] = "the two passwords differ"
        except ValueError as exc:
            errors["password"] = str(exc)
        if errors:
            rows = await self.admins.list_users()
            return self._html(
                ctx, "users.html", 422, rows=rows, errors={}, username="", password_errors=errors
            )
        await self.admins.set_password(
            user["id"], await auth.hash_password(new), keep_session=ctx.user.session_id
        )
        await self._actions(ctx).audit(
            "user.password", "user", user, detail="password changed; other sessions ended"
        )
        return self._back("/users", "password-changed")

    # -- live updates ---------------------------------------------------------------------

    async def live(self, ctx: Ctx) -> Response:
        # where to start: a reconnecting stream's Last-Event-ID, else the page's number
        text = ctx.request.headers.get("last-event-id") or ctx.request.query_params.get("after")
        after = int(text) if text and text.isascii() and text.isdigit() and len(text) < 19 else None
        subscription = self.bus.subscribe(after)
        if subscription is None:
            return self._refusal(503, "Busy", "Too many live pages are open.")

        async def stream() -> AsyncIterator[str]:
            with subscription:
                yield "retry: 3000\n\n"
                while True:
                    # a closed browser tab cancels this generator (StreamingResponse)
                    event = await subscription.next(SSE_KEEPALIVE)
                    if event is None:
                        yield ": keep-alive\n\n"
                        continue
                    if event.kind == "closing":
                        return
                    data = json.dumps(event.data, separators=(",", ":"), default=str)
                    ident = f"id: {event.seq}\n" if event.seq else ""
                    yield f"{ident}event: {event.kind}\ndata: {data}\n\n"
                    if event.kind == "overflow":
                        return

        headers = {**web.SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        page = self._page

        def per_kind(
            kind: ClientKind, method: Callable[[Ctx, ClientKind], Awaitable[Response]]
        ) -> Handler:
            async def handler(ctx: Ctx) -> Response:
                return await method(ctx, kind)

            return handler

        routes: list[BaseRoute] = [
            Route("/", page(self.overview), methods=["GET"]),
            Route("/setup", page(self.setup_page, signed_in=False), methods=["GET", "POST"]),
            Route("/login", page(self.login_page, signed_in=False), methods=["GET", "POST"]),
            Route("/logout", page(self.logout), methods=["POST"]),
            Route("/events", page(self.live), methods=["GET"]),
            Route("/tunnels", page(self.tunnels), methods=["GET"]),
            Route("/tunnels", page(self.tunnel_form), methods=["POST"]),
            Route("/tunnels/new", page(self.tunnel_form), methods=["GET"]),
            Route("/tunnels/{id}", page(self.tunnel_detail), methods=["GET"]),
            Route("/tunnels/{id}/edit", page(self.tunnel_form), methods=["GET", "POST"]),
            Route("/tunnels/{id}/enable", page(self.tunnel_enable), methods=["POST"]),
            Route("/tunnels/{id}/disable", page(self.tunnel_enable), methods=["POST"]),
            Route("/tunnels/{id}/delete", page(self.tunnel_delete), methods=["POST"]),
            Route("/tunnels/{id}/chart.svg", page(self.tunnel_chart), methods=["GET"]),
            Route("/tunnels/{id}/access", page(self.tunnel_access), methods=["GET", "POST"]),
            Route("/tunnels/{id}/access/remove", page(self.tunnel_access_remove), methods=["POST"]),
            Route("/tunnels/{id}/share-links", page(self.share_link_create), methods=["POST"]),
            Route(
                "/tunnels/{id}/share-links/{link}/delete",
                page(self.share_link_delete),
                methods=["POST"],
            ),
            Route("/audit", page(self.audit), methods=["GET"]),
            Route("/users", page(self.users), methods=["GET", "POST"]),
            Route("/users/{id}/delete", page(self.user_delete), methods=["POST"]),
            Route("/account/password", page(self.password), methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ]
        for kind in ("agent", "gateway"):
            k: ClientKind = "agent" if kind == "agent" else "gateway"
            routes += [
                Route(f"/{k}s", page(per_kind(k, self.clients)), methods=["GET", "POST"]),
                Route(
                    f"/{k}s/{{id}}", page(per_kind(k, self.client_detail)), methods=["GET", "POST"]
                ),
                Route(
                    f"/{k}s/{{id}}/rotate-key",
                    page(per_kind(k, self.client_rotate)),
                    methods=["POST"],
                ),
                Route(
                    f"/{k}s/{{id}}/delete", page(per_kind(k, self.client_delete)), methods=["POST"]
                ),
            ]
        return routes


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()][:1000]


def _access_input(
    form: dict[str, str], stored: dict[str, Any] | None, http: bool
) -> dict[str, Any]:
    """The ``AccessIn`` body for the access form: what the form edits, plus the OIDC
    provider and path rules as stored (their secrets left out: they keep their hashes)."""
    data: dict[str, Any] = {
        "ipAllow": _lines(form.get("ip_allow", "")),
        "ipDeny": _lines(form.get("ip_deny", "")),
    }
    if not http:  # raw tunnels take IP rules only
        return data
    users = []
    for line in _lines(form.get("basic_auth", "")):
        user, sep, password = line.partition(":")
        users.append({"user": user.strip(), **({"password": password} if sep else {})})
    hours = form.get("session_hours", "24").strip()
    if not (hours.isascii() and hours.replace(".", "", 1).isdigit()) or len(hours) > 8:
        raise ValueError("session length: a number of hours")
    data.update(
        basicAuth=users,
        sessionTtl=int(float(hours) * 3600),
        identityHeaders=form.get("identity_headers") == "on",
    )
    if form.get("password"):
        data["password"] = form["password"]
    elif form.get("remove_password") == "on":
        data["password"] = None
    old = stored or {}
    if old.get("sessionDomain"):
        data["sessionDomain"] = old["sessionDomain"]
    oidc = old.get("oidc")
    if oidc:
        data["oidc"] = {k: v for k, v in oidc.items() if k != "clientSecret"}
    if old.get("paths"):
        data["paths"] = [{"prefix": r["prefix"], "action": r["action"]} for r in old["paths"]]
    return data


def _request_url(request: Request) -> tuple[str, str | None]:
    return str(request.base_url).rstrip("/"), None


def _field_errors(exc: ValidationError) -> dict[str, str]:
    """Pydantic's complaints by form field (camelCase aliases back to the form's names)."""
    out: dict[str, str] = {}
    for detail in from_validation(exc).details:
        field = detail["field"]
        field = {"publicPort": "public_port", "body": "form"}.get(field, field)
        out.setdefault(field, detail["message"])
    return out
