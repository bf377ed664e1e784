"""One draft's SQLite database: the schema, its rows as named types, every statement.  No files.

``draft.db`` (WAL) holds three tables::

    meta     key -> JSON: identity, base version, last result, synced_at
    nodes    one row per directory entry (see _SCHEMA for the columns)
    hidden   base entries that cannot be files of the tree (references, a root ``.commit``,
             a path that is both a file and a directory), committed unchanged

Nodes are keyed by id with ``(parent, name)`` unique, not by full path, so renaming a
directory of a million files is one row update; full paths are only built (by a recursive
query, already in path order) when a commit writes the manifest.  A hard link is a row naming
another node (``link_to``); a symbolic link is a base-like row of type ``S_IFLNK`` whose target
is its entry's ``extra.symlink``.  Every change is one transaction (:meth:`NodeTable.txn`),
committed before the call returns; ``synchronous=NORMAL`` in WAL survives the death of the
process, :meth:`NodeTable.sync` makes everything committed survive power loss.

Callers hold the draft's lock (the one given to :class:`NodeTable`) around every call.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from client.errors import NotFoundError
from client.hashing import b64_to_hex, hex_to_b64

from ..errors import InvalidArgumentError, NameTooLongError

ROOT_ID = 1
COMMIT_NAME = ".commit"  #: the sentinel: touch (or write options JSON into) it to commit
STATUS_NAME = ".commit.status"  #: read-only JSON written by the engine after every commit attempt
CONTROL_NAMES = frozenset({COMMIT_NAME, STATUS_NAME})
NAME_MAX = 255
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
#: the columns of a :class:`Node`, in its field order
_COLS = "id, parent, name, is_dir, mode, size, mtime_ns, staged, digest, atime_ns, ctime_ns, link_to, entry"
_NOT_CONTROL = "NOT (parent = 1 AND name IN (?, ?))"


class Node(NamedTuple):
    """One row of ``nodes``: a directory entry (for a hard link, a row naming the linked node).

    Read by field name only; a NamedTuple because the mount builds one per lookup, getattr and
    directory entry (a fifth of a frozen dataclass's cost)."""

    id: int
    parent: int | None  #: None: unlinked while open
    name: str
    is_dir: int  #: 0 or 1 (SQLite has no booleans)
    mode: int  #: permission bits, with S_IFLNK for a symbolic link
    size: int
    mtime_ns: int
    staged: int  #: 0 or 1: the content lives in ``data/<id>``
    digest: str | None  #: base64 md5
    atime_ns: int | None
    ctime_ns: int | None
    link_to: int | None
    entry: str | None  #: JSON

    @property
    def target(self) -> int:
        """The node this entry names: itself, or for a hard link the linked node."""
        return self.id if self.link_to is None else self.link_to

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_root_name(self, *names: str) -> bool:
        """Whether this is the root's entry of one of ``names`` (``.commit``, ``.commit.status``)."""
        return self.parent == ROOT_ID and self.name in names

    @property
    def extra(self) -> dict[str, Any] | None:
        """The base entry's ``extra`` (a symbolic link's target is its ``symlink``)."""
        return json.loads(self.entry or "{}").get("extra")


_node = Node._make  #: a ``SELECT {_COLS}`` row as a Node


def _one(row: tuple | None) -> Node | None:
    return None if row is None else _node(row)


class CommitFile(NamedTuple):
    """One file of the manifest a commit writes (:meth:`NodeTable.commit_files`)."""

    path: str
    node: int | None  #: None: a hidden base entry, committed as its ``entry`` says
    mode: int
    size: int
    mtime_ns: int
    staged: bool
    digest: str | None  #: base64 md5 (a staged file's as recorded by the commit's hashing)
    entry: str | None  #: JSON: a base entry's other fields, or a hidden entry whole


class StagedFile(NamedTuple):
    """A staged file of the tree and its recorded digest (None: not hashed since its last write)."""

    id: int
    digest: str | None  #: base64 md5
    size: int  #: as recorded with the digest
    mtime_ns: int


class Digest(NamedTuple):
    """A staged file just hashed: what :meth:`NodeTable.record_digests` keeps."""

    id: int
    md5: str  #: hex
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class BaseRef:
    """A base file's content, as the fetch callbacks need it."""

    entity: str
    md5: str  #: hex
    size: int
    path: str  #: path inside the draft (for messages)

    @classmethod
    def of(cls, node: Node, entity: str) -> BaseRef | None:
        """The base content of an unmodified file (None for staged files, directories and links)."""
        if node.is_dir or node.staged or node.digest is None or node.is_symlink:
            return None
        return cls(entity, b64_to_hex(node.digest), node.size, node.name)


def check_name(name: str) -> str:
    """A name usable in a draft directory (becomes one segment of a manifest path)."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise InvalidArgumentError(f"invalid file name {name!r}")
    check_length(name)
    return name


def check_length(name: str) -> None:
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise NameTooLongError(f"{name[:40]!r}…")


def entry_mode(entry: Any) -> int:
    """The mode a base entry's node gets: a symbolic link, an executable or a plain file."""
    if entry.symlink_target is not None:
        return stat.S_IFLNK | 0o777
    return 0o755 if entry.is_executable else 0o644


def _meta(db: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return default
    (value,) = row
    return json.loads(value)


def stored_meta(path: Path, key: str) -> Any:
    """One meta value of a draft database, read without opening it as a draft (None if absent)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return _meta(db, key)


class NodeTable:
    """The database of one draft.  Every read and write of its rows is a method here."""

    def __init__(self, path: Path, lock: threading.RLock, *, sync_metadata: bool = False) -> None:
        self.lock = lock
        self._sync_pragma = "FULL" if sync_metadata else "NORMAL"
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={self._sync_pragma}")
        self.db.executescript(_SCHEMA)
        have = {name for _, name, *_ in self.db.execute("PRAGMA table_info(nodes)")}
        for column in _ADDED_COLUMNS:
            if column.split()[0] not in have:
                self.db.execute(f"ALTER TABLE nodes ADD COLUMN {column}")
        self.db.executescript(_INDEXES)
        #: staged nodes with a recorded digest (``staged = 1 AND digest IS NOT NULL``), kept in
        #: memory so a write knows without a query whether it must forget one
        self.hashed: set[int] = self._hashed()

    def _hashed(self) -> set[int]:
        return {nid for (nid,) in self.db.execute("SELECT id FROM nodes WHERE staged = 1 AND digest IS NOT NULL")}

    # -- plumbing -------------------------------------------------------------------------
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

    def sync(self) -> None:
        """Make every committed transaction survive power loss (WAL fsync)."""
        with self.lock:
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                with self.txn() as c:
                    self.put_meta(c, "synced_at", time.time())
            finally:
                self.db.execute(f"PRAGMA synchronous={self._sync_pragma}")

    def meta(self, key: str, default: Any = None) -> Any:
        with self.lock:
            return _meta(self.db, key, default)

    def set_meta(self, key: str, value: Any) -> None:
        with self.txn() as c:
            self.put_meta(c, key, value)

    def put_meta(self, c: sqlite3.Connection, key: str, value: Any) -> None:
        """``set_meta`` inside a transaction of the caller's."""
        c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- reading -----------------------------------------------------------------------------
    def get(self, nid: int) -> Node | None:
        return _one(self.db.execute(f"SELECT {_COLS} FROM nodes WHERE id = ?", (nid,)).fetchone())

    def node(self, nid: int) -> Node:
        """Row ``nid`` (NotFoundError once it is gone)."""
        node = self.get(nid)
        if node is None:
            raise NotFoundError(f"node {nid} is gone")
        return node

    def target(self, entry: Node) -> Node:
        """The node a directory entry names: itself, or for a hard link the linked node."""
        return entry if entry.link_to is None else self.node(entry.link_to)

    def child(self, parent: int | None, name: str) -> Node | None:
        """The directory entry ``name`` of ``parent`` (a hard link's own row, see :meth:`target`)."""
        return _one(self.db.execute(f"SELECT {_COLS} FROM nodes WHERE parent = ? AND name = ?",
                                    (parent, name)).fetchone())

    def entries(self, parent: int, after: int, limit: int) -> list[Node]:
        """One page of the entries of ``parent`` in row order, after row ``after``."""
        rows = self.db.execute(f"SELECT {_COLS} FROM nodes WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
                               (parent, after, limit)).fetchall()
        return [_node(r) for r in rows]

    def names(self, parent: int, limit: int) -> list[str]:
        return [name for (name,) in self.db.execute("SELECT name FROM nodes WHERE parent = ? LIMIT ?",
                                                    (parent, limit))]

    def has_entries(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM nodes WHERE parent = ? LIMIT 1", (parent,)).fetchone() is not None

    def subdirs(self, nid: int) -> int:
        (count,) = self.db.execute("SELECT count(*) FROM nodes WHERE parent = ? AND is_dir = 1", (nid,)).fetchone()
        return count

    def links(self, nid: int) -> int:
        """How many further names (hard links) node ``nid`` has."""
        (count,) = self.db.execute("SELECT count(*) FROM nodes WHERE link_to = ?", (nid,)).fetchone()
        return count

    def first_link(self, nid: int) -> Node | None:
        """The oldest further name of node ``nid`` (the heir of its own name)."""
        return _one(self.db.execute(f"SELECT {_COLS} FROM nodes WHERE link_to = ? ORDER BY id LIMIT 1",
                                    (nid,)).fetchone())

    def staged_ids(self) -> dict[int, str | None]:
        """Every staged node and its recorded digest."""
        return dict(self.db.execute("SELECT id, digest FROM nodes WHERE staged = 1").fetchall())

    # -- writing (inside :meth:`txn`) ----------------------------------------------------------
    def insert(self, c: sqlite3.Connection, parent: int | None, name: str, *, is_dir: bool = False, mode: int,
               size: int = 0, mtime_ns: int, staged: bool = False, digest: str | None = None,
               entry: str | None = None, link_to: int | None = None, nid: int | None = None) -> int:
        cur = c.execute("INSERT INTO nodes (id, parent, name, is_dir, mode, size, mtime_ns, staged, digest, entry, "
                        "link_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (nid, parent, name, int(is_dir), mode, size, mtime_ns, int(staged), digest, entry, link_to))
        assert cur.lastrowid is not None  # sqlite3 types it Optional: None only without a row
        return cur.lastrowid

    def delete(self, c: sqlite3.Connection, nid: int) -> None:
        c.execute("DELETE FROM nodes WHERE id = ?", (nid,))
        self.hashed.discard(nid)

    def delete_orphans(self, c: sqlite3.Connection) -> None:
        """Rows unlinked while open (a crash or restart closed every handle)."""
        c.execute("DELETE FROM nodes WHERE parent IS NULL")

    def move(self, c: sqlite3.Connection, nid: int, parent: int | None, name: str, ctime_ns: int | None = None) -> None:
        """Give row ``nid`` another directory entry (parent None: unlinked while open)."""
        if ctime_ns is None:
            c.execute("UPDATE nodes SET parent = ?, name = ? WHERE id = ?", (parent, name, nid))
        else:
            c.execute("UPDATE nodes SET parent = ?, name = ?, ctime_ns = ? WHERE id = ?", (parent, name, ctime_ns, nid))

    def set_ctime(self, c: sqlite3.Connection, nid: int, ctime_ns: int) -> None:
        c.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (ctime_ns, nid))

    def set_times(self, c: sqlite3.Connection, nid: int, *, mtime_ns: int, atime_ns: int | None = None,
                  ctime_ns: int | None = None) -> None:
        """mtime and, when given, atime and ctime."""
        c.execute("UPDATE nodes SET mtime_ns = ?, atime_ns = COALESCE(?, atime_ns), ctime_ns = COALESCE(?, ctime_ns) "
                  "WHERE id = ?", (mtime_ns, atime_ns, ctime_ns, nid))

    def set_mode(self, c: sqlite3.Connection, nid: int, mode: int) -> None:
        c.execute("UPDATE nodes SET mode = ? WHERE id = ?", (mode, nid))

    def set_staged(self, nid: int) -> None:
        """A base file copied up: its content now lives in the draft, its digest is unknown."""
        with self.txn() as c:
            c.execute("UPDATE nodes SET staged = 1, digest = NULL, entry = NULL WHERE id = ?", (nid,))
        self.hashed.discard(nid)

    def forget_digest(self, nid: int) -> None:
        """A staged file changed: its recorded digest (if any) is no longer its content's."""
        if nid in self.hashed:
            with self.txn() as c:
                c.execute("UPDATE nodes SET digest = NULL WHERE id = ?", (nid,))
            self.hashed.discard(nid)

    def set_hidden(self, c: sqlite3.Connection, path: str, digest: str, entry_json: dict[str, Any]) -> None:
        c.execute("INSERT OR REPLACE INTO hidden VALUES (?, ?, ?)", (path, digest, json.dumps(entry_json)))

    def drop_hidden(self, c: sqlite3.Connection, path: str) -> None:
        c.execute("DELETE FROM hidden WHERE path = ?", (path,))

    # -- whole-tree queries (commit) ----------------------------------------------------------
    def commit_files(self) -> Iterator[CommitFile]:
        """Every committed file (and symbolic link) in manifest (path) order, control files
        excluded, hidden base entries included.  Each name of a hard-linked file yields the
        file's row; a hidden entry whose path the tree uses again is replaced by the tree's file."""
        query = """
        WITH RECURSIVE t(id, path, node) AS (
            SELECT id, name, COALESCE(link_to, id) FROM nodes WHERE parent = 1 AND NOT (is_dir = 0 AND name IN (?, ?))
            UNION ALL
            SELECT n.id, t.path || '/' || n.name, COALESCE(n.link_to, n.id) FROM nodes n JOIN t ON n.parent = t.id
        )
        SELECT t.path, 0 AS hid, n.id, n.mode, n.size, n.mtime_ns, n.staged, n.digest, n.entry
        FROM t JOIN nodes n ON n.id = t.node WHERE n.is_dir = 0
        UNION ALL SELECT path, 1, NULL, 0, 0, 0, 0, digest, entry FROM hidden
        ORDER BY 1, 2
        """
        last = None
        with self.lock:
            cur = self.db.execute(query, (COMMIT_NAME, STATUS_NAME))
            while rows := cur.fetchmany(1024):
                for path, _, nid, mode, size, mtime_ns, staged, digest, entry in rows:
                    if path != last:
                        last = path
                        yield CommitFile(path, nid, mode, size, mtime_ns, bool(staged), digest, entry)

    def staged_files(self) -> list[StagedFile]:
        """Every staged, linked file outside the control files."""
        with self.lock:
            return [StagedFile(*r) for r in self.db.execute(
                "SELECT id, digest, size, mtime_ns FROM nodes WHERE staged = 1 AND parent IS NOT NULL "
                f"AND {_NOT_CONTROL}", (COMMIT_NAME, STATUS_NAME))]

    def record_digests(self, digests: Iterable[Digest]) -> None:
        """Staged files just hashed; valid until the node's next write.  Size and mtime are kept
        with the digest because an interrupted rebase may already have moved the data file."""
        digests = list(digests)
        with self.txn() as c:
            c.executemany("UPDATE nodes SET digest = ?, size = ?, mtime_ns = ? WHERE id = ? AND staged = 1",
                          [(hex_to_b64(d.md5), d.size, d.mtime_ns, d.id) for d in digests])
            self.hashed.update(d.id for d in digests)

    def set_base(self, c: sqlite3.Connection, nid: int, *, size: int, mtime_ns: int, ctime_ns: int) -> None:
        """A staged file whose data went into the cache becomes a base file (its recorded digest
        becomes the base digest)."""
        c.execute("UPDATE nodes SET staged = 0, size = ?, mtime_ns = ?, entry = NULL, ctime_ns = ? WHERE id = ?",
                  (size, mtime_ns, ctime_ns, nid))
        self.hashed.discard(nid)

    def recovered(self) -> None:
        """After the data files were checked at startup: the recorded digests as the db has them."""
        self.hashed = self._hashed()
