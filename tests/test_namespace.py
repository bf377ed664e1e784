"""The namespace and the manifest index, without a mount: real LocalStore, real SQLite, real cache."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from client.cache import Cache
from client.errors import NotFoundError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from mountfs.errors import errno_for
from mountfs.content import ContentReader
from mountfs.manifest_index import ROOT_ID, IndexStore, ManifestIndex, build_index
from mountfs.namespace import DIR_MODE, FILE_MODE, ROOT_INODE, Kind, Namespace, NamespaceConfig
from tests.util import commit_files

FILES = {"a.txt": b"alpha", "sub/b.bin": b"b" * 1000, "sub/deep/c.txt": b"see", "empty": b""}


class FakeClock:
    """A settable clock for the TTL caches (time is an input here, not something we wait on)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(local_store, tmp_path: Path):
    v0, _ = commit_files(local_store, tmp_path, FILES, aliases=("best",), metadata={"k": 1})
    cache = Cache(tmp_path / "cache")
    content = ContentReader(local_store, cache)
    indexes = IndexStore(cache.root / "index", content.manifest_path)
    clock = FakeClock()
    ns = Namespace(local_store, indexes, NamespaceConfig(alias_ttl=5.0), clock=clock)
    yield ns, v0, clock, indexes
    content.shutdown()


def test_tree_levels_and_listing(world) -> None:
    ns, v0, _, _ = world
    root = ns.node(ROOT_INODE)
    assert root.kind is Kind.ROOT
    fh = ns.opendir(ROOT_INODE)
    assert [name for _, name, _ in ns.readdir_page(fh, 0)] == ["ent"]
    ent = ns.lookup(ROOT_INODE, "ent")
    proj = ns.lookup(ent.inode, "proj")
    assert (ent.kind, proj.kind) == (Kind.ENTITY, Kind.PROJECT)
    fh = ns.opendir(proj.inode)
    listed = [name for _, name, _ in ns.readdir_page(fh, 0)]
    assert listed == ["ds:v0", "ds:best", "ds:latest"]
    # paging: cookies continue where the previous page stopped
    first = ns.readdir_page(fh, 0, limit=1)
    rest = ns.readdir_page(fh, first[-1][0], limit=10)
    assert [n for _, n, _ in first + rest] == listed


def test_version_tree_attrs_and_xattrs(world) -> None:
    ns, v0, _, _ = world
    vdir = ns.walk("ent/proj/ds:v0")
    assert vdir.kind is Kind.VERSION_DIR and vdir.version.id == v0.id
    a = ns.attr(vdir)
    assert a.mode == DIR_MODE and a.entry_timeout >= 3600
    f = ns.walk("ent/proj/ds:v0/sub/deep/c.txt")
    fa = ns.attr(f)
    assert (fa.mode, fa.size, fa.nlink) == (FILE_MODE, 3, 1)
    assert fa.mtime_ns == int(v0.created_at.timestamp() * 1e9)
    sub = ns.walk("ent/proj/ds:v0/sub")
    assert ns.attr(sub).nlink == 3  # 2 + one subdirectory
    fh = ns.opendir(sub.inode)
    assert sorted(n for _, n, _ in ns.readdir_page(fh, 0)) == ["b.bin", "deep"]
    x = ns.xattrs(vdir.inode)
    assert x["user.artifact.digest"] == v0.digest.encode()
    assert x["user.artifact.version"] == b"ent/proj/ds:v0"
    assert set(x["user.artifact.aliases"].decode().split(",")) == {"latest", "best"}
    assert json.loads(x["user.artifact.metadata"]) == {"k": 1}
    assert x["user.artifact.type"] == b"dataset"
    assert ns.getxattr(f.inode, "user.artifact.digest") == hex_to_b64(md5_bytes(b"see")).encode()
    with pytest.raises(Exception) as e:
        ns.getxattr(f.inode, "user.nope")
    assert errno_for(e.value) == errno.ENODATA
    for foreign in ("security.selinux", "system.posix_acl_access", "security.capability"):
        with pytest.raises(Exception) as e:  # no ACLs/labels at all: ls -l stops asking per file
            ns.getxattr(f.inode, foreign)
        assert errno_for(e.value) == errno.ENOTSUP


