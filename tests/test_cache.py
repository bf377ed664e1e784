"""The content-addressed cache: addressing, atomic verified writes, LRU, locking, corruption."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from client.cache import Cache
from client.errors import DigestMismatchError, InvalidNameError
try:
    from _sdk_fixtures import md5hex
except ImportError:  # tests/ became a package
    from tests._sdk_fixtures import md5hex

DATA = b"hello cache\n" * 100
KEY = md5hex(DATA)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "c", max_bytes=10_000)


def test_defaults_come_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "envcache"))
    monkeypatch.setenv("ARTIFACTFS_CACHE_SIZE", "3M")
    c = Cache()
    assert c.root == tmp_path / "envcache"
    assert c.max_bytes == 3 << 20
    assert c.partial_dir == c.root / "partial" and c.partial_dir.is_dir()


def test_path_layout_and_key_validation(cache: Cache) -> None:
    assert cache.path(KEY) == cache.root / "objects" / KEY[:2] / KEY[2:]
    for bad in ("../" + "a" * 29, "A" * 32, "abc", "g" * 32):
        with pytest.raises(InvalidNameError):
            cache.path(bad)


def test_add_file_copies_verifies_and_is_read_only(cache: Cache, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(DATA)
    p = cache.add_file(KEY, src)
    assert p == cache.path(KEY) and p.read_bytes() == DATA
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    assert src.exists()
    assert cache.lookup(KEY) == p
    assert cache.lookup(KEY, size=len(DATA)) == p
    assert list((cache.root / "tmp").iterdir()) == []


def test_add_file_move_removes_source(cache: Cache, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(DATA)
    p = cache.add_file(KEY, src, move=True)
    assert not src.exists() and p.read_bytes() == DATA


def test_add_file_mismatch_leaves_nothing_and_keeps_source(cache: Cache, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"other bytes")
    for move in (False, True):
        with pytest.raises(DigestMismatchError):
            cache.add_file(KEY, src, move=move)
        assert src.read_bytes() == b"other bytes"
        assert cache.lookup(KEY) is None
        assert list((cache.root / "tmp").iterdir()) == []


def test_writer_verifies_on_exit(cache: Cache) -> None:
    with cache.writer(KEY) as f:
        f.write(DATA[:500])
        f.write(DATA[500:])
    assert cache.path(KEY).read_bytes() == DATA
    other = md5hex(b"x")
    with pytest.raises(DigestMismatchError):
        with cache.writer(other) as f:
            f.write(b"not x")
    assert cache.lookup(other) is None
    assert list((cache.root / "tmp").iterdir()) == []


def test_writer_out_of_order_writes_are_rehashed(cache: Cache) -> None:
    with cache.writer(KEY) as f:
        f.seek(600)
        f.write(DATA[600:])
        f.seek(0)
        f.write(DATA[:600])
    assert cache.path(KEY).read_bytes() == DATA


def test_writer_exception_in_block_leaves_nothing(cache: Cache) -> None:
    with pytest.raises(RuntimeError):
        with cache.writer(KEY) as f:
            f.write(DATA)
            raise RuntimeError("download failed")
    assert cache.lookup(KEY) is None and list((cache.root / "tmp").iterdir()) == []


def test_adopt_renames_without_copy(cache: Cache, tmp_path: Path) -> None:
    src = cache.root / "tmp" / "verified"
    src.write_bytes(DATA)
    ino = src.stat().st_ino
    p = cache.adopt(KEY, src)
    assert not src.exists() and p.stat().st_ino == ino and p.read_bytes() == DATA


def test_fetch_fills_on_miss_only(cache: Cache) -> None:
    calls: list[int] = []

    def fill(f) -> None:  # type: ignore[no-untyped-def]
        calls.append(1)
        f.write(DATA)

    p1 = cache.fetch(KEY, len(DATA), fill)
    p2 = cache.fetch(KEY, len(DATA), fill)
    assert p1 == p2 and p1.read_bytes() == DATA and calls == [1]
    with pytest.raises(DigestMismatchError):
        cache.fetch(md5hex(b"zzz"), 3, lambda f: f.write(b"yyy"))
    assert list((cache.root / "locks").rglob("*")) == [] or all(p.is_dir() for p in (cache.root / "locks").rglob("*"))


def test_wrong_size_object_is_dropped_and_refetched(cache: Cache, tmp_path: Path) -> None:
    p = cache.path(KEY)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"truncated")
    assert cache.lookup(KEY, size=len(DATA)) is None
    assert not p.exists()
    assert cache.fetch(KEY, len(DATA), lambda f: f.write(DATA)).read_bytes() == DATA


def test_verify_drops_corrupt_object(cache: Cache) -> None:
    p = cache.path(KEY)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"X" * len(DATA))  # right size, wrong bytes
    assert cache.lookup(KEY, size=len(DATA)) == p
    assert cache.verify(KEY) is False
    assert not p.exists()
    cache.fetch(KEY, len(DATA), lambda f: f.write(DATA))
    assert cache.verify(KEY) is True
    assert cache.verify(md5hex(b"absent")) is False


def _put(cache: Cache, data: bytes, mtime: float) -> str:
    key = md5hex(data)
    with cache.writer(key) as f:
        f.write(data)
    os.utime(cache.path(key), (mtime, mtime))
    return key


def test_evict_is_lru_and_lookup_refreshes(cache: Cache) -> None:
    keys = [_put(cache, bytes([i]) * 3000, 1_000_000 + i) for i in range(3)]  # 9000 bytes
    assert cache.info().bytes == 9000 and cache.info().entries == 3
    cache.lookup(keys[0])  # now the most recently used
    freed = cache.evict(needed=2000)  # 9000 + 2000 > 10000: one must go, the oldest is keys[1]
    assert freed == 3000
    assert cache.lookup(keys[1]) is None
    assert cache.lookup(keys[0]) is not None and cache.lookup(keys[2]) is not None
    assert cache.evict(0) == 0


def test_evict_skips_locked_keys(cache: Cache) -> None:
    keys = [_put(cache, bytes([i]) * 3000, 1_000_000 + i) for i in range(3)]
    lock = cache._lock(keys[0])
    assert lock.acquire()
    try:
        cache.evict(needed=cache.max_bytes - 3000)  # wants all but 3000 bytes gone
        assert cache.lookup(keys[0]) is not None
        assert cache.lookup(keys[1]) is None and cache.lookup(keys[2]) is None
    finally:
        lock.release()


def test_prune_and_info(cache: Cache) -> None:
    for i in range(4):
        _put(cache, bytes([i]) * 1000, 1_000_000 + i)
    stale = cache.root / "tmp" / "dead.incomplete"
    stale.write_bytes(b"x" * 10)
    os.utime(stale, (1, 1))
    info = cache.info()
    assert (info.entries, info.bytes, info.max_bytes, info.root) == (4, 4000, 10_000, cache.root)
    freed = cache.prune(max_bytes=2500)
    assert freed == 2010 and not stale.exists()
    assert cache.info().entries == 2


def _fetch_worker(root: str, key: str, data: bytes, counter: str) -> str:
    c = Cache(Path(root), max_bytes=1 << 30)

    def fill(f) -> None:  # type: ignore[no-untyped-def]
        with open(counter, "a") as log:
            log.write("x")
        f.write(data)

    return str(c.fetch(key, len(data), fill))


def test_concurrent_processes_fetch_once(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    key = md5hex(data)
    counter = tmp_path / "fills"
    counter.write_text("")
    ctx = mp.get_context("spawn")
    with ctx.Pool(6) as pool:
        paths = pool.starmap(_fetch_worker, [(str(tmp_path / "c"), key, data, str(counter))] * 6)
    assert len(set(paths)) == 1
    assert Path(paths[0]).read_bytes() == data
    assert counter.read_text() == "x"


def test_verified_marker_written_on_install_and_invalidated_by_a_write(tmp_path: Path) -> None:
    from client.cache import has_verified_marker

    c = Cache(tmp_path / "c")
    data = b"marker me" * 1000
    md5 = __import__("hashlib").md5(data).hexdigest()
    with c.writer(md5) as out:
        out.write(data)
    p = c.path(md5)
    os.utime(p, (1000, 1000))  # an old file (a fresh one is "racy", see client.cache)
    assert c.verify(md5)  # re-hashed (the utime voided the install's marker) and re-marked
    fd = os.open(p, os.O_RDONLY)
    try:
        assert has_verified_marker(fd, md5)
        assert not has_verified_marker(fd, "0" * 32)  # the marker names its digest
    finally:
        os.close(fd)
    assert c.checked(md5, len(data)) == p
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:  # same size, different bytes: mtime moves, the marker is void
        f.write(b"X")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert not has_verified_marker(fd, md5)
    finally:
        os.close(fd)
    assert c.checked(md5, len(data)) is None and not p.exists()  # re-hashed, dropped


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to an unprivileged user to run as one")
def test_a_mount_run_by_an_ordinary_user_marks_its_read_only_objects() -> None:
    """Cache objects are 0444, and a user.* xattr needs write permission on the file: as any
    user but root, no marker was ever set, so every daemon re-checked every object.  Run as
    nobody, in a forked child: an install and a later verify both leave a trusted marker."""
    import shutil
    import tempfile
    import traceback

    from client.cache import has_verified_marker

    top = Path(tempfile.mkdtemp(prefix="afs-nobody-", dir="/tmp"))  # pytest's tmp is root's 0700
    os.chmod(top, 0o755)
    root = top / "c"
    root.mkdir()
    os.chown(root, 65534, 65534)
    data = b"mark me as nobody" * 1000
    md5 = __import__("hashlib").md5(data).hexdigest()
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if both markers hold
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            c = Cache(root)
            with c.writer(md5) as out:
                out.write(data)
            p = c.path(md5)
            ok = []
            for step in ("install", "verify"):
                if step == "verify":
                    os.utime(p, (1000, 1000))  # voids the install's marker
                    c.verify(md5)
                fd = os.open(p, os.O_RDONLY)
                try:
                    ok.append(has_verified_marker(fd, md5) and not os.fstat(fd).st_mode & 0o222)
                finally:
                    os.close(fd)
            code = 0 if all(ok) else 2 + ok.index(False)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(top)
    assert os.waitstatus_to_exitcode(status) == 0, "1: failed (see stderr), 2: no marker after install, 3: none after verify"


def test_lookup_touches_atime_not_mtime(tmp_path: Path) -> None:
    c = Cache(tmp_path / "c")
    data = b"lru"
    md5 = __import__("hashlib").md5(data).hexdigest()
    with c.writer(md5) as out:
        out.write(data)
    p = c.path(md5)
    os.utime(p, (1000, 2000))
    assert c.lookup(md5) == p
    st = p.stat()
    assert st.st_mtime == 2000 and st.st_atime > 2000


def _fill_objects_dir(root: Path, n: int, size: int) -> list[str]:
    """n objects of ``size`` bytes written straight into objects/ (as a pre-index cache had them)."""
    keys = []
    for i in range(n):
        key = md5hex(i.to_bytes(4, "big") * (size // 4))
        d = root / "objects" / key[:2]
        d.mkdir(parents=True, exist_ok=True)
        (d / key[2:]).write_bytes(i.to_bytes(4, "big") * (size // 4))
        os.utime(d / key[2:], (1_000_000 + i, 1_000_000 + i))  # LRU order = i
        keys.append(key)
    return keys


def test_a_miss_does_not_rescan_100k_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n, size = 100_000, 8
    keys = _fill_objects_dir(tmp_path / "c", n, size)
    c = Cache(tmp_path / "c", max_bytes=n * size)  # the pre-index objects are indexed once, here
    assert (c.info().entries, c.info().bytes) == (n, n * size)
    calls = {"scandir": 0, "stat": 0}
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(*a, **k):  # type: ignore[no-untyped-def]
        calls["scandir"] += 1
        return real_scandir(*a, **k)

    def stat(*a, **k):  # type: ignore[no-untyped-def]
        calls["stat"] += 1
        return real_stat(*a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    q0 = c.index.queries
    data = b"new object, 24 bytes ok"
    c.fetch(md5hex(data), len(data), lambda f: f.write(data))  # needs 3 of the oldest to go
    monkeypatch.undo()
    assert calls["scandir"] == 0
    assert calls["stat"] < 20  # a handful for the new object, not one per cached object
    assert c.index.queries - q0 < 20
    assert [c.lookup(k) is None for k in keys[:4]] == [True, True, True, False]  # LRU order
    assert c.info().bytes <= c.max_bytes and c.info().entries == n - 3 + 1


def test_index_is_shared_by_processes_and_repaired_by_prune(tmp_path: Path) -> None:
    a = Cache(tmp_path / "c", max_bytes=10_000)
    b = Cache(tmp_path / "c", max_bytes=10_000)  # another process sharing the cache
    k1 = _put(a, b"1" * 4000, 1_000_000)
    k2 = _put(b, b"2" * 4000, 1_000_001)
    assert a.info().bytes == b.info().bytes == 8000
    data = b"3" * 4000
    b.fetch(md5hex(data), len(data), lambda f: f.write(data))  # b evicts a's object k1
    assert a.lookup(k1) is None and a.lookup(k2) is not None
    assert a.info().bytes == 8000 and a.info().entries == 2
    # a crash: an object present without a row, a row without an object
    stray = _fill_objects_dir(tmp_path / "c", 1, 1000)[0]
    a.index.put("f" * 32, 5000, 1)
    assert a.info().bytes == 13_000
    a.prune()
    assert a.info().bytes == 9000 and a.info().entries == 3
    assert a.lookup(stray) is not None


def test_install_verified_writes_a_batch_in_one_index_transaction(tmp_path: Path) -> None:
    """Issue 17: the mount's cold small objects enter the cache many per index transaction
    (was one each), read-only, counted, nothing left in tmp/; present ones are skipped."""
    cache = Cache(tmp_path / "c", max_bytes=1 << 30)
    objects = [(md5hex(data), data) for data in (os.urandom(3000 + i) for i in range(10))]
    with cache.writer(objects[0][0]) as f:
        f.write(objects[0][1])
    before = cache.index.queries
    added = cache.install_verified(objects + [objects[3]])
    assert cache.index.queries - before == 1
    assert added == sum(len(d) for _, d in objects[1:])
    for md5, data in objects:
        path = cache.lookup(md5, len(data))
        assert path is not None and path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o444
    assert cache.info().entries == 10 and cache.info().bytes == sum(len(d) for _, d in objects)
    assert list(cache.tmp_dir.iterdir()) == []
    assert cache.install_verified(objects) == 0


def test_stamp_many_moves_stamps_and_still_adds_corrects_and_keeps_pins(tmp_path: Path) -> None:
    """The LRU stamps of one download are one UPDATE of the stamp per row (no upsert, no totals
    trigger: 37 SQLite steps a row against put_many's 70); a batch with a row it cannot update
    (missing, of another size, pinned) still ends as put_many would: the row added or
    corrected, the totals right, a pin kept."""
    from client.cache_index import PINNED, CacheIndex

    ix = CacheIndex(tmp_path / "index.sqlite")
    keys = [f"{i:032x}" for i in range(200)]
    ix.put_many([(k, 10, 1) for k in keys])
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0

    with ix._db() as db:
        db.set_progress_handler(step, 1)
    ix.stamp_many([(k, 10, 5) for k in keys])
    assert steps[0] / len(keys) < 45, steps[0] / len(keys)
    assert ix.totals() == (200, 2000)
    assert ix.oldest(1) == [(keys[0], 10)] and not ix.oldest(1, skip=200)
    ix.pin([keys[1]], 5)
    ix.stamp_many([(keys[0], 12, 9), (keys[1], 10, 9), ("f" * 32, 7, 9), (keys[2], 10, 9)])
    assert ix.totals() == (201, 2009)  # keys[0] now 12 bytes, the new row 7
    with ix._db() as db:
        rows = dict(db.execute("SELECT key, stamp FROM objects WHERE key IN (?, ?, ?, ?)",
                               (keys[0], keys[1], keys[2], "f" * 32)).fetchall())
    assert rows == {keys[0]: 9, keys[1]: PINNED + 5, keys[2]: 9, "f" * 32: 9}


def test_a_cache_directory_deleted_under_a_live_process_is_rebuilt(tmp_path: Path) -> None:
    """Users free space with ``rm -rf ~/.cache/artifactfs`` while a notebook or a mount runs.
    That costs the process the objects it had, never its next downloads: the cache's layout
    and index are made again where they went missing, and what is installed after is on disk
    and counted, for this process and the next."""
    import hashlib
    import shutil

    root = tmp_path / "cache"
    cache = Cache(root, max_bytes=1 << 30)
    old = os.urandom(5000)
    old_md5 = hashlib.md5(old).hexdigest()
    cache.install_verified([(old_md5, old)])
    assert cache.lookup(old_md5, len(old)) is not None
    for gone in (lambda: shutil.rmtree(root), lambda: [shutil.rmtree(p) if p.is_dir() else p.unlink()
                                                        for p in list(root.iterdir())]):
        gone()
        blobs = [os.urandom(3000 + i) for i in range(3)]
        md5s = [hashlib.md5(b).hexdigest() for b in blobs]
        cache.install_verified([(md5s[0], blobs[0])])  # the mount's small files
        cache.install_prepared([cache.prepare_verified(md5s[1], blobs[1])])  # the SDK's downloads

        def fill(f, data=blobs[2]) -> None:
            f.write(data)
        cache.fetch(md5s[2], len(blobs[2]), fill)  # a fetched object, under its key's lock
        for m, b in zip(md5s, blobs):
            assert cache.lookup(m, len(b)) is not None and cache.path(m).read_bytes() == b
        assert cache.lookup(old_md5, len(old)) is None  # gone with the directory: fetched again
        info = cache.info()
        assert (info.entries, info.bytes) == (3, sum(map(len, blobs))), info
        later = Cache(root, max_bytes=1 << 30)  # the next process sees the same cache
        assert (later.info().entries, later.info().bytes) == (3, sum(map(len, blobs)))
        later.index.close()


def test_an_index_file_deleted_under_a_live_process_is_found_at_its_next_eviction(tmp_path: Path) -> None:
    """Only ``index.sqlite`` deleted (a user resetting it): a process that kept writing to the
    file it had open would count objects nobody else sees, and the processes sharing the
    cache would each hold the bound against a different total.  Each eviction checks that the
    index it has open is still the one at the path, and rebuilds from the disk if not."""
    import hashlib

    root = tmp_path / "cache"
    live = Cache(root, max_bytes=1 << 30)
    first = os.urandom(4000)
    live.install_verified([(hashlib.md5(first).hexdigest(), first)])
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    other = Cache(root, max_bytes=1 << 30)  # the next process: a new index, from one scan
    assert other.info().entries == 1
    live.evict(0)
    second = os.urandom(5000)
    live.install_verified([(hashlib.md5(second).hexdigest(), second)])
    assert (other.info().entries, other.info().bytes) == (2, 9000)  # one index again, shared
    assert (live.info().entries, live.info().bytes) == (2, 9000)
    other.index.close()
