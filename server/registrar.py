"""Group commit of blob registrations: concurrent uploads share one write transaction.

Each verified upload (``PUT /blobdata``, ``/complete``) must be registered before its request
answers, so a version may reference the blob.  One transaction per blob makes SQLite's single
writer the bottleneck of many small uploads; here the first caller becomes the *leader* and
writes, in one transaction, everything queued meanwhile, then everything queued during that
write, and so on; the others wait for the transaction holding their blob.  Nobody waits for a
timer: a lone upload is written at once, exactly as before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from client.hashing import is_md5_hex
from client.names import validate_entity
from client.errors import InvalidNameError
from client.registry import RegistryCore

#: at most this many registrations per transaction
MAX_BATCH = 1000


@dataclass
class _Pending:
    blob: tuple[str, str, int]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class BlobRegistrar:
    def __init__(self, registry: RegistryCore) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._writing = False
        self.transactions = 0  #: write transactions issued (for tests and metrics)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def register(self, entity: str, md5_hex: str, size: int) -> None:
        """Return once the blob is recorded (raises what the write raised)."""
        validate_entity(entity)
        if not is_md5_hex(md5_hex):
            raise InvalidNameError(f"{md5_hex!r} is not an md5 hex digest")
        mine = _Pending((entity, md5_hex, size))
        with self._lock:
            self._queue.append(mine)
            lead = not self._writing
            self._writing = True
        if lead:
            self._write_until_empty()
        mine.done.wait()
        if mine.error is not None:
            raise mine.error

    def _write_until_empty(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                if not batch:
                    self._writing = False
                    return
            error: BaseException | None = None
            try:
                self.transactions += 1
                self.registry.register_blobs([p.blob for p in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter of this batch
                error = exc
            for p in batch:
                p.error = error
                p.done.set()