def test_unknown_names_and_unlisted_lookup(world, local_store, tmp_path) -> None:
    ns, v0, _, _ = world
    proj = ns.walk("ent/proj")
    for bad in ["nope:v0", "ds:v9", "ds:nosuchalias", "ds", ".Trash", "ds:"]:
        with pytest.raises(NotFoundError):
            ns.lookup(proj.inode, bad)
    with pytest.raises(NotFoundError):
        ns.walk("ghost")
    with pytest.raises(NotFoundError):
        ns.walk("ent/proj/ds:v0/missing.txt")
    # a version that exists is found by lookup even before any listing mentions it
    v1, _ = commit_files(local_store, tmp_path, {"x": b"new"})
    assert ns.walk("ent/proj/ds:v1").version.id == v1.id
    with pytest.raises(Exception) as e:
        ns.walk("ent/proj/ds:v0/a.txt/x")
    assert errno_for(e.value) == errno.ENOTDIR


def test_alias_reresolves_after_ttl_and_open_file_stays_pinned(world, local_store, tmp_path) -> None:
    ns, v0, clock, _ = world
    old_dir = ns.walk("ent/proj/ds:latest")
    old_file = ns.walk("ent/proj/ds:latest/a.txt")
    fh, ref = ns.open(old_file.inode, os.O_RDONLY)
    v1, created = commit_files(local_store, tmp_path, {"a.txt": b"ALPHA v1"})
    assert created
    assert ns.walk("ent/proj/ds:latest").inode == old_dir.inode  # still within the TTL
    clock.now += 6
    new_dir = ns.walk("ent/proj/ds:latest")
    assert new_dir.inode != old_dir.inode and new_dir.version.id == v1.id
    assert ns.attr(new_dir).entry_timeout == 5.0
    assert ns.attr(ns.walk("ent/proj/ds:latest/a.txt")).size == len(b"ALPHA v1")
    # the open file is pinned by content, the old inode still describes v0
    assert ns.file(fh) == ref and ref.md5 == md5_bytes(b"alpha") and ref.version == "ent/proj/ds:v0"
    assert ns.attr(old_file).size == 5


def test_lookup_counts_and_forget(world) -> None:
    ns, _, _, _ = world
    base = len(ns)
    f = ns.walk("ent/proj/ds:v0/a.txt")
    ns.walk("ent/proj/ds:v0/a.txt")
    assert f.lookups == 2
    assert len(ns) == base + 4  # ent, proj, ds:v0, a.txt
    ns.forget(f.inode, 1)
    assert ns.node(f.inode) is f
    ns.forget(f.inode, 1)
    with pytest.raises(NotFoundError):
        ns.node(f.inode)
    # readdir nodes the kernel refused are dropped; accepted ones are counted
    vdir = ns.walk("ent/proj/ds:v0")
    page = ns.readdir_page(ns.opendir(vdir.inode), 0)
    ns.remember(page[0][2])
    ns.release_unreferenced(page[1][2])
    assert ns.node(page[0][2].inode).lookups == 1
    with pytest.raises(NotFoundError):
        ns.node(page[1][2].inode)
    assert ns.lookup(vdir.inode, "..").kind is Kind.PROJECT
    assert ns.lookup(vdir.inode, ".") is vdir


def test_writes_are_erofs(world) -> None:
    ns, _, _, _ = world
    f = ns.walk("ent/proj/ds:v0/a.txt")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(Exception) as e:
            ns.open(f.inode, flags)
        assert errno_for(e.value) == errno.EROFS
    with pytest.raises(Exception) as e:
        ns.check_writable(ns.walk("ent/proj").inode, "ds:draft")
    assert errno_for(e.value) == errno.EROFS
    with pytest.raises(Exception) as e:
        ns.open(ns.walk("ent/proj/ds:v0/sub").inode, os.O_RDONLY)
    assert errno_for(e.value) == errno.EISDIR


