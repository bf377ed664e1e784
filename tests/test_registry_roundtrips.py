"""Round trips to PostgreSQL per registry call (issue 13, bench/load).

On a loaded machine every round trip costs the server two wake-ups (its thread and the
database backend), each waiting for a CPU, so the calls a fleet of mounts makes most are held
to one or two.  Counted on the wire: libpq's trace of every pooled connection, one line per
protocol message; a round trip ends with the client's ``Sync`` (extended protocol) or is one
simple ``Query`` (BEGIN, COMMIT, a ping).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import sqlalchemy as sa

from client.errors import LatestMovedError, ManifestError
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


def test_the_project_listing_is_three_round_trips_whatever_the_data(traced: tuple[RegistryCore, Wire, dict[str, Any]]) -> None:
    """Collections; versions with their run and source paths joined in; the aliases and tags of
    both in one UNION ALL.  Runs, links, tags and more than 500 of anything add none."""
    reg, wire, data = traced
    reg.create_run("e", "p", "r1")
    logged, _ = reg.commit(CommitRequest("e", "p", "c", "dataset", data["manifests"][1], run_id="r1", tags=("t1",)))
    reg.link_version(logged.id, "e", "p", "portfolio", aliases=("prod",))
    reg.update_collection("e", "p", "c", tags=("ctag",))
    for i in range(3):
        reg.commit(CommitRequest("e", "p", f"more{i}", "dataset", data["manifests"][i % 2]))
    cols, versions = reg.list_project("e", "p")
    assert wire.round_trips(lambda: reg.list_project("e", "p")) == 3
    # what it lists is what the per-collection calls say
    assert cols == [reg.get_collection("e", "p", col.name) for col in cols]
    assert versions == [v for col in cols for v in reg.list_versions("e", "p", col.name)]
    by_name = {(v.collection, v.index): v for v in versions}
    assert by_name[("c", 1)].logged_by_run == "e/p/r1" and by_name[("c", 1)].tags == ("t1",)
    link = by_name[("portfolio", 0)]
    assert (link.source_collection, link.source_index, link.aliases) == ("c", 1, ("latest", "prod"))
    assert {c.name: (c.version_count, c.aliases, c.tags) for c in cols}["c"] == (2, {"best": 0, "latest": 1}, ("ctag",))
    # a run deleted without its artifacts: its versions are listed without one, still in three
    reg.delete_run("e", "p", "r1")
    assert wire.round_trips(lambda: reg.list_project("e", "p")) == 3
    assert {(v.collection, v.index): v.logged_by_run for v in reg.list_project("e", "p")[1]}[("c", 1)] is None


def test_a_commit_into_an_existing_collection_is_seven_round_trips(traced: tuple[RegistryCore, Wire, dict[str, Any]]) -> None:
    reg, wire, data = traced
    reg.create_run("e", "p", "r1")
    req = CommitRequest("e", "p", "c", "dataset", data["manifests"][1], aliases=("a1", "a2", "a3"), run_id="r1")
    msgs = wire.messages(lambda: reg.commit(req))
    trips = sum(1 for kind, _ in msgs if kind in ("Sync", "Query"))
    statements = " ".join(text for _, text in msgs)
    assert "INSERT INTO entities" not in statements and "INSERT INTO projects" not in statements
    assert "DELETE FROM aliases" not in statements  # the alias moves in one upsert
    # the blob check; BEGIN; the locked collection with latest, TTL default and run; next index;
    # the version; all its aliases in one upsert; COMMIT.  The record is not read back.
    assert trips == 7
    rec = reg.resolve("e", "p", "c", "latest")
    assert rec.index == 1 and rec.aliases == ("latest", "a1", "a2", "a3") and rec.logged_by_run == "e/p/r1"
    assert reg.resolve("e", "p", "c", "best").index == 0
    # tags are one statement more, however many
    tagged = CommitRequest("e", "p", "c", "dataset", data["manifests"][0], tags=tuple(f"t{i}" for i in range(20)))
    assert wire.round_trips(lambda: reg.commit(tagged)) == 8
    # the same digest as latest: BEGIN, the locked collection, its new listing stamp, the
    # aliases, the tags, the usage, the record (2), COMMIT, after the blob check
    same = CommitRequest("e", "p", "c", "dataset", data["manifests"][0], aliases=("b1", "b2"), tags=("x", "y"),
                         run_id="r1")
    assert wire.round_trips(lambda: reg.commit(same)) == 10
    assert wire.round_trips(lambda: reg.commit(CommitRequest("e", "p", "c", "dataset", data["manifests"][0]))) == 6
    again = reg.resolve("e", "p", "c", "latest")
    assert again.index == 2 and again.aliases == ("latest", "b1", "b2") and len(again.tags) == 22


def test_a_commit_that_waited_for_the_collection_lock_sees_the_latest_its_holder_set(
        traced: tuple[RegistryCore, Wire, dict[str, Any]]) -> None:
    """The collection is locked by the query that also reads latest: a commit that waited for
    the lock must not decide on the latest of before the wait (PostgreSQL READ COMMITTED)."""
    reg, _wire, data = traced
    before = reg.resolve("e", "p", "c", "latest")
    holder_locked, holder_go = threading.Event(), threading.Event()

    @sa.event.listens_for(reg.engine, "after_cursor_execute")
    def _pause(_conn: Any, _cur: Any, statement: str, *_args: Any) -> None:
        if "FOR UPDATE" in statement and threading.current_thread().name == "holder":
            holder_locked.set()
            assert holder_go.wait(30)

    results: dict[str, Any] = {}

    def run(name: str, req: CommitRequest) -> None:
        try:
            results[name] = reg.commit(req)
        except Exception as exc:  # noqa: BLE001 - compared below
            results[name] = exc

    holder = threading.Thread(target=run, name="holder", args=(
        "holder", CommitRequest("e", "p", "c", "dataset", data["manifests"][1])))
    waiter = threading.Thread(target=run, name="waiter", args=(
        "waiter", CommitRequest("e", "p", "c", "dataset", data["manifests"][1], expect_latest=before.id)))
    holder.start()
    try:
        assert holder_locked.wait(30)
        waiter.start()
        # the waiter is blocked on the holder's row lock (autocommit: each look a fresh pg_stat_activity)
        with reg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            deadline = time.monotonic() + 30
            while not conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()").scalar():
                assert waiter.is_alive() and time.monotonic() < deadline, results
                time.sleep(0.02)
    finally:
        holder_go.set()
        holder.join(30)
        if waiter.ident is not None:
            waiter.join(30)
        sa.event.remove(reg.engine, "after_cursor_execute", _pause)
    assert not holder.is_alive() and not waiter.is_alive()
    assert results["holder"][1] is True and results["holder"][0].index == 1
    assert isinstance(results["waiter"], LatestMovedError)
    assert [v.index for v in reg.list_versions("e", "p", "c")] == [0, 1]


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


class CountingBlobs(LocalBlobBackend):
    """The real blob directory, counting how often each blob is opened (a GET on S3)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opens: list[str] = []

    def open(self, entity: str, md5_hex: str) -> BinaryIO:
        self.opens.append(md5_hex)
        return super().open(entity, md5_hex)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[RegistryCore, CountingBlobs]]:
    blobs = CountingBlobs(tmp_path / "blobs")
    url = (f"sqlite:///{tmp_path / 'registry.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    reg = RegistryCore(url, blobs)
    try:
        yield reg, blobs
    finally:
        reg.close()


def _put(reg: RegistryCore, blobs: LocalBlobBackend, tmp: Path, data: bytes) -> str:
    md5 = md5_bytes(data)
    (tmp / md5).write_bytes(data)
    blobs.put_file("e", md5, tmp / md5)
    reg.register_blobs([("e", md5, len(data))])
    return md5


def test_the_record_a_commit_returns_is_the_one_the_registry_reads_back(
        registry: tuple[RegistryCore, CountingBlobs], tmp_path: Path) -> None:
    reg, blobs = registry
    data = _put(reg, blobs, tmp_path, b"y" * 10)
    manifests = [_put(reg, blobs, tmp_path, Manifest([ManifestEntry(f"{n}.bin", hex_to_b64(data), 10)]).to_bytes())
                 for n in "abcd"]
    reg.create_run("e", "p", "run-1")
    reg.set_entity_default_ttl("e", 3600)
    meta = {"k": [1, 2.5, None, {"x": "é"}], "n": 10 ** 20, "f": -0.0, "b": True}
    commits = [
        CommitRequest("e", "p", "c", "dataset", manifests[0], aliases=("zeta", "best", "latest", "best"),
                      tags=("t2", "t1", "t2"), metadata=meta, description="first", run_id="run-1"),
        CommitRequest("e", "p", "c", "dataset", manifests[1], aliases=("best",), ttl_seconds=None),  # takes best
        CommitRequest("e", "p", "c", "dataset", manifests[2], ttl_seconds=7),
        CommitRequest("e", "p", "fresh", "model", manifests[3], run_id="run-1"),  # the create path
        CommitRequest("e", "p", "c", "dataset", manifests[2], aliases=("again",), tags=("t3",), run_id="run-1"),
    ]
    for req in commits:
        rec, _created = reg.commit(req)
        assert rec == reg.get_version(rec.id)
        assert rec.created_at.utcoffset() == reg.get_version(rec.id).created_at.utcoffset() == dt.timedelta(0)
    first = reg.resolve("e", "p", "c", "v0")
    assert (first.aliases, first.tags, first.metadata) == (("zeta",), ("t1", "t2"), meta)
    assert (first.ttl_seconds, first.logged_by_run, first.description) == (3600.0, "e/p/run-1", "first")
    assert reg.resolve("e", "p", "c", "v1").ttl_seconds is None
    assert reg.resolve("e", "p", "c", "latest").aliases == ("latest", "again")


def test_a_commit_reads_its_manifest_once_and_refuses_what_it_refused(
        registry: tuple[RegistryCore, CountingBlobs], tmp_path: Path) -> None:
    reg, blobs = registry
    data = _put(reg, blobs, tmp_path, b"z" * 10)
    good = Manifest([ManifestEntry("a.bin", hex_to_b64(data), 10), ManifestEntry("b.bin", hex_to_b64(data), 10)]).to_bytes()
    md5 = _put(reg, blobs, tmp_path, good)
    blobs.opens.clear()
    reg.commit(CommitRequest("e", "p", "c", "dataset", md5))
    assert blobs.opens == [md5]  # was twice: a pass for UTF-8, then the parse
    # invalid UTF-8 anywhere is the error, even after an entry that is refused for another reason
    huge = good.replace(b'"size": 10}', b'"size": %d}' % (1 << 63), 1)
    refused = {
        "not valid UTF-8": [good.replace(b"b.bin", b"b\xff.bin"), huge.replace(b"b.bin", b"b\xff.bin"),
                            good + b" \xff", good[:-2] + b"\xc3", huge + b"x" * 10_000 + b"\xe2\x82"],
        "after its closing brace": [good + b"garbage"],
        "sizes are 0 to 2": [huge],
        "truncated": [good[:-4]],
    }
    for message, manifests in refused.items():
        for bad in manifests:
            bad_md5 = _put(reg, blobs, tmp_path, bad)
            blobs.opens.clear()
            with pytest.raises(ManifestError, match=message):
                reg.commit(CommitRequest("e", "p", "c", "dataset", bad_md5))
            assert blobs.opens == [bad_md5]
    assert [v.index for v in reg.list_versions("e", "p", "c")] == [0]
