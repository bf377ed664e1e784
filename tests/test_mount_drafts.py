"""End-to-end tests of writable drafts on real FUSE mounts of a real embedded store.

Every test mounts through ``tests.mount_helpers.mounted`` (the daemon exactly as users run
it), which unmounts and reaps the daemon in its teardown.  Versions are read back through the
mount and through the SDK; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.store.local import LocalStore
from mountfs.daemon import MountOptions, is_mounted
from tests.mount_helpers import mounted, requires_fuse, start_daemon, unmount_and_reap, wait_for_mount
from tests.test_mount_read import commit_tree, sha256_tree

pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.timeout(120)]

MiB = 1 << 20
PROJ = "ent/proj"


def make_src(root: Path, big: int = 3 * MiB) -> Path:
    """A small tree: nesting, a unicode name, an empty file, one multi-MiB file."""
    files = {
        "README.md": b"# data\n",
        "empty.txt": b"",
        "caf\u00e9 dir/n\u00e4me.txt": "unicode\n".encode(),
        "a/b/c.bin": os.urandom(70_000),
        "a/d.bin": os.urandom(1),
        "big/weights.bin": os.urandom(big),
    }
    files.update({f"many/f{i:02d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(20)})
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def status(draft: Path) -> dict:
    """The draft's last commit result, from the xattr (and the same JSON in .commit.status)."""
    st = json.loads(os.getxattr(draft, "user.artifact.draft.status"))
    assert json.loads((draft / ".commit.status").read_text()) == st
    return st["last_commit"]


def commit(draft: Path, options: dict | None = None) -> dict:
    """Touch (or write JSON into) the sentinel; close() waits for the commit."""
    if options is None:
        (draft / ".commit").touch()
    else:
        (draft / ".commit").write_text(json.dumps(options))
    return status(draft)


