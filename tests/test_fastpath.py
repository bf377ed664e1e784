"""The fast path (``artifactfs mount --fast-path``): a fully cached ``:vN`` version is served by
the kernel from a read-only tree of hard links to the verified cache objects, bind-mounted
over the version's directory, so reading it costs no FUSE request (issue 17).

Real mounts of a real embedded store; the cache is filled through the real Cache API (as an
SDK ``download()`` sharing the cache would), the FUSE requests are counted by the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.cache import Cache
from client.hashing import md5_bytes
from client.store.local import LocalStore
from mountfs.daemon import _unescape, is_mounted
from tests.mount_helpers import REPO, Mount, mounted, requires_fuse, unmount_and_reap
from tests.util import commit_files

pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.timeout(120)]

V0, V1 = "ent/proj/ds:v0", "ent/proj/ds:v1"
FILES = {
    "README.md": b"# data\n",
    "empty.txt": b"",
    "with space/caf\u00e9.txt": b"unicode name\n",
    "a/b/c/deep.bin": os.urandom(5000),
    **{f"many/f{i:03d}.bin": os.urandom(100 + i) for i in range(60)},
}
NOT_CACHED = {"later/new.bin": os.urandom(3000)}


def make_store(work: Path, cache_dir: Path) -> Path:
    """v0 = FILES, entirely in the cache; v1 = FILES + one file that is not cached."""
    store_dir = work / "store"
    store = LocalStore(store_dir)
    commit_files(store, work, FILES)
    commit_files(store, work, {**FILES, **NOT_CACHED})
    store.close()
    cache = Cache(cache_dir)
    for rel, data in FILES.items():
        if data:
            src = work / "upload-" / rel
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_bytes(data)
            cache.add_file(md5_bytes(data), src)
    return store_dir


def binds_under(mnt: Path) -> list[str]:
    """Mount points strictly below ``mnt`` (from this process's mountinfo)."""
    prefix = str(mnt) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [p for p in (_unescape(line.split()[4]) for line in f) if p.startswith(prefix)]


def wait_for(what: str, cond: Callable[[], object], poke: Callable[[], object] | None = None,
             timeout: float = 30.0) -> None:
    """A bounded wait for the daemon's background work (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        if poke is not None:
            poke()
        time.sleep(0.05)


def fast_stats(m: Mount) -> dict:
    return m.stats()["fastpath"]


def bind(m: Mount, rel: str) -> Path:
    """List the version (which makes the daemon check it) and wait until it is bound."""
    vdir = m.path / rel
    os.listdir(vdir)
    wait_for(f"the bind over {rel}", lambda: str(vdir) in binds_under(m.path))
    return vdir


def requests_during(m: Mount, run: Callable[[], object]) -> dict[str, int]:
    """FUSE requests the daemon served while ``run()`` ran, less those of reading the stats
    (os.getxattr may take two calls for a long value: measured, not assumed)."""
    first = m.stats()["requests"]
    before = m.stats()["requests"]
    run()
    after = m.stats()["requests"]
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    out["getxattr"] -= before["getxattr"] - first["getxattr"]
    return {k: v for k, v in out.items() if v}


def pinned(cache_dir: Path) -> int:
    return Cache(cache_dir).index.pinned_bytes()


def owners(cache_dir: Path) -> list[str]:
    root = cache_dir / "fastpath"  # the daemons' tree directories (beside recent.json)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path]:
    cache_dir = tmp_path / "cache"
    return make_store(tmp_path, cache_dir), cache_dir


def test_fully_cached_version_is_read_without_fuse_requests(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False, alias_ttl=600.0) as m:
        vdir = bind(m, V0)
        fuse_dir = m.path / "ent/proj/ds@v0"  # the colon-free name stays on the FUSE path

        def read_everything() -> None:
            for rel, data in FILES.items():
                assert (vdir / rel).read_bytes() == data, rel
                os.stat(vdir / rel)
            subprocess.run(["find", str(vdir)], check=True, capture_output=True)
            subprocess.run(["ls", "-lR", str(vdir)], check=True, capture_output=True)
            subprocess.run(["cat", str(vdir / "README.md")], check=True, capture_output=True)

        read_everything()  # first pass: whatever the kernel still asks once (dentries of the path)
        assert requests_during(m, read_everything) == {}, "the fast path sent FUSE requests"
        # the bytes and attributes are those of the FUSE path
        for rel, data in FILES.items():
            fast, slow = os.lstat(vdir / rel), os.lstat(fuse_dir / rel)
            assert (fast.st_size, fast.st_mode, fast.st_uid) == (slow.st_size, slow.st_mode, slow.st_uid), rel
            assert fast.st_dev != slow.st_dev  # served from the cache's filesystem
        for rel in ["a", "a/b", "a/b/c", "many", "with space"]:
            fast, slow = os.stat(vdir / rel), os.stat(fuse_dir / rel)
            assert (fast.st_mode, fast.st_nlink, fast.st_mtime_ns) == (slow.st_mode, slow.st_nlink, slow.st_mtime_ns)
        for name in ("user.artifact.version", "user.artifact.digest", "user.artifact.id"):
            assert os.getxattr(vdir, name) == os.getxattr(fuse_dir, name)
        assert os.getxattr(vdir / "a/b", "user.artifact.version") == V0.encode()
        top = os.stat(vdir)
        assert stat.S_IMODE(top.st_mode) == 0o555 and top.st_mtime_ns == os.stat(fuse_dir).st_mtime_ns
        with pytest.raises(OSError) as e:
            open(vdir / "README.md", "r+b")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            (vdir / "new.txt").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        assert fast_stats(m)["bound"] == [V0]
        assert pinned(cache_dir) == sum(len(d) for d in FILES.values())


def test_version_not_fully_cached_is_not_fast_pathed(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        os.listdir(m.path / V1)
        wait_for("the check of v1", lambda: fast_stats(m)["not_cached"] >= 1)
        assert binds_under(m.path) == [] and fast_stats(m)["bound"] == []
        assert pinned(cache_dir) == 0
        ops = requests_during(m, lambda: (m.path / V1 / "later/new.bin").read_bytes())
        assert ops.get("open") == 1  # still served by the daemon
        assert (m.path / V1 / "later/new.bin").read_bytes() == NOT_CACHED["later/new.bin"]


def test_without_the_flag_nothing_is_bound(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, local_blobs=False) as m:
        os.listdir(m.path / V0)
        assert "fastpath" not in m.stats() and binds_under(m.path) == []


def test_a_version_over_the_pin_share_is_not_fast_pathed(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    total = sum(len(d) for d in FILES.values())
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False,
                 cache_size=total + 100) as m:  # v0 alone would pin more than half the cache
        os.listdir(m.path / V0)
        wait_for("the check of v0", lambda: fast_stats(m)["not_eligible"] >= 1)
        assert binds_under(m.path) == [] and pinned(cache_dir) == 0


def test_umount_and_sigterm_leave_no_binds_and_no_pins(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        bind(m, V0)
        out = subprocess.run([sys.executable, "-m", "client.cli", "umount", str(m.path)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert m.proc.wait(timeout=30) == 0
        assert binds_under(m.path) == [] and not is_mounted(m.path)
    assert owners(cache_dir) == [] and pinned(cache_dir) == 0
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        bind(m, V0)
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0
        assert binds_under(m.path) == [] and not is_mounted(m.path)
    assert owners(cache_dir) == [] and pinned(cache_dir) == 0


def test_sigkill_then_remount_cleans_up(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        bind(m, V0)
        m.proc.kill()
        m.proc.wait(timeout=10)
        assert len(owners(cache_dir)) == 1 and pinned(cache_dir) > 0  # left by the dead daemon
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True)  # what a dead mount needs anyway
        assert binds_under(m.path) == []
        unmount_and_reap(m.proc, m.path)
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, local_blobs=False) as m:  # even without the flag
        assert owners(cache_dir) == [] and pinned(cache_dir) == 0
        assert (m.path / V0 / "README.md").read_bytes() == FILES["README.md"]


def test_eviction_never_takes_what_a_tree_links(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        vdir = bind(m, V0)
        other = Cache(cache_dir)  # another process sharing the cache (an SDK download, say)
        extra = os.urandom(10_000)
        (tmp_path / "extra").write_bytes(extra)
        other.add_file(md5_bytes(extra), tmp_path / "extra")
        other.evict(max_bytes=0)  # wants everything out
        assert other.lookup(md5_bytes(extra)) is None  # the unpinned object went
        for rel, data in FILES.items():  # the linked ones stayed, counted in the bound
            if data:
                assert other.lookup(md5_bytes(data), len(data)) is not None, rel
            assert (vdir / rel).read_bytes() == data
        assert other.info().bytes == pinned(cache_dir) == sum(len(d) for d in FILES.values())


def test_a_changed_cache_object_tears_the_tree_down(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False,
                 fast_path_sweep=0.2) as m:
        vdir = bind(m, V0)
        victim = Cache(cache_dir).path(md5_bytes(FILES["a/b/c/deep.bin"]))
        os.chmod(victim, 0o644)
        with open(victim, "r+b") as f:  # root editing the cache behind the mount's back
            f.write(b"X")
        wait_for("the tree to be torn down", lambda: fast_stats(m)["torn_down"] == 1)
        assert binds_under(m.path) == [] and fast_stats(m)["bound"] == []
        assert owners(cache_dir) == [m.stats()["fastpath"]["owner"]] and pinned(cache_dir) == 0
        # the FUSE path verifies again: the bad object is dropped and the store read
        assert (vdir / "a/b/c/deep.bin").read_bytes() == FILES["a/b/c/deep.bin"]



def test_a_bind_detached_behind_the_daemon_releases_its_tree(work, tmp_path: Path) -> None:
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False,
                 fast_path_sweep=0.2) as m:
        vdir = bind(m, V0)
        subprocess.run(["umount", "-l", str(vdir)], check=True)
        wait_for("the tree to be released", lambda: fast_stats(m)["torn_down"] == 1)
        assert pinned(cache_dir) == 0 and fast_stats(m)["bound"] == []
        assert (vdir / "README.md").read_bytes() == FILES["README.md"]  # the FUSE path again


def test_pinned_rows_are_never_offered_for_eviction(tmp_path: Path) -> None:
    """The index side of pinning, without a mount: put keeps a pin, oldest skips pinned rows,
    a rebuild (prune) keeps them, unpin makes them ordinary (and recently used) again."""
    cache = Cache(tmp_path / "c", 10_000)
    keys = []
    for i in range(4):
        data = bytes([i]) * 1000
        (tmp_path / "x").write_bytes(data)
        keys.append(md5_bytes(data))
        cache.add_file(keys[-1], tmp_path / "x")
    cache.index.pin(keys[:2], time.time_ns())
    cache.index.put(keys[0], 1000, time.time_ns())  # a lookup's LRU touch must not unpin
    assert {k for k, _ in cache.index.oldest(10)} == set(keys[2:])
    assert cache.index.pinned_bytes() == 2000
    cache.reindex()
    assert cache.index.pinned_bytes() == 2000
    cache.evict(max_bytes=0)
    assert [k for k in keys if cache.lookup(k) is not None] == keys[:2]
    assert cache.info().bytes == 2000  # still counted
    cache.index.unpin(keys[:2], time.time_ns())
    assert cache.index.pinned_bytes() == 0 and cache.evict(max_bytes=0) == 2000


def test_a_version_read_to_its_end_is_bound_and_held_once_in_memory(tmp_path: Path) -> None:
    """A version read cold through FUSE keeps its cache objects' pages (no drop-behind with the
    fast path), the install of its last object binds it without another lookup, and the pages
    of the FUSE inode the bind hides go at its last close (not under its reader): what the read
    left in memory is then held once, by the cache objects."""
    from tests.util import resident_bytes

    big = os.urandom(80 << 20)  # over FetchConfig.drop_behind
    store = LocalStore(tmp_path / "store")
    commit_files(store, tmp_path, {"big.bin": big})
    store.close()
    cache_dir = tmp_path / "cache"
    with mounted(tmp_path / "store", tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False,
                 fast_path_sweep=600.0) as m:
        vdir = m.path / V0
        fd = os.open(vdir / "big.bin", os.O_RDONLY)  # the lookup queues a check: not cached yet
        inode = os.open(vdir / "big.bin", os.O_PATH)  # the FUSE inode, with no handle of its own
        through_fuse = f"/proc/self/fd/{inode}"
        try:
            wait_for("the first check", lambda: fast_stats(m)["not_cached"] >= 1)
            got = bytearray()
            while chunk := os.read(fd, 4 << 20):
                got += chunk
            assert got == big
            obj = Cache(cache_dir).path(md5_bytes(big))
            wait_for("the cache object", obj.exists)
            assert resident_bytes(obj) >= 0.9 * len(big), "the cache object's pages were dropped"
            # No lookup from here on: the install of its last object binds it.
            wait_for("the bind over v0", lambda: str(vdir) in binds_under(m.path))
            wait_for("the bind's bookkeeping", lambda: fast_stats(m)["completed"] == 1)
            assert os.stat(vdir / "big.bin").st_dev != os.fstat(fd).st_dev  # new opens: the tree
            # the open file keeps its pages: a re-read of it costs no FUSE read
            assert resident_bytes(through_fuse) >= 0.9 * len(big)
            ops = requests_during(m, lambda: os.pread(fd, 8 << 20, 7 << 20) == big[7 << 20:15 << 20] or pytest.fail())
            assert "read" not in ops, ops
            assert fast_stats(m)["pages_dropped"] == 0
        finally:
            os.close(fd)
        wait_for("the hidden FUSE inode's pages dropped", lambda: fast_stats(m)["pages_dropped"] >= 1)
        try:
            assert resident_bytes(through_fuse) <= 0.05 * len(big), "the hidden FUSE copy stayed in memory"
        finally:
            os.close(inode)
        assert fast_stats(m)["pages_dropped"] == 1
        assert resident_bytes(obj) >= 0.9 * len(big)
        assert (vdir / "big.bin").read_bytes() == big


def test_a_remount_binds_what_recent_mounts_of_its_cache_served_before_it_is_ready(
        work, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The versions the last mounts of the cache were asked for are checked at start, and the
    daemon says READY=1 once they are bound: a reader started after it finds v0 on the tree."""
    import socket

    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        bind(m, V0)
        os.listdir(m.path / V1)  # asked for too, but not fully cached
        wait_for("the check of v1", lambda: fast_stats(m)["not_cached"] >= 1)
    recent = cache_dir / "fastpath" / "recent.json"
    entries = json.loads(recent.read_text())
    assert [e["rel"] for e in entries] == [V0, V1]
    gone = {**entries[0], "rel": "ent/proj/gone:v7"}  # the newest: a version that is not there
    recent.write_text(json.dumps([*entries, gone, {**entries[0], "rel": "ent/proj/not a version"}]))
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
        with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
            assert "READY=1" in sock.recv(4096).decode().split("\n")
            assert binds_under(m.path) == [str(m.path / V0)]  # at READY, before any lookup of ours
            stats = fast_stats(m)
            assert stats["restores"] == 2 and stats["bound"] == [V0] and stats["not_cached"] == 1, stats
            assert os.stat(m.path / V0 / "README.md").st_dev != os.stat(m.path).st_dev
            assert (m.path / V0 / "README.md").read_bytes() == FILES["README.md"]


