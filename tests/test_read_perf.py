"""Read-path request counts (issue 17): streaming sequential reads, batched block maps, batched
URLs.  Real stores (the embedded one, or the real server); only requests are counted, never time."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from client.cache import Cache
from client.hashing import md5_bytes
from mountfs.content import ContentReader
from client.errors import StoreUnavailableError
from mountfs.fetch import FetchConfig, FetchError
from mountfs.namespace import FileRef
from tests.server_fixtures import make_store, moto_s3, postgres, registry  # noqa: F401
from tests.util import commit_files, upload_bytes

KiB, MiB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(180)


class CountingStore:
    """The real store underneath; counts every content request the read path sends it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.reads: list[tuple[int, int | None]] = []  #: read_blob (start, length)
        self.streams: list[tuple[int, int]] = []  #: stream_blob (start, length)
        self.blockmap_calls: list[list[str]] = []
        self.chunk_max = 0  #: the largest piece a stream ever handed over at once
        self.open_streams = 0  #: streams started and not yet ended (closed, failed or done)
        self.stream_end = 0  #: how far the latest stream has read the blob

    def read_blob(self, entity, md5_hex, start=0, length=None):
        with self.lock:
            self.reads.append((start, length))
        return self.inner.read_blob(entity, md5_hex, start, length)

    def stream_blob(self, entity, md5_hex, start, length):
        with self.lock:
            self.streams.append((start, length))
            self.open_streams += 1
            self.stream_end = start
        try:
            for chunk in self.inner.stream_blob(entity, md5_hex, start, length):
                with self.lock:
                    self.chunk_max = max(self.chunk_max, len(chunk))
                    self.stream_end += len(chunk)
                yield chunk
        finally:
            with self.lock:
                self.open_streams -= 1

    def blockmaps(self, entity, md5_hexes):
        md5s = list(md5_hexes)
        with self.lock:
            self.blockmap_calls.append(md5s)
        return self.inner.blockmaps(entity, md5s)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def requests(self) -> int:
        return len(self.reads) + len(self.streams)


def _big(n_mib: int) -> bytes:
    """``n_mib`` MiB, every 1 MiB block different (cheaper than os.urandom of all of it)."""
    base = os.urandom(MiB - 8)
    return b"".join(i.to_bytes(8, "little") + base for i in range(n_mib))


def _reader(local_store, tmp_path: Path, **cfg) -> tuple[ContentReader, CountingStore]:
    store = CountingStore(local_store)
    # local_blobs=False: the ranged path every remote store takes
    return ContentReader(store, Cache(tmp_path / "cache"), FetchConfig(local_blobs=False, **cfg)), store


def test_cold_sequential_read_streams_in_few_requests(local_store, tmp_path: Path) -> None:
    data = _big(256)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    (tmp_path / f"upload-{md5}").unlink()
    cr, store = _reader(local_store, tmp_path)
    ref = FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big")
    h = cr.open(ref)
    h_md5 = __import__("hashlib").md5()
    for off in range(0, len(data), 128 * KiB):  # what the kernel sends a sequential reader
        chunk = cr.read(h, off, 128 * KiB)
        assert chunk == data[off:off + 128 * KiB]
        h_md5.update(chunk)
    cr.close(h)
    assert h_md5.hexdigest() == md5
    # Before: 33 ranged requests of <= 8 MiB.  Now the window grows 1 -> 64 MiB and large
    # windows are streamed: a handful of requests, each one streamed a block at a time.
    assert store.requests <= 12, (store.reads, store.streams)
    assert all(length is not None and length <= 8 * MiB for _, length in store.reads)
    assert max(length for _, length in store.streams) >= 64 * MiB
    assert store.chunk_max <= MiB  # never a whole range in memory
    assert sum(length for _, length in store.reads) + sum(length for _, length in store.streams) == len(data), \
        (store.reads, store.streams)
    cr.shutdown()


def _read_seq(cr: ContentReader, h, data: bytes, start: int, end: int) -> None:
    for off in range(start, end, 128 * KiB):  # what the kernel sends a sequential reader
        assert cr.read(h, off, 128 * KiB) == data[off:off + 128 * KiB]


