"""Alembic environment: always online, on the connection client/registry/migrate.py opened.

That connection is already inside the write transaction (and, on PostgreSQL, holds the
migration advisory lock), so Alembic runs every step in it: a failed upgrade leaves nothing
half done, on SQLite and PostgreSQL alike (both have transactional DDL).
"""

from __future__ import annotations

from alembic import context

from client.registry import schema

from client.registry.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=schema.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=True,  # SQLite cannot ALTER most things: autogenerate batch (copy-and-move) ops
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
