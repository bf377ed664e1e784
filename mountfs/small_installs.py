"""Verified small objects written into the shared cache behind the reader, in batches.

A cold small file is served from memory as soon as its md5 matched; its copy into the cache
(:meth:`client.cache.Cache.install_verified`) happens here, off the read path.  One thread
does them all, and takes every object waiting when it wakes: a directory walk's objects share
one wake-up and one index transaction instead of a thread hop and a commit each.  The thread
lingers up to :attr:`SmallInstalls.LINGER` after the first object of a batch so that a batch
forms; memory stays bounded (at most ``max_bytes`` wait; a producer past it waits its turn).

Nothing is lost at unmount: :meth:`SmallInstalls.shutdown` installs whatever still waits.
A crash loses what waited, which costs a fetch later, never a wrong byte.

Concurrency rule: :meth:`put` runs in worker threads (it may wait for room, never for a fetch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from client.cache import Cache

log = logging.getLogger(__name__)


class SmallInstalls:
    """The batched cache installs of one content reader (see the module docstring)."""

    #: seconds the thread waits after a batch's first object for more to join it
    LINGER = 0.02
    #: most objects in one batch (one index transaction)
    MAX_BATCH = 64

    def __init__(self, cache: Cache, max_bytes: int, on_added: Callable[[int], None]) -> None:
        self.cache, self.max_bytes, self.on_added = cache, max_bytes, on_added
        self._cv = threading.Condition()
        self._pending: list[tuple[str, bytes]] = []
        #: md5 -> bytes of every object queued or being installed (see :meth:`peek`)
        self._held: dict[str, bytes] = {}
        self._bytes = 0  #: bytes waiting or being installed
        self._closing = False
        self._thread: threading.Thread | None = None
        self.batches = 0  #: install_verified calls made (tests count transactions with it)
        self.objects = 0  #: objects handed to them

    def put(self, md5: str, data: bytes) -> None:
        """Queue ``data`` (md5-checked by the caller) for the cache; waits while the queue is full."""
        with self._cv:
            if md5 in self._held:
                return  # already on its way into the cache
            while self._bytes and self._bytes + len(data) > self.max_bytes and not self._closing:
                self._ensure_thread()  # never wait for a thread that is gone
                self._cv.wait(1.0)
            if self._closing:
                return  # unmounting: the object is fetched again next time
            self._pending.append((md5, data))
            self._held[md5] = data
            self._bytes += len(data)
            if not self._ensure_thread() and (len(self._pending) == 1 or self._full()):
                self._cv.notify_all()  # wake the thread for a new batch, or end its lingering

    def peek(self, md5: str) -> bytes | None:
        """The verified bytes of ``md5`` while its install is queued or running, else None: a
        reader that opens it meanwhile (the cache does not show it yet) needs no request."""
        with self._cv:
            return self._held.get(md5)

    def _ensure_thread(self) -> bool:
        """Start the installing thread if it is not running (the lock held); True if started."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self._thread = threading.Thread(target=self._run, name="artifactfs-install-small", daemon=True)
        self._thread.start()
        return True

    def _full(self) -> bool:
        return len(self._pending) >= self.MAX_BATCH or 2 * self._bytes >= self.max_bytes

    def _next_batch(self) -> list[tuple[str, bytes]] | None:
        """Wait for objects, linger for more, take them (None: closing and nothing left)."""
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if not self._pending:
                return None
            until = time.monotonic() + self.LINGER
            while not self._closing and not self._full() and (left := until - time.monotonic()) > 0:
                self._cv.wait(left)
            batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            size = sum(len(data) for _, data in batch)
            try:
                added = self.cache.install_verified(batch)
                self.batches += 1
                self.objects += len(batch)
                if added:
                    self.on_added(added)
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation here
                log.warning("could not cache %d small objects (%s, ...): %s", len(batch), batch[0][0], exc)
            finally:
                with self._cv:
                    for md5, _ in batch:
                        self._held.pop(md5, None)
                    self._bytes -= size
                    self._cv.notify_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Install what waits, then stop the thread (bounded by ``timeout``)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
