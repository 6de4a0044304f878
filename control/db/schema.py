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
    # false: refused by the hub and left out of every other client's config; the key
    # stays valid, so enabling it again needs no new enrollment (migration 0007)
    sa.Column("enabled", sa.Boolean, nullable=False, default=True, server_default=sa.true()),
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
    # where agents reach WireGuard over a WebSocket when their UDP is blocked
    sa.Column("https_port", sa.Integer),
    # k: the gateway's host number in every agent subnet (.k).
    sa.Column("slot", sa.Integer, nullable=False, unique=True),
    # false: refused by the hub and left out of every other client's config; the key
    # stays valid, so enabling it again needs no new enrollment (migration 0007)
    sa.Column("enabled", sa.Boolean, nullable=False, default=True, server_default=sa.true()),
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
    # tcp/udp: the PROXY protocol header sent to the target ("v1", "v2"; NULL: none)
    sa.Column("proxy_protocol", sa.String(2)),
    # a tunnel with replicas (tunnel_replicas): "least_connections" (NULL: round robin)
    # and sticky sessions ("cookie", "client_ip"; NULL: none)
    sa.Column("balance", sa.String(24)),
    sa.Column("sticky", sa.String(16)),
    sa.Column("health", sa.String(16)),
    sa.Column("health_detail", sa.String(512)),
    sa.Column("health_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("protocol", "public_port", name="uq_tunnels_protocol_public_port"),
)

# -- replicas (issue 17) ----------------------------------------------------------------
#
# A tunnel served by several agents has a row per agent here, its own ``agent_id`` (the
# one older gateways route to, REST's ``agentId``) among them; a tunnel with one agent
# has none.  Health is the agent's check of the tunnel's target, or "offline" while the
# agent is not connected to Control.

tunnel_replicas = sa.Table(
    "tunnel_replicas",
    metadata,
    sa.Column(
        "tunnel_id",
        sa.String(36),
        sa.ForeignKey("tunnels.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "agent_id",
        sa.String(36),
        sa.ForeignKey("agents.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    ),
    sa.Column("weight", sa.Integer, nullable=False, default=1),
    # "active" or "standby" (takes traffic only while no active replica is healthy)
    sa.Column("role", sa.String(8), nullable=False, default="active"),
    # taken out by an operator: no new requests or connections
    sa.Column("draining", sa.Boolean, nullable=False, default=False),
    sa.Column("health", sa.String(16)),
    sa.Column("health_detail", sa.String(512)),
    sa.Column("health_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
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

# -- the dashboard (migration 0002_dashboard) ----------------------------------------------

admin_users = sa.Table(
    "admin_users",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("username", sa.String(63), nullable=False, unique=True),
    # argon2id, PHC string format ($argon2id$v=19$m=…,t=…,p=…$salt$hash)
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("last_login_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

admin_sessions = sa.Table(
    "admin_sessions",
    metadata,
    # SHA-256 of the session token in the cookie: the database never holds the token
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "user_id",
        sa.String(36),
        sa.ForeignKey("admin_users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("address", sa.String(64)),
    sa.Column("user_agent", sa.String(256)),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    # who: a dashboard user ("user"), the REST API's admin token ("token"), Control ("system")
    sa.Column("actor_kind", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(63), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("object_kind", sa.String(16)),
    sa.Column("object_id", sa.String(36)),
    sa.Column("object_name", sa.String(253)),
    sa.Column("detail", sa.String(1024)),
    sa.Column("address", sa.String(64)),
)

# -- access policies (migration 0004_access_policies) --------------------------------------

access_policies = sa.Table(
    "access_policies",
    metadata,
    sa.Column(
        "tunnel_id",
        sa.String(36),
        sa.ForeignKey("tunnels.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # the policy as the gateways get it, secrets hashed (control/access.py), JSON
    sa.Column("policy", sa.Text, nullable=False),
    # grows when a credential changes: sessions signed in under an older one end
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

share_links = sa.Table(
    "share_links",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column(
        "tunnel_id",
        sa.String(36),
        sa.ForeignKey("tunnels.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # SHA-256 of the token (the token itself is shown once, at creation)
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("max_uses", sa.Integer),
    sa.Column("uses", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
)

# -- several Control replicas on one database (migration 0006_cluster) ---------------------

leases = sa.Table(
    "leases",
    metadata,
    # what the lease guards ("control-jobs": the once-only background jobs; others may
    # add their own names, e.g. one per ACME order)
    sa.Column("name", sa.String(128), primary_key=True),
    # who holds it (a replica id, or any caller's id); NULL once released
    sa.Column("holder", sa.String(64)),
    # the database's clock (seconds since the epoch) when it lapses unless renewed
    sa.Column("expires_at", sa.Float, nullable=False),
    # grows every time the lease changes hands (a fencing token)
    sa.Column("fence", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
)

control_replicas = sa.Table(
    "control_replicas",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    # host name and port, for logs and the dashboard
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    # renewed every few seconds; a replica silent for longer than its lease is dead
    sa.Column("heartbeat_at", sa.Float, nullable=False, index=True),
)

presence = sa.Table(
    "presence",
    metadata,
    # which replica a gateway or agent is connected to now (no row: offline)
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("client_id", sa.String(36), primary_key=True),
    sa.Column("replica_id", sa.String(36), nullable=False, index=True),
    sa.Column("connected_at", sa.Float, nullable=False),
)