def _until(cond, seconds: float = 20.0) -> bool:
    """Poll ``cond`` (bounded): True once it holds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _settled(store: CountingStore, quiet: float = 0.3, seconds: float = 20.0) -> int:
    """Wait until the stream stops moving (a paused stream), bounded; its position."""
    deadline = time.monotonic() + seconds
    last = -1
    while time.monotonic() < deadline:
        with store.lock:
            now = store.stream_end
        if now == last:
            return now
        last = now
        time.sleep(quiet)
    raise AssertionError(f"the stream kept moving for {seconds} s (at {last})")


def test_cold_sequential_read_is_one_back_pressured_stream(local_store, tmp_path: Path) -> None:
    """Issue 17: a sequential reader costs the small first requests and then ONE stream to the
    end of the file (was: a new 64 MiB request per window, 11 for 256 MiB); every byte is
    asked for once."""
    data = _big(256)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    cr, store = _reader(local_store, tmp_path)
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, len(data))
    cr.close(h)
    assert len(store.streams) == 1, store.streams
    start, length = store.streams[0]
    assert start + length == len(data)  # to the end of the file, not one window
    # the reader's own first 1 MiB, then the stream from the first readahead window on
    assert store.requests == 2, (store.reads, store.streams)
    assert sum(n for _, n in store.reads) + length == len(data)
    assert store.open_streams == 0
    cr.shutdown()


def test_a_stream_pauses_with_its_reader_and_resumes(local_store, tmp_path: Path) -> None:
    """The long stream is back-pressured: while the reader stops, it reads no further than the
    readahead window past the reader, and it goes on (the same stream) when the reader does."""
    data = _big(160)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    cr, store = _reader(local_store, tmp_path, readahead_max=16 * MiB, stream_idle=600.0)
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, 48 * MiB)
    paused_at = _settled(store)
    assert store.open_streams == 1  # paused, not ended
    assert paused_at <= 48 * MiB + 16 * MiB + 2 * MiB, paused_at  # the window (+ a block in hand)
    _read_seq(cr, h, data, 48 * MiB, len(data))
    cr.close(h)
    assert len(store.streams) == 1 and store.streams[0][0] + store.streams[0][1] == len(data)
    cr.shutdown()


def test_closing_a_file_ends_its_paused_stream_at_once(local_store, tmp_path: Path) -> None:
    data = _big(128)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    # an idle bound far past the test's timeout: only the close can end the stream in time
    cr, store = _reader(local_store, tmp_path, readahead_max=16 * MiB, stream_idle=3600.0)
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, 40 * MiB)
    _settled(store)
    assert store.open_streams == 1
    cr.close(h)
    assert store.open_streams == 0  # close waited for the stream to end, and it did
    # what it fetched is kept: a new reader finds those blocks in the partial file
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, len(data))
    cr.close(h)
    assert store.open_streams == 0
    cr.shutdown()


def test_two_sequential_readers_of_one_file_get_a_stream_each(local_store, tmp_path: Path) -> None:
    """Two readers at different places of one large file (two DataLoader workers): each region
    is one stream, not a request per window for the second reader."""
    data = _big(192)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    cr, store = _reader(local_store, tmp_path)
    ref = FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big")
    a, b = cr.open(ref), cr.open(ref)
    for k in range(0, 48 * MiB, 128 * KiB):  # interleaved, as two processes would read
        assert cr.read(a, k, 128 * KiB) == data[k:k + 128 * KiB]
        assert cr.read(b, 120 * MiB + k, 128 * KiB) == data[120 * MiB + k:120 * MiB + k + 128 * KiB]
    cr.close(a)
    cr.close(b)
    assert len(store.streams) == 2, store.streams
    assert store.requests <= 4, (store.reads, store.streams)
    cr.shutdown()


class SlowStreams(CountingStore):
    """Streams that take a while per chunk, so a close lands while one is mid-way."""

    def stream_blob(self, entity, md5_hex, start, length):
        for chunk in super().stream_blob(entity, md5_hex, start, length):
            time.sleep(0.01)
            yield chunk


def test_closing_a_file_aborts_its_stream_mid_way(local_store, tmp_path: Path) -> None:
    """At the last close nobody waits for the blocks the stream has claimed ahead of the
    reader (up to a whole 64 MiB window): it stops at once instead of fetching them."""
    data = _big(160)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    store = SlowStreams(local_store)
    cr = ContentReader(store, Cache(tmp_path / "cache"), FetchConfig(local_blobs=False))
    ref = FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big")
    h = cr.open(ref)
    _read_seq(cr, h, data, 0, 8 * MiB)
    cr.close(h)
    assert store.open_streams == 0
    assert store.stream_end < 8 * MiB + 16 * MiB, store.stream_end  # not the 64 MiB it had claimed
    h = cr.open(ref)  # what it did not deliver is not marked present: fetched again, right bytes
    _read_seq(cr, h, data, 0, len(data))
    cr.close(h)
    cr.shutdown()


class BadStreams(CountingStore):
    """Streams that go wrong at ``at`` bytes into the blob: ``mode`` "flip" alters a byte there
    (ranged reads stay right), "die" fails there every time."""

    def __init__(self, inner, at: int, mode: str) -> None:
        super().__init__(inner)
        self.at, self.mode = at, mode

    def stream_blob(self, entity, md5_hex, start, length):
        pos = start
        for chunk in super().stream_blob(entity, md5_hex, start, length):
            if pos <= self.at < pos + len(chunk):
                if self.mode == "die":
                    raise StoreUnavailableError("the endpoint went away mid-stream")
                bad = bytearray(chunk)
                bad[self.at - pos] ^= 0xFF
                chunk = bytes(bad)
            pos += len(chunk)
            yield chunk


def test_a_stream_with_a_wrong_byte_never_serves_it(local_store, tmp_path: Path) -> None:
    data = _big(64)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    store = BadStreams(local_store, at=30 * MiB + 77, mode="flip")
    cr = ContentReader(store, Cache(tmp_path / "cache"), FetchConfig(local_blobs=False))
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, len(data))  # every read compared: the bad block was fetched again
    cr.close(h)
    assert store.open_streams == 0
    assert any(start <= 30 * MiB < start + (n or 0) for start, n in store.reads)  # refetched by range
    cr.shutdown()


def test_a_stream_that_keeps_failing_ends_in_an_error_not_a_hang(local_store, tmp_path: Path) -> None:
    data = _big(64)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    store = BadStreams(local_store, at=20 * MiB + 5, mode="die")
    cr = ContentReader(store, Cache(tmp_path / "cache"), FetchConfig(local_blobs=False, attempts=2, backoff=0.01,
                                                                      timeout=5.0))
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, 20 * MiB)  # what came before the failure is served
    with pytest.raises(FetchError):
        _read_seq(cr, h, data, 20 * MiB, len(data))
    cr.close(h)
    assert store.open_streams == 0
    cr.shutdown()


def test_a_stream_left_idle_ends_by_itself(local_store, tmp_path: Path) -> None:
    """A reader that stops for good (a DataLoader worker that moved on) does not hold a
    connection open: after ``stream_idle`` seconds the paused stream ends."""
    data = _big(128)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    cr, store = _reader(local_store, tmp_path, readahead_max=16 * MiB, stream_idle=0.5)
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, 40 * MiB)
    assert _until(lambda: store.open_streams == 0), "the idle stream was never ended"
    _read_seq(cr, h, data, 40 * MiB, len(data))  # the reader comes back: a new stream, right bytes
    cr.close(h)
    assert len(store.streams) == 2
    cr.shutdown()


def test_4k_read_in_the_middle_of_a_large_file_costs_at_most_two_requests(local_store, tmp_path: Path) -> None:
    data = _big(96)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    cr, store = _reader(local_store, tmp_path)
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    mid = 50 * MiB + 12345
    assert cr.read(h, mid, 4 * KiB) == data[mid:mid + 4 * KiB]
    # the kernel's own readahead right behind it
    assert cr.read(h, mid + 4 * KiB, 124 * KiB) == data[mid + 4 * KiB:mid + 128 * KiB]
    cr.close(h)
    assert store.requests <= 2 and store.streams == []
    assert sum(length for _, length in store.reads) <= 2 * MiB
    cr.shutdown()


# -- over the real server (SQLite + blob directory, PostgreSQL + S3 on moto) -----------------

def _count_http(store) -> list[tuple[str, str, str]]:
    """Every HTTP exchange of an HttpStore as (method, path, Range header): counted, not mocked."""
    seen: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def hook(method: str, url: str, headers) -> None:
        with lock:
            seen.append((method, urlsplit(url).path, headers.get("Range", "")))
    store.observe(hook)
    return seen


def test_streamed_sequential_read_over_the_server(registry, tmp_path: Path) -> None:
    user, key = registry.new_user("stream")
    writer = make_store(registry.server.url, key)
    data = _big(24) + b"tail"
    md5 = upload_bytes(writer, user, data, tmp_path)
    reader = make_store(registry.server.url, key)
    seen = _count_http(reader)
    # a scaled-down layout (2 MiB in memory, 8 MiB streamed) keeps the test small
    cr = ContentReader(reader, Cache(tmp_path / "cache"), FetchConfig(
        max_request=2 * MiB, max_stream=8 * MiB, readahead_max=8 * MiB, watchdog=False))
    h = cr.open(FileRef(user, md5, len(data), "v", "p"))
    out = bytearray()
    for off in range(0, len(data), 128 * KiB):
        out += cr.read(h, off, 128 * KiB)
    cr.close(h)
    assert md5_bytes(bytes(out)) == md5
    ranged = [r for _, _, r in seen if r]
    # <= 2 MiB requests until the window reaches 8 MiB, then 8 MiB streams (was: 13 x 2 MiB)
    assert len(ranged) <= 7, seen
    assert sum(1 for r in ranged if _span(r) == 8 * MiB) >= 1
    assert sum(_span(r) for r in ranged) == len(data)  # every byte asked for once
    cr.shutdown()
    reader.close()
    writer.close()


def _span(rng: str) -> int:
    a, b = rng.removeprefix("bytes=").split("-")
    return int(b) - int(a) + 1


# -- batched look-ups for the siblings of a directory ------------------------------------------

def _mounted_world(store, tmp_path: Path, files: dict[str, bytes], entity: str = "ent", **cfg):
    """A Namespace + ContentReader wired like the daemon's (without FUSE)."""
    from mountfs.manifest_index import IndexStore
    from mountfs.namespace import Namespace

    commit_files(store, tmp_path, files, entity=entity)
    cache = Cache(tmp_path / "cache")
    cr = ContentReader(store, cache, FetchConfig(**cfg))
    ns = Namespace(store, IndexStore(cache.root / "index", cr.manifest_path))
    cr.directory_files = ns.directory_files
    return ns, cr


