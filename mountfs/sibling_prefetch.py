"""Small files fetched ahead of a reader that walks a directory (the content layer's helper).

Cold small files cost one store round trip each; a reader that goes through a directory file
after file (a training loop over shards, ``cp -r``, ``tar``) would wait for every one of them in
turn.  :class:`SiblingPrefetch` notices the walk and keeps a bounded number of the next files in
flight, so the reader finds them fetched and checked when it opens them.

Concurrency rule: every method here runs in worker threads (``take(wait=False)`` and
``advance`` may also run on the trio loop: they never wait for a fetch).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from cachetools import LRUCache

from .fetch import FetchError
from .namespace import FileRef

if TYPE_CHECKING:
    from .content import ContentReader


class SiblingPrefetch:
    """Small files fetched ahead of a reader that walks a directory (bounded).

    A directory counts as walked when a small file is read after one listed before it.  Then
    the next ``AHEAD`` small siblings are fetched (``PARALLEL`` at a time, each md5-checked and
    installed into the cache like any small object); a reader that opens one of them gets its
    bytes from here (waiting for a fetch in flight) instead of a second request.  Each sibling
    is considered once per walk; at most ``KEEP`` fetched objects wait in memory for their reader.

    No object is fetched twice: a sibling some reader has open is that reader's to fetch (it
    opens before it looks here, and both look under one lock order, see :meth:`advance`), and
    one fetched lately by anyone is skipped while its cache install may still be queued.
    """

    AHEAD = 16
    PARALLEL = 8
    MAX_SIZE = 512 << 10  #: larger siblings are not fetched ahead
    KEEP = 64
    #: rows listed per directory query: a walk queries its directory once per ~LISTED - AHEAD
    #: files read (it was once per file, on the event loop)
    LISTED = 4 * AHEAD + 1

    def __init__(self, content: "ContentReader") -> None:
        self.content = content
        self._lock = threading.Lock()
        #: directory -> (last row id read, last row id considered for prefetch)
        self._walks: LRUCache[tuple[str, int], tuple[int, int]] = LRUCache(maxsize=256)
        self._ahead: LRUCache[str, Future[bytes]] = LRUCache(maxsize=self.KEEP)
        #: directory -> (rows of its last listing, whether they reach the directory's end)
        self._listed: LRUCache[tuple[str, int], tuple[list[tuple[int, str, int]], bool]] = LRUCache(maxsize=256)
        #: objects fetched lately, by a reader or ahead of one: their cache installs may still
        #: be queued (mountfs/small_installs.py), so the cache does not show them yet
        self._recent: LRUCache[str, bool] = LRUCache(maxsize=4096)
        self._inflight = 0
        self.fetched = 0  #: objects fetched ahead of a reader (stats)
        self._pool = ThreadPoolExecutor(self.PARALLEL, thread_name_prefix="artifactfs-ahead")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # small fetches: let running ones land

    def take(self, md5: str, wait: bool = True) -> bytes | None:
        """The verified bytes of ``md5`` if it was fetched ahead (``wait``: for a fetch in flight)."""
        with self._lock:
            fut = self._ahead.get(md5)
            if fut is None or not (wait or fut.done()):
                return None
            del self._ahead[md5]
            if fut.cancel():  # not started yet: the reader is quicker fetching it itself
                self._inflight -= 1
                return None
        try:
            return fut.result(timeout=self.content.config.timeout)
        except Exception:  # noqa: BLE001 - the reader fetches it itself (and reports a failure)
            return None

    def advance(self, ref: FileRef) -> None:
        """``ref`` (a small file) was just read: when that walks its directory, fetch ahead."""
        with self._lock:
            self._recent[ref.md5] = True
        if ref.directory is None:
            return
        key, row = ref.directory[:2], ref.directory[2]
        with self._lock:
            last, seen = self._walks.get(key, (row, row))
            self._walks[key] = (row, max(seen, row))
            if row <= last or self._inflight >= self.PARALLEL:
                return  # not (yet) a forward walk, or enough in flight
        content = self.content
        top = seen  #: the last sibling dealt with (fetched, cached, or not worth fetching)
        for rid, md5, size in self._next_siblings(ref, key, row):
            if rid <= seen or md5 == ref.md5:
                continue
            if size <= self.MAX_SIZE and content.cache.lookup(md5, size) is None:
                with self._lock:
                    if self._inflight >= self.PARALLEL:
                        break  # the next read continues from here
                    if md5 not in self._ahead and md5 not in self._recent and not content.is_open(md5):
                        self._inflight += 1
                        self._ahead[md5] = self._pool.submit(self._fetch, ref.entity, md5, size)
            top = rid
        with self._lock:
            last_now, seen_now = self._walks.get(key, (row, row))
            self._walks[key] = (last_now, max(top, seen_now))

    def _next_siblings(self, ref: FileRef, key: tuple[str, int], row: int) -> list[tuple[int, str, int]]:
        """(row id, md5, size) of the next ``AHEAD`` files after row ``row`` of ``ref``'s
        directory: from the rows of its last listing when they reach that far, else listed anew
        (``LISTED`` rows from ``ref`` on).  A version's directory never changes."""
        with self._lock:
            listed = self._listed.get(key)
        if listed is not None:
            rows, complete = listed
            at = bisect.bisect_right(rows, row, key=lambda r: r[0])
            if rows and rows[0][0] <= row and (complete or len(rows) - at >= self.AHEAD):
                return rows[at:at + self.AHEAD]
        rows = self.content._siblings(ref, limit=self.LISTED)
        with self._lock:
            self._listed[key] = (rows, len(rows) < self.LISTED)
        return [r for r in rows if r[0] > row][:self.AHEAD]

    def _fetch(self, entity: str, md5: str, size: int) -> bytes:
        try:
            data = self.content.fetch_range(entity, md5, 0, size)
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
                raise FetchError(f"the store returned wrong bytes for {md5}")
            self.content._install_later(md5, data)
            with self._lock:
                self.fetched += 1
                self._recent[md5] = True
            return data
        finally:
            with self._lock:
                self._inflight -= 1
