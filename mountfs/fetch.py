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
* *streaming*: with a :data:`Streamer` (a store that can stream one ranged GET, see
  ``HttpStore.stream_blob``), a sequential reader gets ONE stream to the end of the file from
  its first readahead window, or from the second of the kernel's concurrent first reads
  (:class:`_Stream`, at most ``FetchConfig.max_stream``; one per sequential region of the
  file), the way rclone reads: each block is handed to the stream's writer thread, which
  stores it (checking it against the block map) and wakes its waiters, so the socket reads go
  on while a block is written (a write into new page-cache pages can cost as much as the
  network); memory stays at a few blocks whatever the range (the :data:`WRITE_AHEAD` queued,
  the one being written, the one being read).
  The stream is back-pressured: it claims blocks only up to the reader's window, and when it
  is that far ahead it stops reading the socket (TCP holds the sender) until the reader moves
  on; it ends when the file is closed, when it meets a block fetched by someone else, or after
  ``FetchConfig.stream_idle`` seconds without the reader.  A stream its reader waits on may
  be split in two where the endpoint starts requests cheaply and the split is seen to pay
  (``FetchConfig.stream_split``, :class:`SplitGauge`).
* the content layer (:class:`ContentReader`, which glues these over Store + Cache) lives in
  :mod:`mountfs.content`, together with the zero-copy storage for an embedded store's blobs.

Concurrency rule: every method here runs in worker threads, never on the trio loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from client.atomic import atomic_write, write_fully
from client.blockmap import BlockMap, BlockMismatchError
from client.cache import Cache
from client.errors import ArtifactFSError, StoreUnavailableError
from client.retry import RetryPolicy, attempt_timeout, is_temp_failure, request_timeout
from client.store.base import Store


log = logging.getLogger(__name__)
_R = TypeVar("_R")

#: blocks a stream may hold received and not yet written (its writer thread's queue): enough
#: to keep the socket busy through a slow write, few enough that 16 streams hold 64 MiB at most
WRITE_AHEAD = 4

#: one ranged request; ``None`` means "confirmed in place" for zero-copy block storage that
#: reads the bytes itself (an embedded store's blob file, see mountfs.content.BlobBlocks)
Fetcher = Callable[[int, int], "bytes | None"]
#: one streamed ranged request: ``streamer(start, length, deliver)`` calls ``deliver(offset,
#: chunk)`` for consecutive chunks covering the range (resuming itself after a failure), or raises
Streamer = Callable[[int, int, Callable[[int, "bytes | memoryview"], None]], None]
MiB = 1 << 20
#: what stays in memory behind the furthest read of a file that drops behind (see
#: FetchConfig.drop_behind): the kernel's concurrent readahead requests arrive out of order
#: within its window (4 MiB by default, MountOptions.readahead_kb), so twice that
DROP_SLACK = 8 * MiB
#: a read drops behind itself once this much is due (one fadvise per 4 MiB read, not per read)
DROP_STEP = 4 * MiB
#: a stream is split (see BlockReader._split) only once it has delivered this many blocks (its
#: start-up and rate are measured), each part keeps at least this many, and one region of a
#: file has at most SPLIT_MAX_STREAMS streams at once
SPLIT_MIN_BLOCKS = 8
SPLIT_MAX_STREAMS = 4
#: SplitGauge: splits judged before the gauge decides, and the median gain that keeps splitting on
SPLIT_TRIALS = 2
SPLIT_PAYS = 1.3
#: seconds a store's split verdict, kept in the cache, is trusted by a later daemon
SPLIT_VERDICT_AGE = 24 * 3600.0