def _open_read(ns, cr, path: str, off: int = 0, size: int = 4 * KiB) -> bytes:
    node = ns.walk(path)
    fh, ref = ns.open(node.inode, os.O_RDONLY)
    h = cr.open(ref)
    try:
        return cr.read(h, off, size)
    finally:
        cr.close(h)
        ns.release(fh)


def test_opening_n_large_files_of_a_directory_costs_one_block_map_request(local_store, tmp_path: Path) -> None:
    big = {f"d/big{i}.bin": _big(3) + bytes([i]) for i in range(6)}
    files = {**big, "d/small.txt": b"small", "other/big.bin": _big(3) + b"other"}
    store = CountingStore(local_store)
    ns, cr = _mounted_world(store, tmp_path, files, local_blobs=False)
    for path, data in big.items():
        assert _open_read(ns, cr, f"ent/proj/ds:v0/{path}", MiB + 7) == data[MiB + 7:MiB + 7 + 4 * KiB]
    # one request carried the maps of every large file in d/ (was: one per file, 6)
    assert len(store.blockmap_calls) == 1 and cr.stats()["blockmap_requests"] == 1
    assert sorted(store.blockmap_calls[0]) == sorted(md5_bytes(d) for d in big.values())
    assert _open_read(ns, cr, "ent/proj/ds:v0/other/big.bin", 5) == files["other/big.bin"][5:5 + 4 * KiB]
    assert len(store.blockmap_calls) == 2  # another directory: its own batch
    cr.shutdown()


