"""Project listings kept encoded per collection and checked by their stamps (server/listing.py).

Two registry cores on one database stand for two server workers: one lists (and keeps the
parts), the other changes the registry.  After every kind of change the listing the first one
serves must equal a fresh one, and exactly the collections whose listing changed are rebuilt;
on SQLite and on PostgreSQL.  On PostgreSQL a listing nothing changed costs one round trip;
a client that sends its ETag back gets ``304 Not Modified`` until something changes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.registry import LocalBlobBackend, RegistryCore
from client.store.base import CommitRequest
from client.store.wire import record_to_json
from server.listing import ListingCache, encode
from tests.server_fixtures import PostgresCluster, ServerFactory, postgres  # noqa: F401  (fixture)
from tests.test_registry_roundtrips import Wire


class Registry:
    """Two cores on one database (two workers), a blob directory, and what was committed."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.tmp = tmp
        self.blobs = LocalBlobBackend(tmp / "blobs")
        self.lister = RegistryCore(url, self.blobs)
        self.writer = RegistryCore(url, self.blobs)
        self.cache = ListingCache(self.lister)
        data = self.put(b"d" * 10)
        self.manifests = [self.put(Manifest([ManifestEntry(f"{n}.bin", hex_to_b64(data), 10)]).to_bytes())
                          for n in range(4)]

    def put(self, data: bytes) -> str:
        md5 = md5_bytes(data)
        (self.tmp / md5).write_bytes(data)
        self.blobs.put_file("e", md5, self.tmp / md5)
        self.writer.register_blobs([("e", md5, len(data))])
        return md5

    def commit(self, project: str, collection: str, manifest: int, **kw: Any) -> str:
        req = CommitRequest("e", project, collection, kw.pop("type", "dataset"), self.manifests[manifest], **kw)
        return self.writer.commit(req)[0].id

    def fresh(self, project: str) -> Any:
        """The listing built from scratch, as the route served it before it kept parts."""
        cols, versions = self.writer.list_project("e", project)
        return json.loads(encode({"collections": [record_to_json(c) for c in cols],
                                  "versions": [record_to_json(v) for v in versions]}))

    def stamps(self, project: str) -> dict[int, int]:
        return {p.id: p.stamp for p in self.lister.list_project_parts("e", project)}

    def rebuilt(self, project: str, known: dict[int, int]) -> set[str]:
        """The collections whose part a worker holding ``known`` has to build."""
        return {p.part.collection.name for p in self.lister.list_project_parts("e", project, known) if p.part}

    def close(self) -> None:
        self.lister.close()
        self.writer.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    url = (f"sqlite:///{tmp_path / 'registry.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    reg = Registry(url, tmp_path)
    try:
        yield reg
    finally:
        reg.close()


def test_a_kept_listing_follows_every_kind_of_change(registry: Registry) -> None:
    reg, w = registry, registry.writer
    reg.writer.create_run("e", "p", "r1")
    reg.commit("p", "data", 0)
    v1 = reg.commit("p", "data", 1, run_id="r1", aliases=("best",))
    other = reg.commit("p", "other", 0, aliases=("keep",))
    reg.commit("p", "quiet", 2)  # never changes: never rebuilt
    link = w.link_version(v1, "e", "q", "reg").id  # a portfolio in another project
    state: dict[str, str] = {}

    def new_collection_with_ttl() -> None:
        state["ttl"] = reg.commit("p", "short", 3, ttl_seconds=60)

    # (what changes, the collections of p and of q whose part must be rebuilt); each shows in
    # the listing of the project(s) of those collections
    changes: list[tuple[Callable[[], object], set[str], set[str]]] = [
        (lambda: reg.commit("p", "data", 2), {"data"}, set()),  # a new version moves latest
        (lambda: reg.commit("p", "data", 2, aliases=("same",), tags=("t",)), {"data"}, set()),  # same digest
        (new_collection_with_ttl, {"short"}, set()),
        (lambda: w.update_version(v1, metadata={"k": 1}), {"data"}, set()),
        (lambda: w.update_version(v1, description="about v1"), {"data"}, set()),
        (lambda: w.update_version(v1, ttl_seconds=10 ** 6), {"data"}, set()),
        (lambda: w.update_version(v1, aliases=["best", "gold"]), {"data"}, set()),
        (lambda: w.update_version(v1, tags=["x", "y"]), {"data"}, set()),
        (lambda: w.link_version(v1, "e", "q", "reg", aliases=("prod",)), set(), {"reg"}),  # an alias on a link
        (lambda: w.link_version(other, "e", "q", "reg"), set(), {"reg"}),  # a new link
        (lambda: w.update_collection("e", "p", "data", description="described"), {"data"}, set()),
        (lambda: w.update_collection("e", "p", "data", tags=["ctag"]), {"data"}, set()),
        (lambda: w.update_collection("e", "p", "data", name="renamed"), {"renamed"}, {"reg"}),  # links show it
        (lambda: w.update_collection("e", "p", "renamed", type="model"), {"renamed"}, {"reg"}),
        (lambda: w.delete_run("e", "p", "r1"), {"renamed"}, {"reg"}),  # logged_by_run goes, on links too
        (lambda: w.unlink_version(link), set(), {"reg"}),
        (lambda: w.delete_version(other, delete_aliases=True), {"other"}, {"reg"}),  # its link goes with it
        (lambda: w.gc_expired(now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)), {"short"}, set()),
        (lambda: w.link_version(v1, "e", "q", "reg"), set(), {"reg"}),
        (lambda: w.delete_collection("e", "p", "renamed"), set(), {"reg"}),  # gone from p, its link from q
        (lambda: reg.commit("p", "renamed", 0), {"renamed"}, set()),  # a new collection of an old name
    ]
    listed = {proj: reg.cache.listing("e", proj).body for proj in "pq"}
    for i, (change, in_p, in_q) in enumerate(changes):
        known = {proj: reg.stamps(proj) for proj in "pq"}
        change()
        assert (reg.rebuilt("p", known["p"]), reg.rebuilt("q", known["q"])) == (in_p, in_q), i
        for proj in "pq":
            now = reg.cache.listing("e", proj).body
            assert json.loads(now) == reg.fresh(proj), (i, proj)
            if {"p": in_p, "q": in_q}[proj] or (proj == "p" and i == len(changes) - 2):  # or a collection went
                assert now != listed[proj], (i, proj)  # the change shows
            listed[proj] = now
    assert "quiet" in {c["name"] for c in json.loads(listed["p"])["collections"]}


