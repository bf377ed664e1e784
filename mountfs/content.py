"""The daemon's content layer: pinned file content from the cache, the store, or a local blob.

Where the bytes of an open file come from, in order:

1. the in-memory copy of a small object (md5-checked before its first byte is served);
2. a complete object in the shared cache, trusted when this daemon verified that very file
   (same md5, device, inode, size, mtime and ctime) or by its *verified marker* (xattr, see
   :mod:`client.cache`); any other cached object is served through its block map (each
   block checked on first read) or md5-checked whole first;
3. an embedded store's blob file (``LocalBlobs.blob_path``): read in place, never linked (the
   cache gets its own copy of large blobs in the background, so a write to the disposable
   cache can never reach the store's only copy; small blobs are not copied: re-reading them
   from the local store costs no more than from the cache).  Small blobs are md5-checked
   whole on every open; large ones are served
   block by block, each block checked against the blob's block map before it is served (no
   map: the whole blob is md5-checked before its first byte);
4. any other store: ranged requests into a :class:`~mountfs.fetch.PartialFile`; each block
   is checked against the block map when fetched and, after a remount, again on first read
   (the bitmap on disk is a hint, never a proof).  Without a map the whole object is fetched
   and md5-checked before its first byte is served.  Complete objects are promoted into the
   cache after their md5 matched.
5. a reference entry (``FileRef.source``, see :mod:`mountfs.ref_source`): the same path as 4
   with the reference's pinned ranged reads as the fetcher; blocks of pinned sources are
   trusted as fetched (:class:`PinnedPartialFile`), ``file://`` is md5-checked whole first,
   and the complete object is cached under its real md5.

Integrity rule: no byte is served before it was verified.  A block that fails: dropped and
fetched again once from the source; failing again, the read answers EIO and the log names
``entity/project/collection:vN/path`` and the block.  A bad store blob is remembered (by its
stat) so a new open fails at once until the file changes.  A full cache disk: eviction, then
streaming through a small verified in-memory window (a file larger than the cache stays
readable).

Concurrency rule: every method here runs in worker threads, except the ``*_nowait`` ones,
which run on the trio loop and never block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cachetools import LRUCache

from client.blockmap import BlockMap, BlockMismatchError
from client.cache import Cache, PartialHold, has_verified_marker, set_verified_marker
from client.errors import ArtifactFSError, DigestMismatchError, NotFoundError, PermissionDeniedError
from client.hashing import md5_fd
from client.retry import resume_while_progressing
from client.store.base import LocalBlobs, Store, UrlBatching

from .fetch import (BlockReader, EvictedBlockError, FetchConfig, FetchError, MiB, PartialFile,
                    ReadaheadWindow, SplitGauge, StreamSlots, drop_pages, passed_end, split_state,
                    ShortReadError, StreamBlocks, Streamer, is_temp_failure, retrying)
from .metrics import FetchMetrics
from .namespace import SIBLING_BATCH, FileRef
from .ref_source import RefIdentities
from .sibling_prefetch import SiblingPrefetch
from .small_installs import SmallInstalls

log = logging.getLogger(__name__)

#: cached objects up to this size are opened and md5-checked on the event loop (~0.3 ms)
_INLINE_PREPARE_MAX = 256 << 10
_EMPTY_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
#: verified small objects waiting for their (fsynced) cache install may hold this much memory
_PENDING_INSTALL_BYTES = 64 * MiB
#: blocks a streamed object (cache disk full) keeps in memory
_STREAM_WINDOW = 48 * MiB


class BlobBlocks:
    """A local file as block storage, verified block by block against the blob's block map.

    Used for an embedded store's blob file in place (``write`` records that the fetcher
    confirmed the store still holds that file) and for a cached object that is no longer
    trusted by its marker (``confirmed``: every block is there, each is checked on first read).
    Verification state lives in memory only: it is redone after a restart.
    """

    def __init__(self, fd: int, size: int, block_size: int, blockmap: BlockMap, *, confirmed: bool = False) -> None:
        self.fd, self.size, self.block_size, self.blockmap = fd, size, block_size, blockmap
        self.nblocks = -(-size // block_size)
        self._have = bytearray(b"\x01" * self.nblocks if confirmed else self.nblocks)
        self._checked = bytearray(self.nblocks)
        self._nchecked = 0
        self._count = self.nblocks if confirmed else 0
        self._lock = threading.Lock()
        #: called once, by the read that checks the last unchecked block
        self.on_checked: Callable[[], None] | None = None

    def has(self, i: int) -> bool:
        return bool(self._have[i])

    def write(self, i: int, data: bytes | memoryview) -> None:
        with self._lock:
            if not self._have[i]:
                self._have[i] = 1
                self._count += 1

    def _span(self, off: int, size: int) -> range:
        return range(off // self.block_size, -(-min(off + size, self.size) // self.block_size))

    def read(self, off: int, size: int) -> bytes:
        for i in self._span(off, size):
            if not self._checked[i]:
                block = os.pread(self.fd, self.block_size, i * self.block_size)
                if not self.blockmap.check(i, block):
                    raise BlockMismatchError(i, f"block {i} failed verification")
                with self._lock:
                    if self._checked[i]:
                        continue  # another reader checked it meanwhile
                    self._checked[i] = 1
                    self._nchecked += 1
                    last = self._nchecked == self.nblocks
                if last and self.on_checked is not None:
                    self.on_checked()
        return os.pread(self.fd, size, off)

    def ready(self, off: int, size: int) -> bool:
        return all(self._checked[i] for i in self._span(off, size))

    def settle(self) -> None:
        return None  # nothing to persist; verification completes at promotion

    def verified(self) -> bool:
        """Every block matches the block map (those not read yet are checked now): the file
        holds the bytes the store hashed when it made the map (see PartialFile.verified).  The
        caller also checks that the file did not change since it was opened."""
        for i in range(self.nblocks):
            if not self._checked[i]:
                if not self.blockmap.check(i, os.pread(self.fd, self.block_size, i * self.block_size)):
                    return False
                self._checked[i] = 1
        return True

    def complete(self) -> bool:
        return self._count == self.nblocks

    def md5(self) -> str:
        return _md5_fd(self.fd, self.size)

    def close(self) -> None:
        os.close(self.fd)


class PinnedPartialFile(PartialFile):
    """A reference's partial file: blocks are trusted as written, because every fetch was
    pinned to the recorded object (see :mod:`mountfs.ref_source`).  Never resumed from disk:
    a bitmap left by an earlier daemon proves nothing, and no block map can check the blocks."""

    def _load_bits(self) -> None:
        return None

    def write(self, i: int, data: bytes | memoryview) -> None:
        self._checked[i] = 1  # before the bit: whoever sees the block present sees it checked
        super().write(i, data)


def _source_temp(exc: BaseException) -> bool:
    """A reference source's answers that retrying cannot change: changed, gone, refused."""
    return is_temp_failure(exc) and not isinstance(exc, (DigestMismatchError, NotFoundError))


