"""The Control ASGI application: REST API, OpenAPI document, health check, WebSocket hub.

``create_app(settings)`` wires the pieces; the lifespan opens the database, runs the
migrations, settles the admin token and starts the hub's monitor.  Everything under
``/api/`` needs ``Authorization: Bearer <admin token>``, and an address that keeps
presenting a wrong one is refused for a while (``control.api.authlimit``); ``/ws``
authenticates with agent/gateway API keys inside the protocol; ``/healthz`` and
``/openapi.json`` are open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from common.logs import OncePer, kv
from common.protocol import AUTH_TIMEOUT
from control.alloc import DEFAULT_AGENT_HOST, DEFAULT_POOL, DEFAULT_PREFIX, AddressPlan
from control.api import authlimit
from control.api.errors import ApiError, error_response
from control.api.openapi import build_openapi
from control.api.routes import Api, Enrollment, request_base_url
from control.cluster import DEFAULT_TIMEOUT, Cluster, SingleControl
from control.cluster.postgres import PostgresCluster
from control.db.admins import AdminStore
from control.db.engine import create_engine, migrate
from control.db.store import Store, StoreError
from control.metrics import CONTENT_TYPE, control_metrics
from control.selfacme import ControlAcme
from control.tls import ControlTls
from control.web.audit import RestAudit
from control.web.pages import Dashboard
from control.web.session import WebSettings
from control.ws import intake
from control.ws.admission import DEFAULT_PER_ADDRESS, address_key
from control.ws.hub import Hub

log = logging.getLogger("control")

ADMIN_TOKEN_SETTING = "admin_token_sha256"  # noqa: S105 (a settings key)
#: an address refused for failed admin-token attempts is logged once per this many seconds
AUTH_REFUSAL_LOG_INTERVAL = 60.0


@dataclass
class ControlSettings:
    """Everything the app needs; filled from flags/env/file by ``control.main``."""

    database_url: str
    admin_token: str | None = None
    address_pool: str = DEFAULT_POOL
    agent_prefix: int = DEFAULT_PREFIX
    agent_host: int = DEFAULT_AGENT_HOST
    offline_after: float = 60.0
    #: unauthenticated WebSocket connections allowed at once per remote address
    max_unauthenticated_per_address: int = DEFAULT_PER_ADDRESS
    #: seconds a WebSocket client has to authenticate (not a flag; tests shorten it)
    auth_timeout: float = AUTH_TIMEOUT
    #: failed admin-token attempts an address may make per ``admin_auth_window``
    admin_auth_failures: int = authlimit.DEFAULT_LIMIT
    #: that window in seconds (not a flag; tests shorten it)
    admin_auth_window: float = authlimit.DEFAULT_WINDOW
    announce: Callable[[str], None] = field(default=print)
    #: where this Control listens, for the dashboard's setup link when ``public_url``
    #: is unset (``control.main`` fills it; e.g. http://127.0.0.1:7700)
    listen_url: str = ""
    #: dashboard sign-in over plain HTTP from non-loopback addresses
    dashboard_insecure_http: bool = False
    #: Control's own HTTPS (``control.tls``); None: plain HTTP (or TLS ends elsewhere)
    tls: ControlTls | None = None
    #: Control's own certificate from ACME (``--acme-domain``), installed into ``tls``
    acme: ControlAcme | None = None
    #: the URL agents and gateways reach Control at, put in enrollment tokens
    #: (None: the URL the admin's request came to)
    public_url: str | None = None
    #: several replicas on PostgreSQL: seconds without a heartbeat before a replica is
    #: dead (its clients' presence dropped, its lease taken over)
    replica_timeout: float = DEFAULT_TIMEOUT
    #: connections authenticating at once; more are told to come back later
    auth_queue: int = intake.DEFAULT_LIMIT


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdminAuth:
    """ASGI middleware: bearer admin token on ``/api/``; constant-time comparison;
    an address past its failed attempts gets 429 until its window has room again."""

    def __init__(
        self, app: ASGIApp, state: dict[str, Any], failures: authlimit.AuthFailures
    ) -> None:
        self.app = app
        self.state = state
        self.failures = failures
        self.refusals = OncePer(AUTH_REFUSAL_LOG_INTERVAL, 4096)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api"):
            client = scope.get("client")
            address = address_key(client[0] if client else None)
            now = time.monotonic()
            wait = self.failures.retry_after(address, now)
            if wait:
                self._log_refusal(address, wait, now)
                response = error_response(
                    429,
                    "too_many_auth_failures",
                    f"too many failed admin-token attempts from this address; retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
                await response(scope, receive, send)
                return
            header: str | None = None
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    header = value.decode("latin-1")
                    break
            scheme, _, token = (header or "").partition(" ")
            expected = self.state.get("admin_digest")
            if (
                scheme.lower() != "bearer"
                or not expected
                or not hmac.compare_digest(_digest(token.strip()), expected)
            ):
                if header is not None:  # a wrong credential; none at all guesses nothing
                    wait = self.failures.failed(address, now)
                    if wait:
                        self._log_refusal(address, wait, now)
                response = error_response(
                    401,
                    "unauthorized",
                    "missing or invalid admin token (Authorization: Bearer <token>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _log_refusal(self, address: str, wait: int, now: float) -> None:
        due, unlogged = self.refusals.due(address, now)
        if due:
            log.warning(
                "refusing admin API requests from an address with too many failed "
                "admin-token attempts",
                extra=kv(
                    address=address,
                    failures=self.failures.limit,
                    window_s=self.failures.window,
                    retry_after=wait,
                    since_last_logged=unlogged,
                ),
            )


def _enrollment(settings: ControlSettings) -> Enrollment:
    """What enrollment tokens carry: ``--public-url`` (else the URL the request came
    to) and, when Control serves that URL's TLS itself, the pin of its key."""

    def enrollment(request: Request) -> tuple[str, str | None]:
        url, _ = request_base_url(request)
        url = settings.public_url or url
        tls = settings.tls
        return url, tls.pin if tls is not None and url.startswith("https://") else None

    return enrollment


