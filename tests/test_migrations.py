"""Schema versions of the registry database (client/registry/migrate.py, Alembic).

The databases "from before migrations" are real ones: ``tests/data/registry_before_migrations.*``
were made by the code of commit 2d2083d (``create_all``, no ``alembic_version``) holding three
versions in two collections, dumped by sqlite3 and pg_dump.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.server_fixtures import (S3_ENV, PostgresCluster, ServerFactory, make_store,  # noqa: F401
                                   postgres)

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def _old_sqlite(path: Path, *, without_late_indexes: bool = False) -> str:
    con = sqlite3.connect(path)
    con.executescript((DATA / "registry_before_migrations.sqlite.sql").read_text())
    if without_late_indexes:  # a database made before these two indexes existed
        con.executescript("DROP INDEX versions_by_run; DROP INDEX usages_by_version;")
    con.close()
    return f"sqlite:///{path}"


def _old_postgres(pg: PostgresCluster) -> str:
    url = pg.new_database()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql((DATA / "registry_before_migrations.postgresql.sql").read_text())
    engine.dispose()
    return url


def _old_database(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return _old_sqlite(tmp_path / "old.db", without_late_indexes=True)
    return _old_postgres(request.getfixturevalue("postgres"))


def _revision(url: str) -> str | None:
    from client.registry.core import make_engine
    from client.registry.migrate import current_revision

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def test_head_is_the_newest_revision_of_the_scripts() -> None:
    from client.registry import migrate

    assert migrate.script_heads() == [migrate.HEAD]
    assert migrate.BASELINE in migrate.known_revisions()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_new_database_at_head_matches_the_tables_of_schema_py(kind: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """Changing client/registry/schema.py without a revision (or the reverse) fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from client.registry import LocalBlobBackend, RegistryCore, migrate, schema

    url = f"sqlite:///{tmp_path / 'new.db'}" if kind == "sqlite" else request.getfixturevalue("postgres").new_database()
    reg = RegistryCore(url, LocalBlobBackend(tmp_path / "blobs"))
    try:
        with reg.engine.connect() as conn:
            assert migrate.current_revision(conn) == migrate.HEAD
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, schema.metadata) == []
    finally:
        reg.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_database_from_before_migrations_is_upgraded_only_when_asked_and_keeps_its_data(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from client.errors import SchemaVersionError
    from client.registry import LocalBlobBackend, RegistryCore, migrate
    from client.store.local import LocalStore
    from tests.util import commit_files

    url = _old_database(kind, tmp_path, request)
    blobs = LocalBlobBackend(tmp_path / "store" / "blobs")
    with pytest.raises(SchemaVersionError, match="artifactfs server --migrate"):
        RegistryCore(url, blobs, migrate=False)
    assert _revision(url) == ""  # refused without touching it

    reg = RegistryCore(url, blobs, migrate=True)
    try:
        assert _revision(url) == migrate.HEAD
        insp = sa.inspect(reg.engine)
        assert {"versions_by_run", "versions_by_source"} <= {i["name"] for i in insp.get_indexes("versions")}
        assert "usages_by_version" in {i["name"] for i in insp.get_indexes("usages")}
        ds = reg.list_versions("ent", "proj", "ds")
        assert [v.version for v in ds] == ["v0", "v1"]
        assert [v.description for v in ds] == [None, "second"]
        assert ds[0].size == 15 and ds[0].file_count == 2 and ds[1].size == 6
        assert reg.resolve("ent", "proj", "ds", "best").id == ds[0].id
        assert reg.resolve("ent", "proj", "ds", "latest").id == ds[1].id
        assert [v.version for v in reg.list_versions("ent", "proj", "model")] == ["v0"]
        # and it keeps working: the next commit is v2
        store = LocalStore(tmp_path / "store", db_url=url)
        try:
            rec, created = commit_files(store, tmp_path, {"a.txt": b"alpha3"})
            assert created and rec.version == "v2"
        finally:
            store.close()
    finally:
        reg.close()
    RegistryCore(url, blobs, migrate=False).close()  # at head now: a server needs no --migrate


def test_the_embedded_store_upgrades_its_database_on_open(tmp_path: Path) -> None:
    from client.registry import migrate
    from client.store.local import LocalStore

    (tmp_path / "store").mkdir()
    url = _old_sqlite(tmp_path / "store" / "registry.db")
    store = LocalStore(tmp_path / "store")
    try:
        assert [v.version for v in store.list_versions("ent", "proj", "ds")] == ["v0", "v1"]
    finally:
        store.close()
    assert _revision(url) == migrate.HEAD


def test_a_database_newer_than_the_code_is_refused_untouched(tmp_path: Path) -> None:
    from client.errors import SchemaVersionError
    from client.registry import LocalBlobBackend, RegistryCore

    url = f"sqlite:///{tmp_path / 'r.db'}"
    RegistryCore(url, LocalBlobBackend(tmp_path / "blobs")).close()
    con = sqlite3.connect(tmp_path / "r.db")
    con.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    con.commit()
    con.close()
    for migrate in (False, True):
        with pytest.raises(SchemaVersionError, match="newer than this artifactfs knows.*upgrade artifactfs"):
            RegistryCore(url, LocalBlobBackend(tmp_path / "blobs"), migrate=migrate)
    assert _revision(url) == "9999_from_the_future"


@pytest.mark.postgres
def test_servers_starting_together_on_an_empty_postgresql_database_create_it_once(postgres: PostgresCluster,  # noqa: F811
                                                                                    tmp_path: Path) -> None:
    from client.registry import LocalBlobBackend, RegistryCore, migrate

    url = postgres.new_database()
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            RegistryCore(url, LocalBlobBackend(tmp_path / "blobs"), migrate=False).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and _revision(url) == migrate.HEAD


def test_server_refuses_an_older_database_in_one_line_and_migrate_upgrades_it(tmp_path: Path) -> None:
    from client.registry import migrate

    url = _old_sqlite(tmp_path / "old.db")
    cmd = [sys.executable, "-m", "server.cli", "server", "--db", url, "--blobs", str(tmp_path / "blobs")]
    env = {**S3_ENV, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1, refused
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "artifactfs server --migrate" in lines[0], refused.stderr
    assert _revision(url) == ""

    factory = ServerFactory(url, str(tmp_path / "blobs"), tmp_path)
    try:
        server = factory.start(args=("--migrate",))
        assert _revision(url) == migrate.HEAD
        team_key = factory.user("alice")
        factory.auth.create_team("ent")
        factory.auth.add_member("ent", "alice")
        store = make_store(server.url, team_key)
        assert [v.version for v in store.list_versions("ent", "proj", "ds")] == ["v0", "v1"]
    finally:
        factory.stop_all()
