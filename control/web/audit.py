"""The audit log's view of the REST API: every change made with the admin token.

An ASGI middleware around the app: a ``POST``, ``PATCH``, ``PUT`` or ``DELETE`` under
``/api/`` that succeeded (2xx) is recorded with the actor ``admin-token``, the action
named after the route (``agent.create``, ``tunnel.update``, ``gateway.rotate_key``…),
the object's id and name (from the path, or for a create from the response's ``id``
and ``name``/``domain``: nothing else of the body is kept, API keys included), and
the client's address.  Refused requests change nothing and are not recorded (failed
admin-token attempts have their own limit and log line).
"""

from __future__ import annotations

import json
import logging
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.logs import kv
from control.db.admins import AdminStore, AuditEntry
from control.events import EventBus

log = logging.getLogger("control.audit")

_KINDS = {
    "agents": "agent",
    "gateways": "gateway",
    "tunnels": "tunnel",
    "certificates": "certificate",
}
_VERBS = {"POST": "create", "PATCH": "update", "PUT": "update", "DELETE": "delete"}
_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: response bytes looked at for a create's id and name
_CAPTURE = 64 * 1024
TOKEN_ACTOR = "admin-token"  # noqa: S105 (a name, not a secret)


#: actions on an object's parts, named as the dashboard names the same changes
_PARTS = {
    ("rotate-key", "POST"): "rotate_key",
    ("access", "PUT"): "access_set",
    ("access", "DELETE"): "access_remove",
    ("share-links", "POST"): "share_link_create",
    ("share-links", "DELETE"): "share_link_delete",
}


def describe(method: str, path: str) -> tuple[str, str | None, str | None]:
    """(action, object kind, reference from the path) of a REST change."""
    parts = [part for part in path.split("/") if part][1:]  # after "api"
    kind = _KINDS.get(parts[0]) if parts else None
    if kind is None:
        return f"api.{method.lower()}", None, None
    ref = parts[1] if len(parts) > 1 else None
    if len(parts) == 5 and parts[2] == "replicas" and parts[4] in ("drain", "undrain"):
        return f"{kind}.{parts[4]}", kind, ref  # as the dashboard's drain button
    if len(parts) > 2:
        part = _PARTS.get((parts[2], method), f"{method.lower()}_{parts[2].replace('-', '_')}")
        return f"{kind}.{part}"[:64], kind, ref
    return f"{kind}.{_VERBS.get(method, method.lower())}", kind, ref


class RestAudit:
    """ASGI middleware recording successful REST changes (see the module docstring)."""

    def __init__(self, app: ASGIApp, admins: AdminStore, events: EventBus) -> None:
        self.app = app
        self.admins = admins
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _VERBS
            or not scope["path"].startswith("/api/")
        ):
            await self.app(scope, receive, send)
            return
        # The response is held until the entry is written: a client that saw 2xx finds
        # the change in the log (REST answers to changes are small JSON documents).
        held: list[Message] = []
        status = 0
        body = bytearray()

        async def hold(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and len(body) < _CAPTURE:
                body.extend(message.get("body", b"")[: _CAPTURE - len(body)])
            held.append(message)

        await self.app(scope, receive, hold)
        if 200 <= status < 300:
            try:
                await self._record(scope, bytes(body))
            except Exception:  # the change is made; a failed audit write must not hide it
                log.exception("recording an audit entry failed", extra=kv(path=scope["path"]))
        for message in held:
            await send(message)

    async def _record(self, scope: Scope, body: bytes) -> None:
        action, kind, ref = describe(scope["method"], scope["path"])
        object_id = ref if ref and _ID.match(ref) else None
        name = ref if ref and object_id is None else None
        if ref is None and body:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                object_id = str(data.get("id"))[:36] if data.get("id") else None
                label = data.get("name") or data.get("domain")
                name = str(label) if label else None
        client = scope.get("client")
        await self.admins.record(
            AuditEntry(
                "token",
                TOKEN_ACTOR,
                action,
                kind,
                object_id,
                name,
                None,
                client[0] if client else None,
            )
        )
        self.events.publish("change", action=action, id=object_id)
