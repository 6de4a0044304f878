"""The dashboard's tables: admin users, their sign-in sessions and the audit log.

Kept apart from :class:`control.db.store.Store` (agents, gateways, tunnels): nothing here
changes what a gateway or an agent is told, so these writes never bump the hub's
snapshot generation, and they take their own lock (SQLite's busy timeout orders them
with the store's writes).

A session row is keyed by the SHA-256 of the random token in the browser's cookie: the
database never holds a usable session token.  A session ends at ``expires_at``, which
moves forward with use (idle timeout) but never past ``created_at + max_age``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.db.schema import admin_sessions, admin_users, audit_log
from control.db.store import Conflict, NotFound

Row = dict[str, Any]

#: a session unused this long ends
SESSION_IDLE = 12 * 3600.0
#: and none lives longer than this
SESSION_MAX_AGE = 7 * 86400.0
#: ``last_seen_at``/``expires_at`` are written at most this often per session
TOUCH_EVERY = 60.0
#: audit log entries kept: the newest; older ones are dropped (checked every
#: ``PRUNE_EVERY`` entries)
MAX_AUDIT = 100_000
PRUNE_EVERY = 100
#: bounds of the audit log's text columns (values are cut to fit, never refused)
_AUDIT_LIMITS = {
    "actor": 63,
    "action": 64,
    "object_kind": 16,
    "object_id": 36,
    "object_name": 253,
    "detail": 1024,
    "address": 64,
}


def token_digest(token: str) -> str:
    """The stored form of a session token (256 random bits: a fast hash is enough)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionUser:
    """A live session and whose it is."""

    session_id: str
    user_id: str
    username: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log: who did what to which object, from where."""

    actor_kind: str  # user | token | system
    actor: str
    action: str  # e.g. agent.create, tunnel.disable, session.login
    object_kind: str | None = None
    object_id: str | None = None
    object_name: str | None = None
    detail: str | None = None
    address: str | None = None

    def values(self) -> Row:
        out: Row = {}
        for key, value in self.__dict__.items():
            limit = _AUDIT_LIMITS.get(key)
            out[key] = value[:limit] if isinstance(value, str) and limit else value
        return out


class AdminStore:
    """Async access to admin users, sessions and the audit log."""

    def __init__(self, engine: AsyncEngine, max_audit: int = MAX_AUDIT) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()
        #: audit entries kept (the newest)
        self.max_audit = max_audit
        self._since_prune = PRUNE_EVERY - 1  # the first entry after a start prunes

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._lock, self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    # -- users ------------------------------------------------------------------------

    async def count_users(self) -> int:
        async with self._read() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(admin_users)) or 0)

    async def create_user(
        self, username: str, password_hash: str, *, only_if_none: bool = False
    ) -> Row:
        """Add an admin user.  With ``only_if_none`` (the first-run setup) the insert
        happens only while no user exists, checked in the same transaction."""
        now = time.time()
        values = {
            "id": str(uuid.uuid4()),
            "username": username,
            "password_hash": password_hash,
            "created_at": now,
            "updated_at": now,
        }
        async with self._write() as conn:
            if only_if_none and await conn.scalar(
                sa.select(sa.func.count()).select_from(admin_users)
            ):
                raise Conflict("an admin user exists already; sign in instead")
            if await conn.scalar(
                sa.select(admin_users.c.id).where(admin_users.c.username == username)
            ):
                raise Conflict(f"an admin user named {username!r} already exists")
            try:
                await conn.execute(admin_users.insert().values(**values))
            except IntegrityError as exc:
                raise Conflict(f"an admin user named {username!r} already exists") from exc
        return values

    async def user_by_name(self, username: str) -> Row | None:
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(admin_users).where(admin_users.c.username == username))
            ).first()
        return None if row is None else dict(row._mapping)

    async def get_user(self, user_id: str) -> Row:
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(admin_users).where(admin_users.c.id == user_id))
            ).first()
        if row is None:
            raise NotFound(f"no admin user with id {user_id!r}")
        return dict(row._mapping)

    async def list_users(self) -> list[Row]:
        async with self._read() as conn:
            result = await conn.execute(sa.select(admin_users).order_by(admin_users.c.username))
            return [dict(r._mapping) for r in result]

    async def set_password(
        self, user_id: str, password_hash: str, *, keep_session: str | None = None
    ) -> None:
        """Store a new password hash and end the user's other sessions."""
        async with self._write() as conn:
            await conn.execute(
                admin_users.update()
                .where(admin_users.c.id == user_id)
                .values(password_hash=password_hash, updated_at=time.time())
            )
            query = admin_sessions.delete().where(admin_sessions.c.user_id == user_id)
            if keep_session is not None:
                query = query.where(admin_sessions.c.id != keep_session)
            await conn.execute(query)

    async def delete_user(self, user_id: str) -> Row:
        """Remove a user (and, by cascade, its sessions); the last one cannot go."""
        row = await self.get_user(user_id)
        async with self._write() as conn:
            if (await conn.scalar(sa.select(sa.func.count()).select_from(admin_users)) or 0) <= 1:
                raise Conflict("the last admin user cannot be removed")
            await conn.execute(admin_sessions.delete().where(admin_sessions.c.user_id == user_id))
            await conn.execute(admin_users.delete().where(admin_users.c.id == user_id))
        return row

    # -- sessions ---------------------------------------------------------------------

    async def create_session(
        self, user_id: str, token: str, address: str | None, user_agent: str | None, now: float
    ) -> float:
        """Store a new session for ``token``; returns when it expires."""
        expires = now + min(SESSION_IDLE, SESSION_MAX_AGE)
        async with self._write() as conn:
            await conn.execute(
                admin_sessions.insert().values(
                    id=token_digest(token),
                    user_id=user_id,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=expires,
                    address=(address or "")[:64] or None,
                    user_agent=(user_agent or "")[:256] or None,
                )
            )
            await conn.execute(
                admin_users.update().where(admin_users.c.id == user_id).values(last_login_at=now)
            )
            # sign-ins are rare: a good moment to forget sessions that ended
            await conn.execute(admin_sessions.delete().where(admin_sessions.c.expires_at <= now))
        return expires

    async def session(self, token: str, now: float) -> SessionUser | None:
        """The live session of ``token`` (its idle expiry moved forward), or None."""
        digest = token_digest(token)
        query = (
            sa.select(admin_sessions, admin_users.c.username)
            .join(admin_users, admin_users.c.id == admin_sessions.c.user_id)
            .where(admin_sessions.c.id == digest)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        data = row._mapping
        if data["expires_at"] <= now:
            return None
        expires = float(data["expires_at"])
        if now - data["last_seen_at"] >= TOUCH_EVERY:
            expires = min(now + SESSION_IDLE, data["created_at"] + SESSION_MAX_AGE)
            async with self._write() as conn:
                await conn.execute(
                    admin_sessions.update()
                    .where(admin_sessions.c.id == digest)
                    .values(last_seen_at=now, expires_at=expires)
                )
        return SessionUser(digest, data["user_id"], data["username"], data["created_at"], expires)

    async def end_session(self, session_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(admin_sessions.delete().where(admin_sessions.c.id == session_id))

    async def count_sessions(self, user_id: str, now: float) -> int:
        async with self._read() as conn:
            value = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(admin_sessions)
                .where(admin_sessions.c.user_id == user_id, admin_sessions.c.expires_at > now)
            )
        return int(value or 0)

    # -- audit log --------------------------------------------------------------------

    async def record(self, entry: AuditEntry, at: float | None = None) -> None:
        """Append an entry; every ``PRUNE_EVERY`` entries, those beyond the newest
        ``max_audit`` go (failed sign-ins are entries too: the log must not grow
        without bound under a password-guessing flood from many addresses)."""
        async with self._write() as conn:
            result = await conn.execute(
                audit_log.insert().values(at=time.time() if at is None else at, **entry.values())
            )
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                newest = result.inserted_primary_key[0] if result.inserted_primary_key else None
                if newest is not None:
                    await conn.execute(
                        audit_log.delete().where(audit_log.c.id <= newest - self.max_audit)
                    )

    async def audit(
        self, limit: int, offset: int, object_id: str | None = None
    ) -> tuple[list[Row], int]:
        """The newest entries first (optionally those about one object) and the total."""
        query = sa.select(audit_log)
        count = sa.select(sa.func.count()).select_from(audit_log)
        if object_id is not None:
            query = query.where(audit_log.c.object_id == object_id)
            count = count.where(audit_log.c.object_id == object_id)
        async with self._read() as conn:
            total = int(await conn.scalar(count) or 0)
            result = await conn.execute(
                query.order_by(audit_log.c.id.desc()).limit(limit).offset(offset)
            )
            return [dict(r._mapping) for r in result], total
