"""The data layer: every query Control runs, behind one class.

Written against SQLAlchemy Core so that SQLite (default) and PostgreSQL share it.
Writes go through one asyncio lock per process: SQLite allows one writer anyway, and
the lock makes "find a free subnet, insert it" atomic for concurrent API calls; the
unique constraints on ``subnet``/``slot``/``domain``/``(protocol, public_port)`` are
the backstop for anything the lock does not cover (another process), and turn into
:class:`Conflict`.

``generation`` counts committed writes that can change what a client is told; the
hub keys its snapshot cache on it.  Writes that only touch bookkeeping (last-seen
times, tunnel health) do not bump it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.protocol import MAX_REPLICAS, Auth, proxy_protocol_problem, sticky_problem
from control.alloc import AddressPlan, PoolExhausted
from control.db.engine import take_turns
from control.db.schema import (
    access_policies,
    agents,
    certificates,
    gateways,
    settings,
    share_links,
    tunnel_replicas,
    tunnels,
)

ClientKind = Literal["agent", "gateway"]
Row = dict[str, Any]

KEY_PREFIX = {"agent": "agt_", "gateway": "gtw_"}
#: agents per presence query (``set_replica_presence``)
PRESENCE_BATCH = 500
#: tries at inserting a new agent or gateway when other writers take its subnet or slot
_CREATE_ATTEMPTS = 4
#: PostgreSQL advisory lock held while an agent or gateway is created: replicas take
#: turns, so a conflict only means a stale set, and the try after it (which reads the
#: set afresh under the lock) succeeds ("kkm-crea")
CREATE_LOCK = 0x6B6B6D2D63726561
#: the PostgreSQL advisory lock settings writes take turns under ("kkm-sett"): replicas
#: that read a setting and write it (the epoch, keys made on first use) see each
#: other's writes instead of both inserting
SETTINGS_LOCK = 0x6B6B6D2D73657474
#: clients per statement when many ``auth`` records are written at once
AUTH_BATCH = 500


def _served_by(agent_id: str) -> sa.ColumnElement[bool]:
    """Tunnels ``agent_id`` serves: as their agent or as one of their replicas."""
    replica_of = sa.select(tunnel_replicas.c.tunnel_id).where(
        tunnel_replicas.c.agent_id == agent_id
    )
    return sa.or_(tunnels.c.agent_id == agent_id, tunnels.c.id.in_(replica_of))


def _balance_column(value: str | None) -> str | None:
    """How ``tunnels.balance`` stores a tunnel's balance (round robin: NULL)."""
    return None if value in (None, "round_robin") else value


class StoreError(Exception):
    """Base of the errors the API maps to HTTP statuses."""

    status = 400
    code = "bad_request"


class NotFound(StoreError):
    status = 404
    code = "not_found"


class Conflict(StoreError):
    status = 409
    code = "conflict"


class Invalid(StoreError):
    status = 422
    code = "invalid"


