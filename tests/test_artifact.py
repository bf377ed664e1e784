"""Artifact: every method and attribute of the W&B reference, on a real embedded store."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

import client
from client.references import is_uri_digest
from client.errors import (ArtifactFinalizedError, ArtifactFSError, ArtifactNotLoggedError, ConflictError,
                           InvalidNameError, InvalidPathError, NotFoundError)

try:
    from _sdk_fixtures import md5hex, sdk_env, tree_of, write_tree  # noqa: F401
except ImportError:  # tests/ became a package
    from tests._sdk_fixtures import md5hex, sdk_env, tree_of, write_tree  # noqa: F401

pytestmark = pytest.mark.usefixtures("sdk_env")


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def wandb_digest(files: dict[str, bytes]) -> str:
    """The W&B manifest-v1 artifact digest, written out independently of client.manifest."""
    h = hashlib.md5(b"wandb-artifact-manifest-v1\n")
    for path in sorted(files):
        h.update(f"{path}:{b64md5(files[path])}\n".encode())
    return h.hexdigest()


def logged(tmp: Path, files: dict[str, bytes | str], name: str = "ds", **kw: object) -> client.Artifact:
    src = write_tree(tmp / f"src-{name}-{len(os.listdir(tmp))}", files)
    art = client.Artifact(name, "dataset", **kw)  # type: ignore[arg-type]
    art.add_dir(src)
    with client.init(project="proj", reinit=True) as run:
        run.log_artifact(art)
    return art


# -- construction and drafts ---------------------------------------------------------------------------
def test_constructor_validates_name_type_and_metadata() -> None:
    with pytest.raises(ValueError):
        client.Artifact("bad/name", "dataset")
    with pytest.raises(ValueError):  # W&B reserves wandb-* types ("my type" is fine there and here)
        client.Artifact("ok", "wandb-history")
    with pytest.raises(ValueError):
        client.Artifact("ok", "dataset", metadata={f"k{i}": i for i in range(101)})
    with pytest.warns(DeprecationWarning):  # W&B 0.31 ignores use_as here too: art.use_as is None
        art = client.Artifact("ok", "dataset", description="d", metadata={"a": 1}, incremental=True, use_as="x")
    assert (art.name, art.type, art.description, art.metadata, art.use_as) == ("ok", "dataset", "d", {"a": 1}, None)
    assert art.is_draft() and art.state == "PENDING" and art.id is None
    with pytest.raises(ValueError):
        art.metadata = {f"k{i}": i for i in range(101)}


def test_draft_only_attributes_raise_not_logged() -> None:
    art = client.Artifact("ok", "dataset")
    for attr in ("entity", "project", "version", "qualified_name", "created_at", "updated_at", "commit_hash",
                 "url", "collection", "source_entity", "source_project", "source_collection", "source_name",
                 "source_qualified_name", "source_version"):
        with pytest.raises(ArtifactNotLoggedError):
            getattr(art, attr)
    for call in (lambda: art.get_entry("x"), lambda: art.files(), lambda: art.file(), lambda: art.download(),
                 lambda: art.checkout(), lambda: art.verify(), lambda: art.new_draft(), lambda: art.delete(),
                 lambda: art.logged_by(), lambda: art.used_by(), lambda: art.json_encode(), lambda: art.wait()):
        with pytest.raises(ArtifactNotLoggedError):
            call()


def test_add_file_names_digest_and_conflicts(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "a.txt"
    f.write_bytes(b"alpha")
    art = client.Artifact("ds", "dataset")
    e = art.add_file(f)
    assert (e.path, e.digest, e.size) == ("a.txt", b64md5(b"alpha"), 5)
    assert art.add_file(f, name="dir/b.txt").path == "dir/b.txt"
    assert art.add_file(f) is art.manifest.entries["a.txt"]  # same content again: no error
    g = sdk_env["tmp"] / "g.txt"
    g.write_bytes(b"gamma")
    with pytest.raises(ValueError):
        art.add_file(g, name="a.txt")
    assert art.add_file(g, name="a.txt", overwrite=True).digest == b64md5(b"gamma")
    with pytest.raises(ValueError):
        art.add_file(f, policy="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidPathError):
        art.add_file(f, name="../escape")
    with pytest.raises(FileNotFoundError):
        art.add_file(sdk_env["tmp"] / "nope")
    assert art.get_added_local_path_name(str(f)) == "dir/b.txt"  # the latest name it was added under
    assert art.get_added_local_path_name(str(g)) == "a.txt"
    assert art.get_added_local_path_name("/not/added") is None


def test_add_file_is_tmp_renames_deterministically(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "data.tar.gz"
    f.write_bytes(b"tmpfile")
    e = client.Artifact("ds", "dataset").add_file(f, name="sub/data.tar.gz", is_tmp=True)
    assert e.path == f"sub/{md5hex(b'tmpfile')[:20]}.tar.gz"


def test_mutable_policy_protects_upload_and_fills_cache(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "m.txt"
    f.write_bytes(b"original")
    art = client.Artifact("ds", "dataset")
    art.add_file(f)
    cached = sdk_env["cache"] / "objects" / md5hex(b"original")[:2] / md5hex(b"original")[2:]
    assert cached.read_bytes() == b"original"
    f.write_bytes(b"changed after add")
    art.save()
    out = Path(art.download(sdk_env["tmp"] / "out"))
    assert (out / "m.txt").read_bytes() == b"original"


def test_skip_cache_and_immutable_policy(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "s.txt"
    f.write_bytes(b"skip me")
    key = md5hex(b"skip me")
    art = client.Artifact("ds", "dataset")
    e = art.add_file(f, skip_cache=True)
    assert not (sdk_env["cache"] / "objects" / key[:2] / key[2:]).exists()
    assert e.local_path != str(f)  # a private staged copy
    g = sdk_env["tmp"] / "i.txt"
    g.write_bytes(b"immutable")
    e2 = art.add_file(g, policy="immutable")
    assert e2.local_path == str(g)
    art.save()
    ikey = md5hex(b"immutable")
    assert (sdk_env["cache"] / "objects" / ikey[:2] / ikey[2:]).exists()  # cached after upload
    assert not (sdk_env["cache"] / "objects" / key[:2] / key[2:]).exists()


def test_add_dir_prefix_nesting_and_conflicts(sdk_env: dict[str, Path]) -> None:
    files = {f"d{i % 3}/f{i}.bin": os.urandom(100 + i) for i in range(40)}
    src = write_tree(sdk_env["tmp"] / "tree", files)
    art = client.Artifact("ds", "dataset")
    art.add_dir(src, name="data")
    assert {e.path: e.digest for e in art.manifest} == {f"data/{k}": b64md5(v) for k, v in files.items()}
    assert art.digest == wandb_digest({f"data/{k}": v for k, v in files.items()})
    assert art.size == sum(len(v) for v in files.values()) and art.file_count == 40
    other = write_tree(sdk_env["tmp"] / "other", {"d0/f0.bin": b"different"})
    with pytest.raises(ValueError):
        art.add_dir(other, name="data")
    art.add_dir(other, name="data", merge=True)
    assert art.manifest.entries["data/d0/f0.bin"].digest == b64md5(b"different")
    with pytest.raises(ValueError):
        art.add_dir(sdk_env["tmp"] / "missing")
    with pytest.raises(ValueError):
        art.add_dir(src, policy="never")  # type: ignore[arg-type]


def test_new_file_modes_and_encoding() -> None:
    art = client.Artifact("ds", "dataset")
    with art.new_file("notes/hello.txt") as f:
        f.write("héllo")
    assert art.manifest.entries["notes/hello.txt"].digest == b64md5("héllo".encode())
    with pytest.raises(ValueError):
        with art.new_file("notes/hello.txt") as f:
            f.write("again")
    with art.new_file("notes/hello.txt", mode="w", encoding="latin-1") as f:
        f.write("héllo")
    assert art.manifest.entries["notes/hello.txt"].digest == b64md5("héllo".encode("latin-1"))
    with art.new_file("raw.bin", mode="xb") as f:
        f.write(b"\x00\x01")
    art.save()
    assert art.get_entry("raw.bin").size == 2


def test_remove_file_dir_entry_and_missing(sdk_env: dict[str, Path]) -> None:
    src = write_tree(sdk_env["tmp"] / "t", {"a": "1", "d/b": "2", "d/e/c": "3", "dd": "4"})
    art = client.Artifact("ds", "dataset")
    art.add_dir(src)
    art.remove("a")
    art.remove("d")
    assert sorted(art.manifest.entries) == ["dd"]
    art.remove(art.manifest.entries["dd"])
    assert len(art.manifest) == 0
    with pytest.raises(FileNotFoundError):
        art.remove("d")


def test_finalize_blocks_every_mutation(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "x"
    f.write_text("x")
    art = client.Artifact("ds", "dataset")
    art.add_file(f)
    art.finalize()
    calls = [lambda: art.add_file(f, name="y"), lambda: art.add_dir(sdk_env["tmp"]), lambda: art.remove("x"),
             lambda: art.add_reference(f.as_uri()), lambda: art.new_file("z").__enter__(), lambda: art.add(1, "o")]
    for call in calls:
        with pytest.raises(ArtifactFinalizedError):
            call()
    assert art.is_draft()


# -- logging and attributes -------------------------------------------------------------------------------
def test_logged_attributes(sdk_env: dict[str, Path]) -> None:
    art = logged(sdk_env["tmp"], {"a.txt": "A", "b/c.txt": "C"}, description="desc", metadata={"m": 1})
    assert not art.is_draft() and art.state == "COMMITTED"
    assert art.name == "ds:v0" and art.version == "v0"
    assert (art.entity, art.project) == ("alice", "proj")
    assert art.qualified_name == "alice/proj/ds:v0"
    assert art.source_name == "ds:v0" and art.source_version == "v0"
    assert art.source_qualified_name == "alice/proj/ds:v0"
    assert (art.source_entity, art.source_project) == ("alice", "proj")
    assert art.collection.name == "ds" and art.source_collection.type == "dataset"
    assert art.aliases == ["latest"] and art.tags == []
    assert art.description == "desc" and art.metadata == {"m": 1} and art.type == "dataset"
    assert isinstance(art.created_at, dt.datetime) and art.updated_at >= art.created_at
    assert art.ttl is None and isinstance(art.id, str) and art.id
    assert len(art.commit_hash) == 32 and art.commit_hash != art.digest
    assert art.digest == wandb_digest({"a.txt": b"A", "b/c.txt": b"C"})
    assert art.size == 2 and art.file_count == 2
    assert art.url.endswith("/alice/proj/artifacts/dataset/ds/v0")
    enc = art.json_encode()
    assert enc["_type"] == "artifactVersion" and enc["id"] == art.id and enc["version"] == "v0"
    assert art.wait(timeout=1) is art
    with pytest.raises(AttributeError):
        art.version = "v9"  # type: ignore[misc]


def test_relog_same_digest_is_noop_adding_aliases(sdk_env: dict[str, Path]) -> None:
    first = logged(sdk_env["tmp"], {"a": "same"})
    src = write_tree(sdk_env["tmp"] / "again", {"a": "same"})
    second = client.Artifact("ds", "dataset")
    second.add_dir(src)
    with client.init(project="proj", reinit=True) as run:
        run.log_artifact(second, aliases=["best"])
    assert second.version == "v0" and second.id == first.id and second.bytes_uploaded == 0
    assert set(second.aliases) == {"latest", "best"}


def test_save_persists_aliases_tags_metadata_description_ttl(sdk_env: dict[str, Path]) -> None:
    art = logged(sdk_env["tmp"], {"a": "1"})
    art.aliases.append("prod")
    art.tags = ["nightly"]
    art.metadata = {"acc": 0.9}
    art.description = "new"
    art.ttl = dt.timedelta(days=2)
    art.save()
    again = client.Api().artifact("proj/ds:prod")
    assert again.id == art.id and set(again.aliases) == {"latest", "prod"}
    assert again.tags == ["nightly"] and again.metadata == {"acc": 0.9} and again.description == "new"
    assert again.ttl == dt.timedelta(days=2)
    with pytest.raises(ValueError):
        art.aliases = ["v3"]  # reserved for versions
    with pytest.raises(ValueError):
        art.ttl = dt.timedelta(seconds=-1)


def test_save_without_run_creates_auto_run_and_with_run_uses_it(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "x"
    f.write_text("x")
    art = client.Artifact("auto-ds", "dataset")
    art.add_file(f)
    art.save(project="side")
    assert art.project == "side"
    run = art.logged_by()
    assert run is not None and run.job_type == "auto" and run.state == "finished"
    with client.init(project="proj") as live:
        art2 = client.Artifact("in-run", "dataset")
        art2.add_file(f)
        art2.save()
        assert art2.logged_by().id == live.id  # type: ignore[union-attr]


# -- reading back ----------------------------------------------------------------------------------------------
def test_get_entry_get_path_files_and_entry_download(sdk_env: dict[str, Path]) -> None:
    art = logged(sdk_env["tmp"], {f"f{i}.txt": str(i) for i in range(7)})
    e = art.get_entry("f3.txt")
    assert e.digest == b64md5(b"3") and e.size == 1
    with pytest.raises(KeyError):
        art.get_entry("nope")
    with pytest.warns(DeprecationWarning):
        assert art.get_path("f3.txt").path == "f3.txt"
    files = art.files(per_page=3)
    assert [p for p in files.pages()][0] == list(files)[:3] and len(list(files.pages())) == 3
    assert [x.path for x in files] == [f"f{i}.txt" for i in range(7)]
    assert [x.path for x in art.files(names=["f1.txt", "f5.txt"])] == ["f1.txt", "f5.txt"]
    dest = e.download(sdk_env["tmp"] / "one")
    assert Path(dest).read_text() == "3" and os.listdir(sdk_env["tmp"] / "one") == ["f3.txt"]


def test_file_single_and_multiple(sdk_env: dict[str, Path]) -> None:
    single = logged(sdk_env["tmp"], {"model.pt": "weights"}, name="model")
    p = single.file()
    assert Path(p) == Path("artifacts/model:v0/model.pt").absolute() and Path(p).read_text() == "weights"
    multi = logged(sdk_env["tmp"], {"a": "1", "b": "2"}, name="multi")
    with pytest.raises(ValueError):
        multi.file()


def test_download_default_root_prefix_skip_and_repair(sdk_env: dict[str, Path]) -> None:
    files = {"a.txt": "A", "sub/b.txt": "B", "sub/c.txt": "C"}
    art = logged(sdk_env["tmp"], files)
    root = Path(art.download())
    assert root == Path("artifacts/ds:v0").absolute() and tree_of(root) == {k: v.encode() for k, v in files.items()}
    ino = (root / "a.txt").stat().st_ino
    (root / "sub/b.txt").write_text("corrupted")
    (root / "keep-me").write_text("user file")
    art.download()
    assert (root / "a.txt").stat().st_ino == ino  # present and valid: left alone
    assert (root / "sub/b.txt").read_text() == "B"  # repaired
    assert (root / "keep-me").exists()  # download never deletes
    part = Path(art.download(sdk_env["tmp"] / "part", path_prefix="sub/"))
    assert sorted(tree_of(part)) == ["sub/b.txt", "sub/c.txt"]
    assert not [p for p in root.rglob("*") if "artifactfs-tmp" in p.name]


def test_download_uses_cache_and_refetches_corrupt_objects(sdk_env: dict[str, Path]) -> None:
    art = logged(sdk_env["tmp"], {"a.txt": "cached content"})
    key = md5hex(b"cached content")
    obj = sdk_env["cache"] / "objects" / key[:2] / key[2:]
    obj.unlink()
    art.download(sdk_env["tmp"] / "d1")
    assert obj.read_bytes() == b"cached content"  # download filled the cache
    os.chmod(obj, 0o644)
    obj.write_bytes(b"cached CONTENT")  # same size, wrong bytes
    out = Path(art.download(sdk_env["tmp"] / "d2"))
    assert (out / "a.txt").read_bytes() == b"cached content"
    assert obj.read_bytes() == b"cached content"
    blob = sdk_env["store"] / "blobs" / "alice" / key[:2] / key[2:]
    assert blob.exists()
    os.chmod(blob.parent, 0o755)
    os.chmod(blob, 0o644)
    blob.unlink()  # the store lost it: the cache alone serves the download
    assert (Path(art.download(sdk_env["tmp"] / "d3")) / "a.txt").read_bytes() == b"cached content"
    with pytest.raises(ArtifactFSError):
        art.download(sdk_env["tmp"] / "d4", skip_cache=True)  # skip_cache really bypasses the cache


def test_checkout_removes_extra_files(sdk_env: dict[str, Path]) -> None:
    art = logged(sdk_env["tmp"], {"a": "1", "d/b": "2"})
    root = sdk_env["tmp"] / "co"
    write_tree(root, {"extra.txt": "x", "old/deep/y": "y", "a": "stale"})
    assert art.checkout(root) == str(root)
    assert tree_of(root) == {"a": b"1", "d/b": b"2"} and not (root / "old").exists()


def test_verify_detects_extra_missing_and_changed(sdk_env: dict[str, Path]) -> None:
    art = logged(sdk_env["tmp"], {"a": "1", "d/b": "2"})
    root = Path(art.download(sdk_env["tmp"] / "v"))
    art.verify(root)
    (root / "extra").write_text("x")
    with pytest.raises(ValueError, match="extra"):
        art.verify(root)
    (root / "extra").unlink()
    (root / "d/b").write_text("3")
    with pytest.raises(ValueError, match="digest mismatch"):
        art.verify(root)
    (root / "d/b").unlink()
    with pytest.raises(ValueError, match="missing"):
        art.verify(root)
    art.verify()  # default: downloads to ./artifacts/ds:v0 and checks it


# -- versions ----------------------------------------------------------------------------------------------------
def test_new_draft_uploads_only_the_change(sdk_env: dict[str, Path]) -> None:
    big = {f"f{i}.bin": os.urandom(20_000) for i in range(5)}
    v0 = logged(sdk_env["tmp"], big)
    assert v0.bytes_uploaded > 100_000
    draft = v0.new_draft()
    assert draft.is_draft() and draft.digest == v0.digest
    changed = sdk_env["tmp"] / "changed.bin"
    changed.write_bytes(b"z" * 1000)
    draft.add_file(changed, name="f0.bin", overwrite=True)
    draft.remove("f4.bin")
    with client.init(project="proj", reinit=True) as run:
        run.log_artifact(draft)
    manifest_bytes = len(client.Api().artifact("proj/ds:v1").manifest.to_bytes())
    assert draft.version == "v1" and draft.bytes_uploaded == 1000 + manifest_bytes
    assert draft.file_count == 4
    out = Path(draft.download(sdk_env["tmp"] / "v1"))
    assert (out / "f0.bin").read_bytes() == b"z" * 1000 and (out / "f1.bin").read_bytes() == big["f1.bin"]


def test_incremental_artifact_merges_with_latest(sdk_env: dict[str, Path]) -> None:
    logged(sdk_env["tmp"], {"a": "1", "b": "2"})
    f = sdk_env["tmp"] / "c"
    f.write_text("3")
    inc = client.Artifact("ds", "dataset", incremental=True)
    inc.add_file(f)
    with client.init(project="proj", reinit=True) as run:
        run.log_artifact(inc)
    assert inc.version == "v1" and sorted(e.path for e in inc.manifest) == ["a", "b", "c"]


def test_delete_respects_aliases(sdk_env: dict[str, Path]) -> None:
    v0 = logged(sdk_env["tmp"], {"a": "1"})
    v0.aliases.append("keep")
    v0.save()
    v1 = logged(sdk_env["tmp"], {"a": "2"})
    with pytest.raises(ConflictError):
        v0.delete()
    v0.delete(delete_aliases=True)
    assert v0.state == "DELETED"
    with pytest.raises(NotFoundError):
        client.Api().artifact("proj/ds:v0")
    assert client.Api().artifact("proj/ds:latest").id == v1.id


# -- references and later features ---------------------------------------------------------------------------------
def test_file_references(sdk_env: dict[str, Path]) -> None:
    ext = write_tree(sdk_env["tmp"] / "nfs", {"one.txt": "1", "sub/two.txt": "22"})
    art = client.Artifact("refs", "dataset")
    single = art.add_reference((ext / "one.txt").as_uri())
    assert [(e.path, e.digest, e.size, e.ref) for e in single] == [
        ("one.txt", b64md5(b"1"), 1, (ext / "one.txt").as_uri())]
    many = art.add_reference(ext.as_uri(), name="tree")
    assert sorted(e.path for e in many) == ["tree/one.txt", "tree/sub/two.txt"]
    nock = art.add_reference((ext / "sub").as_uri(), name="lazy", checksum=False)
    assert len(nock) == 1 and is_uri_digest(nock[0]) and nock[0].size == 2  # expanded, not read
    with pytest.raises(ValueError, match="Exceeded 1"):
        art.add_reference(ext.as_uri(), name="capped", max_objects=1)
    capped = art.add_reference(ext.as_uri(), name="capped", max_objects=2)
    with pytest.raises(ValueError):
        art.add_reference((ext / "absent").as_uri())
    with pytest.raises(ArtifactNotLoggedError):
        art.add_reference(single[0])  # an entry of a draft: nothing to point at yet
    art.remove("lazy")
    art.remove("capped")
    with client.init(project="proj") as run:
        run.log_artifact(art)
    assert art.bytes_uploaded == len(art.manifest.to_bytes())  # references are never uploaded
    out = Path(art.download(sdk_env["tmp"] / "r"))
    assert tree_of(out) == {"one.txt": b"1", "tree/one.txt": b"1", "tree/sub/two.txt": b"22"}
    (ext / "one.txt").unlink()
    with pytest.raises(NotFoundError):
        art.download(sdk_env["tmp"] / "r2")
    out2 = Path(art.download(sdk_env["tmp"] / "r3", allow_missing_references=True))
    assert sorted(tree_of(out2)) == ["tree/sub/two.txt"]
    art.verify(out2)  # references are not verified


def test_add_and_get_objects(sdk_env: dict[str, Path]) -> None:
    from client.objects import Classes, Table

    art = client.Artifact("objs", "dataset")
    table = Table(columns=["a", "b"], data=[[1, "x"], [2, "y"]])
    entry = art.add(table, "tables/t")
    assert entry.path == "tables/t.table.json"
    art["labels"] = Classes([{"id": 1, "name": "cat"}])
    with pytest.raises(ValueError):
        art.add(Table(columns=["a"], data=[[3]]), "tables/t")  # exists: overwrite=False
    with pytest.raises(TypeError):
        art.add(object(), "obj")  # not a W&B object
    with pytest.raises(ArtifactNotLoggedError):
        art.get("tables/t")
    with client.init(project="proj") as run:
        run.log_artifact(art)
    got = art.get("tables/t")
    assert isinstance(got, Table) and got.columns == ["a", "b"] and got.data == [[1, "x"], [2, "y"]]
    assert isinstance(art["labels"], Classes)
    assert art.get("nothing") is None


def test_references_to_other_artifacts_entries(sdk_env: dict[str, Path]) -> None:
    src = logged(sdk_env["tmp"], {"w.bin": "weights", "x.txt": "x"}, name="src")
    ext = write_tree(sdk_env["tmp"] / "nfs", {"far.txt": "far"})
    with_ref = client.Artifact("holder", "dataset")
    with_ref.add_reference((ext / "far.txt").as_uri())
    with client.init(project="proj") as run:
        run.log_artifact(with_ref)
    art = client.Artifact("pointer", "dataset")
    (entry,) = art.add_reference(client.Api().artifact("proj/src:v0").get_entry("w.bin"), name="model/w.bin")
    assert entry.ref == f"wandb-artifact://{src.id}/w.bin" and entry.digest == b64md5(b"weights") and entry.size == 7
    (copied,) = art.add_reference(with_ref.get_entry("far.txt"))  # a reference is copied, not chained
    assert copied.ref == (ext / "far.txt").as_uri()
    with client.init(project="proj") as run:
        run.log_artifact(art)
    assert art.bytes_uploaded == len(art.manifest.to_bytes())
    out = Path(art.download(sdk_env["tmp"] / "p"))
    assert tree_of(out) == {"model/w.bin": b"weights", "far.txt": b"far"}
    art.verify(out)
    src.delete()
    with pytest.raises(NotFoundError):
        art.download(sdk_env["tmp"] / "p2")
    assert tree_of(Path(art.download(sdk_env["tmp"] / "p3", allow_missing_references=True))) == {"far.txt": b"far"}


def test_ttl_inherits_the_entity_default_unless_set(sdk_env: dict[str, Path]) -> None:
    from client.transfer import get_store

    draft = client.Artifact("t", "dataset")
    with pytest.raises(ArtifactNotLoggedError):
        draft.ttl  # inherited: unknown until logged
    get_store().set_entity_default_ttl("alice", 3600.0)
    inherited = logged(sdk_env["tmp"], {"a": "1"}, name="inh")
    assert inherited.ttl == dt.timedelta(hours=1)
    never = client.Artifact("never", "dataset")
    never.ttl = None  # opt out of the default
    with never.new_file("a") as fh:
        fh.write("a")
    with client.init(project="proj", reinit=True) as run:
        run.log_artifact(never)
    assert never.ttl is None
    own = client.Artifact("own", "dataset")
    own.ttl = dt.timedelta(minutes=5)
    with own.new_file("a") as fh:
        fh.write("b")
    with client.init(project="proj", reinit=True) as run:
        run.log_artifact(own)
    assert client.Api().artifact("proj/own:v0").ttl == dt.timedelta(minutes=5)
    never.description = "saving other fields keeps the ttl"
    never.save()
    assert client.Api().artifact("proj/never:v0").ttl is None
    never.ttl = client.ArtifactTTL.INHERIT
    never.save()
    assert never.ttl == dt.timedelta(hours=1)


def test_bad_aliases_and_tags_are_refused(sdk_env: dict[str, Path]) -> None:
    f = sdk_env["tmp"] / "x"
    f.write_text("x")
    art = client.Artifact("ds", "dataset")
    art.add_file(f)
    with client.init(project="proj") as run:
        with pytest.raises(InvalidNameError):
            run.log_artifact(art, aliases=["has space"])
        with pytest.raises(InvalidNameError):
            run.log_artifact(art, tags=["bad/tag"])


def test_failed_log_leaves_the_draft_editable(sdk_env: dict[str, Path]) -> None:
    logged(sdk_env["tmp"], {"a": "1"})  # ds exists with type dataset
    wrong = client.Artifact("ds", "model")
    with wrong.new_file("m") as fh:
        fh.write("m")
    with client.init(project="proj") as run:
        with pytest.raises(ConflictError):
            run.log_artifact(wrong)
    assert wrong.is_draft()
    with wrong.new_file("n") as fh:  # still editable
        fh.write("n")
    assert wrong.file_count == 2


def test_manifest_is_read_once_through_the_cache_and_verified(tmp_path):
    """A logged artifact's manifest lands in the shared cache; a corrupt cached copy is refused."""
    import client
    from client.transfer import get_cache

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    with client.init(project="p") as run:
        art = client.Artifact("mcache", type="dataset")
        art.add_dir(str(src))
        run.log_artifact(art)
    got = client.Api().artifact("p/mcache:latest")
    assert "a.txt" in got.manifest.entries
    md5 = got.commit_hash
    cache = get_cache()
    cached = cache.lookup(md5)
    assert cached is not None and b'"a.txt"' in cached.read_bytes()
    # corrupt the cached copy: the next reader must not trust it
    os.chmod(cached, 0o644)
    cached.write_bytes(cached.read_bytes().replace(b"a.txt", b"b.txt"))
    again = client.Api().artifact("p/mcache:latest")
    assert list(again.manifest.entries) == ["a.txt"]


