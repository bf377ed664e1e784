"""The draft engine without a mount: real LocalStore, real cache, real SQLite, real processes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from client.cache import Cache
from client.errors import NotFoundError
from client.hashing import hex_to_b64, md5_file
from client.manifest import Manifest, compute_digest
from client.store.local import LocalStore
from mountfs.drafts import commit as draft_commit
from mountfs.errors import errno_for
from mountfs.drafts.manager import (COMMIT_NAME, ROOT_ID, STATUS_NAME, BaseRef, CommitOptions, DraftManager,
                            DraftTree, draft_dirname, make_fetch_base, parse_draft_dirname)
from tests.util import commit_files

REPO = Path(__file__).resolve().parents[1]


# -- helpers: path-level wrappers over the node-level API ---------------------------------------
def walk(tree: DraftTree, path: str):
    attr = tree.getattr(ROOT_ID)
    for part in [p for p in path.split("/") if p]:
        attr = tree.lookup(attr.id, part)
    return attr


def mkdirs(tree: DraftTree, path: str) -> int:
    nid = ROOT_ID
    for part in [p for p in path.split("/") if p]:
        try:
            nid = tree.lookup(nid, part).id
        except NotFoundError:
            nid = tree.mkdir(nid, part).id
    return nid


def put(tree: DraftTree, path: str, data: bytes, chunk: int = 1 << 16) -> None:
    """What `cp` does: create (or open with O_TRUNC), sequential writes, close."""
    head, _, name = path.rpartition("/")
    parent = mkdirs(tree, head)
    try:
        fh = tree.open(tree.lookup(parent, name).id, os.O_WRONLY | os.O_TRUNC)
    except NotFoundError:
        _, fh = tree.create(parent, name)
    for off in range(0, len(data), chunk):
        tree.write(fh, off, data[off:off + chunk])
    tree.flush(fh)
    tree.release(fh)


def get(tree: DraftTree, path: str) -> bytes:
    fh = tree.open(walk(tree, path).id, os.O_RDONLY)
    try:
        return tree.read(fh, 0, 1 << 30)
    finally:
        tree.release(fh)


def listdir(tree: DraftTree, nid: int, page: int = 2) -> list[str]:
    out, after = [], 0
    while batch := tree.readdir(nid, after, page):
        out += [a.name for a in batch]
        after = batch[-1].row
    return sorted(out)


def manifest_of(store: LocalStore, rec) -> dict[str, tuple[str, int]]:
    m = Manifest.from_bytes(store.read_blob(rec.entity, rec.manifest_md5))
    return {e.path: (e.digest, e.size) for e in m}


def b64md5(data: bytes) -> str:
    return hex_to_b64(hashlib.md5(data).hexdigest())


def errno_of(fn, *args, **kw) -> int:
    """The errno the mount answers with for what ``fn`` raises (``mountfs.errors.errno_for``)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kw)
    return errno_for(info.value)


@pytest.fixture
def env(tmp_path: Path, local_store: LocalStore):
    """A manager whose base fetches are counted (the real fetch underneath)."""
    cache = Cache(tmp_path / "cache")
    real = make_fetch_base(local_store, cache)
    fetched: list[BaseRef] = []

    def fetch(ref: BaseRef) -> Path:
        fetched.append(ref)
        return real(ref)

    mgr = DraftManager(tmp_path / "cache" / "drafts", local_store, cache, fetch_base=fetch)
    yield mgr, fetched
    mgr.close()


SOURCE = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 40, "sub/deep/c": b"", "z/y/x.txt": b"x" * 70001}


# -- naming --------------------------------------------------------------------------------------------
def test_draft_names() -> None:
    assert draft_dirname("ds") == "ds:draft"
    assert draft_dirname("ds", "run-2") == "ds:draft-run-2"
    assert parse_draft_dirname("ds:draft") == ("ds", None)
    assert parse_draft_dirname("my.ds:draft-a_1") == ("my.ds", "a_1")
    for bad in ("ds:v1", "ds:latest", "ds:drafty", "ds:draft-", "ds:draft-/x", ":draft", "a/b:draft", "ds:draft--x"):
        assert parse_draft_dirname(bad) is None, bad
    with pytest.raises(ValueError):
        draft_dirname("ds", "-bad")


