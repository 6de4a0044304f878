"""The dashboard's tunnels: list, create, edit, enable, disable, delete, drain a
replica, their traffic chart, and their access policies and share links
(``control/access.py``)."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from control import access
from control.api import models as m
from control.api.routes import replicas_out
from control.db.store import StoreError
from control.web import render
from control.web import session as web
from control.web.core import Ctx, DashboardCore, field_errors, form_lines


class TunnelPages:
    """Tunnels, their traffic chart, access policies and share links."""

    def __init__(self, core: DashboardCore) -> None:
        self.core = core

    async def tunnels(self, ctx: Ctx) -> Response:
        now = time.time()
        rows = [self.core._tunnel_view(r, now) for r in await self.core.store.all_tunnels()]
        return self.core._html(
            ctx, "tunnels.html", rows=rows, notice=ctx.request.query_params.get("notice")
        )

    async def tunnel_form(self, ctx: Ctx) -> Response:
        """New tunnel (``/tunnels/new``) or edit one (``/tunnels/{id}/edit``)."""
        tunnel_id = ctx.request.path_params.get("id")
        current = await self.core.store.get_tunnel(tunnel_id) if tunnel_id else None
        agents = await self.core.store.all_clients("agent")
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
                errors = field_errors(exc)
            else:
                fields = parsed.model_dump()
                try:
                    if current is None:
                        row = await self.core._actions(ctx).create_tunnel(fields)
                        return self.core._back(f"/tunnels/{row['id']}", "created")
                    changes = {k: v for k, v in fields.items() if k != "agent"}
                    if values["agent"] not in (current["agent_name"], current["agent_id"]):
                        changes["agent"] = values["agent"]
                    await self.core._actions(ctx).update_tunnel(
                        current["id"], changes, "tunnel.update"
                    )
                    return self.core._back(f"/tunnels/{current['id']}", "saved")
                except StoreError as exc:
                    errors = {"form": str(exc)}
        return self.core._html(
            ctx,
            "tunnel_form.html",
            422 if errors else 200,
            current=current,
            values=values,
            errors=errors,
            agents=agents,
        )

    async def tunnel_detail(self, ctx: Ctx) -> Response:
        row = await self.core.store.get_tunnel(ctx.param("id"))
        history, _ = await self.core.admins.audit(20, 0, row["id"])
        policy = access.access_out(
            await self.core.store.get_access(row["id"]),
            await self.core.store.share_links(row["id"]),
        )
        return self.core._html(
            ctx,
            "tunnel.html",
            row=self.core._tunnel_view(row, time.time()),
            # several agents: each one's state (one agent: the facts above say it all)
            replicas=replicas_out(row) if len(row["replicas"]) > 1 else [],
            policy=policy,
            history=history,
            notice=ctx.request.query_params.get("notice"),
        )

    async def tunnel_enable(self, ctx: Ctx) -> Response:
        enabled = ctx.request.url.path.endswith("/enable")
        row = await self.core._actions(ctx).update_tunnel(
            ctx.param("id"), {"enabled": enabled}, "tunnel.enable" if enabled else "tunnel.disable"
        )
        return self.core._back(f"/tunnels/{row['id']}", "enabled" if enabled else "disabled")

    async def tunnel_drain(self, ctx: Ctx) -> Response:
        """Drain one replica (``.../replicas/{agent}/drain``) or take it back
        (``.../undrain``); an agent that is not a replica of the tunnel is refused."""
        draining = ctx.request.url.path.endswith("/drain")
        row = await self.core._actions(ctx).set_replica_draining(
            ctx.param("id"), ctx.param("agent"), draining
        )
        return self.core._back(f"/tunnels/{row['id']}", "drained" if draining else "undrained")

    async def tunnel_delete(self, ctx: Ctx) -> Response:
        await self.core._actions(ctx).delete_tunnel(ctx.param("id"))
        return self.core._back("/tunnels", "deleted")

    async def tunnel_access(self, ctx: Ctx) -> Response:
        """Edit a tunnel's access policy: IP rules, the sign-in password, basic-auth
        users, session length and identity headers; OIDC and path rules are kept as they
        are (set through the API or ``kakuremichi apply``); share links."""
        tunnel = await self.core.store.get_tunnel(ctx.param("id"))
        row = await self.core.store.get_access(tunnel["id"])
        stored = json.loads(row["policy"]) if row is not None else None
        policy = access.access_out(row, await self.core.store.share_links(tunnel["id"]))
        errors: dict[str, str] = {}
        form = ctx.form
        if ctx.request.method == "POST":
            try:
                data = _access_input(form, stored, tunnel["protocol"] == "http")
                body = access.AccessIn.model_validate(data)
            except ValueError as exc:  # ValidationError is a ValueError
                errors["form"] = (
                    "; ".join(field_errors(exc).values())
                    if isinstance(exc, ValidationError)
                    else str(exc)
                )
            else:
                try:
                    await self.core._actions(ctx).set_access(
                        tunnel, body, set(body.model_fields_set)
                    )
                except ValueError as exc:
                    errors["form"] = str(exc)
                else:
                    return self.core._back(f"/tunnels/{tunnel['id']}", "saved")
        return self.core._html(
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
        tunnel = await self.core.store.get_tunnel(ctx.param("id"))
        await self.core._actions(ctx).delete_access(tunnel)
        return self.core._back(f"/tunnels/{tunnel['id']}", "saved")

    async def share_link_create(self, ctx: Ctx) -> Response:
        tunnel = await self.core.store.get_tunnel(ctx.param("id"))
        if tunnel["protocol"] != "http" or await self.core.store.get_access(tunnel["id"]) is None:
            return self.core._refusal(
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
            return self.core._refusal(
                422, "Not done", "A share link lasts 1 minute to 365 days and 1 to 1,000,000 uses."
            )
        link, url = await self.core._actions(ctx).create_share_link(tunnel, body)
        return self.core._html(ctx, "share_link.html", 201, tunnel=tunnel, link=link, url=url)

    async def share_link_delete(self, ctx: Ctx) -> Response:
        tunnel = await self.core.store.get_tunnel(ctx.param("id"))
        await self.core._actions(ctx).delete_share_link(tunnel, ctx.param("link"))
        return self.core._back(f"/tunnels/{tunnel['id']}", "deleted")

    async def tunnel_chart(self, ctx: Ctx) -> Response:
        tunnel_id = ctx.param("id")
        row = await self.core.store.get_tunnel(tunnel_id)
        svg = render.traffic_svg(
            self.core.hub.traffic.series(tunnel_id, time.time()),
            row["domain"] or f"port {row['public_port']}",
        )
        return Response(svg, media_type="image/svg+xml", headers=web.SECURITY_HEADERS)


def _access_input(
    form: dict[str, str], stored: dict[str, Any] | None, http: bool
) -> dict[str, Any]:
    """The ``AccessIn`` body for the access form: what the form edits, plus the OIDC
    provider and path rules as stored (their secrets left out: they keep their hashes)."""
    data: dict[str, Any] = {
        "ipAllow": form_lines(form.get("ip_allow", "")),
        "ipDeny": form_lines(form.get("ip_deny", "")),
    }
    if not http:  # raw tunnels take IP rules only
        return data
    users = []
    for line in form_lines(form.get("basic_auth", "")):
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