# -- a fully cached download's cost (issue 17) ---------------------------------------------------------
#: the os calls a download makes on files and directories, counted per cached file below
_FS_CALLS = ("open", "close", "stat", "lstat", "fstat", "getxattr", "mkdir", "listdir", "scandir", "replace",
             "rename", "unlink", "utime", "chmod", "fchmod", "copy_file_range", "sendfile")


def _count_calls(mp: pytest.MonkeyPatch, owner: object, names: list[str], counts: dict[str, int]) -> None:
    """Count the calls of ``owner.<name>`` in ``counts`` (the real function still runs)."""
    for name in names:
        def counted(*a: object, _real: object = getattr(owner, name), _name: str = name, **k: object) -> object:
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)  # type: ignore[operator]
        mp.setattr(owner, name, counted)


def _logged_and_aged(tmp: Path, n: int) -> tuple[client.Artifact, dict[str, bytes], int]:
    """An artifact of ``n`` small files whose blobs are all in the cache, verified, written and
    last used long ago (every hit is due a new LRU stamp); returns it, its files and that time."""
    import random
    import sqlite3

    from client import transfer

    rnd = random.Random(17)
    files = {f"d{i % 3}/f{i:03d}.bin": rnd.randbytes(rnd.randrange(1, 5000)) for i in range(n)}
    art = logged(tmp, files)  # the log put every blob in the cache
    cache = transfer.get_cache()
    long_ago = 1_000_000_000 * 10**9
    for data in files.values():
        os.utime(cache.path(md5hex(data)), ns=(long_ago, long_ago))
        assert cache.verify(md5hex(data))  # and verified again (the marker names the mtime)
        os.utime(cache.path(md5hex(data)), ns=(long_ago, long_ago))  # the hash read moved the atime
    with sqlite3.connect(cache.root / "index.sqlite") as db:
        db.execute("UPDATE objects SET stamp = ?", (long_ago,))
    return art, files, long_ago