def new_api_key(kind: ClientKind) -> str:
    """``agt_``/``gtw_`` + 32 random bytes, URL-safe base64 without padding."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return KEY_PREFIX[kind] + raw


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast unsalted hash is safe and lets us index it.
    return hashlib.sha256(key.encode()).hexdigest()


def _table(kind: ClientKind) -> sa.Table:
    return agents if kind == "agent" else gateways


def auth_changes(kind: ClientKind, row: Row, auth: Auth) -> tuple[Row, bool]:
    """What an ``auth`` changes in a client's row (nothing when it reconnects as it
    was), and whether its peers must be told (its key or a gateway's endpoint)."""
    values: Row = {}
    if row["public_key"] != auth.public_key:
        values["public_key"] = auth.public_key
    endpoint = (auth.public_ip, auth.wireguard_port, auth.https_port)
    if kind == "gateway" and endpoint != (
        row["public_ip"],
        row["wireguard_port"],
        row["https_port"],
    ):
        values["public_ip"], values["wireguard_port"], values["https_port"] = endpoint
    peers_affected = bool(values)
    version = auth.version[:64]
    if row["client_version"] != version:
        values["client_version"] = version
    if values:
        values["updated_at"] = time.time()
    return values, peers_affected


class Store:
    """Async access to the Control database."""

    def __init__(self, engine: AsyncEngine, plan: AddressPlan) -> None:
        self.engine = engine
        self.plan = plan
        self._write_lock = asyncio.Lock()
        self.generation = 0
        #: the part of ``generation`` that is clients' own ``auth`` reports (each changes
        #: only its own row: a row read before them is still current but for that)
        self.auth_writes = 0
        # Subnet indices in use, loaded once and kept in step by this process; any
        # insert conflict (another process) drops it so it is reloaded.
        self._used_subnets: set[int] | None = None

    # -- plumbing ---------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self, invalidates: bool = True) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock:
            try:
                async with self.engine.begin() as conn:
                    yield conn
            finally:
                if invalidates:
                    self.generation += 1

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @staticmethod
    def _rows(result: sa.CursorResult[Any]) -> list[Row]:
        return [dict(row._mapping) for row in result]

    # -- settings ---------------------------------------------------------------------

    async def get_setting(self, key: str) -> str | None:
        async with self._read() as conn:
            return await self._setting(conn, key)

    async def set_setting(self, key: str, value: str) -> None:
        async with self._write() as conn:
            await take_turns(conn, SETTINGS_LOCK)
            await self._put_setting(conn, key, value)

    async def setting_if_absent(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless it has one; returns what is stored.  The
        first writer wins, also among Control replicas starting at once on one
        PostgreSQL database (each would otherwise make its own and one insert fail)."""
        async with self._write() as conn:
            await take_turns(conn, SETTINGS_LOCK)
            current = await self._setting(conn, key)
            if current is not None:
                return current
            await conn.execute(settings.insert().values(key=key, value=value))
        return value

    @staticmethod
    async def _setting(conn: AsyncConnection, key: str) -> str | None:
        value = await conn.scalar(sa.select(settings.c.value).where(settings.c.key == key))
        return None if value is None else str(value)

    @staticmethod
    async def _put_setting(conn: AsyncConnection, key: str, value: str) -> None:
        """Update or insert; the caller holds ``SETTINGS_LOCK`` (replicas)."""
        updated = await conn.execute(
            settings.update().where(settings.c.key == key).values(value=value)
        )
        if updated.rowcount == 0:
            await conn.execute(settings.insert().values(key=key, value=value))

    # -- agents and gateways ----------------------------------------------------------

    async def create_client(
        self, kind: ClientKind, name: str, enabled: bool = True
    ) -> tuple[Row, str]:
        """Create an agent or gateway; returns the row and its API key (shown once).

        The subnets in use are read once and kept in step by this process.  Where other
        processes write too (Control replicas on PostgreSQL) the set can be stale: the
        unique ``subnet`` column turns a subnet another replica took meanwhile into a
        conflict, and then the set is read afresh and the insert tried again.  Creates
        take turns under an advisory lock there (``CREATE_LOCK``): without it, replicas
        creating at once all chose the same lowest free subnet and one could lose every
        race."""
        table = _table(kind)
        key = new_api_key(kind)
        now = time.time()
        values: Row = {
            "id": str(uuid.uuid4()),
            "name": name,
            "api_key_hash": hash_key(key),
            "enabled": enabled,
            "created_at": now,
            "updated_at": now,
        }
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                return await self._insert_client(kind, table, values), key
            except IntegrityError as exc:
                # another writer took the subnet, the slot or the name meanwhile: read
                # afresh (the name check then reports a taken name as such)
                self._used_subnets = None
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise Conflict(f"{kind} {name!r} conflicts with an existing one") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _insert_client(self, kind: ClientKind, table: sa.Table, values: Row) -> Row:
        name = values["name"]
        async with self._write() as conn:
            await take_turns(conn, CREATE_LOCK)
            if await conn.scalar(sa.select(table.c.id).where(table.c.name == name)):
                raise Conflict(f"{kind} named {name!r} already exists")
            try:
                if kind == "agent":
                    if self._used_subnets is None:
                        rows = await conn.scalars(sa.select(agents.c.subnet))
                        self._used_subnets = {self.plan.index_of(text) for text in rows}
                    subnet = self.plan.subnet(self.plan.first_free_index(self._used_subnets))
                    values["subnet"] = str(subnet)
                    values["virtual_ip"] = str(self.plan.agent_address(subnet))
                else:
                    slots = await conn.scalars(sa.select(gateways.c.slot))
                    values["slot"] = self.plan.first_free_slot(slots)
            except PoolExhausted as exc:
                raise Conflict(str(exc)) from exc
            await conn.execute(table.insert().values(**values))
            if kind == "agent" and self._used_subnets is not None:
                self._used_subnets.add(self.plan.index_of(values["subnet"]))
            row = (await conn.execute(sa.select(table).where(table.c.id == values["id"]))).one()
        return dict(row._mapping)

    async def list_clients(
        self, kind: ClientKind, limit: int, offset: int
    ) -> tuple[list[Row], int]:
        table = _table(kind)
        async with self._read() as conn:
            total = await conn.scalar(sa.select(sa.func.count()).select_from(table))
            rows = self._rows(
                await conn.execute(
                    sa.select(table)
                    .order_by(table.c.created_at, table.c.id)
                    .limit(limit)
                    .offset(offset)
                )
            )
        return rows, int(total or 0)

    async def get_client(self, kind: ClientKind, ref: str) -> Row:
        """Find by id or by name."""
        table = _table(kind)
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(table).where(sa.or_(table.c.id == ref, table.c.name == ref))
                )
            ).first()
        if row is None:
            raise NotFound(f"no {kind} with id or name {ref!r}")
        return dict(row._mapping)

    async def rename_client(self, kind: ClientKind, ref: str, name: str) -> Row:
        table = _table(kind)
        row = await self.get_client(kind, ref)
        async with self._write() as conn:
            try:
                await conn.execute(
                    table.update()
                    .where(table.c.id == row["id"])
                    .values(name=name, updated_at=time.time())
                )
            except IntegrityError as exc:
                raise Conflict(f"{kind} named {name!r} already exists") from exc
        return await self.get_client(kind, row["id"])

    async def set_client_enabled(self, kind: ClientKind, ref: str, enabled: bool) -> Row:
        """Enable or disable an agent or gateway (its key is kept either way)."""
        table = _table(kind)
        row = await self.get_client(kind, ref)
        if bool(row["enabled"]) == enabled:
            return row
        async with self._write() as conn:
            await conn.execute(
                table.update()
                .where(table.c.id == row["id"])
                .values(enabled=enabled, updated_at=time.time())
            )
        return await self.get_client(kind, row["id"])

    async def rotate_key(self, kind: ClientKind, ref: str) -> tuple[Row, str]:
        table = _table(kind)
        row = await self.get_client(kind, ref)
        key = new_api_key(kind)
        async with self._write() as conn:
            await conn.execute(
                table.update()
                .where(table.c.id == row["id"])
                .values(api_key_hash=hash_key(key), updated_at=time.time())
            )
        return await self.get_client(kind, row["id"]), key

    async def delete_client(self, kind: ClientKind, ref: str) -> Row:
        table = _table(kind)
        row = await self.get_client(kind, ref)
        async with self._write() as conn:
            if kind == "agent":
                await self._hand_over_tunnels(conn, row["id"])
            await conn.execute(table.delete().where(table.c.id == row["id"]))
            if kind == "agent" and self._used_subnets is not None:
                self._used_subnets.discard(self.plan.index_of(row["subnet"]))
        return row

    async def client_by_key(self, kind: ClientKind, key: str) -> Row | None:
        table = _table(kind)
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(table).where(table.c.api_key_hash == hash_key(key)))
            ).first()
        return None if row is None else dict(row._mapping)

    async def clients_by_key_hashes(self, kind: ClientKind, hashes: Sequence[str]) -> list[Row]:
        """The clients whose API keys hash to ``hashes``, in one query (a reconnect
        storm's look-ups batched; ``control.ws.intake``)."""
        table = _table(kind)
        async with self._read() as conn:
            result = await conn.execute(sa.select(table).where(table.c.api_key_hash.in_(hashes)))
            return self._rows(result)

    async def record_auth(self, kind: ClientKind, row: Row, auth: Auth) -> bool:
        """Store what the client reported at ``auth``; True if its peers must be told.

        Writes only when something changed, so a fleet reconnecting after a Control
        restart costs no database writes.
        """
        values, peers_affected = auth_changes(kind, row, auth)
        if values:
            await self.record_auths([(kind, row["id"], values)], peers_affected)
        return peers_affected

    async def record_auths(
        self, updates: Sequence[tuple[ClientKind, str, Row]], invalidates: bool
    ) -> None:
        """Write many clients' ``auth_changes`` in one transaction (a statement per
        kind and set of columns, ``AUTH_BATCH`` rows each)."""
        groups: dict[tuple[ClientKind, tuple[str, ...]], list[Row]] = {}
        for kind, client_id, values in updates:
            columns = tuple(sorted(values))
            params = {f"b_{c}": values[c] for c in columns}
            groups.setdefault((kind, columns), []).append({"b_id": client_id, **params})
        async with self._write(invalidates=invalidates) as conn:
            for (kind, columns), rows in groups.items():
                table = _table(kind)
                statement = (
                    table.update()
                    .where(table.c.id == sa.bindparam("b_id"))
                    .values({c: sa.bindparam(f"b_{c}") for c in columns})
                )
                for first in range(0, len(rows), AUTH_BATCH):
                    await conn.execute(statement, rows[first : first + AUTH_BATCH])
        if invalidates:
            self.auth_writes += 1  # ``_write`` counted it in ``generation``

    async def touch_many(self, kind: ClientKind, seen: Sequence[tuple[str, float]]) -> None:
        """Record ``last_seen`` for many clients in one statement (heartbeat flush)."""
        table = _table(kind)
        statement = (
            table.update()
            .where(table.c.id == sa.bindparam("b_id"))
            .values(last_seen=sa.bindparam("b_seen"))
        )
        async with self._write(invalidates=False) as conn:
            await conn.execute(statement, [{"b_id": i, "b_seen": w} for i, w in seen])

    async def next_epoch(self) -> int:
        """A number that grows on every start; config versions are built on it so
        they stay monotonic across restarts without a write per push."""
        async with self._write() as conn:
            await take_turns(conn, SETTINGS_LOCK)  # replicas starting at once: distinct
            epoch = int(await self._setting(conn, "epoch") or 0) + 1
            await self._put_setting(conn, "epoch", str(epoch))
        return epoch

    # -- tunnels ----------------------------------------------------------------------

    async def create_tunnel(self, fields: Row) -> Row:
        """A new tunnel; ``fields["replicas"]`` (``{"agent", "weight", "role"}`` each)
        gives it several agents, ``agent`` (if also given, one of them) the primary."""
        replicas = await self._resolve_replicas(fields.get("replicas"))
        if fields.get("agent"):
            agent = await self.get_client("agent", fields["agent"])
        elif replicas:
            agent = {"id": replicas[0]["agent_id"]}
        else:
            raise Invalid("a tunnel needs an agent or replicas")
        if replicas and agent["id"] not in {r["agent_id"] for r in replicas}:
            raise Invalid("agent must be one of the replicas")
        now = time.time()
        values = {
            "id": str(uuid.uuid4()),
            "protocol": fields["protocol"],
            "domain": fields.get("domain"),
            "public_port": fields.get("public_port"),
            "target": fields["target"],
            "agent_id": agent["id"],
            "enabled": fields.get("enabled", True),
            "proxy_protocol": fields.get("proxy_protocol"),
            "balance": _balance_column(fields.get("balance")),
            "sticky": fields.get("sticky"),
            "created_at": now,
            "updated_at": now,
        }
        problem = sticky_problem(values["protocol"], values["sticky"])
        if problem:
            raise Invalid(problem)
        async with self._write() as conn:
            await self._check_unique(conn, values, None)
            try:
                await conn.execute(tunnels.insert().values(**values))
            except IntegrityError as exc:
                raise Conflict("a tunnel with this domain or public port already exists") from exc
            await self._put_replicas(conn, str(values["id"]), replicas, {}, now)
        return await self.get_tunnel(str(values["id"]))

    async def _check_unique(self, conn: AsyncConnection, values: Row, own_id: str | None) -> None:
        if values.get("domain"):
            query = sa.select(tunnels.c.id).where(tunnels.c.domain == values["domain"])
            other = await conn.scalar(query)
            if other is not None and other != own_id:
                raise Conflict(f"domain {values['domain']!r} is already used by tunnel {other}")
        if values.get("public_port") is not None:
            query = sa.select(tunnels.c.id).where(
                tunnels.c.protocol == values["protocol"],
                tunnels.c.public_port == values["public_port"],
            )
            other = await conn.scalar(query)
            if other is not None and other != own_id:
                raise Conflict(
                    f"{values['protocol']} port {values['public_port']} is already used "
                    f"by tunnel {other}"
                )

    def _tunnel_query(self) -> sa.Select[Any]:
        return sa.select(
            tunnels,
            agents.c.name.label("agent_name"),
            agents.c.virtual_ip.label("agent_ip"),
            agents.c.subnet.label("agent_subnet"),
            # a disabled agent's tunnels are sent to gateways as disabled
            agents.c.enabled.label("agent_enabled"),
        ).join(agents, agents.c.id == tunnels.c.agent_id)

    async def list_tunnels(
        self, limit: int, offset: int, agent_id: str | None = None
    ) -> tuple[list[Row], int]:
        query = self._tunnel_query()
        count = sa.select(sa.func.count()).select_from(tunnels)
        if agent_id is not None:
            query = query.where(_served_by(agent_id))
            count = count.where(_served_by(agent_id))
        async with self._read() as conn:
            total = await conn.scalar(count)
            rows = self._rows(
                await conn.execute(
                    query.order_by(tunnels.c.created_at, tunnels.c.id).limit(limit).offset(offset)
                )
            )
            await self._attach_replicas(conn, rows)
        return rows, int(total or 0)

    async def all_tunnels(self, agent_id: str | None = None) -> list[Row]:
        query = self._tunnel_query().order_by(tunnels.c.created_at, tunnels.c.id)
        if agent_id is not None:
            query = query.where(_served_by(agent_id))
        async with self._read() as conn:
            rows = self._rows(await conn.execute(query))
            await self._attach_replicas(conn, rows)
        return rows

    async def get_tunnel(self, tunnel_id: str) -> Row:
        async with self._read() as conn:
            row = (
                await conn.execute(self._tunnel_query().where(tunnels.c.id == tunnel_id))
            ).first()
            if row is None:
                raise NotFound(f"no tunnel with id {tunnel_id!r}")
            found = dict(row._mapping)
            await self._attach_replicas(conn, [found])
        return found

    async def update_tunnel(self, tunnel_id: str, changes: Row) -> tuple[Row, Row]:
        """Apply a partial update; returns (before, after)."""
        before = await self.get_tunnel(tunnel_id)
        values = {k: v for k, v in changes.items() if k not in ("agent", "replicas")}
        if "agent" in changes:
            values["agent_id"] = (await self.get_client("agent", changes["agent"]))["id"]
        replicas = None
        if changes.get("replicas") is not None:
            replicas = await self._resolve_replicas(changes["replicas"])
            ids = [r["agent_id"] for r in replicas]
            primary = values.get("agent_id", before["agent_id"])
            if "agent_id" in values and primary not in ids:
                raise Invalid("agent must be one of the replicas")
            values["agent_id"] = primary if primary in ids else ids[0]
        elif "agent" in changes and len(before["replicas"]) > 1:
            raise Invalid(
                f"this tunnel has {len(before['replicas'])} replicas: give replicas (the "
                "whole set) to change its agents, or drain one"
            )
        if "balance" in values:
            values["balance"] = _balance_column(values["balance"])
        merged = {**before, **values}
        problem = sticky_problem(merged["protocol"], merged.get("sticky"))
        if problem:
            raise Invalid(problem)
        if merged["protocol"] == "http":
            if not merged.get("domain"):
                raise Invalid("an http tunnel needs a domain")
            merged["public_port"] = values["public_port"] = None
        else:
            if merged.get("public_port") is None:
                raise Invalid(f"a {merged['protocol']} tunnel needs a publicPort")
            merged["domain"] = values["domain"] = None
        problem = proxy_protocol_problem(merged["protocol"], merged.get("proxy_protocol"))
        if problem:
            raise Invalid(problem)
        values["updated_at"] = time.time()
        async with self._write() as conn:
            await self._check_unique(conn, merged, tunnel_id)
            try:
                await conn.execute(
                    tunnels.update().where(tunnels.c.id == tunnel_id).values(**values)
                )
            except IntegrityError as exc:
                raise Conflict("a tunnel with this domain or public port already exists") from exc
            if replicas is not None:
                kept = {r["agent_id"]: r for r in before["replicas"]}
                await conn.execute(
                    tunnel_replicas.delete().where(tunnel_replicas.c.tunnel_id == tunnel_id)
                )
                await self._put_replicas(conn, tunnel_id, replicas, kept, values["updated_at"])
        return before, await self.get_tunnel(tunnel_id)

    async def delete_tunnel(self, tunnel_id: str) -> Row:
        row = await self.get_tunnel(tunnel_id)
        async with self._write() as conn:
            await conn.execute(tunnels.delete().where(tunnels.c.id == tunnel_id))
        return row

    async def find_tunnel(self, tunnel_id: str) -> Row | None:
        """The tunnel, or None when there is none (no error: another replica may have
        deleted it)."""
        try:
            return await self.get_tunnel(tunnel_id)
        except NotFound:
            return None

    async def record_health(self, agent_id: str, entries: Sequence[tuple[str, str, str]]) -> int:
        """Store an agent's per-tunnel health; ignores tunnels it does not own."""
        now = time.time()
        stored = 0
        async with self._write(invalidates=False) as conn:
            for tunnel_id, health, detail in entries:
                result = await conn.execute(
                    tunnels.update()
                    .where(tunnels.c.id == tunnel_id, tunnels.c.agent_id == agent_id)
                    .values(health=health, health_detail=detail, health_at=now)
                )
                stored += result.rowcount
        return stored

    # -- replicas (issue 17) ------------------------------------------------------------

    @staticmethod
    async def _hand_over_tunnels(conn: AsyncConnection, agent_id: str) -> None:
        """Before an agent is deleted: each replicated tunnel it is the primary of gets
        another replica as primary (instead of going with it)."""
        rows = (
            await conn.execute(
                sa.select(tunnel_replicas.c.tunnel_id, tunnel_replicas.c.agent_id)
                .join(tunnels, tunnels.c.id == tunnel_replicas.c.tunnel_id)
                .where(tunnels.c.agent_id == agent_id, tunnel_replicas.c.agent_id != agent_id)
                .order_by(tunnel_replicas.c.tunnel_id, tunnel_replicas.c.created_at)
            )
        ).all()
        heirs: dict[str, str] = {}
        for tunnel_id, heir in rows:
            heirs.setdefault(tunnel_id, heir)
        for tunnel_id, heir in heirs.items():
            await conn.execute(
                tunnels.update().where(tunnels.c.id == tunnel_id).values(agent_id=heir)
            )

    async def _resolve_replicas(self, wanted: Sequence[Row] | None) -> list[Row]:
        """``[{"agent", "weight", "role"}]`` from the API with agents found by id or
        name; each agent once, at most ``MAX_REPLICAS``."""
        if not wanted:
            return []
        if len(wanted) > MAX_REPLICAS:
            raise Invalid(f"a tunnel has at most {MAX_REPLICAS} replicas")
        out = []
        for entry in wanted:
            agent = await self.get_client("agent", entry["agent"])
            out.append(
                {
                    "agent_id": agent["id"],
                    "weight": entry.get("weight") or 1,
                    "role": entry.get("role") or "active",
                }
            )
        ids = [r["agent_id"] for r in out]
        if len(set(ids)) != len(ids):
            raise Invalid("replicas name the same agent twice")
        return out

    @staticmethod
    async def _put_replicas(
        conn: AsyncConnection, tunnel_id: str, replicas: list[Row], kept: dict[str, Row], now: float
    ) -> None:
        """Store a tunnel's replica rows (none for a single agent); an agent that was
        already a replica keeps its draining flag and health."""
        if len(replicas) < 2:
            return
        for replica in replicas:
            old = kept.get(replica["agent_id"], {})
            await conn.execute(
                tunnel_replicas.insert().values(
                    tunnel_id=tunnel_id,
                    agent_id=replica["agent_id"],
                    weight=replica["weight"],
                    role=replica["role"],
                    draining=bool(old.get("draining", False)),
                    health=old.get("health"),
                    health_detail=old.get("health_detail"),
                    health_at=old.get("health_at"),
                    created_at=now,
                )
            )

    async def _attach_replicas(self, conn: AsyncConnection, rows: list[Row]) -> None:
        """``row["replicas"]`` for each tunnel row: its agents with their state, the
        primary first (empty for a tunnel with one agent)."""
        for row in rows:
            row["replicas"] = []
        if not rows:
            return
        query = sa.select(
            tunnel_replicas,
            agents.c.name.label("agent_name"),
            agents.c.virtual_ip.label("agent_ip"),
        ).join(agents, agents.c.id == tunnel_replicas.c.agent_id)
        if len(rows) <= 500:
            query = query.where(tunnel_replicas.c.tunnel_id.in_([r["id"] for r in rows]))
        by_tunnel: dict[str, list[Row]] = {}
        for replica in self._rows(await conn.execute(query)):
            by_tunnel.setdefault(replica["tunnel_id"], []).append(replica)
        for row in rows:
            found = by_tunnel.get(row["id"], [])
            found.sort(key=lambda r: (r["agent_id"] != row["agent_id"], r["agent_name"]))
            row["replicas"] = found

    async def set_replica_draining(
        self, tunnel_id: str, agent_ref: str, draining: bool
    ) -> tuple[Row, Row]:
        """Drain (or take back) one replica of a tunnel; returns (before, after)."""
        before = await self.get_tunnel(tunnel_id)
        agent = await self.get_client("agent", agent_ref)
        if not before["replicas"]:
            raise Conflict(
                "this tunnel has one agent: there is no other replica to drain it to "
                "(add replicas first)"
            )
        if agent["id"] not in {r["agent_id"] for r in before["replicas"]}:
            raise NotFound(f"agent {agent['name']!r} is not a replica of this tunnel")
        async with self._write() as conn:
            await conn.execute(
                tunnel_replicas.update()
                .where(
                    tunnel_replicas.c.tunnel_id == tunnel_id,
                    tunnel_replicas.c.agent_id == agent["id"],
                )
                .values(draining=draining)
            )
        return before, await self.get_tunnel(tunnel_id)

    async def record_replica_health(
        self, agent_id: str, entries: Sequence[tuple[str, str, str]]
    ) -> list[str]:
        """Store an agent's health of the tunnels it is a replica of; returns the
        tunnels whose replica changed state (those are pushed to the gateways)."""
        async with self._read() as conn:
            rows = self._rows(
                await conn.execute(
                    sa.select(tunnel_replicas.c.tunnel_id, tunnel_replicas.c.health).where(
                        tunnel_replicas.c.agent_id == agent_id
                    )
                )
            )
        current = {r["tunnel_id"]: r["health"] for r in rows}
        wanted = [e for e in entries if e[0] in current]
        if not wanted:
            return []
        changed = [t for t, health, _ in wanted if current[t] != health]
        now = time.time()
        async with self._write(invalidates=bool(changed)) as conn:
            for tunnel_id, health, detail in wanted:
                await conn.execute(
                    tunnel_replicas.update()
                    .where(
                        tunnel_replicas.c.tunnel_id == tunnel_id,
                        tunnel_replicas.c.agent_id == agent_id,
                    )
                    .values(health=health, health_detail=detail, health_at=now)
                )
        return changed

    async def set_replica_presence(self, agent_ids: Sequence[str], online: bool) -> list[str]:
        """Agents connected to Control (their "offline" replicas become "unknown" until
        they report) or left it (every replica of theirs "offline"); returns the tunnels
        whose replicas changed.  Many agents at once (a reconnect storm): a query per
        ``PRESENCE_BATCH`` agents, and a write only when a replica changes."""
        if online:
            condition = tunnel_replicas.c.health == "offline"
            values: Row = {"health": "unknown", "health_detail": "connected, not checked yet"}
        else:
            condition = sa.or_(
                tunnel_replicas.c.health.is_(None), tunnel_replicas.c.health != "offline"
            )
            values = {"health": "offline", "health_detail": "not connected to Control"}
        changed: list[str] = []
        ids = list(dict.fromkeys(agent_ids))
        for first in range(0, len(ids), PRESENCE_BATCH):
            where = sa.and_(
                tunnel_replicas.c.agent_id.in_(ids[first : first + PRESENCE_BATCH]), condition
            )
            async with self._read() as conn:
                found = list(
                    await conn.scalars(sa.select(tunnel_replicas.c.tunnel_id).where(where))
                )
            if found:
                async with self._write() as conn:
                    await conn.execute(
                        tunnel_replicas.update()
                        .where(where)
                        .values(**values, health_at=time.time())
                    )
                changed.extend(found)
        return list(dict.fromkeys(changed))

    # -- certificates -----------------------------------------------------------------

    async def upsert_certificate(
        self, domain: str, certificate: str, private_key: str, not_after: float, source: str
    ) -> Row:
        now = time.time()
        async with self._write() as conn:
            existing = await conn.scalar(
                sa.select(certificates.c.id).where(certificates.c.domain == domain)
            )
            values = {
                "certificate_pem": certificate,
                "private_key_pem": private_key,
                "not_after": not_after,
                "source": source,
                "updated_at": now,
            }
            if existing is None:
                existing = str(uuid.uuid4())
                await conn.execute(
                    certificates.insert().values(
                        id=existing, domain=domain, created_at=now, **values
                    )
                )
            else:
                await conn.execute(
                    certificates.update().where(certificates.c.id == existing).values(**values)
                )
        return await self.get_certificate(str(existing))

    async def create_certificate(
        self, domain: str, certificate: str, private_key: str, not_after: float
    ) -> Row:
        async with self._read() as conn:
            if await conn.scalar(
                sa.select(certificates.c.id).where(certificates.c.domain == domain)
            ):
                raise Conflict(f"a certificate for {domain!r} already exists")
        return await self.upsert_certificate(domain, certificate, private_key, not_after, "manual")

    async def list_certificates(self, limit: int, offset: int) -> tuple[list[Row], int]:
        async with self._read() as conn:
            total = await conn.scalar(sa.select(sa.func.count()).select_from(certificates))
            rows = self._rows(
                await conn.execute(
                    sa.select(certificates)
                    .order_by(certificates.c.domain)
                    .limit(limit)
                    .offset(offset)
                )
            )
        return rows, int(total or 0)

    async def all_certificates(self) -> list[Row]:
        async with self._read() as conn:
            return self._rows(
                await conn.execute(sa.select(certificates).order_by(certificates.c.domain))
            )

    async def get_certificate(self, ref: str) -> Row:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(certificates).where(
                        sa.or_(certificates.c.id == ref, certificates.c.domain == ref)
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"no certificate with id or domain {ref!r}")
        return dict(row._mapping)

    async def delete_certificate(self, ref: str) -> Row:
        row = await self.get_certificate(ref)
        async with self._write() as conn:
            await conn.execute(certificates.delete().where(certificates.c.id == row["id"]))
        return row

    # -- configuration snapshots ------------------------------------------------------

    async def all_clients(self, kind: ClientKind) -> list[Row]:
        table = _table(kind)
        async with self._read() as conn:
            return self._rows(await conn.execute(sa.select(table).order_by(table.c.created_at)))

    async def clients_by_id(self, kind: ClientKind, ids: Sequence[str]) -> list[Row]:
        table = _table(kind)
        async with self._read() as conn:
            return self._rows(await conn.execute(sa.select(table).where(table.c.id.in_(list(ids)))))

    # -- access policies (control/access.py builds what is stored) ----------------------

    async def get_access(self, tunnel_id: str) -> Row | None:
        async with self._read() as conn:
            result = await conn.execute(
                sa.select(access_policies).where(access_policies.c.tunnel_id == tunnel_id)
            )
            rows = self._rows(result)
        return rows[0] if rows else None

    async def put_access(self, tunnel_id: str, policy: str, credentials_changed: bool) -> Row:
        """Store a tunnel's policy (JSON); its epoch grows when credentials changed."""
        await self.get_tunnel(tunnel_id)  # NotFound for an unknown tunnel
        now = time.time()
        async with self._write() as conn:
            epoch = await conn.scalar(
                sa.select(access_policies.c.epoch).where(access_policies.c.tunnel_id == tunnel_id)
            )
            if epoch is None:
                await conn.execute(
                    access_policies.insert().values(
                        tunnel_id=tunnel_id, policy=policy, epoch=1, updated_at=now
                    )
                )
            else:
                await conn.execute(
                    access_policies.update()
                    .where(access_policies.c.tunnel_id == tunnel_id)
                    .values(
                        policy=policy,
                        epoch=epoch + 1 if credentials_changed else epoch,
                        updated_at=now,
                    )
                )
        row = await self.get_access(tunnel_id)
        assert row is not None
        return row

    async def delete_access(self, tunnel_id: str) -> bool:
        """Remove a tunnel's policy and its share links (they only work under one)."""
        async with self._write() as conn:
            result = await conn.execute(
                access_policies.delete().where(access_policies.c.tunnel_id == tunnel_id)
            )
            await conn.execute(share_links.delete().where(share_links.c.tunnel_id == tunnel_id))
        return bool(result.rowcount)

    async def all_access(self) -> list[Row]:
        async with self._read() as conn:
            return self._rows(await conn.execute(sa.select(access_policies)))

    async def create_share_link(
        self, tunnel_id: str, token_hash: str, expires_at: float, max_uses: int | None
    ) -> Row:
        await self.get_tunnel(tunnel_id)
        values = {
            "id": str(uuid.uuid4()),
            "tunnel_id": tunnel_id,
            "token_hash": token_hash,
            "expires_at": expires_at,
            "max_uses": max_uses,
            "uses": 0,
            "created_at": time.time(),
        }
        async with self._write() as conn:
            await conn.execute(share_links.insert().values(**values))
        return values

    async def share_links(self, tunnel_id: str | None = None) -> list[Row]:
        query = sa.select(share_links).order_by(share_links.c.created_at)
        if tunnel_id is not None:
            query = query.where(share_links.c.tunnel_id == tunnel_id)
        async with self._read() as conn:
            return self._rows(await conn.execute(query))

    async def delete_share_link(self, tunnel_id: str, link_id: str) -> Row:
        async with self._write() as conn:
            result = await conn.execute(
                sa.select(share_links).where(
                    share_links.c.id == link_id, share_links.c.tunnel_id == tunnel_id
                )
            )
            rows = self._rows(result)
            if not rows:
                raise NotFound("no such share link on this tunnel")
            await conn.execute(share_links.delete().where(share_links.c.id == link_id))
        return rows[0]

    async def use_share_link(self, tunnel_id: str, link_id: str) -> Row | None:
        """Count one use a gateway reported (None: no such link any more)."""
        async with self._write() as conn:
            updated = await conn.execute(
                share_links.update()
                .where(share_links.c.id == link_id, share_links.c.tunnel_id == tunnel_id)
                .values(uses=share_links.c.uses + 1)
            )
            if not updated.rowcount:
                return None
            result = await conn.execute(sa.select(share_links).where(share_links.c.id == link_id))
            rows = self._rows(result)
        return rows[0] if rows else None

    async def session_keys(self) -> list[tuple[str, bytes]]:
        """The keys gateways sign session cookies with (made on first use; the first
        signs).  Rotating means prepending a new key and dropping the oldest later."""
        value = await self.get_setting("session_keys")
        if not value:  # the first (of every replica) to get here makes them
            made = f"{secrets.token_hex(4)}:{base64.b64encode(secrets.token_bytes(32)).decode()}"
            value = await self.setting_if_absent("session_keys", made)
        return [(k, base64.b64decode(v)) for k, v in (p.split(":", 1) for p in value.split())]

    def gateway_address(self, agent_subnet: str, slot: int) -> str:
        return str(self.plan.gateway_address(ipaddress.ip_network(agent_subnet), slot))