def test_artifactfs_mount_returns_once_the_recent_versions_are_bound(work, tmp_path: Path) -> None:
    """The CLI's background mode waits for the daemon's READY=1, so a script's next command
    after `artifactfs mount --fast-path` already reads the tree."""
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False) as m:
        bind(m, V0)
    exe, mnt = Path(sys.executable).with_name("artifactfs"), tmp_path / "mnt2"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
    res = subprocess.run([str(exe), "mount", str(mnt), "--store", str(store_dir), "--cache-dir", str(cache_dir),
                          "--fast-path"], capture_output=True, text=True, timeout=90, env=env)
    try:
        assert res.returncode == 0, res.stderr
        assert binds_under(mnt) == [str(mnt / V0)], res.stdout  # no lookup of ours yet
        assert (mnt / V0 / "README.md").read_bytes() == FILES["README.md"]
    finally:
        subprocess.run([str(exe), "umount", str(mnt)], capture_output=True, timeout=60)
    wait_for("the daemon to unmount", lambda: not is_mounted(mnt))
    assert binds_under(mnt) == []


@contextlib.contextmanager
def v1_checked(work: tuple[Path, Path], tmp_path: Path, sweep: float) -> Iterator[tuple[Mount, Path]]:
    """A fast-path mount where v1 was listed and found not fully cached (a candidate)."""
    store_dir, cache_dir = work
    with mounted(store_dir, tmp_path, cache_dir=cache_dir, fast_path=True, local_blobs=False,
                 fast_path_sweep=sweep) as m:
        vdir = m.path / V1
        os.listdir(vdir)
        wait_for("the check of v1", lambda: fast_stats(m)["not_cached"] >= 1)
        assert binds_under(m.path) == []
        yield m, vdir


