"""Baseline: the schema of the first release, exactly what ``create_all`` made before migrations
(client/registry/migrate.py stamps such databases with this revision).

Revision ID: 0001_baseline
Revises: -
Create Date: 2026-12-02 06:25:20.510839
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001_baseline'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('entities',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('default_ttl_seconds', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name')
    )
    op.create_table('blob_blockmaps',
        sa.Column('entity_id', sa.Integer(), nullable=False),
        sa.Column('md5', sa.String(length=32), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('block_size', sa.Integer(), nullable=False),
        sa.Column('hashes', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['entity_id'], ['entities.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('entity_id', 'md5')
    )
    op.create_table('blobs',
        sa.Column('entity_id', sa.Integer(), nullable=False),
        sa.Column('md5', sa.String(length=32), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['entity_id'], ['entities.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('entity_id', 'md5')
    )
    op.create_table('projects',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('entity_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['entity_id'], ['entities.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('entity_id', 'name')
    )
    op.create_table('collections',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('type', sa.String(length=128), nullable=False),
        sa.Column('description', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('next_index', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('project_id', 'name')
    )
    op.create_table('runs',
        sa.Column('pk', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.String(length=128), nullable=False),
        sa.Column('name', sa.String(length=256), nullable=True),
        sa.Column('job_type', sa.String(length=128), nullable=True),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('pk'),
        sa.UniqueConstraint('project_id', 'run_id')
    )
    op.create_table('collection_tags',
        sa.Column('collection_id', sa.Integer(), nullable=False),
        sa.Column('tag', sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('collection_id', 'tag')
    )
    op.create_table('versions',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('collection_id', sa.Integer(), nullable=False),
        sa.Column('idx', sa.Integer(), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('manifest_md5', sa.String(length=32), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('file_count', sa.BigInteger(), nullable=False),
        sa.Column('description', sa.Text(), nullable=True),
        sa.Column('meta', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('ttl_seconds', sa.Float(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('run_pk', sa.Integer(), nullable=True),
        sa.Column('source_id', sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['run_pk'], ['runs.pk'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['source_id'], ['versions.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('collection_id', 'idx')
    )
    op.create_index('versions_by_run', 'versions', ['run_pk'])
    op.create_index('versions_by_source', 'versions', ['source_id'])
    op.create_table('aliases',
        sa.Column('collection_id', sa.Integer(), nullable=False),
        sa.Column('alias', sa.String(length=128), nullable=False),
        sa.Column('version_id', sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('collection_id', 'alias')
    )
    op.create_index('aliases_by_version', 'aliases', ['version_id'])
    op.create_table('usages',
        sa.Column('run_pk', sa.Integer(), nullable=False),
        sa.Column('version_id', sa.String(length=32), nullable=False),
        sa.Column('use_as', sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(['run_pk'], ['runs.pk'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_pk', 'version_id')
    )
    op.create_index('usages_by_version', 'usages', ['version_id'])
    op.create_table('version_tags',
        sa.Column('version_id', sa.String(length=32), nullable=False),
        sa.Column('tag', sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('version_id', 'tag')
    )


def downgrade() -> None:
    op.drop_table('version_tags')
    op.drop_table('usages')
    op.drop_table('aliases')
    op.drop_table('versions')
    op.drop_table('collection_tags')
    op.drop_table('runs')
    op.drop_table('collections')
    op.drop_table('projects')
    op.drop_table('blobs')
    op.drop_table('blob_blockmaps')
    op.drop_table('entities')