def test_fully_cached_download_is_one_index_transaction_no_store_call_no_pool(sdk_env: dict[str, Path]) -> None:
    """Every blob cached and its LRU stamp due: ``download()`` asks the (real, embedded) store
    nothing, starts no transfer pool, moves all the stamps in O(1) index transactions (not one
    write per file), and makes at most 8 file system calls per file (open the object, fstat it
    for its size, getxattr for its verified marker, utime its LRU stamp, create the file in the
    new root's staging directory, copy, close both) plus a few per directory: one rename for
    the whole tree, not one per file (was 9 a file, a rename each).  Counted, not timed."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    from client import transfer

    n = 120
    art, files, long_ago = _logged_and_aged(sdk_env["tmp"], n)
    cache = transfer.get_cache()
    pools: list[object] = []

    class CountedPool(ThreadPoolExecutor):
        def __init__(self, *a: object, **k: object) -> None:
            pools.append(self)
            super().__init__(*a, **k)  # type: ignore[arg-type]

    store_calls: dict[str, int] = {}
    fs_calls: dict[str, int] = {}
    queries = cache.index.queries
    with pytest.MonkeyPatch.context() as mp:
        store = art._store
        _count_calls(mp, store, [m for m in dir(store) if not m.startswith("_") and callable(getattr(store, m))],
                     store_calls)
        _count_calls(mp, os, [name for name in _FS_CALLS if hasattr(os, name)], fs_calls)
        mp.setattr(transfer, "ThreadPoolExecutor", CountedPool)
        out = Path(art.download(sdk_env["tmp"] / "out"))

    assert tree_of(out) == files
    assert store_calls == {}
    assert pools == []
    assert cache.index.queries - queries <= 3, cache.index.queries - queries  # was one write per file
    assert sum(fs_calls.values()) <= 8 * n + 30, fs_calls  # was 14 per file, then 9
    assert fs_calls.get("replace", 0) + fs_calls.get("rename", 0) <= 2, fs_calls  # the tree's, not a file's
    assert "listdir" not in fs_calls, fs_calls  # a destination that did not exist holds nothing to list
    assert sorted(os.listdir(sdk_env["tmp"] / "out" / "..")) == sorted(  # no staging directory left
        {"out", "cache", "store", "work", *(p for p in os.listdir(sdk_env["tmp"]) if p.startswith("src-"))})
    with sqlite3.connect(cache.root / "index.sqlite") as db:
        stamps = dict(db.execute("SELECT key, stamp FROM objects"))
    assert all(stamps[md5hex(data)] > long_ago for data in files.values())  # the LRU stamps moved
    assert all(cache.path(md5hex(data)).stat().st_atime_ns > long_ago for data in files.values())


_CRASHING_DOWNLOAD = r"""
import os, signal, sys
import client
calls = [0]
real = os.copy_file_range
def copy_then_die(*a):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no handler, no finally runs
    return real(*a)
