"""jobs' GPU class and GPU count (Lathe's `resources`)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 02:00:00.000000
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gpu_class', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('gpus', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('gpus')
        batch_op.drop_column('gpu_class')
