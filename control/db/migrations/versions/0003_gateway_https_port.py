"""Gateways report their HTTPS port: agents whose UDP is blocked reach the gateway's
WireGuard over a WebSocket there (the stream transport, issue 18).

Revision ID: 0003_gateway_https_port
Revises: 0002_dashboard
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op


revision = '0003_gateway_https_port'
down_revision = '0002_dashboard'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('gateways', sa.Column('https_port', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('gateways') as batch:
        batch.drop_column('https_port')
