"""The daemon's content layer: pinned file content from the cache, the store, or a local blob.

Where the bytes of an open file come from, in order:

1. the in-memory copy of a small object (verified before its first byte is served);
2. a complete object in the shared cache, trusted by its *verified marker* (an xattr keyed by
   md5, size, mtime and inode, see :mod:`client.cache`) or else md5-checked once and marked,
   so a remount does not re-hash the cache;
3. an embedded store's blob file (``Store.blob_path``): read in place, never copied.
   * small objects are read whole and md5-checked before a byte is served, then entered into
     the cache as a hard link (no write, no fsync: the blob is already durable);
   * large objects are served from the pinned blob fd through :class:`BlobBlocks`: a block
     "fetch" only confirms that the store still holds that very file (one stat, counted as a
     store request), so a store that goes away still gives EIO for blocks not yet confirmed.
     Once every block is confirmed the blob is hashed once in the background; a match links
     it into the cache and marks it verified, a mismatch makes every later read fail (EIO).
4. any other store: ranged requests into a :class:`~mountfs.fetch.PartialFile`, verified and
   promoted into the cache when complete.

"Never serve wrong bytes", honestly stated: small objects are always hashed before serving.
A large object's blocks are served before the whole object is hashed (a 4 KiB read of a
10 GiB file cannot wait for a full hash); they are the store's bytes, which the store
verified at upload, and the object enters the cache only after its md5 matched.  That was
already the rule for ranged fetches; the local blob path keeps it and drops the copy.

Concurrency rule: every method here runs in worker threads, except the ``*_nowait`` ones,
which run on the trio loop and never block.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from client.cache import Cache, has_verified_marker, set_verified_marker
from client.store.base import Store

from .fetch import (BlockReader, FetchConfig, FetchError, MiB, PartialFile, ReadaheadWindow, retrying)
from .namespace import FileRef

log = logging.getLogger(__name__)

#: cached objects up to this size are opened and md5-checked on the event loop (~0.3 ms)
_INLINE_PREPARE_MAX = 256 << 10
_EMPTY_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
#: verified small objects waiting for their (fsynced) cache install may hold this much memory
_PENDING_INSTALL_BYTES = 64 * MiB


class BlobBlocks:
    """An embedded store's blob file as block storage: zero copy, confirmed block by block.

    ``write`` records that a block was confirmed (the fetcher checked the store still has the
    file); ``read`` preads the pinned fd.  Confirmation state lives in memory only: it is
    cheap to redo after a restart.
    """

    def __init__(self, fd: int, size: int, block_size: int) -> None:
        self.fd, self.size, self.block_size = fd, size, block_size
        self.nblocks = -(-size // block_size)
        self._have = bytearray(self.nblocks)
        self._count = 0
        self._lock = threading.Lock()

    def has(self, i: int) -> bool:
        return bool(self._have[i])

    def write(self, i: int, data: bytes | memoryview) -> None:
        with self._lock:
            if not self._have[i]:
                self._have[i] = 1
                self._count += 1

    def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    def settle(self) -> None:
        return None  # nothing to persist; the one hash pass runs at promotion

    def complete(self) -> bool:
        return self._count == self.nblocks

    def md5(self) -> str:
        h = hashlib.md5(usedforsecurity=False)
        for off in range(0, self.size, 4 * MiB):
            h.update(os.pread(self.fd, min(4 * MiB, self.size - off), off))
        return h.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


class _Object:
    """One md5's content while at least one file handle has it open."""

    def __init__(self, ref: FileRef) -> None:
        self.ref = ref
        self.refs = 0
        self.fd: int | None = None  #: complete, verified object
        self.data: bytes | None = None  #: a small object's verified bytes (installed in the background)
        self.partial: PartialFile | None = None
        self.blob: BlobBlocks | None = None  #: a local store blob served in place
        self.blob_stat: os.stat_result | None = None
        self.bad = False  #: the blob hashed to something else: every read fails
        self.reader: BlockReader | None = None
        self.lock = threading.Lock()
        self.promoting = False
        self.closed = False
        self.promotion: Future[None] | None = None


@dataclass
class Handle:
    """Per open file: its object and its own readahead state."""

    obj: _Object
    window: ReadaheadWindow


