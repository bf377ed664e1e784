"""Collections carry a listing stamp: ``collections.stamp`` (BIGINT, 0 for the rows already
there), changed by every change to what a project listing shows of the collection, so a server
can keep each collection's part of a listing and check it with one query.

Revision ID: 0003_listing_stamp
Revises: 0002_run_state
Create Date: 2026-12-02 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_listing_stamp'
down_revision = '0002_run_state'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('collections') as batch:
        batch.add_column(sa.Column('stamp', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('collections') as batch:
        batch.drop_column('stamp')