def create_app(settings: ControlSettings) -> Starlette:
    plan = AddressPlan(settings.address_pool, settings.agent_prefix, settings.agent_host)
    engine = create_engine(settings.database_url)
    store = Store(engine, plan)
    cluster: Cluster = SingleControl()
    if engine.dialect.name == "postgresql":
        # PostgreSQL may be shared by several replicas: changes, presence and the
        # once-only jobs are coordinated through it (control.cluster.postgres)
        cluster = PostgresCluster(
            engine, settings.public_url or settings.listen_url, settings.replica_timeout
        )
    hub = Hub(
        store,
        offline_after=settings.offline_after,
        auth_timeout=settings.auth_timeout,
        pending_per_address=settings.max_unauthenticated_per_address,
        cluster=cluster,
        auth_queue=settings.auth_queue,
    )
    api = Api(store, hub, enrollment=_enrollment(settings))
    auth_state: dict[str, Any] = {}
    openapi = build_openapi()
    admins = AdminStore(engine)
    dashboard = Dashboard(
        store,
        hub,
        admins,
        WebSettings(insecure_http=settings.dashboard_insecure_http),
        settings.announce,
        settings.public_url or settings.listen_url,
        enrollment=api.enrollment,
    )
    metrics = control_metrics(hub, dashboard)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await migrate(engine)
        if settings.admin_token:
            auth_state["admin_digest"] = _digest(settings.admin_token)
        else:
            stored = await store.get_setting(ADMIN_TOKEN_SETTING)
            if stored is None:
                token = "adm_" + secrets.token_urlsafe(32)
                digest = _digest(token)
                # replicas starting at once on a new database: one token, the first's
                stored = await store.setting_if_absent(ADMIN_TOKEN_SETTING, digest)
                if stored == digest:
                    settings.announce(
                        "Generated an admin token (shown once; only its hash is stored):\n"
                        f"  {token}\n"
                        "Pass it to admin commands with --admin-token or "
                        "KAKUREMICHI_ADMIN_TOKEN."
                    )
                else:
                    settings.announce(
                        "Another Control replica generated the admin token at the same "
                        "time; it is in that replica's output."
                    )
            auth_state["admin_digest"] = stored
        await hub.start()
        await dashboard.start()
        tls_watch = (
            asyncio.get_running_loop().create_task(settings.tls.watch()) if settings.tls else None
        )
        own_acme = None
        if settings.acme is not None:  # gateways answer its http-01 challenges too
            settings.acme.publish = hub.acme.publish_local
            settings.acme.withdraw = hub.acme.withdraw_local
            own_acme = asyncio.get_running_loop().create_task(settings.acme.run())
        log.info(
            "control ready", extra=kv(pool=settings.address_pool, prefix=settings.agent_prefix)
        )
        try:
            yield
        finally:
            if tls_watch is not None:
                tls_watch.cancel()
            if own_acme is not None:
                own_acme.cancel()
                with suppress(asyncio.CancelledError):
                    await own_acme
            await hub.close_all()
            await engine.dispose()

    async def healthz(request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "connections": len(hub.connections)}
        if hub.cluster.replica_id:  # one of several replicas: which, and its jobs' lease
            body["replica"] = hub.cluster.replica_id
            body["jobs"] = hub.cluster.holds_jobs
        return JSONResponse(body)

    async def livez(request: Request) -> Response:
        # the event loop answers: alive (a database outage is not cured by a restart)
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        # ready for traffic: the database answers within 2 s
        try:
            async with asyncio.timeout(2.0), engine.connect() as conn:
                await conn.execute(select(1))
        except Exception as exc:
            reason = f"database: {type(exc).__name__}"
            return JSONResponse({"status": "down", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "connections": len(hub.connections)})

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def store_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StoreError)
        return error_response(exc.status, exc.code, str(exc))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.details)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        if dashboard.wants_page(request):  # a browser on a dashboard address
            return dashboard.error_page(status)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            status, codes.get(status, "http_error"), str(getattr(exc, "detail", ""))
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc, extra=kv(path=request.url.path))
        return error_response(500, "internal", "internal server error")

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/livez", livez, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            WebSocketRoute("/ws", hub.endpoint),
            *api.routes(),
            *dashboard.routes(),
        ],
        lifespan=lifespan,
        exception_handlers={
            StoreError: store_error,
            ApiError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )
    app.add_middleware(RestAudit, admins=admins, events=hub.events)
    app.add_middleware(
        AdminAuth,
        state=auth_state,
        failures=authlimit.AuthFailures(settings.admin_auth_failures, settings.admin_auth_window),
    )
    app.state.store = store
    app.state.hub = hub
    app.state.dashboard = dashboard
    return app
