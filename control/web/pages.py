"""The dashboard Control serves at ``/``: the pages grouped by what they are about,
composed over one :class:`~control.web.core.DashboardCore`, and their routes.

``signin.py`` (first-run setup, sign-in and out, users, passwords), ``clients.py``
(overview, agents, gateways, audit log), ``tunnels.py`` (tunnels, traffic chart,
access policies, share links), ``live.py`` (the event stream); ``core.py`` has what
every page goes through (transport rule, session, CSRF, security headers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from control.db.admins import AdminStore
from control.db.store import ClientKind, Store
from control.web import render
from control.web import session as web
from control.web.clients import ClientPages
from control.web.core import Ctx, DashboardCore, Handler
from control.web.live import LivePages
from control.web.signin import SignInPages
from control.web.tunnels import TunnelPages
from control.ws.hub import Hub

STATIC = render.TEMPLATES.parent / "static"


class Dashboard:
    """The dashboard of one Control: its pages and their routes."""

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
        self.core = DashboardCore(store, hub, admins, settings, announce, public_url, enrollment)
        self.signin = SignInPages(self.core)
        self.clients = ClientPages(self.core)
        self.tunnels = TunnelPages(self.core)
        self.live = LivePages(self.core)

    @property
    def admins(self) -> AdminStore:
        return self.core.admins

    @property
    def logins(self) -> dict[str, int]:
        """Sign-ins by result since start (for /metrics)."""
        return self.core.logins

    @property
    def setup_url(self) -> str | None:
        """The one-time setup link printed at start (None once an admin user exists)."""
        return self.core.setup_url

    async def start(self) -> None:
        """Print the one-time setup link if there is no admin user yet."""
        await self.signin.start()

    def wants_page(self, request: Request) -> bool:
        return self.core.wants_page(request)

    def error_page(self, status: int) -> Response:
        return self.core.error_page(status)

    def routes(self) -> list[BaseRoute]:
        page = self.core.page
        signin, clients, tunnels, live = self.signin, self.clients, self.tunnels, self.live

        def per_kind(
            kind: ClientKind, method: Callable[[Ctx, ClientKind], Awaitable[Response]]
        ) -> Handler:
            async def handler(ctx: Ctx) -> Response:
                return await method(ctx, kind)

            return handler

        routes: list[BaseRoute] = [
            Route("/", page(clients.overview), methods=["GET"]),
            Route("/setup", page(signin.setup_page, signed_in=False), methods=["GET", "POST"]),
            Route("/login", page(signin.login_page, signed_in=False), methods=["GET", "POST"]),
            Route("/logout", page(signin.logout), methods=["POST"]),
            Route("/events", page(live.live), methods=["GET"]),
            Route("/tunnels", page(tunnels.tunnels), methods=["GET"]),
            Route("/tunnels", page(tunnels.tunnel_form), methods=["POST"]),
            Route("/tunnels/new", page(tunnels.tunnel_form), methods=["GET"]),
            Route("/tunnels/{id}", page(tunnels.tunnel_detail), methods=["GET"]),
            Route("/tunnels/{id}/edit", page(tunnels.tunnel_form), methods=["GET", "POST"]),
            Route("/tunnels/{id}/enable", page(tunnels.tunnel_enable), methods=["POST"]),
            Route("/tunnels/{id}/disable", page(tunnels.tunnel_enable), methods=["POST"]),
            Route("/tunnels/{id}/delete", page(tunnels.tunnel_delete), methods=["POST"]),
            Route(
                "/tunnels/{id}/replicas/{agent}/drain", page(tunnels.tunnel_drain), methods=["POST"]
            ),
            Route(
                "/tunnels/{id}/replicas/{agent}/undrain",
                page(tunnels.tunnel_drain),
                methods=["POST"],
            ),
            Route("/tunnels/{id}/chart.svg", page(tunnels.tunnel_chart), methods=["GET"]),
            Route("/tunnels/{id}/access", page(tunnels.tunnel_access), methods=["GET", "POST"]),
            Route(
                "/tunnels/{id}/access/remove", page(tunnels.tunnel_access_remove), methods=["POST"]
            ),
            Route("/tunnels/{id}/share-links", page(tunnels.share_link_create), methods=["POST"]),
            Route(
                "/tunnels/{id}/share-links/{link}/delete",
                page(tunnels.share_link_delete),
                methods=["POST"],
            ),
            Route("/audit", page(clients.audit), methods=["GET"]),
            Route("/users", page(signin.users), methods=["GET", "POST"]),
            Route("/users/{id}/delete", page(signin.user_delete), methods=["POST"]),
            Route("/account/password", page(signin.password), methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ]
        for kind in ("agent", "gateway"):
            k: ClientKind = "agent" if kind == "agent" else "gateway"
            routes += [
                Route(f"/{k}s", page(per_kind(k, clients.clients)), methods=["GET", "POST"]),
                Route(
                    f"/{k}s/{{id}}",
                    page(per_kind(k, clients.client_detail)),
                    methods=["GET", "POST"],
                ),
                Route(
                    f"/{k}s/{{id}}/rotate-key",
                    page(per_kind(k, clients.client_rotate)),
                    methods=["POST"],
                ),
                Route(
                    f"/{k}s/{{id}}/delete",
                    page(per_kind(k, clients.client_delete)),
                    methods=["POST"],
                ),
                Route(
                    f"/{k}s/{{id}}/enable",
                    page(per_kind(k, clients.client_enable)),
                    methods=["POST"],
                ),
                Route(
                    f"/{k}s/{{id}}/disable",
                    page(per_kind(k, clients.client_enable)),
                    methods=["POST"],
                ),
            ]
        return routes
