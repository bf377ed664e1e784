"""The mount's namespace: paths <-> versions <-> inodes.  Pure: no FUSE, testable directly.

Tree shape (one node *kind* per level; the kind decides lookup, listing, attributes)::

    /                                   ROOT          lists entities
    /<entity>                           ENTITY        lists projects
    /<entity>/<project>                 PROJECT       lists <collection>:vN and <collection>:<alias>
    /<e>/<p>/<collection>:vN            VERSION_DIR   one immutable version
    /<e>/<p>/<collection>:<alias>       ALIAS_DIR     the version the alias named when looked up
    /<e>/<p>/<collection>:vN/a/b        TREE_DIR      directories derived from manifest paths
    /<e>/<p>/<collection>:vN/a/b/c.bin  TREE_FILE     one manifest entry
    /<e>/<p>/<collection>:draft…        DRAFT_DIR     a writable draft (mountfs.drafts.fs)
    /<e>/<p>/<collection>:draft…/a/b    DRAFT_SUBDIR  a directory inside a draft
    /<e>/<p>/<collection>:draft…/a/b/c  DRAFT_FILE    a file inside a draft

Draft nodes are keyed by ``(0, draft id, node id)`` instead: a draft's node ids are stable
across renames, so a renamed file or directory keeps its inode (as on a local disk).

Inodes.  Every node is keyed by ``(parent inode, name, discriminator)`` and gets an inode
number that is never reused.  For an alias directory the discriminator is the id of the
version the alias resolved to: when ``latest`` moves, the next lookup (after ``alias_ttl``)
yields a *new* inode, so the kernel drops its dentry and everything below it, while a process
that still holds the old inode (open file, cwd) keeps seeing the old version — nothing under
an inode ever changes, which is what lets us hand the kernel long timeouts and keep_cache.
Open files are additionally pinned by value (:class:`FileRef`), independent of inode life.

Lookup counts follow the FUSE contract: ``lookup`` and every accepted readdirplus entry add
one, ``forget`` subtracts, and a node is dropped from the tables only at zero.

Threading: the daemon calls these methods from worker threads (they may hit the store or an
SQLite index), so the tables are guarded by one lock that is never held across store I/O.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from cachetools import LRUCache, TTLCache

from client import names
from client.errors import NotFoundError
from client.hashing import hex_to_b64
from client.manifest import EXECUTABLE_KEY, SYMLINK_KEY, symlink_target
from client.store.base import Store, VersionRecord
from client.transfer import ARTIFACT_REF_SCHEME, artifact_ref_entity

from .errors import (BadHandleError, InvalidArgumentError, IsDirectoryError, NoAttributeError, NotDirectoryError,
                     NotSupportedError, ReadOnlyError)
from .manifest_index import ROOT_ID, IndexEntry, IndexStore, ManifestIndex
from .ref_source import RefSource, describe

log = logging.getLogger(__name__)


ROOT_INODE = 1  # pyfuse3.ROOT_INODE; repeated here so this module never imports pyfuse3
#: ``ds@v3`` and ``ds@latest`` name the same trees as ``ds:v3`` and ``ds:latest`` (``@`` cannot
#: occur in a collection or alias name); looked up on demand, not listed a second time.
COLON_FREE_SEP = "@"
DIR_MODE = 0o040555
FILE_MODE = 0o100444


class NeedsIO(Exception):
    """Raised in local-only mode when an answer needs the store or an unopened index.

    The daemon first tries each namespace call on the event loop in local-only mode (memory
    and already open SQLite indexes: microseconds) and only on NeedsIO repeats it in a worker
    thread, so metadata-heavy tools (find, ls -lR) do not pay a thread hop per entry.  Every
    method raises it before mutating anything, so the retry is safe.
    """


#: how the keys look in an index entry's ``extra`` JSON (a cheap test before parsing it)
_SYMLINK_JSON, _EXECUTABLE_JSON = json.dumps(SYMLINK_KEY), json.dumps(EXECUTABLE_KEY)


class Kind(enum.Enum):
    ROOT = "root"
    ENTITY = "entity"
    PROJECT = "project"
    VERSION_DIR = "version"
    ALIAS_DIR = "alias"
    TREE_DIR = "dir"
    TREE_FILE = "file"
    DRAFT_DIR = "draft"  #: the root of a draft; produced by the DraftProvider
    DRAFT_SUBDIR = "draft-dir"
    DRAFT_FILE = "draft-file"

    #: members are singletons: identity hashing makes the ``kind in VERSIONED`` tests of every
    #: request C-speed (Enum's own __hash__ hashes the name in Python)
    __hash__ = object.__hash__


#: kinds whose content is a fixed version (immutable; long kernel timeouts)
VERSIONED = frozenset({Kind.VERSION_DIR, Kind.ALIAS_DIR, Kind.TREE_DIR, Kind.TREE_FILE})
DIRECTORY_KINDS = frozenset(Kind) - {Kind.TREE_FILE, Kind.DRAFT_FILE}
#: kinds owned by the draft provider (writable; short kernel timeouts)
DRAFT_KINDS = frozenset({Kind.DRAFT_DIR, Kind.DRAFT_SUBDIR, Kind.DRAFT_FILE})


@dataclass(slots=True, eq=False)
class Node:
    """One inode.  Version-bound nodes carry their VersionRecord (so they never re-resolve)."""

    inode: int
    kind: Kind
    parent: int
    name: str
    key: tuple[int, str, str]
    entity: str = ""
    project: str = ""
    collection: str = ""
    version: VersionRecord | None = None
    entry: IndexEntry | None = None  #: the index row of TREE_DIR / TREE_FILE nodes
    lookups: int = 0
    draft_id: str = ""  #: DRAFT_* nodes: the draft they belong to
    nid: int = 0  #: DRAFT_* nodes: the node id inside the draft (stable across renames)
    dattr: Any = None  #: DRAFT_* nodes: attributes as of the last lookup/readdir/getattr
    #: the daemon's reply attributes of an immutable (VERSIONED) node, built once by ops.py
    #: (opaque here: this module never imports pyfuse3)
    reply: Any = None
    pinned: "FileRef | None" = None  #: TREE_FILE of a stored blob: what every open pins it to

    @property
    def is_dir(self) -> bool:
        return self.kind in DIRECTORY_KINDS

    @property
    def dir_id(self) -> int:
        """Index row id of this directory (the version root has none: ROOT_ID)."""
        return self.entry.id if self.entry is not None else ROOT_ID


class Attr(NamedTuple):
    """What getattr/lookup report; converted to pyfuse3.EntryAttributes by ops.py.  Immutable
    like the frozen dataclass it was, at a quarter of the cost: a first listing makes one a
    node."""

    inode: int
    mode: int
    nlink: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    entry_timeout: float
    attr_timeout: float
    atime_ns: int | None = None  #: None: mtime_ns (so is ctime_ns)
    ctime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class FileRef:
    """What an open file is pinned to: content by md5, not by name, so aliases can move."""

    entity: str
    md5: str  #: the content's cache key: its md5 (a reference: :attr:`RefSource.key`)
    size: int
    version: str  #: qualified name, e.g. ``ent/proj/data:v3`` (for messages and logs)
    path: str
    source: RefSource | None = None  #: a reference entry: where its bytes are and what was recorded
    #: (manifest md5, directory row id, its own row id): where it sits in its version, for
    #: batched look-ups of its siblings (:meth:`Namespace.directory_files`); None when not
    #: opened from a version (or a reference)
    directory: tuple[str, int, int] | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """``entity/project/collection:vN/path``: how log lines and errors name the file."""
        return f"{self.version}/{self.path}"


#: most siblings one batched look-up (block maps, signed URLs) covers
SIBLING_BATCH = 1000
#: directory entries the listing-page cache of version directories holds (their nodes too)
_PAGE_CACHE_ENTRIES = 32768


@dataclass(slots=True)
class DirHandle:
    node: Node
    #: snapshot of (name, kind, version) for store-backed listings, taken at offset 0 so
    #: that cookies (positions) stay stable while one listing pages through it
    snapshot: list[tuple[str, Kind, VersionRecord | None]] | None = None
    index: ManifestIndex | None = None


class DraftProvider(Protocol):
    """The seam for writable drafts: it owns ``<collection>:draft…`` names and what is below.

    Its methods run like the namespace's own: first on the event loop in local-only mode,
    where anything needing the store or disk I/O must call ``ns._io()`` (raising NeedsIO)
    before changing state, then again in a worker thread.  Nodes it returns use the
    ``DRAFT_*`` kinds and are registered through :meth:`Namespace.draft_node` so lookup
    counts and forget() work unchanged.
    """

    def is_draft_name(self, name: str) -> bool: ...
    def lookup(self, ns: "Namespace", project: Node, name: str) -> Node: ...
    def lookup_child(self, ns: "Namespace", parent: Node, name: str) -> Node: ...
    def list_names(self, entity: str, project: str) -> list[str]: ...
    def extra_entities(self) -> set[str]: ...
    def extra_projects(self, entity: str) -> set[str]: ...
    def attr(self, ns: "Namespace", node: Node, *, fresh: bool) -> Attr: ...
    def readdir_page(self, ns: "Namespace", node: Node, start_id: int, limit: int) -> list[tuple[int, str, Node]]: ...
    def xattrs(self, ns: "Namespace", node: Node) -> dict[str, bytes]: ...


@dataclass
class NamespaceConfig:
    alias_ttl: float = 5.0  #: how long an alias resolution (and store listings) is trusted
    version_ttl: float = 86400.0  #: kernel entry/attr timeout for immutable nodes
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o444  #: permission bits of version files (--file-mode)
    dir_mode: int = 0o555  #: permission bits of directories (--dir-mode)


class Namespace:
    """Inode table + resolution rules over a Store and an IndexStore."""

    def __init__(self, store: Store, indexes: IndexStore, config: NamespaceConfig | None = None,
                 *, drafts: DraftProvider | None = None, clock: Callable[[], float] = time.monotonic,
                 stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.store = store
        #: daemon counters shown as the root's ``user.artifactfs.stats`` xattr (JSON), so tests
        #: and operators can count store requests of a live mount without attaching to it
        self.stats = stats
        self.indexes = indexes
        self.config = config or NamespaceConfig()
        self.drafts = drafts
        self._lock = threading.RLock()
        self._mode = threading.local()
        self._mounted_ns = time.time_ns()
        root = Node(ROOT_INODE, Kind.ROOT, ROOT_INODE, "", (0, "", ""), lookups=1)
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, str, str], int] = {}
        self._next_inode = ROOT_INODE + 1
        ttl = max(self.config.alias_ttl, 0.001)
        self._aliases: TTLCache[tuple[str, ...], VersionRecord] = TTLCache(65536, ttl, timer=clock)
        self._listings: TTLCache[tuple[str, ...], Any] = TTLCache(4096, ttl, timer=clock)
        self._versions: TTLCache[tuple[str, ...], VersionRecord] = TTLCache(65536, self.config.version_ttl, timer=clock)
        self._dir_handles: dict[int, DirHandle] = {}
        #: listing pages of version directories by (directory inode, cookie, limit): the
        #: content under an inode never changes, so `find` / `ls -lR` again costs no SQLite
        #: query and no node look-up per entry; bounded in entries
        self._pages: LRUCache[tuple[int, int, int], list[tuple[int, str, Node]]] = LRUCache(
            _PAGE_CACHE_ENTRIES, getsizeof=lambda page: len(page) + 1)
        self._file_handles: dict[int, FileRef] = {}
        self._handle_inode: dict[int, int] = {}  #: open file handle -> its inode
        self._opens: dict[int, int] = {}  #: inode -> handles open on it
        #: inodes whose kernel pages are to go once no handle holds them (see idle_files_below)
        self._unused_wanted: set[int] = set()
        #: called (never under a lock) with such an inode when its last handle is released
        self.on_unused: Callable[[int], None] | None = None
        self._next_fh = 1
        #: called (never blocking) with each version directory looked up or listed: the fast
        #: path (mountfs/fastpath.py) checks whether that version can be served by a tree
        self.on_version: Callable[[Node], None] | None = None

    # -- inode table -------------------------------------------------------------------
    def node(self, inode: int) -> Node:
        with self._lock:
            try:
                return self._nodes[inode]
            except KeyError:
                raise NotFoundError(f"inode {inode} is not known (forgotten or stale)") from None

    def __len__(self) -> int:
        """Number of live inodes (tests assert that forget() drops them)."""
        with self._lock:
            return len(self._nodes)

    def _child(self, parent: Node, name: str, kind: Kind, *, discriminator: str = "",
               version: VersionRecord | None = None, entry: IndexEntry | None = None) -> Node:
        """The node for (parent, name, discriminator), created with lookup count 0 if new."""
        key = (parent.inode, name, discriminator)
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None:
                return self._nodes[inode]
            node = Node(self._next_inode, kind, parent.inode, name, key, parent.entity, parent.project,
                        parent.collection, version or parent.version, entry)
            self._next_inode += 1
            self._nodes[node.inode] = node
            self._by_key[key] = node.inode
            return node

    def draft_node(self, parent: Node, name: str, kind: Kind, draft_id: str, nid: int, dattr: Any) -> Node:
        """The node of draft node ``nid`` (created with lookup count 0 if new).

        Keyed by (draft, node id), not by name: after a rename the same inode is found under
        the new name, and parent/name are refreshed here on every lookup.
        """
        key = (0, draft_id, str(nid))
        with self._lock:
            inode = self._by_key.get(key)
            node = self._nodes.get(inode) if inode is not None else None
            if node is None:
                node = Node(self._next_inode, kind, parent.inode, name, key, parent.entity, parent.project,
                            parent.collection, None, None, draft_id=draft_id, nid=nid)
                self._next_inode += 1
                self._nodes[node.inode] = node
                self._by_key[key] = node.inode
            node.parent, node.name, node.dattr = parent.inode, name, dattr
            return node

    def new_fh(self) -> int:
        """A file handle number unique across version files and draft files."""
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            return fh

    def forget_listings(self, entity: str, project: str, collection: str | None = None) -> list[tuple[int, str]]:
        """Drop what the store told us about a project (a draft was created, removed or committed).

        Returns (project inode, name) of the alias directories of ``collection`` the kernel may
        still have cached, for the daemon to invalidate (their entry timeout would also expire).
        """
        with self._lock:
            listings: tuple[tuple[str, ...], ...] = (("entities",), ("projects", entity), ("project", entity, project))
            for key in listings:
                self._listings.pop(key, None)
            if collection is None:
                return []
            for key in [k for k in self._aliases if k[:3] == (entity, project, collection)]:
                self._aliases.pop(key, None)
            return [(n.parent, n.name) for n in self._nodes.values()
                    if n.kind is Kind.ALIAS_DIR and n.entity == entity and n.project == project
                    and n.collection == collection]

    def remember_all(self, nodes: list[Node]) -> None:
        """:meth:`remember` for each of ``nodes`` (the accepted entries of one readdir reply)."""
        with self._lock:
            live = self._nodes
            for node in nodes:
                node.lookups += 1
                if live.get(node.inode) is not node:
                    live[node.inode] = node
                    self._by_key[node.key] = node.inode

    def remember(self, node: Node) -> None:
        """Add one lookup reference (a lookup reply or an accepted readdirplus entry)."""
        with self._lock:
            node.lookups += 1
            if self._nodes.get(node.inode) is not node:  # forgotten meanwhile: re-register
                self._nodes[node.inode] = node
                self._by_key[node.key] = node.inode

    def release_unreferenced(self, node: Node) -> None:
        """Drop a node produced for a readdir entry the kernel did not accept."""
        with self._lock:
            if node.lookups <= 0 and node.inode != ROOT_INODE:
                self._drop(node)

    def forget(self, inode: int, nlookup: int) -> None:
        with self._lock:
            node = self._nodes.get(inode)
            if node is None or inode == ROOT_INODE:
                return
            node.lookups -= nlookup
            if node.lookups <= 0:
                self._drop(node)

    def _drop(self, node: Node) -> None:
        self._nodes.pop(node.inode, None)
        if self._by_key.get(node.key) == node.inode:
            del self._by_key[node.key]

    # -- local-only mode ---------------------------------------------------------------
    @contextlib.contextmanager
    def local_only(self) -> Iterator[None]:
        """Within the block, anything needing I/O raises :class:`NeedsIO` instead."""
        self._mode.local = True
        try:
            yield
        finally:
            self._mode.local = False

    def run_local(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in local-only mode (what :meth:`local_only` does, without building a
        context manager per request)."""
        mode = self._mode
        mode.local = True
        try:
            return fn(*args)
        finally:
            mode.local = False

    def _io(self) -> None:
        if getattr(self._mode, "local", False):
            raise NeedsIO()

    def _index(self, node: Node) -> ManifestIndex:
        assert node.version is not None
        idx = self.indexes.peek(node.version.manifest_md5)
        if idx is not None:
            return idx
        self._io()
        return self.indexes.get(node.version.blob_entity, node.version.manifest_md5)

    # -- store queries (cached) --------------------------------------------------------
    def _listing(self, key: tuple[str, ...], fetch: Callable[[], Any]) -> Any:
        with self._lock:
            hit = self._listings.get(key)
        if hit is not None:
            return hit
        self._io()
        value = fetch()  # store I/O outside the lock
        with self._lock:
            self._listings[key] = value
        return value

    def _resolve(self, entity: str, project: str, collection: str, selector: str) -> VersionRecord:
        cache = self._versions if names.is_version_selector(selector) else self._aliases
        key = (entity, project, collection, selector)
        with self._lock:
            hit = cache.get(key)
        if hit is not None:
            return hit
        self._io()
        record = self.store.resolve(entity, project, collection, selector)
        with self._lock:
            cache[key] = record
            self._versions[(entity, project, collection, record.version)] = record
        return record

    def _project_listing(self, entity: str, project: str) -> list[tuple[str, Kind, VersionRecord | None]]:
        def fetch() -> list[tuple[str, Kind, VersionRecord | None]]:
            out: list[tuple[str, Kind, VersionRecord | None]] = []
            try:
                collections, all_versions = self.store.list_project(entity, project)  # one call
            except NotFoundError:  # a project that exists only as drafts (or a fresh mkdir)
                if self.drafts is None:
                    raise
                collections, all_versions = [], []
            by_collection: dict[str, dict[int, VersionRecord]] = {}
            for v in all_versions:
                by_collection.setdefault(v.collection, {})[v.index] = v
            for coll in collections:
                versions = by_collection.get(coll.name, {})
                for idx in sorted(versions):
                    out.append((f"{coll.name}:v{idx}", Kind.VERSION_DIR, versions[idx]))
                for alias, idx in sorted(coll.aliases.items()):
                    if idx in versions:
                        out.append((f"{coll.name}:{alias}", Kind.ALIAS_DIR, versions[idx]))
            if self.drafts is not None:
                out.extend((n, Kind.DRAFT_DIR, None) for n in self.drafts.list_names(entity, project))
            # Prime the resolution caches: a listing already told us what every name means.
            with self._lock:
                for name, kind, rec in out:
                    if rec is not None:
                        coll_name, _, sel = name.rpartition(":")
                        cache = self._versions if kind is Kind.VERSION_DIR else self._aliases
                        cache[(entity, project, coll_name, sel)] = rec
            return out

        return self._listing(("project", entity, project), fetch)

    # -- lookup --------------------------------------------------------------------------
    def lookup(self, inode_p: int, name: str) -> Node:
        """Resolve ``name`` in directory ``inode_p``; the result's lookup count is raised."""
        parent = self.node(inode_p)
        if name == ".":
            node = parent
        elif name == "..":
            node = self.node(parent.parent)
        else:
            node = self._lookup_child(parent, name)
        self.remember(node)
        if self.on_version is not None and node.kind is Kind.VERSION_DIR:
            self.on_version(node)
        return node

    def lookup_unremembered(self, inode_p: int, name: str) -> Node:
        """Resolve ``name`` without counting a lookup (the caller's reply counts it)."""
        return self._lookup_child(self.node(inode_p), name)

    def _lookup_child(self, parent: Node, name: str) -> Node:
        kind = parent.kind
        if kind is Kind.ROOT:
            if name not in self._entities():
                raise NotFoundError(f"no entity {name!r}")
            node = self._child(parent, name, Kind.ENTITY)
            node.entity = name
            return node
        if kind is Kind.ENTITY:
            if name not in self._projects(parent.entity):
                raise NotFoundError(f"no project {parent.entity}/{name}")
            node = self._child(parent, name, Kind.PROJECT)
            node.project = name
            return node
        if kind is Kind.PROJECT:
            return self._lookup_version(parent, name)
        if kind is Kind.TREE_FILE or kind is Kind.DRAFT_FILE:
            raise NotDirectoryError("not a directory")
        if kind in DRAFT_KINDS:
            assert self.drafts is not None
            return self.drafts.lookup_child(self, parent, name)
        if kind in VERSIONED:
            index = self._index(parent)
            entry = index.lookup(parent.dir_id, name)
            if entry is None:
                assert parent.version is not None  # a versioned node always has its version
                raise NotFoundError(f"{parent.version.qualified_name} has no {name!r} here")
            return self._child(parent, name, Kind.TREE_DIR if entry.is_dir else Kind.TREE_FILE, entry=entry)
        raise NotFoundError(f"{name!r} not found")

    def _entities(self) -> set[str]:
        """Entities of the store, plus those that exist only as drafts or fresh mkdirs."""
        found = set(self._listing(("entities",), self.store.list_entities))
        return found | self.drafts.extra_entities() if self.drafts is not None else found

    def _projects(self, entity: str) -> set[str]:
        """Projects of the store, plus those that exist only as drafts or fresh mkdirs."""
        if self.drafts is None:
            return set(self._listing(("projects", entity), lambda: self.store.list_projects(entity)))
        extra = self.drafts.extra_projects(entity)
        try:
            return set(self._listing(("projects", entity), lambda: self.store.list_projects(entity))) | extra
        except NotFoundError:  # an entity the registry does not know yet
            if extra or entity in self.drafts.extra_entities():
                return extra
            raise

    def _lookup_version(self, parent: Node, name: str) -> Node:
        if self.drafts is not None:
            # ``ds@draft`` reaches the draft ``ds:draft`` too (made only as ``ds:draft``)
            spelled = name if ":" in name else ":".join(name.rpartition(COLON_FREE_SEP)[::2])
            if self.drafts.is_draft_name(spelled):
                return self.drafts.lookup(self, parent, spelled)
        collection, sep, selector = name.rpartition(":")
        if not sep:  # the colon-free spelling <collection>@<version or alias> (rsync, tar, PYTHONPATH)
            collection, sep, selector = name.rpartition(COLON_FREE_SEP)
        if not sep or not collection or not selector:
            raise NotFoundError(f"{name!r} is not <collection>:<version or alias>")
        names.validate_collection(collection)  # InvalidNameError -> ENOENT: such a name cannot exist
        record = self._resolve(parent.entity, parent.project, collection, selector)
        if names.is_version_selector(selector):
            node = self._child(parent, name, Kind.VERSION_DIR, version=record)
        else:
            node = self._child(parent, name, Kind.ALIAS_DIR, discriminator=record.id, version=record)
        node.collection = collection
        return node

    def version_at(self, rel: str) -> VersionRecord:
        """The version that the mount-relative ``<entity>/<project>/<collection>:vN`` names
        (a store request unless resolved before; no node is made)."""
        parts = rel.split("/")
        collection, sep, selector = parts[-1].rpartition(":")
        if len(parts) != 3 or not sep or not collection or not names.is_version_selector(selector):
            raise NotFoundError(f"{rel!r} is not <entity>/<project>/<collection>:vN")
        names.validate_collection(collection)
        return self._resolve(parts[0], parts[1], collection, selector)

    def walk(self, path: str) -> Node:
        """Resolve a mount-relative path by successive lookups (each one counted)."""
        node = self._nodes[ROOT_INODE]
        for part in [p for p in path.split("/") if p]:
            node = self.lookup(node.inode, part)
        return node

    def path_of(self, node: Node) -> str:
        """Mount-relative path of a live node (for messages and xattrs)."""
        parts: list[str] = []
        with self._lock:
            while node.inode != ROOT_INODE:
                parts.append(node.name)
                node = self._nodes.get(node.parent) or self._nodes[ROOT_INODE]
        return "/".join(reversed(parts))

    def idle_files_below(self, rel: str, version_id: str) -> list[int]:
        """Inodes of the live file nodes of version ``version_id`` below the mount-relative
        directory ``rel`` that no handle holds open; those held are handed to ``on_unused`` at
        their last release."""
        with self._lock:
            files = [n for n in self._nodes.values() if n.kind is Kind.TREE_FILE
                     and n.version is not None and n.version.id == version_id]
        prefix = rel.rstrip("/") + "/"
        below = [n.inode for n in files if self.path_of(n).startswith(prefix)]
        with self._lock:
            busy = {i for i in below if i in self._opens}
            self._unused_wanted |= busy
        return [i for i in below if i not in busy]

    # -- attributes ----------------------------------------------------------------------
    def attr(self, node: Node) -> Attr:
        cfg = self.config
        if node.kind in DRAFT_KINDS:
            assert self.drafts is not None
            return self.drafts.attr(self, node, fresh=False)
        if node.kind in VERSIONED:
            assert node.version is not None
            mtime = int(node.version.created_at.timestamp() * 1e9)
            entry_timeout = cfg.alias_ttl if node.kind is Kind.ALIAS_DIR else cfg.version_ttl
            if node.kind is Kind.TREE_FILE:
                assert node.entry is not None
                return Attr(node.inode, self._file_mode(node.entry), 1, node.entry.size, mtime, cfg.uid, cfg.gid,
                            entry_timeout, cfg.version_ttl)
            # nlink 1 on version roots means "unknown" to find(1) and costs no index build.
            nlink = 2 + node.entry.subdirs if node.entry is not None else 1
            return Attr(node.inode, stat.S_IFDIR | cfg.dir_mode, nlink, 0, mtime, cfg.uid, cfg.gid, entry_timeout, cfg.version_ttl)
        return Attr(node.inode, stat.S_IFDIR | cfg.dir_mode, 1, 0, self._mounted_ns, cfg.uid, cfg.gid, cfg.alias_ttl, cfg.alias_ttl)

    def _file_mode(self, entry: IndexEntry) -> int:
        """st_mode of a version file: a symbolic link (``extra.symlink``) is 0777 like any
        link; an executable (``extra.executable``) gets ``x`` wherever ``--file-mode`` has ``r``."""
        mode = self.config.file_mode
        if entry.extra is not None and (_SYMLINK_JSON in entry.extra or _EXECUTABLE_JSON in entry.extra):
            extra = json.loads(entry.extra)  # JSON text; most entries have none
            if symlink_target(extra) is not None:
                return stat.S_IFLNK | 0o777
            if extra.get(EXECUTABLE_KEY) is True:
                mode |= (mode & 0o444) >> 2
        return stat.S_IFREG | mode

    def readlink(self, inode: int) -> str:
        """The target of a version's symbolic link (EINVAL for anything else)."""
        node = self.node(inode)
        target = None
        if node.kind is Kind.TREE_FILE and node.entry is not None and node.entry.extra is not None:
            target = symlink_target(json.loads(node.entry.extra))
        if target is None:
            raise InvalidArgumentError("not a symbolic link")
        return target

    def getattr(self, inode: int) -> Attr:
        node = self.node(inode)
        if node.kind in DRAFT_KINDS:  # mutable: ask the draft, not the attributes of the last lookup
            assert self.drafts is not None
            return self.drafts.attr(self, node, fresh=True)
        return self.attr(node)

    # -- directories ---------------------------------------------------------------------
    def opendir(self, inode: int) -> int:
        node = self.node(inode)
        if not node.is_dir:
            raise NotDirectoryError("not a directory")
        if self.on_version is not None and node.kind is Kind.VERSION_DIR:
            self.on_version(node)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._dir_handles[fh] = DirHandle(node)
        return fh

    def dir_inode(self, fh: int) -> int:
        with self._lock:
            handle = self._dir_handles.get(fh)
        if handle is None:
            raise BadHandleError("bad directory handle")
        return handle.node.inode

    def releasedir(self, fh: int) -> None:
        with self._lock:
            self._dir_handles.pop(fh, None)

    def readdir_page(self, fh: int, start_id: int, limit: int = 256) -> list[tuple[int, str, Node]]:
        """Up to ``limit`` entries after cookie ``start_id`` as (next cookie, name, node).

        Nodes come back with their lookup count unchanged: the caller calls
        :meth:`remember` for each entry the kernel accepts and :meth:`release_unreferenced`
        for the first one it refuses.
        """
        with self._lock:
            handle = self._dir_handles.get(fh)
        if handle is None:
            raise BadHandleError("bad directory handle")
        node = handle.node
        if node.kind in DRAFT_KINDS:
            assert self.drafts is not None
            return self.drafts.readdir_page(self, node, start_id, limit)
        if node.kind in VERSIONED:
            assert node.version is not None
            key = (node.inode, start_id, limit)
            with self._lock:
                page = self._pages.get(key)
                nodes = self._nodes
                if page is not None and all(nodes.get(child.inode) is child for _, _, child in page):
                    return page  # every node still live: nothing the kernel forgot in between
            if handle.index is None:
                handle.index = self._index(node)
            page = [(e.id, e.name, self._child(node, e.name, Kind.TREE_DIR if e.is_dir else Kind.TREE_FILE, entry=e))
                    for e in handle.index.children(node.dir_id, start_id, limit)]
            with self._lock:
                self._pages[key] = page
            return page
        if handle.snapshot is None or start_id == 0:
            handle.snapshot = self._snapshot(node)
        out = []
        for pos in range(start_id, min(start_id + limit, len(handle.snapshot))):
            name, kind, record = handle.snapshot[pos]
            out.append((pos + 1, name, self._virtual_child(node, name, kind, record)))
        return out

    def _snapshot(self, node: Node) -> list[tuple[str, Kind, VersionRecord | None]]:
        if node.kind is Kind.ROOT:
            return [(n, Kind.ENTITY, None) for n in sorted(self._entities())]
        if node.kind is Kind.ENTITY:
            return [(n, Kind.PROJECT, None) for n in sorted(self._projects(node.entity))]
        if node.kind is Kind.PROJECT:
            return self._project_listing(node.entity, node.project)
        return []

    def _virtual_child(self, parent: Node, name: str, kind: Kind, record: VersionRecord | None) -> Node:
        if kind is Kind.ENTITY:
            child = self._child(parent, name, kind)
            child.entity = name
        elif kind is Kind.PROJECT:
            child = self._child(parent, name, kind)
            child.project = name
        elif kind is Kind.DRAFT_DIR:
            assert self.drafts is not None
            return self.drafts.lookup(self, parent, name)
        else:
            assert record is not None
            disc = record.id if kind is Kind.ALIAS_DIR else ""
            child = self._child(parent, name, kind, discriminator=disc, version=record)
            child.collection = name.rpartition(":")[0]
        return child

    # -- files ---------------------------------------------------------------------------
    def open(self, inode: int, flags: int) -> tuple[int, FileRef]:
        """Open a file read-only, pinning it to its content; EROFS for any write intent."""
        node = self.node(inode)
        if node.is_dir:
            raise IsDirectoryError("is a directory")
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise ReadOnlyError("artifact versions are read-only")
        ref = node.pinned
        if ref is None:
            ref = self._pin(node)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._file_handles[fh] = ref
            self._handle_inode[fh] = inode
            self._opens[inode] = self._opens.get(inode, 0) + 1
        return fh, ref

    def _pin(self, node: Node) -> FileRef:
        """The FileRef of a version file (a stored blob's is kept on its node: immutable)."""
        entry, version = node.entry, node.version
        assert entry is not None and version is not None
        source = None
        entity = version.blob_entity
        if entry.ref is not None and entry.ref.startswith(ARTIFACT_REF_SCHEME) and entry.md5 is not None:
            # another version's file: its blob, read from that version's (source) entity
            entity = self._listing(("artifact-ref", entry.ref.split("/")[2]),
                                   lambda: artifact_ref_entity(self.store, str(entry.ref)))
        elif entry.ref is not None:
            self._io()  # describing a file:// reference may stat its path: a worker thread does it
            source = describe(entry.ref, entry.md5, entry.size, entry.extra, self.path_of(node))
            if source is None:
                raise NotSupportedError(f"{entry.name} is a reference ({entry.ref}) the mount cannot read "
                                             "(a tracked-only scheme, or checksum=False without a size)")
        elif entry.md5 is None:
            raise NotSupportedError(f"{entry.name} has no md5 digest; its content is not in the store")
        ref = FileRef(entity, source.key if source else str(entry.md5), entry.size,
                      version.qualified_name, self.path_of(node), source,
                      directory=None if entry.ref is not None else (version.manifest_md5, entry.parent, entry.id))
        if entry.ref is None:  # a reference is described afresh per open (its source may be checked)
            node.pinned = ref
        return ref

    def directory_files(self, entity: str, directory: tuple[str, int, int],
                        limit: int = SIBLING_BATCH) -> list[tuple[int, str, int]]:
        """(row id, md5, size) of the stored files of one version directory, in listing order,
        from row ``directory[2]`` on (the opened file itself first), at most ``limit``: the
        content layer batches block maps and URLs of siblings, and prefetches ahead of a
        reader walking the directory.  Runs in a worker thread (the index is open already)."""
        manifest_md5, dir_id, first = directory
        index = self.indexes.get(entity, manifest_md5)
        out: list[tuple[int, str, int]] = []
        after = first - 1
        while len(out) < limit:
            page = index.children(dir_id, after, min(512, limit))
            if not page:
                break
            out.extend((e.id, e.md5, e.size) for e in page if not e.is_dir and e.md5 is not None and e.ref is None)
            after = page[-1].id
        return out[:limit]

    def file(self, fh: int) -> FileRef:
        with self._lock:
            try:
                return self._file_handles[fh]
            except KeyError:
                raise BadHandleError("bad file handle") from None

    def release(self, fh: int) -> None:
        unused = None
        with self._lock:
            self._file_handles.pop(fh, None)
            inode = self._handle_inode.pop(fh, None)
            if inode is not None:
                left = self._opens.pop(inode) - 1
                if left:
                    self._opens[inode] = left
                elif inode in self._unused_wanted:
                    self._unused_wanted.discard(inode)
                    unused = inode
        if unused is not None and self.on_unused is not None:
            self.on_unused(unused)

    # -- writes: everything here is read-only ------------------------------------------
    def check_writable(self, inode_p: int, name: str | None = None) -> None:
        """Raise the errno a write-type operation the drafts do not take gets (xattr writes):
        ENOTSUP inside a draft (it has no extended attributes to keep), EROFS elsewhere."""
        node = self.node(inode_p)
        if node.kind in DRAFT_KINDS:
            raise NotSupportedError("drafts keep no extended attributes")
        raise ReadOnlyError("artifact versions are read-only")

    # -- extended attributes -------------------------------------------------------------
    def xattrs(self, inode: int) -> dict[str, bytes]:
        node = self.node(inode)
        if node.kind in DRAFT_KINDS:
            assert self.drafts is not None
            return self.drafts.xattrs(self, node)
        version = node.version
        if node.kind is Kind.ROOT and self.stats is not None:
            return {"user.artifactfs.stats": json.dumps(self.stats(), sort_keys=True).encode()}
        if version is None:
            return {}
        out = {"user.artifact.version": version.qualified_name.encode()}
        if node.kind in (Kind.VERSION_DIR, Kind.ALIAS_DIR):
            version = self._fresh(version)  # aliases/metadata may change; content cannot
            out.update({
                "user.artifact.digest": version.digest.encode(),
                "user.artifact.aliases": ",".join(version.aliases).encode(),
                "user.artifact.tags": ",".join(version.tags).encode(),
                "user.artifact.type": version.type.encode(),
                "user.artifact.metadata": json.dumps(version.metadata, sort_keys=True).encode(),
                "user.artifact.description": (version.description or "").encode(),
                "user.artifact.id": version.id.encode(),
                "user.artifact.created_at": version.created_at.isoformat().encode(),
            })
        elif node.kind is Kind.TREE_FILE and node.entry is not None:
            e = node.entry
            if e.md5 is not None:
                out["user.artifact.digest"] = hex_to_b64(e.md5).encode()
                out["user.artifact.md5"] = e.md5.encode()
            if e.ref is not None:
                out["user.artifact.ref"] = e.ref.encode()
            if e.extra:
                out["user.artifact.extra"] = e.extra.encode()
                recorded = json.loads(e.extra)
                if e.ref is not None and recorded.get("etag"):
                    out["user.artifact.etag"] = str(recorded["etag"]).strip('"').encode()
                if e.ref is not None and recorded.get("versionID"):
                    out["user.artifact.version_id"] = str(recorded["versionID"]).encode()
        return out

    def getxattr(self, inode: int, name: str) -> bytes:
        if not name.startswith("user."):
            # Only user.* attributes exist here: no ACLs, no security labels or capabilities.
            # ENOTSUP (not ENODATA) says so for the whole filesystem, and `ls -l` remembers it
            # per device: it stops asking for security.selinux and system.posix_acl_access on
            # every file (two FUSE requests each, the bulk of an `ls -lR`).  The kernel only
            # disables getxattr for good on ENOSYS, so user.* keeps working.
            raise NotSupportedError(f"{name}: only user.* attributes are supported")
        try:
            return self.xattrs(inode)[name]
        except KeyError:
            raise NoAttributeError(f"no attribute {name}") from None

    def _fresh(self, version: VersionRecord) -> VersionRecord:
        def fetch() -> VersionRecord:
            return self.store.get_version(version.id)

        try:
            return self._listing(("version", version.id), fetch)
        except NotFoundError:
            return version  # deleted since: still describe what this directory shows