def _listing(ns, path: str) -> list[str]:
    fh = ns.opendir(ns.walk(path).inode)
    try:
        return [name for _, name, _ in ns.readdir_page(fh, 0, 10_000)]
    finally:
        ns.releasedir(fh)


def test_cold_small_files_over_the_server_sign_urls_in_batches_and_prefetch(registry, tmp_path: Path) -> None:
    user, key = registry.new_user("small")
    files = {f"shard/{i:03d}.bin": os.urandom(10 * KiB + i) for i in range(40)}
    writer = make_store(registry.server.url, key)
    reader = make_store(registry.server.url, key)
    ns, cr = _mounted_world(reader, tmp_path, files, entity=user)
    root = f"{user}/proj/ds:v0/shard"
    names = _listing(ns, root)  # builds the index (the manifest download is not counted below)
    seen = _count_http(reader)
    for name in names:  # a reader walking the directory, one file after the other
        assert _open_read(ns, cr, f"{root}/{name}", 0, 64 * KiB) == files[f"shard/{name}"]
    cr.shutdown()  # lets background prefetches and cache installs finish
    md5s = {md5_bytes(d) for d in files.values()}
    per_file_urls = [p for m, p, _ in seen if p.endswith("/url") and p.split("/")[-2] in md5s]
    batches = [p for m, p, _ in seen if p.endswith("/blobs/urls")]
    data_gets = [p for m, p, r in seen if m == "GET" and not p.startswith("/api/")]
    # Before: one signed-URL request per file (40) next to its GET.  Now one batch signs the
    # directory, every file costs one GET of its bytes and none is fetched twice.
    assert per_file_urls == [] and len(batches) == 1, seen
    assert len(data_gets) == len(files), seen
    assert cr.stats()["prefetched"] > 0  # walking the directory fetched ahead of the reader
    writer.close()
    reader.close()