def _md5_fd(fd: int, size: int) -> str:
    return md5_fd(fd, size, chunk=4 * MiB)


def _stat_key(md5: str, st: os.stat_result) -> tuple[str, int, int, int, int, int]:
    """What a verification is valid for: this md5 in this very file, unchanged since."""
    return (md5, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


class _Object:
    """One md5's content while at least one file handle has it open."""

    def __init__(self, ref: FileRef, key: str) -> None:
        self.ref = ref
        self.key = key  #: key in ContentReader._objects (a reference's ref may be resolved later)
        self.refs = 0
        self.fd: int | None = None  #: complete, verified object
        self.data: bytes | None = None  #: a small object's verified bytes (installed in the background)
        self.partial: PartialFile | None = None
        self.partial_hold: PartialHold | None = None  #: counts the partial file in the cache bound
        self.blob: BlobBlocks | None = None  #: a local store blob served in place
        self.blob_stat: os.stat_result | None = None
        self.bad = False  #: the blob hashed to something else: reads fail, except of blocks verified before
        self.source = ""  #: "cache", "store" (a blob in place), "partial" or "stream"
        self.skip_cache = False  #: the cached object failed verification: use the store
        self.whole_pending = False  #: no block map: the whole object is md5-checked first
        self.evicted = False  #: the cache was evicted once for this object after ENOSPC
        self.reader: BlockReader | None = None
        self.lock = threading.Lock()
        self.promoting = False
        self.closed = False
        self.promotion: Future[None] | None = None
        #: sources replaced while the object is open (a dropped cache copy, a partial file
        #: given up for streaming): kept open until the object closes, because a reader on
        #: another thread may still hold them, and a closed fd number can be reused by any
        #: file (a read through it could return another file's bytes)
        self.retired: list[PartialFile | BlobBlocks] = []

    def close_sources(self) -> None:
        """Close every fd this object holds (the object lock held, no reader left)."""
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        elif self.partial is not None:
            self.partial.close()
        elif self.blob is not None:
            self.blob.close()
        for old in self.retired:
            with contextlib.suppress(OSError):
                old.abandon() if isinstance(old, PartialFile) else old.close()
        if self.partial_hold is not None:
            self.partial_hold.release()  # an incomplete partial stays counted, now evictable
            self.partial_hold = None
        self.partial = self.reader = self.blob = None
        self.retired = []
        self.data = None


@dataclass
class Handle:
    """Per open file: its object and its own readahead state."""

    obj: _Object
    window: ReadaheadWindow
    advised: int = 0  #: a complete object's bytes up to here were asked of the disk ahead (WILLNEED)
    dropped: int = 0  #: and its pages before here dropped behind the reader (FetchConfig.drop_behind)


class ContentReader:
    """Serves reads of pinned file content from the cache, fetching lazily from the store."""

    def __init__(self, store: Store, cache: Cache, config: FetchConfig | None = None) -> None:
        self.store, self.cache = store, cache
        self.config = config or FetchConfig()
        self._executor = ThreadPoolExecutor(self.config.parallel, thread_name_prefix="artifactfs-fetch")
        self._stream_slots = StreamSlots(self.config.streams)
        #: whether splitting streams pays on this store, learnt, and kept in the cache for the
        #: next daemon (one file per store location)
        self._split_gauge = SplitGauge(split_state(cache.root, store.location), store.location)
        self._io = ThreadPoolExecutor(max(4 * self.config.parallel, 16), thread_name_prefix="artifactfs-io")
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        #: verifications by this daemon, keyed by _stat_key (a changed file is no longer trusted)
        self._verified: LRUCache[tuple, bool] = LRUCache(maxsize=100_000)
        self._verified_lock = threading.Lock()  #: an LRUCache is not safe across threads
        #: store blob files that failed verification, by path -> _stat_key (until they change)
        self._bad: LRUCache[str, tuple] = LRUCache(maxsize=10_000)
        self._maps: LRUCache[tuple[str, str], BlockMap | None] = LRUCache(maxsize=10_000)
        #: the namespace's ``directory_files``: siblings of an open file, for batched requests
        self.directory_files: Callable[[str, tuple[str, int, int], int], list[tuple[int, str, int]]] | None = None
        self.store_requests = 0  #: ranged store requests issued (including retries)
        self.reference_requests = 0  #: ranged requests to reference sources (including retries)
        self._identities = RefIdentities(cache.root / "refs")
        self.metrics = FetchMetrics()  #: cache hits/misses, fetched bytes, fetch latency (mountfs/metrics.py)
        self.blockmap_requests = 0  #: block map look-ups (once per large blob and daemon)
        self.verify_failures = 0  #: blocks or objects that failed verification
        self.worker_reads = 0  #: reads answered in a worker thread (a thread hop each), not on the loop
        self.md5_bytes = 0  #: bytes of promoted partial objects put through md5 (none with a block map)
        self._installer = ThreadPoolExecutor(4, thread_name_prefix="artifactfs-install")
        self._small_installs = SmallInstalls(cache, _PENDING_INSTALL_BYTES, self._note_added)
        self._url_batches: dict[tuple[str, int], threading.Event] = {}
        self._walker = SiblingPrefetch(self)
        self._added = 0
        #: the loop's read buffer for complete objects: a read on the loop is answered before
        #: any other request runs (no await between it and pyfuse3's reply), so one buffer,
        #: reused, saves allocating (and faulting in) 1 MiB per request
        self._loop_buf = bytearray()
        self._nowait_flags = getattr(os, "RWF_NOWAIT", 0)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"store_requests": self.store_requests, "reference_requests": self.reference_requests,
                    "open_objects": len(self._objects),
                    "blockmap_requests": self.blockmap_requests, "verify_failures": self.verify_failures,
                    "prefetched": self._walker.fetched, "worker_reads": self.worker_reads,
                    "md5_bytes": self.md5_bytes, "split_trials": len(self._split_gauge.gains),
                    "stream_splits": self._split_gauge.splits,
                    "splits_pay": int(self._split_gauge.allowed())}

    # -- verification ------------------------------------------------------------------
    def blockmap(self, ref: FileRef) -> BlockMap | None:
        """The blob's block map from the store (once per daemon), None if it has none.

        One request carries the maps of the large siblings in the same directory too (see
        :meth:`_siblings`), so opening many large files of one directory costs one request.

        Maps are kept in memory only: a map on the local disk could be rewritten together
        with the object it describes.  FetchError when the map says another size than the
        manifest entry (the mount never serves a prefix or a padded blob).
        """
        if ref.source is not None:
            return None  # a reference's bytes are not a store blob: no block map
        key = (ref.entity, ref.md5)
        if key in self._maps:
            bm = self._maps[key]
        else:
            # The maps of every large sibling not known yet come along in the same request:
            # opening N large files of one directory costs one request, not N.
            siblings = self._siblings(ref, from_start=True)
            if len(siblings) >= SIBLING_BATCH and ref.md5 not in {m for _, m, _ in siblings}:
                siblings = self._siblings(ref)  # a huge directory: the files from this one on
            wanted = [ref.md5] + [m for _, m, size in siblings
                                  if size > self.config.small_object and (ref.entity, m) not in self._maps
                                  and m != ref.md5][:SIBLING_BATCH - 1]

            def call() -> dict[str, BlockMap]:
                with self._lock:
                    self.blockmap_requests += 1
                return self.store.blockmaps(ref.entity, wanted)

            got = retrying(call, None, self.config, self._io, f"block map of {ref.md5}")
            for md5 in wanted:
                m = got.get(md5)
                if m is not None and m.block_size != self.config.block_size:
                    m = None  # another block layout: verify the whole object instead
                self._maps[(ref.entity, md5)] = m
            bm = self._maps.get(key)
        if bm is not None and bm.size != ref.size:
            self._failed(ref, f"the manifest says {ref.size} bytes, the blob has {bm.size}")
        return bm

    def _siblings(self, ref: FileRef, *, from_start: bool = False,
                  limit: int = SIBLING_BATCH) -> list[tuple[int, str, int]]:
        """(row id, md5, size) of the files of ``ref``'s directory from ``ref`` on (or from the
        directory's start), in listing order: the namespace's hook; [] without one."""
        if self.directory_files is None or ref.directory is None:
            return []
        manifest_md5, dir_id, entry_id = ref.directory
        try:
            return self.directory_files(ref.entity, (manifest_md5, dir_id, 0 if from_start else entry_id), limit)
        except Exception as exc:  # noqa: BLE001 - only an optimisation: the file itself still works
            log.debug("no siblings for %s: %s", ref.path, exc)
            return []

    def _failed(self, ref: FileRef, what: str) -> NoReturn:
        with self._lock:
            self.verify_failures += 1
        log.error("%s (blob %s): %s; answering EIO", ref.where, ref.md5, what)
        raise FetchError(f"{ref.where}: {what}")

    def note_installed(self, md5: str) -> None:
        """Cache.on_installed: every install of this process puts bytes it checked against
        their md5 (the cache's rule), so the object is trusted as it is now (by its stat key)."""
        with contextlib.suppress(OSError):
            self._trust(_stat_key(md5, os.stat(self.cache.path(md5))))

    def trusted(self, fd: int, md5: str, st: os.stat_result) -> bool:
        """Whether this open file is known to hash to ``md5`` (this daemon's check or a marker)."""
        with self._verified_lock:
            if self._verified.get(_stat_key(md5, st)):
                return True
        if has_verified_marker(fd, md5, st):
            self._trust(_stat_key(md5, st))
            return True
        return False

    def _trust(self, key: tuple[str, int, int, int, int, int]) -> None:
        with self._verified_lock:
            self._verified[key] = True

    def _mark_verified(self, fd: int, md5: str) -> None:
        set_verified_marker(fd, md5)
        self._trust(_stat_key(md5, os.fstat(fd)))  # after the marker: it moves ctime

    # -- store access with retries ------------------------------------------------------
    def fetch_range(self, entity: str, md5: str, start: int, length: int) -> bytes:
        def call() -> bytes:
            with self._lock:
                self.store_requests += 1
            with self.metrics.fetching():
                data = self.store.read_blob(entity, md5, start, length)
            self.metrics.fetched_bytes.inc(len(data))
            return data

        return retrying(call, length, self.config, self._io, f"blob {md5}[{start}:+{length}]")

    def _fetcher(self, ref: FileRef) -> Callable[[int, int], bytes]:
        """Ranged reads of this file's content: the store's blob, or the reference's source."""
        if ref.source is not None:
            return lambda start, length: self._read_source(ref, start, length)
        return lambda start, length: self.fetch_range(ref.entity, ref.md5, start, length)

    def _read_source(self, ref: FileRef, start: int, length: int) -> bytes:
        """One pinned ranged read of a reference (retried like a store request).  A source that
        changed or vanished is EIO, refused credentials EACCES; either way one log line."""
        src = ref.source
        assert src is not None

        def call() -> bytes:
            with self._lock:
                self.reference_requests += 1
            data = src.read(start, length)
            if len(data) < length:  # a pinned source cannot shrink: only an unchecked one does
                raise DigestMismatchError(f"it now ends at byte {start + len(data)}, {ref.size} were recorded")
            return data

        try:
            return retrying(call, length, self.config, self._io, f"{src.uri}[{start}:+{length}]", _source_temp)
        except DigestMismatchError as exc:
            self._source_changed(ref, str(exc))
        except NotFoundError as exc:
            self._source_changed(ref, f"it no longer exists ({exc})")
        except PermissionDeniedError as exc:
            log.error("%s: reading the reference %s was refused: %s; answering EACCES", ref.path, src.uri, exc)
            raise

    def _source_changed(self, ref: FileRef, what: str, *, counted: bool = False) -> NoReturn:
        src = ref.source
        assert src is not None
        if not counted:
            with self._lock:
                self.verify_failures += 1
        log.error("%s: the reference %s changed since it was logged (recorded: %s): %s; answering EIO",
                  ref.path, src.uri, src.pinned_to(), what)
        raise FetchError(f"{ref.path}: the reference {src.uri} changed since it was logged")

    @staticmethod
    def _expected_md5(ref: FileRef) -> str | None:
        """The md5 the content must have: a stored blob's own, a reference's recorded one (if any)."""
        return ref.md5 if ref.source is None else ref.source.content_md5

    def _resolve_identity(self, obj: _Object) -> None:
        """A reference without a recorded md5 that was fetched whole before: from now on it is
        the md5 its pinned bytes had (cached under it, checked against it)."""
        src = obj.ref.source
        if src is None or not src.checked or src.content_md5 is not None:
            return
        known = self._identities.get(obj.ref.md5)
        if known is not None:
            obj.ref = dataclasses.replace(obj.ref, md5=known, source=dataclasses.replace(src, content_md5=known))

    def _fetched_whole(self, ref: FileRef, actual: str) -> None:
        """Remember which md5 a checked reference's complete bytes have (for the next open)."""
        if ref.source is not None and ref.source.checked:
            self._identities.put(ref.md5, actual)

    def stream_range(self, entity: str, md5: str, start: int, length: int,
                     deliver: Callable[[int, bytes | memoryview], None]) -> None:
        """One streamed ranged request (``Store.stream_blob``), resumed where it stopped after
        a failure.  No watchdog thread: the store bounds every socket read itself (a slow but
        steady stream of 64 MiB is not a hang), the retry policy bounds the attempts, and an
        round that moved at least RESUME_MIN_PROGRESS earns a fresh budget, and a few thinner
        rounds in a row end it (:func:`client.retry.resume_while_progressing`)."""
        pos, end = start, start + length
        cfg = dataclasses.replace(self.config, watchdog=False)

        def call() -> None:
            nonlocal pos
            with self._lock:
                self.store_requests += 1
            for chunk in self.store.stream_blob(entity, md5, pos, end - pos):
                if len(chunk) > end - pos:
                    raise ShortReadError(f"blob {md5}: the store sent more than [{start}, +{length})")
                deliver(pos, chunk)
                pos += len(chunk)
            if pos != end:
                raise ShortReadError(f"blob {md5}: stream ended at {pos}, expected {end}")

        resume_while_progressing(
            lambda: retrying(call, None, cfg, self._io, f"blob {md5}[{pos}:+{end - pos}] (streamed)"),
            lambda: pos, FetchError)

    def manifest_path(self, entity: str, md5: str) -> Path:
        """The complete, verified manifest blob in the cache (IndexStore's source)."""
        hit = self.cache.lookup(md5)
        if hit is not None:
            return hit
        tmp = self.cache.partial_dir / f"{md5}.manifest.{os.getpid()}.{threading.get_ident()}"

        def call() -> bytes:
            with self.metrics.fetching():
                self.cache.in_layout(lambda: self.store.download_blob(entity, md5, tmp))
            self.metrics.fetched_bytes.inc(tmp.stat().st_size)
            return b""

        try:
            retrying(call, None, self.config, self._io, f"manifest {md5}")
            return self.cache.add_file(md5, tmp, move=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # -- open/read/close ----------------------------------------------------------------
    def open(self, ref: FileRef) -> Handle:
        """Attach to the object's shared state; touches only the local cache, never the store."""
        if ref.size == 0 and ref.md5 == _EMPTY_MD5 and self.cache.lookup(ref.md5, 0) is None:
            # The kernel never sends a READ for an empty file; cache the (known) empty object
            # anyway, so a later download() of the same version needs nothing from the store.
            self._install_later(ref.md5, b"")
        # A reference is its own object even when it names a stored blob's md5: its bytes come
        # from (and fail with) its source, never those of a stored file opened beside it.
        key = ref.md5 if ref.source is None else f"ref-{ref.source.identity}"
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = _Object(ref, key)
            obj.refs += 1
        cfg = self.config
        return Handle(obj, ReadaheadWindow(cfg.block_size, cfg.readahead_max, trigger=cfg.block_size,
                                           slack=4 * MiB))

    def is_open(self, key: str) -> bool:
        """Whether some reader has the object ``key`` (a stored blob's md5) open now."""
        return key in self._objects  # one dict look-up: atomic without the lock

    def close_nowait(self, handle: Handle) -> bool:
        """Close without blocking if nothing can be in flight; False: call :meth:`close`."""
        obj = handle.obj
        with self._lock:
            if obj.refs > 1:
                obj.refs -= 1
                return True
            if obj.reader is not None or obj.promotion is not None:
                return False
            obj.refs -= 1
            self._objects.pop(obj.key, None)
        with obj.lock:
            obj.close_sources()
        return True

    def close(self, handle: Handle) -> None:
        obj = handle.obj
        with self._lock:
            obj.refs -= 1
            if obj.refs > 0:
                return
            self._objects.pop(obj.key, None)
        reader = obj.reader
        cfg = self.config
        budget = cfg.attempts * cfg.timeout + cfg.backoff * 2 ** cfg.attempts
        if reader is not None and not reader.wait_idle(budget, abort_streams=True):
            # Background prefetches may still write into the partial file: closing its fd
            # now could let the number be reused under them.  Leak it instead (rare).
            log.warning("fetches of %s still running at close; leaving its file open", obj.ref.where)
            return
        if obj.promotion is not None:  # let a verification in progress finish and adopt
            with contextlib.suppress(BaseException):
                obj.promotion.result(timeout=budget)
        with obj.lock:
            obj.close_sources()

    def read_nowait(self, handle: Handle, off: int, size: int) -> bytes | memoryview | None:
        """Answer from local state without waiting (on the event loop), or None.

        Serves in-memory small objects, complete cached objects and fully present blocks of
        a partial file; anything that needs the store, a verification or a wait returns None
        and the caller uses :meth:`read` in a worker thread.  Local reads are a page-cache
        copy in the common case, far cheaper than the thread hop they would otherwise cost.
        """
        obj = handle.obj
        if off >= obj.ref.size or size <= 0:
            return b""
        if obj.bad:
            return None
        data, fd, reader = obj.data, obj.fd, obj.reader
        if data is None and fd is None and reader is None and obj.ref.size <= _INLINE_PREPARE_MAX:
            # A small object already in the local cache: opening and checking it is cheaper
            # than the thread hop (a store fetch never happens here).
            if not obj.lock.acquire(blocking=False):
                return None  # never wait on the event loop for another thread's fetch
            try:
                self._prepare_locked(obj, local_only=True)
            finally:
                obj.lock.release()
            data, fd, reader = obj.data, obj.fd, obj.reader
            if data is None and fd is None:
                return None
        if data is not None:
            return data[off:off + size]
        if fd is not None:
            return self._read_fd_nowait(handle, fd, off, size)
        if reader is None or obj.whole_pending or not reader.present(off, size) \
                or not reader.blocks.ready(off, size):
            return None  # fetching or verifying: a worker thread does it
        out = reader.blocks.read(off, min(size, obj.ref.size - off))
        advice = handle.window.advise(off, size)
        if advice is not None:
            reader.prefetch(*advice)
        return out

    def _read_fd_nowait(self, handle: Handle, fd: int, off: int, size: int) -> memoryview | bytes | None:
        """A complete object's bytes if the page cache has them all (RWF_NOWAIT), else None:
        the event loop never waits for the disk; a worker thread reads what is not cached
        yet, several at once (the kernel keeps readahead requests in flight)."""
        self._advise_disk(handle, fd, off, size)
        want = min(size, handle.obj.ref.size - off)
        if not self._nowait_flags:
            return os.pread(fd, size, off)
        buf = self._loop_buf
        if len(buf) < want:
            buf = self._loop_buf = bytearray(max(want, 1 << 20))
        view = memoryview(buf)[:want]
        try:
            got = os.preadv(fd, [view], off, self._nowait_flags)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait_flags = 0  # a filesystem without RWF_NOWAIT: plain reads, as before
            return os.pread(fd, size, off)
        # a partly cached range: never a short reply (the kernel would take it as the end)
        return view if got == want else None

    def _advise_disk(self, handle: Handle, fd: int, off: int, size: int) -> None:
        """A sequential reader of a complete object: ask the disk for the bytes ahead of it
        (POSIX_FADV_WILLNEED over the readahead window, each range once), so a cache read after
        a remount streams from the disk instead of waiting for each 1 MiB request in turn."""
        advice = handle.window.advise(off, size)
        if advice is None:
            return
        if self.config.drops_behind(handle.obj.ref.size):  # one copy in memory
            upto = passed_end(off, self.config.block_size)
            if upto > handle.dropped:
                drop_pages(fd, handle.dropped, upto)
                handle.dropped = upto
        start, length = advice
        end = min(start + length, handle.obj.ref.size)
        start = max(start, handle.advised)
        if end - start < min(length, self.config.block_size * 4):
            return  # most of it asked for already: wait until a worthwhile range is due
        handle.advised = end
        step = self.config.block_size  # the kernel caps one WILLNEED at the device's readahead
        with contextlib.suppress(OSError):
            for pos in range(start, end, step):
                os.posix_fadvise(fd, pos, min(step, end - pos), os.POSIX_FADV_WILLNEED)

    def read(self, handle: Handle, off: int, size: int) -> bytes:
        obj = handle.obj
        with self._lock:
            self.worker_reads += 1
        if off >= obj.ref.size or size <= 0:
            return b""
        mismatches = evicted = 0
        while True:
            self._prepare(obj)
            if obj.bad:
                # Blocks this object already verified against the block map stay servable: a
                # read(2) the kernel split into several requests then never comes back short
                # because another request found the bad block in between.
                known = obj.reader
                if known is None or not known.present(off, size) or not known.blocks.ready(off, size):
                    raise FetchError(f"{obj.ref.where}: the store's blob {obj.ref.md5} failed verification")
                return known.blocks.read(off, min(size, obj.ref.size - off))
            data, fd, reader = obj.data, obj.fd, obj.reader
            if data is not None:
                return data[off:off + size]
            if fd is not None:
                self._advise_disk(handle, fd, off, size)
                return os.pread(fd, size, off)
            assert reader is not None
            try:
                if obj.whole_pending:
                    self._verify_whole(obj, reader)
                    continue  # promoted, or marked checked: serve from the new state
                out = reader.read(off, size)
            except BlockMismatchError as exc:
                mismatches += 1
                if self._block_failed(obj, reader, exc, final=mismatches >= 2):
                    mismatches = 0  # the cache's copy was dropped: the store is a new source
                continue
            except EvictedBlockError:
                evicted += 1
                if evicted > 3:
                    raise FetchError(f"{obj.ref.where}: the stream window is too small for this read") from None
                continue
            except OSError as exc:
                if exc.errno != errno.ENOSPC or obj.source != "partial":
                    raise
                self._cache_full(obj, reader)
                continue
            advice = handle.window.advise(off, size)
            if advice is not None:
                reader.prefetch(*advice)
            return out

    def _verify_whole(self, obj: _Object, reader: BlockReader) -> None:
        """No block map: fetch every block, then check the md5 before a byte is served."""
        reader.ensure(0, obj.ref.size)
        with obj.lock:
            partial = obj.partial
            if partial is None or not obj.whole_pending:
                return  # promoted meanwhile (the promotion checked the md5)
        actual = partial.md5()
        if actual != obj.ref.md5:
            partial.reset()
            # A file:// source that fails may have been rewritten under this very check (a
            # mix of two contents): like a stored blob, it is read once more before EIO.
            raise BlockMismatchError(-1, f"the object hashes to {actual}" if obj.ref.source is None
                                     else f"its bytes hash to {actual}, the record says {obj.ref.md5}")
        partial.mark_all_checked()
        obj.whole_pending = False
        self._schedule_promotion(obj)

    def _block_failed(self, obj: _Object, reader: BlockReader, exc: BlockMismatchError, final: bool) -> bool:
        """Handle a failed block; True when the source changed (the cache's copy was dropped)."""
        ref = obj.ref
        what = "the whole object" if exc.index < 0 else f"block {exc.index}"
        with self._lock:
            self.verify_failures += 1
        if obj.source == "cache":
            log.warning("%s: %s of the cached object %s failed verification: dropping it, reading the store",
                        ref.where, what, ref.md5)
            with obj.lock:
                self.cache.drop(ref.md5)
                if obj.blob is not None:
                    obj.retired.append(obj.blob)  # a concurrent read may still hold it
                obj.blob = obj.reader = None
                obj.skip_cache = True
            return True
        if not final:
            log.warning("%s: %s of blob %s failed verification (%s); fetching it again",
                        ref.where, what, ref.md5, obj.source)
            return False
        if ref.source is not None:
            self._source_changed(ref, str(exc), counted=True)
        if obj.source == "store":
            obj.bad = True
            path = self._blob_path(ref)
            if path is not None and obj.blob_stat is not None:
                self._bad[str(path)] = _stat_key(ref.md5, obj.blob_stat)
        log.error("%s: %s of blob %s failed verification twice (%s); answering EIO",
                  ref.where, what, ref.md5, obj.source)
        raise FetchError(f"{ref.where}: {what} of blob {ref.md5} failed verification") from exc

    def _cache_full(self, obj: _Object, reader: BlockReader) -> None:
        """ENOSPC writing a block: evict once and retry; then stream without caching."""
        ref = obj.ref
        if not obj.evicted:
            obj.evicted = True
            used = self.cache.info().bytes
            freed = self.cache.evict(0, max_bytes=max(0, used - ref.size))
            log.warning("%s: the cache disk is full; evicted %d bytes", ref.where, freed)
            return
        with obj.lock:
            partial = obj.partial
            bm = partial.blockmap if partial is not None else None
            if partial is None or obj.reader is not reader:
                return  # another reader switched already
            if bm is None:
                self._failed(ref, "the cache disk is full and the blob has no block map to stream it verified")
            cfg = self.config
            if not reader.wait_idle(cfg.attempts * cfg.timeout):
                raise FetchError(f"{ref.where}: fetches still running on a full cache disk")
            obj.retired.append(partial)  # a concurrent read may still hold it: close at release
            for leftover in (partial.path, partial.bits_path):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            self.cache.forget_partial(ref.md5)
            obj.partial, obj.source = None, "stream"
            obj.reader = self._stream_reader(ref, bm)
        log.warning("%s: still no room in the cache: streaming it (verified per block, not cached)",
                    ref.where)

    def _stream_reader(self, ref: FileRef, bm: BlockMap) -> BlockReader:
        """Blocks through a small verified in-memory window, never cached (no room for it)."""
        cfg = self.config
        blocks = StreamBlocks(bm, _STREAM_WINDOW // cfg.block_size)
        # readahead reaches at most a third of the window: what it fetches is still there when read
        return BlockReader(ref.size, self._fetcher(ref), blocks, block_size=cfg.block_size,
                           max_request=cfg.max_request, executor=self._executor, max_ahead=_STREAM_WINDOW // 3)

    def _prepare(self, obj: _Object) -> None:
        """Give ``obj`` its content source: bytes, a complete object's fd, or a block reader."""
        with obj.lock:
            self._prepare_locked(obj)

    def _prepare_locked(self, obj: _Object, local_only: bool = False) -> None:
        if obj.data is None and obj.fd is None and obj.reader is None:
            self._resolve_identity(obj)
            ref = obj.ref
            ahead = self._walker.take(ref.md5, wait=not local_only) if ref.size <= self.config.small_object else None
            if ahead is not None:  # fetched and checked ahead of this reader (a directory walk)
                obj.data = ahead
                self._walker.advance(ref)
                return
            if not obj.skip_cache and self._open_complete(obj, local_only):
                self.metrics.cache_hits.inc()
                return
            held = self._small_installs.peek(ref.md5) if ref.source is None and not obj.skip_cache else None
            if held is not None and len(held) == ref.size:  # read lately, its cache install still queued
                obj.data = held
                self.metrics.cache_hits.inc()
                return
            blob = self._blob_path(ref)
            if local_only and (blob is None or ref.size > _INLINE_PREPARE_MAX):
                return  # only local files are read on the event loop
            if blob is not None and self._open_blob(obj, blob):
                self.metrics.cache_misses.inc()  # served by the (local) store's own file
                return
            if local_only:
                return
            self.metrics.cache_misses.inc()  # fetched from the store below
            self._batch_urls(ref)
            if ref.size <= self.config.small_object:
                # One request for the whole object, checked before a byte is served; the
                # reader gets it from memory while the cache write (fsync) happens behind it.
                data = self._fetcher(ref)(0, ref.size)
                actual, expected = hashlib.md5(data, usedforsecurity=False).hexdigest(), self._expected_md5(ref)
                if expected is not None and actual != expected:
                    if ref.source is not None:
                        self._source_changed(ref, f"its bytes hash to {actual}, the record says {expected}")
                    raise FetchError(f"{ref.where}: the store returned wrong bytes for blob {ref.md5}")
                obj.data = data
                self._install_later(actual, data)
                self._fetched_whole(ref, actual)
                self._walker.advance(ref)
                return
            bm = self.blockmap(ref)
            name = ref.md5 if ref.source is None else f"ref-{ref.source.identity}"
            # counted in the cache bound; a reference's partial is not (it is never resumed and
            # is dropped at its last close unless promoted, see ref_source)
            hold = self.cache.begin_partial(name, ref.size) if ref.source is None else None
            if hold is None and bm is not None:
                log.info("%s: no room in the cache beside the objects in use: streaming it", ref.where)
                obj.source, obj.reader = "stream", self._stream_reader(ref, bm)
                return
            obj.partial_hold = hold  # None: no room and no map to stream it verified; cached anyway
            trusted = ref.source is not None and ref.source.trust_blocks  # pinned reads: see ref_source
            obj.partial = self.cache.in_layout(lambda: (PinnedPartialFile if trusted else PartialFile)(
                self.cache.partial_dir, name, ref.size, self.config.block_size, blockmap=bm,
                drop_behind=self.config.drops_behind(ref.size)))
            obj.source, obj.whole_pending = "partial", bm is None and not trusted
            obj.reader = BlockReader(
                ref.size, self._fetcher(ref),
                obj.partial, block_size=self.config.block_size, max_request=self.config.max_request,
                executor=self._executor,
                on_complete=lambda: None if obj.whole_pending else self._schedule_promotion(obj),
                streamer=self._streamer(ref), max_stream=self.config.max_stream,
                stream_idle=self.config.stream_idle, stream_slots=self._stream_slots,
                # a store on this machine streams file reads: a second one gains nothing there
                stream_split=0.0 if isinstance(self.store, LocalBlobs) else self.config.stream_split,
                split_gauge=self._split_gauge)
            if obj.partial.complete() and not obj.whole_pending:  # resumed a fully fetched partial
                self._schedule_promotion(obj)

    def _batch_urls(self, ref: FileRef) -> None:
        """A store that signs download URLs (HttpStore) signs this file's and its next siblings'
        in one request, so a cold directory walk costs no signing round trip per file."""
        if ref.source is not None or not isinstance(self.store, UrlBatching):
            return
        known, batch = self.store.url_known, self.store.prefetch_urls
        if known(ref.entity, ref.md5):
            return
        key = ref.directory[:2] if ref.directory is not None else (ref.md5, 0)
        with self._lock:
            running = self._url_batches.get(key)
            mine = running is None
            if running is None:
                running = self._url_batches[key] = threading.Event()
        if not mine:  # another reader is signing this directory: use its answer
            running.wait(self.config.timeout)
            if known(ref.entity, ref.md5):
                return
        try:
            wanted = [ref.md5] + [m for _, m, _ in self._siblings(ref) if m != ref.md5 and not known(ref.entity, m)]
            retrying(lambda: batch(ref.entity, wanted[:SIBLING_BATCH]), None, self.config, self._io,
                     f"download URLs for {ref.path}")
        except FetchError:
            raise  # the server is unreachable: this read fails now, within one bound, not two
        except ArtifactFSError as exc:  # refused (a permission, say): the file's own read decides
            log.info("could not sign URLs for the siblings of %s: %s", ref.path, exc)
        finally:
            if mine:
                with self._lock:
                    self._url_batches.pop(key, None)
                running.set()

    def _streamer(self, ref: FileRef) -> Streamer | None:
        """Streamed readahead for this blob when the store can stream ranged reads (a
        reference's source is read by pinned ranged requests only)."""
        if ref.source is not None or self.config.max_stream <= self.config.max_request:
            return None
        return lambda start, length, deliver: self.stream_range(ref.entity, ref.md5, start, length, deliver)

    def _install_later(self, md5: str, data: bytes) -> None:
        """Write a verified small object into the shared cache off the read path (batched and
        bounded, see mountfs/small_installs.py)."""
        self._small_installs.put(md5, data)

    def _note_added(self, size: int) -> None:
        """Evict now and then (a cache scan per object would be quadratic)."""
        with self._lock:
            self._added += size
            due = self._added >= max(self.cache.max_bytes // 32, 1)
            if due:
                self._added = 0
        if due:
            self.cache.evict()

    def _open_complete(self, obj: _Object, local_only: bool = False) -> bool:
        """Serve a complete cached object: a small one from memory, hashed as it is read (as
        cheap as an open + xattr check); a large one by fd when this very file is trusted
        (see :meth:`trusted`), else through its block map, else md5-checked whole first.
        A corrupt object is dropped: the caller reads the store.
        """
        ref = obj.ref
        path = self.cache.lookup(ref.md5, ref.size)
        if path is None:
            return False
        if ref.size <= self.config.small_object:
            try:
                with open(path, "rb", buffering=0) as f:
                    data = f.read()
            except FileNotFoundError:
                return False
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != ref.md5:
                log.warning("%s: its cache object %s is corrupt: dropping it, reading the store", ref.where, ref.md5)
                self.cache.drop(ref.md5)
                return False
            obj.data = data
            return True
        if local_only:
            return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        if self.trusted(fd, ref.md5, os.fstat(fd)):
            obj.fd = fd
            return True
        bm = self.blockmap(ref)
        if bm is not None:  # changed since checked, or never marked: check blocks as they are read
            obj.blob, obj.blob_stat = BlobBlocks(fd, ref.size, self.config.block_size, bm, confirmed=True), os.fstat(fd)
            obj.source = "cache"
            # every block checked: marked then, so the next daemon serves it by fd at once
            obj.blob.on_checked = lambda: self._schedule_promotion(obj)
            obj.reader = BlockReader(ref.size, lambda start, length: None, obj.blob,
                                     block_size=self.config.block_size, max_request=self.config.max_request,
                                     executor=self._executor)
            return True
        actual = _md5_fd(fd, ref.size)
        if actual != ref.md5:
            os.close(fd)
            log.warning("%s: its cache object %s hashes to %s: dropping it, reading the store", ref.where, ref.md5, actual)
            self.cache.drop(ref.md5)
            return False
        self._mark_verified(fd, ref.md5)
        obj.fd = fd
        return True

    def _blob_path(self, ref: FileRef) -> Path | None:
        """The store's own file for this blob, when the store is local and direct reads are on."""
        if not self.config.local_blobs or not isinstance(self.store, LocalBlobs) or ref.source is not None:
            return None
        try:
            return Path(self.store.blob_path(ref.entity, ref.md5))
        except Exception:  # noqa: BLE001 - an invalid key etc.: use the ordinary path
            return None

    def _open_blob(self, obj: _Object, path: Path) -> bool:
        """Serve ``obj`` from the store's blob file in place (see the module docstring).

        False when the blob is missing here: the ordinary ranged path then decides (and
        retries / answers EIO) as for any store.  A blob of another size than the entry, or
        one that failed verification before and has not changed since, answers EIO.
        """
        ref = obj.ref
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        st = os.fstat(fd)
        if st.st_size != ref.size:
            os.close(fd)
            self._failed(ref, f"the manifest says {ref.size} bytes, the store's blob has {st.st_size}")
        if self._bad.get(str(path)) == _stat_key(ref.md5, st):
            os.close(fd)
            raise FetchError(f"{ref.where}: the store's blob {ref.md5} failed verification")
        with self._lock:
            self.store_requests += 1
        if ref.size <= self.config.small_object:
            try:
                data = os.pread(fd, ref.size, 0) if ref.size else b""
            finally:
                os.close(fd)
            if len(data) != ref.size or hashlib.md5(data, usedforsecurity=False).hexdigest() != ref.md5:
                self._bad[str(path)] = _stat_key(ref.md5, st)
                self._failed(ref, "the store's blob does not match its md5")
            obj.data = data  # not copied into the cache: the local store is as fast to re-read
            return True      # (pread + md5), and a copy per file halved cold small-file reads
        if self.trusted(fd, ref.md5, st):  # hashed before (by us, another mount or the store)
            obj.fd = fd
            self._copy_in_later(ref.md5, path)
            return True
        try:
            bm = self.blockmap(ref)
        except BaseException:
            os.close(fd)
            raise
        if bm is None:  # no map (an older blob): hash it whole before its first byte
            actual = _md5_fd(fd, ref.size)
            if actual != ref.md5:
                os.close(fd)
                self._bad[str(path)] = _stat_key(ref.md5, st)
                self._failed(ref, f"the store's blob hashes to {actual}")
            self._mark_verified(fd, ref.md5)
            obj.fd = fd
            self._copy_in_later(ref.md5, path)
            return True
        obj.blob, obj.blob_stat = BlobBlocks(fd, ref.size, self.config.block_size, bm), st
        obj.source = "store"

        def confirm(start: int, length: int) -> None:
            """A block 'fetch' from a local store: the store still holds this very file."""
            def call() -> None:
                with self._lock:
                    self.store_requests += 1
                if not _same_file(os.stat(path), st):
                    raise FileNotFoundError(f"blob {ref.md5} is no longer in the store")
            retrying(call, None, self.config, self._io, f"blob {ref.md5}[{start}:+{length}]")

        obj.reader = BlockReader(ref.size, confirm, obj.blob, block_size=self.config.block_size,
                                 max_request=self.config.max_request, executor=self._executor,
                                 on_complete=lambda: self._schedule_promotion(obj))
        return True

    def _copy_in_later(self, md5: str, path: Path) -> None:
        if self.cache.lookup(md5) is None:  # on the installer pool: unmount lets it finish
            self._installer.submit(self._copy_in, md5, path)

    def _schedule_promotion(self, obj: _Object) -> None:
        obj.promotion = self._executor.submit(self._promote, obj)

    def _promote(self, obj: _Object) -> None:
        """All blocks present: verify the md5 and move the file into the complete cache.

        Hashing runs without the object lock (complete blocks are never rewritten), so
        readers are not stalled while a large object is verified.
        """
        if obj.blob is not None:
            self._promote_blob(obj)
            return
        with obj.lock:
            partial = obj.partial
            if partial is None or obj.promoting or obj.closed or not partial.complete():
                return
            obj.promoting = True
        try:
            partial.settle()
            partial.flush()
            # a store blob checked block by block against its map (or md5-checked whole
            # already) is not hashed again; anything else is hashed whole here
            actual = obj.ref.md5 if obj.ref.source is None and partial.verified() else partial.md5()
            with self._lock:
                self.md5_bytes += partial.md5_bytes
            os.fsync(partial.fd)  # the slow part of adopt(), done before taking the object lock
            with obj.lock:
                if obj.closed:
                    return
                expected = self._expected_md5(obj.ref)
                if expected is not None and actual != expected:
                    log.error("content fetched for %s (%s) hashes to %s: discarding it",
                              obj.ref.where, expected, actual)
                    partial.reset()
                    return
                dest = self.cache.adopt(actual, partial.path)  # a reference's too: under its md5
                partial.forget_bitmap()
                self._fetched_whole(obj.ref, actual)
                with contextlib.suppress(OSError):
                    self._trust(_stat_key(actual, os.stat(dest)))
                # The fd now names the complete object (a rename keeps the inode); readers
                # still holding the block reader keep using the same, still open, fd.
                obj.fd = partial.fd
                obj.partial = obj.reader = None
        except OSError as exc:
            log.warning("could not promote %s (%s) into the cache: %s", obj.ref.where, obj.ref.md5, exc)
        finally:
            obj.promoting = False

    def _promote_blob(self, obj: _Object) -> None:
        """Every block of a local blob confirmed: hash it once, then mark and link it.  An
        unmarked cache object checked block by block is marked, never hashed whole here (a
        block that fails its check is refetched by the read that finds it)."""
        with obj.lock:
            blob, st = obj.blob, obj.blob_stat
            if blob is None or st is None or obj.promoting or obj.closed or not blob.complete():
                return
            obj.promoting = True
        try:
            if obj.source == "cache":
                if blob.verified() and _same_file(os.fstat(blob.fd), st):
                    os.fdatasync(blob.fd)  # a staged object may be unsynced: not under the lock
                    with obj.lock:
                        if not obj.closed:
                            self._mark_verified(blob.fd, obj.ref.md5)
                            obj.fd = blob.fd  # the same open file, now verified
                            obj.blob = obj.reader = None
                return
            if blob.verified() and _same_file(os.fstat(blob.fd), st):
                actual = obj.ref.md5  # every block checked as it was read, the file unchanged since
            else:
                actual = blob.md5()
                with self._lock:
                    self.md5_bytes += blob.size
            with obj.lock:
                if obj.closed:
                    return
                path = self._blob_path(obj.ref)
                if actual != obj.ref.md5:
                    bs = blob.block_size
                    bad = [i for i in range(blob.nblocks) if not blob.blockmap.check(i, os.pread(blob.fd, bs, i * bs))]
                    log.error("%s: the store's blob %s hashes to %s (%s failed verification): refusing to serve it",
                              obj.ref.where, obj.ref.md5, actual,
                              ", ".join(f"block {i}" for i in bad[:8]) or "no single block")
                    obj.bad = True
                    if path is not None:
                        self._bad[str(path)] = _stat_key(obj.ref.md5, st)
                    return
                self._mark_verified(blob.fd, obj.ref.md5)
                if path is not None:
                    self._copy_in_later(obj.ref.md5, path)
                obj.fd = blob.fd  # the same open file, now verified
                obj.blob = obj.reader = None
        except OSError as exc:
            log.warning("could not verify the store's blob %s of %s: %s", obj.ref.md5, obj.ref.where, exc)
        finally:
            obj.promoting = False

    def _copy_in(self, md5: str, path: Path) -> None:
        """A verified store blob: the cache gets its own copy (re-verified), never the same inode."""
        try:
            dest = self.cache.add_file(md5, path, keep_mtime=True)
            with open(dest, "rb") as f:  # the copy's pages would push the mount's out of memory
                drop_pages(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation here
            log.warning("could not cache %s: %s", md5, exc)

    def shutdown(self) -> None:
        self._walker.shutdown()  # before the installs: a fetch ahead ends with one
        self._small_installs.shutdown()  # small installs are quick: let them land
        self._installer.shutdown(wait=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stream_slots.shutdown()
        self._io.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            objects = list(self._objects.values())
            self._objects.clear()
        for obj in objects:  # a paused stream would otherwise wait out its idle bound
            if obj.reader is not None:
                obj.reader.stop_streams(abort=True)
        for obj in objects:  # fds are left to process exit: fetches may still be running
            if obj.partial is not None:
                with contextlib.suppress(OSError):
                    obj.partial.flush()