def test_a_listing_nothing_changed_is_one_round_trip(postgres: PostgresCluster, tmp_path: Path) -> None:  # noqa: F811
    reg = Registry(postgres.new_database(), tmp_path)
    try:
        for n in range(30):
            reg.commit("p", f"c{n:02d}", n % 2)
            reg.commit("p", f"c{n:02d}", 2 + n % 2, aliases=("best",), tags=("t",))
        wire = Wire(reg.lister.engine, tmp_path / "libpq.trace")
        try:
            first = wire.round_trips(lambda: reg.cache.listing("e", "p"))
            assert first == 3  # nothing kept yet: the collections, the versions, their names
            again = wire.round_trips(lambda: reg.cache.listing("e", "p"))
            assert again == 1  # the stamps only
            known = reg.stamps("p")
            reg.commit("p", "c07", 0)
            assert reg.rebuilt("p", known) == {"c07"}
            assert wire.round_trips(lambda: reg.cache.listing("e", "p")) == 3  # c07's part only
            assert json.loads(reg.cache.listing("e", "p").body) == reg.fresh("p")
        finally:
            wire.close()
    finally:
        reg.close()


def _listing_answers(url: str) -> dict[str, float]:
    """The server's project-listing answers so far, by status (all workers: /metrics sums them)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in fam.samples:
            if sample.name == "artifactfs_http_requests_total" and sample.labels["route"].endswith("/listing"):
                out[sample.labels["status"]] = out.get(sample.labels["status"], 0) + sample.value
    return out


def test_two_server_workers_list_what_the_database_holds(tmp_path: Path) -> None:
    """A real server with two workers (each its own kept parts): every listing, whichever
    worker serves it, shows the changes another process committed; a client that sends the
    ETag back gets 304 from either worker while nothing changed, and the new listing after."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url, tmp_path)
    factory = ServerFactory(url, str(tmp_path / "blobs"), tmp_path)
    try:
        key = factory.user("u", teams=("e",))
        server = factory.start(workers=2)
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as http:
            def listing(etag: str | None = None) -> httpx.Response:
                r = http.get("/api/v1/entities/e/projects/p/listing", headers={"if-none-match": etag} if etag else {})
                assert r.status_code in (200, 304), r.text
                return r

            etag = None
            for step in range(6):
                reg.commit("p", f"c{step % 3}", step % 4, aliases=(f"a{step}",))
                changed = listing(etag)  # the ETag of before the commit
                assert changed.status_code == 200 and changed.json() == reg.fresh("p"), step
                assert changed.headers["etag"] != etag
                etag = changed.headers["etag"]
                for _ in range(8):  # enough to reach both workers, each already holding parts
                    assert listing().json() == reg.fresh("p"), step
                    again = listing(etag)
                    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag), step
    finally:
        factory.stop_all()
        reg.close()


