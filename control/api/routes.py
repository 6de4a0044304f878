"""REST handlers under ``/api/``: agents, gateways, tunnels, certificates.

Handlers validate with the pydantic models, call the store, then tell the hub what
to push.  Errors leave through :class:`ApiError` / store errors, rendered by the app
in the one shape of ``errors.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common import protocol as p
from common.token import EnrollmentToken
from control import certs
from control.api import models as m
from control.api.access_routes import AccessApi
from control.api.body import json_object
from control.api.errors import ApiError, from_validation
from control.db.store import ClientKind, NotFound, Row, Store
from control.ws.configs import tunnel_agents
from control.ws.hub import Hub

Model = TypeVar("Model", bound=BaseModel)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # a stored time no clock can show
        return None


def agent_out(row: Row, api_key: str | None = None) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "name": row["name"],
        "subnet": row["subnet"],
        "virtualIp": row["virtual_ip"],
        "publicKey": row["public_key"],
        "enabled": bool(row["enabled"]),
        "online": bool(row.get("online")),
        "lastSeen": _iso(row["last_seen"]),
        "version": row["client_version"],
        "createdAt": _iso(row["created_at"]),
        "updatedAt": _iso(row["updated_at"]),
    }
    if api_key is not None:
        out["apiKey"] = api_key
    return out


def gateway_out(row: Row, api_key: str | None = None) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "name": row["name"],
        "slot": row["slot"],
        "publicKey": row["public_key"],
        "publicIp": row["public_ip"],
        "wireguardPort": row["wireguard_port"],
        "enabled": bool(row["enabled"]),
        "online": bool(row.get("online")),
        "lastSeen": _iso(row["last_seen"]),
        "version": row["client_version"],
        "createdAt": _iso(row["created_at"]),
        "updatedAt": _iso(row["updated_at"]),
    }
    if api_key is not None:
        out["apiKey"] = api_key
    return out


def tunnel_out(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "protocol": row["protocol"],
        "domain": row["domain"],
        "publicPort": row["public_port"],
        "target": row["target"],
        "agentId": row["agent_id"],
        "agentName": row["agent_name"],
        "agentIp": row["agent_ip"],
        "enabled": bool(row["enabled"]),
        "proxyProtocol": row["proxy_protocol"],
        "health": row["health"],
        "healthDetail": row["health_detail"],
        "healthAt": _iso(row["health_at"]),
        "replicas": replicas_out(row),
        "balance": row.get("balance") or "round_robin",
        "sticky": row.get("sticky"),
        "createdAt": _iso(row["created_at"]),
        "updatedAt": _iso(row["updated_at"]),
    }


def replicas_out(row: Row) -> list[dict[str, Any]]:
    """A tunnel's agents with their state (a tunnel with one agent: that one, active).

    ``state`` is Control's view: ``draining``, ``offline`` (its agent is not connected),
    ``unhealthy`` (its target check fails), ``standby``, ``healthy`` or ``unknown``; a
    gateway may also have ejected it for a while (its ``kakuremichi_replica_state``)."""
    replicas = row.get("replicas") or [
        {
            "agent_id": row["agent_id"],
            "agent_name": row["agent_name"],
            "agent_ip": row["agent_ip"],
            "weight": 1,
            "role": "active",
            "draining": False,
            "health": row["health"],
            "health_detail": row["health_detail"],
            "health_at": row["health_at"],
        }
    ]
    return [
        {
            "agentId": r["agent_id"],
            "agentName": r["agent_name"],
            "agentIp": r["agent_ip"],
            "weight": r["weight"],
            "role": r["role"],
            "draining": bool(r["draining"]),
            "health": r["health"],
            "healthDetail": r["health_detail"],
            "healthAt": _iso(r["health_at"]),
            "state": replica_state(r),
        }
        for r in replicas
    ]


def replica_state(replica: Row) -> str:
    """What a replica is shown as, from Control's side (``replicas_out``)."""
    if replica["draining"]:
        return "draining"
    if replica["health"] in ("offline", "unhealthy"):
        return str(replica["health"])
    if replica["role"] == "standby":
        return "standby"
    return "healthy" if replica["health"] == "healthy" else "unknown"


def certificate_out(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "domain": row["domain"],
        "notAfter": _iso(row["not_after"]),
        "source": row["source"],
        "certificate": row["certificate_pem"],
        "createdAt": _iso(row["created_at"]),
        "updatedAt": _iso(row["updated_at"]),
    }