os.copy_file_range = copy_then_die
client.Api().artifact("proj/ds:latest").download(sys.argv[1])
"""


def test_cached_download_killed_midway_leaves_no_file_under_its_name_and_the_next_one_cleans_up(
        sdk_env: dict[str, Path]) -> None:
    """A download into a new root killed (SIGKILL, a real second process) while copying from
    the cache leaves no root at all, only its staging directory; the next download into the
    same root succeeds with exactly the artifact's files and removes that leftover (on main a
    crash left the files copied so far and a temp file in the root, which stayed there)."""
    import subprocess
    import sys

    from client import staging

    n = 60
    art, files, _ = _logged_and_aged(sdk_env["tmp"], n)
    out = sdk_env["tmp"] / "crashed"
    proc = subprocess.run([sys.executable, "-c", _CRASHING_DOWNLOAD, str(out), "25"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = Path(staging.staging_path(str(out)))
    assert not out.exists()
    assert left.is_dir() and 0 < len(tree_of(left)) < n  # where the crash left its files

    assert Path(art.download(out)) == out
    assert tree_of(out) == files
    assert not left.exists()


def test_cached_download_failing_midway_leaves_no_root_and_the_next_one_succeeds(sdk_env: dict[str, Path]) -> None:
    """A copy failing mid-download (an I/O error from the kernel) fails the download and leaves
    neither the root nor its staging directory: no file under its real name (on main the
    files copied so far were left in the root)."""
    import errno as errno_mod

    from client import staging

    art, files, _ = _logged_and_aged(sdk_env["tmp"], 40)
    out = sdk_env["tmp"] / "failed"
    calls = [0]
    real = os.copy_file_range

    def copy_then_fail(*a: Any) -> int:
        calls[0] += 1
        if calls[0] == 20:
            raise OSError(errno_mod.EIO, "injected I/O error")
        return real(*a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "copy_file_range", copy_then_fail)
        with pytest.raises(OSError, match="injected"):
            art.download(out)
    assert not out.exists()
    assert not Path(staging.staging_path(str(out))).exists()
    art.download(out)
    assert tree_of(out) == files


def test_cached_download_beside_a_live_staging_directory_writes_each_file_in_place(sdk_env: dict[str, Path]) -> None:
    """Another live download holds the new root's staging directory (its lock): this one writes
    each file atomically into the root instead, and leaves the other's directory alone."""
    import fcntl

    from client import staging

    art, files, _ = _logged_and_aged(sdk_env["tmp"], 30)
    out = sdk_env["tmp"] / "shared"
    other = Path(staging.staging_path(str(out)))
    other.mkdir()
    (other / "half.bin").write_bytes(b"the other download's")
    fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        art.download(out)
        assert tree_of(out) == files
        assert tree_of(other) == {"half.bin": b"the other download's"}
    finally:
        os.close(fd)