def test_the_http_store_keeps_the_listing_and_revalidates_it(tmp_path: Path) -> None:
    from client.store.http import HttpStore

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url, tmp_path)
    factory = ServerFactory(url, str(tmp_path / "blobs"), tmp_path)
    try:
        key = factory.user("u", teams=("e",))
        server = factory.start(workers=1)
        store = HttpStore(server.url, key)
        reg.commit("p", "c", 0)
        first = store.list_project("e", "p")
        first[1].clear()  # the caller's copy: nothing kept changes
        second = store.list_project("e", "p")
        assert second == reg.writer.list_project("e", "p") and len(second[1]) == 1
        assert _listing_answers(server.url) == {"200": 1, "304": 1}
        reg.commit("p", "c", 1)  # a change: the kept listing is not served
        third = store.list_project("e", "p")
        assert third == reg.writer.list_project("e", "p") and [v.index for v in third[1]] == [0, 1]
        assert _listing_answers(server.url) == {"200": 2, "304": 1}
    finally:
        factory.stop_all()
        reg.close()


def test_the_kept_parts_stay_within_their_byte_budget(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    try:
        for proj in ("p", "q", "r"):
            reg.commit(proj, "c", 0)
        size = len(reg.cache.listing("e", "p").body)
        cache = ListingCache(reg.lister, max_bytes=2 * size)  # about two projects' parts
        for proj in ("p", "q", "r", "q"):
            assert json.loads(cache.listing("e", proj).body) == reg.fresh(proj)
        assert cache.kept() == [("e", "r"), ("e", "q")]  # p, listed least recently, went
        assert ListingCache(reg.lister, max_bytes=size // 4).listing("e", "p").body == reg.cache.listing("e", "p").body
    finally:
        reg.close()


def test_more_parts_to_build_than_a_batch_are_built_from_the_whole_project(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    try:
        for n in range(503):
            reg.commit("p", f"c{n:03d}", n % 4, aliases=(f"a{n % 3}",))
        reg.commit("other", "c000", 0)  # another project's versions are not listed
        cols, versions = reg.lister.list_project("e", "p")  # 503 to build: the project-wide queries
        assert len(cols) == 503 and cols == [reg.writer.get_collection("e", "p", c.name) for c in cols]
        assert versions == [v for c in cols for v in reg.writer.list_versions("e", "p", c.name)]
        known = {p.id: p.stamp for p in reg.lister.list_project_parts("e", "p")}
        reg.commit("p", "c007", 1)
        assert reg.rebuilt("p", known) == {"c007"}  # one to build: by its id
        assert json.loads(reg.cache.listing("e", "p").body) == reg.fresh("p")
    finally:
        reg.close()
