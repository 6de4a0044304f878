"""A tunnel may be served by several agents (issue 17): tunnel_replicas (weight, role,
draining, health per agent) and the tunnel's balance and sticky settings.

Revision ID: 0008_tunnel_replicas
Revises: 0007_client_enabled
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_tunnel_replicas"
down_revision = "0007_client_enabled"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tunnels", sa.Column("balance", sa.String(24), nullable=True))
    op.add_column("tunnels", sa.Column("sticky", sa.String(16), nullable=True))
    op.create_table(
        "tunnel_replicas",
        sa.Column("tunnel_id", sa.String(36), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("draining", sa.Boolean, nullable=False),
        sa.Column("health", sa.String(16), nullable=True),
        sa.Column("health_detail", sa.String(512), nullable=True),
        sa.Column("health_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.ForeignKeyConstraint(
            ["tunnel_id"],
            ["tunnels.id"],
            name="fk_tunnel_replicas_tunnel_id_tunnels",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name="fk_tunnel_replicas_agent_id_agents",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tunnel_id", "agent_id", name="pk_tunnel_replicas"),
    )
    op.create_index("ix_tunnel_replicas_agent_id", "tunnel_replicas", ["agent_id"])


def downgrade() -> None:
    op.drop_index("ix_tunnel_replicas_agent_id", table_name="tunnel_replicas")
    op.drop_table("tunnel_replicas")
    with op.batch_alter_table("tunnels") as batch:
        batch.drop_column("sticky")
        batch.drop_column("balance")
