"""The registry rules, through the Store protocol on the embedded store (real SQLite, real
blob directory).  The server's tests run the same rules over HTTP and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from client.errors import ConflictError, InvalidNameError, MissingBlobError, NotFoundError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest
from client.store.local import LocalStore
from tests.util import commit_files, upload_bytes


def test_versions_are_gapless_and_latest_moves(local_store, tmp_path):
    recs = [commit_files(local_store, tmp_path, {"f.txt": f"content {i}".encode()})[0] for i in range(3)]
    assert [r.index for r in recs] == [0, 1, 2]
    assert local_store.resolve("ent", "proj", "ds", "latest").index == 2
    assert local_store.resolve("ent", "proj", "ds", "v1").id == recs[1].id
    assert "latest" not in local_store.resolve("ent", "proj", "ds", "v0").aliases
    assert [v.index for v in local_store.list_versions("ent", "proj", "ds")] == [0, 1, 2]


def test_same_digest_is_a_noop_that_adds_aliases_and_tags(local_store, tmp_path):
    v0, created = commit_files(local_store, tmp_path, {"a": b"1"})
    assert created
    again, created = commit_files(local_store, tmp_path, {"a": b"1"}, aliases=("prod",), tags=("gold",))
    assert not created and again.id == v0.id and again.index == 0
    assert set(again.aliases) == {"latest", "prod"} and again.tags == ("gold",)
    assert len(local_store.list_versions("ent", "proj", "ds")) == 1


def test_aliases_are_unique_within_a_collection(local_store, tmp_path):
    v0, _ = commit_files(local_store, tmp_path, {"a": b"1"}, aliases=("best",))
    v1, _ = commit_files(local_store, tmp_path, {"a": b"2"}, aliases=("best",))
    assert local_store.resolve("ent", "proj", "ds", "best").id == v1.id
    assert "best" not in local_store.get_version(v0.id).aliases
    # same alias in another collection is independent
    other, _ = commit_files(local_store, tmp_path, {"a": b"1"}, collection="other", aliases=("best",))
    assert local_store.resolve("ent", "proj", "ds", "best").id == v1.id
    assert local_store.resolve("ent", "proj", "other", "best").id == other.id


def test_reserved_and_malformed_names_are_refused(local_store, tmp_path):
    with pytest.raises(InvalidNameError, match="reserved"):
        commit_files(local_store, tmp_path, {"a": b"1"}, aliases=("v3",))
    with pytest.raises(InvalidNameError):
        commit_files(local_store, tmp_path, {"a": b"1"}, collection="bad/name")
    with pytest.raises(InvalidNameError):
        commit_files(local_store, tmp_path, {"a": b"1"}, tags=("no/slash",))
    with pytest.raises(InvalidNameError, match="100"):
        commit_files(local_store, tmp_path, {"a": b"1"}, metadata={str(i): i for i in range(101)})
    with pytest.raises(NotFoundError):
        local_store.resolve("ent", "proj", "ds", "latest")  # nothing was created


def test_type_of_a_collection_is_fixed(local_store, tmp_path):
    commit_files(local_store, tmp_path, {"a": b"1"}, type="dataset")
    with pytest.raises(ConflictError, match="type 'dataset'"):
        commit_files(local_store, tmp_path, {"a": b"2"}, type="model")


def test_commit_refuses_content_that_was_never_uploaded(local_store, tmp_path):
    m = Manifest([ManifestEntry("ghost.bin", hex_to_b64(md5_bytes(b"never uploaded")), 14)])
    mmd5 = upload_bytes(local_store, "ent", m.to_bytes(), tmp_path)
    with pytest.raises(MissingBlobError, match="never uploaded"):
        local_store.commit(CommitRequest("ent", "proj", "ds", "dataset", mmd5))
    with pytest.raises(NotFoundError):
        local_store.get_collection("ent", "proj", "ds")


def test_commit_refuses_a_manifest_with_traversal(local_store, tmp_path):
    data = b'{"version": 1, "contents": {"../../escape": {"digest": "%s", "size": 1}}}' % hex_to_b64(
        upload_bytes(local_store, "ent", b"x", tmp_path)).encode()
    mmd5 = upload_bytes(local_store, "ent", data, tmp_path)
    with pytest.raises(ValueError, match="climb out"):
        local_store.commit(CommitRequest("ent", "proj", "ds", "dataset", mmd5))


def test_blob_existence_is_scoped_per_entity(local_store, tmp_path):
    md5 = upload_bytes(local_store, "alice", b"secret", tmp_path)
    assert local_store.missing_blobs("alice", [md5]) == set()
    assert local_store.missing_blobs("bob", [md5]) == {md5}
    m = Manifest([ManifestEntry("s", hex_to_b64(md5), 6)])
    mmd5 = upload_bytes(local_store, "bob", m.to_bytes(), tmp_path)
    with pytest.raises(MissingBlobError):
        local_store.commit(CommitRequest("bob", "p", "steal", "dataset", mmd5))


def test_upload_with_wrong_md5_is_refused(local_store, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"actual bytes")
    with pytest.raises(ValueError, match="md5"):
        local_store.put_blob("ent", md5_bytes(b"declared other bytes"), src, 12)
    assert local_store.missing_blobs("ent", [md5_bytes(b"declared other bytes")])


def test_update_and_delete_rules(local_store, tmp_path):
    v0, _ = commit_files(local_store, tmp_path, {"a": b"1"})
    v1, _ = commit_files(local_store, tmp_path, {"a": b"2"}, aliases=("best",))
    upd = local_store.update_version(v0.id, aliases=["stable"], tags=["t"], metadata={"acc": 0.9},
                                     description="first", ttl_seconds=3600)
    assert upd.aliases == ("stable",) and upd.tags == ("t",) and upd.metadata == {"acc": 0.9}
    assert upd.description == "first" and upd.ttl_seconds == 3600
    with pytest.raises(ConflictError, match="delete_aliases"):
        local_store.delete_version(v1.id)
    local_store.delete_version(v1.id, delete_aliases=True)
    assert local_store.resolve("ent", "proj", "ds", "latest").id == v0.id  # latest falls back
    with pytest.raises(NotFoundError):
        local_store.resolve("ent", "proj", "ds", "v1")
    v2, _ = commit_files(local_store, tmp_path, {"a": b"3"})
    assert v2.index == 2  # indices are never reused


def test_runs_and_lineage(local_store, tmp_path):
    run = local_store.create_run("ent", "proj", "run1", job_type="train", config={"lr": 0.1})
    assert run.path == "ent/proj/run1" and run.state == "running"
    v0, _ = commit_files(local_store, tmp_path, {"a": b"1"}, run_id="run1")
    assert v0.logged_by_run == "ent/proj/run1"
    reader = local_store.create_run("ent", "proj", "run2", job_type="eval")
    local_store.record_use("ent", "proj", "run2", v0.id, use_as="train-data")
    assert [v.id for v in local_store.versions_logged_by("ent", "proj", "run1")] == [v0.id]
    assert [v.id for v in local_store.versions_used_by("ent", "proj", "run2")] == [v0.id]
    assert [r.id for r in local_store.runs_using(v0.id)] == [reader.id]
    local_store.finish_run("ent", "proj", "run2")
    assert local_store.get_run("ent", "proj", "run2").state == "finished"


def test_listing(local_store, tmp_path):
    commit_files(local_store, tmp_path, {"a": b"1"}, collection="ds1")
    commit_files(local_store, tmp_path, {"a": b"1"}, collection="m1", type="model")
    commit_files(local_store, tmp_path, {"a": b"1"}, entity="other", project="p2")
    assert local_store.list_entities() == ["ent", "other"]
    assert local_store.list_projects("ent") == ["proj"]
    assert [c.name for c in local_store.list_collections("ent", "proj")] == ["ds1", "m1"]
    assert [c.name for c in local_store.list_collections("ent", "proj", type="model")] == ["m1"]
    assert local_store.list_types("ent", "proj") == ["dataset", "model"]
    assert local_store.get_collection("ent", "proj", "ds1").aliases == {"latest": 0}


def _commit_worker(store_dir: str, tmp_dir: str, i: int, q) -> None:
    store = LocalStore(store_dir)
    rec, created = commit_files(store, Path(tmp_dir), {"f.bin": f"writer {i}".encode()}, aliases=(f"w{i}",))
    q.put((rec.index, created))


def test_concurrent_writers_get_gapless_versions(tmp_path):
    """8 processes commit into one collection at once: v0..v7, no gaps, no duplicates."""
    store_dir = tmp_path / "shared"
    LocalStore(store_dir).close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_commit_worker, args=(str(store_dir), str(tmp_path), i, q)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [q.get(timeout=5) for _ in procs]
    assert sorted(idx for idx, _ in results) == list(range(8))
    assert all(created for _, created in results)
    store = LocalStore(store_dir)
    versions = store.list_versions("ent", "proj", "ds")
    assert [v.index for v in versions] == list(range(8))
    assert store.resolve("ent", "proj", "ds", "latest").index == 7
    assert sorted(a for v in versions for a in v.aliases if a != "latest") == sorted(f"w{i}" for i in range(8))


def test_link_into_a_registry_portfolio_and_unlink(local_store, tmp_path):
    v0, _ = commit_files(local_store, tmp_path, {"w.pt": b"weights"}, collection="model", type="model")
    link = local_store.link_version(v0.id, "ent", "wandb-registry-model", "resnet", aliases=["production"])
    assert (link.project, link.collection, link.index) == ("wandb-registry-model", "resnet", 0)
    assert link.manifest_md5 == v0.manifest_md5 and link.digest == v0.digest and link.type == "model"
    assert (link.source_collection, link.source_index) == ("model", 0)
    assert set(link.aliases) == {"latest", "production"}
    again = local_store.link_version(v0.id, "ent", "wandb-registry-model", "resnet", aliases=["canary"])
    assert again.id == link.id and "canary" in again.aliases  # linking twice only adds aliases
    resolved = local_store.resolve("ent", "wandb-registry-model", "resnet", "production")
    assert resolved.id == link.id
    with pytest.raises(ConflictError):
        local_store.unlink_version(v0.id)  # not a link
    local_store.unlink_version(link.id)
    with pytest.raises(NotFoundError):
        local_store.resolve("ent", "wandb-registry-model", "resnet", "production")
    assert local_store.resolve("ent", "proj", "model", "v0").id == v0.id  # source untouched


def test_deleting_a_source_removes_its_links(local_store, tmp_path):
    v0, _ = commit_files(local_store, tmp_path, {"w.pt": b"w"}, collection="model", type="model")
    local_store.link_version(v0.id, "ent", "reg", "m", aliases=["prod"])
    local_store.delete_version(v0.id)
    with pytest.raises(NotFoundError):
        local_store.resolve("ent", "reg", "m", "prod")


def test_ttl_inherits_the_entity_default_and_gc_removes_expired(local_store, tmp_path):
    import datetime as dt

    local_store.set_entity_default_ttl("ent", 60.0)
    inherited, _ = commit_files(local_store, tmp_path, {"a": b"1"})
    assert inherited.ttl_seconds == 60.0
    disabled, _ = commit_files(local_store, tmp_path, {"a": b"2"}, ttl_seconds=None)
    assert disabled.ttl_seconds is None
    short, _ = commit_files(local_store, tmp_path, {"a": b"3"}, collection="tmp", ttl_seconds=5.0)
    assert local_store.gc_expired(now=short.created_at + dt.timedelta(seconds=1)) == []
    gone = local_store.gc_expired(now=short.created_at + dt.timedelta(seconds=61))
    assert {g.id for g in gone} == {inherited.id, short.id}
    with pytest.raises(NotFoundError):
        local_store.resolve("ent", "proj", "tmp", "latest")
    assert local_store.resolve("ent", "proj", "ds", "latest").id == disabled.id


def test_create_project_is_idempotent(local_store):
    local_store.create_project("ent", "fresh")
    local_store.create_project("ent", "fresh")
    assert local_store.list_projects("ent") == ["fresh"]
    with pytest.raises(InvalidNameError):
        local_store.create_project("ent", "bad/name")


def test_delete_run_keeps_or_deletes_what_it_logged(local_store, tmp_path):
    local_store.create_run("ent", "proj", "writer")
    v0, _ = commit_files(local_store, tmp_path, {"a": b"1"}, run_id="writer", aliases=("best",))
    link = local_store.link_version(v0.id, "ent", "wandb-registry-model", "m")
    local_store.create_run("ent", "proj", "reader")
    local_store.record_use("ent", "proj", "reader", v0.id)
    assert local_store.delete_run("ent", "proj", "reader") == []
    assert local_store.runs_using(v0.id) == []
    with pytest.raises(NotFoundError):
        local_store.get_run("ent", "proj", "reader")
    local_store.create_run("ent", "proj", "keeper")
    v1, _ = commit_files(local_store, tmp_path, {"a": b"2"}, collection="kept", run_id="keeper")
    local_store.delete_run("ent", "proj", "keeper")
    assert local_store.get_version(v1.id).logged_by_run is None and local_store.get_version(v1.id).state == "COMMITTED"
    gone = local_store.delete_run("ent", "proj", "writer", delete_artifacts=True)
    assert [g.id for g in gone] == [v0.id]  # aliases did not protect it; the link went with it
    assert local_store.get_version(v0.id).state == "DELETED"
    assert local_store.get_version(link.id).state == "DELETED"
    with pytest.raises(NotFoundError):
        local_store.delete_run("ent", "proj", "writer")


def test_update_version_can_go_back_to_the_inherited_ttl(local_store, tmp_path):
    with pytest.raises(NotFoundError):
        local_store.get_entity_default_ttl("nobody")
    local_store.set_entity_default_ttl("ent", 120.0)
    assert local_store.get_entity_default_ttl("ent") == 120.0
    v0, _ = commit_files(local_store, tmp_path, {"a": b"1"}, ttl_seconds=None)
    assert v0.ttl_seconds is None
    assert local_store.update_version(v0.id, ttl_seconds="inherit").ttl_seconds == 120.0
    assert local_store.update_version(v0.id, description="d").ttl_seconds == 120.0  # keep
    assert local_store.update_version(v0.id, ttl_seconds=None).ttl_seconds is None


def test_commit_with_expect_latest_is_a_check_and_set(local_store, tmp_path):
    """CommitRequest.expect_latest: the commit happens only while latest is the named version."""
    from client.errors import LatestMovedError

    with pytest.raises(LatestMovedError):  # "" = no version yet; a made-up id is not latest
        commit_files(local_store, tmp_path, {"a": b"1"}, expect_latest="not-a-version")
    v0, created = commit_files(local_store, tmp_path, {"a": b"1"}, expect_latest="")
    assert created and v0.index == 0
    with pytest.raises(LatestMovedError):
        commit_files(local_store, tmp_path, {"a": b"2"}, expect_latest="")
    v1, created = commit_files(local_store, tmp_path, {"a": b"2"}, expect_latest=v0.id)
    assert created and v1.index == 1
    with pytest.raises(LatestMovedError) as moved:  # a stale base: refused, nothing created
        commit_files(local_store, tmp_path, {"a": b"3"}, expect_latest=v0.id)
    assert isinstance(moved.value, ConflictError)
    assert local_store.resolve("ent", "proj", "ds", "latest").id == v1.id
    assert [v.index for v in local_store.list_versions("ent", "proj", "ds")] in ([0, 1], [1, 0])