async def _body(request: Request, model: type[Model]) -> Model:
    data = await json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def _page(request: Request) -> tuple[int, int]:
    def number(name: str, default: int, low: int, high: int) -> int:
        text = request.query_params.get(name)
        if text is None:
            return default
        # ASCII digits only (str.isdigit() takes "²", which int() refuses) and few of
        # them (int() of thousands of digits raises, or costs quadratic time)
        if (
            not (text.isascii() and text.isdigit())
            or len(text) > 12
            or not low <= int(text) <= high
        ):
            raise ApiError(
                422,
                "validation_failed",
                f"query parameter {name!r} must be an integer in {low}..{high}",
                [{"field": name, "message": f"must be an integer in {low}..{high}"}],
            )
        return int(text)

    return number("limit", 50, 1, 500), number("offset", 0, 0, 10**9)


def _paged(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> JSONResponse:
    return JSONResponse({"items": items, "total": total, "limit": limit, "offset": offset})


def _parse_certificate(domain: str, certificate: str, private_key: str) -> float:
    """Check the PEM chain and key (``control/certs.py``); return the leaf's expiry."""
    try:
        return certs.verify(domain, certificate, private_key)
    except certs.CertificateError as exc:
        raise ApiError(422, "invalid_certificate", str(exc)) from None


#: (control URL, pin of Control's key or None) that enrollment tokens carry, per request
Enrollment = Callable[[Request], tuple[str, str | None]]


def request_base_url(request: Request) -> tuple[str, str | None]:
    """The default :data:`Enrollment`: the URL the admin reached Control at, no pin."""
    return str(request.base_url).rstrip("/"), None


class Api:
    """The handlers, bound to one store and hub."""

    def __init__(self, store: Store, hub: Hub, enrollment: Enrollment = request_base_url) -> None:
        self.store = store
        self.hub = hub
        self.enrollment = enrollment

    def _with_token(self, out: dict[str, Any], request: Request) -> dict[str, Any]:
        """``out`` with the enrollment token for its new API key (common.token)."""
        url, pin = self.enrollment(request)
        out["token"] = EnrollmentToken(url, out["apiKey"], pin).encode()
        return out

    # -- agents and gateways ----------------------------------------------------------

    def _out(self, kind: ClientKind, row: Row, key: str | None = None) -> dict[str, Any]:
        online, seen = self.hub.presence(kind, row["id"])
        row = {**row, "online": online, "last_seen": seen or row["last_seen"]}
        return agent_out(row, key) if kind == "agent" else gateway_out(row, key)

    async def list_clients(self, request: Request, kind: ClientKind) -> Response:
        limit, offset = _page(request)
        rows, total = await self.store.list_clients(kind, limit, offset)
        return _paged([self._out(kind, r) for r in rows], total, limit, offset)

    async def create_client(self, request: Request, kind: ClientKind) -> Response:
        body = await _body(request, m.ClientCreate)
        row, key = await self.store.create_client(kind, body.name, body.enabled)
        return JSONResponse(self._with_token(self._out(kind, row, key), request), status_code=201)

    async def get_client(self, request: Request, kind: ClientKind) -> Response:
        row = await self.store.get_client(kind, request.path_params["ref"])
        return JSONResponse(self._out(kind, row))

    async def update_client(self, request: Request, kind: ClientKind) -> Response:
        body = await _body(request, m.ClientUpdate)
        async with self.hub.lock:
            before = row = await self.store.get_client(kind, request.path_params["ref"])
            if body.name is not None:
                row = await self.store.rename_client(kind, row["id"], body.name)
            if body.enabled is not None:
                row = await self.store.set_client_enabled(kind, row["id"], body.enabled)
            disabling = bool(before["enabled"]) and not row["enabled"]
            if not disabling:
                await self.hub.push_config_locked(kind, [row["id"]])
                await self.hub.push_config_locked("gateway" if kind == "agent" else "agent")
        if disabling:
            await self.hub.client_disabled(kind, row["id"])
        return JSONResponse(self._out(kind, row))

    async def delete_client(self, request: Request, kind: ClientKind) -> Response:
        async with self.hub.lock:
            row = await self.store.delete_client(kind, request.path_params["ref"])
            await self.hub.push_config_locked("gateway" if kind == "agent" else "agent")
        await self.hub.disconnect(kind, row["id"], p.CLOSE_REVOKED, f"{kind} deleted")
        return Response(status_code=204)

    async def rotate_key(self, request: Request, kind: ClientKind) -> Response:
        row, key = await self.store.rotate_key(kind, request.path_params["ref"])
        await self.hub.disconnect(kind, row["id"], p.CLOSE_REVOKED, "API key rotated")
        return JSONResponse(self._with_token(self._out(kind, row, key), request))

    # -- tunnels ----------------------------------------------------------------------

    async def list_tunnels(self, request: Request) -> Response:
        limit, offset = _page(request)
        agent_ref = request.query_params.get("agent")
        agent_id = None
        if agent_ref:
            agent_id = (await self.store.get_client("agent", agent_ref))["id"]
        rows, total = await self.store.list_tunnels(limit, offset, agent_id)
        return _paged([tunnel_out(r) for r in rows], total, limit, offset)

    async def _check_wildcard(self, domain: str | None) -> None:
        """A wildcard tunnel needs a certificate that can cover it: one stored for that
        very wildcard, or a connected gateway that can prove it with DNS-01."""
        if domain is None or not domain.startswith("*."):
            return
        if self.hub.acme.can_prove(domain):
            return
        try:
            await self.store.get_certificate(domain)
        except NotFound:
            raise ApiError(
                422,
                "wildcard_needs_certificate",
                f"no certificate covers {domain}: upload one for it, or connect a gateway "
                "with ACME DNS-01 for its zone (--acme-dns-provider, --acme-dns-zone)",
            ) from None

    async def create_tunnel(self, request: Request) -> Response:
        body = await _body(request, m.TunnelCreate)
        await self._check_wildcard(body.domain)
        async with self.hub.lock:
            row = await self.store.create_tunnel(body.model_dump())
            self.hub.tunnel_event("tunnel_create", row, tunnel_agents(row))
        return JSONResponse(tunnel_out(row), status_code=201)

    async def get_tunnel(self, request: Request) -> Response:
        return JSONResponse(tunnel_out(await self.store.get_tunnel(request.path_params["id"])))

    async def update_tunnel(self, request: Request) -> Response:
        body = await _body(request, m.TunnelUpdate)
        changes = body.model_dump(exclude_unset=True)
        nulls = [
            k
            for k in ("protocol", "target", "agent", "enabled")
            if k in changes and changes[k] is None
        ]
        if nulls:
            raise ApiError(422, "validation_failed", f"{nulls[0]} cannot be null")
        current = await self.store.get_tunnel(request.path_params["id"])
        if changes.get("domain") != current["domain"]:
            await self._check_wildcard(changes.get("domain"))
        protocol = changes.get("protocol") or current["protocol"]
        target = changes.get("target") or current["target"]
        if protocol == "http" and changes.get("public_port") is not None:
            raise ApiError(
                422, "validation_failed", "an http tunnel is routed by domain; omit publicPort"
            )
        if protocol != "http" and changes.get("domain") is not None:
            raise ApiError(
                422, "validation_failed", f"a {protocol} tunnel is routed by port; omit domain"
            )
        try:
            m.check_target(target, allow_url=protocol == "http")
        except ValueError as exc:
            raise ApiError(422, "validation_failed", f"target: {exc}") from exc
        async with self.hub.lock:
            before, after = await self.store.update_tunnel(current["id"], changes)
            self.hub.tunnel_changed(before, after)
        return JSONResponse(tunnel_out(after))

    async def drain_replica(self, request: Request, draining: bool) -> Response:
        """``POST /api/tunnels/{id}/replicas/{agent}/drain`` (``undrain``): no new
        requests or connections go to that agent for this tunnel (open ones finish)."""
        async with self.hub.lock:
            before, after = await self.store.set_replica_draining(
                request.path_params["id"], request.path_params["agent"], draining
            )
            self.hub.tunnel_changed(before, after)
        return JSONResponse(tunnel_out(after))

    async def drain(self, request: Request) -> Response:
        return await self.drain_replica(request, True)

    async def undrain(self, request: Request) -> Response:
        return await self.drain_replica(request, False)

    async def delete_tunnel(self, request: Request) -> Response:
        async with self.hub.lock:
            row = await self.store.delete_tunnel(request.path_params["id"])
            self.hub.tunnel_event("tunnel_delete", row, tunnel_agents(row))
        return Response(status_code=204)

    # -- certificates -----------------------------------------------------------------

    async def list_certificates(self, request: Request) -> Response:
        limit, offset = _page(request)
        rows, total = await self.store.list_certificates(limit, offset)
        return _paged([certificate_out(r) for r in rows], total, limit, offset)

    async def create_certificate(self, request: Request) -> Response:
        body = await _body(request, m.CertificateCreate)
        not_after = _parse_certificate(body.domain, body.certificate, body.private_key)
        async with self.hub.lock:
            row = await self.store.create_certificate(
                body.domain, body.certificate, body.private_key, not_after
            )
            await self.hub.push_config_locked("gateway")
        return JSONResponse(certificate_out(row), status_code=201)

    async def get_certificate(self, request: Request) -> Response:
        row = await self.store.get_certificate(request.path_params["ref"])
        return JSONResponse(certificate_out(row))

    async def update_certificate(self, request: Request) -> Response:
        body = await _body(request, m.CertificateUpdate)
        current = await self.store.get_certificate(request.path_params["ref"])
        not_after = _parse_certificate(current["domain"], body.certificate, body.private_key)
        async with self.hub.lock:
            row = await self.store.upsert_certificate(
                current["domain"], body.certificate, body.private_key, not_after, "manual"
            )
            await self.hub.push_config_locked("gateway")
        return JSONResponse(certificate_out(row))

    async def delete_certificate(self, request: Request) -> Response:
        async with self.hub.lock:
            await self.store.delete_certificate(request.path_params["ref"])
            await self.hub.push_config_locked("gateway")
        return Response(status_code=204)

    async def acme_status(self, request: Request) -> Response:
        """Shared ACME (``control/acme.py``): orders, the last that ended, gateways."""
        acme = self.hub.acme
        tunnels, certificates = await self.store.all_tunnels(), await self.store.all_certificates()
        orders = [
            {
                **order,
                "leaseExpiresAt": _iso(order["leaseExpiresAt"]),
                "nextTryAt": _iso(order["nextTryAt"]),
            }
            for order in acme.status(tunnels, certificates)
        ]
        recent = [
            {**ended, "grantedAt": _iso(ended["grantedAt"]), "endedAt": _iso(ended["endedAt"])}
            for ended in reversed(acme.recent)
        ]
        names = {c.client_id: c.name for c in self.hub.connected("gateway")}
        gateways = [
            {"name": names[g], "challenges": list(r.challenges), "dnsZones": list(r.dns_zones)}
            for g, r in sorted(acme.capable.items(), key=lambda item: names.get(item[0], ""))
            if g in names
        ]
        return JSONResponse({"orders": orders, "recent": recent, "gateways": gateways})

    def routes(self) -> list[Route]:
        def bind(kind: ClientKind, method: Any) -> Any:
            async def handler(request: Request) -> Response:
                return await method(request, kind)  # type: ignore[no-any-return]

            return handler

        routes: list[Route] = []
        for kind, plural in (("agent", "agents"), ("gateway", "gateways")):
            k: ClientKind = "agent" if kind == "agent" else "gateway"
            routes += [
                Route(f"/api/{plural}", bind(k, self.list_clients), methods=["GET"]),
                Route(f"/api/{plural}", bind(k, self.create_client), methods=["POST"]),
                Route(f"/api/{plural}/{{ref}}", bind(k, self.get_client), methods=["GET"]),
                Route(f"/api/{plural}/{{ref}}", bind(k, self.update_client), methods=["PATCH"]),
                Route(f"/api/{plural}/{{ref}}", bind(k, self.delete_client), methods=["DELETE"]),
                Route(
                    f"/api/{plural}/{{ref}}/rotate-key", bind(k, self.rotate_key), methods=["POST"]
                ),
            ]
        routes += [
            Route("/api/tunnels", self.list_tunnels, methods=["GET"]),
            Route("/api/tunnels", self.create_tunnel, methods=["POST"]),
            Route("/api/tunnels/{id}", self.get_tunnel, methods=["GET"]),
            Route("/api/tunnels/{id}", self.update_tunnel, methods=["PATCH"]),
            Route("/api/tunnels/{id}", self.delete_tunnel, methods=["DELETE"]),
            Route("/api/tunnels/{id}/replicas/{agent}/drain", self.drain, methods=["POST"]),
            Route("/api/tunnels/{id}/replicas/{agent}/undrain", self.undrain, methods=["POST"]),
            Route("/api/certificates", self.list_certificates, methods=["GET"]),
            Route("/api/certificates", self.create_certificate, methods=["POST"]),
            Route("/api/certificates/{ref}", self.get_certificate, methods=["GET"]),
            Route("/api/certificates/{ref}", self.update_certificate, methods=["PATCH"]),
            Route("/api/certificates/{ref}", self.delete_certificate, methods=["DELETE"]),
            Route("/api/acme", self.acme_status, methods=["GET"]),
        ]
        routes += AccessApi(self.store, self.hub).routes()
        return routes