def test_a_directory_walk_lists_its_directory_once_per_many_files_not_per_file(local_store, tmp_path: Path) -> None:
    """Issue 17: fetching ahead of a reader that walks a directory used to list the next
    siblings (a SQL query, on the event loop) at every file read; now the rows of one listing
    serve the walk for dozens of files.  Every file is still read right, and fetched ahead."""
    files = {f"shard/{i:03d}.bin": os.urandom(2 * KiB + i) for i in range(120)}
    store = CountingStore(local_store)
    ns, cr = _mounted_world(store, tmp_path, files, local_blobs=False)
    listings: list[int] = []
    inner = cr.directory_files

    def counted(entity, directory, limit):  # type: ignore[no-untyped-def]
        listings.append(limit)
        return inner(entity, directory, limit)

    cr.directory_files = counted
    root = "ent/proj/ds:v0/shard"
    for name in _listing(ns, root):
        assert _open_read(ns, cr, f"{root}/{name}", 0, 64 * KiB) == files[f"shard/{name}"]
    cr.shutdown()
    assert cr.stats()["prefetched"] > 60  # the walk was fetched ahead of the reader
    assert len(listings) <= 8, listings  # was 120: one listing per file read
    assert len(store.reads) == len(files)  # none fetched twice


def _parallel_walk(ns, cr, root: str, files: dict[str, bytes], prefix: str, readers: int) -> None:
    """``readers`` threads reading a directory's files in order, like ``xargs -P`` or a
    DataLoader's workers over a sorted file list (each file whole, checked)."""
    from concurrent.futures import ThreadPoolExecutor

    names = _listing(ns, root)

    def one(name: str) -> bool:
        return _open_read(ns, cr, f"{root}/{name}", 0, 256 * KiB) == files[f"{prefix}/{name}"]

    with ThreadPoolExecutor(readers) as pool:
        assert all(pool.map(one, names))


def test_parallel_readers_of_a_directory_fetch_each_small_file_once(local_store, tmp_path: Path) -> None:
    """Issue 17: with 8 readers walking one directory, bench/peers saw 503 store requests for
    300 files: a reader fetched a file the sibling prefetch was fetching too (or had just
    fetched and not yet installed), and the other way round.  Each file is fetched once."""
    files = {f"shard/{i:03d}.bin": os.urandom(8 * KiB + i) for i in range(240)}
    store = CountingStore(local_store)
    ns, cr = _mounted_world(store, tmp_path, files, local_blobs=False)
    _parallel_walk(ns, cr, "ent/proj/ds:v0/shard", files, "shard", readers=8)
    cr.shutdown()
    assert cr.stats()["prefetched"] > 0  # the walk was still fetched ahead of the readers
    sent = len(store.reads)
    assert sent == len(files), f"{sent} requests for {len(files)} files"


