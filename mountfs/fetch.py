"""Lazy, block-aligned, parallel reads of blob content into the shared cache.

Layers, bottom up:

* a *fetcher* ``fetcher(start, length) -> bytes`` — one ranged store request.  The daemon's
  fetcher wraps ``Store.read_blob`` with bounded retries, backoff and a timeout
  (:func:`retrying`); tests inject a counting one.
* :class:`PartialFile` — a sparse file under ``Cache.partial_dir`` plus a persisted block
  bitmap, so a crash or remount resumes where it stopped.  The bitmap is written only after
  the data it describes is fdatasync'ed: a block the bitmap calls present is on disk.
* :class:`BlockReader` — the read strategy: block-aligned, coalesced into ranged requests,
  several requests in parallel, one in-flight future per block so concurrent readers of a
  block wait for one fetch.  It counts requests and bytes so tests assert on counts.
* :class:`ReadaheadWindow` — per open file: a sequential reader gets a window that doubles up
  to a maximum; a random reader gets none (a 4 KiB read costs one ranged request).
* :class:`ContentReader` — glue over Store + Cache: complete cached objects are read directly
  (after one md5 check per daemon lifetime), small objects are fetched whole through
  ``Cache.fetch``, large ones through a PartialFile that is md5-verified and promoted into the
  complete cache with ``Cache.adopt`` once every block is present.

Concurrency rule: every method here runs in worker threads, never on the trio loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from client.cache import Cache
from client.errors import (ArtifactFSError, AuthenticationError, InvalidNameError, PermissionDeniedError,
                           StoreUnavailableError)
from client.store.base import Store

from .namespace import FileRef

log = logging.getLogger(__name__)

Fetcher = Callable[[int, int], bytes]
MiB = 1 << 20
#: cached objects up to this size are opened and md5-checked on the event loop (~0.3 ms)
_INLINE_PREPARE_MAX = 256 << 10
_EMPTY_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
#: verified small objects waiting for their (fsynced) cache install may hold this much memory
_PENDING_INSTALL_BYTES = 64 * MiB


class FetchError(StoreUnavailableError):
    """Content could not be fetched within the retry budget (the mount answers EIO)."""


class ShortReadError(ArtifactFSError):
    """The store returned fewer (or more) bytes than asked: never serve them."""


@dataclass(frozen=True)
class FetchConfig:
    block_size: int = 1 * MiB
    max_request: int = 8 * MiB  #: largest single ranged request
    readahead_max: int = 32 * MiB
    parallel: int = 8  #: concurrent ranged requests (all files together)
    small_object: int = 2 * MiB  #: objects up to this size are fetched whole in one request
    attempts: int = 4
    backoff: float = 0.1  #: first retry delay, doubled per attempt
    timeout: float = 30.0  #: per request
    #: enforce ``timeout`` by running each request in a watchdog thread pool; needed for a store
    #: without its own timeouts, a wasted thread hop (~0.5 ms) for one that has them
    watchdog: bool = True


# -- retries -----------------------------------------------------------------------------

def is_temp_failure(exc: BaseException) -> bool:
    """Whether a failed store request is worth retrying (the one place that decides)."""
    if isinstance(exc, (InvalidNameError, AuthenticationError, PermissionDeniedError)):
        return False
    return isinstance(exc, (ArtifactFSError, OSError, TimeoutError, FutureTimeout, ConnectionError))


def retrying(call: Callable[[], bytes], expected: int | None, cfg: FetchConfig, io_pool: ThreadPoolExecutor,
             what: str) -> bytes:
    """Run ``call`` with a timeout per attempt and bounded retries; FetchError at the end.

    The timeout is enforced by waiting on a future: a request that truly hangs keeps one
    I/O thread busy, but the reader gets its EIO on time.
    """
    delay = cfg.backoff
    for attempt in range(1, cfg.attempts + 1):
        try:
            data = io_pool.submit(call).result(timeout=cfg.timeout) if cfg.watchdog else call()
            if expected is not None and len(data) != expected:
                raise ShortReadError(f"{what}: got {len(data)} bytes, expected {expected}")
            return data
        except BaseException as exc:  # noqa: BLE001 - classified right below
            if not is_temp_failure(exc):
                raise
            if attempt == cfg.attempts:
                raise FetchError(f"{what}: failed after {attempt} attempts: {exc!r}") from exc
            log.info("%s: attempt %d failed (%r); retrying in %.2fs", what, attempt, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# -- block storage -----------------------------------------------------------------------

class MemoryBlocks:
    """Blocks held in memory: the storage for pure strategy tests."""

    def __init__(self, size: int, block_size: int) -> None:
        self.size, self.block_size = size, block_size
        self.nblocks = -(-size // block_size)
        self._buf = bytearray(size)
        self._have = [False] * self.nblocks

    def has(self, i: int) -> bool:
        return self._have[i]

    def write(self, i: int, data: bytes | memoryview) -> None:
        self._buf[i * self.block_size:i * self.block_size + len(data)] = data
        self._have[i] = True

    def read(self, off: int, size: int) -> bytes:
        return bytes(self._buf[off:off + size])

    def settle(self) -> None:
        return None

    def complete(self) -> bool:
        return all(self._have)


class PartialFile:
    """A sparse file + block bitmap under the cache's partial dir (resumable, crash-safe).

    ``<md5>.part`` holds the bytes at their offsets; ``<md5>.bits`` holds a header
    (size, block size) and one bit per block.  Bits reach disk only after an fdatasync of
    the data, so after a crash the bitmap may under-report, never over-report.
    """

    _HEADER = struct.Struct("<QI")

    def __init__(self, directory: Path, md5: str, size: int, block_size: int, flush_every: int = 32) -> None:
        self.path = directory / f"{md5}.part"
        self.bits_path = directory / f"{md5}.bits"
        self.size, self.block_size = size, block_size
        self.nblocks = -(-size // block_size)
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self._bits = bytearray(-(-self.nblocks // 8))
        self._count = 0
        self._dirty = 0
        # Running md5 over the contiguous prefix of present blocks: a sequential fill is
        # verified as it arrives, so completion costs no second pass over the file.
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._hashed = 0  #: blocks folded into _md5
        self._hash_lock = threading.Lock()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        else:
            self._load_bits()

    def _load_bits(self) -> None:
        try:
            raw = self.bits_path.read_bytes()
        except FileNotFoundError:
            return
        if len(raw) != self._HEADER.size + len(self._bits) or self._HEADER.unpack_from(raw) != (self.size, self.block_size):
            return  # from another layout: start over (the data is rewritten as fetched)
        self._bits[:] = raw[self._HEADER.size:]
        self._count = sum(bin(b).count("1") for b in self._bits)

    def has(self, i: int) -> bool:
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def write(self, i: int, data: bytes | memoryview) -> None:
        os.pwrite(self.fd, data, i * self.block_size)
        with self._lock:
            if not self.has(i):
                self._bits[i >> 3] |= 1 << (i & 7)
                self._count += 1
            self._dirty += 1

    def settle(self) -> None:
        """Background bookkeeping after writes: extend the running md5, persist the bitmap.

        Called by the block reader *after* it has woken the readers of the new blocks, so
        neither hashing nor fdatasync sits between a fetch and the read waiting for it.
        """
        self._advance_hash()
        with self._lock:
            due = self._dirty >= self._flush_every or (self._dirty and self._count == self.nblocks)
        if due:
            self.flush()

    def _advance_hash(self) -> None:
        """Fold newly contiguous blocks into the running md5 (one thread at a time, no waiting)."""
        if not self._hash_lock.acquire(blocking=False):
            return  # another thread is hashing and will pick these blocks up, or md5() will
        try:
            while self._hashed < self.nblocks and self.has(self._hashed):
                self._md5.update(os.pread(self.fd, self.block_size, self._hashed * self.block_size))
                with self._lock:
                    self._hashed += 1
        finally:
            self._hash_lock.release()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty = 0
            bits = bytes(self._bits)
        os.fdatasync(self.fd)
        tmp = self.bits_path.with_suffix(".bits.tmp")
        tmp.write_bytes(self._HEADER.pack(self.size, self.block_size) + bits)
        os.replace(tmp, self.bits_path)

    def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    def complete(self) -> bool:
        return self._count == self.nblocks

    def md5(self) -> str:
        """md5 of the whole (complete) file, reusing the running hash of the prefix."""
        with self._hash_lock:
            h, start = self._md5.copy(), self._hashed * self.block_size
        for off in range(start, self.size, 4 * MiB):
            h.update(os.pread(self.fd, min(4 * MiB, self.size - off), off))
        return h.hexdigest()

    def reset(self) -> None:
        """Forget every block (after a failed verification)."""
        with self._lock:
            self._bits[:] = bytes(len(self._bits))
            self._count = 0
            self._dirty = 1
        with self._hash_lock:
            self._md5, self._hashed = hashlib.md5(usedforsecurity=False), 0
        self.flush()

    def forget_bitmap(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.bits_path.unlink()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        os.close(self.fd)


# -- strategies --------------------------------------------------------------------------

class ReadaheadWindow:
    """Per open file: how far ahead to prefetch after a read, if at all.

    Readahead starts only after ``trigger`` bytes of strictly sequential reads (or a read
    from offset 0), so a lone random read — even with the kernel's own small readahead right
    behind it — never costs extra store requests.  The window doubles per sequential read.
    """

    def __init__(self, initial: int, maximum: int, trigger: int, slack: int = 0) -> None:
        self.initial, self.maximum, self.trigger = initial, maximum, trigger
        #: how far a read may land from the previous end and still count as sequential: the
        #: kernel's own readahead sends several reads at once and they arrive out of order
        self.slack = slack
        self.window = initial
        self.next_off = 0
        self.streak = 0

    def advise(self, off: int, size: int) -> tuple[int, int] | None:
        if self.next_off - self.slack <= off <= self.next_off + self.slack:
            self.streak += size
        else:
            self.streak, self.window = 0, self.initial
        self.next_off = max(self.next_off, off + size) if self.streak else off + size
        if self.streak < self.trigger:
            return None
        advice = (off + size, self.window)
        self.window = min(self.window * 2, self.maximum)
        return advice


class BlockReader:
    """Block-aligned, coalesced, parallel, deduplicated reads through a fetcher."""

    def __init__(self, size: int, fetcher: Fetcher, blocks: MemoryBlocks | PartialFile, *,
                 block_size: int, max_request: int, executor: ThreadPoolExecutor,
                 on_complete: Callable[[], None] | None = None) -> None:
        self.size, self.fetcher, self.blocks = size, fetcher, blocks
        self.block_size = block_size
        self.max_blocks = max(1, max_request // block_size)
        self.executor = executor
        self.on_complete = on_complete
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[None]] = {}
        self.requests = 0
        self.bytes_requested = 0

    def _claim(self, lo: int, hi: int) -> tuple[list[int], list[Future[None]]]:
        """Blocks in [lo, hi] this caller must fetch, and every future it must wait for."""
        mine: list[int] = []
        waits: list[Future[None]] = []
        with self._lock:
            for i in range(lo, hi + 1):
                if self.blocks.has(i):
                    continue
                fut = self._inflight.get(i)
                if fut is None:
                    fut = Future()
                    self._inflight[i] = fut
                    mine.append(i)
                waits.append(fut)
        return mine, waits

    def _runs(self, blocks: list[int]) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for i in blocks:
            if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < self.max_blocks:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        return runs

    def _fetch_run(self, first: int, count: int) -> None:
        start = first * self.block_size
        length = min(count * self.block_size, self.size - start)
        error: BaseException | None = None
        try:
            with self._lock:
                self.requests += 1
                self.bytes_requested += length
            data = memoryview(self.fetcher(start, length))
            if len(data) != length:
                raise ShortReadError(f"fetcher returned {len(data)} bytes for [{start}, +{length})")
            for k in range(count):
                self.blocks.write(first + k, data[k * self.block_size:(k + 1) * self.block_size])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            error = exc
        if error is None and self.on_complete is not None and self.blocks.complete():
            self.on_complete()  # before waking waiters: a closer that waited sees the promotion
        with self._lock:
            futures = [self._inflight.pop(first + k) for k in range(count)]
        for fut in futures:
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
        if error is None:
            self.blocks.settle()

    def _block_range(self, off: int, size: int) -> tuple[int, int] | None:
        end = min(off + size, self.size)
        if off >= end:
            return None
        return off // self.block_size, (end - 1) // self.block_size

    def read(self, off: int, size: int) -> bytes:
        rng = self._block_range(off, size)
        if rng is None:
            return b""
        mine, waits = self._claim(*rng)
        runs = self._runs(mine)
        for run in runs[1:]:
            self.executor.submit(self._fetch_run, *run)
        if runs:
            self._fetch_run(*runs[0])  # the reader does the first request itself: no thread hop
        for fut in waits:
            fut.result()
        return self.blocks.read(off, min(size, self.size - off))

    def present(self, off: int, size: int) -> bool:
        """Whether every block of [off, off+size) is already stored locally."""
        rng = self._block_range(off, size)
        return rng is None or all(self.blocks.has(i) for i in range(rng[0], rng[1] + 1))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no fetch of this reader is in flight (before closing its storage)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._inflight.values())
            if not pending:
                return True
            for fut in pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(BaseException):
                    fut.exception(timeout=remaining)
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def prefetch(self, off: int, size: int) -> None:
        """Start fetching [off, off+size) in the background; returns at once."""
        rng = self._block_range(off, size)
        if rng is None:
            return
        # Widen the end to a whole request: a sliding window would otherwise claim one new
        # block per read and degrade into 1-block requests.
        last_block = (self.size - 1) // self.block_size
        hi = min(last_block, (rng[1] // self.max_blocks + 1) * self.max_blocks - 1)
        mine, _ = self._claim(rng[0], hi)
        for run in self._runs(mine):
            self.executor.submit(self._fetch_run, *run)


# -- the daemon's content layer ----------------------------------------------------------

class _Object:
    """One md5's content while at least one file handle has it open."""

    def __init__(self, ref: FileRef) -> None:
        self.ref = ref
        self.refs = 0
        self.fd: int | None = None  #: complete, verified object
        self.data: bytes | None = None  #: a small object's verified bytes (installed in the background)
        self.partial: PartialFile | None = None
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
            obj.partial = obj.reader = None
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
        data, fd, reader = obj.data, obj.fd, obj.reader
        if data is None and fd is None and reader is None and obj.ref.size <= _INLINE_PREPARE_MAX:
            # A small object already in the local cache: opening and checking it is cheaper
            # than the thread hop (a store fetch never happens here).
            if self.cache.lookup(obj.ref.md5, obj.ref.size) is None or not obj.lock.acquire(blocking=False):
                return None  # never wait on the event loop for another thread's fetch
            try:
                self._prepare_locked(obj, local_only=True)
            finally:
                obj.lock.release()
            data, fd, reader = obj.data, obj.fd, obj.reader
            if fd is None:
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
            path = self._complete_path(ref)
            if path is not None:
                obj.fd = os.open(path, os.O_RDONLY)
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

    def _complete_path(self, ref: FileRef) -> Path | None:
        """A complete cached object, md5-checked once per daemon lifetime before trusting it."""
        path = self.cache.lookup(ref.md5, ref.size)
        if path is None:
            return None
        if ref.md5 not in self._verified:
            if not self.cache.verify(ref.md5):  # corrupt: dropped by the cache; fetch again
                return None
            self._verified[ref.md5] = True
        return path

    def _schedule_promotion(self, obj: _Object) -> None:
        obj.promotion = self._executor.submit(self._promote, obj)

    def _promote(self, obj: _Object) -> None:
        """All blocks present: verify the md5 and move the file into the complete cache.

        Hashing runs without the object lock (complete blocks are never rewritten), so
        readers are not stalled while a large object is verified.
        """
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
