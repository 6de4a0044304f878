"""Raw TCP/UDP tunnels may send their target a PROXY protocol header (v1/v2) with the
client's address (issue 15).

Revision ID: 0005_tunnel_proxy_protocol
Revises: 0004_access_policies
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_tunnel_proxy_protocol"
down_revision = "0004_access_policies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tunnels", sa.Column("proxy_protocol", sa.String(2), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tunnels") as batch:
        batch.drop_column("proxy_protocol")
