"""Fault injection on the read path (issue 10): every read returns the right bytes or EIO.

Each test corrupts one layer a byte can come from — a complete cache object, a partial
object and its bitmap, the embedded store's blob, a full cache disk, an entry whose size
disagrees with its blob — on real mounts of a real embedded store, and reads through the
mount.  :func:`check_reads` counts every read tried and every read that returned wrong
bytes; the totals are printed at the end of the module (``-s``) and must show 0 wrong.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.hashing import hex_to_b64, md5_file
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest
from client.store.local import LocalStore
from tests.mount_helpers import mounted, requires_fuse
from tests.server_fixtures import SharedRegistry, make_store, moto_s3, postgres, registry  # noqa: F401

pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.timeout(180)]

MiB = 1 << 20
V0 = "ent/proj/ds:v0"
COUNTS = {"reads": 0, "wrong": 0, "eio": 0}


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print(f"\nintegrity fault tests: {COUNTS['reads']} reads tried, {COUNTS['wrong']} returned wrong bytes, "
          f"{COUNTS['eio']} answered EIO")


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def check_reads(path: Path, expected: bytes, chunk: int = MiB, offsets: list[int] | None = None) -> tuple[int, int]:
    """Read ``path`` at ``offsets`` (default: every ``chunk``) in a fresh open; (good, eio).

    A read either returns exactly the expected bytes or fails with EIO (possibly after a
    short read whose bytes are right); anything else (wrong bytes, a short read at the end
    of the data, another errno) fails the test.
    """
    good = eio = 0
    offsets = list(range(0, len(expected), chunk)) if offsets is None else offsets
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            COUNTS["reads"] += 1
            want = expected[off:off + chunk]
            got = b""
            try:
                # A read may stop short when a later part of the range fails (the kernel
                # returns what it has); the rest is then read on: right bytes or EIO.
                while len(got) < len(want):
                    part = os.pread(fd, len(want) - len(got), off + len(got))
                    if not part:
                        break
                    got += part
            except OSError as exc:
                assert exc.errno == errno.EIO, f"read at {off + len(got)}: {exc!r}"
                if got != want[:len(got)]:
                    COUNTS["wrong"] += 1
                    pytest.fail(f"read at {off} of {path} returned wrong bytes before EIO ({len(got)} bytes)")
                COUNTS["eio"] += 1
                eio += 1
                continue
            if got != want:
                COUNTS["wrong"] += 1
                pytest.fail(f"read at {off} of {path} returned wrong bytes ({len(got)} bytes)")
            good += 1
    finally:
        os.close(fd)
    return good, eio


def commit_files(store: LocalStore, files: dict[str, bytes], tmp: Path, sizes: dict[str, int] | None = None) -> None:
    entries = []
    for rel, data in files.items():
        p = tmp / f"src-{hashlib.md5(rel.encode()).hexdigest()}"
        p.write_bytes(data)
        md5 = md5_file(p)
        store.put_blob("ent", md5, p, len(data))
        entries.append(ManifestEntry(rel, hex_to_b64(md5), (sizes or {}).get(rel, len(data))))
    manifest = tmp / f"manifest-{time.monotonic_ns()}.json"
    manifest.write_bytes(Manifest(entries).to_bytes())
    mmd5 = md5_file(manifest)
    store.put_blob("ent", mmd5, manifest, manifest.stat().st_size)
    store.commit(CommitRequest("ent", "proj", "ds", "dataset", mmd5))


def flip_byte(path: Path, off: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def wait_for(predicate, timeout: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def cache_object(cache: Path, data: bytes) -> Path:
    md5 = hashlib.md5(data).hexdigest()
    return cache / "objects" / md5[:2] / md5[2:]


def store_blob(store_dir: Path, data: bytes) -> Path:
    md5 = hashlib.md5(data).hexdigest()
    return store_dir / "blobs" / "ent" / md5[:2] / md5[2:]


def make_local_store(tmp_path: Path, files: dict[str, bytes], **kw) -> Path:  # noqa: ANN003
    store = LocalStore(tmp_path / "store")
    commit_files(store, files, tmp_path, **kw)
    store.close()
    return tmp_path / "store"


# -- item 1: complete cache objects and store blobs ------------------------------------------

def test_flipped_byte_in_cache_object_is_not_served_by_a_warm_daemon_or_after_remount(tmp_path: Path) -> None:
    payload = os.urandom(8 * MiB)
    store = make_local_store(tmp_path, {"big.bin": payload})
    obj = cache_object(tmp_path / "cache", payload)
    with mounted(store, tmp_path) as m:
        path = m.path / V0 / "big.bin"
        assert check_reads(path, payload) == (8, 0)
        assert wait_for(obj.exists), "the object never entered the cache"
        flip_byte(obj, 5 * MiB + 17)
        drop_page_cache()
        check_reads(path, payload)  # warm daemon: must notice the object changed on disk
        check_reads(path, payload)  # and a second open too
    flip_byte(obj, 6 * MiB + 3) if obj.exists() else None
    drop_page_cache()
    with mounted(store, tmp_path) as m:
        good, _ = check_reads(m.path / V0 / "big.bin", payload)
        assert good == 8  # the store still has the right bytes: served from there


def test_corrupt_store_blob_gives_eio_and_is_remembered(tmp_path: Path) -> None:
    payload = os.urandom(8 * MiB)
    store = make_local_store(tmp_path, {"big.bin": payload})
    flip_byte(store_blob(store, payload), 3 * MiB + 5)
    drop_page_cache()
    with mounted(store, tmp_path) as m:
        path = m.path / V0 / "big.bin"
        good, eio = check_reads(path, payload)
        assert eio >= 1
        again_good, again_eio = check_reads(path, payload)  # a new open: still never wrong bytes
        assert again_eio >= 1
        assert "ent/proj/ds:v0/big.bin" in m.log_text() and "block 3" in m.log_text()
    assert not cache_object(tmp_path / "cache", payload).exists()


def test_small_corrupt_store_blob_gives_eio(tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    store = make_local_store(tmp_path, {"s.bin": payload})
    flip_byte(store_blob(store, payload), 1000)
    with mounted(store, tmp_path) as m:
        assert check_reads(m.path / V0 / "s.bin", payload, chunk=64 << 10) == (0, 5)


# -- item 2: the cache never shares a writable inode with the store -------------------------

def test_writing_a_cache_object_cannot_corrupt_the_store(tmp_path: Path) -> None:
    payload = os.urandom(8 * MiB)
    store = make_local_store(tmp_path, {"big.bin": payload})
    blob, obj = store_blob(store, payload), cache_object(tmp_path / "cache", payload)
    with mounted(store, tmp_path) as m:
        assert check_reads(m.path / V0 / "big.bin", payload) == (8, 0)
        assert wait_for(obj.exists)
    assert obj.stat().st_ino != blob.stat().st_ino
    flip_byte(obj, 100)
    assert md5_file(blob) == hashlib.md5(payload).hexdigest()


def test_relogging_good_content_repairs_a_corrupt_store_blob(tmp_path: Path) -> None:
    import client

    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(3 * MiB)
    (src / "w.bin").write_bytes(payload)
    with client.init(project="proj", entity="ent") as run:
        art = client.Artifact("ds", "dataset")
        art.add_dir(str(src))
        run.log_artifact(art)
    blob = Path(os.environ["ARTIFACTFS_STORE"]) / "blobs" / "ent" / hashlib.md5(payload).hexdigest()[:2] / \
        hashlib.md5(payload).hexdigest()[2:]
    flip_byte(blob, 12345)
    store = LocalStore(os.environ["ARTIFACTFS_STORE"])
    try:
        assert hashlib.md5(payload).hexdigest() in store.missing_blobs("ent", [hashlib.md5(payload).hexdigest()])
        (src / "extra.txt").write_text("new version\n")
        with client.init(project="proj", entity="ent") as run:
            art = client.Artifact("ds", "dataset")
            art.add_dir(str(src))
            run.log_artifact(art)
    finally:
        store.close()
    assert md5_file(blob) == hashlib.md5(payload).hexdigest()


# -- item 3: partial objects and forged bitmaps after a remount -----------------------------

def test_partial_with_flipped_byte_and_forged_bitmap_is_not_served(tmp_path: Path) -> None:
    payload = os.urandom(16 * MiB)
    store = make_local_store(tmp_path, {"big.bin": payload})
    md5 = hashlib.md5(payload).hexdigest()
    part, bits = tmp_path / "cache" / "partial" / f"{md5}.part", tmp_path / "cache" / "partial" / f"{md5}.bits"
    with mounted(store, tmp_path, local_blobs=False) as m:
        fd = os.open(m.path / V0 / "big.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 2 * MiB) == payload[2 * MiB:2 * MiB + 4096]
        finally:
            os.close(fd)
    assert part.exists() and bits.exists()
    flip_byte(part, 2 * MiB + 10)
    nblocks = 16
    bits.write_bytes(struct.pack("<QI", len(payload), MiB) + bytes([0xFF]) * (nblocks // 8))  # all "present"
    drop_page_cache()
    with mounted(store, tmp_path, local_blobs=False) as m:
        good, eio = check_reads(m.path / V0 / "big.bin", payload)
        assert good + eio == 16


# -- item 4: a full cache disk ----------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_cache_disk_never_serves_short_writes_and_streams_large_files(tmp_path: Path) -> None:
    payload = os.urandom(24 * MiB)
    store = make_local_store(tmp_path, {"big.bin": payload})
    with small_tmpfs(tmp_path / "cachefs", "6m") as cache:
        (cache / "filler").write_bytes(b"\0" * (3 * MiB + 12345))  # leaves room for a few blocks
        with mounted(store, tmp_path, cache_dir=cache / "c", local_blobs=False) as m:
            path = m.path / V0 / "big.bin"
            good, eio = check_reads(path, payload)
            assert good == 24, "a file larger than the cache must still be readable"
            drop_page_cache()
            assert check_reads(path, payload, offsets=[0, 7 * MiB, 20 * MiB]) == (3, 0)
        (cache / "filler").unlink()
        drop_page_cache()
        with mounted(store, tmp_path, cache_dir=cache / "c", local_blobs=False) as m:
            assert check_reads(m.path / V0 / "big.bin", payload) == (24, 0)


# -- item 5 (read half): an entry size that disagrees with its blob --------------------------

@pytest.mark.parametrize("local_blobs", [True, False])
def test_entry_size_smaller_than_blob_is_eio_not_a_prefix(tmp_path: Path, local_blobs: bool) -> None:
    payload = os.urandom(10 * MiB)
    md5 = hashlib.md5(payload).hexdigest()
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    store = LocalStore(tmp_path / "store")
    # A registry fooled about the size (older data, or a check that missed it): the blob row
    # says 4 MiB, the bytes are 10 MiB.  The mount must not serve the 4 MiB prefix.
    store.blobs.put_file("ent", md5, src)
    store.register_blob("ent", md5, 4 * MiB)
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(Manifest([ManifestEntry("big.bin", hex_to_b64(md5), 4 * MiB)]).to_bytes())
    mmd5 = md5_file(manifest)
    store.put_blob("ent", mmd5, manifest, manifest.stat().st_size)
    store.commit(CommitRequest("ent", "proj", "ds", "dataset", mmd5))
    store.close()
    with mounted(tmp_path / "store", tmp_path, local_blobs=local_blobs) as m:
        assert check_reads(m.path / V0 / "big.bin", payload[:4 * MiB]) == (0, 4)


# -- a server: its blob directory, or S3 (moto) ------------------------------------------------

def corrupt_server_blob(registry: SharedRegistry, entity: str, data: bytes, off: int) -> None:  # noqa: F811
    md5 = hashlib.md5(data).hexdigest()
    url = registry.factory.blobs_url
    if url.startswith("s3://"):
        import boto3

        from tests.server_fixtures import _boto_kwargs

        bucket, _, prefix = url[len("s3://"):].partition("/")
        bad = bytearray(data)
        bad[off] ^= 0xFF
        boto3.client("s3", endpoint_url=registry.factory.s3_endpoint, **_boto_kwargs()).put_object(
            Bucket=bucket, Key=f"{prefix}/{entity}/{md5[:2]}/{md5[2:]}", Body=bytes(bad))
    else:
        flip_byte(Path(url) / entity / md5[:2] / md5[2:], off)


def test_server_mount_reads_lazily_and_never_serves_a_corrupt_blob(
        registry: SharedRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from tests.util import commit_files as commit_via

    team = registry.new_team("integ")
    _, key = registry.new_user("reader", teams=(team,))
    payload = os.urandom(16 * MiB)  # above the test servers' multipart threshold: the server re-hashes it
    store = make_store(registry.server.url, key)
    commit_via(store, tmp_path, {"big.bin": payload}, entity=team)
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    (tmp_path / "a").mkdir()
    with mounted(registry.server.url, tmp_path / "a") as m:  # type: ignore[arg-type]
        path = m.path / team / "proj" / "ds:v0" / "big.bin"
        os.stat(path)
        before = m.stats()["store_requests"]
        assert check_reads(path, payload, chunk=4096, offsets=[9 * MiB + 123]) == (1, 0)
        assert m.stats()["store_requests"] - before <= 2  # lazy: a block map, not a whole-file hash
        assert m.stats()["blockmap_requests"] == 1
    corrupt_server_blob(registry, team, payload, 5 * MiB + 77)
    (tmp_path / "b").mkdir()
    with mounted(registry.server.url, tmp_path / "b") as m:  # type: ignore[arg-type]
        path = m.path / team / "proj" / "ds:v0" / "big.bin"
        good, eio = check_reads(path, payload)
        assert eio >= 1 and good + eio == 16
        assert "block 5" in m.log_text()
        good2, eio2 = check_reads(path, payload)
        assert eio2 >= 1