def test_the_read_that_completes_a_version_gets_it_bound_without_a_sweep(work, tmp_path: Path) -> None:
    """v1 misses one object; reading that file through FUSE puts it in the cache, and that
    install queues v1's check at once: bound long before the (600 s) sweep."""
    with v1_checked(work, tmp_path, sweep=600.0) as (m, vdir):
        assert (vdir / "later/new.bin").read_bytes() == NOT_CACHED["later/new.bin"]  # the one missing
        wait_for("the bind over v1", lambda: str(vdir) in binds_under(m.path))
        stats = fast_stats(m)
        assert stats["completed"] == 1 and stats["rechecks"] == 0 and stats["bound"] == [V1], stats
        # the objects linked were all checked already: FILES marked when the test cached them,
        # new.bin by this daemon's own read (no marker on a small object: its install is trusted)
        assert stats["hashed"] == 0, stats
        assert (vdir / "later/new.bin").read_bytes() == NOT_CACHED["later/new.bin"]
        assert os.stat(vdir / "later/new.bin").st_dev != os.stat(m.path).st_dev


def test_a_candidate_filled_by_another_process_is_bound_at_the_next_sweep(work, tmp_path: Path) -> None:
    """The missing object arrives through another process sharing the cache (an SDK get):
    no install is seen by the daemon, so its sweep's recheck binds the version."""
    with v1_checked(work, tmp_path, sweep=0.3) as (m, vdir):
        src = tmp_path / "new.bin"
        src.write_bytes(NOT_CACHED["later/new.bin"])
        Cache(work[1]).add_file(md5_bytes(src.read_bytes()), src)
        wait_for("the bind over v1", lambda: str(vdir) in binds_under(m.path))
        stats = fast_stats(m)
        assert stats["rechecks"] >= 1 and stats["completed"] == 0 and stats["bound"] == [V1], stats
        assert (vdir / "later/new.bin").read_bytes() == NOT_CACHED["later/new.bin"]
