"""Initial schema: agents, gateways, tunnels, certificates, settings.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('agents',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('api_key_hash', sa.String(length=64), nullable=False),
    sa.Column('public_key', sa.String(length=44), nullable=True),
    sa.Column('subnet', sa.String(length=43), nullable=False),
    sa.Column('virtual_ip', sa.String(length=39), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=True),
    sa.Column('client_version', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_agents')),
    sa.UniqueConstraint('api_key_hash', name=op.f('uq_agents_api_key_hash')),
    sa.UniqueConstraint('name', name=op.f('uq_agents_name')),
    sa.UniqueConstraint('subnet', name=op.f('uq_agents_subnet')),
    sa.UniqueConstraint('virtual_ip', name=op.f('uq_agents_virtual_ip'))
    )
    op.create_table('certificates',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('domain', sa.String(length=253), nullable=False),
    sa.Column('certificate_pem', sa.Text(), nullable=False),
    sa.Column('private_key_pem', sa.Text(), nullable=False),
    sa.Column('not_after', sa.Float(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_certificates')),
    sa.UniqueConstraint('domain', name=op.f('uq_certificates_domain'))
    )
    op.create_table('gateways',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('api_key_hash', sa.String(length=64), nullable=False),
    sa.Column('public_key', sa.String(length=44), nullable=True),
    sa.Column('public_ip', sa.String(length=39), nullable=True),
    sa.Column('wireguard_port', sa.Integer(), nullable=True),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=True),
    sa.Column('client_version', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gateways')),
    sa.UniqueConstraint('api_key_hash', name=op.f('uq_gateways_api_key_hash')),
    sa.UniqueConstraint('name', name=op.f('uq_gateways_name')),
    sa.UniqueConstraint('slot', name=op.f('uq_gateways_slot'))
    )
    op.create_table('settings',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_settings'))
    )
    op.create_table('tunnels',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('protocol', sa.String(length=8), nullable=False),
    sa.Column('domain', sa.String(length=253), nullable=True),
    sa.Column('public_port', sa.Integer(), nullable=True),
    sa.Column('target', sa.String(length=2048), nullable=False),
    sa.Column('agent_id', sa.String(length=36), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('health', sa.String(length=16), nullable=True),
    sa.Column('health_detail', sa.String(length=512), nullable=True),
    sa.Column('health_at', sa.Float(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['agent_id'], ['agents.id'], name=op.f('fk_tunnels_agent_id_agents'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tunnels')),
    sa.UniqueConstraint('domain', name=op.f('uq_tunnels_domain')),
    sa.UniqueConstraint('protocol', 'public_port', name='uq_tunnels_protocol_public_port')
    )
    op.create_index(op.f('ix_tunnels_agent_id'), 'tunnels', ['agent_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_tunnels_agent_id'), table_name='tunnels')
    op.drop_table('tunnels')
    op.drop_table('settings')
    op.drop_table('gateways')
    op.drop_table('certificates')
    op.drop_table('agents')
