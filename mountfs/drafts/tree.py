"""One draft's tree: the names (lookup, directories, links, renames, attributes).  No FUSE, no store.

Layout of a draft directory (``<staging_root>/<draft id>/``)::

    draft.db            SQLite (WAL): meta, nodes, hidden             (mountfs.drafts.rows)
    data/<node id>      staged content of a node (new or modified file); absent for base files
    data/<id>.copyup    a copy-up in progress (renamed to data/<id> when complete)   (.data)
    commit-intent.json  present only while a commit is between "manifest built" and "rebased"

The layers, bottom up: :mod:`.rows` (the SQLite schema, its rows as :class:`Node`, every
statement), :mod:`.data` (the data files, running hashes, copy-up), :mod:`.files` (handles,
reads and writes, the sentinel) and this module's :class:`DraftTree` (the names), which is what
the mount (``mountfs.drafts.fs``) and the tests call.  What a commit reads from and writes to the
tree is in :mod:`.plan`.

Why this shape:

* Base files are rows carrying the base entry's digest: creating a draft from a version copies
  nothing but manifest rows.
* Every metadata operation is one SQLite transaction, committed before the call returns;
  ``fsync``/``fsyncdir`` and commits force a full sync.  ``sync_metadata=True`` syncs every
  transaction.
* A row is a directory entry.  A hard link is a row naming another node (``link_to``): every
  lookup follows it, so both names give one inode, and unlinking the node's own name hands that
  name over to a further one.  A symbolic link is a base-like row of type ``S_IFLNK`` whose
  target is kept as its entry's ``extra.symlink`` (its digest is the md5 of the target).
  Times: atime/ctime columns (NULL: mtime, for drafts made before they existed); a staged
  file's ctime is at least its data file's, so writes move it without a transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time

from client.errors import NotFoundError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import SYMLINK_KEY, symlink_target

from ..errors import (BaseUnavailableError, ExistsError, InvalidArgumentError, IsDirectoryError, NameTooLongError,
                      NotDirectoryError, NotEmptyError, NotPermittedError)
from .files import DraftFiles, NodeAttr
from .rows import COMMIT_NAME, CONTROL_NAMES, ROOT_ID, STATUS_NAME, Node, check_length, check_name


class DraftTree(DraftFiles):
    """The nodes and staged data of one draft; POSIX-like operations raising :mod:`mountfs.errors`.

    ``fetch_base(ref) -> Path`` must return a local file holding the base content (normally the
    cache object); it is called only for a read of a base file or a partial overwrite of one.
    """

    # -- reading the tree ------------------------------------------------------------------
    def _dir(self, nid: int) -> Node:
        node = self.rows.node(nid)
        if not node.is_dir:
            raise NotDirectoryError(f"node {nid} is not a directory")
        return node

    def lookup(self, parent: int, name: str) -> NodeAttr:
        check_length(name)
        with self.lock:
            self._dir(parent)
            entry = self.rows.child(parent, name)
            if entry is None:
                raise NotFoundError(name)
            return self.attr_of(self.rows.target(entry), entry)

    def readdir(self, parent: int, after: int = 0, limit: int = 256) -> list[NodeAttr]:
        """One page of a directory in entry order; pass the last ``row`` returned as ``after``."""
        with self.lock:
            self._dir(parent)
            return [self.attr_of(self.rows.target(e), e) for e in self.rows.entries(parent, after, limit)]

    def readlink(self, nid: int) -> str:
        """The target of a symbolic link (EINVAL for anything else)."""
        with self.lock:
            node = self.rows.node(nid)
        if not node.is_symlink:
            raise InvalidArgumentError(f"{node.name} is not a symbolic link")
        target = symlink_target(node.extra)
        if target is None:
            raise BaseUnavailableError(f"symbolic link {node.name} has no target")
        return target

    def is_empty(self, nid: int, *, ignore_control: bool = False) -> bool:
        with self.lock:
            names = self.rows.names(nid, 3)
        if ignore_control and nid == ROOT_ID:
            names = [n for n in names if n not in CONTROL_NAMES]
        return not names

    def path_of(self, nid: int) -> str:
        """The path of a node inside the draft (for messages)."""
        parts: list[str] = []
        with self.lock:
            while nid not in (ROOT_ID, 0):
                node = self.rows.get(nid)
                if node is None:
                    break
                parts.append(node.name)
                nid = node.parent if node.parent is not None else 0
        return "/".join(reversed(parts))

    # -- creating ---------------------------------------------------------------------------
    def _check_new(self, parent: int, name: str) -> None:
        check_name(name)
        self._dir(parent)
        if self.rows.child(parent, name) is not None:
            raise ExistsError(name)

    def _touch_dir(self, c: sqlite3.Connection, nid: int) -> None:
        self.last_change = time.monotonic()
        now = time.time_ns()
        self.rows.set_times(c, nid, mtime_ns=now, ctime_ns=now)

    def mkdir(self, parent: int, name: str, mode: int = 0o755) -> NodeAttr:
        with self.rows.txn() as c:
            self._check_new(parent, name)
            nid = self.rows.insert(c, parent, name, is_dir=True, mode=mode & 0o7777, mtime_ns=time.time_ns())
            self._touch_dir(c, parent)
        return self.getattr(nid)

    def create(self, parent: int, name: str, mode: int = 0o644, flags: int = os.O_RDWR) -> tuple[NodeAttr, int]:
        """Create an empty file and open it (EEXIST if the name exists).  Returns (attr, fh)."""
        if parent == ROOT_ID and name == STATUS_NAME:
            raise NotPermittedError(f"{STATUS_NAME} is written by artifactfs")
        with self.rows.txn() as c:
            self._check_new(parent, name)
            nid = self.rows.insert(c, parent, name, mode=mode & 0o7777, mtime_ns=time.time_ns(), staged=True)
            self._touch_dir(c, parent)
            # Created inside the transaction: if the file cannot be made, the row is rolled back.
            born = self.data.create(nid)
            self.rows.set_times(c, nid, mtime_ns=born, atime_ns=born, ctime_ns=born)
        if parent == ROOT_ID and name == COMMIT_NAME:
            self._armed = True
        return self.getattr(nid), self._new_handle(nid, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))

    def mknod(self, parent: int, name: str, mode: int) -> NodeAttr:
        """Regular files only (some tools create with mknod); anything else is EPERM."""
        if not stat.S_ISREG(mode):
            raise NotPermittedError("drafts hold regular files, symbolic links and directories only")
        attr, fh = self.create(parent, name, mode)
        self.release(fh)
        return attr

    def link(self, nid: int, parent: int, name: str) -> NodeAttr:
        """link(2): one more name for a file or symbolic link (EPERM for directories and the
        control files; ENOENT for a file already unlinked)."""
        if parent == ROOT_ID and name in CONTROL_NAMES:
            raise NotPermittedError(f"{name} is managed by artifactfs")
        with self.rows.txn() as c:
            node = self.rows.node(nid)
            if node.is_dir:
                raise NotPermittedError("hard links to directories are not allowed")
            if node.is_root_name(*CONTROL_NAMES):
                raise NotPermittedError(f"{node.name} is managed by artifactfs")
            if node.parent is None:
                raise NotFoundError("the file was unlinked")
            self._check_new(parent, name)
            self.rows.insert(c, parent, name, mode=0, mtime_ns=0, link_to=nid)
            self.rows.set_ctime(c, nid, time.time_ns())
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
        with self.rows.txn() as c:
            self._check_new(parent, name)
            nid = self.rows.insert(c, parent, name, mode=stat.S_IFLNK | 0o777, size=len(data), mtime_ns=time.time_ns(),
                                   digest=hex_to_b64(md5_bytes(data)), entry=json.dumps({"extra": {SYMLINK_KEY: target}}))
            self._touch_dir(c, parent)
        return self.getattr(nid)

    # -- attributes ----------------------------------------------------------------------
    def setattr(self, nid: int, *, size: int | None = None, mode: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None, chown: bool = False) -> NodeAttr:
        """truncate / chmod (the execute bit is committed) / utimens / chown (accepted, not kept:
        a manifest has no owners).  Every change sets ctime."""
        request = False
        with self.lock:
            node = self.rows.node(nid)
            if node.is_root_name(STATUS_NAME) and (size, mode, atime_ns, mtime_ns) != (None,) * 4:
                raise NotPermittedError(f"{STATUS_NAME} is read-only")
            if size is not None:
                self.truncate(nid, size)
            now = time.time_ns()
            with self.rows.txn() as c:
                if mode is not None:
                    keep = stat.S_IFMT(node.mode)  # a symbolic link stays one
                    self.rows.set_mode(c, nid, keep | (mode & 0o7777))
                if atime_ns is not None or mtime_ns is not None:
                    old = self.attr_of(node)
                    a = atime_ns if atime_ns is not None else old.atime_ns
                    m = mtime_ns if mtime_ns is not None else old.mtime_ns
                    if node.staged:
                        self.data.set_times(nid, a, m)
                    self.rows.set_times(c, nid, mtime_ns=m, atime_ns=a)
                self.rows.set_ctime(c, nid, now)
            if (atime_ns is not None or mtime_ns is not None) and node.is_root_name(COMMIT_NAME):
                if self._open[nid] > 0:
                    self._armed = True
                else:
                    request = True
                    self._requests += 1
            attr = self.attr_of(self.rows.node(nid))
        if request:
            self._request_commit()
        return attr

    # -- removing and renaming ---------------------------------------------------------------
    def drop_name(self, c: sqlite3.Connection, entry: Node) -> None:
        """Remove the directory entry of a file: a hard link's row goes; the node's own name is
        taken over by one of its further names; a last name goes with the node (or orphans it
        until its last handle closes, POSIX unlink)."""
        now = time.time_ns()
        if entry.link_to is not None:
            self.rows.delete(c, entry.id)
            self.rows.set_ctime(c, entry.link_to, now)
            return
        heir = self.rows.first_link(entry.id)
        if heir is not None:
            self.rows.delete(c, heir.id)
            self.rows.move(c, entry.id, heir.parent, heir.name, now)
        elif self._open.get(entry.id, 0) > 0:
            self.rows.move(c, entry.id, None, f"orphan-{entry.id}", now)
        else:
            self.rows.delete(c, entry.id)
            self.data.discard(entry.id)

    def unlink(self, parent: int, name: str) -> None:
        check_name(name)
        with self.rows.txn() as c:
            self._dir(parent)
            entry = self.rows.child(parent, name)
            if entry is None:
                raise NotFoundError(name)
            if entry.is_dir:
                raise IsDirectoryError(name)
            self.drop_name(c, entry)
            self._touch_dir(c, parent)

    def rmdir(self, parent: int, name: str) -> None:
        check_name(name)
        with self.rows.txn() as c:
            self._dir(parent)
            entry = self.rows.child(parent, name)
            if entry is None:
                raise NotFoundError(name)
            if not entry.is_dir:
                raise NotDirectoryError(name)
            if self.rows.has_entries(entry.id):
                raise NotEmptyError(name)
            self.rows.delete(c, entry.id)
            self._touch_dir(c, parent)

    def _is_ancestor(self, anc: int, nid: int) -> bool:
        while nid not in (ROOT_ID, 0):
            if nid == anc:
                return True
            node = self.rows.get(nid)
            if node is None or node.parent is None:
                return False
            nid = node.parent
        return nid == anc

    def _replace(self, c: sqlite3.Connection, src: Node, dst: Node) -> None:
        """Remove the entry a rename replaces: a file by a file, an empty directory by a directory."""
        if src.is_dir and not dst.is_dir:
            raise NotDirectoryError(dst.name)
        if not src.is_dir and dst.is_dir:
            raise IsDirectoryError(dst.name)
        if dst.is_dir:
            if self.rows.has_entries(dst.id):
                raise NotEmptyError(dst.name)
            self.rows.delete(c, dst.id)
        else:
            self.drop_name(c, dst)

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
        with self.rows.txn() as c:
            self._dir(parent_old)
            self._dir(parent_new)
            src = self.rows.child(parent_old, name_old)
            if src is None:
                raise NotFoundError(name_old)
            if (parent_old, name_old) == (parent_new, name_new):
                return
            if src.is_dir and self._is_ancestor(src.id, parent_new):
                raise InvalidArgumentError("cannot move a directory into itself")
            if src.link_to is not None and parent_new == ROOT_ID and name_new in CONTROL_NAMES:
                raise NotPermittedError(f"a hard link cannot become {name_new}")
            node = src.target
            dst = self.rows.child(parent_new, name_new)
            if dst is not None:
                if flags & noreplace:
                    raise ExistsError(name_new)
                if dst.target == node:
                    return  # two names of one file: POSIX says do nothing
                self._replace(c, src, dst)
            self.rows.move(c, src.id, parent_new, name_new)
            self.rows.set_ctime(c, node, time.time_ns())
            self._touch_dir(c, parent_old)
            if parent_new != parent_old:
                self._touch_dir(c, parent_new)
            if parent_new == ROOT_ID and name_new == COMMIT_NAME and not src.is_dir:
                # editors save by renaming a temp file over the target: that is a write of .commit
                request = self._open.get(node, 0) == 0
                self._armed = not request
                self._requests += int(request)
        if request:
            self._request_commit()
