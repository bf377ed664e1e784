"""One draft's tree: a crash-safe SQLite table of nodes plus staged data files.  No FUSE, no store.

Layout of a draft directory (``<staging_root>/<draft id>/``)::

    draft.db            SQLite (WAL): meta (identity, base version, last result), nodes, hidden
    data/<node id>      staged content of a node (new or modified file); absent for base files
    data/<id>.copyup    a copy-up in progress (renamed to data/<id> when complete)
    commit-intent.json  present only while a commit is between "manifest built" and "rebased"

Why this shape:

* Nodes are keyed by id with ``(parent, name)`` unique, not by full path, so renaming a
  directory of a million files is one row update; the full paths are only built (by a
  recursive query, already in path order) when a commit writes the manifest.
* Base files are rows carrying the base entry's digest: creating a draft from a version copies
  nothing but manifest rows.  Their bytes come from the shared cache through the injected
  ``fetch_base`` callback, and only when a read or a partial overwrite needs them.
* A staged file's data file is the truth for its size and mtime (``utimens`` is applied to it
  too), so writes never touch the database and a restarted process sees exactly the bytes that
  reached the data file; what the application fsynced is therefore there after ``kill -9``.
* Every metadata operation is one SQLite transaction, committed before the call returns
  (``synchronous=NORMAL`` in WAL: survives the death of the process; ``fsync``/``fsyncdir`` and
  commits force a full sync, so they also survive power loss).  ``sync_metadata=True`` syncs
  every transaction.
* A row is a directory entry.  A hard link is a row naming another node (``link_to``): every
  lookup follows it, so both names give one inode, and unlinking the node's own name hands that
  name over to a further one.  A symbolic link is a base-like row of type ``S_IFLNK`` whose
  target is kept as its entry's ``extra.symlink`` (its digest is the md5 of the target).
  Times: atime/ctime columns (NULL: mtime, for drafts made before they existed); a staged
  file's ctime is at least its data file's, so writes move it without a transaction.
* Hash while writing: a staged file written strictly sequentially from offset 0 (or copied up
  and then appended to) keeps a running md5, so committing it does not read it again.  Any
  other write pattern drops the running hash; the commit re-hashes that file.

Threading: the FUSE daemon calls in from worker threads; one re-entrant lock per draft guards
the connection, the handle tables and the running hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.errors import NotFoundError
from client.hashing import hex_to_b64
from client.manifest import SYMLINK_KEY, symlink_target

from ..errors import (BadHandleError, BaseUnavailableError, ExistsError, InvalidArgumentError,
                      IsDirectoryError, NameTooLongError, NotDirectoryError, NotEmptyError, NotPermittedError,
                      ReadOnlyFileError)

log = logging.getLogger(__name__)

ROOT_ID = 1
COMMIT_NAME = ".commit"  #: the sentinel: touch (or write options JSON into) it to commit
STATUS_NAME = ".commit.status"  #: read-only JSON written by the engine after every commit attempt
CONTROL_NAMES = frozenset({COMMIT_NAME, STATUS_NAME})
NAME_MAX = 255
_CHUNK = 1 << 20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id       INTEGER PRIMARY KEY,
    parent   INTEGER,            -- NULL: unlinked while open (purged on last release / restart)
    name     TEXT    NOT NULL,
    is_dir   INTEGER NOT NULL,
    mode     INTEGER NOT NULL,   -- permission bits (S_IFLNK | 0777 for a symbolic link)
    size     INTEGER NOT NULL,   -- base files; staged files: refreshed from data/<id>
    mtime_ns INTEGER NOT NULL,   -- idem
    staged   INTEGER NOT NULL DEFAULT 0,
    digest   TEXT,               -- base64 md5: base content, or staged content as last hashed
    entry    TEXT,               -- JSON of a base entry's other fields (ref, extra, birthArtifactID);
                                 -- a symbolic link's target is its extra.symlink
    atime_ns INTEGER,            -- NULL: mtime_ns
    ctime_ns INTEGER,            -- NULL: mtime_ns; staged files: at least their data file's ctime
    link_to  INTEGER             -- a further name (hard link) of node link_to; other columns unused
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_name ON nodes(parent, name);
CREATE TABLE IF NOT EXISTS hidden (path TEXT PRIMARY KEY, digest TEXT NOT NULL, entry TEXT);
"""
#: columns drafts made before links and times were kept lack (added in place when opened)
_ADDED_COLUMNS = ("atime_ns INTEGER", "ctime_ns INTEGER", "link_to INTEGER")
_INDEXES = """
CREATE INDEX IF NOT EXISTS nodes_links ON nodes(link_to) WHERE link_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS nodes_subdirs ON nodes(parent) WHERE is_dir = 1;
"""
#: a row as the tree reads it; positions are used as row[i] below
_COLS = "id, parent, name, is_dir, mode, size, mtime_ns, staged, digest, atime_ns, ctime_ns, link_to, entry"


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


@dataclass(frozen=True, slots=True)
class BaseRef:
    """A base file's content, as the fetch callbacks need it."""

    entity: str
    md5: str  #: hex
    size: int
    path: str  #: path inside the draft (for messages)