def test_a_small_object_read_again_before_its_cache_install_costs_no_request(local_store, tmp_path: Path) -> None:
    """A small object's cache install is queued behind its first read (batched, see
    mountfs/small_installs.py); a second file with the same bytes, or the same file opened
    again, read while the install waits is served from the queued, verified bytes."""
    same = os.urandom(6 * KiB)
    files = {"a/one.txt": same, "b/two.txt": same, "c/other.txt": os.urandom(5 * KiB)}
    store = CountingStore(local_store)
    ns, cr = _mounted_world(store, tmp_path, files, local_blobs=False)
    gate, real = threading.Event(), cr.cache.install_verified

    def held_install(batch):  # type: ignore[no-untyped-def]
        assert gate.wait(30), "the test never opened the gate"
        return real(batch)

    cr.cache.install_verified = held_install  # the real install, only later
    assert _open_read(ns, cr, "ent/proj/ds:v0/a/one.txt", 0, 64 * KiB) == same
    assert _open_read(ns, cr, "ent/proj/ds:v0/b/two.txt", 0, 64 * KiB) == same
    assert _open_read(ns, cr, "ent/proj/ds:v0/a/one.txt", 0, 64 * KiB) == same
    assert len(store.reads) == 1  # was 3: each open fetched the blob again
    gate.set()
    cr.shutdown()
    assert cr.cache.lookup(md5_bytes(same), len(same)) is not None  # and it did reach the cache


# -- the cache bound covers partial objects -----------------------------------------------------

def _disk_bytes(root: Path) -> int:
    """Allocated bytes of the cache's objects and partial objects (what the bound is about)."""
    total = 0
    for sub in ("objects", "partial"):
        for p in (root / sub).rglob("*"):
            if p.is_file():
                total += p.stat().st_blocks * 512
    return total


def test_partial_objects_count_in_the_cache_bound(local_store, tmp_path: Path) -> None:
    bound = 10 * MiB
    a, b = _big(6) + b"a", _big(6) + b"b"
    ma, mb = upload_bytes(local_store, "ent", a, tmp_path), upload_bytes(local_store, "ent", b, tmp_path)
    cache = Cache(tmp_path / "cache", max_bytes=bound)
    cr = ContentReader(CountingStore(local_store), cache, FetchConfig(local_blobs=False))
    ha = cr.open(FileRef("ent", ma, len(a), "v", "a"))
    hb = cr.open(FileRef("ent", mb, len(b), "v", "b"))
    assert cr.read(ha, 0, 4 * KiB) == a[:4 * KiB]  # a partial object of 6 MiB begins
    assert cr.read(hb, 0, 4 * KiB) == b[:4 * KiB]  # no room for a second one beside it
    assert cache.info().bytes <= bound  # the partial object is counted
    for h, data in ((ha, a), (hb, b)):
        out = bytearray()
        for off in range(0, len(data), MiB):
            out += cr.read(h, off, MiB)
        assert bytes(out) == data
    cr.close(ha)
    cr.close(hb)
    cr.shutdown()
    # Before: both were fetched into partial objects and promoted, 12 MiB in a 10 MiB cache.
    assert _disk_bytes(cache.root) <= bound
    assert cache.lookup(ma, len(a)) is not None  # the first one is cached; the second was streamed
    assert cache.info().bytes <= bound


# -- SDK download of a fully cached artifact --------------------------------------------------

