"""A version's manifest as an on-disk SQLite index, so the mount never holds it as one dict.

Why: a manifest may list millions of files.  The daemon needs three things from it — look up
one name in one directory, list one directory page by page, and know a file's size and md5 —
and all three are index lookups.  The index is built once per manifest (keyed by the
manifest blob's md5, so two versions with the same manifest share it, and a remount reuses it)
and opened read-only afterwards; SQLite's page cache is capped, so daemon memory stays flat
whatever the manifest size.

Layout under the cache root::

    index/ab/cdef....sqlite        one immutable index per manifest md5
    index/tmp/...                  builds in progress (renamed into place when complete)

Schema: one row per file *and* per directory derived from the paths (``a/b/c`` yields the
directories ``a`` and ``a/b``).  ``parent`` is the parent directory's row id, 0 for the version
root.  Row ids are the readdir cookies: ``WHERE parent = ? AND id > ? ORDER BY id`` pages
through a directory of any size in stable order, answered from ``entries_by_parent`` (whose
entries are ordered by ``(parent, id)``) in time proportional to the page, not the directory.
An index built before that index existed is rebuilt on first use (:data:`INDEX_NAMES`).

Building streams the manifest with :func:`client.manifest.iter_entries` when it uses our
one-entry-per-line layout (flat memory).  A manifest in another layout (one written by W&B,
say) needs a full JSON parse; that runs in a short-lived subprocess, so the memory it takes
is returned to the OS when it exits and the daemon's RSS does not grow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from cachetools import LRUCache

from client.atomic import replace_durably
from client.errors import ManifestError
from client.hashing import b64_to_hex
from client.pyexec import python_argv

log = logging.getLogger(__name__)

ROOT_ID = 0
#: SQLite page cache per open index, in KiB (negative = KiB in SQLite's convention).
_CACHE_KIB = 2048
_SCHEMA = """
CREATE TABLE entries (
    id      INTEGER PRIMARY KEY,
    parent  INTEGER NOT NULL,
    name    TEXT    NOT NULL,
    is_dir  INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    md5     TEXT,
    ref     TEXT,
    extra   TEXT,
    subdirs INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX entries_by_name ON entries(parent, name);
CREATE INDEX entries_by_parent ON entries(parent);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class IndexEntry(NamedTuple):
    """One row: a file of the manifest or a directory derived from the paths.

    A named tuple, not a frozen dataclass: a first listing builds one per entry, and a frozen
    dataclass costs about four times as much to construct (one ``object.__setattr__`` a field).
    """

    id: int
    parent: int
    name: str
    is_dir: bool
    size: int
    md5: str | None  #: hex md5 of the content (None for directories)
    ref: str | None  #: external reference URI, if the entry is a reference
    extra: str | None  #: the entry's "extra" object as JSON text
    subdirs: int  #: number of child directories (gives a directory its nlink)


_COLUMNS = "id, parent, name, is_dir, size, md5, ref, extra, subdirs"
#: the SQLite indexes a current index file has; one without all of them is rebuilt
INDEX_NAMES = frozenset({"entries_by_name", "entries_by_parent"})


def _row(r: tuple) -> IndexEntry:
    return IndexEntry(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6], r[7], r[8])


class ManifestIndex:
    """A read-only, thread-safe view of one built index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # immutable=1: the file never changes once renamed into place, so SQLite may skip
        # locking entirely.  One connection shared by threads under a lock: lookups are
        # microseconds, and one connection keeps memory to one page cache.
        self._db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._lock = threading.Lock()
        self.queries = 0  #: SQLite queries answered (tests count what a listing costs)
        meta = dict(self._query("SELECT key, value FROM meta"))
        self.file_count = int(meta.get("file_count", 0))
        self.total_size = int(meta.get("total_size", 0))
        self.root_subdirs = int(meta.get("root_subdirs", 0))
        names = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type = 'index'")}
        #: False for a file built by an older version (a directory page would scan the directory)
        self.current = INDEX_NAMES <= names

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            self.queries += 1
            return self._db.execute(sql, args).fetchall()

    def lookup(self, parent: int, name: str) -> IndexEntry | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE parent = ? AND name = ?", (parent, name))
        return _row(rows[0]) if rows else None

    def get(self, entry_id: int) -> IndexEntry | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,))
        return _row(rows[0]) if rows else None

    def children(self, parent: int, after: int = 0, limit: int = 512) -> list[IndexEntry]:
        """One page of a directory, in row-id order, starting after the row id ``after``."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM entries WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
            (parent, after, limit),
        )
        return [_row(r) for r in rows]

    def resolve_path(self, path: str) -> IndexEntry | None:
        """Entry at a relative path ('' is not an entry: the root has no row)."""
        parent, entry = ROOT_ID, None
        for part in path.strip("/").split("/"):
            entry = self.lookup(parent, part)
            if entry is None:
                return None
            parent = entry.id
        return entry

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- building ----------------------------------------------------------------------------

