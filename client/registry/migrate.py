"""Schema versions of the registry database: Alembic revisions in ``migrations/versions``.

Every open of a :class:`~client.registry.core.RegistryCore` calls :func:`prepare`:

* a database at :data:`HEAD` costs one read of ``alembic_version`` (Alembic is not even
  imported);
* an empty database (no registry tables; the server's ``auth_*`` tables do not count) is
  created at head, always: nothing is there to lose;
* an older database is upgraded only when the caller allows it (the embedded store always
  does: it has one user; a server only with ``artifactfs server --migrate``), else
  :class:`SchemaVersionError` says to run the migration;
* a database made before schema versions existed (tables from ``create_all``, no
  ``alembic_version``) is that baseline, possibly without the two indexes added late: it gets
  them, is stamped :data:`BASELINE`, then upgraded like any older database;
* a database newer than this code (a revision it does not know) is refused, never touched.

Upgrades run in one write transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL with an
advisory lock, so server processes starting together migrate once), and both databases have
transactional DDL: a failed upgrade leaves the database as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import SchemaVersionError

SCRIPTS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
#: the schema of the first release (what ``create_all`` made before migrations existed)
BASELINE = "0001_baseline"
#: the newest revision in migrations/versions: bump it with every new revision
#: (tests/test_migrations.py checks it against the scripts)
HEAD = "0003_listing_stamp"
#: held during migrations on PostgreSQL (pg_advisory_xact_lock), any constant unique to us
_PG_LOCK_KEY = 0x6166735F6D6967

MIGRATE_HINT = "run 'artifactfs server --migrate' once (back up the database first)"


def prepare(engine: Engine, *, upgrade: bool) -> None:
    """Make sure the database is at :data:`HEAD` (see the module docstring)."""
    with engine.connect() as conn, conn.begin():
        if current_revision(conn) == HEAD:
            return
    with engine.connect() as conn:
        conn = conn.execution_options(immediate=True)  # SQLite: BEGIN IMMEDIATE (client/registry/core.py)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            _prepare_locked(conn, upgrade)


def current_revision(conn: Connection) -> str | None:
    """The database's revision; ``""`` for tables from before schema versions, None when empty."""
    insp = sa.inspect(conn)
    if insp.has_table(VERSION_TABLE):
        return conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() or ""
    return "" if insp.has_table("entities") else None


def _prepare_locked(conn: Connection, upgrade: bool) -> None:
    from alembic import command

    rev = current_revision(conn)  # again: another process may have migrated while we waited
    if rev == HEAD:
        return
    cfg = alembic_config(conn)
    if rev is None:
        command.upgrade(cfg, "head")
        return
    if rev and rev not in known_revisions():
        raise SchemaVersionError(f"the registry database is at schema revision {rev!r}, newer than this "
                                 f"artifactfs knows (head {HEAD!r}): upgrade artifactfs")
    if not upgrade:
        found = f"revision {rev!r}" if rev else "the schema from before migrations"
        raise SchemaVersionError(f"the registry database has {found}, this artifactfs needs {HEAD!r}: {MIGRATE_HINT}")
    if not rev:
        _adopt_unversioned(conn)
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, "head")


def _adopt_unversioned(conn: Connection) -> None:
    """Bring tables made by ``create_all`` before migrations to :data:`BASELINE`: the only
    difference there ever was is two indexes added after the first release."""
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS versions_by_run ON versions (run_pk)")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS usages_by_version ON usages (version_id)")


def alembic_config(conn: Connection | None = None) -> Any:
    """Alembic's configuration, in code: the scripts of this package, and ``conn`` for env.py."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = conn
    return cfg


def script_heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory.from_config(alembic_config()).get_heads())


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
