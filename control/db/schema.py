"""Tables of the Control database (SQLAlchemy Core, portable to PostgreSQL).

The Alembic migrations in ``migrations/versions`` create exactly these tables; a test
compares the migrated database with this metadata so the two cannot drift.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("api_key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("public_key", sa.String(44)),
    sa.Column("subnet", sa.String(43), nullable=False, unique=True),
    sa.Column("virtual_ip", sa.String(39), nullable=False, unique=True),
    sa.Column("last_seen", sa.Float),
    sa.Column("client_version", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

gateways = sa.Table(
    "gateways",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("api_key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("public_key", sa.String(44)),
    sa.Column("public_ip", sa.String(39)),
    sa.Column("wireguard_port", sa.Integer),
    # k: the gateway's host number in every agent subnet (.k).
    sa.Column("slot", sa.Integer, nullable=False, unique=True),
    sa.Column("last_seen", sa.Float),
    sa.Column("client_version", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

tunnels = sa.Table(
    "tunnels",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("protocol", sa.String(8), nullable=False),
    sa.Column("domain", sa.String(253), unique=True),
    sa.Column("public_port", sa.Integer),
    sa.Column("target", sa.String(2048), nullable=False),
    sa.Column(
        "agent_id",
        sa.String(36),
        sa.ForeignKey("agents.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("health", sa.String(16)),
    sa.Column("health_detail", sa.String(512)),
    sa.Column("health_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("protocol", "public_port", name="uq_tunnels_protocol_public_port"),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("domain", sa.String(253), nullable=False, unique=True),
    sa.Column("certificate_pem", sa.Text, nullable=False),
    sa.Column("private_key_pem", sa.Text, nullable=False),
    sa.Column("not_after", sa.Float, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