def test_commit_options() -> None:
    o = CommitOptions.parse(b'{"aliases": "best", "tags": ["a b"], "metadata": {"k": 1}, "description": "d"}')
    assert (o.aliases, o.tags, o.metadata, o.description) == (("best",), ("a b",), {"k": 1}, "d")
    assert CommitOptions.parse(b"  \n") == CommitOptions()
    for bad in (b"{", b"[]", b'{"alias": "x"}', b'{"aliases": ["v3"]}', b'{"metadata": 3}'):
        with pytest.raises(ValueError):
            CommitOptions.parse(bad)


# -- new collection: cp -r into an empty draft, commit ---------------------------------------------
def test_new_collection_commit_matches_add_dir(env, local_store: LocalStore, tmp_path: Path) -> None:
    mgr, fetched = env
    d = mgr.create("ent", "proj", "ds:draft", type="model")
    assert d.base is None and listdir(d.tree, ROOT_ID) == [STATUS_NAME]
    for path, data in SOURCE.items():
        put(d.tree, path, data)
    mkdirs(d.tree, "empty/dir")  # not committed: manifests list files only

    res = mgr.commit(d)
    assert res.state == "created" and res.version == "ent/proj/ds:v0"
    rec = local_store.resolve("ent", "proj", "ds", "latest")
    assert rec.type == "model" and rec.file_count == len(SOURCE)
    assert manifest_of(local_store, rec) == {p: (b64md5(v), len(v)) for p, v in SOURCE.items()}

    src = tmp_path / "src"
    for path, data in SOURCE.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    expected = compute_digest((p, hex_to_b64(md5_file(src / p))) for p in SOURCE)
    assert rec.digest == res.digest == expected
    from client.artifact import Artifact

    art = Artifact("ds", "model")
    art.add_dir(src)
    assert art.digest == rec.digest
    assert fetched == []  # nothing was ever read from a base
    for path, data in SOURCE.items():  # the bytes are in the store
        assert local_store.read_blob("ent", hashlib.md5(data).hexdigest()) == data


def test_empty_and_unchanged_drafts_create_nothing(env, local_store: LocalStore, tmp_path: Path) -> None:
    mgr, fetched = env
    d = mgr.create("ent", "proj", "new:draft")
    assert mgr.commit(d).state == "noop"
    commit_files(local_store, tmp_path, {"f": b"1"})
    d2 = mgr.create("ent", "proj", "ds:draft")
    res = mgr.commit(d2)
    assert res.state == "noop" and res.index == 0
    put(d2.tree, "f", b"2")
    put(d2.tree, "f", b"1")  # back to the base content
    assert mgr.commit(d2).state == "noop"
    assert [v.index for v in local_store.list_versions("ent", "proj", "ds")] == [0]
    assert local_store.list_collections("ent", "proj") and not any(
        c.name == "new" for c in local_store.list_collections("ent", "proj"))


# -- incremental drafts -------------------------------------------------------------------------------------
def test_incremental_draft_lazy_and_committed_by_digest(env, local_store: LocalStore, tmp_path: Path) -> None:
    mgr, fetched = env
    big = os.urandom(300_000)
    v0, _ = commit_files(local_store, tmp_path, {"keep.txt": b"keep", "big.bin": big, "dir/old.txt": b"old",
                                                 "dir/sub/m.txt": b"m", "log.txt": b"line1\n"})
    d = mgr.create("ent", "proj", "ds:draft")
    assert d.base.index == 0
    t = d.tree
    assert listdir(t, ROOT_ID) == [STATUS_NAME, "big.bin", "dir", "keep.txt", "log.txt"]
    assert walk(t, "big.bin").size == len(big) and not walk(t, "big.bin").staged
    assert fetched == []  # creating and listing fetched nothing

    put(t, "keep.txt", b"overwritten")  # O_TRUNC of a base file: no fetch
    assert fetched == []
    fh = t.open(walk(t, "big.bin").id, os.O_RDWR)  # partial write: the base is fetched once
    t.write(fh, 1000, b"PATCH")
    t.release(fh)
    assert [r.md5 for r in fetched] == [hashlib.md5(big).hexdigest()]
    fh = t.open(walk(t, "log.txt").id, os.O_WRONLY | os.O_APPEND)
    t.write(fh, 0, b"line2\n")  # O_APPEND: the offset is the end of file
    t.release(fh)
    t.rename(walk(t, "dir").id, "old.txt", walk(t, "dir/sub").id, "moved.txt")
    t.rename(ROOT_ID, "dir", ROOT_ID, "renamed")
    t.unlink(walk(t, "renamed/sub").id, "m.txt")
    put(t, "new/n.txt", b"new")

    res = mgr.commit(d)
    assert res.state == "created" and res.index == 1
    patched = big[:1000] + b"PATCH" + big[1005:]
    want = {"keep.txt": b"overwritten", "big.bin": patched, "log.txt": b"line1\nline2\n",
            "renamed/sub/moved.txt": b"old", "new/n.txt": b"new"}
    v1 = local_store.resolve("ent", "proj", "ds", "latest")
    assert manifest_of(local_store, v1) == {p: (b64md5(v), len(v)) for p, v in want.items()}
    # renamed base file: committed by digest, never uploaded again
    assert res.bytes_uploaded < len(patched) + 2000
    for p, v in want.items():
        assert get(t, p) == v


