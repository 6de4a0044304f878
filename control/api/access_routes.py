"""REST handlers for tunnels' access policies and share links (``control/access.py``).

``GET/PUT/DELETE /api/tunnels/{id}/access``: the policy (the API never shows a hash or a
secret, only whether one is set); ``GET/POST /api/tunnels/{id}/share-links`` and
``DELETE /api/tunnels/{id}/share-links/{link}``: share links, whose URL (it holds the
token) is shown once, at creation.  Every change is pushed to the gateways at once, so
it is in force for the next request.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control import access
from control.api.body import json_object
from control.api.errors import ApiError, from_validation
from control.db.store import Store
from control.ws.hub import Hub


class AccessApi:
    """The handlers, bound to one store and hub."""

    def __init__(self, store: Store, hub: Hub) -> None:
        self.store = store
        self.hub = hub

    async def get_access(self, request: Request) -> Response:
        tunnel = await self.store.get_tunnel(request.path_params["id"])
        row = await self.store.get_access(tunnel["id"])
        links = await self.store.share_links(tunnel["id"])
        return JSONResponse(access.access_out(row, links))

    async def put_access(self, request: Request) -> Response:
        tunnel = await self.store.get_tunnel(request.path_params["id"])
        data = await json_object(request)
        try:
            body = access.AccessIn.model_validate(data)
        except ValidationError as exc:
            raise from_validation(exc) from exc
        fields = {name for name in body.model_fields_set}
        if tunnel["protocol"] != "http":
            http_only = fields & {"basic_auth", "password", "oidc", "paths", "session_domain"}
            if http_only:
                raise ApiError(
                    422,
                    "validation_failed",
                    f"a {tunnel['protocol']} tunnel takes IP rules only (not "
                    f"{sorted(http_only)[0]})",
                )
        async with self.hub.lock:
            current = await self.store.get_access(tunnel["id"])
            try:
                stored, changed = access.build_stored(
                    body,
                    fields,
                    json.loads(current["policy"]) if current is not None else None,
                    tunnel["domain"],
                )
            except ValueError as exc:
                raise ApiError(422, "validation_failed", str(exc)) from None
            row = await self.store.put_access(tunnel["id"], json.dumps(stored), changed)
            await self.hub.push_config_locked("gateway")
        links = await self.store.share_links(tunnel["id"])
        return JSONResponse(access.access_out(row, links))

    async def delete_access(self, request: Request) -> Response:
        tunnel = await self.store.get_tunnel(request.path_params["id"])
        async with self.hub.lock:
            await self.store.delete_access(tunnel["id"])  # its share links go with it
            await self.hub.push_config_locked("gateway")
        return Response(status_code=204)

    async def list_share_links(self, request: Request) -> Response:
        tunnel = await self.store.get_tunnel(request.path_params["id"])
        links = await self.store.share_links(tunnel["id"])
        return JSONResponse({"items": [access.share_link_out(link) for link in links]})

    async def create_share_link(self, request: Request) -> Response:
        tunnel = await self.store.get_tunnel(request.path_params["id"])
        if tunnel["protocol"] != "http" or not tunnel["domain"]:
            raise ApiError(422, "validation_failed", "share links are for http tunnels")
        if await self.store.get_access(tunnel["id"]) is None:
            raise ApiError(
                422,
                "validation_failed",
                "the tunnel is open to anyone: give it an access policy first (an empty one "
                "lets only share-link holders in)",
            )
        data = await json_object(request)
        try:
            body = access.ShareLinkCreate.model_validate(data)
        except ValidationError as exc:
            raise from_validation(exc) from exc
        token, token_hash = access.new_share_token()
        async with self.hub.lock:
            link = await self.store.create_share_link(
                tunnel["id"], token_hash, time.time() + body.expires_in, body.max_uses
            )
            await self.hub.push_config_locked("gateway")
        url = f"https://{tunnel['domain']}/.kakuremichi/share#t={token}"
        return JSONResponse(access.share_link_out(link, url), status_code=201)

    async def delete_share_link(self, request: Request) -> Response:
        tunnel = await self.store.get_tunnel(request.path_params["id"])
        async with self.hub.lock:
            await self.store.delete_share_link(tunnel["id"], request.path_params["link"])
            await self.hub.push_config_locked("gateway")
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        return [
            Route("/api/tunnels/{id}/access", self.get_access, methods=["GET"]),
            Route("/api/tunnels/{id}/access", self.put_access, methods=["PUT"]),
            Route("/api/tunnels/{id}/access", self.delete_access, methods=["DELETE"]),
            Route("/api/tunnels/{id}/share-links", self.list_share_links, methods=["GET"]),
            Route("/api/tunnels/{id}/share-links", self.create_share_link, methods=["POST"]),
            Route(
                "/api/tunnels/{id}/share-links/{link}", self.delete_share_link, methods=["DELETE"]
            ),
        ]


def openapi_paths(errors: Any, json_of: Any, ref: Any) -> dict[str, Any]:
    """The OpenAPI paths of these routes (``openapi.py`` passes its helpers)."""
    tunnel = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    link = {"name": "link", "in": "path", "required": True, "schema": {"type": "string"}}
    policy_out = {"type": "object", "description": "the policy; hashes and secrets never shown"}
    link_out = {
        "type": "object",
        "required": ["id", "expiresAt", "maxUses", "uses"],
        "properties": {
            "id": {"type": "string"},
            "expiresAt": {"type": "number"},
            "maxUses": {"type": ["integer", "null"]},
            "uses": {"type": "integer"},
            "url": {"type": "string", "description": "only at creation: it holds the token"},
        },
    }
    return {
        "/api/tunnels/{id}/access": {
            "parameters": [tunnel],
            "get": {
                "tags": ["access"],
                "summary": "A tunnel's access policy",
                "operationId": "get_access",
                "responses": {
                    "200": {"description": "policy", **json_of(policy_out)},
                    **errors(404),
                },
            },
            "put": {
                "tags": ["access"],
                "summary": "Set a tunnel's access policy (secrets left out keep their value)",
                "operationId": "put_access",
                "requestBody": {"required": True, **json_of(ref(access.AccessIn))},
                "responses": {
                    "200": {"description": "policy", **json_of(policy_out)},
                    **errors(400, 404, 413, 422),
                },
            },
            "delete": {
                "tags": ["access"],
                "summary": "Remove a tunnel's access policy (the tunnel is open to anyone)",
                "operationId": "delete_access",
                "responses": {"204": {"description": "removed"}, **errors(404)},
            },
        },
        "/api/tunnels/{id}/share-links": {
            "parameters": [tunnel],
            "get": {
                "tags": ["access"],
                "summary": "A tunnel's share links",
                "operationId": "list_share_links",
                "responses": {
                    "200": {
                        "description": "share links",
                        **json_of(
                            {
                                "type": "object",
                                "required": ["items"],
                                "properties": {"items": {"type": "array", "items": link_out}},
                            }
                        ),
                    },
                    **errors(404),
                },
            },
            "post": {
                "tags": ["access"],
                "summary": "Make a share link (its URL is shown once)",
                "operationId": "create_share_link",
                "requestBody": {"required": True, **json_of(ref(access.ShareLinkCreate))},
                "responses": {
                    "201": {"description": "share link", **json_of(link_out)},
                    **errors(400, 404, 413, 422),
                },
            },
        },
        "/api/tunnels/{id}/share-links/{link}": {
            "parameters": [tunnel, link],
            "delete": {
                "tags": ["access"],
                "summary": "Delete a share link (its sessions end)",
                "operationId": "delete_share_link",
                "responses": {"204": {"description": "deleted"}, **errors(404)},
            },
        },
    }