def _is_line_layout(manifest: Path) -> bool:
    """True when the manifest uses our one-entry-per-line layout (streamable)."""
    with open(manifest, "rb") as f:
        first = f.readline(1 << 16)
    try:
        head = json.loads(first.decode("utf-8") + "}}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(head, dict) and head.get("version") == 1 and head.get("contents") == {}


def _iter_rows(manifest: Path) -> Iterator[_Row]:
    """(path, size, md5 hex, ref, extra JSON) per entry, streamed."""
    from client.manifest import iter_entries

    with open(manifest, "rb") as f:
        for e in iter_entries(f):
            try:
                md5 = b64_to_hex(e.digest)
            except ValueError:
                md5 = None  # references may carry ETags or other non-md5 digests
            extra = json.dumps(e.extra, sort_keys=True) if e.extra else None
            yield e.path, e.size or 0, md5, e.ref, extra


_Row = tuple[str, int, "str | None", "str | None", "str | None"]
#: file rows inserted by one ``executemany`` (one Python call into SQLite per batch, not per file)
_BATCH = 1024


class _Writer:
    """Inserts a manifest's rows into a fresh index in one pass: files in batches, directories
    as they are met, and the totals (files, bytes, child directories) counted on the way, so
    nothing scans the table afterwards.

    Directories are rare (a few per thousand files) and each one needs its row id at once, as
    the parent of the files below it; the pending files are inserted first, so a file and a
    directory at the same path resolve in manifest order, as one insert per row would.
    """

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._cur = cur
        # Directory path -> row id.  Manifests are usually in path order, so a small LRU in
        # front of the table catches nearly every parent lookup.
        self._dirs: LRUCache[str, int] = LRUCache(maxsize=4096)
        self._last: tuple[str, int | None] = ("", ROOT_ID)  #: the previous file's directory and its id
        self._pending: list[tuple[int, str, int, str | None, str | None, str | None]] = []
        self._pending_size = 0
        self.files = self.total_size = self.root_subdirs = 0
        self._recount = False  #: a batch skipped rows: count files and bytes from the table

    def add(self, row: _Row) -> None:
        path, size, md5, ref, extra = row
        head, _, name = path.rpartition("/")
        if head != self._last[0]:  # most files share the previous file's directory
            self._last = (head, self._dir_id(head))
        parent = self._last[1]
        if parent is not None:
            self._pending.append((parent, name, size, md5, ref, extra))
            self._pending_size += size
            if len(self._pending) >= _BATCH:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self._cur.executemany(
            "INSERT OR IGNORE INTO entries(parent, name, is_dir, size, md5, ref, extra) VALUES (?, ?, 0, ?, ?, ?, ?)",
            self._pending,
        )
        skipped = len(self._pending) - self._cur.rowcount
        if skipped:
            log.warning("%d manifest path(s) collide with a directory or repeat a path; skipped", skipped)
            self._recount = True
        self.files += self._cur.rowcount
        self.total_size += self._pending_size
        self._pending, self._pending_size = [], 0

    def finish(self) -> None:
        """Insert what is pending and write the totals to ``meta``."""
        self.flush()
        if self._recount:
            self.files, self.total_size = self._cur.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE is_dir = 0").fetchone()
        self._cur.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("file_count", str(self.files)), ("total_size", str(self.total_size)),
            ("root_subdirs", str(self.root_subdirs))])

    def _dir_id(self, path: str) -> int | None:
        """Row id of directory ``path``, creating it (and its parents) if needed."""
        if not path:
            return ROOT_ID
        hit = self._dirs.get(path)
        if hit is not None:
            return hit
        head, _, name = path.rpartition("/")
        parent = self._dir_id(head)
        if parent is None:
            return None
        self.flush()
        cur = self._cur
        row = cur.execute("SELECT id, is_dir FROM entries WHERE parent = ? AND name = ?", (parent, name)).fetchone()
        if row is None:
            cur.execute("INSERT INTO entries(parent, name, is_dir, size) VALUES (?, ?, 1, 0)", (parent, name))
            ident = cur.lastrowid
            assert ident is not None
            if parent == ROOT_ID:
                self.root_subdirs += 1
            else:
                cur.execute("UPDATE entries SET subdirs = subdirs + 1 WHERE id = ?", (parent,))
        elif row[1]:
            ident = row[0]
        else:
            log.warning("manifest has both a file and a directory at %r; keeping the file", path)
            return None
        self._dirs[path] = ident
        return ident