def test_commit_continues_from_new_version(env, local_store: LocalStore) -> None:
    mgr, fetched = env
    d = mgr.create("ent", "proj", "ckpt:draft")
    t = d.tree
    for step in range(3):
        put(t, "model.pt", f"weights {step}".encode() * 1000)
        put(t, f"logs/{step}.txt", b"log")
        res = mgr.commit(d)
        assert (res.state, res.index) == ("created", step)
        assert d.base.index == step
        assert os.listdir(d.root / "data") == [str(walk(t, STATUS_NAME).id)]  # staged data moved out
    assert walk(t, "model.pt").staged is False
    assert get(t, "model.pt") == b"weights 2" * 1000  # served from the cache object it was moved to
    assert mgr.cache.lookup(hashlib.md5(b"weights 2" * 1000).hexdigest()) is not None
    assert [v.index for v in local_store.list_versions("ent", "proj", "ckpt")] == [0, 1, 2]


# -- hash while writing -------------------------------------------------------------------------------
def test_sequential_writes_are_not_read_again(env, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr, _ = env
    hashed: list[Path] = []
    real = draft_commit.md5_file
    monkeypatch.setattr(draft_commit, "md5_file", lambda p: (hashed.append(Path(p)), real(p))[1])
    d = mgr.create("ent", "proj", "h:draft")
    t = d.tree
    seq = os.urandom(500_000)
    put(t, "seq.bin", seq)
    _, fh = t.create(ROOT_ID, "random.bin")
    t.write(fh, 10, b"tail")
    t.write(fh, 0, b"0123456789")
    t.release(fh)
    res = mgr.commit(d)
    assert res.state == "created"
    assert [p.name for p in hashed] == [str(walk(t, "random.bin").id)]  # only the non-sequential file
    m = manifest_of(mgr.store, mgr.store.resolve("ent", "proj", "h", "latest"))
    assert m["seq.bin"] == (b64md5(seq), len(seq))
    assert m["random.bin"] == (b64md5(b"0123456789tail"), 14)


def test_copy_up_then_append_keeps_running_hash(env, local_store: LocalStore, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mgr, fetched = env
    commit_files(local_store, tmp_path, {"train.log": b"epoch 0\n"})
    hashed: list[Path] = []
    real = draft_commit.md5_file
    monkeypatch.setattr(draft_commit, "md5_file", lambda p: (hashed.append(Path(p)), real(p))[1])
    d = mgr.create("ent", "proj", "ds:draft")
    fh = d.tree.open(walk(d.tree, "train.log").id, os.O_WRONLY | os.O_APPEND)
    d.tree.write(fh, 0, b"epoch 1\n")
    d.tree.release(fh)
    assert len(fetched) == 1
    assert mgr.commit(d).state == "created" and hashed == []
    assert get(d.tree, "train.log") == b"epoch 0\nepoch 1\n"


# -- POSIX behaviour ------------------------------------------------------------------------------------
def test_posix_errors_and_semantics(env) -> None:
    mgr, _ = env
    t = mgr.create("ent", "proj", "p:draft").tree
    put(t, "d/f", b"data")
    put(t, "g", b"gg")
    d = walk(t, "d").id
    assert errno_of(t.create, d, "f") == errno.EEXIST
    assert errno_of(t.mkdir, ROOT_ID, "d") == errno.EEXIST
    assert errno_of(t.lookup, ROOT_ID, "nope") == errno.ENOENT
    assert errno_of(t.rmdir, ROOT_ID, "d") == errno.ENOTEMPTY
    assert errno_of(t.rmdir, ROOT_ID, "g") == errno.ENOTDIR
    assert errno_of(t.unlink, ROOT_ID, "d") == errno.EISDIR
    assert errno_of(t.lookup, walk(t, "g").id, "x") == errno.ENOTDIR
    assert errno_of(t.open, d, os.O_RDONLY) == errno.EISDIR
    assert errno_of(t.rename, ROOT_ID, "d", d, "inside") == errno.EINVAL
    assert errno_of(t.rename, ROOT_ID, "g", ROOT_ID, "d") == errno.EISDIR
    assert errno_of(t.rename, ROOT_ID, "d", ROOT_ID, "g") == errno.ENOTDIR
    mkdirs(t, "e/x")
    assert errno_of(t.rename, ROOT_ID, "d", ROOT_ID, "e") == errno.ENOTEMPTY
    assert errno_of(t.rename, ROOT_ID, "g", d, "f", os.RENAME_NOREPLACE if hasattr(os, "RENAME_NOREPLACE") else 1) \
        == errno.EEXIST
    assert errno_of(t.link, d, ROOT_ID, "h") == errno.EPERM  # no hard links to directories
    assert errno_of(t.link, walk(t, "g").id, ROOT_ID, "d") == errno.EEXIST
    assert errno_of(t.symlink, ROOT_ID, "g", "x") == errno.EEXIST
    assert errno_of(t.symlink, ROOT_ID, "l", "") == errno.ENOENT
    assert errno_of(t.mknod, ROOT_ID, "fifo", 0o010644) == errno.EPERM
    assert errno_of(t.create, ROOT_ID, "a/b") == errno.EINVAL
    assert errno_of(t.create, ROOT_ID, "x" * 256) == errno.ENAMETOOLONG
    assert t.mknod(ROOT_ID, "regular", 0o100644).size == 0
    fh = t.open(walk(t, "g").id, os.O_RDONLY)
    assert errno_of(t.write, fh, 0, b"x") == errno.EBADF
    t.release(fh)
    assert errno_of(t.read, 999, 0, 1) == errno.EBADF

    # rename replaces a file; an empty target directory is replaced too
    t.rename(ROOT_ID, "g", d, "f")
    assert get(t, "d/f") == b"gg" and errno_of(walk, t, "g") == errno.ENOENT
    t.rename(ROOT_ID, "d", walk(t, "e").id, "x")
    assert get(t, "e/x/f") == b"gg"
    # truncate grows with zeros and shrinks; sparse writes read back zeros
    f = walk(t, "e/x/f").id
    t.setattr(f, size=5)
    assert get(t, "e/x/f") == b"gg\0\0\0"
    t.setattr(f, size=1)
    assert get(t, "e/x/f") == b"g"
    fh = t.open(f, os.O_RDWR)
    t.write(fh, 4, b"Z")
    assert t.read(fh, 0, 100) == b"g\0\0\0Z" and t.read(fh, 100, 5) == b""
    t.release(fh)
    # utimens
    t.setattr(f, atime_ns=1_000_000_000, mtime_ns=2_000_000_000)
    assert walk(t, "e/x/f").mtime_ns == 2_000_000_000
    # unlink while open: the handle keeps its bytes until release
    fh = t.open(f, os.O_RDWR)
    t.unlink(walk(t, "e/x").id, "f")
    assert errno_of(walk, t, "e/x/f") == errno.ENOENT
    assert t.read(fh, 0, 10) == b"g\0\0\0Z"
    t.release(fh)
    assert not t.data.path(f).exists()
    # readdir pages in stable order, rmdir of an empty dir
    for i in range(7):
        put(t, f"many/{i}", b"")
    assert listdir(t, walk(t, "many").id, page=3) == [str(i) for i in range(7)]
    t.rmdir(walk(t, "e").id, "x")
    st = mgr.statfs()
    assert st.bsize > 0 and st.namemax == 255


def test_status_file_is_read_only(env) -> None:
    mgr, _ = env
    d = mgr.create("ent", "proj", "s:draft")
    put(d.tree, "f", b"1")
    mgr.commit(d)
    status = json.loads(get(d.tree, STATUS_NAME))
    assert status["last_commit"]["state"] == "created" and status["base"] == "s:v0"
    sid = walk(d.tree, STATUS_NAME).id
    assert errno_of(d.tree.open, sid, os.O_WRONLY) == errno.EACCES
    assert errno_of(d.tree.rename, ROOT_ID, STATUS_NAME, ROOT_ID, "x") == errno.EPERM
    assert errno_of(d.tree.setattr, sid, size=0) == errno.EPERM


# -- the sentinel ---------------------------------------------------------------------------------------
def test_sentinel_commits_with_options_and_reports_failures(env, local_store: LocalStore) -> None:
    mgr, _ = env
    d = mgr.create("ent", "proj", "ds:draft")
    t = d.tree
    put(t, "w.bin", b"w1")
    put(t, COMMIT_NAME, json.dumps({"aliases": ["best"], "tags": ["nightly"], "description": "from the mount",
                                   "metadata": {"acc": 0.9}}).encode())  # close -> flush -> commit
    rec = local_store.resolve("ent", "proj", "ds", "best")
    assert rec.index == 0 and rec.tags == ("nightly",) and rec.metadata == {"acc": 0.9}
    assert rec.description == "from the mount"
    assert set(manifest_of(local_store, rec)) == {"w.bin"}  # control files are never committed

    put(t, "w.bin", b"w2")
    t.setattr(walk(t, COMMIT_NAME).id, mtime_ns=5)  # `touch` on an existing .commit: utimens
    assert local_store.resolve("ent", "proj", "ds", "latest").index == 1

    put(t, "w.bin", b"w3")
    put(t, COMMIT_NAME, b"{not json")  # the last release commits; a failure is in the status
    assert local_store.resolve("ent", "proj", "ds", "latest").index == 1  # no version
    assert d.last_result.state == "failed" and "JSON" in d.last_result.error
    assert get(t, "w.bin") == b"w3" and walk(t, "w.bin").staged  # nothing lost
    assert json.loads(get(t, STATUS_NAME))["last_commit"]["state"] == "failed"
    put(t, COMMIT_NAME, b"")
    assert local_store.resolve("ent", "proj", "ds", "latest").index == 2


def test_registry_refusal_keeps_staged_files(env, local_store: LocalStore, tmp_path: Path) -> None:
    mgr, _ = env
    commit_files(local_store, tmp_path, {"f": b"1"}, type="dataset")
    d = mgr.create("ent", "proj", "ds:draft")
    put(d.tree, "f", b"2")
    res = mgr.commit(d, CommitOptions(type="model"))  # the collection is a dataset
    assert res.state == "failed" and "ConflictError" in res.error
    assert not mgr.has_pending_intent(d) and get(d.tree, "f") == b"2"
    assert mgr.commit(d).state == "created"


# -- restart, crash, recovery ----------------------------------------------------------------------------
_CHILD = r"""
import os, sys
from pathlib import Path
from client.cache import Cache
from client.errors import NotFoundError
from client.store.local import LocalStore
from mountfs.drafts import commit as draft_commit
from mountfs.errors import errno_for
from mountfs.drafts.manager import DraftManager, ROOT_ID
tmp, mode = Path(sys.argv[1]), sys.argv[2]
mgr = DraftManager(tmp / "drafts", LocalStore(tmp / "store"), Cache(tmp / "cache"))
if mode == "write":
    d = mgr.create("ent", "proj", "ds:draft")
    t = d.tree
    sub = t.mkdir(ROOT_ID, "sub").id
    _, fh = t.create(sub, "synced.bin")
    t.write(fh, 0, b"S" * 100000)
    t.fsync(t.handle_node(fh))
    _, fh2 = t.create(ROOT_ID, "unsynced.bin")
    t.write(fh2, 0, b"U" * 5000)
    t.rename(ROOT_ID, "sub", ROOT_ID, "moved")
    print("READY", flush=True)
    sys.stdin.read()  # killed here, handles open
else:
    def crash(name):
        if name == mode:
            os.kill(os.getpid(), 9)
    draft_commit._checkpoint = crash
    d = mgr.list()[0]
    _, fh = d.tree.create(ROOT_ID, mode + ".txt")
    d.tree.write(fh, 0, mode.encode())
    d.tree.release(fh)
    mgr.commit(d)
    print("NOT KILLED", flush=True)
"""


def _child(tmp_path: Path, mode: str, *, wait_ready: bool = False) -> int:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    envv = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=envv, cwd=REPO)
    if wait_ready:
        assert p.stdout.readline() == b"READY\n"
        p.kill()  # SIGKILL
    p.wait()
    p.stdout.close()
    p.stdin.close()
    return p.returncode


def test_kill9_keeps_fsynced_data_and_commit_crashes_are_all_or_nothing(tmp_path: Path) -> None:
    assert _child(tmp_path, "write", wait_ready=True) == -signal.SIGKILL
    store, cache = LocalStore(tmp_path / "store"), Cache(tmp_path / "cache")
    mgr = DraftManager(tmp_path / "drafts", store, cache)
    [d] = mgr.list()
    assert d.dirname == "ds:draft"
    assert get(d.tree, "moved/synced.bin") == b"S" * 100000
    assert walk(d.tree, "unsynced.bin").size in (0, 5000)  # whatever reached the file, never garbage
    mgr.close()

    # killed after the intent, before the registry commit: no version, draft intact, retried
    assert _child(tmp_path, "before_store_commit") == -signal.SIGKILL
    with pytest.raises(NotFoundError):
        store.resolve("ent", "proj", "ds", "latest")
    mgr = DraftManager(tmp_path / "drafts", store, cache)
    [d] = mgr.list()
    assert mgr.has_pending_intent(d) and get(d.tree, "before_store_commit.txt") == b"before_store_commit"
    [res] = mgr.recover_commits()
    assert (res.state, res.index) == ("created", 0) and not mgr.has_pending_intent(d)
    assert set(manifest_of(store, store.resolve("ent", "proj", "ds", "v0"))) == {
        "moved/synced.bin", "unsynced.bin", "before_store_commit.txt"}
    mgr.close()

    # killed right after the registry commit: the restart only finishes the rebase
    assert _child(tmp_path, "after_store_commit") == -signal.SIGKILL
    assert [v.index for v in store.list_versions("ent", "proj", "ds")] == [0, 1]
    mgr = DraftManager(tmp_path / "drafts", store, cache)
    [d] = mgr.list()
    [res] = mgr.recover_commits()
    assert res.resumed and res.index == 1 and d.base.index == 1
    assert not walk(d.tree, "after_store_commit.txt").staged
    assert get(d.tree, "after_store_commit.txt") == b"after_store_commit"
    assert mgr.commit(d).state == "noop"
    assert [v.index for v in store.list_versions("ent", "proj", "ds")] == [0, 1]
    mgr.close()

    # killed mid-rebase (data already moved into the cache, rows not yet rebased)
    assert _child(tmp_path, "data_adopted") == -signal.SIGKILL
    mgr = DraftManager(tmp_path / "drafts", store, cache)
    [d] = mgr.list()
    [res] = mgr.recover_commits()
    assert res.resumed and res.index == 2
    t = d.tree
    assert not walk(t, "data_adopted.txt").staged and walk(t, "data_adopted.txt").size == len("data_adopted")
    assert get(t, "data_adopted.txt") == b"data_adopted" and get(t, "moved/synced.bin") == b"S" * 100000
    assert [v.index for v in store.list_versions("ent", "proj", "ds")] == [0, 1, 2]
    mgr.close()
    store.close()


def test_drafts_survive_restart(env, tmp_path: Path) -> None:
    mgr, _ = env
    d = mgr.create("ent", "proj", "ds:draft-a")
    put(d.tree, "x/y", b"yy")
    mgr.create("ent", "proj", "ds:draft-b")
    assert errno_of(mgr.create, "ent", "proj", "ds:draft-a") == errno.EEXIST
    assert errno_of(mgr.create, "ent", "proj", "ds:v1") == errno.EINVAL
    mgr.close()
    again = DraftManager(mgr.root, mgr.store, mgr.cache)
    assert again.names("ent", "proj") == ["ds:draft-a", "ds:draft-b"]
    d = again.get("ent", "proj", "ds:draft-a")
    assert get(d.tree, "x/y") == b"yy"
    assert errno_of(again.remove, d) == errno.ENOTEMPTY
    d.tree.unlink(walk(d.tree, "x").id, "y")
    d.tree.rmdir(ROOT_ID, "x")
    again.remove(d)
    assert again.names("ent", "proj") == ["ds:draft-b"] and not d.root.exists()
    again.close()


def test_links_and_times_survive_restart_and_old_drafts_gain_the_columns(env, tmp_path: Path) -> None:
    """Hard links, symbolic links and ctime are in the draft db; a draft made before they were
    (no atime/ctime/link_to columns) opens and takes links."""
    import sqlite3

    mgr, _ = env
    d = mgr.create("ent", "proj", "ds:draft")
    put(d.tree, "f", b"data")
    f = walk(d.tree, "f").id
    d.tree.link(f, ROOT_ID, "g")
    d.tree.symlink(ROOT_ID, "l", "f")
    d.tree.setattr(f, atime_ns=5, mtime_ns=7)
    before = d.tree.getattr(f)
    old = DraftManager(tmp_path / "old-drafts", mgr.store, mgr.cache)
    o = old.create("ent", "proj", "ds:draft")
    put(o.tree, "kept", b"k")
    mgr.close()
    old.close()
    cols = "id, parent, name, is_dir, mode, size, mtime_ns, staged, digest, entry"
    with sqlite3.connect(o.root / "draft.db") as db:  # the schema of drafts made before links
        db.executescript(f"""
            CREATE TABLE old AS SELECT {cols} FROM nodes; DROP TABLE nodes;
            CREATE TABLE nodes (id INTEGER PRIMARY KEY, parent INTEGER, name TEXT NOT NULL,
                is_dir INTEGER NOT NULL, mode INTEGER NOT NULL, size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL, staged INTEGER NOT NULL DEFAULT 0, digest TEXT, entry TEXT);
            CREATE UNIQUE INDEX nodes_by_name ON nodes(parent, name);
            INSERT INTO nodes ({cols}) SELECT {cols} FROM old; DROP TABLE old;""")
    again = DraftManager(mgr.root, mgr.store, mgr.cache)
    d = again.get("ent", "proj", "ds:draft")
    a = d.tree.getattr(f)
    assert (a.nlink, a.atime_ns, a.mtime_ns, a.ctime_ns) == (2, 5, 7, before.ctime_ns)
    assert d.tree.lookup(ROOT_ID, "g").id == f and get(d.tree, "g") == b"data"
    assert d.tree.readlink(d.tree.lookup(ROOT_ID, "l").id) == "f"
    again.close()
    reopened = DraftManager(tmp_path / "old-drafts", mgr.store, mgr.cache)
    o = reopened.get("ent", "proj", "ds:draft")
    kept = walk(o.tree, "kept").id
    o.tree.link(kept, ROOT_ID, "kept2")
    assert get(o.tree, "kept2") == b"k" and o.tree.getattr(kept).nlink == 2
    reopened.close()


# -- two mounts, one collection ------------------------------------------------------------------------
def test_concurrent_commits_from_two_managers(tmp_path: Path, local_store: LocalStore) -> None:
    commit_files(local_store, tmp_path, {"shared.txt": b"base"})
    managers = [DraftManager(tmp_path / f"mount{i}" / "drafts", LocalStore(tmp_path / "store"),
                             Cache(tmp_path / f"mount{i}" / "cache")) for i in range(2)]
    drafts = [m.create("ent", "proj", "ds:draft") for m in managers]
    for i, d in enumerate(drafts):
        for j in range(20):
            put(d.tree, f"m{i}/{j}.txt", f"{i}-{j}".encode())
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def run(i: int) -> None:
        barrier.wait()
        results[i] = managers[i].commit(drafts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(r.index for r in results) == [1, 2] and all(r.state == "created" for r in results)
    first, second = sorted(range(2), key=lambda i: results[i].index)
    m = manifest_of(local_store, local_store.resolve("ent", "proj", "ds", "v1"))
    assert set(m) == {"shared.txt"} | {f"m{first}/{j}.txt" for j in range(20)}
    # the later commit is merged onto the earlier one, whether it saw it at its start or only
    # at the registry commit (expect_latest refused it, and it was planned again)
    m = manifest_of(local_store, local_store.resolve("ent", "proj", "ds", "v2"))
    assert set(m) == {"shared.txt"} | {f"m{i}/{j}.txt" for i in range(2) for j in range(20)}
    assert results[second].merged_onto == "ent/proj/ds:v1"
    for m in managers:
        m.store.close()
        m.close()


def test_a_commit_racing_another_is_merged_not_lost(env, local_store: LocalStore, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer commits between this commit's plan and its registry commit (the
    fault-injection point): the registry refuses the stale plan and it is merged again."""
    commit_files(local_store, tmp_path, {"shared.txt": b"base"})
    mgr, _ = env
    d = mgr.create("ent", "proj", "ds:draft")
    put(d.tree, "mine.txt", b"mine")
    raced: list[int] = []

    def race(name: str) -> None:
        if name == "before_store_commit" and not raced:
            rec, _ = commit_files(local_store, tmp_path, {"shared.txt": b"base", "theirs.txt": b"theirs"})
            raced.append(rec.index)

    monkeypatch.setattr(draft_commit, "_checkpoint", race)
    res = mgr.commit(d)
    assert raced == [1] and res.state == "created" and res.index == 2, res
    assert res.merged_onto == "ent/proj/ds:v1"
    m = manifest_of(local_store, local_store.resolve("ent", "proj", "ds", "latest"))
    assert set(m) == {"shared.txt", "mine.txt", "theirs.txt"}
    assert get(d.tree, "theirs.txt") == b"theirs"  # the draft now shows the merged version


def test_nowait_paths_give_up_without_changing_anything(env, local_store: LocalStore, tmp_path: Path) -> None:
    """The mount's event-loop fast paths: a plain write into a staged file, flush, release.
    Anything that could wait (a commit holds the lock) or needs more (a copy-up of base
    content, a commit request) answers None/False and leaves the state as it was."""
    mgr, fetched = env
    commit_files(local_store, tmp_path, {"base.txt": b"base content"})
    d = mgr.create("ent", "proj", "ds:draft")
    t = d.tree
    _, fh = t.create(ROOT_ID, "new.bin")
    assert t.write_nowait(fh, 0, b"abc") == 3 and t.write_nowait(fh, 3, b"def") == 3
    # a commit (any other thread) holds the lock: nothing is done on the loop
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with t.lock:
            held.set()
            done.wait()

    th = threading.Thread(target=holder)
    th.start()
    held.wait()
    try:
        assert t.write_nowait(fh, 6, b"X") is None
        assert t.flush_nowait(fh) is False and t.release_nowait(fh) is False
    finally:
        done.set()
        th.join()
    assert t.flush_nowait(fh) is True and t.release_nowait(fh) is True
    assert get(t, "new.bin") == b"abcdef"
    # a partial write into an unchanged base file needs its content first: not on the loop
    bfh = t.open(walk(t, "base.txt").id, os.O_RDWR)
    assert t.write_nowait(bfh, 0, b"B") is None and fetched == [] and not walk(t, "base.txt").staged
    t.write(bfh, 0, b"B")
    assert t.write_nowait(bfh, 1, b"A") == 1  # staged now
    t.release(bfh)
    assert get(t, "base.txt") == b"BAse content"
    # the sentinel: written on the loop (arms it); flush never commits, its last release does (thread)
    _, sfh = t.create(ROOT_ID, COMMIT_NAME)
    assert t.write_nowait(sfh, 0, b"{}") == 2
    assert t.flush_nowait(sfh) is True and t.release_nowait(sfh) is False
    t.release(sfh)
    # an unlinked file's last release purges it (a transaction): thread
    _, ufh = t.create(ROOT_ID, "gone.txt")
    t.unlink(ROOT_ID, "gone.txt")
    assert t.release_nowait(ufh) is False
    t.release(ufh)