def test_index_built_once_per_manifest_and_shared(world, local_store, tmp_path) -> None:
    ns, v0, _, indexes = world
    ns.walk("ent/proj/ds:v0/a.txt")
    ns.walk("ent/proj/ds:latest/sub/b.bin")
    assert indexes.builds == 1
    assert indexes.path(v0.manifest_md5).exists()
    idx = indexes.get("ent", v0.manifest_md5)
    assert (idx.file_count, idx.total_size) == (4, v0.size)


def test_index_pages_large_directory_and_streams(tmp_path: Path) -> None:
    n = 3000
    entries = [ManifestEntry(f"d/f{i:05d}", hex_to_b64(md5_bytes(str(i).encode())), i) for i in range(n)]
    mf = tmp_path / "m.json"
    mf.write_bytes(Manifest(entries).to_bytes())
    build_index(mf, tmp_path / "idx.sqlite", in_subprocess=False)
    idx = ManifestIndex(tmp_path / "idx.sqlite")
    d = idx.lookup(ROOT_ID, "d")
    assert d is not None and d.is_dir
    seen, after = [], 0
    while page := idx.children(d.id, after, 700):
        seen += [e.name for e in page]
        after = page[-1].id
    assert len(seen) == n and len(set(seen)) == n
    assert idx.resolve_path("d/f00042").size == 42
    # a manifest in another layout (one JSON line, as W&B may write it) goes via a subprocess
    other = tmp_path / "wandb.json"
    other.write_text(json.dumps(Manifest(entries[:10]).to_json()))
    build_index(other, tmp_path / "idx2.sqlite")
    assert ManifestIndex(tmp_path / "idx2.sqlite").file_count == 10


