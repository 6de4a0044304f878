"""Agents and gateways can be disabled (issue 16): the hub refuses them (close code
4008) and leaves them out of every other client's config; their key stays valid.

Revision ID: 0007_client_enabled
Revises: 0006_cluster
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_client_enabled"
down_revision = "0006_cluster"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("agents", "gateways"):
        op.add_column(
            table,
            sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        )


def downgrade() -> None:
    for table in ("agents", "gateways"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("enabled")
