"""jobs of jobs: a search's trials name their parent

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:00:00.000000
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_job', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('child_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('child_info', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('search', sa.JSON(), nullable=True))
        batch_op.create_foreign_key('fk_jobs_parent_job', 'jobs', ['parent_job'], ['id'], ondelete='CASCADE')
        batch_op.create_index('uq_jobs_parent_child', ['parent_job', 'child_index'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_parent_child')
        batch_op.drop_constraint('fk_jobs_parent_job', type_='foreignkey')
        batch_op.drop_column('search')
        batch_op.drop_column('child_info')
        batch_op.drop_column('child_index')
        batch_op.drop_column('parent_job')