def _build_cost(manifest: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """(Python function calls, SQLite virtual-machine steps) that building ``manifest``'s index
    costs, counted one by one: calls by the interpreter's profile hook, steps by a progress
    handler on the builder's own (real) connection.  Two builds, so neither count sees the other."""
    import sqlite3
    import sys

    build_index(manifest, dest, in_subprocess=False)  # warm: imports and caches are not the cost
    dest.unlink()
    calls = [0]

    def profile(_frame: object, event: str, _arg: object) -> None:
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        build_index(manifest, dest, in_subprocess=False)
    finally:
        sys.setprofile(None)
    dest.unlink()
    steps = [0]
    real_connect = sqlite3.connect

    def counted_connect(*args, **kwargs):  # type: ignore[no-untyped-def]
        db = real_connect(*args, **kwargs)

        def tick() -> int:
            steps[0] += 1
            return 0

        db.set_progress_handler(tick, 1)
        return db

    monkeypatch.setattr(sqlite3, "connect", counted_connect)
    build_index(manifest, dest, in_subprocess=False)
    monkeypatch.undo()
    return calls[0], steps[0]


def test_an_index_is_built_in_one_pass_with_little_work_per_entry(tmp_path: Path, monkeypatch) -> None:
    """The first listing of a version waits for its index: the build decodes the manifest in
    chunks, inserts files in batches and counts the totals on the way, with no pass over the
    table afterwards.  Before (one json.loads, one INSERT per file, then an UPDATE joining every
    directory to its children): 55 Python calls and 43 SQLite steps per entry; after: 35 and 35."""
    n = 8000
    entries = [ManifestEntry(f"top{i // 4000}/d{i // 500:02d}/f{i:05d}.txt", hex_to_b64(md5_bytes(str(i).encode())), i)
               for i in range(n)]
    mf = tmp_path / "m.json"
    mf.write_bytes(Manifest(entries).to_bytes())
    calls, steps = _build_cost(mf, tmp_path / "idx.sqlite", monkeypatch)
    assert calls / n < 40, calls / n
    assert steps / n < 38, steps / n
    idx = ManifestIndex(tmp_path / "idx.sqlite")
    assert (idx.file_count, idx.total_size, idx.root_subdirs) == (n, sum(range(n)), 2)
    top0 = idx.lookup(ROOT_ID, "top0")
    assert top0 is not None and top0.subdirs == 8
    assert [e.subdirs for e in idx.children(top0.id)] == [0] * 8
    assert idx.resolve_path("top1/d09/f04999.txt").size == 4999


def test_index_totals_skip_a_file_that_collides_with_a_directory(tmp_path: Path) -> None:
    """A manifest the registry would refuse (``a`` and ``a/b``) still indexes: the first one
    wins, and the totals count only what was indexed."""
    digest = hex_to_b64(md5_bytes(b"x"))
    rows = [ManifestEntry("a/b", digest, 5), ManifestEntry("a", digest, 7), ManifestEntry("c", digest, 11)]
    mf = tmp_path / "m.json"
    mf.write_bytes(Manifest(rows).to_bytes())  # written in path order: a, a/b, c
    build_index(mf, tmp_path / "idx.sqlite", in_subprocess=False)
    idx = ManifestIndex(tmp_path / "idx.sqlite")
    assert (idx.file_count, idx.total_size, idx.root_subdirs) == (2, 18, 0)
    assert idx.resolve_path("a").is_dir is False and idx.resolve_path("a/b") is None


def _vm_steps(idx: ManifestIndex, fn) -> int:  # type: ignore[no-untyped-def]
    """SQLite virtual-machine instructions ``fn`` costs on ``idx`` (counted one by one)."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    idx._db.set_progress_handler(tick, 1)  # noqa: SLF001 - counting what a query costs
    try:
        fn()
    finally:
        idx._db.set_progress_handler(None, 1)  # noqa: SLF001
    return steps[0]


def test_a_directory_page_costs_the_page_not_the_directory(tmp_path: Path) -> None:
    """The sibling prefetch asks for the next 17 files of a directory on every cold read and
    readdir pages through it: each page must cost the page, not a scan and sort of the whole
    directory (before: 1,000 files made every such query ~1 ms on the event loop)."""
    def page_cost(n: int) -> int:
        entries = [ManifestEntry(f"d/f{i:06d}", hex_to_b64(md5_bytes(str(i).encode())), i) for i in range(n)]
        mf = tmp_path / f"m{n}.json"
        mf.write_bytes(Manifest(entries).to_bytes())
        build_index(mf, tmp_path / f"idx{n}.sqlite", in_subprocess=False)
        idx = ManifestIndex(tmp_path / f"idx{n}.sqlite")
        d = idx.lookup(ROOT_ID, "d")
        assert d is not None
        mid = idx.lookup(d.id, f"f{n // 2:06d}")
        assert mid is not None
        page: list = []
        cost = _vm_steps(idx, lambda: page.extend(idx.children(d.id, mid.id, 17)))
        assert [e.name for e in page] == [f"f{i:06d}" for i in range(n // 2 + 1, n // 2 + 18)]
        return cost

    small, large = page_cost(200), page_cost(20_000)
    assert large < 2 * small + 200, (small, large)  # was about 100x: proportional to the directory


def test_an_index_from_before_the_page_index_is_rebuilt_once(tmp_path: Path) -> None:
    import sqlite3

    entries = [ManifestEntry(f"d/f{i}", hex_to_b64(md5_bytes(str(i).encode())), i) for i in range(10)]
    mf = tmp_path / "m.json"
    mf.write_bytes(Manifest(entries).to_bytes())
    md5 = md5_bytes(mf.read_bytes())
    store = IndexStore(tmp_path / "index", lambda _e, _m: mf)
    build_index(mf, store.path(md5), in_subprocess=False)
    db = sqlite3.connect(store.path(md5))
    db.execute("DROP INDEX entries_by_parent")  # what an older version built
    db.commit()
    db.close()
    idx = store.get("ent", md5)
    assert idx.current and store.builds == 1 and idx.file_count == 10
    assert IndexStore(tmp_path / "index", lambda _e, _m: mf).get("ent", md5).current  # kept: no second build


def test_linked_version_reads_its_sources_blobs(world, local_store) -> None:
    """A version linked into another entity's registry shares the source's manifest and blobs."""
    ns, v0, _, _ = world
    local_store.link_version(v0.id, "org", "wandb-registry-model", "resnet", aliases=["production"])
    f = ns.walk("org/wandb-registry-model/resnet:production/sub/deep/c.txt")
    assert ns.attr(f).size == 3
    _, ref = ns.open(f.inode, os.O_RDONLY)
    assert ref.entity == "ent" and ref.md5 == md5_bytes(b"see")