def test_cached_download_whose_root_appears_meanwhile_moves_each_file_into_it(sdk_env: dict[str, Path]) -> None:
    """The root is made by someone else while the staging directory fills: the rename of the
    whole tree cannot replace it, so each staged file is moved into it (each complete); a file
    of theirs the artifact does not name stays."""
    from client import staging

    art, files, _ = _logged_and_aged(sdk_env["tmp"], 30)
    out = sdk_env["tmp"] / "raced"
    real = os.rename

    def rename_after_someone_made_the_root(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if str(dst) == str(out):
            write_tree(out, {"theirs.txt": b"not the artifact's", "d0/f000.bin": b"an older copy"})
        real(src, dst, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(staging.os, "rename", rename_after_someone_made_the_root)
        art.download(out)
    assert tree_of(out) == files | {"theirs.txt": b"not the artifact's"}
    assert not Path(staging.staging_path(str(out))).exists()


def test_cached_entry_download_into_a_relative_new_root_stages_beside_it(sdk_env: dict[str, Path]) -> None:
    """A relative root of one name (an entry's ``download("out")``) is staged in the working
    directory, its parent (not at ``/``), and renamed there."""
    from client import staging

    art, files, _ = _logged_and_aged(sdk_env["tmp"], 3)
    entry = art.get_entry("d1/f001.bin")
    assert Path(staging.staging_path("out")) == sdk_env["work"] / ".out.artifactfs-staging"
    assert entry.download("out") == "out/d1/f001.bin"
    assert tree_of(sdk_env["work"]) == {"out/d1/f001.bin": files["d1/f001.bin"]}


def test_fully_cached_download_costs_few_python_calls_and_index_steps_per_file(sdk_env: dict[str, Path]) -> None:
    """The Python a warm download runs per file, and the index work of its LRU stamps, counted
    one by one (the interpreter's profile hook; SQLite steps by a progress handler on the
    cache index's own connection), every stamp due.  Before (2026-12-03, main at dfb6434): 63.6
    calls and 70 steps per file; then 43.6 calls (fewer layers: the digest decoded by one match
    and one C call, no listing of a destination that did not exist, the meter told the files
    once, the copy's and the stamp's helpers flattened) and 37 steps (the stamp alone updated,
    no upsert and no totals trigger per row); now fewer calls (a new root's files written
    straight into its staging directory: no atomic writer, temp name or rename per file): 36.7."""
    import sqlite3
    import sys

    from client import transfer

    n = 300
    art, files, long_ago = _logged_and_aged(sdk_env["tmp"], n)
    cache = transfer.get_cache()
    entries = list(art.manifest)
    calls, steps = [0], [0]

    def step() -> int:
        steps[0] += 1
        return 0

    def profile(frame: Any, event: str, _arg: object) -> None:
        if event == "c_call" or (event == "call" and frame.f_code is not step.__code__):  # not the counter's own
            calls[0] += 1

    with cache.index._db() as db:
        db.set_progress_handler(step, 1)
    sys.setprofile(profile)
    try:
        written = transfer.download_entries(art._store, art._blob_entity, entries, sdk_env["tmp"] / "out")
    finally:
        sys.setprofile(None)
        with cache.index._db() as db:
            db.set_progress_handler(None, 1)
    assert tree_of(sdk_env["tmp"] / "out") == files
    assert written == sum(len(v) for v in files.values())
    assert calls[0] / n < 38, calls[0] / n
    assert steps[0] / n < 45, steps[0] / n
    with sqlite3.connect(cache.root / "index.sqlite") as check:
        stamps = dict(check.execute("SELECT key, stamp FROM objects"))
    assert all(stamps[md5hex(v)] > long_ago for v in files.values())  # the LRU stamps moved


def test_cached_download_keeps_exec_bits_links_right_files_and_refetches_short_objects(
        sdk_env: dict[str, Path]) -> None:
    """The cache-copy path keeps what the pool did: the exec bit, symbolic links (placed last),
    a right local file left alone, a different one replaced and counted, and a cache object
    shorter than its entry dropped and fetched from the store instead of served."""
    import dataclasses
    import stat

    from client import progress, transfer

    files = {"run.sh": b"#!/bin/sh\necho hi\n", "d/a.txt": b"alpha" * 50, "d/b.txt": b"beta" * 70,
             "d/c.txt": b"gamma" * 90}
    art = logged(sdk_env["tmp"], files)
    entries = [dataclasses.replace(e, extra={"executable": True}) if e.path == "run.sh" else e for e in art.manifest]
    entries.append(dataclasses.replace(entries[0], path="d/link", digest=b64md5(b"a.txt"), size=5,
                                       extra={"symlink": "a.txt"}))
    dest = sdk_env["tmp"] / "out"
    write_tree(dest, {"d/a.txt": files["d/a.txt"], "d/b.txt": b"edited locally"})
    kept = (dest / "d/a.txt").stat().st_ino
    short = transfer.get_cache().path(md5hex(files["d/c.txt"]))
    os.chmod(short, 0o644)
    short.write_bytes(files["d/c.txt"][:-1])

    with progress.collect() as meters:
        written = transfer.download_entries(art._store, art._blob_entity, entries, dest)

    assert tree_of(dest) == files | {"d/link": b"alpha" * 50}
    assert os.readlink(dest / "d/link") == "a.txt"
    assert (dest / "d/a.txt").stat().st_ino == kept
    mode = stat.S_IMODE((dest / "run.sh").stat().st_mode)
    assert mode & 0o100 and not stat.S_IMODE((dest / "d/b.txt").stat().st_mode) & 0o111
    (meter,) = meters
    assert (meter.files_moved, meter.files_present, meter.replaced) == (3, 1, ["d/b.txt"])
    assert meter.bytes == sum(len(v) for v in files.values())  # by bytes, as they were (a link moves none)
    assert written == sum(len(files[p]) for p in ("run.sh", "d/b.txt", "d/c.txt"))
    assert short.read_bytes() == files["d/c.txt"]  # the short object was dropped and fetched again
    assert not [p for p in dest.rglob("*") if p.name.endswith(".tmp")]


def test_cached_download_into_a_new_root_keeps_exec_bits_links_and_fetches_what_the_cache_lacks(
        sdk_env: dict[str, Path]) -> None:
    """Into a root that did not exist: the staged files keep the exec bit, a short cache object
    is dropped and its file fetched by the pool into the renamed root, links come last, and
    the meter counts every file once; no staging directory or temp file is left."""
    import dataclasses
    import stat

    from client import progress, staging, transfer

    files = {"run.sh": b"#!/bin/sh\necho hi\n", "d/a.txt": b"alpha" * 50, "d/c.txt": b"gamma" * 90}
    art = logged(sdk_env["tmp"], files)
    entries = [dataclasses.replace(e, extra={"executable": True}) if e.path == "run.sh" else e for e in art.manifest]
    entries.append(dataclasses.replace(entries[0], path="d/link", digest=b64md5(b"a.txt"), size=5,
                                       extra={"symlink": "a.txt"}))
    short = transfer.get_cache().path(md5hex(files["d/c.txt"]))
    os.chmod(short, 0o644)
    short.write_bytes(files["d/c.txt"][:-1])
    dest = sdk_env["tmp"] / "new" / "root"

    with progress.collect() as meters:
        written = transfer.download_entries(art._store, art._blob_entity, entries, dest)

    assert tree_of(dest) == files | {"d/link": b"alpha" * 50}
    assert os.readlink(dest / "d/link") == "a.txt"
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) & 0o100
    assert not stat.S_IMODE((dest / "d/a.txt").stat().st_mode) & 0o111
    (meter,) = meters
    assert (meter.files_moved, meter.files_present, meter.replaced) == (3, 0, [])
    assert written == sum(len(v) for v in files.values())
    assert short.read_bytes() == files["d/c.txt"]
    assert os.listdir(dest.parent) == ["root"]
    assert not Path(staging.staging_path(str(dest))).exists()


def test_cached_download_to_another_filesystem_copies_by_sendfile(sdk_env: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache on another filesystem than the download (copy_file_range refuses: EXDEV) still
    copies in the kernel, by sendfile, every byte right."""
    import shutil
    import tempfile

    from client import transfer

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(sdk_env["tmp"]).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp dir")
    cache_dir = Path(tempfile.mkdtemp(prefix="afs-cache-", dir=shm))
    try:
        monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(cache_dir))
        transfer.close_stores()  # forget the cache of the old location
        files = {f"d/f{i}": os.urandom(3000 + i) for i in range(5)}
        art = logged(sdk_env["tmp"], files)
        art.download(sdk_env["tmp"] / "warm")  # verifies (marks) what the log staged
        sent: dict[str, int] = {}
        with pytest.MonkeyPatch.context() as mp:
            _count_calls(mp, os, ["sendfile"], sent)
            out = Path(art.download(sdk_env["tmp"] / "out"))
        assert tree_of(out) == files
        assert sent == {"sendfile": len(files)}
    finally:
        transfer.close_stores()
        shutil.rmtree(cache_dir)