def _write_index(rows: Iterable[_Row], dest: Path) -> None:
    """Write the index of ``rows`` to ``dest`` (a fresh file), in one transaction."""
    db = sqlite3.connect(dest)
    try:
        db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-8192;" + _SCHEMA)
        writer = _Writer(db.cursor())
        for row in rows:
            writer.add(row)
        writer.finish()
        db.commit()
    finally:
        db.close()


def build_index(manifest: Path, dest: Path, *, tmp_dir: Path | None = None,
                in_subprocess: bool | None = None) -> None:
    """Build the index of the manifest file ``manifest`` at ``dest`` atomically.

    ``in_subprocess=None`` picks: in-process streaming for our line layout, a subprocess for
    anything that needs a full JSON parse.
    """
    if in_subprocess is None:
        in_subprocess = not _is_line_layout(manifest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tmp_dir or dest.parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".building", dir=tmp_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        if in_subprocess:
            proc = subprocess.run(
                python_argv("-m", "mountfs.manifest_index", str(manifest), str(tmp)),
                capture_output=True, text=True, timeout=3600,
            )
            if proc.returncode != 0:
                raise ManifestError(f"indexing manifest {manifest.name} failed: {proc.stderr.strip()[-500:]}")
        else:
            _write_index(_iter_rows(manifest), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        replace_durably(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class IndexStore:
    """Builds indexes on first use and keeps a bounded number of them open.

    ``manifest_file(entity, manifest_md5)`` must return a local path of the complete,
    verified manifest blob (the daemon passes a function that goes through the cache).
    """

    def __init__(self, root: Path, manifest_file: Callable[[str, str], Path], max_open: int = 64) -> None:
        self.root = root
        self._manifest_file = manifest_file
        self._open: LRUCache[str, ManifestIndex] = LRUCache(maxsize=max_open)
        self._lock = threading.Lock()
        self._build_locks: dict[str, threading.Lock] = {}
        self.builds = 0  #: number of indexes built by this process (tests assert "built once")

    def path(self, manifest_md5: str) -> Path:
        return self.root / manifest_md5[:2] / f"{manifest_md5[2:]}.sqlite"

    def peek(self, manifest_md5: str) -> ManifestIndex | None:
        """The index if it is already open (never builds or opens anything)."""
        with self._lock:
            return self._open.get(manifest_md5)

    def get(self, entity: str, manifest_md5: str) -> ManifestIndex:
        with self._lock:
            idx = self._open.get(manifest_md5)
            if idx is not None:
                return idx
            build_lock = self._build_locks.setdefault(manifest_md5, threading.Lock())
        with build_lock:
            with self._lock:
                idx = self._open.get(manifest_md5)
                if idx is not None:
                    return idx
            dest = self.path(manifest_md5)
            idx = self._open_checked(dest) if dest.exists() else None
            if idx is not None and not idx.current:
                log.info("index %s predates the directory-page index: rebuilding it", dest)
                idx.close()
                idx = None
            if idx is None:
                build_index(self._manifest_file(entity, manifest_md5), dest, tmp_dir=self.root / "tmp")
                self.builds += 1
                idx = self._open_checked(dest)
            with self._lock:
                # Evicted indexes are not closed here: a reader may be mid-query.  Their
                # connection is closed by garbage collection once nothing refers to them.
                self._open[manifest_md5] = idx
                self._build_locks.pop(manifest_md5, None)
            return idx

    def _open_checked(self, dest: Path) -> ManifestIndex:
        try:
            return ManifestIndex(dest)
        except sqlite3.DatabaseError as exc:
            # A damaged index file is only a cache: drop it so the next use rebuilds it.
            log.warning("index %s is unreadable (%s): removing it", dest, exc)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise ManifestError(f"manifest index {dest.name} was corrupt and has been removed") from exc


def _subprocess_main(argv: list[str]) -> int:
    """Entry for the out-of-process build: full JSON parse of a non-line manifest."""
    from client.manifest import read_manifest

    manifest, dest = Path(argv[0]), Path(argv[1])
    with open(manifest, encoding="utf-8") as f:
        _, _, entries = read_manifest(f)

    def rows() -> Iterator[tuple[str, int, str | None, str | None, str | None]]:
        for e in entries:
            try:
                md5 = b64_to_hex(e.digest)
            except ValueError:
                md5 = None
            yield e.path, e.size or 0, md5, e.ref, (json.dumps(e.extra, sort_keys=True) if e.extra else None)

    _write_index(rows(), dest)
    return 0


if __name__ == "__main__":
    sys.exit(_subprocess_main(sys.argv[1:]))