def sdk_api(store: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ARTIFACTFS_STORE", str(store))
    import client

    return client.Api()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    LocalStore(tmp_path / "store").close()
    yield tmp_path


# -- new drafts: cp -r, rsync -a, SDK digest ------------------------------------------------------
def test_cp_and_rsync_into_new_drafts_match_add_dir(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_src(world / "src")
    expected = sha256_tree(src)
    with mounted(world / "store", world) as m:
        os.makedirs(m.path / PROJ)  # a new entity and project: they exist in memory until a draft is made
        assert os.listdir(m.path / PROJ) == []
        cp_draft = m.path / PROJ / "ds:draft"
        cp_draft.mkdir()
        subprocess.run(["cp", "-r", f"{src}/.", str(cp_draft)], check=True)
        res = commit(cp_draft)
        assert res["state"] == "created" and res["version"] == "ent/proj/ds:v0"
        rs_draft = m.path / PROJ / "rs:draft-sync"
        rs_draft.mkdir()
        subprocess.run(["rsync", "-a", f"{src}/", f"{rs_draft}/"], check=True)
        assert commit(rs_draft)["version"] == "ent/proj/rs:v0"
        names = set(os.listdir(m.path / PROJ))
        assert {"ds:v0", "ds:latest", "ds:draft", "rs:v0", "rs:latest", "rs:draft-sync"} <= names
        for vdir in ("ds:v0", "ds:latest", "rs:v0"):
            assert sha256_tree(m.path / PROJ / vdir) == expected
        # the drafts go on from the new version: unchanged, a touch commits nothing
        assert sha256_tree(cp_draft) == {**expected, ".commit": sha256_tree(cp_draft)[".commit"],
                                         ".commit.status": sha256_tree(cp_draft)[".commit.status"]}
        assert commit(cp_draft)["state"] == "noop"
        digest = os.getxattr(m.path / PROJ / "ds:v0", "user.artifact.digest").decode()

    import client

    api = sdk_api(world / "store", monkeypatch)
    local = client.Artifact("local", "dataset")
    local.add_dir(str(src))
    for name in ("ent/proj/ds:v0", "ent/proj/rs:latest"):
        art = api.artifact(name)
        assert art.digest == local.digest == digest
        out = Path(art.download(str(world / "dl" / name.replace("/", "_"))))
        assert sha256_tree(out) == expected


def test_cp_into_a_draft_writes_1mib_requests(world: Path) -> None:
    """st_blksize 1 MiB: cp sizes its buffer from it, so 8 MiB travel in ~8 writes, not 64."""
    src = world / "big.bin"
    data = os.urandom(8 * MiB)
    src.write_bytes(data)
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "ds:draft"
        draft.mkdir(parents=True)
        before = m.stats()["requests"].get("write", 0)
        subprocess.run(["cp", str(src), str(draft / "big.bin")], check=True)
        writes = m.stats()["requests"].get("write", 0) - before
        assert os.stat(draft / "big.bin").st_blksize == MiB
        assert 8 <= writes <= 10, writes
        assert (draft / "big.bin").read_bytes() == data


# -- incremental drafts ---------------------------------------------------------------------------
def test_incremental_change_add_rename_delete(world: Path) -> None:
    src = make_src(world / "src")
    store = LocalStore(world / "store")
    commit_tree(store, src, world)
    store.close()
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "ds:draft"
        draft.mkdir()
        assert sha256_tree(m.path / PROJ / "ds:v0") == sha256_tree(src)
        with open(draft / "a/b/c.bin", "r+b") as f:  # partial overwrite of a base file
            f.seek(100)
            f.write(b"CHANGED")
        (draft / "new.txt").write_bytes(b"brand new\n")
        os.rename(draft / "README.md", draft / "README.txt")
        os.rename(draft / "many", draft / "lots")  # a directory of 20 files
        os.unlink(draft / "a/d.bin")
        res = commit(draft)
        assert res["state"] == "created" and res["index"] == 1
        # exactly the changed file, the new file and the manifest were uploaded; renamed and
        # unchanged files are committed by digest
        assert res["blobs_uploaded"] == 3
        assert res["bytes_uploaded"] < 70_000 + 10 + 20_000

        exp = dict(sha256_tree(src))
        changed = bytearray((src / "a/b/c.bin").read_bytes())
        changed[100:107] = b"CHANGED"
        import hashlib

        exp["a/b/c.bin"] = hashlib.sha256(changed).hexdigest()
        exp["new.txt"] = hashlib.sha256(b"brand new\n").hexdigest()
        exp["README.txt"] = exp.pop("README.md")
        for k in [k for k in exp if k.startswith("many/")]:
            exp["lots/" + k[5:]] = exp.pop(k)
        del exp["a/d.bin"]
        assert sha256_tree(m.path / PROJ / "ds:v1") == exp
        assert sha256_tree(m.path / PROJ / "ds:latest") == exp
        assert sha256_tree(m.path / PROJ / "ds:v0") == sha256_tree(src)  # v0 is untouched

        # a training loop: keep writing checkpoints and touching .commit
        for step in range(2):
            (draft / "big/weights.bin").write_bytes(bytes([step]) * 1000)
            res = commit(draft)
            assert (res["state"], res["index"], res["blobs_uploaded"]) == ("created", 2 + step, 2)  # + manifest
        assert (m.path / PROJ / "ds:latest/big/weights.bin").read_bytes() == b"\x01" * 1000


# -- unmount commits: fusermount -u and SIGTERM ---------------------------------------------------
def test_unmount_and_sigterm_commit(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "ds:draft"
        os.makedirs(draft)
        (draft / "x.txt").write_bytes(b"written before umount\n")
    opts = MountOptions(str(world / "mnt"), store=str(world / "store"), cache_dir=str(world / "cache"))
    proc = start_daemon(opts, world / "daemon2.log")
    try:
        wait_for_mount(proc, world / "mnt", world / "daemon2.log")
        (world / "mnt" / PROJ / "ds:draft" / "y.txt").write_bytes(b"written before SIGTERM\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        unmount_and_reap(proc, world / "mnt")
    assert not is_mounted(world / "mnt")
    api = sdk_api(world / "store", monkeypatch)
    v0, v1 = api.artifact("ent/proj/ds:v0"), api.artifact("ent/proj/ds:v1")
    assert sorted(e for e in v0.manifest.entries) == ["x.txt"]
    assert sorted(e for e in v1.manifest.entries) == ["x.txt", "y.txt"]


# -- crash safety -----------------------------------------------------------------------------------
def test_kill9_keeps_fsynced_data_and_commits_after_remount(world: Path) -> None:
    opts = MountOptions(str(world / "mnt"), store=str(world / "store"), cache_dir=str(world / "cache"))
    log = world / "daemon.log"
    proc = start_daemon(opts, log)
    payload = os.urandom(2 * MiB + 5)
    try:
        wait_for_mount(proc, world / "mnt", log)
        draft = world / "mnt" / PROJ / "ck:draft"
        os.makedirs(draft / "sub")
        with open(draft / "sub" / "synced.bin", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        writer = os.open(draft / "in-flight.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(writer, b"x" * 4096)
        proc.kill()  # kill -9 while a file is open for writing
        proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.close(writer)
    finally:
        unmount_and_reap(proc, world / "mnt")
    assert not is_mounted(world / "mnt")
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "ck:draft"
        assert "ck:draft" in os.listdir(m.path / PROJ)
        assert (draft / "sub" / "synced.bin").read_bytes() == payload
        res = commit(draft)
        assert res["state"] == "created"
        assert (m.path / PROJ / "ck:v0" / "sub" / "synced.bin").read_bytes() == payload


# -- two mounts, one collection ------------------------------------------------------------------
def test_two_mounts_commit_concurrently(world: Path) -> None:
    src = make_src(world / "src", big=1000)
    store = LocalStore(world / "store")
    commit_tree(store, src, world)
    store.close()
    (world / "a").mkdir()
    (world / "b").mkdir()
    with mounted(world / "store", world / "a") as ma, mounted(world / "store", world / "b") as mb:
        drafts = []
        for m, name in ((ma, "from-a.txt"), (mb, "from-b.txt")):
            d = m.path / PROJ / "ds:draft"
            d.mkdir()
            (d / name).write_text(name)
            drafts.append(d)
        results: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda d=d: results.__setitem__(str(d), commit(d))) for d in drafts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(r["index"] for r in results.values()) == [1, 2]
        assert all(r["state"] == "created" for r in results.values())
        for d, name, other in zip(drafts, ("from-a.txt", "from-b.txt"), ("from-b.txt", "from-a.txt")):
            res = results[str(d)]
            tree = sha256_tree(ma.path / PROJ / f"ds:v{res['index']}")
            # its own file on top of the base; the other's too exactly when it was merged onto it
            assert name in tree and set(sha256_tree(src)) <= set(tree)
            assert (other in tree) == (res["merged_onto"] is not None), res


# -- POSIX behaviour ---------------------------------------------------------------------------------
def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def test_posix_suite(world: Path) -> None:
    src = make_src(world / "src", big=1000)
    store = LocalStore(world / "store")
    commit_tree(store, src, world)
    store.close()
    with mounted(world / "store", world) as m:
        proj = m.path / PROJ
        d = proj / "ds:draft"
        d.mkdir()
        # write at an offset (leaving a hole), append, truncate
        fd = os.open(d / "f.bin", os.O_RDWR | os.O_CREAT, 0o644)
        assert os.pwrite(fd, b"tail", 10) == 4
        os.fsync(fd)
        os.close(fd)
        assert (d / "f.bin").read_bytes() == b"\0" * 10 + b"tail"
        with open(d / "f.bin", "ab") as f:
            f.write(b"+app")
        assert (d / "f.bin").read_bytes() == b"\0" * 10 + b"tail+app"
        os.truncate(d / "f.bin", 3)
        assert os.stat(d / "f.bin").st_size == 3
        os.truncate(d / "f.bin", 6)
        assert (d / "f.bin").read_bytes() == b"\0" * 6
        # O_TRUNC of a base file, then rewrite
        with open(d / "README.md", "wb") as f:
            f.write(b"new readme")
        assert (d / "README.md").read_bytes() == b"new readme"
        # rename over an existing file; directories
        (d / "g.txt").write_text("g")
        os.rename(d / "g.txt", d / "README.md")
        assert (d / "README.md").read_text() == "g" and not (d / "g.txt").exists()
        os.mkdir(d / "dir")
        (d / "dir" / "in.txt").write_text("in")
        assert _errno(os.rmdir, d / "dir") == errno.ENOTEMPTY
        os.rename(d / "dir", d / "dir2")
        assert (d / "dir2" / "in.txt").read_text() == "in"
        os.unlink(d / "dir2" / "in.txt")
        os.rmdir(d / "dir2")
        assert not (d / "dir2").exists()
        # utimens, fsync of a directory, statfs
        os.utime(d / "f.bin", ns=(1_000_000_000, 1_234_567_890_123_456_789))
        assert os.stat(d / "f.bin").st_mtime_ns == 1_234_567_890_123_456_789
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        vfs = os.statvfs(m.path)
        assert vfs.f_blocks > 0 and vfs.f_bavail > 0 and vfs.f_namemax == 255
        df = subprocess.run(["df", "-P", str(d)], capture_output=True, text=True, check=True)
        assert str(m.path) in df.stdout
        # what a manifest cannot hold
        assert _errno(os.mkfifo, d / "fifo") == errno.EPERM
        assert _errno(os.setxattr, d / "f.bin", "user.x", b"1") == errno.ENOTSUP
        assert _errno(os.open, d / ".commit.status", os.O_WRONLY) in (errno.EACCES, errno.EPERM)
        # versions stay read-only; names and moves that cannot work
        assert _errno(os.open, proj / "ds:v0" / "new", os.O_WRONLY | os.O_CREAT) == errno.EROFS
        assert _errno(os.unlink, proj / "ds:v0" / "README.md") == errno.EROFS
        assert _errno(os.mkdir, proj / "ds:v7") == errno.EROFS
        assert _errno(os.mkdir, proj / "not-a-draft") == errno.EINVAL
        assert _errno(os.rename, d / "f.bin", proj / "ds:v0" / "f.bin") == errno.EXDEV
        assert _errno(os.mkdir, d) == errno.EEXIST
        # a non-empty draft is not removed by rmdir; rm -rf discards it
        assert _errno(os.rmdir, d) == errno.ENOTEMPTY
        res = commit(d)
        assert res["state"] == "created"
        v1 = sha256_tree(proj / "ds:v1")
        assert "f.bin" in v1 and "README.md" in v1 and ".commit" not in v1 and ".commit.status" not in v1
        assert os.stat(proj / "ds:v1" / "f.bin").st_size == 6
        subprocess.run(["rm", "-rf", str(d)], check=True)
        assert "ds:draft" not in os.listdir(proj)


def test_commit_json_options(world: Path) -> None:
    with mounted(world / "store", world) as m:
        d = m.path / PROJ / "model:draft-run1"
        os.makedirs(d)
        (d / "w.bin").write_bytes(b"weights")
        res = commit(d, {"aliases": ["best", "prod"], "description": "first run", "metadata": {"lr": 0.1},
                         "tags": ["baseline"], "type": "model"})
        assert res["state"] == "created"
        vdir = m.path / PROJ / "model:best"
        assert set(os.getxattr(vdir, "user.artifact.aliases").decode().split(",")) == {"best", "prod", "latest"}
        assert os.getxattr(vdir, "user.artifact.description") == b"first run"
        assert json.loads(os.getxattr(vdir, "user.artifact.metadata")) == {"lr": 0.1}
        assert os.getxattr(vdir, "user.artifact.tags") == b"baseline"
        assert os.getxattr(vdir, "user.artifact.type") == b"model"
        assert (vdir / "w.bin").read_bytes() == b"weights"
        # a malformed .commit creates no version, the status says why, the staged files stay
        (d / ".commit").write_text("{not json")
        assert status(d)["state"] == "failed" and "JSON" in status(d)["error"]
        assert (d / "w.bin").read_bytes() == b"weights"


# -- issue 11: one commit per intent, no partial versions, no lost updates -------------------------
def _attempts(m) -> int:
    """Commit attempts the daemon ran so far (it logs one line per attempt)."""
    return m.log_text().count("commit of Draft(")


def _versions(store: Path, collection: str = "ds") -> list:
    from client.errors import NotFoundError

    s = LocalStore(store)
    try:
        return s.list_versions("ent", "proj", collection)
    except NotFoundError:
        return []
    finally:
        s.close()


def _sh(cmd: str, cwd: Path) -> None:
    subprocess.run(["bash", "-c", cmd], cwd=cwd, check=True, timeout=60)


def test_every_way_of_writing_the_sentinel_commits_once_with_its_json(world: Path) -> None:
    ways = [
        ("touch", "touch .commit", None),
        ("colon", ": > .commit", None),
        ("echo", """echo '{"aliases": ["v2-candidate"]}' > .commit""", "v2-candidate"),
        ("printf", """printf '{"aliases": ["pf"]}' > .commit""", "pf"),
        ("tee", """echo '{"aliases": ["teed"]}' | tee .commit > /dev/null""", "teed"),
        ("python", """python3 -c 'f = open(".commit", "w"); f.write("{\\"aliases\\": [\\"py\\"]}"); f.close()'""", "py"),
        ("touch-again", "touch .commit", None),
    ]
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "ds:draft"
        os.makedirs(draft)
        for i, (label, cmd, alias) in enumerate(ways):
            (draft / f"{label}.txt").write_text(label)
            before = _attempts(m)
            _sh(cmd, draft)
            st = json.loads((draft / ".commit.status").read_text())["last_commit"]  # waits for the commit
            assert (label, st["state"], st["index"]) == (label, "created", i), st
            assert _attempts(m) == before + 1, (label, m.log_text()[-2000:])
            if alias is not None:
                aliases = os.getxattr(m.path / PROJ / f"ds:v{i}", "user.artifact.aliases").decode().split(",")
                assert alias in aliases, (label, aliases)
        assert len(_versions(world / "store")) == len(ways)
        # a second touch with nothing changed: one attempt, a no-op that says so
        before = _attempts(m)
        _sh("touch .commit", draft)
        assert status(draft)["state"] == "noop" and _attempts(m) == before + 1
        # invalid JSON: no version, and the status says why
        (draft / "more.txt").write_text("more")
        _sh("echo '{not json' > .commit", draft)
        st = status(draft)
        assert st["state"] == "failed" and "JSON" in st["error"]
        assert len(_versions(world / "store")) == len(ways)
        # .commit.status is read-only: no write, truncate or rename over it (unlink works: rm -rf)
        assert _errno(os.open, draft / ".commit.status", os.O_WRONLY) in (errno.EACCES, errno.EPERM)
        assert _errno(os.truncate, draft / ".commit.status", 0) in (errno.EACCES, errno.EPERM)
        assert _errno(os.rename, draft / "more.txt", draft / ".commit.status") in (errno.EACCES, errno.EPERM)
        assert (draft / ".commit.status").exists()


def test_readme_commit_example_works_as_printed(world: Path) -> None:
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "cifar:draft"
        os.makedirs(draft)
        (draft / "img.png").write_bytes(b"png")
        out = subprocess.run(["bash", "-c", f"""echo '{{"aliases": ["v2-candidate"]}}' > {draft}/.commit
                              cat {draft}/.commit.status"""], capture_output=True, text=True, check=True)
        st = json.loads(out.stdout)["last_commit"]
        assert st["state"] == "created" and st["version"] == "ent/proj/cifar:v0"
        assert "v2-candidate" in os.getxattr(m.path / PROJ / "cifar:v2-candidate", "user.artifact.aliases").decode()


def test_no_commit_captures_a_file_open_for_writing(world: Path) -> None:
    with mounted(world / "store", world) as m:
        draft = m.path / PROJ / "ds:draft"
        os.makedirs(draft)
        with open(draft / "big.bin", "wb") as f:
            f.write(b"a" * MiB)
            f.flush()
            _sh("touch .commit", draft)  # arrives while big.bin is half written
            f.write(b"b" * MiB)
        st = status(draft)
        assert st["state"] == "created"
        assert (m.path / PROJ / "ds:v0" / "big.bin").stat().st_size == 2 * MiB
        assert len(_versions(world / "store")) == 1


def test_a_copy_holding_the_sentinel_yields_one_complete_version(world: Path) -> None:
    src = world / "src"
    (src / "files").mkdir(parents=True)
    for i in range(200):
        (src / "files" / f"f{i:03d}.txt").write_text(f"file {i}\n")
    (src / ".commit").write_text('{"aliases": ["full"]}')
    with mounted(world / "store", world) as m:
        # a copier that writes .commit in the middle (as cp -r does in readdir order)
        d1 = m.path / PROJ / "ds:draft"
        os.makedirs(d1)
        names = sorted(os.listdir(src / "files"))
        os.mkdir(d1 / "files")
        for i, name in enumerate(names):
            if i == 100:
                (d1 / ".commit").write_bytes((src / ".commit").read_bytes())
            (d1 / "files" / name).write_bytes((src / "files" / name).read_bytes())
        st = status(d1)
        assert st["state"] == "created", st
        assert len(os.listdir(m.path / PROJ / "ds:full" / "files")) == 200
        assert len(_versions(world / "store")) == 1
        # and the real cp -r
        d2 = m.path / PROJ / "cp:draft"
        d2.mkdir()
        subprocess.run(["cp", "-r", f"{src}/.", str(d2)], check=True)
        st = status(d2)
        assert st["state"] == "created", st
        assert len(os.listdir(m.path / PROJ / "cp:full" / "files")) == 200
        assert len(_versions(world / "store", "cp")) == 1


def test_commit_merges_onto_a_moved_latest_and_reports_conflicts(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = world / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "same.txt"):
        (src / name).write_text(f"base {name}\n")
    store = LocalStore(world / "store")
    commit_tree(store, src, world)  # v0
    store.close()
    (world / "a").mkdir()
    (world / "b").mkdir()
    with mounted(world / "store", world / "a") as ma, mounted(world / "store", world / "b") as mb:
        da = ma.path / PROJ / "ds:draft"
        da.mkdir()  # from v0
        (da / "a.txt").write_text("A changed a\n")
        (da / "from-a.txt").write_text("A\n")
        os.unlink(da / "c.txt")
        os.rename(da / "same.txt", da / "moved.txt")
        # mount B commits v1 on top of v0: adds a file, deletes b.txt
        db = mb.path / PROJ / "ds:draft"
        db.mkdir()
        (db / "from-b.txt").write_text("B\n")
        os.unlink(db / "b.txt")
        assert commit(db)["index"] == 1
        # an SDK writer commits v2 on top of v1
        api = sdk_api(world / "store", monkeypatch)
        import client

        art = api.artifact("ent/proj/ds:latest").new_draft()
        (world / "sdk.txt").write_text("SDK\n")
        art.add_file(str(world / "sdk.txt"), "from-sdk.txt")
        with client.init(entity="ent", project="proj") as run:
            run.log_artifact(art)
        assert _versions(world / "store")[0].index == 2 or max(v.index for v in _versions(world / "store")) == 2
        # A commits: its changes relative to v0 applied on top of v2
        res = commit(da)
        assert res["state"] == "created" and res["index"] == 3, res
        tree = {k: open(ma.path / PROJ / "ds:v3" / k).read() for k in sha256_tree(ma.path / PROJ / "ds:v3")}
        assert tree == {"a.txt": "A changed a\n", "from-a.txt": "A\n", "from-b.txt": "B\n", "from-sdk.txt": "SDK\n",
                        "moved.txt": "base same.txt\n"}
        # the draft goes on from the merged version: it shows what the others added
        assert (da / "from-sdk.txt").read_text() == "SDK\n" and not (da / "b.txt").exists()

        # a conflict: both sides change a.txt differently
        (da / "a.txt").write_text("A changed a again\n")
        art = api.artifact("ent/proj/ds:latest").new_draft()
        (world / "sdk-a.txt").write_text("SDK changed a\n")
        art.add_file(str(world / "sdk-a.txt"), "a.txt", overwrite=True)
        with client.init(entity="ent", project="proj") as run:
            run.log_artifact(art)
        res = commit(da)
        assert res["state"] == "conflict" and res["conflicts"] == ["a.txt"], res
        assert len(_versions(world / "store")) == 5
        assert (da / "a.txt").read_text() == "A changed a again\n"  # the draft is kept untouched
        assert status(da)["state"] == "conflict"


def test_drafts_belong_to_their_store_not_to_the_cache(world: Path) -> None:
    LocalStore(world / "other").close()
    cache = world / "shared-cache"
    (world / "a").mkdir()
    (world / "b").mkdir()
    with mounted(world / "store", world / "a", cache_dir=cache) as m:
        d = m.path / PROJ / "ds:draft"
        os.makedirs(d)
        (d / "x.txt").write_text("x")
        assert commit(d)["state"] == "created"
        (d / "y.txt").write_text("y")  # pending change, left for the next mount of this store
    with mounted(world / "other", world / "b", cache_dir=cache) as m:
        assert "ent" not in os.listdir(m.path)
    assert _versions(world / "other") == []
    with mounted(world / "store", world / "a", cache_dir=cache, commit_on_unmount=False) as m:
        assert (m.path / PROJ / "ds:draft" / "x.txt").read_text() == "x"


# -- issue 11: unmount you can rely on ---------------------------------------------------------------
def _cli_umount(mp: Path) -> subprocess.CompletedProcess:
    exe = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "artifactfs"
    return subprocess.run([str(exe), "umount", str(mp)], capture_output=True, text=True, timeout=120)


def test_umount_returns_after_the_commits_and_reports_them(world: Path) -> None:
    payload = os.urandom(20 * MiB)
    with mounted(world / "store", world) as m:
        d = m.path / PROJ / "ds:draft"
        os.makedirs(d)
        (d / "big.bin").write_bytes(payload)
        (d / "small.txt").write_text("s")
        out = _cli_umount(m.path)
        assert out.returncode == 0, out.stderr
        assert "committed ent/proj/ds:v0" in out.stdout, out.stdout
        assert [v.index for v in _versions(world / "store")] == [0]  # there when umount returns
        assert m.proc.wait(timeout=5) == 0
    # a commit that fails at unmount: non-zero exit, the reason printed, the draft kept
    with mounted(world / "store", world) as m:
        d = m.path / PROJ / "ds:draft"
        (d / "more.txt").write_text("more")
        (d / ".commit").write_text("{not json")
        assert status(d)["state"] == "failed"
        out = _cli_umount(m.path)
        assert out.returncode != 0 and "JSON" in out.stdout + out.stderr, (out.stdout, out.stderr)
    assert [v.index for v in _versions(world / "store")] == [0]


def test_mount_without_commit_on_unmount_keeps_drafts(world: Path) -> None:
    with mounted(world / "store", world, commit_on_unmount=False) as m:
        d = m.path / PROJ / "ds:draft"
        os.makedirs(d)
        (d / "x.txt").write_text("x")
        out = _cli_umount(m.path)
        assert out.returncode == 0 and "committed" not in out.stdout, out.stdout
    assert _versions(world / "store") == []
    with mounted(world / "store", world) as m:
        assert (m.path / PROJ / "ds:draft" / "x.txt").read_text() == "x"


def test_files_open_for_writing_at_unmount_are_not_committed(world: Path) -> None:
    opts = MountOptions(str(world / "mnt"), store=str(world / "store"), cache_dir=str(world / "cache"))
    proc = start_daemon(opts, world / "daemon.log")
    try:
        wait_for_mount(proc, world / "mnt", world / "daemon.log")
        d = world / "mnt" / PROJ / "ds:draft"
        os.makedirs(d)
        f = open(d / "half.bin", "wb")
        f.write(b"h" * 1000)
        f.flush()
        proc.send_signal(signal.SIGTERM)  # the daemon stops while half.bin is open for writing
        assert proc.wait(timeout=30) == 1  # a draft was not committed
        with contextlib.suppress(OSError):
            f.close()
    finally:
        unmount_and_reap(proc, world / "mnt")
    assert _versions(world / "store") == []
    assert "open for writing" in (world / "daemon.log").read_text()


def test_artifactfs_commit_is_synchronous_and_fails_loudly(world: Path) -> None:
    exe = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "artifactfs"
    with mounted(world / "store", world) as m:
        d = m.path / PROJ / "ds:draft"
        os.makedirs(d)
        (d / "w.bin").write_bytes(b"w" * 5000)
        out = subprocess.run([str(exe), "commit", str(d), "--alias", "best"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("created ent/proj/ds:v0"), out.stdout
        assert "best" in os.getxattr(m.path / PROJ / "ds:best", "user.artifact.aliases").decode()
        (d / "x.bin").write_bytes(b"x")
        out = subprocess.run([str(exe), "commit", str(d), "--alias", "bad alias!"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode != 0 and "alias" in out.stderr, (out.stdout, out.stderr)
        assert [v.index for v in _versions(world / "store")] == [0]


# -- issue 10: a draft on a full disk answers ENOSPC; a name that cannot be stored EILSEQ ----------
def test_draft_on_a_full_disk_is_enospc_and_a_non_utf8_name_is_eilseq(world: Path) -> None:
    from tests.test_integrity import small_tmpfs

    with small_tmpfs(world / "cachefs", "4m") as cachefs:
        with mounted(world / "store", world, cache_dir=cachefs / "c") as m:
            d = m.path / PROJ / "ds:draft"
            os.makedirs(d)
            (d / "ok.txt").write_text("fits")
            with pytest.raises(OSError) as info:
                with open(d / "huge.bin", "wb") as f:
                    for _ in range(16):
                        f.write(os.urandom(1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            assert info.value.errno == errno.ENOSPC, info.value
            (d / "huge.bin").unlink()
            with pytest.raises(OSError) as info:
                os.open(os.path.join(os.fsencode(d), b"bad\xffname.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
            assert info.value.errno == errno.EILSEQ, info.value
            assert (d / "ok.txt").read_text() == "fits"
            assert commit(d)["state"] == "created"
            assert (m.path / PROJ / "ds:v0" / "ok.txt").read_text() == "fits"
            assert "Traceback" not in m.log.read_text(errors="replace")
