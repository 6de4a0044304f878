"""Access policies per tunnel and their share links (issue 15).

Revision ID: 0004_access_policies
Revises: 0003_gateway_https_port
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_access_policies"
down_revision = "0003_gateway_https_port"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_policies",
        sa.Column("tunnel_id", sa.String(36), nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tunnel_id"],
            ["tunnels.id"],
            name="fk_access_policies_tunnel_id_tunnels",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tunnel_id", name="pk_access_policies"),
    )
    op.create_table(
        "share_links",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tunnel_id", sa.String(36), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tunnel_id"],
            ["tunnels.id"],
            name="fk_share_links_tunnel_id_tunnels",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_share_links"),
        sa.UniqueConstraint("token_hash", name="uq_share_links_token_hash"),
    )
    op.create_index("ix_share_links_tunnel_id", "share_links", ["tunnel_id"])


def downgrade() -> None:
    op.drop_index("ix_share_links_tunnel_id", table_name="share_links")
    op.drop_table("share_links")
    op.drop_table("access_policies")
