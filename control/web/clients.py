"""The dashboard's overview, agents and gateways (a new key shown once with the commands
that use it), and the audit log."""

from __future__ import annotations

import time

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from common.token import EnrollmentToken
from control.api import models as m
from control.db.store import ClientKind, Row, StoreError
from control.web.core import Ctx, DashboardCore, field_errors

#: audit entries per page
AUDIT_PAGE = 50
#: certificates expiring within this many days are flagged
EXPIRY_WARNING_DAYS = 14


class ClientPages:
    """Overview, agents, gateways and the audit log."""

    def __init__(self, core: DashboardCore) -> None:
        self.core = core

    async def overview(self, ctx: Ctx) -> Response:
        now = time.time()
        agents = [
            self.core._client_view("agent", r, now)
            for r in await self.core.store.all_clients("agent")
        ]
        gateways = [
            self.core._client_view("gateway", r, now)
            for r in await self.core.store.all_clients("gateway")
        ]
        tunnels = [self.core._tunnel_view(r, now) for r in await self.core.store.all_tunnels()]
        certificates = [
            {**c, "days_left": (c["not_after"] - now) / 86400}
            for c in await self.core.store.all_certificates()
        ]
        return self.core._html(
            ctx,
            "overview.html",
            agents=agents,
            gateways=gateways,
            tunnels=tunnels,
            certificates=certificates,
            warn_days=EXPIRY_WARNING_DAYS,
            notice=ctx.request.query_params.get("notice"),
        )

    def _commands(self, kind: ClientKind, key: str, request: Request) -> dict[str, str]:
        """How to run it: with the enrollment token (``common.token``: Control's URL, the
        key and, with Control's own TLS, its key's pin), as a container, with Compose,
        and the long form."""
        base, pin = self.core.enrollment(request)
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
        rows = [
            self.core._client_view(kind, r, now) for r in await self.core.store.all_clients(kind)
        ]
        errors: dict[str, str] = {}
        name = ""
        if ctx.request.method == "POST":
            name = ctx.form.get("name", "").strip()
            try:
                body = m.ClientCreate.model_validate({"name": name})
            except ValidationError as exc:
                errors = field_errors(exc)
            else:
                try:
                    row, key = await self.core._actions(ctx).create_client(kind, body.name)
                except StoreError as exc:
                    errors = {"name": str(exc)}
                else:
                    return self._key_page(ctx, kind, row, key, created=True)
        return self.core._html(
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
        return self.core._html(
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
        row = await self.core.store.get_client(kind, ctx.param("id"))
        errors: dict[str, str] = {}
        name = row["name"]
        if ctx.request.method == "POST":
            name = ctx.form.get("name", "").strip()
            try:
                body = m.ClientUpdate.model_validate({"name": name})
            except ValidationError as exc:
                errors = field_errors(exc)
            else:
                try:
                    await self.core._actions(ctx).rename_client(kind, row["id"], body.name or name)
                except StoreError as exc:
                    errors = {"name": str(exc)}
                else:
                    return self.core._back(f"/{kind}s/{row['id']}", "saved")
        now = time.time()
        tunnels = (
            [self.core._tunnel_view(t, now) for t in await self.core.store.all_tunnels(row["id"])]
            if kind == "agent"
            else []
        )
        history, _ = await self.core.admins.audit(20, 0, row["id"])
        return self.core._html(
            ctx,
            "client.html",
            422 if errors else 200,
            kind=kind,
            row=self.core._client_view(kind, row, now),
            name=name,
            errors=errors,
            tunnels=tunnels,
            history=history,
            notice=ctx.request.query_params.get("notice"),
        )

    async def client_rotate(self, ctx: Ctx, kind: ClientKind) -> Response:
        row, key = await self.core._actions(ctx).rotate_key(kind, ctx.param("id"))
        return self._key_page(ctx, kind, row, key, created=False)

    async def client_enable(self, ctx: Ctx, kind: ClientKind) -> Response:
        """``/{kind}s/{id}/enable`` and ``…/disable``."""
        enabled = ctx.request.url.path.endswith("/enable")
        row = await self.core._actions(ctx).set_client_enabled(kind, ctx.param("id"), enabled)
        return self.core._back(f"/{kind}s/{row['id']}", "enabled" if enabled else "disabled")

    async def client_delete(self, ctx: Ctx, kind: ClientKind) -> Response:
        await self.core._actions(ctx).delete_client(kind, ctx.param("id"))
        return self.core._back(f"/{kind}s", "deleted")

    async def audit(self, ctx: Ctx) -> Response:
        text = ctx.request.query_params.get("page", "1")
        page = int(text) if text.isascii() and text.isdigit() and 0 < len(text) < 7 else 1
        page = max(1, page)
        rows, total = await self.core.admins.audit(AUDIT_PAGE, (page - 1) * AUDIT_PAGE)
        pages = max(1, -(-total // AUDIT_PAGE))
        return self.core._html(ctx, "audit.html", rows=rows, page=page, pages=pages, total=total)