def passed_end(read_end: int, block_size: int) -> int:
    """Where a reader at ``read_end`` lets its pages go: :data:`DROP_SLACK` behind it, on a
    block boundary (the one rule of drop-behind, for partial and complete objects alike)."""
    return (max(0, read_end - DROP_SLACK) // block_size) * block_size


def drop_pages(fd: int, start: int, end: int) -> None:
    """Ask the kernel to drop the page cache of [start, end) of ``fd`` (clean pages only:
    a dirty page is written back first, never lost); a no-op where it cannot."""
    if end > start:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


class FetchError(StoreUnavailableError):
    """Content could not be fetched within the retry budget (the mount answers EIO)."""


class ShortReadError(ArtifactFSError):
    """The store returned fewer (or more) bytes than asked: never serve them."""


@dataclass(frozen=True)
class FetchConfig:
    block_size: int = 1 * MiB
    max_request: int = 8 * MiB  #: largest single ranged request held in memory
    #: largest streamed request (a sequential reader's one stream, to the end of the file by
    #: default): never held in memory, and back-pressured, so never read past the readahead window
    max_stream: int = 1 << 40
    readahead_max: int = 64 * MiB
    #: seconds a stream waits, paused, for its reader to come back before it ends
    stream_idle: float = 10.0
    #: streams at once (all files together), each on a thread of its own: a file that finds
    #: none free reads ahead in windowed requests instead, so no fetch ever queues behind one
    streams: int = 16
    parallel: int = 8  #: concurrent ranged requests (all files together)
    small_object: int = 2 * MiB  #: objects up to this size are fetched whole in one request
    attempts: int = 4
    backoff: float = 0.1  #: first retry delay, doubled per attempt
    #: the most one request may take, all tries together (ARTIFACTFS_REQUEST_TIMEOUT, default 30 s)
    timeout: float = dataclasses.field(default_factory=request_timeout)
    #: enforce ``timeout`` by running each request in a watchdog thread pool; needed for a store
    #: without its own timeouts, a wasted thread hop (~0.5 ms) for one that has them
    watchdog: bool = True
    #: serve an embedded store's blob files in place (``LocalBlobs.blob_path``), see mountfs.content
    local_blobs: bool = True
    #: objects at least this large keep no second copy in memory of what their sequential
    #: reader has passed: the reader's file holds it in the kernel's page cache already, so the
    #: cache object's own pages of it are dropped once on disk (0: keep them)
    drop_behind: int = 64 * MiB
    #: ``--stream-split``: a sequential reader waiting on its one stream gets a second stream
    #: ahead of it (which takes over the first one's far end) when the part the first keeps
    #: takes at least this many times that stream's own start-up (request to first byte) to
    #: arrive at the rate it was measured at, and while the store's SplitGauge has seen splits
    #: pay (or has not judged enough yet): a second connection only where the endpoint starts a
    #: request cheaply against what one connection carries AND two connections carry more than
    #: one (S3, a far endpoint), never where each ranged GET costs a rebuild of the object
    #: (moto) nor where connections share one limit.  0: one stream per sequential region
    stream_split: float = 10.0

    def drops_behind(self, size: int) -> bool:
        """Whether an object of ``size`` bytes drops its pages behind its reader."""
        return 0 < self.drop_behind <= size


# -- retries -----------------------------------------------------------------------------

def retrying(call: Callable[[], _R], expected: int | None, cfg: FetchConfig, io_pool: ThreadPoolExecutor,
             what: str, is_temp: Callable[[BaseException], bool] = is_temp_failure) -> _R:
    """Run ``call`` under the one retry policy (:mod:`client.retry`): ``cfg.attempts`` tries,
    all within ``cfg.timeout`` seconds; FetchError at the end.  ``is_temp`` classifies
    failures (default :func:`is_temp_failure`; reference sources add their final answers).

    With the watchdog the bound is enforced by waiting on a future: a request that truly
    hangs keeps one I/O thread busy, but the reader gets its EIO on time.  A store that
    retries itself (HttpStore) runs inside this call's deadline and makes single attempts.
    """
    def attempt() -> _R:
        if cfg.watchdog:
            data = io_pool.submit(contextvars.copy_context().run, call).result(timeout=attempt_timeout(cfg.timeout))
        else:
            data = call()
        if expected is not None and isinstance(data, bytes) and len(data) != expected:
            raise ShortReadError(f"{what}: got {len(data)} bytes, expected {expected}")
        return data

    policy = RetryPolicy(tries=cfg.attempts, backoff=cfg.backoff, deadline=cfg.timeout, attempt_timeout=cfg.timeout)
    return policy.call(attempt, is_temp=is_temp, what=what, logger=log,
                       give_up=lambda exc, n: FetchError(f"{what}: failed after {n} attempts: {exc!r}"))


# -- block storage -----------------------------------------------------------------------

class BlockStorage(Protocol):
    """Where a BlockReader keeps fetched blocks (memory, a partial file, a store's own blob)."""

    def has(self, i: int) -> bool: ...
    def write(self, i: int, data: bytes | memoryview) -> None: ...
    def read(self, off: int, size: int) -> bytes: ...
    def settle(self) -> None: ...
    def complete(self) -> bool: ...
    def ready(self, off: int, size: int) -> bool: ...


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

    def ready(self, off: int, size: int) -> bool:
        return True


class _StreamAbort(Exception):
    """Stops a stream from inside its deliver callback (not a store failure: never retried)."""


class EvictedBlockError(ArtifactFSError):
    """A streamed block was dropped from memory before it was read: read it again."""


class StreamBlocks:
    """Blocks held in a small in-memory window, verified by the block map as they arrive.

    The storage of last resort when the cache disk is full: a file larger than the whole
    cache is still readable (streamed), and no unverified byte is ever kept or served.
    """

    def __init__(self, blockmap: BlockMap, capacity: int) -> None:
        self.blockmap, self.capacity = blockmap, max(2, capacity)
        self.size, self.block_size = blockmap.size, blockmap.block_size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def has(self, i: int) -> bool:
        with self._lock:
            return i in self._blocks

    def write(self, i: int, data: bytes | memoryview) -> None:
        if not self.blockmap.check(i, data):
            raise BlockMismatchError(i, f"block {i} from the store does not match the block map")
        with self._lock:
            self._blocks[i] = bytes(data)
            self._blocks.move_to_end(i)
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)

    def read(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        out = bytearray()
        with self._lock:
            for i in range(off // self.block_size, -(-end // self.block_size)):
                block = self._blocks.get(i)
                if block is None:
                    raise EvictedBlockError(f"block {i} left the stream window before it was read")
                self._blocks.move_to_end(i)
                lo = max(off, i * self.block_size) - i * self.block_size
                hi = min(end, (i + 1) * self.block_size) - i * self.block_size
                out += block[lo:hi]
        return bytes(out)

    def ready(self, off: int, size: int) -> bool:
        end = min(off + size, self.size)
        with self._lock:
            return all(i in self._blocks for i in range(off // self.block_size, -(-end // self.block_size)))

    def settle(self) -> None:
        return None

    def complete(self) -> bool:
        return False  # never promoted: nothing of it is on disk


class PartialFile:
    """A sparse file + block bitmap under the cache's partial dir (resumable, crash-safe).

    ``<md5>.part`` holds the bytes at their offsets; ``<md5>.bits`` holds a header
    (size, block size) and one bit per block.  Bits reach disk only after an fdatasync of
    the data, so after a crash the bitmap may under-report, never over-report.

    The bitmap is a hint, not a proof: a block counts as *checked* (servable) only once this
    process verified it — against the blob's block map when fetched or first read, or as part
    of a whole-object md5 (``mark_all_checked``) when there is no map.  A block that fails its
    check is forgotten and :class:`BlockMismatchError` raised, so the caller fetches it again.
    """

    _HEADER = struct.Struct("<QI")

    def __init__(self, directory: Path, md5: str, size: int, block_size: int, flush_every: int = 32,
                 blockmap: BlockMap | None = None, drop_behind: bool = False) -> None:
        self.blockmap = blockmap if blockmap is not None and blockmap.block_size == block_size else None
        self.path = directory / f"{md5}.part"
        self.bits_path = directory / f"{md5}.bits"
        self.size, self.block_size = size, block_size
        self.nblocks = -(-size // block_size)
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self._bits = bytearray(-(-self.nblocks // 8))
        self._checked = bytearray(self.nblocks)  #: verified by this process (memory only)
        self._count = 0
        self._dirty = 0
        # Without a block map: a running md5 over the contiguous prefix of present blocks (a
        # sequential fill is verified as it arrives, so completion costs no second pass).  With
        # one, no md5 at all: see verified().
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._hashed = 0  #: blocks folded into _md5
        self.md5_bytes = 0  #: bytes this object put through md5 (counted by tests)
        self._whole_checked = False  #: mark_all_checked: the whole object matched its md5
        self._hash_lock = threading.Lock()
        self._retired = False
        #: drop the pages behind the furthest read, once on disk (FetchConfig.drop_behind)
        self._drop_behind = drop_behind
        self._read_end = 0  #: the end of the furthest read served
        self._prefix = 0  #: blocks [0, _prefix) were present at the last flush
        self._synced_end = 0  #: and [0, _synced_end) on disk after it
        self._dropped = 0  #: pages before this offset were dropped
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
        if self.blockmap is not None and not self.blockmap.check(i, data):
            raise BlockMismatchError(i, f"block {i} from the store does not match the block map")
        write_fully(self.fd, data, i * self.block_size)
        with self._lock:
            if self.blockmap is not None:
                self._checked[i] = 1
            if not self.has(i):
                self._bits[i >> 3] |= 1 << (i & 7)
                self._count += 1
            self._dirty += 1

    def settle(self) -> None:
        """Background bookkeeping after writes: extend the running md5, persist the bitmap.

        Called by the block reader *after* it has woken the readers of the new blocks, so
        neither hashing nor fdatasync sits between a fetch and the read waiting for it.
        A retired file (promoted into the cache) has nothing left to keep.
        """
        if self._retired:
            return
        self._advance_hash()
        with self._lock:
            due = self._dirty >= self._flush_every or (self._dirty and self._count == self.nblocks)
        if due:
            try:
                self.flush()
            except OSError as exc:  # a full disk: the bitmap under-reports, which is safe
                log.warning("could not persist the block bitmap of %s: %s", self.path.name, exc)

    def _advance_hash(self) -> None:
        """Fold newly contiguous blocks into the running md5 (one thread at a time, no waiting);
        nothing to do with a block map (blocks are checked against it instead)."""
        if self.blockmap is not None or not self._hash_lock.acquire(blocking=False):
            return  # another thread is hashing and will pick these blocks up, or md5() will
        try:
            while self._hashed < self.nblocks and self.has(self._hashed):
                block = os.pread(self.fd, self.block_size, self._hashed * self.block_size)
                self._md5.update(block)
                self.md5_bytes += len(block)
                with self._lock:
                    self._hashed += 1
        finally:
            self._hash_lock.release()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty or self._retired:
                return
            self._dirty = 0
            bits = bytes(self._bits)
            while self._prefix < self.nblocks and self.has(self._prefix):
                self._prefix += 1
            prefix = self._prefix  # before the sync: these blocks are on disk after it
        os.fdatasync(self.fd)
        with atomic_write(self.bits_path, durable=False) as f:  # a hint: lost bits are fetched again
            f.write(self._HEADER.pack(self.size, self.block_size) + bits)
        if self._drop_behind:
            with self._lock:
                self._synced_end = max(self._synced_end, prefix * self.block_size)
            self._drop_passed(0)

    def _drop_passed(self, step: int) -> None:
        """Drop this file's pages of what the reader has passed (but the last
        :data:`DROP_SLACK`) and the last fdatasync put on disk, once more than ``step`` bytes
        are due.  Never a loss: the kernel drops clean pages only, and a dropped page is
        read from the disk again."""
        with self._lock:
            upto = min(passed_end(self._read_end, self.block_size), self._synced_end)
            if upto - self._dropped <= step:
                return
            start, self._dropped = self._dropped, upto
        drop_pages(self.fd, start, upto)

    def read(self, off: int, size: int) -> bytes:
        """Bytes of checked blocks; an unchecked block is verified first (BlockMismatchError)."""
        end = min(off + size, self.size)
        for i in range(off // self.block_size, -(-end // self.block_size)):
            if not self._checked[i]:
                self._check_block(i)
        if self._drop_behind and end > self._read_end:
            self._read_end = end  # unlocked: a race only delays a drop
            self._drop_passed(DROP_STEP)
        return os.pread(self.fd, size, off)

    def _check_block(self, i: int) -> None:
        bm = self.blockmap
        data = os.pread(self.fd, self.block_size, i * self.block_size)
        if bm is not None and bm.check(i, data):
            self._checked[i] = 1
            return
        self.unset(i)
        raise BlockMismatchError(i, f"block {i} of {self.path.name} failed verification" if bm is not None
                                 else f"block {i} of {self.path.name} is not verified (no block map)")

    def unset(self, i: int) -> None:
        """Forget one block (it failed verification): it is fetched again."""
        with self._lock:
            self._checked[i] = 0
            self._whole_checked = False
            if self.has(i):
                self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                self._count -= 1
                self._dirty += 1
        with self._hash_lock:
            if self._hashed > i:
                self._md5, self._hashed = hashlib.md5(usedforsecurity=False), 0

    def ready(self, off: int, size: int) -> bool:
        end = min(off + size, self.size)
        return all(self._checked[i] for i in range(off // self.block_size, -(-end // self.block_size)))

    def mark_all_checked(self) -> None:
        """Every block is present and the whole object matched its md5."""
        with self._lock:
            self._checked[:] = b"\x01" * self.nblocks
            self._whole_checked = True

    def verified(self) -> bool:
        """Whether the complete file is known to be the blob, without hashing it again: the
        whole object matched its md5 (:meth:`mark_all_checked`), or every block matched the
        block map.  The second is as strong as an md5 pass: a map is only ever made from the
        very bytes whose md5 the store verified, in the same pass (client/blockmap.py), so a
        file whose every block matches it holds those bytes.  Blocks present but not checked
        by this process (resumed from disk) are checked here; one that fails is forgotten
        (fetched again) and the answer is False."""
        if self._whole_checked:
            return self.complete()
        if self.blockmap is None or not self.complete():
            return False
        for i in range(self.nblocks):
            if not self._checked[i]:
                try:
                    self._check_block(i)
                except BlockMismatchError:
                    return False
        return True

    def complete(self) -> bool:
        return self._count == self.nblocks

    def md5(self) -> str:
        """md5 of the whole (complete) file, reusing the running hash of the prefix."""
        with self._hash_lock:
            h, start = self._md5.copy(), self._hashed * self.block_size
        for off in range(start, self.size, 4 * MiB):
            chunk = os.pread(self.fd, min(4 * MiB, self.size - off), off)
            h.update(chunk)
            self.md5_bytes += len(chunk)
        return h.hexdigest()

    def reset(self) -> None:
        """Forget every block (after a failed verification)."""
        with self._lock:
            self._bits[:] = bytes(len(self._bits))
            self._checked[:] = bytes(self.nblocks)
            self._whole_checked = False
            self._count = 0
            self._dirty = 1
        with self._hash_lock:
            self._md5, self._hashed = hashlib.md5(usedforsecurity=False), 0
        self.flush()

    def forget_bitmap(self) -> None:
        """The file was promoted into the cache: drop its bitmap, and let no late bookkeeping
        job write one again."""
        self._retired = True
        with contextlib.suppress(FileNotFoundError):
            self.bits_path.unlink()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        os.close(self.fd)

    def abandon(self) -> None:
        """Close without writing anything back (its files were removed: nothing to keep)."""
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


class StreamSlots:
    """Threads for long streams, at most ``n`` at once.  A stream may pause for its reader for
    a long time, so it never runs on the shared fetch pool (paused streams would starve every
    other read); a reader that finds no free slot does not wait, it falls back."""

    def __init__(self, n: int) -> None:
        self._free = threading.BoundedSemaphore(max(1, n))
        self._pool = ThreadPoolExecutor(max(1, n), thread_name_prefix="artifactfs-stream")

    def acquire(self) -> bool:
        return self._free.acquire(blocking=False)

    def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on a stream thread; its slot (taken by :meth:`acquire`) is released after."""
        def job() -> None:
            try:
                fn()
            finally:
                self._free.release()
        self._pool.submit(contextvars.copy_context().run, job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _location_key(location: str) -> str:
    return hashlib.sha256(location.encode()).hexdigest()


def split_state(cache_root: Path, location: str) -> Path:
    """Where a daemon keeps the SplitGauge verdict of the store at ``location``."""
    return cache_root / "state" / f"stream-split-{_location_key(location)[:16]}.json"


class SplitGauge:
    """Whether splitting streams pays on this endpoint, learnt from the splits themselves (one
    per store, shared by all its files).  After each split the two streams' rates while both
    ran, added up, are compared with the first one's rate alone before (the *gain*).  Splitting
    goes on while fewer than :data:`SPLIT_TRIALS` gains are known or the median of the last
    ones is at least :data:`SPLIT_PAYS`: an endpoint that caps each connection (S3, a far one)
    gains ~2x per split; one whose connections share a limit (the CPU it shares with the
    daemon, say) gains nothing, and after its trials no stream is split any more.

    With a ``state`` file the gains outlive the daemon: a later one over the same cache and
    ``location`` starts from them (no trial splits again after every remount) for
    :data:`SPLIT_VERDICT_AGE` seconds after they were last written.  The file is a hint: one
    that is unreadable, stale, for another location or not what this class writes is ignored,
    and a write that fails leaves the gauge working in memory.
    """

    def __init__(self, state: Path | None = None, location: str = "", *,
                 max_age: float = SPLIT_VERDICT_AGE, now: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        #: the file names the store by a digest of its location, never the location itself
        #: (a URL may carry credentials)
        self._state, self._location, self._now = state, _location_key(location), now
        self.splits = 0  #: streams split on this store by this daemon (the mount's metrics)
        self.gains: list[float] = self._load(max_age)  #: the last few, oldest first

    def _load(self, max_age: float) -> list[float]:
        if self._state is None:
            return []
        try:
            kept = json.loads(self._state.read_bytes())
            gains, saved = kept["gains"], float(kept["saved"])
            if kept["location"] != self._location or not 0 <= self._now() - saved <= max_age:
                return []
            if not isinstance(gains, list) or not all(
                    isinstance(g, (int, float)) and 0 < g < math.inf for g in gains):
                return []
            return [float(g) for g in gains][-2 * SPLIT_TRIALS:]
        except (OSError, ValueError, TypeError, KeyError):
            return []

    def allowed(self) -> bool:
        with self._lock:
            return len(self.gains) < SPLIT_TRIALS or self._median() >= SPLIT_PAYS

    def proven(self) -> bool:
        """Whether splits were judged and pay: then a stream split from another may split in
        turn while that one still runs (more than two connections at once)."""
        with self._lock:
            return len(self.gains) >= SPLIT_TRIALS and self._median() >= SPLIT_PAYS

    def count_split(self) -> None:
        with self._lock:
            self.splits += 1

    def report(self, gain: float) -> None:
        with self._lock:
            self.gains = gains = (self.gains + [gain])[-2 * SPLIT_TRIALS:]
        if self._state is not None:
            record = {"location": self._location, "saved": self._now(), "gains": gains}
            try:
                self._state.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(self._state, durable=False) as f:  # a hint: losing it costs a trial
                    f.write(json.dumps(record).encode())
            except OSError as exc:
                log.debug("could not keep the split verdict in %s: %s", self._state, exc)

    def _median(self) -> float:
        g = sorted(self.gains)
        return (g[(len(g) - 1) // 2] + g[len(g) // 2]) / 2


@dataclass(eq=False)
class _Stream:
    """One long sequential stream of a BlockReader: blocks [next, claimed) are claimed
    (their futures are in the reader's in-flight table) and arrive in order; readers raise
    ``want`` as they go, and the stream claims up to it (never past ``end``)."""

    next: int  #: the first block not yet stored (written by the stream's writer)
    claimed: int
    end: int  #: exclusive; lowered when the stream meets a block another fetch holds
    want: int
    sent: int = -1  #: the first block not yet handed to the writer (next <= sent <= claimed)
    stop: bool = False  #: claim nothing more
    abort: bool = False  #: and deliver nothing more (nobody is left to read it)
    done: Future[None] = dataclasses.field(default_factory=Future)
    #: what it measured (monotonic seconds): its request sent, its first byte, time it waited
    #: for its reader (back-pressure, not the endpoint's), and the blocks it handed over
    asked: float = 0.0
    first_byte: float = 0.0
    waited: float = 0.0
    handed: int = 0
    #: started by a split: it shares the endpoint with the stream it was split from until that
    #: one ends, so its rate alone is measured from then, not from its first byte
    shares: bool = False
    #: (time, handed, waited) from which its rate alone is measured (None: not yet known)
    base: tuple[float, int, float] | None = None
    #: after it was split: the stream ahead, and (time, handed, waited) at the split and its
    #: rate alone before it (blocks/s), to judge the split when this stream ends (SplitGauge)
    helper: "_Stream | None" = None
    at_split: tuple[float, int, float] = (0.0, 0, 0.0)
    rate_alone: float = 0.0

    def __post_init__(self) -> None:
        if self.sent < 0:
            self.sent = self.next


class BlockReader:
    """Block-aligned, coalesced, parallel, deduplicated reads through a fetcher."""

    def __init__(self, size: int, fetcher: Fetcher, blocks: BlockStorage, *,
                 block_size: int, max_request: int, executor: ThreadPoolExecutor,
                 on_complete: Callable[[], None] | None = None,
                 streamer: Streamer | None = None, max_stream: int = 0, max_ahead: int = 0,
                 stream_idle: float = 10.0, stream_slots: StreamSlots | None = None,
                 stream_split: float = 0.0, split_gauge: SplitGauge | None = None) -> None:
        self.size, self.fetcher, self.blocks = size, fetcher, blocks
        self.block_size = block_size
        self.max_blocks = max(1, max_request // block_size)
        self.streamer = streamer
        #: the most one prefetch reaches ahead (0: as far as the window says); a storage that
        #: holds only a small window (StreamBlocks) must not be filled past what it keeps
        self.max_ahead = max_ahead
        #: blocks of the largest streamed request (readahead only; reads use ``fetcher``)
        self.stream_blocks = max(self.max_blocks, max_stream // block_size) if streamer is not None else self.max_blocks
        self.executor = executor
        self.on_complete = on_complete
        self.stream_idle = stream_idle
        #: see FetchConfig.stream_split; never with a storage that keeps only a window
        self.stream_split = stream_split if max_ahead == 0 else 0.0
        self.split_gauge = split_gauge or SplitGauge()
        self.stream_slots = stream_slots if stream_slots is not None or streamer is None else StreamSlots(1)
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)  #: a reader moved on, or streams must stop
        self._inflight: dict[int, Future[None]] = {}
        #: every stream still running: one per sequential region of the file (readers at
        #: different places), and a successor overlapping the end of the one before
        self._streams: set[_Stream] = set()
        #: blocks a stream delivered wrong: fetched again by ranged requests only
        self._suspect: set[int] = set()
        self._settler: Future[None] | None = None  #: the background settle job, while one runs
        self._settle_due = False
        self.requests = 0
        self.bytes_requested = 0
        self.splits = 0  #: streams started ahead of a running one (:meth:`_split`)

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

    def _runs(self, blocks: list[int], limit: int | None = None) -> list[tuple[int, int]]:
        limit = limit or self.max_blocks
        runs: list[tuple[int, int]] = []
        for i in blocks:
            if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < limit:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        return runs

    def _follow(self, lo: int, hi: int) -> bool:
        """A sequential reader wants blocks [lo, hi]: let a stream serve them (raising the claim
        of the one there, or starting one to the end of the file).  False: a stream is not the
        way (the rest is short, or no stream thread is free) and the caller fetches."""
        with self._lock:
            s = self._stream_at(lo, hi, self.max_blocks)
            if s is not None:
                self._want(s, hi)
                if s.claimed < s.end or hi < s.end:
                    return True
                lo = s.end  # the stream ends before the window does: a successor from there
            first = lo
            while first <= hi and (self.blocks.has(first) or first in self._inflight):
                first += 1
            if first > hi:
                return True  # all there or on its way
            last = min((self.size - 1) // self.block_size, first + self.stream_blocks - 1)
            end = first
            while end <= last and not self.blocks.has(end) and end not in self._inflight and end not in self._suspect:
                end += 1
            slots = self.stream_slots
            if end - first <= self.max_blocks or slots is None or not slots.acquire():
                return False
            s = _Stream(next=first, claimed=first, end=end, want=hi + 1)
            self._streams.add(s)
            self._claim_for(s)
        slots.run(lambda: self._run_stream(s))
        return True

    def _continues(self, lo: int) -> bool:
        """Whether block ``lo`` follows one already here or on its way, with no stream
        running: the kernel's concurrent reads of a sequential reader, before any readahead
        advice (each would otherwise be a request of its own)."""
        with self._lock:
            return lo > 0 and (self.blocks.has(lo - 1) or lo - 1 in self._inflight) \
                and self._stream_at(lo, lo, self.max_blocks) is None

    def _stream_at(self, lo: int, hi: int, reach: int) -> _Stream | None:
        """(Lock held.) The running stream that serves blocks [lo, hi]: it has not passed
        them, and has claimed up to ``lo`` (or to within ``reach`` blocks of it); of several
        (one per sequential region of the file, and a successor) the one reaching furthest."""
        best = None
        for s in self._streams:
            if not s.stop and s.next <= hi + 1 and lo <= s.claimed + reach and (best is None or s.end > best.end):
                best = s
        return best

    def _join_stream(self, lo: int, hi: int) -> None:
        """A read of blocks [lo, hi] just past what the stream has claimed (the kernel sends
        several reads at once, ahead of the last readahead advice): the stream claims them, so
        the read waits for it instead of sending a request of its own that would cut it."""
        with self._lock:
            s = self._stream_at(lo, hi, self.max_blocks)
            if s is not None and lo >= s.next:
                self._want(s, hi)

    def _want(self, s: _Stream, hi: int) -> None:
        """(Lock held.) A reader wants the stream to reach block ``hi``: claim up to it now,
        so a read of those blocks waits for the stream, and wake a paused stream."""
        if hi + 1 > s.want:
            s.want = hi + 1
            self._claim_for(s)
            self._moved.notify_all()

    def _claim_for(self, s: _Stream) -> None:
        """(Lock held.) Claim the stream's blocks up to what its reader wants."""
        target = min(s.want, s.end)
        while s.claimed < target:
            i = s.claimed
            if self.blocks.has(i) or i in self._inflight or i in self._suspect:
                s.end = i  # another fetch has it: the stream ends there
                return
            self._inflight[i] = Future()
            s.claimed += 1

    def _await_claim(self, s: _Stream) -> bool:
        """Before the stream hands block ``s.sent`` to its writer: make sure it is claimed, waiting (the
        back-pressure) while the stream is a whole window ahead of its reader.  False: the
        stream ends here (closed, met another fetch, or its reader stayed away too long)."""
        deadline = time.monotonic() + self.stream_idle
        with self._lock:
            while True:
                if s.abort:
                    return False
                if s.sent < s.claimed:
                    return True
                if s.stop or s.sent >= s.end:
                    return False
                self._claim_for(s)
                if s.sent < s.claimed:
                    return True
                if s.sent >= s.end:
                    return False
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    log.debug("stream paused %.0f s without its reader: ended", self.stream_idle)
                    return False
                self._moved.wait(left)
                s.waited += time.monotonic() - now  # the reader's time, not the endpoint's

    def _split(self, s: _Stream) -> _Stream | None:
        """(Lock held; the stream's thread, after it handed a block.)  A second stream ahead of
        ``s`` when its reader waits on it and a second connection pays; the caller starts it.

        The reader waits on ``s`` when ``s`` has claimed (for the reader's window) far more than
        it has received.  A second stream pays when the part ``s`` keeps, received at the rate
        ``s`` was measured at, takes at least ``stream_split`` times the start-up ``s`` had
        (request to first byte): then the new request's start-up hides behind what ``s`` still
        carries.  The new stream takes over the claimed blocks past that part and the rest of
        the range; ``s`` ends where it begins.  No block changes hands twice: the waiters of a
        claimed block wait on its future, whoever stores it."""
        if s.stop or s.helper is not None or len(self._streams) >= SPLIT_MAX_STREAMS or not s.first_byte:
            return None
        base = s.base
        if base is None:  # split from a stream still running: measured while they share
            if not self.split_gauge.proven():
                return None  # its rate alone is not known yet, and splitting may not pay
            base = (s.first_byte, 0, 0.0)
        since, handed, waited = base
        if s.handed - handed < SPLIT_MIN_BLOCKS:
            return None
        ahead = s.claimed - s.sent
        if ahead < 2 * SPLIT_MIN_BLOCKS:
            return None  # the stream keeps up with its reader: one connection is enough
        now = time.monotonic()
        busy = now - since - (s.waited - waited)
        if busy <= 0:
            return None
        per_block = busy / (s.handed - handed)  #: seconds one block takes on this connection alone
        keep = max(SPLIT_MIN_BLOCKS, math.ceil(self.stream_split * (s.first_byte - s.asked) / per_block))
        if ahead < keep + SPLIT_MIN_BLOCKS:
            return None
        slots = self.stream_slots
        if not self.split_gauge.allowed() or slots is None or not slots.acquire():
            return None
        cut = s.sent + keep
        helper = _Stream(next=cut, claimed=s.claimed, end=s.end, want=s.want, shares=True)
        # what the helper carries is counted by its own request, not twice
        self.bytes_requested -= min(s.end * self.block_size, self.size) - cut * self.block_size
        s.claimed = s.end = cut
        s.helper, s.at_split, s.rate_alone = helper, (now, s.handed, s.waited), 1 / per_block
        self._streams.add(helper)
        self.splits += 1
        self.split_gauge.count_split()
        return helper

    def _judge_split(self, s: _Stream) -> None:
        """(Lock held.)  ``s`` was split and has delivered its part: what the split gained, the
        blocks ``s`` and its helper received since the split, per second of that time (the
        time ``s`` waited for its reader left out: the reader did not wait on it then), against
        the rate of ``s`` alone before.  Measured over the same seconds, not per stream: two
        connections that share one limit each run at half of it."""
        helper, now = s.helper, time.monotonic()
        assert helper is not None
        if not helper.first_byte or s.rate_alone <= 0:
            return  # the helper never got going (closed meanwhile): nothing learnt
        at, handed, waited = s.at_split
        busy = now - at - (s.waited - waited)
        if busy > 0:
            both = (s.handed - handed + helper.handed) / busy
            self.split_gauge.report(both / s.rate_alone)

    def _run_stream(self, s: _Stream) -> None:
        """The stream's thread: one ranged request [next, end), block by block, in order.

        It reads the socket and hands each whole block to a writer thread of its own (a queue
        of :data:`WRITE_AHEAD`), which stores it (the storage checks it against the block map)
        and wakes its waiters, so the next blocks are read while one is written.  A block
        that spans chunks is copied once; one inside a chunk is handed as a view of it.
        """
        assert self.streamer is not None
        start = s.next * self.block_size
        length = min(s.end * self.block_size, self.size) - start
        with self._lock:
            self.requests += 1
            self.bytes_requested += length
        buf = bytearray()  #: the start of a block that spans chunks
        pos = start
        s.asked = time.monotonic()
        failure: list[BaseException] = []  #: the writer's, if a block could not be stored
        blocks: queue.Queue[tuple[int, bytes | memoryview] | None] = queue.Queue(WRITE_AHEAD)

        def write_loop() -> None:
            while (item := blocks.get()) is not None:
                i, data = item
                if failure or s.abort:
                    continue  # not stored: failed below with the others the stream left
                try:
                    self.blocks.write(i, data)
                except BaseException as exc:  # noqa: BLE001 - given to the block's waiters
                    if isinstance(exc, BlockMismatchError):
                        with self._lock:
                            self._suspect.add(i)  # fetched again by a ranged request, never a stream
                    failure.append(exc)
                    continue
                with self._lock:
                    s.next = i + 1
                self._finish_blocks(i, 1, None)

        writer = threading.Thread(target=contextvars.copy_context().run, args=(write_loop,),
                                  name="artifactfs-stream-write", daemon=True)
        writer.start()

        def block_len() -> int:
            return min(self.block_size, self.size - s.sent * self.block_size)

        def hand(data: bytes | memoryview) -> None:
            if failure or not self._await_claim(s):
                raise _StreamAbort()  # not a failure of the stream: see below
            blocks.put((s.sent, data))
            with self._lock:
                s.sent += 1
                s.handed += 1
                helper = self._split(s) if self.stream_split else None
            if helper is not None:
                assert self.stream_slots is not None
                self.stream_slots.run(lambda: self._run_stream(helper))

        def deliver(offset: int, chunk: bytes | memoryview) -> None:
            nonlocal pos
            if offset != pos:
                raise ShortReadError(f"stream chunk at {offset}, expected {pos}")
            if not s.first_byte:
                s.first_byte = time.monotonic()
                with self._lock:
                    if not s.shares and s.base is None:
                        s.base = (s.first_byte, 0, 0.0)  # alone from its first byte
            pos += len(chunk)
            view = memoryview(chunk)
            if not isinstance(view.obj, bytes):
                view = memoryview(bytes(view))  # a buffer the store may reuse: the writer gets a copy
            if buf:
                need = block_len() - len(buf)
                buf.extend(view[:need])
                view = view[need:]
                if len(buf) < block_len():
                    return
                hand(bytes(buf))
                buf.clear()
            while len(view) and len(view) >= block_len():
                n = block_len()
                hand(view[:n])
                view = view[n:]
            buf.extend(view)

        error: BaseException | None = None
        try:
            self.streamer(start, length, deliver)
            if s.sent * self.block_size < min(s.end * self.block_size, self.size):
                raise ShortReadError(f"stream of [{start}, +{length}) ended at {pos}")
        except _StreamAbort:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            error = exc
        blocks.put(None)
        writer.join()
        if failure:
            error = failure[0]
        with self._lock:
            left = s.claimed - s.next
            if s.helper is not None:
                if error is None and not s.abort and not left:
                    self._judge_split(s)
                h = s.helper
                h.shares = False  # the helper is alone from here on (from its first byte, if later)
                if h.first_byte and h.base is None:
                    h.base = (time.monotonic(), h.handed, h.waited)
            s.stop = True
            self._streams.discard(s)
        if left:
            self._finish_blocks(s.next, left, error or ShortReadError("the stream ended early"))
        s.done.set_result(None)

    def stop_streams(self, abort: bool = False) -> None:
        """End the streams once what they have claimed is in, or (``abort``: the file closed,
        nobody waits for those blocks) at once."""
        with self._lock:
            for s in self._streams:
                s.stop = True
                s.abort = s.abort or abort
            self._moved.notify_all()

    def _finish_blocks(self, first: int, count: int, error: BaseException | None) -> None:
        """Blocks [first, first+count) are stored (or failed with ``error``): wake their waiters."""
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
            self._settle_soon()

    def _settle_soon(self) -> None:
        """Run the storage's bookkeeping (running md5, bitmap flush) on a pool thread, one job
        at a time: a fetch or stream thread goes straight back to the network."""
        with self._lock:
            self._settle_due = True
            if self._settler is not None:
                return  # the running job sees the flag and goes round once more
            self._settler = Future()
        self.executor.submit(self._settle_loop)

    def _settle_loop(self) -> None:
        while True:
            with self._lock:
                if not self._settle_due:
                    done, self._settler = self._settler, None
                    break
                self._settle_due = False
            try:
                self.blocks.settle()
            except Exception:  # noqa: BLE001 - bookkeeping only: the data is already served
                log.exception("block bookkeeping failed")
        if done is not None:
            done.set_result(None)

    def _fetch_run(self, first: int, count: int) -> None:
        start = first * self.block_size
        length = min(count * self.block_size, self.size - start)
        error: BaseException | None = None
        try:
            with self._lock:
                self.requests += 1
                self.bytes_requested += length
            got = self.fetcher(start, length)
            if got is None:  # zero-copy storage: the range was confirmed present in place
                for k in range(count):
                    self.blocks.write(first + k, b"")
            else:
                data = memoryview(got)
                if len(data) != length:
                    raise ShortReadError(f"fetcher returned {len(data)} bytes for [{start}, +{length})")
                for k in range(count):
                    self.blocks.write(first + k, data[k * self.block_size:(k + 1) * self.block_size])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            error = exc
        self._finish_blocks(first, count, error)

    def _block_range(self, off: int, size: int) -> tuple[int, int] | None:
        end = min(off + size, self.size)
        if off >= end:
            return None
        return off // self.block_size, (end - 1) // self.block_size

    def read(self, off: int, size: int) -> bytes:
        if self._block_range(off, size) is None:
            return b""
        self.ensure(off, size)
        return self.blocks.read(off, min(size, self.size - off))

    def ensure(self, off: int, size: int) -> None:
        """Fetch whatever of [off, off+size) is missing and wait for it (no bytes returned)."""
        rng = self._block_range(off, size)
        if rng is None:
            return
        self._join_stream(*rng)
        if self.streamer is not None and self._continues(rng[0]):
            self._follow(*rng)  # a read that continues the one before: a stream serves it
        mine, waits = self._claim(*rng)
        runs = self._runs(mine)
        for run in runs[1:]:
            self.executor.submit(self._fetch_run, *run)
        if runs:
            self._fetch_run(*runs[0])  # the reader does the first request itself: no thread hop
        for fut in waits:
            fut.result()

    def present(self, off: int, size: int) -> bool:
        """Whether every block of [off, off+size) is already stored locally."""
        rng = self._block_range(off, size)
        return rng is None or all(self.blocks.has(i) for i in range(rng[0], rng[1] + 1))

    def wait_idle(self, timeout: float | None = None, abort_streams: bool = False) -> bool:
        """Stop the streams and wait until no fetch of this reader is in flight (before its
        storage is closed or replaced); ``abort_streams``: see :meth:`stop_streams`."""
        self.stop_streams(abort_streams)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._inflight.values())
                pending += [s.done for s in self._streams]
                if self._settler is not None:
                    pending.append(self._settler)
            if not pending:
                return True
            for fut in pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(BaseException):
                    fut.exception(timeout=remaining)
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def prefetch(self, off: int, size: int) -> None:
        """Start fetching [off, off+size) in the background; returns at once.

        When the store can stream, the reader's one back-pressured stream serves it
        (:meth:`_follow`) from the first window on: a stream started early costs nothing
        while the reader is slow (it pauses), and every further request costs an endpoint
        that assembles the object per range (moto) a whole copy of it.  Otherwise, and for a
        short rest of the file, windows are fetched in memory in requests of ``max_request``.
        """
        if self.max_ahead:
            size = min(size, self.max_ahead)
        rng = self._block_range(off, size)
        if rng is None:
            return
        if self.streamer is not None and self._follow(*rng):
            return
        unit = self.max_blocks
        # Widen the end to a whole request: a sliding window would otherwise claim one new
        # block per read and degrade into 1-block requests.
        last_block = (self.size - 1) // self.block_size
        hi = min(last_block, (rng[1] // unit + 1) * unit - 1)
        mine, _ = self._claim(rng[0], hi)
        for first, count in self._runs(mine, unit):
            self.executor.submit(self._fetch_run, first, count)

