"""Several Control replicas on one database (issue 19): leases for once-only jobs
(generic: any name), the replicas alive and which one each client is connected to.

Revision ID: 0006_cluster
Revises: 0005_tunnel_proxy_protocol
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_cluster"
down_revision = "0005_tunnel_proxy_protocol"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )
    op.create_table(
        "control_replicas",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_control_replicas"),
    )
    op.create_index(
        "ix_control_replicas_heartbeat_at", "control_replicas", ["heartbeat_at"], unique=False
    )
    op.create_table(
        "presence",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("client_id", sa.String(36), nullable=False),
        sa.Column("replica_id", sa.String(36), nullable=False),
        sa.Column("connected_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "client_id", name="pk_presence"),
    )
    op.create_index("ix_presence_replica_id", "presence", ["replica_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_presence_replica_id", table_name="presence")
    op.drop_table("presence")
    op.drop_index("ix_control_replicas_heartbeat_at", table_name="control_replicas")
    op.drop_table("control_replicas")
    op.drop_table("leases")