class ContentReader:
    """Serves reads of pinned file content from the cache, fetching lazily from the store."""

    def __init__(self, store: Store, cache: Cache, config: FetchConfig | None = None) -> None:
        self.store, self.cache = store, cache
        self.config = config or FetchConfig()
        self._executor = ThreadPoolExecutor(self.config.parallel, thread_name_prefix="artifactfs-fetch")
        self._io = ThreadPoolExecutor(max(4 * self.config.parallel, 16), thread_name_prefix="artifactfs-io")
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self._verified: LRUCache[str, bool] = LRUCache(maxsize=100_000)
        self.store_requests = 0  #: ranged store requests issued (including retries)
        self._installer = ThreadPoolExecutor(4, thread_name_prefix="artifactfs-install")
        self._pending_cv = threading.Condition()
        self._pending_bytes = 0
        self._added = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"store_requests": self.store_requests, "open_objects": len(self._objects)}

    # -- store access with retries ------------------------------------------------------
    def fetch_range(self, entity: str, md5: str, start: int, length: int) -> bytes:
        def call() -> bytes:
            with self._lock:
                self.store_requests += 1
            return self.store.read_blob(entity, md5, start, length)

        return retrying(call, length, self.config, self._io, f"blob {md5}[{start}:+{length}]")

    def manifest_path(self, entity: str, md5: str) -> Path:
        """The complete, verified manifest blob in the cache (IndexStore's source)."""
        hit = self.cache.lookup(md5)
        if hit is not None:
            return hit
        tmp = self.cache.partial_dir / f"{md5}.manifest.{os.getpid()}.{threading.get_ident()}"

        def call() -> bytes:
            self.store.download_blob(entity, md5, tmp)
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
        with self._lock:
            obj = self._objects.get(ref.md5)
            if obj is None:
                obj = self._objects[ref.md5] = _Object(ref)
            obj.refs += 1
        cfg = self.config
        return Handle(obj, ReadaheadWindow(cfg.block_size, cfg.readahead_max, trigger=cfg.block_size,
                                           slack=4 * MiB))

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
            self._objects.pop(obj.ref.md5, None)
        with obj.lock:
            obj.closed = True
            if obj.fd is not None:
                os.close(obj.fd)
                obj.fd = None
            obj.data = None
        return True

    def close(self, handle: Handle) -> None:
        obj = handle.obj
        with self._lock:
            obj.refs -= 1
            if obj.refs > 0:
                return
            self._objects.pop(obj.ref.md5, None)
        reader = obj.reader
        cfg = self.config
        budget = cfg.attempts * cfg.timeout + cfg.backoff * 2 ** cfg.attempts
        if reader is not None and not reader.wait_idle(budget):
            # Background prefetches may still write into the partial file: closing its fd
            # now could let the number be reused under them.  Leak it instead (rare).
            log.warning("fetches of %s still running at close; leaving its file open", obj.ref.md5)
            return
        if obj.promotion is not None:  # let a verification in progress finish and adopt
            with contextlib.suppress(BaseException):
                obj.promotion.result(timeout=budget)
        with obj.lock:
            obj.closed = True
            if obj.fd is not None:
                os.close(obj.fd)
                obj.fd = None
            elif obj.partial is not None:
                obj.partial.close()
            elif obj.blob is not None:
                obj.blob.close()
            obj.partial = obj.reader = obj.blob = None
            obj.data = None

    def read_nowait(self, handle: Handle, off: int, size: int) -> bytes | None:
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
            return os.pread(fd, size, off)
        if reader is None or not reader.present(off, size):
            return None
        out = reader.blocks.read(off, min(size, obj.ref.size - off))
        advice = handle.window.advise(off, size)
        if advice is not None:
            reader.prefetch(*advice)
        return out

    def read(self, handle: Handle, off: int, size: int) -> bytes:
        obj = handle.obj
        if off >= obj.ref.size or size <= 0:
            return b""
        self._prepare(obj)
        if obj.bad:
            raise FetchError(f"{obj.ref.path}: the store's blob {obj.ref.md5} does not match its md5")
        data, fd, reader = obj.data, obj.fd, obj.reader
        if data is not None:
            return data[off:off + size]
        if fd is not None:
            return os.pread(fd, size, off)
        assert reader is not None
        out = reader.read(off, size)
        advice = handle.window.advise(off, size)
        if advice is not None:
            reader.prefetch(*advice)
        return out

    def _prepare(self, obj: _Object) -> None:
        """Give ``obj`` its content source: bytes, a complete object's fd, or a block reader."""
        with obj.lock:
            self._prepare_locked(obj)

    def _prepare_locked(self, obj: _Object, local_only: bool = False) -> None:
        if obj.data is None and obj.fd is None and obj.reader is None:
            ref = obj.ref
            if self._open_complete(obj):
                return
            blob = self._blob_path(ref)
            if local_only and (blob is None or ref.size > _INLINE_PREPARE_MAX):
                return  # only local files are read on the event loop
            if blob is not None and self._open_blob(obj, blob):
                return
            if local_only:
                return
            if ref.size <= self.config.small_object:
                # One request for the whole object, checked before a byte is served; the
                # reader gets it from memory while the cache write (fsync) happens behind it.
                data = self.fetch_range(ref.entity, ref.md5, 0, ref.size)
                if hashlib.md5(data, usedforsecurity=False).hexdigest() != ref.md5:
                    raise FetchError(f"the store returned wrong bytes for {ref.md5}")
                obj.data = data
                self._install_later(ref.md5, data)
                return
            if not (self.cache.partial_dir / f"{ref.md5}.part").exists():
                self.cache.evict(ref.size)  # make room once, when a new large object starts
            obj.partial = PartialFile(self.cache.partial_dir, ref.md5, ref.size, self.config.block_size)
            obj.reader = BlockReader(
                ref.size, lambda start, length: self.fetch_range(ref.entity, ref.md5, start, length),
                obj.partial, block_size=self.config.block_size, max_request=self.config.max_request,
                executor=self._executor, on_complete=lambda: self._schedule_promotion(obj))
            if obj.partial.complete():  # resumed a fully fetched partial from a crash
                self._schedule_promotion(obj)

    def _install_later(self, md5: str, data: bytes) -> None:
        """Write a verified small object into the shared cache off the read path (bounded)."""
        with self._pending_cv:  # back-pressure: bounded bytes waiting for their install
            while self._pending_bytes and self._pending_bytes + len(data) > _PENDING_INSTALL_BYTES:
                self._pending_cv.wait()
            self._pending_bytes += len(data)

        def install() -> None:
            try:
                if self.cache.lookup(md5, len(data)) is None:
                    with self.cache.writer(md5) as out:
                        out.write(data)
                    self._verified[md5] = True
                    self._note_added(len(data))
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation here
                log.warning("could not cache %s: %s", md5, exc)
            finally:
                with self._pending_cv:
                    self._pending_bytes -= len(data)
                    self._pending_cv.notify_all()

        self._installer.submit(install)

    def _note_added(self, size: int) -> None:
        """Evict now and then (a cache scan per object would be quadratic)."""
        with self._lock:
            self._added += size
            due = self._added >= max(self.cache.max_bytes // 32, 1)
            if due:
                self._added = 0
        if due:
            self.cache.evict()

    def _open_complete(self, obj: _Object) -> bool:
        """Serve a complete cached object: a small one from memory, hashed as it is read (as
        cheap as an open + xattr check); a large one by fd, trusted by its verified marker or
        else hashed once (and marked).  A corrupt object is dropped: the caller fetches again.
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
                log.warning("cache object %s is corrupt: dropping it", ref.md5)
                self.cache.drop(ref.md5)
                return False
            obj.data = data
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        if ref.md5 in self._verified or has_verified_marker(fd, ref.md5):
            self._verified[ref.md5] = True
            obj.fd = fd
            return True
        os.close(fd)
        if not self.cache.verify(ref.md5):  # corrupt: dropped by the cache; fetch again
            return False
        self._verified[ref.md5] = True
        try:
            obj.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        return True

    def _blob_path(self, ref: FileRef) -> Path | None:
        """The store's own file for this blob, when the store is local and direct reads are on."""
        blob_path = getattr(self.store, "blob_path", None)
        if not self.config.local_blobs or blob_path is None:
            return None
        try:
            return Path(blob_path(ref.entity, ref.md5))
        except Exception:  # noqa: BLE001 - an invalid key etc.: use the ordinary path
            return None

    def _open_blob(self, obj: _Object, path: Path) -> bool:
        """Serve ``obj`` from the store's blob file in place (see the module docstring).

        False when the blob is not usable here (missing, wrong size): the ordinary ranged
        path then decides (and retries / answers EIO) as for any store.
        """
        ref = obj.ref
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        st = os.fstat(fd)
        if st.st_size != ref.size:
            os.close(fd)
            return False
        with self._lock:
            self.store_requests += 1
        if ref.size <= self.config.small_object:
            try:
                data = os.pread(fd, ref.size, 0) if ref.size else b""
            finally:
                os.close(fd)
            if len(data) != ref.size or hashlib.md5(data, usedforsecurity=False).hexdigest() != ref.md5:
                raise FetchError(f"the store's blob for {ref.md5} does not match its md5")
            obj.data = data
            if self.cache.link(ref.md5, path, expect=st) is None:
                self._install_later(ref.md5, data)  # another filesystem: copy it in
            return True
        if has_verified_marker(fd, ref.md5, st):  # hashed before (by us or another mount)
            obj.fd = fd
            if self.cache.link(ref.md5, path, expect=st) is None:
                log.debug("blob %s not linked into the cache (other filesystem)", ref.md5)
            return True
        obj.blob, obj.blob_stat = BlobBlocks(fd, ref.size, self.config.block_size), st

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
            actual = partial.md5()
            os.fsync(partial.fd)  # the slow part of adopt(), done before taking the object lock
            with obj.lock:
                if obj.closed:
                    return
                if actual != obj.ref.md5:
                    log.error("content fetched for %s (%s) hashes to %s: discarding it",
                              obj.ref.path, obj.ref.md5, actual)
                    partial.reset()
                    return
                self.cache.adopt(obj.ref.md5, partial.path)
                partial.forget_bitmap()
                self._verified[obj.ref.md5] = True
                # The fd now names the complete object (a rename keeps the inode); readers
                # still holding the block reader keep using the same, still open, fd.
                obj.fd = partial.fd
                obj.partial = obj.reader = None
        except OSError as exc:
            log.warning("could not promote %s into the cache: %s", obj.ref.md5, exc)
        finally:
            obj.promoting = False

    def _promote_blob(self, obj: _Object) -> None:
        """Every block of a local blob confirmed: hash it once, then mark and link it."""
        with obj.lock:
            blob, st = obj.blob, obj.blob_stat
            if blob is None or st is None or obj.promoting or obj.closed or not blob.complete():
                return
            obj.promoting = True
        try:
            actual = blob.md5()
            with obj.lock:
                if obj.closed:
                    return
                if actual != obj.ref.md5:
                    log.error("the store's blob for %s (%s) hashes to %s: refusing to serve it",
                              obj.ref.path, obj.ref.md5, actual)
                    obj.bad = True
                    return
                set_verified_marker(blob.fd, obj.ref.md5)
                self._verified[obj.ref.md5] = True
                path = self._blob_path(obj.ref)
                if path is not None and self.cache.link(obj.ref.md5, path, expect=st) is None:
                    self._executor.submit(self._copy_in, obj.ref.md5, path)
                obj.fd = blob.fd  # the same open file, now verified
                obj.blob = obj.reader = None
        except OSError as exc:
            log.warning("could not verify the store's blob %s: %s", obj.ref.md5, exc)
        finally:
            obj.promoting = False

    def _copy_in(self, md5: str, path: Path) -> None:
        """A blob on another filesystem than the cache: copy (and re-verify) it in."""
        try:
            self.cache.add_file(md5, path)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation here
            log.warning("could not cache %s: %s", md5, exc)

    def shutdown(self) -> None:
        self._installer.shutdown(wait=True)  # small installs are quick: let them land
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            objects = list(self._objects.values())
            self._objects.clear()
        for obj in objects:  # fds are left to process exit: fetches may still be running
            if obj.partial is not None:
                with contextlib.suppress(OSError):
                    obj.partial.flush()
