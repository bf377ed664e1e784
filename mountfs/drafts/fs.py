"""Drafts on the mount: inodes <-> (draft, node id), and the write operations.  No pyfuse3 here.

This is the :class:`mountfs.namespace.DraftProvider` the namespace delegates ``DRAFT_*`` nodes
to, plus one method per FUSE write operation for ``mountfs.ops`` to call (in a worker thread:
every method here may take a draft's lock, which a running commit holds for seconds, so none
of them may run on the trio loop — each calls ``ns._io()`` before touching a draft).  The
``*_nowait`` methods are the exception: they only try the lock and give up (changing nothing)
when it is held or when more than a local write is needed.

Where the names live::

    /                         mkdir <entity>     a new entity (in memory until a draft is made in it)
    /<e>                      mkdir <project>    a new project (idem)
    /<e>/<p>                  mkdir <coll>:draft[-label]   DraftManager.create (from :latest or empty)
                              rmdir <coll>:draft[-label]   DraftManager.remove (ENOTEMPTY unless empty)
    /<e>/<p>/<coll>:draft…/…  everything else    DraftTree (mountfs.drafts.tree)

Writes anywhere else answer EROFS; a name in a project that is neither a draft nor a version
answers EINVAL on mkdir.  Renames between two drafts, or into or out of a draft, answer EXDEV
(``mv`` then copies, which is what a move from a version into a draft must do anyway).

Reads of a draft file that still is unchanged base content go through the read side's ranged
fetcher (``open`` returns a :class:`FileRef` for ``ops`` to hand to ``ContentReader``): a
partial read of a large base file fetches only the blocks it touches.

After a sentinel commit the namespace forgets its cached listings of the project and the
daemon's ``invalidate(inode_p, name)`` callback drops the kernel's dentries of the collection's
alias directories, so ``:latest`` and the new ``:vN`` show the new version at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from client import names
from client.errors import NotFoundError

from ..errors import (BadHandleError, CommitFailedError, CrossDraftError, ExistsError, InvalidArgumentError,
                      NotEmptyError, ReadOnlyError)
from .manager import CommitOptions, CommitResult, Draft, DraftManager, StatFs, is_draft_name
from .files import NodeAttr
from .rows import ROOT_ID, STATUS_NAME
from ..namespace import DRAFT_KINDS, Attr, FileRef, Kind, Namespace, Node

log = logging.getLogger(__name__)

STATUS_XATTR = "user.artifact.draft.status"
#: setxattr on a draft directory commits it now, synchronously, with the value's JSON options
COMMIT_XATTR = "user.artifact.draft.commit"
#: reading the status (file or xattr) waits this long at most for a requested commit to finish
STATUS_WAIT_SECONDS = 150.0


@dataclass(slots=True)
class _Open:
    """One open draft file: the draft, the tree's handle (None: served by the read side)."""

    draft: Draft
    tree_fh: int | None
    nid: int


def _erofs() -> ReadOnlyError:
    return ReadOnlyError("artifact versions are read-only; write into a <collection>:draft directory")


