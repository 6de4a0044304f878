"""The changes the dashboard makes, each with what the hub must push after it.

The same store calls and hub pushes as the REST handlers (``control/api/routes.py``),
in the same order and under the same lock, so a change made on a page reaches gateways
and agents exactly as one made through the API.  Every change is written to the audit
log with the signed-in user as its actor and announced on the event bus (other open
pages show a "changed" notice).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from common import protocol as p
from control import access
from control.db.admins import AdminStore, AuditEntry
from control.db.store import ClientKind, Row, Store
from control.events import EventBus
from control.ws.configs import tunnel_agents
from control.ws.hub import Hub


class Actions:
    """Changes on behalf of one dashboard user (``actor``) from one address."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        admins: AdminStore,
        events: EventBus,
        actor: str,
        address: str | None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.admins = admins
        self.events = events
        self.actor = actor
        self.address = address

    async def audit(
        self,
        action: str,
        kind: str | None = None,
        row: Row | None = None,
        name: str | None = None,
        detail: str | None = None,
    ) -> None:
        await self.admins.record(
            AuditEntry(
                "user",
                self.actor,
                action,
                kind,
                None if row is None else str(row["id"]),
                name if name is not None else (None if row is None else _label(kind, row)),
                detail,
                self.address,
            )
        )
        self.events.publish("change", action=action, id=None if row is None else row["id"])

    # -- agents and gateways ----------------------------------------------------------

    async def create_client(self, kind: ClientKind, name: str) -> tuple[Row, str]:
        row, key = await self.store.create_client(kind, name)
        await self.audit(f"{kind}.create", kind, row)
        return row, key

    async def rename_client(self, kind: ClientKind, ref: str, name: str) -> Row:
        async with self.hub.lock:
            before = await self.store.get_client(kind, ref)
            row = await self.store.rename_client(kind, ref, name)
            await self.hub.push_config_locked(kind, [row["id"]])
            await self.hub.push_config_locked("gateway" if kind == "agent" else "agent")
        await self.audit(f"{kind}.rename", kind, row, detail=f"was {before['name']}")
        return row

    async def set_client_enabled(self, kind: ClientKind, ref: str, enabled: bool) -> Row:
        async with self.hub.lock:
            before = await self.store.get_client(kind, ref)
            row = await self.store.set_client_enabled(kind, before["id"], enabled)
            if enabled:
                await self.hub.push_config_locked("gateway" if kind == "agent" else "agent")
        if before["enabled"] and not enabled:
            await self.hub.client_disabled(kind, row["id"])
        if bool(before["enabled"]) != enabled:
            await self.audit(f"{kind}.{'enable' if enabled else 'disable'}", kind, row)
        return row

    async def rotate_key(self, kind: ClientKind, ref: str) -> tuple[Row, str]:
        row, key = await self.store.rotate_key(kind, ref)
        await self.hub.disconnect(kind, row["id"], p.CLOSE_REVOKED, "API key rotated")
        await self.audit(f"{kind}.rotate_key", kind, row)
        return row, key

    async def delete_client(self, kind: ClientKind, ref: str) -> Row:
        async with self.hub.lock:
            row = await self.store.delete_client(kind, ref)
            await self.hub.push_config_locked("gateway" if kind == "agent" else "agent")
        await self.hub.disconnect(kind, row["id"], p.CLOSE_REVOKED, f"{kind} deleted")
        await self.audit(f"{kind}.delete", kind, row)
        return row

    # -- tunnels ----------------------------------------------------------------------

    async def create_tunnel(self, fields: dict[str, Any]) -> Row:
        async with self.hub.lock:
            row = await self.store.create_tunnel(fields)
            self.hub.tunnel_event("tunnel_create", row, tunnel_agents(row))
        await self.audit("tunnel.create", "tunnel", row, detail=f"to {row['target']}")
        return row

    async def update_tunnel(self, tunnel_id: str, changes: dict[str, Any], action: str) -> Row:
        async with self.hub.lock:
            before, after = await self.store.update_tunnel(tunnel_id, changes)
            self.hub.tunnel_changed(before, after)  # each replica's agent too
        changed = sorted(k for k in changes if before.get(k) != after.get(k))
        await self.audit(
            action, "tunnel", after, detail=("changed " + ", ".join(changed)) if changed else None
        )
        return after

    async def set_replica_draining(self, tunnel_id: str, agent_ref: str, draining: bool) -> Row:
        """Drain one replica of a tunnel (gateways send its agent no new requests or
        connections; open ones finish) or let it take traffic again."""
        async with self.hub.lock:
            before, after = await self.store.set_replica_draining(tunnel_id, agent_ref, draining)
            self.hub.tunnel_changed(before, after)
        was = next(r for r in before["replicas"] if agent_ref in (r["agent_id"], r["agent_name"]))
        if bool(was["draining"]) != draining:
            await self.audit(
                "tunnel.drain" if draining else "tunnel.undrain",
                "tunnel",
                after,
                detail=f"replica {was['agent_name']}",
            )
        return after

    async def delete_tunnel(self, tunnel_id: str) -> Row:
        async with self.hub.lock:
            row = await self.store.delete_tunnel(tunnel_id)
            self.hub.tunnel_event("tunnel_delete", row, tunnel_agents(row))
        self.hub.traffic.forget(row["id"])
        await self.audit("tunnel.delete", "tunnel", row)
        return row

    # -- access policies (control/access.py; the same steps as control/api/access_routes) --

    async def set_access(self, tunnel: Row, body: access.AccessIn, fields: set[str]) -> None:
        """Store a tunnel's whole policy (secrets left out keep their hashes) and push it
        to the gateways.  ValueError names a field that cannot be accepted."""
        async with self.hub.lock:
            current = await self.store.get_access(tunnel["id"])
            stored, changed = await asyncio.to_thread(  # argon2id for new passwords
                access.build_stored,
                body,
                fields,
                json.loads(current["policy"]) if current is not None else None,
                tunnel["domain"],
            )
            await self.store.put_access(tunnel["id"], json.dumps(stored), changed)
            await self.hub.push_config_locked("gateway")
        detail = "credentials changed: signed-in visitors must sign in again" if changed else None
        await self.audit("tunnel.access_set", "tunnel", tunnel, detail=detail)

    async def delete_access(self, tunnel: Row) -> None:
        async with self.hub.lock:
            await self.store.delete_access(tunnel["id"])
            await self.hub.push_config_locked("gateway")
        await self.audit("tunnel.access_remove", "tunnel", tunnel, detail="open to anyone")

    async def create_share_link(self, tunnel: Row, body: access.ShareLinkCreate) -> tuple[Row, str]:
        """A new share link and its URL (shown once: it holds the token)."""
        token, token_hash = access.new_share_token()
        async with self.hub.lock:
            link = await self.store.create_share_link(
                tunnel["id"], token_hash, time.time() + body.expires_in, body.max_uses
            )
            await self.hub.push_config_locked("gateway")
        uses = "any number of" if body.max_uses is None else str(body.max_uses)
        await self.audit(
            "tunnel.share_link_create",
            "tunnel",
            tunnel,
            detail=f"link {link['id']}: {uses} uses, {body.expires_in // 3600} h",
        )
        return link, f"https://{tunnel['domain']}/.kakuremichi/share#t={token}"

    async def delete_share_link(self, tunnel: Row, link_id: str) -> None:
        async with self.hub.lock:
            await self.store.delete_share_link(tunnel["id"], link_id)
            await self.hub.push_config_locked("gateway")
        await self.audit("tunnel.share_link_delete", "tunnel", tunnel, detail=f"link {link_id}")


def _label(kind: str | None, row: Row) -> str | None:
    if kind == "tunnel":
        return str(row.get("domain") or f"{row.get('protocol')}:{row.get('public_port')}")
    value = row.get("name") or row.get("username")
    return None if value is None else str(value)