@dataclass(slots=True)
class _Handle:
    node: int
    flags: int
    #: opened for writing or written since its last flush: close(2) (which flushes) has not
    #: happened yet, so more data may come; a flushed handle waits only for its release
    dirty: bool = False


class _SeqHash:
    """Running md5 of a staged file that has only been written sequentially from offset 0."""

    __slots__ = ("md5", "pos")

    def __init__(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.pos = 0


def _rowid(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just made (sqlite3 types it Optional: None only without one)."""
    assert cur.lastrowid is not None
    return cur.lastrowid


def row_is_file(tree: "DraftTree", nid: int) -> bool:
    """Whether ``nid`` is a node other than the sentinel (False once it is gone)."""
    row = tree.db.execute("SELECT parent, name FROM nodes WHERE id = ?", (nid,)).fetchone()
    return row is not None and not (row[0] == ROOT_ID and row[1] == COMMIT_NAME)


def entry_mode(entry: Any) -> int:
    """The mode a base entry's node gets: a symbolic link, an executable or a plain file."""
    if entry.symlink_target is not None:
        return stat.S_IFLNK | 0o777
    return 0o755 if entry.is_executable else 0o644


def check_name(name: str) -> str:
    """A name usable in a draft directory (becomes one segment of a manifest path)."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise InvalidArgumentError(f"invalid file name {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise NameTooLongError(f"{name[:40]!r}…")
    return name


class DraftTree:
    """The nodes and staged data of one draft; POSIX-like operations raising :mod:`mountfs.errors`.

    ``fetch_base(ref) -> Path`` must return a local file holding the base content (normally the
    cache object); it is called only for a read of a base file or a partial overwrite of one.
    """

    def __init__(self, root: Path, fetch_base: Callable[[BaseRef], Path], *, entity: str,
                 sync_metadata: bool = False) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.entity = entity
        self.fetch_base = fetch_base
        #: called (outside the lock) when the sentinel asks for a commit; set by the manager
        self.on_commit_request: Callable[[], None] | None = None
        self.lock = threading.RLock()
        self._sync_pragma = "FULL" if sync_metadata else "NORMAL"
        self.db = sqlite3.connect(root / "draft.db", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={self._sync_pragma}")
        self.db.executescript(_SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(nodes)")}
        for column in _ADDED_COLUMNS:
            if column.split()[0] not in have:
                self.db.execute(f"ALTER TABLE nodes ADD COLUMN {column}")
        self.db.executescript(_INDEXES)
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._open: Counter[int] = Counter()
        self._fds: dict[int, int] = {}
        self._seq: dict[int, _SeqHash] = {}
        self._hashed: set[int] = {r[0] for r in self.db.execute(
            "SELECT id FROM nodes WHERE staged = 1 AND digest IS NOT NULL")}
        self._armed = False  #: the sentinel was created/written/touched since the last request
        self._requests = 0  #: commit requests made and not finished yet
        #: monotonic time of the last change to a file or directory other than the sentinel
        self.last_change = 0.0
        self._dir_synced: set[int] = set()

    # -- plumbing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """One durable metadata transaction (BEGIN IMMEDIATE ... COMMIT)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def sync_db(self) -> None:
        """Make every committed transaction survive power loss (WAL fsync)."""
        with self.lock:
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                with self.txn() as c:
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('synced_at', ?)", (json.dumps(time.time()),))
            finally:
                self.db.execute(f"PRAGMA synchronous={self._sync_pragma}")

    def meta(self, key: str, default: Any = None) -> Any:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.txn() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def data_path(self, node: int) -> Path:
        return self.data_dir / str(node)

    def close(self) -> None:
        with self.lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self.db.close()

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> None:
        """After a crash: drop orphans and stray files, make every staged row's data file exist."""
        self.data_dir.mkdir(exist_ok=True)
        with self.txn() as c:
            for (nid,) in c.execute("SELECT id FROM nodes WHERE parent IS NULL").fetchall():
                c.execute("DELETE FROM nodes WHERE id = ?", (nid,))
            staged = dict(c.execute("SELECT id, digest FROM nodes WHERE staged = 1").fetchall())
        for entry in os.scandir(self.data_dir):
            stem = entry.name.split(".", 1)[0]
            if not stem.isdigit() or int(stem) not in staged or entry.name != stem:
                os.unlink(entry.path)
        interrupted_rebase = (self.root / "commit-intent.json").exists()
        for nid, digest in staged.items():
            p = self.data_path(nid)
            if not p.exists():
                if interrupted_rebase and digest is not None:
                    continue  # already moved into the cache; resolve_intent finishes the rebase
                p.touch()
                with self.txn() as c:
                    c.execute("UPDATE nodes SET digest = NULL WHERE id = ?", (nid,))
        self._hashed = {r[0] for r in self.db.execute("SELECT id FROM nodes WHERE staged = 1 AND digest IS NOT NULL")}

    # -- reading the tree ------------------------------------------------------------------
    def _row(self, nid: int) -> tuple:
        row = self.db.execute(f"SELECT {_COLS} FROM nodes WHERE id = ?", (nid,)).fetchone()
        if row is None:
            raise NotFoundError(f"node {nid} is gone")
        return row

    def _target(self, row: tuple) -> tuple:
        """The node a directory entry names: itself, or for a hard link the linked node."""
        return row if row[11] is None else self._row(row[11])

    def _attr(self, row: tuple, entry: tuple | None = None) -> NodeAttr:
        """Attributes of node ``row``, seen through directory entry ``entry`` (default: its own)."""
        nid, parent, name, is_dir, mode, size, mtime_ns, staged, digest, atime_ns, ctime_ns = row[:11]
        ctime_ns = ctime_ns or mtime_ns
        if staged:
            try:
                st = os.stat(self.data_path(nid))
                size, mtime_ns, ctime_ns = st.st_size, st.st_mtime_ns, max(ctime_ns, st.st_ctime_ns)
            except FileNotFoundError:
                size = 0
        if is_dir:
            kind = stat.S_IFDIR
            nlink = 2 + self.db.execute("SELECT count(*) FROM nodes WHERE parent = ? AND is_dir = 1",
                                        (nid,)).fetchone()[0]
        else:
            kind = stat.S_IFLNK if stat.S_ISLNK(mode) else stat.S_IFREG
            nlink = (parent is not None) + self.db.execute("SELECT count(*) FROM nodes WHERE link_to = ?",
                                                           (nid,)).fetchone()[0]
        entry = entry or row
        return NodeAttr(nid, entry[1] if entry[1] is not None else 0, entry[2], bool(is_dir), kind | (mode & 0o7777),
                        size, mtime_ns, bool(staged), None if staged else digest, nlink, atime_ns or mtime_ns,
                        ctime_ns, entry[0])

    def getattr(self, nid: int) -> NodeAttr:
        with self.lock:
            return self._attr(self._row(nid))

    def _child(self, parent: int | None, name: str) -> tuple | None:
        """The directory entry ``name`` of ``parent`` (a hard link's own row, see :meth:`_target`)."""
        return self.db.execute(f"SELECT {_COLS} FROM nodes WHERE parent = ? AND name = ?", (parent, name)).fetchone()

    def _dir(self, nid: int) -> tuple:
        row = self._row(nid)
        if not row[3]:
            raise NotDirectoryError(f"node {nid} is not a directory")
        return row

    def lookup(self, parent: int, name: str) -> NodeAttr:
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise NameTooLongError(f"{name[:40]!r}…")
        with self.lock:
            self._dir(parent)
            row = self._child(parent, name)
            if row is None:
                raise NotFoundError(name)
            return self._attr(self._target(row), row)

    def readdir(self, parent: int, after: int = 0, limit: int = 256) -> list[NodeAttr]:
        """One page of a directory in entry order; pass the last ``row`` returned as ``after``."""
        with self.lock:
            self._dir(parent)
            rows = self.db.execute(f"SELECT {_COLS} FROM nodes WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
                                   (parent, after, limit)).fetchall()
            return [self._attr(self._target(r), r) for r in rows]

    def readlink(self, nid: int) -> str:
        """The target of a symbolic link (EINVAL for anything else)."""
        with self.lock:
            row = self._row(nid)
        if not stat.S_ISLNK(row[4]):
            raise InvalidArgumentError(f"{row[2]} is not a symbolic link")
        target = symlink_target(json.loads(row[12] or "{}").get("extra"))
        if target is None:
            raise BaseUnavailableError(f"symbolic link {row[2]} has no target")
        return target

    def has_open_files(self) -> bool:
        with self.lock:
            return bool(self._handles)

    def is_empty(self, nid: int, *, ignore_control: bool = False) -> bool:
        with self.lock:
            names = [r[0] for r in self.db.execute("SELECT name FROM nodes WHERE parent = ? LIMIT 3", (nid,))]
        if ignore_control and nid == ROOT_ID:
            names = [n for n in names if n not in CONTROL_NAMES]
        return not names

    def base_ref(self, nid: int) -> BaseRef | None:
        """The base content of an unmodified file (None for staged files and directories)."""
        with self.lock:
            return self._base_ref(self._row(nid))

    def _base_ref(self, row: tuple) -> BaseRef | None:
        nid, _, name, is_dir, mode, size, _, staged, digest = row[:9]
        if is_dir or staged or digest is None or stat.S_ISLNK(mode):
            return None
        from client.hashing import b64_to_hex

        return BaseRef(self.entity, b64_to_hex(digest), size, name)

    # -- creating ---------------------------------------------------------------------------
    def _check_new(self, parent: int, name: str) -> None:
        check_name(name)
        self._dir(parent)
        if self._child(parent, name) is not None:
            raise ExistsError(name)

    def _touch_dir(self, c: sqlite3.Connection, nid: int) -> None:
        self.last_change = time.monotonic()
        now = time.time_ns()
        c.execute("UPDATE nodes SET mtime_ns = ?, ctime_ns = ? WHERE id = ?", (now, now, nid))

    def mkdir(self, parent: int, name: str, mode: int = 0o755) -> NodeAttr:
        with self.txn() as c:
            self._check_new(parent, name)
            cur = c.execute("INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns) VALUES (?, ?, 1, ?, 0, ?)",
                            (parent, name, mode & 0o7777, time.time_ns()))
            self._touch_dir(c, parent)
            nid = _rowid(cur)
        return self.getattr(nid)

    def create(self, parent: int, name: str, mode: int = 0o644, flags: int = os.O_RDWR) -> tuple[NodeAttr, int]:
        """Create an empty file and open it (EEXIST if the name exists).  Returns (attr, fh)."""
        if parent == ROOT_ID and name == STATUS_NAME:
            raise NotPermittedError(f"{STATUS_NAME} is written by artifactfs")
        with self.txn() as c:
            self._check_new(parent, name)
            cur = c.execute("INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns, staged) "
                            "VALUES (?, ?, 0, ?, 0, ?, 1)", (parent, name, mode & 0o7777, time.time_ns()))
            nid = _rowid(cur)
            self._touch_dir(c, parent)
            # Created inside the transaction: if the file cannot be made, the row is rolled back.
            fd = os.open(self.data_path(nid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._fds[nid] = fd
            born = os.fstat(fd).st_mtime_ns  # the data file's clock: atime = mtime = ctime at creation
            c.execute("UPDATE nodes SET mtime_ns = ?, atime_ns = ?, ctime_ns = ? WHERE id = ?", (born, born, born, nid))
        self._seq[nid] = _SeqHash()
        self._arm_if_sentinel(parent, name)
        return self.getattr(nid), self._new_handle(nid, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))

    def _arm_if_sentinel(self, parent: int, name: str) -> None:
        if parent == ROOT_ID and name == COMMIT_NAME:
            self._armed = True

    def _is_sentinel(self, nid: int) -> bool:
        row = self._row(nid)
        return row[1] == ROOT_ID and row[2] == COMMIT_NAME

    # -- handles -------------------------------------------------------------------------
    def _new_handle(self, nid: int, flags: int) -> int:
        with self.lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(nid, flags, (flags & os.O_ACCMODE) != os.O_RDONLY)
            self._open[nid] += 1
            return fh

    def handle_node(self, fh: int) -> int:
        with self.lock:
            try:
                return self._handles[fh].node
            except KeyError:
                raise BadHandleError(f"file handle {fh}") from None

    def open(self, nid: int, flags: int) -> int:
        """Open a file.  ``O_TRUNC`` with write access truncates without fetching base content."""
        with self.lock:
            row = self._row(nid)
            if row[3]:
                raise IsDirectoryError(row[2])
            writing = (flags & os.O_ACCMODE) != os.O_RDONLY
            if writing and row[1] == ROOT_ID and row[2] == STATUS_NAME:
                raise ReadOnlyFileError(f"{STATUS_NAME} is read-only")
            if writing and flags & os.O_TRUNC:
                self.truncate(nid, 0)
            if writing and self._is_sentinel(nid):
                self._armed = True
            return self._new_handle(nid, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))

    def flush(self, fh: int) -> None:
        """close(2) of a handle: marks it flushed.  A commit never runs on flush: a shell's
        ``echo … > .commit`` flushes a duplicate descriptor before it writes the JSON."""
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
            if self._open[h.node] <= 0:
                del self._open[h.node]
                fd = self._fds.pop(h.node, None)
                if fd is not None:
                    os.close(fd)
                row = self.db.execute("SELECT parent, name FROM nodes WHERE id = ?", (h.node,)).fetchone()
                if row is not None and row[0] is None:
                    self._purge(h.node)
                elif row is not None and row[0] == ROOT_ID and row[1] == COMMIT_NAME and self._armed:
                    self._armed, request = False, True
                    self._requests += 1
            if (h.flags & os.O_ACCMODE) != os.O_RDONLY and row_is_file(self, h.node):
                self.last_change = time.monotonic()
        if request:
            try:
                self._request_commit()
            except OSError as exc:  # CommitFailedError too: release has no caller; the status file says why
                log.warning("commit requested on release failed: %s", exc)

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
        row = self._child(ROOT_ID, COMMIT_NAME)
        return row is not None and self._open.get(row[0], 0) > 0

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
            return sorted(n for n in nodes if row_is_file(self, n))

    def path_of(self, nid: int) -> str:
        """The path of a node inside the draft (for messages)."""
        parts: list[str] = []
        with self.lock:
            while nid not in (ROOT_ID, 0):
                r = self.db.execute("SELECT parent, name FROM nodes WHERE id = ?", (nid,)).fetchone()
                if r is None:
                    break
                parts.append(r[1])
                nid = r[0] if r[0] is not None else 0
        return "/".join(reversed(parts))

    def _fd(self, nid: int) -> int:
        fd = self._fds.get(nid)
        if fd is None:
            fd = os.open(self.data_path(nid), os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[nid] = fd
        return fd

    def _forget_fd(self, nid: int) -> None:
        fd = self._fds.pop(nid, None)
        if fd is not None:
            os.close(fd)

    # -- data ------------------------------------------------------------------------------
    def read(self, fh: int, off: int, size: int) -> bytes:
        with self.lock:
            nid = self.handle_node(fh)
            row = self._row(nid)
            if row[7]:
                return os.pread(self._fd(nid), size, off)
            ref = self._base_ref(row)
        if ref is None or off >= ref.size:
            return b""
        path = self.fetch_base(ref)  # outside the lock: may download
        with open(path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, off)

    def write(self, fh: int, off: int, data: bytes | memoryview) -> int:
        with self.lock:
            h = self._handles.get(fh)
            if h is None:
                raise BadHandleError(f"file handle {fh}")
            if (h.flags & os.O_ACCMODE) == os.O_RDONLY:
                raise BadHandleError("handle not open for writing")
            nid = h.node
            row = self._row(nid)
            if h.flags & os.O_APPEND:
                off = self._attr(row).size
            if not row[7]:
                self._copy_up(row, covers_all=(off == 0 and len(data) >= row[5]))
            self._changed(nid)
            h.dirty = True
            return self._write_staged(nid, row, off, data)

    def _write_staged(self, nid: int, row: tuple, off: int, data: bytes | memoryview) -> int:
        n = os.pwrite(self._fd(nid), data, off)
        seq = self._seq.get(nid)
        if seq is not None:
            if off == seq.pos:
                seq.md5.update(memoryview(data)[:n])
                seq.pos += n
            else:
                del self._seq[nid]
        if row[1] == ROOT_ID and row[2] == COMMIT_NAME:
            self._armed = True
        else:
            self.last_change = time.monotonic()
        return n

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
            if h is None or (h.flags & os.O_ACCMODE) == os.O_RDONLY or h.node in self._hashed:
                return None
            row = self._row(h.node)
            if not row[7]:
                return None
            h.dirty = True
            if h.flags & os.O_APPEND:
                off = self._attr(row).size
            return self._write_staged(h.node, row, off, data)
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
                row = self.db.execute("SELECT parent, name FROM nodes WHERE id = ?", (h.node,)).fetchone()
                if row is not None and (row[0] is None or (row[0] == ROOT_ID and row[1] == COMMIT_NAME)):
                    return False
            self.release(fh)  # reentrant lock; nothing in it waits now
            return True
        finally:
            self.lock.release()

    def _changed(self, nid: int) -> None:
        """Forget a staged file's last known digest (first write after a commit attempt)."""
        if nid in self._hashed:
            self._hashed.discard(nid)
            with self.txn() as c:
                c.execute("UPDATE nodes SET digest = NULL WHERE id = ?", (nid,))

    def _copy_up(self, row: tuple, *, covers_all: bool) -> None:
        """Turn a base file into a staged one.  Fetches the base only if bytes must survive."""
        nid = row[0]
        tmp = self.data_dir / f"{nid}.copyup"
        seq = _SeqHash()
        ref = self._base_ref(row)
        if covers_all or ref is None or ref.size == 0:
            open(tmp, "wb").close()
        else:
            src = self.fetch_base(ref)
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
                while n := fin.readinto(buf):
                    fout.write(view[:n])
                    seq.md5.update(view[:n])
                    seq.pos += n
            if seq.pos != ref.size:
                os.unlink(tmp)
                raise BaseUnavailableError(f"base content of {ref.path} has {seq.pos} bytes, expected {ref.size}")
        os.utime(tmp, ns=(row[6], row[6]))
        os.replace(tmp, self.data_path(nid))
        with self.txn() as c:
            c.execute("UPDATE nodes SET staged = 1, digest = NULL, entry = NULL WHERE id = ?", (nid,))
        self._forget_fd(nid)
        self._seq[nid] = seq

    def truncate(self, nid: int, size: int) -> None:
        if size < 0:
            raise InvalidArgumentError("negative size")
        with self.lock:
            row = self._row(nid)
            if row[3]:
                raise IsDirectoryError(row[2])
            if row[1] == ROOT_ID and row[2] == STATUS_NAME:
                raise NotPermittedError(f"{STATUS_NAME} is read-only")
            if not row[7]:
                if size == row[5]:
                    return
                self._copy_up(row, covers_all=(size == 0))
            self._changed(nid)
            os.truncate(self.data_path(nid), size)
            seq = self._seq.get(nid)
            if size == 0:
                self._seq[nid] = _SeqHash()
            elif seq is not None and seq.pos != size:
                del self._seq[nid]
            if self._is_sentinel(nid):
                self._armed = True

    def fsync(self, nid: int, datasync: bool = False) -> None:
        """Data (if staged), the directory entry of a new data file, and the metadata db."""
        with self.lock:
            row = self._row(nid)
            if row[7]:
                fd = self._fd(nid)
                (os.fdatasync if datasync else os.fsync)(fd)
                if nid not in self._dir_synced:
                    dfd = os.open(self.data_dir, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                    self._dir_synced.add(nid)
            self.sync_db()

    def running_digest(self, nid: int, size: int) -> str | None:
        """md5 hex from the running hash when it covers exactly the file's ``size`` bytes."""
        with self.lock:
            seq = self._seq.get(nid)
            return seq.md5.hexdigest() if seq is not None and seq.pos == size else None

    # -- attributes ----------------------------------------------------------------------
    def setattr(self, nid: int, *, size: int | None = None, mode: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None, chown: bool = False) -> NodeAttr:
        """truncate / chmod (the execute bit is committed) / utimens / chown (accepted, not kept:
        a manifest has no owners).  Every change sets ctime."""
        request = False
        with self.lock:
            row = self._row(nid)
            if row[1] == ROOT_ID and row[2] == STATUS_NAME and (size, mode, atime_ns, mtime_ns) != (None,) * 4:
                raise NotPermittedError(f"{STATUS_NAME} is read-only")
            if size is not None:
                self.truncate(nid, size)
            now = time.time_ns()
            with self.txn() as c:
                if mode is not None:
                    keep = stat.S_IFMT(row[4])  # a symbolic link stays one
                    c.execute("UPDATE nodes SET mode = ? WHERE id = ?", (keep | (mode & 0o7777), nid))
                if atime_ns is not None or mtime_ns is not None:
                    old = self._attr(row)
                    a = atime_ns if atime_ns is not None else old.atime_ns
                    m = mtime_ns if mtime_ns is not None else old.mtime_ns
                    if row[7]:
                        os.utime(self.data_path(nid), ns=(a, m))
                    c.execute("UPDATE nodes SET atime_ns = ?, mtime_ns = ? WHERE id = ?", (a, m, nid))
                c.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (now, nid))
            if (atime_ns is not None or mtime_ns is not None) and self._is_sentinel(nid):
                if self._open[nid] > 0:
                    self._armed = True
                else:
                    request = True
                    self._requests += 1
            attr = self._attr(self._row(nid))
        if request:
            self._request_commit()
        return attr

    # -- removing and renaming ---------------------------------------------------------------
    def _purge(self, nid: int) -> None:
        self._forget_fd(nid)
        self._seq.pop(nid, None)
        self._hashed.discard(nid)
        with self.txn() as c:
            c.execute("DELETE FROM nodes WHERE id = ?", (nid,))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_path(nid))

    def _drop_name(self, c: sqlite3.Connection, row: tuple) -> None:
        """Remove the directory entry ``row`` of a file: a hard link's row goes; the node's own
        name is taken over by one of its further names; a last name goes with the node (or
        orphans it until its last handle closes, POSIX unlink)."""
        now = time.time_ns()
        if row[11] is not None:
            c.execute("DELETE FROM nodes WHERE id = ?", (row[0],))
            c.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (now, row[11]))
            return
        nid = row[0]
        heir = c.execute("SELECT id, parent, name FROM nodes WHERE link_to = ? ORDER BY id LIMIT 1", (nid,)).fetchone()
        if heir is not None:
            c.execute("DELETE FROM nodes WHERE id = ?", (heir[0],))
            c.execute("UPDATE nodes SET parent = ?, name = ?, ctime_ns = ? WHERE id = ?", (heir[1], heir[2], now, nid))
        elif self._open.get(nid, 0) > 0:
            c.execute("UPDATE nodes SET parent = NULL, name = ?, ctime_ns = ? WHERE id = ?",
                      (f"orphan-{nid}", now, nid))
        else:
            c.execute("DELETE FROM nodes WHERE id = ?", (nid,))
            self._forget_fd(nid)
            self._seq.pop(nid, None)
            self._hashed.discard(nid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_path(nid))

    def unlink(self, parent: int, name: str) -> None:
        check_name(name)
        with self.txn() as c:
            self._dir(parent)
            row = self._child(parent, name)
            if row is None:
                raise NotFoundError(name)
            if row[3]:
                raise IsDirectoryError(name)
            self._drop_name(c, row)
            self._touch_dir(c, parent)

    def rmdir(self, parent: int, name: str) -> None:
        check_name(name)
        with self.txn() as c:
            self._dir(parent)
            row = self._child(parent, name)
            if row is None:
                raise NotFoundError(name)
            if not row[3]:
                raise NotDirectoryError(name)
            if c.execute("SELECT 1 FROM nodes WHERE parent = ? LIMIT 1", (row[0],)).fetchone():
                raise NotEmptyError(name)
            c.execute("DELETE FROM nodes WHERE id = ?", (row[0],))
            self._touch_dir(c, parent)

    def _is_ancestor(self, anc: int, nid: int) -> bool:
        while nid not in (ROOT_ID, 0):
            if nid == anc:
                return True
            r = self.db.execute("SELECT parent FROM nodes WHERE id = ?", (nid,)).fetchone()
            if r is None or r[0] is None:
                return False
            nid = r[0]
        return nid == anc

    def rename(self, parent_old: int, name_old: str, parent_new: int, name_new: str, flags: int = 0) -> None:
        """rename(2): files, links and directories; replaces a file or an empty directory."""
        noreplace = getattr(os, "RENAME_NOREPLACE", 1)
        if flags & ~noreplace:
            raise InvalidArgumentError("only RENAME_NOREPLACE is supported")
        check_name(name_old)
        check_name(name_new)
        if STATUS_NAME in ((parent_old == ROOT_ID and name_old) or "", (parent_new == ROOT_ID and name_new) or ""):
            raise NotPermittedError(f"{STATUS_NAME} is managed by artifactfs")
        request = False
        with self.txn() as c:
            self._dir(parent_old)
            self._dir(parent_new)
            src = self._child(parent_old, name_old)
            if src is None:
                raise NotFoundError(name_old)
            if (parent_old, name_old) == (parent_new, name_new):
                return
            if src[3] and self._is_ancestor(src[0], parent_new):
                raise InvalidArgumentError("cannot move a directory into itself")
            if src[11] is not None and parent_new == ROOT_ID and name_new in CONTROL_NAMES:
                raise NotPermittedError(f"a hard link cannot become {name_new}")
            node = self._target(src)
            dst = self._child(parent_new, name_new)
            if dst is not None:
                if flags & noreplace:
                    raise ExistsError(name_new)
                if self._target(dst)[0] == node[0]:
                    return  # two names of one file: POSIX says do nothing
                if src[3] and not dst[3]:
                    raise NotDirectoryError(name_new)
                if not src[3] and dst[3]:
                    raise IsDirectoryError(name_new)
                if dst[3]:
                    if c.execute("SELECT 1 FROM nodes WHERE parent = ? LIMIT 1", (dst[0],)).fetchone():
                        raise NotEmptyError(name_new)
                    c.execute("DELETE FROM nodes WHERE id = ?", (dst[0],))
                else:
                    self._drop_name(c, dst)
            c.execute("UPDATE nodes SET parent = ?, name = ? WHERE id = ?", (parent_new, name_new, src[0]))
            c.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (time.time_ns(), node[0]))
            self._touch_dir(c, parent_old)
            if parent_new != parent_old:
                self._touch_dir(c, parent_new)
            if parent_new == ROOT_ID and name_new == COMMIT_NAME and not src[3]:
                # editors save by renaming a temp file over the target: that is a write of .commit
                request = self._open.get(node[0], 0) == 0
                self._armed = not request
                self._requests += int(request)
        if request:
            self._request_commit()

    # -- links -------------------------------------------------------------------------------
    def link(self, nid: int, parent: int, name: str) -> NodeAttr:
        """link(2): one more name for a file or symbolic link (EPERM for directories and the
        control files; ENOENT for a file already unlinked)."""
        if parent == ROOT_ID and name in CONTROL_NAMES:
            raise NotPermittedError(f"{name} is managed by artifactfs")
        with self.txn() as c:
            row = self._row(nid)
            if row[3]:
                raise NotPermittedError("hard links to directories are not allowed")
            if row[1] == ROOT_ID and row[2] in CONTROL_NAMES:
                raise NotPermittedError(f"{row[2]} is managed by artifactfs")
            if row[1] is None:
                raise NotFoundError("the file was unlinked")
            self._check_new(parent, name)
            c.execute("INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns, link_to) "
                      "VALUES (?, ?, 0, 0, 0, 0, ?)", (parent, name, nid))
            c.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (time.time_ns(), nid))
            self._touch_dir(c, parent)
        return self.lookup(parent, name)

    def symlink(self, parent: int, name: str, target: str) -> NodeAttr:
        """symlink(2).  The target is kept as text (committed in the entry's ``extra``)."""
        if not target:
            raise NotFoundError("an empty symbolic link target")  # what symlink(2) answers
        if "\x00" in target:
            raise InvalidArgumentError("a symbolic link target with NUL")
        if len(target.encode("utf-8", "surrogateescape")) >= 4096:
            raise NameTooLongError("symbolic link target longer than PATH_MAX")
        if parent == ROOT_ID and name in CONTROL_NAMES:
            raise NotPermittedError(f"{name} is managed by artifactfs")
        data = target.encode("utf-8")  # UnicodeError (EILSEQ): a manifest holds UTF-8 text
        digest = hex_to_b64(hashlib.md5(data, usedforsecurity=False).hexdigest())
        with self.txn() as c:
            self._check_new(parent, name)
            cur = c.execute("INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns, digest, entry) "
                            "VALUES (?, ?, 0, ?, ?, ?, ?, ?)",
                            (parent, name, stat.S_IFLNK | 0o777, len(data), time.time_ns(), digest,
                             json.dumps({"extra": {SYMLINK_KEY: target}})))
            assert cur.lastrowid is not None
            nid = cur.lastrowid
            self._touch_dir(c, parent)
        return self.getattr(nid)

    def mknod(self, parent: int, name: str, mode: int) -> NodeAttr:
        """Regular files only (some tools create with mknod); anything else is EPERM."""
        if not stat.S_ISREG(mode):
            raise NotPermittedError("drafts hold regular files, symbolic links and directories only")
        attr, fh = self.create(parent, name, mode)
        self.release(fh)
        return attr

    # -- whole-tree queries (commit) --------------------------------------------------------
    def iter_files(self) -> Iterator[tuple[str, tuple]]:
        """Every committed file (and symbolic link) as (path, row) in manifest (path) order;
        control files excluded.  Each name of a hard-linked file yields the file's row."""
        query = """
        WITH RECURSIVE t(id, path, node) AS (
            SELECT id, name, COALESCE(link_to, id) FROM nodes WHERE parent = 1 AND NOT (is_dir = 0 AND name IN (?, ?))
            UNION ALL
            SELECT n.id, t.path || '/' || n.name, COALESCE(n.link_to, n.id) FROM nodes n JOIN t ON n.parent = t.id
        )
        SELECT t.path, 0 AS hid, n.id, n.parent, n.name, n.is_dir, n.mode, n.size, n.mtime_ns, n.staged,
               n.digest, n.entry
        FROM t JOIN nodes n ON n.id = t.node WHERE n.is_dir = 0
        UNION ALL SELECT path, 1, NULL, NULL, NULL, 0, NULL, NULL, NULL, 0, digest, entry FROM hidden
        ORDER BY 1, 2
        """
        # A hidden base entry whose path the tree now uses again is replaced by the tree's file.
        last = None
        with self.lock:
            cur = self.db.execute(query, (COMMIT_NAME, STATUS_NAME))
            while rows := cur.fetchmany(1024):
                for r in rows:
                    if r[0] != last:
                        last = r[0]
                        yield r[0], r[2:]

    def staged_files(self) -> list[tuple[int, str | None, int, int]]:
        """(id, recorded digest, size and mtime when hashed) of every staged, linked file
        outside the control files."""
        with self.lock:
            return self.db.execute(
                "SELECT id, digest, size, mtime_ns FROM nodes WHERE staged = 1 AND parent IS NOT NULL "
                "AND NOT (parent = 1 AND name IN (?, ?))", (COMMIT_NAME, STATUS_NAME)).fetchall()

    def record_digests(self, rows: list[tuple[int, str, int, int]]) -> None:
        """(node, md5 hex, size, mtime_ns) of staged files just hashed; valid until the node's
        next write.  Size and mtime are kept with the digest because an interrupted rebase may
        already have moved the data file into the cache."""
        with self.txn() as c:
            c.executemany("UPDATE nodes SET digest = ?, size = ?, mtime_ns = ? WHERE id = ? AND staged = 1",
                          [(hex_to_b64(md5), size, mtime, nid) for nid, md5, size, mtime in rows])
            self._hashed.update(r[0] for r in rows)

    def rebase_files(self, rows: list[tuple[int, int, int]]) -> None:
        """Staged files whose data moved into the cache become base files of the new version.

        ``rows``: (node, size, mtime_ns).  Their recorded digest becomes the base digest.
        """
        with self.lock:
            for nid, _, _ in rows:
                self._forget_fd(nid)
                self._seq.pop(nid, None)
                self._hashed.discard(nid)
            with self.txn() as c:
                now = time.time_ns()  # the data file (whose ctime was shown) goes: keep ctime monotonic
                c.executemany("UPDATE nodes SET staged = 0, size = ?, mtime_ns = ?, entry = NULL, ctime_ns = ? "
                              "WHERE id = ?", [(size, mtime_ns, now, nid) for nid, size, mtime_ns in rows])

    def apply_base_entries(self, changes: list[tuple[str, Any]]) -> None:
        """Bring paths to a newer version's entries (a merged commit): ``(path, ManifestEntry)``
        sets a base file (directories made as needed), ``(path, None)`` removes the file.
        Entries that cannot be files (references, a path under a file) go to ``hidden``."""
        now = time.time_ns()
        with self.txn() as c:
            for path, entry in changes:
                c.execute("DELETE FROM hidden WHERE path = ?", (path,))
                *dirs, name = path.split("/")
                parent: int | None = ROOT_ID
                for d in dirs:
                    row = self._child(parent, d)
                    if row is None:
                        parent = None if entry is None else _rowid(c.execute(
                            "INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns) VALUES (?, ?, 1, ?, 0, ?)",
                            (parent, d, 0o755, now)))
                    else:
                        parent = row[0] if row[3] else None
                    if parent is None:
                        break
                row = self._child(parent, name) if parent is not None else None
                if row is not None and not row[3]:
                    self._drop_name(c, row)
                if entry is None:
                    continue
                js = entry.to_json()
                if parent is None or entry.ref is not None or (row is not None and row[3]) \
                        or (parent == ROOT_ID and name in CONTROL_NAMES):
                    c.execute("INSERT OR REPLACE INTO hidden VALUES (?, ?, ?)", (path, entry.digest, json.dumps(js)))
                    continue
                extra = {k: v for k, v in js.items() if k not in ("digest", "size")}
                c.execute("INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns, digest, entry) "
                          "VALUES (?, ?, 0, ?, ?, ?, ?, ?)", (parent, name, entry_mode(entry), entry.size or 0, now,
                                                              entry.digest, json.dumps(extra) if extra else None))

    def read_control(self, name: str) -> bytes:
        """Content of a control file at the root (empty if absent)."""
        with self.lock:
            row = self._child(ROOT_ID, name)
            if row is None or not row[7]:
                return b""
            with contextlib.suppress(FileNotFoundError):
                return self.data_path(row[0]).read_bytes()
            return b""

    def write_status(self, data: bytes) -> None:
        """Replace the read-only status file atomically (engine only)."""
        with self.lock:
            row = self._child(ROOT_ID, STATUS_NAME)
            if row is None:
                with self.txn() as c:
                    cur = c.execute("INSERT INTO nodes (parent, name, is_dir, mode, size, mtime_ns, staged) "
                                    "VALUES (1, ?, 0, ?, 0, ?, 1)", (STATUS_NAME, 0o444, time.time_ns()))
                    nid = _rowid(cur)
            else:
                nid = row[0]
            self._forget_fd(nid)
            tmp = self.data_dir / f"{nid}.status"
            tmp.write_bytes(data)
            os.replace(tmp, self.data_path(nid))