def _blob_routes(url: str) -> dict[str, float]:
    """Requests the server answered so far on blob routes, by route template (its /metrics)."""
    import requests

    out: dict[str, float] = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("artifactfs_http_requests_total{") and "/blobs" in line:
            route = line.split('route="', 1)[1].split('"', 1)[0]
            out[route] = out.get(route, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_download_of_a_fully_cached_artifact_asks_the_store_for_no_blob(registry, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import client
    from client import live_run as run_mod

    team = registry.new_team("cached")
    _, key = registry.new_user("dl", teams=(team,))
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    files = {f"d/{i:02d}.bin": os.urandom(2000 + i) for i in range(30)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    run_mod._reset_for_tests()
    monkeypatch.setenv("ARTIFACTFS_STORE", registry.server.url)
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    try:
        with client.init(entity=team, project="proj", job_type="prep") as run:
            art = client.Artifact("data", type="dataset")
            art.add_dir(str(src))
            run.log_artifact(art)
        with client.init(entity=team, project="proj", job_type="train") as run:
            got = run.use_artifact("data:latest")
            got.download(str(tmp_path / "out1"))  # logging cached every object already
            before = _blob_routes(registry.server.url)
            root = Path(got.download(str(tmp_path / "out2")))
            after = _blob_routes(registry.server.url)
    finally:
        run_mod._reset_for_tests()
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    # Before: one POST /blobs/urls signing all 30 (one per 2,000 files) although nothing was fetched.
    assert {r: after[r] - before.get(r, 0.0) for r in after if after[r] != before.get(r, 0.0)} == {}


def _resident(path: Path, off: int, length: int) -> bool:
    """Whether the page cache holds all of [off, off + length) of ``path`` (mincore(2): it
    looks without reading, where even an RWF_NOWAIT read would start the disk's readahead)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-length // mmap.PAGESIZE)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY, offset=off)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return all(b & 1 for b in vec)
    finally:
        del addr  # noqa: F821 - the exported buffer must go before the map closes
        m.close()


def test_a_cached_object_read_after_a_remount_is_asked_of_the_disk_ahead(local_store, tmp_path: Path) -> None:
    """The disk-cache path (issue 17): after a remount a cached object's pages are on disk
    only; a sequential reader's next bytes are asked of the disk ahead of it (WILLNEED over
    the readahead window), and the event loop's read answers only what the page cache holds."""
    import time

    data = _big(32)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    ref = FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big")
    cr, _ = _reader(local_store, tmp_path)
    h = cr.open(ref)
    for off in range(0, len(data), MiB):
        cr.read(h, off, MiB)
    cr.close(h)
    cr.shutdown()
    cached = Cache(tmp_path / "cache").lookup(md5, len(data))
    assert cached is not None  # promoted into the cache
    with open(cached, "rb") as f:  # a remount on a busy machine: the pages are gone
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert not _resident(cached, 20 * MiB, MiB)

    cr, store = _reader(local_store, tmp_path)
    h = cr.open(ref)
    got, on_loop = [], 0
    for off in range(0, 8 * MiB, MiB):  # a sequential reader, as the kernel sends it
        chunk = cr.read_nowait(h, off, MiB)
        on_loop += chunk is not None
        got.append(bytes(chunk) if chunk is not None else cr.read(h, off, MiB))
    assert b"".join(got) == data[:8 * MiB]
    assert store.requests == 0  # the cache answered everything
    deadline = time.monotonic() + 20  # the disk reads ahead on its own; bounded wait
    while not _resident(cached, 8 * MiB, 24 * MiB) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _resident(cached, 8 * MiB, 24 * MiB), "the bytes ahead of the reader were not asked of the disk"
    rest = []
    for off in range(8 * MiB, len(data), MiB):
        chunk = cr.read_nowait(h, off, MiB)
        assert chunk is not None, off  # read ahead: answered on the loop
        rest.append(bytes(chunk))  # the loop's buffer is reused by the next read
    assert b"".join(rest) == data[8 * MiB:]
    cr.close(h)
    cr.shutdown()


def test_a_stream_goes_on_reading_while_a_block_is_written(local_store, tmp_path: Path, monkeypatch) -> None:
    """Issue 17: the stream's socket reads and its disk writes overlap.  On this kind of machine
    a write into new page-cache pages costs ~3 ms/MiB, as much as the network and the hash
    together; done in line it stops the stream for that long per block.  Here one block's write
    is held: the stream still reads the next blocks meanwhile (a few, bounded), and every byte
    served is right."""
    from mountfs import fetch
    data = _big(64)
    md5 = upload_bytes(local_store, "ent", data, tmp_path)
    cr, store = _reader(local_store, tmp_path)
    held, gate, entered = 20, threading.Event(), threading.Event()
    real_write = fetch.PartialFile.write

    def write(self, i, block):
        if i == held:
            entered.set()
            assert gate.wait(60), "the held write was never released"
        return real_write(self, i, block)

    monkeypatch.setattr(fetch.PartialFile, "write", write)
    h = cr.open(FileRef("ent", md5, len(data), "ent/p/c:v0", "p/c:v0/big"))
    _read_seq(cr, h, data, 0, 8 * MiB)
    rest = threading.Thread(target=_read_seq, args=(cr, h, data, 8 * MiB, len(data)), daemon=True)
    rest.start()
    try:
        assert entered.wait(30), "the stream never reached the held block"
        # before: the stream thread itself sat in the write, its socket read stopped at the held block
        assert _until(lambda: store.stream_end >= (held + 3) * MiB, 20), store.stream_end
        moved = _settled(store)
        assert moved <= (held + 1 + fetch.WRITE_AHEAD + 1) * MiB, moved  # bounded: a few blocks in memory
    finally:
        gate.set()
    rest.join(60)
    assert not rest.is_alive()
    cr.close(h)
    assert store.open_streams == 0
    cr.shutdown()