class DraftFS:
    """The draft side of the mount over one :class:`DraftManager`."""

    def __init__(self, manager: DraftManager, *, ttl: float = 1.0,
                 invalidate: Callable[[int, str], None] | None = None) -> None:
        self.manager = manager
        #: kernel entry/attr timeout of draft nodes: short, since their attributes change
        self.ttl = ttl
        #: drops a kernel dentry (pyfuse3.invalidate_entry_async in the daemon)
        self.invalidate = invalidate
        self.ns: Namespace | None = None  #: set by :meth:`attach`
        self._lock = threading.Lock()
        self._made_entities: set[str] = set()
        self._made_projects: set[tuple[str, str]] = set()
        self._open: dict[int, _Open] = {}
        manager.commit_runner = self._commit_on_sentinel

    def attach(self, ns: Namespace) -> None:
        self.ns = ns

    # -- DraftProvider -----------------------------------------------------------------------
    def is_draft_name(self, name: str) -> bool:
        return is_draft_name(name)

    def list_names(self, entity: str, project: str) -> list[str]:
        return self.manager.names(entity, project)

    def extra_entities(self) -> set[str]:
        with self._lock:
            made = set(self._made_entities)
        return made | {d.entity for d in self.manager.list()}

    def extra_projects(self, entity: str) -> set[str]:
        with self._lock:
            made = {p for e, p in self._made_projects if e == entity}
        return made | {d.project for d in self.manager.list(entity)}

    def lookup(self, ns: Namespace, project: Node, name: str) -> Node:
        ns._io()
        draft = self.manager.get(project.entity, project.project, name)
        node = ns.draft_node(project, name, Kind.DRAFT_DIR, draft.id, ROOT_ID, draft.tree.getattr(ROOT_ID))
        node.collection = draft.collection
        return node

    def lookup_child(self, ns: Namespace, parent: Node, name: str) -> Node:
        ns._io()
        draft = self._draft(parent)
        return self._node(ns, parent, draft, draft.tree.lookup(parent.nid, name))

    def attr(self, ns: Namespace, node: Node, *, fresh: bool) -> Attr:
        if fresh or node.dattr is None:
            ns._io()
            node.dattr = self._draft(node).tree.getattr(node.nid)
        a: NodeAttr = node.dattr
        cfg = ns.config
        # .commit.status is rewritten by commits, not through the kernel: never cache its size
        ttl = 0.0 if a.parent == ROOT_ID and a.name == STATUS_NAME else self.ttl
        return Attr(node.inode, a.mode, a.nlink, a.size, a.mtime_ns, cfg.uid, cfg.gid, ttl, ttl,
                    a.atime_ns, a.ctime_ns)

    def readdir_page(self, ns: Namespace, node: Node, start_id: int, limit: int) -> list[tuple[int, str, Node]]:
        """``.`` (cookie 1), ``..`` (2), then the entries (cookie: entry row + 2)."""
        ns._io()
        draft = self._draft(node)
        out: list[tuple[int, str, Node]] = []
        if start_id < 1:
            out.append((1, ".", node))
        if start_id < 2:
            try:
                out.append((2, "..", ns.node(node.parent)))
            except NotFoundError:  # the parent was forgotten meanwhile: its attributes are unknown
                out.append((2, "..", node))
        rows = draft.tree.readdir(node.nid, max(start_id - 2, 0), limit)
        return out + [(a.row + 2, a.name, self._node(ns, node, draft, a)) for a in rows]

    def readlink(self, inode: int) -> str:
        node, draft = self._in_draft(inode)
        return draft.tree.readlink(node.nid)

    def xattrs(self, ns: Namespace, node: Node) -> dict[str, bytes]:
        ns._io()
        draft = self._draft(node)
        out = {"user.artifact.draft": f"{draft.entity}/{draft.project}/{draft.dirname}".encode()}
        if node.kind is Kind.DRAFT_DIR:
            draft.tree.wait_commits(STATUS_WAIT_SECONDS)
            out[STATUS_XATTR] = json.dumps(draft.status(), sort_keys=True).encode()
        elif node.kind is Kind.DRAFT_FILE:
            a = draft.tree.getattr(node.nid)
            if a.digest is not None:  # unchanged base content: its digest is known
                out["user.artifact.digest"] = a.digest.encode()
        return out

    # -- helpers ------------------------------------------------------------------------------
    def _ns(self) -> Namespace:
        assert self.ns is not None, "DraftFS.attach(ns) was not called"
        return self.ns

    def _draft(self, node: Node) -> Draft:
        draft = self.manager.by_id(node.draft_id)
        if draft is None:
            raise NotFoundError("the draft was removed")
        return draft

    def _node(self, ns: Namespace, parent: Node, draft: Draft, a: NodeAttr) -> Node:
        kind = Kind.DRAFT_SUBDIR if a.is_dir else Kind.DRAFT_FILE
        return ns.draft_node(parent, a.name, kind, draft.id, a.id, a)

    def _in_draft(self, inode: int) -> tuple[Node, Draft]:
        """The node and draft of ``inode``; EROFS when it is not inside a draft."""
        ns = self._ns()
        node = ns.node(inode)
        if node.kind not in DRAFT_KINDS:
            raise _erofs()
        ns._io()
        return node, self._draft(node)

    def _handle(self, fh: int) -> _Open:
        with self._lock:
            try:
                return self._open[fh]
            except KeyError:
                raise BadHandleError(f"file handle {fh}") from None

    def is_draft_handle(self, fh: int) -> bool:
        with self._lock:
            return fh in self._open

    # -- directories ---------------------------------------------------------------------------
    def mkdir(self, inode_p: int, name: str, mode: int) -> Node:
        ns = self._ns()
        parent = ns.node(inode_p)
        if parent.kind in DRAFT_KINDS:
            node, draft = self._in_draft(inode_p)
            return self._node(ns, node, draft, draft.tree.mkdir(node.nid, name, mode))
        if parent.kind is Kind.ROOT:
            return self._make_placeholder(parent, name, None)
        if parent.kind is Kind.ENTITY:
            return self._make_placeholder(parent, name, parent.entity)
        if parent.kind is Kind.PROJECT:
            return self._create_draft(parent, name)
        raise _erofs()

    def _make_placeholder(self, parent: Node, name: str, entity: str | None) -> Node:
        """mkdir of a new entity or project: kept in memory, so that a draft can be made in it."""
        ns = self._ns()
        try:
            names.validate_entity(name) if entity is None else names.validate_project(name)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        ns._io()
        existing = ns._entities() if entity is None else ns._projects(entity)
        if name in existing:
            raise ExistsError(name)
        with self._lock:
            if entity is None:
                self._made_entities.add(name)
            else:
                self._made_projects.add((entity, name))
        ns.forget_listings(entity or name, "")
        return ns.lookup_unremembered(parent.inode, name)

    def _create_draft(self, project: Node, name: str) -> Node:
        ns = self._ns()
        if not is_draft_name(name):
            collection, sep, selector = name.rpartition(":")
            if sep and collection and selector:
                raise _erofs()  # a version or an alias: those are made by commits
            raise InvalidArgumentError(f"{name!r}: only <collection>:draft or <collection>:draft-<label> "
                                        "directories can be made in a project")
        ns._io()
        draft = self.manager.create(project.entity, project.project, name)
        ns.forget_listings(project.entity, project.project)
        with self._lock:
            self._made_projects.discard((project.entity, project.project))
            self._made_entities.discard(project.entity)
        node = ns.draft_node(project, name, Kind.DRAFT_DIR, draft.id, ROOT_ID, draft.tree.getattr(ROOT_ID))
        node.collection = draft.collection
        return node

    def rmdir(self, inode_p: int, name: str) -> None:
        ns = self._ns()
        parent = ns.node(inode_p)
        if parent.kind in DRAFT_KINDS:
            node, draft = self._in_draft(inode_p)
            draft.tree.rmdir(node.nid, name)
            return
        if parent.kind is Kind.PROJECT and is_draft_name(name):
            ns._io()
            self.manager.remove(self.manager.get(parent.entity, parent.project, name))
            ns.forget_listings(parent.entity, parent.project)
            return
        if parent.kind in (Kind.ROOT, Kind.ENTITY):
            ns._io()
            key = name if parent.kind is Kind.ROOT else (parent.entity, name)
            with self._lock:
                made = self._made_entities if parent.kind is Kind.ROOT else self._made_projects
                if key in made:
                    has_drafts = bool(self.manager.list(name) if parent.kind is Kind.ROOT
                                      else self.manager.list(parent.entity, name))
                    if has_drafts:
                        raise NotEmptyError(name)
                    made.discard(key)
                    ns.forget_listings(parent.entity or name, "")
                    return
        raise _erofs()

    def fsyncdir(self, inode: int) -> None:
        node, draft = self._in_draft(inode)
        draft.tree.rows.sync()

    # -- files -------------------------------------------------------------------------------
    def create(self, inode_p: int, name: str, mode: int, flags: int) -> tuple[int, Node]:
        node, draft = self._in_draft(inode_p)
        a, tree_fh = draft.tree.create(node.nid, name, mode, flags)
        fh = self._ns().new_fh()
        with self._lock:
            self._open[fh] = _Open(draft, tree_fh, a.id)
        return fh, self._node(self._ns(), node, draft, a)

    def mknod(self, inode_p: int, name: str, mode: int) -> Node:
        node, draft = self._in_draft(inode_p)
        return self._node(self._ns(), node, draft, draft.tree.mknod(node.nid, name, mode))

    def open(self, inode: int, flags: int) -> tuple[int, FileRef | None]:
        """Open a draft file.  Returns a FileRef when the read side should serve it (read-only
        open of unchanged base content: ranged fetches, nothing copied)."""
        node, draft = self._in_draft(inode)
        a = draft.tree.getattr(node.nid)
        if a.parent == ROOT_ID and a.name == STATUS_NAME:
            draft.tree.wait_commits(STATUS_WAIT_SECONDS)
        fh = self._ns().new_fh()
        ref = None
        if (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_TRUNC:
            base = draft.tree.base_ref(node.nid)
            if base is not None:
                ref = FileRef(draft.entity, base.md5, base.size, f"{draft.entity}/{draft.project}/{draft.dirname}",
                              self._ns().path_of(node))
        tree_fh = None if ref is not None else draft.tree.open(node.nid, flags)
        with self._lock:
            self._open[fh] = _Open(draft, tree_fh, node.nid)
        return fh, ref

    def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        assert h.tree_fh is not None
        return h.draft.tree.read(h.tree_fh, off, size)

    def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.tree_fh is None:
            raise BadHandleError("file not open for writing")
        return h.draft.tree.write(h.tree_fh, off, buf)

    def write_nowait(self, fh: int, off: int, buf: bytes) -> int | None:
        """A plain write into a staged file, answered on the event loop; None: call write()."""
        with self._lock:
            h = self._open.get(fh)
        if h is None or h.tree_fh is None:
            return None
        return h.draft.tree.write_nowait(h.tree_fh, off, buf)

    def flush_nowait(self, fh: int) -> bool:
        """True when flush() has nothing to do (not a sentinel about to commit)."""
        with self._lock:
            h = self._open.get(fh)
        return h is not None and (h.tree_fh is None or h.draft.tree.flush_nowait(h.tree_fh))

    def release_nowait(self, fh: int) -> bool:
        """release() done on the event loop if it cannot wait; False: call release()."""
        with self._lock:
            h = self._open.get(fh)
            if h is None:
                return True
            if h.tree_fh is not None and not h.draft.tree.release_nowait(h.tree_fh):
                return False
            self._open.pop(fh, None)
            return True

    def flush(self, fh: int) -> None:
        """close(2): closing a changed ``.commit`` commits here, and close() reports a failure."""
        h = self._handle(fh)
        if h.tree_fh is not None:
            h.draft.tree.flush(h.tree_fh)

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._open.pop(fh, None)
        if h is not None and h.tree_fh is not None:
            h.draft.tree.release(h.tree_fh)

    def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        h.draft.tree.fsync(h.nid, datasync)

    def setattr(self, inode: int, *, size: int | None, mode: int | None, atime_ns: int | None,
                mtime_ns: int | None, chown: bool = False) -> Node:
        """truncate, chmod, utimens, chown (accepted and not kept: a manifest has no owners)."""
        node, draft = self._in_draft(inode)
        node.dattr = draft.tree.setattr(node.nid, size=size, mode=mode, atime_ns=atime_ns, mtime_ns=mtime_ns,
                                        chown=chown)
        return node

    def unlink(self, inode_p: int, name: str) -> None:
        node, draft = self._in_draft(inode_p)
        draft.tree.unlink(node.nid, name)

    def rename(self, inode_p_old: int, name_old: str, inode_p_new: int, name_new: str, flags: int) -> None:
        ns = self._ns()
        old, new = ns.node(inode_p_old), ns.node(inode_p_new)
        in_old, in_new = old.kind in DRAFT_KINDS, new.kind in DRAFT_KINDS
        if not in_old and not in_new:
            raise _erofs()
        if in_old != in_new or old.draft_id != new.draft_id:
            raise CrossDraftError("rename into, out of or between drafts: copy instead")
        _, draft = self._in_draft(inode_p_old)
        draft.tree.rename(old.nid, name_old, new.nid, name_new, flags)

    def link(self, inode: int, inode_p_new: int, name: str) -> Node:
        """link(2) within one draft; EXDEV from a version or another draft."""
        ns = self._ns()
        src = ns.node(inode)
        parent, draft = self._in_draft(inode_p_new)
        if src.kind not in DRAFT_KINDS or src.draft_id != parent.draft_id:
            raise CrossDraftError("hard links only within one draft")
        return self._node(ns, parent, draft, draft.tree.link(src.nid, parent.nid, name))

    def symlink(self, inode_p: int, name: str, target: str) -> Node:
        parent, draft = self._in_draft(inode_p)
        return self._node(self._ns(), parent, draft, draft.tree.symlink(parent.nid, name, target))

    def statfs(self) -> StatFs:
        return self.manager.statfs()

    # -- commits -------------------------------------------------------------------------------
    def _commit_on_sentinel(self, draft: Draft) -> None:
        """A sentinel request (last release of ``.commit``, or a bare utimens): commit once the
        draft is quiet, then make the new version visible.  Readers of the status wait for it."""
        result = self.manager.commit_when_ready(draft)
        if result is not None and result.state == "created":
            self.show_new_version(draft)

    def commit_xattr(self, inode: int, value: bytes) -> None:
        """``artifactfs commit``: commit the draft (options from ``value``, not from ``.commit``)
        once it is quiet, and return when done; EINVAL for bad options, EIO if it failed."""
        node, draft = self._in_draft(inode)
        if node.kind is not Kind.DRAFT_DIR:
            raise InvalidArgumentError(f"{COMMIT_XATTR} is set on a draft directory")
        try:
            options = CommitOptions.parse(value)
        except ValueError as exc:
            draft.record(CommitResult("failed", error=str(exc)))
            raise InvalidArgumentError(str(exc)) from None
        result = self.manager.commit_when_ready(draft, options)
        if result is None:  # joined a request already waiting: its attempt is the answer
            draft.tree.wait_commits(STATUS_WAIT_SECONDS)
            result = draft.last_result
        if result is not None and result.state == "created":
            self.show_new_version(draft)
        if result is None or result.state not in ("created", "noop"):
            raise CommitFailedError(f"commit of {draft.dirname} failed")

    def show_new_version(self, draft: Draft) -> None:
        """Forget cached listings and aliases of the collection; drop the kernel's alias dentries."""
        stale = self._ns().forget_listings(draft.entity, draft.project, draft.collection)
        if self.invalidate is not None:
            for inode_p, name in stale:
                self.invalidate(inode_p, name)

