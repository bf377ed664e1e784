"""What a commit (and a draft's creation) writes into a draft's tree, beside the POSIX operations.

* :func:`populate`: a new draft's root, identity and base: one row per base entry (streamed
  from the base manifest; nothing is copied), entries that cannot be files go to ``hidden``.
* :func:`rebase_files`: after a commit, staged files whose data moved into the cache become
  base files of the new version.
* :func:`apply_base_entries`: a commit merged onto a newer ``latest`` brings the tree's paths
  to that version's entries.

What a commit reads (the files in manifest order, the staged files and their digests) are
queries of :class:`mountfs.drafts.rows.NodeTable` (``commit_files``, ``staged_files``,
``record_digests``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from client.manifest import ManifestEntry

from .rows import CONTROL_NAMES, ROOT_ID, Digest, NodeTable, entry_mode
from .tree import DraftTree


def _base_fields(entry: ManifestEntry) -> str | None:
    """A base entry's fields other than digest and size, as the ``entry`` column keeps them."""
    extra = {k: v for k, v in entry.to_json().items() if k not in ("digest", "size")}
    return json.dumps(extra) if extra else None


def populate(tree: DraftTree, ident: dict[str, Any], base: dict[str, Any] | None,
             entries: Iterable[ManifestEntry], mtime_ns: int) -> None:
    """Root row, identity, base, and one row per base entry; synced before it returns."""
    rows = tree.rows
    with rows.txn() as c:
        rows.insert(c, 0, "", is_dir=True, mode=0o755, mtime_ns=time.time_ns(), nid=ROOT_ID)
        rows.put_meta(c, "identity", ident)
        rows.put_meta(c, "base", base)
        _insert_entries(rows, c, entries, mtime_ns)
    rows.sync()


def _insert_entries(rows: NodeTable, c: sqlite3.Connection, entries: Iterable[ManifestEntry], mtime_ns: int) -> None:
    """Rows for base entries; what cannot be a visible file goes to ``hidden`` (kept verbatim)."""
    dirs: dict[str, int | None] = {"": ROOT_ID}

    def ensure_dir(path: str) -> int | None:
        if path in dirs:
            return dirs[path]
        head, _, name = path.rpartition("/")
        parent = ensure_dir(head)
        nid = None
        if parent is not None:
            try:
                nid = rows.insert(c, parent, name, is_dir=True, mode=0o755, mtime_ns=mtime_ns)
            except sqlite3.IntegrityError:  # a file of that name exists
                nid = None
        dirs[path] = nid
        return nid

    for e in entries:
        head, _, name = e.path.rpartition("/")
        if e.ref is not None or (not head and name in CONTROL_NAMES):
            rows.set_hidden(c, e.path, e.digest, e.to_json())
            continue
        parent = ensure_dir(head)
        try:
            if parent is None or e.path in dirs:
                raise sqlite3.IntegrityError
            rows.insert(c, parent, name, mode=entry_mode(e), size=e.size or 0, mtime_ns=mtime_ns, digest=e.digest,
                        entry=_base_fields(e))
        except sqlite3.IntegrityError:
            rows.set_hidden(c, e.path, e.digest, e.to_json())


def rebase_files(tree: DraftTree, files: Iterable[Digest]) -> None:
    """Staged files whose data moved into the cache become base files of the new version: their
    recorded digest (and the size and mtime recorded with it) become the base file's."""
    files = list(files)
    with tree.lock:
        for f in files:
            tree.data.forget(f.id)
        with tree.rows.txn() as c:
            now = time.time_ns()  # the data file (whose ctime was shown) goes: keep ctime monotonic
            for f in files:
                tree.rows.set_base(c, f.id, size=f.size, mtime_ns=f.mtime_ns, ctime_ns=now)


def apply_base_entries(tree: DraftTree, changes: Iterable[tuple[str, ManifestEntry | None]]) -> None:
    """Bring paths to a newer version's entries (a merged commit): ``(path, ManifestEntry)``
    sets a base file (directories made as needed), ``(path, None)`` removes the file.
    Entries that cannot be files (references, a path under a file) go to ``hidden``."""
    rows = tree.rows
    now = time.time_ns()
    with rows.txn() as c:
        for path, entry in changes:
            rows.drop_hidden(c, path)
            *dirs, name = path.split("/")
            parent: int | None = ROOT_ID
            for d in dirs:
                node = rows.child(parent, d)
                if node is None:
                    parent = None if entry is None else rows.insert(c, parent, d, is_dir=True, mode=0o755,
                                                                    mtime_ns=now)
                else:
                    parent = node.id if node.is_dir else None
                if parent is None:
                    break
            node = rows.child(parent, name) if parent is not None else None
            if node is not None and not node.is_dir:
                tree.drop_name(c, node)
            if entry is None:
                continue
            if parent is None or entry.ref is not None or (node is not None and node.is_dir) \
                    or (parent == ROOT_ID and name in CONTROL_NAMES):
                rows.set_hidden(c, path, entry.digest, entry.to_json())
                continue
            rows.insert(c, parent, name, mode=entry_mode(entry), size=entry.size or 0, mtime_ns=now,
                        digest=entry.digest, entry=_base_fields(entry))
