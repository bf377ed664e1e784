"""The cache's size and LRU index: ``<cache>/index.sqlite``, shared by every process.

Why it exists: eviction used to stat every object on each miss (438 ms at 20k objects).  The
index keeps one row per complete object (key, size, LRU stamp) with an index on the stamp,
and a one-row total (entries, bytes) kept by triggers in the same transaction as the row, so
a miss reads the total in O(1) and the oldest objects in O(log n); nothing is rescanned.

Correctness across processes and crashes:

* SQLite (WAL, busy timeout) serialises writers from the SDK and the mount sharing a cache.
* A row is written *before* its object is renamed into place and removed *after* the object
  is unlinked, so a crash leaves at most a row without a file (harmless: eviction deletes
  it when it meets it), never an object the index does not count.
* Objects the index cannot know about (a cache made before the index existed, a power loss
  that dropped the last WAL commits, files copied in by hand) are found by :meth:`rebuild`:
  run once when the index is created, and by ``Cache.prune`` (``artifactfs cache prune``),
  which reconciles the index with the directory.  A hit on an unknown object also adds it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

#: stamps from here on mark *pinned* rows (an object a mount's fast-path tree links, see
#: mountfs/fastpath.py): they sort after every real stamp, ``oldest`` never returns them and
#: ``put`` keeps them, so eviction cannot take an object a tree still serves.
PINNED = 1 << 62

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, size INTEGER NOT NULL, stamp INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS objects_by_stamp ON objects (stamp);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), entries INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS objects_ins AFTER INSERT ON objects BEGIN
  UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS objects_del AFTER DELETE ON objects BEGIN
  UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS objects_upd AFTER UPDATE OF size ON objects BEGIN
  UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0; END;
"""

#: a row for a complete object: its size is set, its stamp too unless the row is pinned
_PUT = ("INSERT INTO objects VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
        " SET size = excluded.size,"
        " stamp = CASE WHEN objects.stamp >= ? THEN objects.stamp ELSE excluded.stamp END")
#: a new LRU stamp for a row that holds the object's size and is not pinned; numbered
#: parameters, so the (key, size, stamp) rows bind as they are
_STAMP = f"UPDATE objects SET stamp = ?3 WHERE key = ?1 AND size = ?2 AND stamp < {PINNED}"


class CacheIndex:
    """Rows (key, size, stamp) of the complete objects; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._ino = 0  #: the inode of the file the connection has open
        #: statements run (tests count them; a miss must not depend on the object count)
        self.queries = 0

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None or self._pid != os.getpid():  # a forked child opens its own
                self._conn, self._pid = self._open(), os.getpid()
                self._ino = os.stat(self.path).st_ino
            self.queries += 1
            yield self._conn

    def _open(self) -> sqlite3.Connection:
        """Connect and create the schema; switching a new file to WAL while another process
        does the same can answer "locked" without waiting, so that step is retried (bounded)."""
        deadline = time.monotonic() + 30.0
        while True:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                return conn
            except sqlite3.OperationalError as exc:
                conn.close()
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def reopen_if_replaced(self) -> bool:
        """Whether the index file was deleted or replaced since this process opened it (rows
        written since went to a file nobody else reads); if so, the next query opens the one
        at the path, made anew if need be."""
        with self._lock:
            if self._conn is None:
                return False
            try:
                if os.stat(self.path).st_ino == self._ino:
                    return False
            except FileNotFoundError:
                pass
            self._conn.close()
            self._conn = None
            return True

    def built(self) -> bool:
        with self._db() as c:
            return c.execute("SELECT 1 FROM meta WHERE name = 'built'").fetchone() is not None

    def rebuild(self, entries: Iterable[tuple[str, int, int]], scan_start_ns: int) -> None:
        """Make the rows match a directory scan begun at ``scan_start_ns``, in one transaction.

        ``entries`` are (key, size, stamp_ns).  Rows written since the scan began are kept even
        if the scan missed their file: another process may be installing that object now.
        """
        with self._db() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("DELETE FROM objects WHERE stamp < ?", (scan_start_ns,))
                c.executemany("INSERT INTO objects VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                              " SET size = excluded.size", entries)
                c.execute("UPDATE totals SET entries = (SELECT COUNT(*) FROM objects),"
                          " bytes = (SELECT COALESCE(SUM(size), 0) FROM objects) WHERE id = 0")
                c.execute("INSERT OR REPLACE INTO meta VALUES ('built', '1')")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def put(self, key: str, size: int, stamp_ns: int) -> None:
        with self._db() as c:
            c.execute(_PUT, (key, size, stamp_ns, PINNED))

    def put_many(self, rows: Iterable[tuple[str, int, int]]) -> None:
        """:meth:`put` of every (key, size, stamp_ns) row, in one transaction (the LRU stamps of
        all the objects one download used: one write, not one per file)."""
        with self._db() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(_PUT, ((key, size, stamp, PINNED) for key, size, stamp in rows))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def stamp_many(self, rows: list[tuple[str, int, int]]) -> None:
        """The LRU stamps of objects just used, (key, size, stamp_ns) rows, in one transaction:
        an UPDATE of each row's stamp alone (not its size, so the totals trigger does not run:
        about half the cost of :meth:`put_many`).  If any row was not updated (missing, pinned,
        or the object's size differs from the row's), every row goes through :meth:`put`'s
        upsert in the same transaction, which adds or corrects it and keeps a pin."""
        with self._db() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                cur = c.executemany(_STAMP, rows)
                if cur.rowcount != len(rows):
                    c.executemany(_PUT, ((key, size, stamp, PINNED) for key, size, stamp in rows))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def pin(self, keys: Iterable[str], stamp_ns: int) -> None:
        """Keep these objects' rows out of eviction (until :meth:`unpin`), in one transaction."""
        with self._db() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("UPDATE objects SET stamp = ? WHERE key = ?", ((PINNED + stamp_ns, k) for k in keys))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def unpin(self, keys: Iterable[str], stamp_ns: int) -> None:
        """Pinned rows among ``keys`` become ordinary ones, last used at ``stamp_ns``."""
        with self._db() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("UPDATE objects SET stamp = ? WHERE key = ? AND stamp >= ?",
                              ((stamp_ns, k, PINNED) for k in keys))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def pinned_bytes(self) -> int:
        """Bytes of the pinned objects (a range of the stamp index: the pinned rows only)."""
        with self._db() as c:
            return int(c.execute("SELECT COALESCE(SUM(size), 0) FROM objects WHERE stamp >= ?",
                                 (PINNED,)).fetchone()[0])

    def has(self, key: str) -> bool:
        with self._db() as c:
            return c.execute("SELECT 1 FROM objects WHERE key = ?", (key,)).fetchone() is not None

    def remove(self, key: str) -> None:
        with self._db() as c:
            c.execute("DELETE FROM objects WHERE key = ?", (key,))

    def totals(self) -> tuple[int, int]:
        """(entries, bytes) of the indexed objects, O(1)."""
        with self._db() as c:
            entries, nbytes = c.execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
            return int(entries), int(nbytes)

    def oldest(self, limit: int, skip: int = 0) -> list[tuple[str, int]]:
        """(key, size) of the ``limit`` least recently used objects after the first ``skip``
        (pinned objects are never among them)."""
        with self._db() as c:
            return c.execute("SELECT key, size FROM objects WHERE stamp < ? ORDER BY stamp, key LIMIT ? OFFSET ?",
                             (PINNED, limit, skip)).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
