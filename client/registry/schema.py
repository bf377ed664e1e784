"""Tables of the registry (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Gapless version numbers come from ``collections.next_index``, read and bumped while the
collection row is locked (``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite); ``UNIQUE(collection_id, idx)`` makes a bug there fail loudly instead of forking a
version.  Aliases are unique per collection by their primary key.

These tables are the model of the newest schema revision: change them only together with a new
Alembic revision in ``migrations/versions`` (docs/OPERATIONS.md, "Schema migrations";
tests/test_migrations.py fails when the two disagree).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

TS = sa.DateTime(timezone=True)

entities = sa.Table(
    "entities", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("default_ttl_seconds", sa.Float, nullable=True),
)

projects = sa.Table(
    "projects", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("entity_id", sa.Integer, sa.ForeignKey("entities.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("entity_id", "name"),
)

collections = sa.Table(
    "collections", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("next_index", sa.Integer, nullable=False, default=0),
    #: "sequence" (versions logged into it) or "portfolio" (versions linked into it)
    sa.Column("kind", sa.String(16), nullable=False, default="sequence"),
    #: changes (to a random value) with every change to what a listing shows of the collection:
    #: its row, its versions, their aliases and tags, the links it holds and their sources' names
    #: (RegistryCore.list_project_parts; a server caches each collection's part of a listing by it)
    sa.Column("stamp", sa.BigInteger, nullable=False, server_default="0"),
    sa.UniqueConstraint("project_id", "name"),
)

collection_tags = sa.Table(
    "collection_tags", metadata,
    sa.Column("collection_id", sa.Integer, sa.ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("name", sa.String(256), nullable=True),
    sa.Column("job_type", sa.String(128), nullable=True),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    #: the last value of each key given to ``run.log`` / set in ``run.summary`` (JSON object)
    sa.Column("summary", sa.JSON, nullable=True),
    #: the run's tags (JSON list of strings; W&B run tags are free text, unlike artifact tags)
    sa.Column("tags", sa.JSON, nullable=True),
    sa.UniqueConstraint("project_id", "run_id"),
)

#: files saved with a run (``Run.upload_file``): content is a blob of the run's entity
run_files = sa.Table(
    "run_files", metadata,
    sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(1024), primary_key=True),  #: at most 1024 UTF-8 bytes (btree key)
    sa.Column("md5", sa.String(32), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

versions = sa.Table(
    "versions", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("collection_id", sa.Integer, sa.ForeignKey("collections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("manifest_md5", sa.String(32), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("file_count", sa.BigInteger, nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("ttl_seconds", sa.Float, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.pk", ondelete="SET NULL"), nullable=True),
    #: set for a version linked into a portfolio: the version it links to
    sa.Column("source_id", sa.String(32), sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=True),
    sa.UniqueConstraint("collection_id", "idx"),
)
sa.Index("versions_by_source", versions.c.source_id)
#: runs -> versions they logged (versions_logged_by, delete_run, ON DELETE SET NULL)
versions_by_run = sa.Index("versions_by_run", versions.c.run_pk)

aliases = sa.Table(
    "aliases", metadata,
    sa.Column("collection_id", sa.Integer, sa.ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("version_id", sa.String(32), sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=False),
)
sa.Index("aliases_by_version", aliases.c.version_id)

version_tags = sa.Table(
    "version_tags", metadata,
    sa.Column("version_id", sa.String(32), sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
)

usages = sa.Table(
    "usages", metadata,
    sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("version_id", sa.String(32), sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("use_as", sa.String(128), nullable=True),
)
#: versions -> runs using them (runs_using, ON DELETE CASCADE from versions)
usages_by_version = sa.Index("usages_by_version", usages.c.version_id)

blobs = sa.Table(
    "blobs", metadata,
    sa.Column("entity_id", sa.Integer, sa.ForeignKey("entities.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("md5", sa.String(32), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

#: per-blob block maps (client/blockmap.py): a sha256 per block, so readers verify lazily
blob_blockmaps = sa.Table(
    "blob_blockmaps", metadata,
    sa.Column("entity_id", sa.Integer, sa.ForeignKey("entities.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("md5", sa.String(32), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("block_size", sa.Integer, nullable=False),
    sa.Column("hashes", sa.LargeBinary, nullable=False),
)
