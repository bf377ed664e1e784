"""One draft's open files: handles, reads and writes of staged data, copy-up, the sentinel.

The lower half of :class:`mountfs.drafts.tree.DraftTree` (which adds the names: lookup,
directories, links, renames, attributes).  Base files are rows carrying the base entry's
digest: their bytes come from the shared cache through the injected ``fetch_base`` callback,
and only when a read or a partial overwrite needs them; a write makes the file staged first
(copy-up, :meth:`StagedData.copy_up`).

The sentinel (``.commit``): creating, writing, truncating or touching it arms it; the last
release of an armed sentinel (never a flush: a shell's ``echo … > .commit`` flushes a
duplicate descriptor before it writes) calls ``on_commit_request``, outside the lock.

Threading: the FUSE daemon calls in from worker threads; one re-entrant lock per draft guards
the database, the handle tables and the staged data.  The ``*_nowait`` methods are the event
loop's fast paths (see there).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadHandleError, IsDirectoryError, InvalidArgumentError, NotPermittedError, ReadOnlyFileError
from .data import StagedData
from .rows import COMMIT_NAME, ROOT_ID, STATUS_NAME, BaseRef, Node, NodeTable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeAttr:
    """What getattr/lookup/readdir report for one node of a draft."""

    id: int  #: stable within the draft (survives renames, commits and restarts); the inode
    parent: int
    name: str
    is_dir: bool
    mode: int  #: full st_mode (type | permissions)
    size: int
    mtime_ns: int
    staged: bool  #: content lives in the draft (new or modified) rather than in the base version
    digest: str | None  #: base64 md5 when known without hashing (base files)
    nlink: int = 1  #: directories 2 + subdirectories; files their names (0 once unlinked)
    atime_ns: int = 0
    ctime_ns: int = 0
    row: int = 0  #: the directory entry's row (differs from ``id`` for a hard link): readdir cookie

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(slots=True)
class _Handle:
    node: int
    flags: int
    #: opened for writing or written since its last flush: close(2) (which flushes) has not
    #: happened yet, so more data may come; a flushed handle waits only for its release
    dirty: bool = False


def _writing(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY


class DraftFiles:
    """The rows, staged data and open files of one draft under ``root``."""

    def __init__(self, root: Path, fetch_base: Callable[[BaseRef], Path], *, entity: str,
                 sync_metadata: bool = False) -> None:
        self.root = root
        self.entity = entity
        #: called (outside the lock) when the sentinel asks for a commit; set by the manager
        self.on_commit_request: Callable[[], None] | None = None
        self.lock = threading.RLock()
        self.rows = NodeTable(root / "draft.db", self.lock, sync_metadata=sync_metadata)
        self.data = StagedData(root / "data", fetch_base)
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._open: Counter[int] = Counter()
        self._armed = False  #: the sentinel was created/written/touched since the last request
        self._requests = 0  #: commit requests made and not finished yet
        #: monotonic time of the last change to a file or directory other than the sentinel
        self.last_change = 0.0

    def close(self) -> None:
        with self.lock:
            self.data.close()
            self.rows.close()

    def recover(self) -> None:
        """After a crash: drop orphans and stray files, make every staged row's data file exist."""
        with self.rows.txn() as c:
            self.rows.delete_orphans(c)
        staged = self.rows.staged_ids()
        self.data.scrub(set(staged))
        interrupted_rebase = (self.root / "commit-intent.json").exists()
        for nid, digest in staged.items():
            p = self.data.path(nid)
            if not p.exists():
                if interrupted_rebase and digest is not None:
                    continue  # already moved into the cache; resolve_intent finishes the rebase
                p.touch()
                self.rows.forget_digest(nid)
        self.rows.recovered()

    # -- attributes ---------------------------------------------------------------------------
    def attr_of(self, node: Node, entry: Node | None = None) -> NodeAttr:
        """Attributes of ``node``, seen through directory entry ``entry`` (default: its own)."""
        size, mtime_ns, ctime_ns = node.size, node.mtime_ns, node.ctime_ns or node.mtime_ns
        if node.staged:
            st = self.data.stat(node.id)
            if st is None:
                size = 0
            else:
                size, mtime_ns, ctime_ns = st.st_size, st.st_mtime_ns, max(ctime_ns, st.st_ctime_ns)
        if node.is_dir:
            kind = stat.S_IFDIR
            nlink = 2 + self.rows.subdirs(node.id)
        else:
            kind = stat.S_IFLNK if node.is_symlink else stat.S_IFREG
            nlink = (node.parent is not None) + self.rows.links(node.id)
        entry = entry or node
        return NodeAttr(node.id, entry.parent if entry.parent is not None else 0, entry.name, bool(node.is_dir),
                        kind | (node.mode & 0o7777), size, mtime_ns, bool(node.staged),
                        None if node.staged else node.digest, nlink, node.atime_ns or mtime_ns, ctime_ns, entry.id)

    def getattr(self, nid: int) -> NodeAttr:
        with self.lock:
            return self.attr_of(self.rows.node(nid))

    def base_ref(self, nid: int) -> BaseRef | None:
        """The base content of an unmodified file (None for staged files and directories)."""
        with self.lock:
            return BaseRef.of(self.rows.node(nid), self.entity)

    # -- handles -------------------------------------------------------------------------
    def _new_handle(self, nid: int, flags: int) -> int:
        with self.lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(nid, flags, _writing(flags))
            self._open[nid] += 1
            return fh

    def handle_node(self, fh: int) -> int:
        with self.lock:
            try:
                return self._handles[fh].node
            except KeyError:
                raise BadHandleError(f"file handle {fh}") from None

    def has_open_files(self) -> bool:
        with self.lock:
            return bool(self._handles)

    def open(self, nid: int, flags: int) -> int:
        """Open a file.  ``O_TRUNC`` with write access truncates without fetching base content."""
        with self.lock:
            node = self.rows.node(nid)
            if node.is_dir:
                raise IsDirectoryError(node.name)
            writing = _writing(flags)
            if writing and node.is_root_name(STATUS_NAME):
                raise ReadOnlyFileError(f"{STATUS_NAME} is read-only")
            if writing and flags & os.O_TRUNC:
                self.truncate(nid, 0)
            if writing and node.is_root_name(COMMIT_NAME):
                self._armed = True
            return self._new_handle(nid, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))

    def flush(self, fh: int) -> None:
        """close(2) of a handle: marks it flushed.  A commit never runs on flush."""
        with self.lock:
            h = self._handles.get(fh)
            if h is None:
                raise BadHandleError(f"file handle {fh}")
            h.dirty = False

    def release(self, fh: int) -> None:
        """Drop a handle; the last release of a still-armed sentinel requests a commit."""
        request = False
        with self.lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return
            self._open[h.node] -= 1
            last = self._open[h.node] <= 0
            node = self.rows.get(h.node) if last or _writing(h.flags) else None
            if last:
                del self._open[h.node]
                self.data.close_fd(h.node)
                if node is not None and node.parent is None:
                    self._purge(h.node)
                    node = None
                elif node is not None and node.is_root_name(COMMIT_NAME) and self._armed:
                    self._armed, request = False, True
                    self._requests += 1
            if _writing(h.flags) and node is not None and not node.is_root_name(COMMIT_NAME):
                self.last_change = time.monotonic()
        if request:
            try:
                self._request_commit()
            except OSError as exc:  # CommitFailedError too: release has no caller; the status file says why
                log.warning("commit requested on release failed: %s", exc)

    def _purge(self, nid: int) -> None:
        """The last handle of an unlinked file closed: the node and its data go."""
        with self.rows.txn() as c:
            self.rows.delete(c, nid)
        self.data.discard(nid)

    # -- the sentinel ----------------------------------------------------------------------
    def _request_commit(self) -> None:
        """Run the commit requested by the caller (which counted it in ``_requests``)."""
        try:
            if self.on_commit_request is not None:
                self.on_commit_request()
        finally:
            with self.lock:
                self._requests -= 1

    def commit_expected(self) -> bool:
        """A commit is running or waiting, or will run when an armed sentinel's last handle closes."""
        if self._requests > 0:
            return True
        if not self._armed:
            return False
        sentinel = self.rows.child(ROOT_ID, COMMIT_NAME)
        return sentinel is not None and self._open.get(sentinel.id, 0) > 0

    def wait_commits(self, timeout: float) -> bool:
        """Wait (bounded) until no commit is expected; False if one still is at the deadline.
        Never holds the lock while sleeping (the commit it waits for needs it)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.lock.acquire(timeout=left):
                return False
            try:
                if not self.commit_expected():
                    return True
            finally:
                self.lock.release()
            time.sleep(min(0.02, max(left, 0)))

    def open_writers(self) -> list[int]:
        """Nodes (other than the sentinel) with a handle open for writing that was written (or
        opened) since its last flush: close(2) flushes, so these are files still being written.
        A flushed handle only waits for its (asynchronous) release and does not count."""
        with self.lock:
            nodes = {h.node for h in self._handles.values() if h.dirty}
            found = [(n, self.rows.get(n)) for n in nodes]
            return sorted(n for n, node in found if node is not None and not node.is_root_name(COMMIT_NAME))

    def read_control(self, name: str) -> bytes:
        """Content of a control file at the root (empty if absent)."""
        with self.lock:
            node = self.rows.child(ROOT_ID, name)
            return self.data.read_all(node.id) if node is not None and node.staged else b""

    def write_status(self, data: bytes) -> None:
        """Replace the read-only status file atomically (engine only)."""
        with self.lock:
            node = self.rows.child(ROOT_ID, STATUS_NAME)
            if node is None:
                with self.rows.txn() as c:
                    nid = self.rows.insert(c, ROOT_ID, STATUS_NAME, mode=0o444, mtime_ns=time.time_ns(), staged=True)
            else:
                nid = node.id
            self.data.replace(nid, data)

    # -- data ------------------------------------------------------------------------------
    def read(self, fh: int, off: int, size: int) -> bytes:
        with self.lock:
            nid = self.handle_node(fh)
            node = self.rows.node(nid)
            if node.staged:
                return self.data.read(nid, off, size)
            ref = BaseRef.of(node, self.entity)
        if ref is None or off >= ref.size:
            return b""
        return self.data.read_base(self.data.fetch_base(ref), off, size)  # outside the lock: may download

    def write(self, fh: int, off: int, data: bytes | memoryview) -> int:
        with self.lock:
            h = self._handles.get(fh)
            if h is None:
                raise BadHandleError(f"file handle {fh}")
            if not _writing(h.flags):
                raise BadHandleError("handle not open for writing")
            node = self.rows.node(h.node)
            if h.flags & os.O_APPEND:
                off = self.attr_of(node).size
            if not node.staged:
                self._copy_up(node, covers_all=(off == 0 and len(data) >= node.size))
            self.rows.forget_digest(node.id)
            h.dirty = True
            return self._write_staged(node, off, data)

    def _write_staged(self, node: Node, off: int, data: bytes | memoryview) -> int:
        n = self.data.write(node.id, off, data)
        if node.is_root_name(COMMIT_NAME):
            self._armed = True
        else:
            self.last_change = time.monotonic()
        return n

    def _copy_up(self, node: Node, *, covers_all: bool) -> None:
        """Turn a base file into a staged one.  Fetches the base only if bytes must survive."""
        self.data.copy_up(node.id, BaseRef.of(node, self.entity), node.mtime_ns, covers_all=covers_all)
        self.rows.set_staged(node.id)

    def truncate(self, nid: int, size: int) -> None:
        if size < 0:
            raise InvalidArgumentError("negative size")
        with self.lock:
            node = self.rows.node(nid)
            if node.is_dir:
                raise IsDirectoryError(node.name)
            if node.is_root_name(STATUS_NAME):
                raise NotPermittedError(f"{STATUS_NAME} is read-only")
            if not node.staged:
                if size == node.size:
                    return
                self._copy_up(node, covers_all=(size == 0))
            self.rows.forget_digest(nid)
            self.data.truncate(nid, size)
            if node.is_root_name(COMMIT_NAME):
                self._armed = True

    def fsync(self, nid: int, datasync: bool = False) -> None:
        """Data (if staged), the directory entry of a new data file, and the metadata db."""
        with self.lock:
            if self.rows.node(nid).staged:
                self.data.fsync(nid, datasync)
            self.rows.sync()

    # -- the event loop's fast paths --------------------------------------------------------
    # The mount calls these on its event loop; each answers None/False *without changing
    # anything* when the call could wait (the lock is held: a commit is running) or needs
    # more than local work (a copy-up that may fetch, a metadata transaction, a commit
    # request).  The caller then makes the ordinary call in a worker thread.
    def write_nowait(self, fh: int, off: int, data: bytes | memoryview) -> int | None:
        """A write into an already staged file (what ``cp`` into a draft sends), or None."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            h = self._handles.get(fh)
            if h is None or not _writing(h.flags) or h.node in self.rows.hashed:
                return None
            node = self.rows.node(h.node)
            if not node.staged:
                return None
            h.dirty = True
            if h.flags & os.O_APPEND:
                off = self.attr_of(node).size
            return self._write_staged(node, off, data)
        finally:
            self.lock.release()

    def flush_nowait(self, fh: int) -> bool:
        """flush() when it has nothing to do (not a sentinel that would commit); else False."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            h = self._handles.get(fh)
            if h is None:
                return False
            h.dirty = False
            return True
        finally:
            self.lock.release()

    def release_nowait(self, fh: int) -> bool:
        """release() of a handle that is neither the last one of an unlinked file (its purge
        is a transaction) nor an armed sentinel (a commit request); else False."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            h = self._handles.get(fh)
            if h is None:
                return True
            if self._open[h.node] <= 1:
                node = self.rows.get(h.node)
                if node is not None and (node.parent is None or node.is_root_name(COMMIT_NAME)):
                    return False
            self.release(fh)  # reentrant lock; nothing in it waits now
            return True
        finally:
            self.lock.release()
