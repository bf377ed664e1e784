"""Round trips to PostgreSQL per registry call (issue 13, bench/load).

On a loaded machine every round trip costs the server two wake-ups (its thread and the
database backend), each waiting for a CPU, so the calls a fleet of mounts makes most are held
to one or two.  Counted on the wire: libpq's trace of every pooled connection, one line per
protocol message; a round trip ends with the client's ``Sync`` (extended protocol) or is one
simple ``Query`` (BEGIN, COMMIT, a ping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.registry import LocalBlobBackend, RegistryCore
from client.registry import core as core_mod
from client.store.base import CommitRequest
from tests.server_fixtures import PostgresCluster, postgres  # noqa: F401  (fixture)


class Wire:
    """Traces every connection the engine opens; counts the round trips of a call."""

    def __init__(self, engine: sa.Engine, path: Path) -> None:
        self.path = path
        self.file = open(path, "w+")  # noqa: SIM115 - closed in close()

        @sa.event.listens_for(engine, "connect")
        def _trace(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.pgconn.trace(self.file.fileno())

        engine.dispose()  # connections opened before this point are not traced

    def messages(self, fn: Callable[[], object]) -> list[tuple[str, str]]:
        self.file.flush()
        start = self.path.stat().st_size
        fn()
        self.file.flush()
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            fields = [line.split("\t") for line in f.read().splitlines()]
        return [(x[3].split(" ")[0], x[4] if len(x) > 4 else "") for x in fields if len(x) > 3 and x[1] == "F"]

    def round_trips(self, fn: Callable[[], object]) -> int:
        return sum(1 for kind, _ in self.messages(fn) if kind in ("Sync", "Query"))

    def close(self) -> None:
        self.file.close()


@pytest.fixture
def traced(postgres: PostgresCluster, tmp_path: Path) -> Iterator[tuple[RegistryCore, Wire, dict[str, Any]]]:  # noqa: F811
    blobs = LocalBlobBackend(tmp_path / "blobs")
    reg = RegistryCore(postgres.new_database(), blobs)

    def put(data: bytes) -> str:
        md5 = md5_bytes(data)
        src = tmp_path / md5
        src.write_bytes(data)
        blobs.put_file("e", md5, src)
        reg.register_blobs([("e", md5, len(data))])
        return md5

    blob = put(b"x" * 100)
    manifests = [put(Manifest([ManifestEntry(f"{tag}.bin", hex_to_b64(blob), 100)]).to_bytes()) for tag in "ab"]
    reg.commit(CommitRequest("e", "p", "c", "dataset", manifests[0], aliases=("best",)))
    wire = Wire(reg.engine, tmp_path / "libpq.trace")
    try:
        yield reg, wire, {"blob": blob, "manifests": manifests}
    finally:
        wire.close()
        reg.close()


def test_the_calls_a_fleet_makes_most_are_one_or_two_round_trips(traced: tuple[RegistryCore, Wire, dict[str, Any]]) -> None:
    reg, wire, data = traced
    reg.resolve("e", "p", "c", "latest")  # a pooled connection exists (opening one is not a call's cost)
    # resolve by alias, by index, by digest: the version with its collection's path, then its aliases and tags
    assert wire.round_trips(lambda: reg.resolve("e", "p", "c", "latest")) == 2
    assert wire.round_trips(lambda: reg.resolve("e", "p", "c", "best")) == 2
    assert wire.round_trips(lambda: reg.resolve("e", "p", "c", "v0")) == 2
    assert wire.round_trips(lambda: reg.list_versions("e", "p", "c")) == 2
    assert wire.round_trips(lambda: reg.missing_blobs("e", [data["blob"], "0" * 32])) == 1
    # no BEGIN/COMMIT around reads, no ping of a connection in steady use
    sent = [text for kind, text in wire.messages(lambda: reg.resolve("e", "p", "c", "latest")) if kind == "Query"]
    assert sent == []
    assert reg.resolve("e", "p", "c", "best").index == 0


def test_the_project_listing_is_a_constant_number_of_round_trips(traced: tuple[RegistryCore, Wire, dict[str, Any]]) -> None:
    reg, wire, data = traced
    reg.list_project("e", "p")
    one = wire.round_trips(lambda: reg.list_project("e", "p"))
    for i in range(5):
        reg.commit(CommitRequest("e", "p", f"more{i}", "dataset", data["manifests"][i % 2]))
    cols, versions = reg.list_project("e", "p")
    assert len(cols) == 6 and len(versions) == 6
    assert wire.round_trips(lambda: reg.list_project("e", "p")) == one <= 7


def test_a_commit_into_an_existing_collection_skips_the_create_path(traced: tuple[RegistryCore, Wire, dict[str, Any]]) -> None:
    reg, wire, data = traced
    msgs = wire.messages(lambda: reg.commit(CommitRequest("e", "p", "c", "dataset", data["manifests"][1])))
    trips = sum(1 for kind, _ in msgs if kind in ("Sync", "Query"))
    statements = " ".join(text for _, text in msgs)
    assert "INSERT INTO entities" not in statements and "INSERT INTO projects" not in statements
    assert "DELETE FROM aliases" not in statements  # the alias moves in one upsert
    # blob check (1); BEGIN, the locked collection, latest, next index, TTL default, the version,
    # the alias, the record and its aliases (2), COMMIT
    assert trips <= 11
    rec = reg.resolve("e", "p", "c", "latest")
    assert rec.index == 1 and rec.aliases == ("latest",)
    assert reg.resolve("e", "p", "c", "best").index == 0


def test_an_idle_connection_the_database_dropped_is_replaced_before_use(
        postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """No pre-ping of every checkout, but a connection idle past IDLE_PING_SECONDS is pinged:
    one the database closed meanwhile (a restart, an idle timeout) costs the call nothing."""
    monkeypatch.setattr(core_mod, "IDLE_PING_SECONDS", 0.0)
    url = postgres.new_database()
    reg = RegistryCore(url, LocalBlobBackend(tmp_path / "blobs"))
    try:
        reg.create_project("e", "p")
        assert reg.list_projects("e") == ["p"]
        with reg.engine.connect() as conn:
            dbname = conn.exec_driver_sql("SELECT current_database()").scalar()
        killer = sa.create_engine(core_mod.normalise_db_url(url), poolclass=sa.NullPool)
        with killer.connect() as conn:
            killed = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %(db)s AND pid <> pg_backend_pid()", {"db": dbname}).scalar()
        killer.dispose()
        assert killed >= 1
        assert reg.list_projects("e") == ["p"]  # the dead pooled connection was found and replaced
    finally:
        reg.close()
