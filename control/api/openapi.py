"""The OpenAPI 3.1 document served at ``/openapi.json``, built from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from control import access
from control.api import access_routes
from control.api import models as m

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "malformed JSON",
        401: "missing or wrong admin token",
        404: "not found",
        409: "conflict (name, domain or port in use; address pool exhausted)",
        413: "body too large",
        422: "validation failed",
        429: "too many failed admin-token attempts from this address (see Retry-After)",
    }
    return {str(s): {"description": text[s], **_json(_ref(m.Error))} for s in (401, *statuses, 429)}


def _page_of(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": {"type": "array", "items": _ref(model)},
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    }


_PAGE_PARAMS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
]


def _collection(
    tag: str,
    out: type[BaseModel],
    create: type[BaseModel],
    update: type[BaseModel],
    ref_name: str,
    ref_doc: str,
    extra_list_params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    item_param = {
        "name": ref_name,
        "in": "path",
        "required": True,
        "description": ref_doc,
        "schema": {"type": "string", "minLength": 1},
    }
    return {
        "list": {
            "get": {
                "tags": [tag],
                "summary": f"List {tag}",
                "operationId": f"list_{tag}",
                "parameters": _PAGE_PARAMS + (extra_list_params or []),
                "responses": {
                    "200": {"description": "a page", **_json(_page_of(out))},
                    **_errors(404, 422),
                },
            },
            "post": {
                "tags": [tag],
                "summary": f"Create in {tag}",
                "operationId": f"create_{tag}",
                "requestBody": {"required": True, **_json(_ref(create))},
                "responses": {
                    "201": {"description": "created", **_json(_ref(out))},
                    **_errors(400, 404, 409, 413, 422),
                },
            },
        },
        "item": {
            "parameters": [item_param],
            "get": {
                "tags": [tag],
                "summary": "Get one",
                "operationId": f"get_{tag}",
                "responses": {"200": {"description": "found", **_json(_ref(out))}, **_errors(404)},
            },
            "patch": {
                "tags": [tag],
                "summary": "Update",
                "operationId": f"update_{tag}",
                "requestBody": {"required": True, **_json(_ref(update))},
                "responses": {
                    "200": {"description": "updated", **_json(_ref(out))},
                    **_errors(400, 404, 409, 413, 422),
                },
            },
            "delete": {
                "tags": [tag],
                "summary": "Delete",
                "operationId": f"delete_{tag}",
                "responses": {"204": {"description": "deleted"}, **_errors(404)},
            },
        },
    }


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        m.ClientCreate,
        m.ClientUpdate,
        m.TunnelCreate,
        m.TunnelUpdate,
        m.CertificateCreate,
        m.CertificateUpdate,
        access.AccessIn,
        access.ShareLinkCreate,
    ]
    outputs: list[type[BaseModel]] = [
        m.AgentOut,
        m.GatewayOut,
        m.TunnelOut,
        m.CertificateOut,
        m.AcmeOut,
        m.Error,
    ]
    _, schemas = models_json_schema(
        [(model, "validation") for model in models]
        + [(model, "serialization") for model in outputs],
        ref_template=_REF,
        by_alias=True,
    )
    paths: dict[str, Any] = {}
    for tag, out, plural in (
        ("agents", m.AgentOut, "agents"),
        ("gateways", m.GatewayOut, "gateways"),
    ):
        c = _collection(tag, out, m.ClientCreate, m.ClientUpdate, "ref", "id or name")
        paths[f"/api/{plural}"] = c["list"]
        paths[f"/api/{plural}/{{ref}}"] = c["item"]
        paths[f"/api/{plural}/{{ref}}/rotate-key"] = {
            "parameters": c["item"]["parameters"],
            "post": {
                "tags": [tag],
                "summary": "Issue a new API key (the old one stops working, its connection closes)",
                "operationId": f"rotate_{tag}",
                "responses": {
                    "200": {"description": "new key, shown once", **_json(_ref(out))},
                    **_errors(404),
                },
            },
        }
    agent_filter = [
        {
            "name": "agent",
            "in": "query",
            "description": "agent id or name",
            "schema": {"type": "string"},
        }
    ]
    c = _collection(
        "tunnels", m.TunnelOut, m.TunnelCreate, m.TunnelUpdate, "id", "tunnel id", agent_filter
    )
    paths["/api/tunnels"] = c["list"]
    paths["/api/tunnels/{id}"] = c["item"]
    for verb, summary in (
        ("drain", "Drain a replica: gateways send its agent no new requests or connections"),
        ("undrain", "Let a drained replica take traffic again"),
    ):
        paths[f"/api/tunnels/{{id}}/replicas/{{agent}}/{verb}"] = {
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "agent",
                    "in": "path",
                    "required": True,
                    "description": "the replica's agent (id or name)",
                    "schema": {"type": "string"},
                },
            ],
            "post": {
                "tags": ["tunnels"],
                "summary": summary,
                "operationId": f"{verb}_replica",
                "responses": {
                    "200": {"description": "the tunnel", **_json(_ref(m.TunnelOut))},
                    **_errors(404, 409),
                },
            },
        }
    c = _collection(
        "certificates",
        m.CertificateOut,
        m.CertificateCreate,
        m.CertificateUpdate,
        "ref",
        "id or domain",
    )
    paths["/api/certificates"] = c["list"]
    paths["/api/certificates/{ref}"] = c["item"]
    paths["/api/acme"] = {
        "get": {
            "tags": ["certificates"],
            "summary": "Shared ACME: which gateway orders which certificate, failures, history",
            "operationId": "get_acme",
            "responses": {
                "200": {"description": "the state", **_json(_ref(m.AcmeOut))},
                **_errors(),
            },
        }
    }
    paths.update(access_routes.openapi_paths(_errors, _json, _ref))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kakuremichi control API",
            "version": "1",
            "description": "Manage agents, gateways, tunnels and certificates. "
            "Every endpoint needs 'Authorization: Bearer <admin token>'.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"admin": []}],
    }
