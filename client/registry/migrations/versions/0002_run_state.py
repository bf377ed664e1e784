"""Runs keep their state: ``runs.summary`` and ``runs.tags`` (JSON, nullable: older runs have
none) and the ``run_files`` table (a run's uploaded files, ``Run.upload_file``/``Run.files``).

Revision ID: 0002_run_state
Revises: 0001_baseline
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_run_state'
down_revision = '0001_baseline'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('summary', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('tags', sa.JSON(), nullable=True))
    op.create_table('run_files',
        sa.Column('run_pk', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=1024), nullable=False),
        sa.Column('md5', sa.String(length=32), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['run_pk'], ['runs.pk'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_pk', 'name')
    )


def downgrade() -> None:
    op.drop_table('run_files')
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('tags')
        batch.drop_column('summary')
