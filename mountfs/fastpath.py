"""The fast path: a fully cached ``<collection>:vN`` served by the kernel, not by FUSE requests.

With ``artifactfs mount --fast-path``, a version directory that is looked up or listed is
checked in the background (at most every :data:`RECHECK` seconds per version).  When every
file of it is a verified object in the local cache, the daemon builds a *tree* for it::

    <cache>/fastpath/<owner>/<version>/     directories (dir mode, the version's time)
        a/b.bin  -> hard link to <cache>/objects/..  (the verified object itself)
        link     -> symbolic link (an ``extra.symlink`` entry)
        empty    -> an empty file of its own

and bind-mounts it, read-only (``ro,nosuid,nodev``), over ``MOUNT/<e>/<p>/<coll>:vN``.  From
then on ``open``/``read``/``stat``/``readdir`` below that directory are answered by the cache's
own filesystem: no FUSE round trip per file.  ``<owner>`` is ``<pid>-<start time>`` of the
daemon, so trees of a daemon that died are told apart from live ones and removed by the next
daemon that opens the cache (:func:`clean_stale`).

Rules (docs/ARCHITECTURE.md "The fast path", docs/SEMANTICS.md "Fast path"):

* Only immutable ``:vN`` directories under their ``:`` name qualify (never ``:latest`` and
  other aliases, which move; never the colon-free ``@`` spelling, which stays on the FUSE path
  with its xattrs), and only versions whose files are all stored content with a read-only
  mode: no references, no executables (a link shares the object's inode, and so its mode).
* The tree links only objects verified for it (a valid verified marker, else a whole md5
  check), and each link is checked to name the very inode that was verified.
* Pinning: the linked objects' index rows are pinned (``CacheIndex.pin``) before they are
  linked, so eviction (by this daemon or any process sharing the cache) never removes them
  while a tree serves them; the cache bound still holds because they stay counted.  Trees may
  pin at most :data:`PIN_SHARE` of the bound together.  Unpinned when the tree goes (unless
  another tree still links the object: its link count says so).
* A sweep every ``sweep`` seconds stats every linked file and its cache name: one whose inode,
  size or mtime changed (a write to the cache behind the mount's back), or that is no longer
  the cache's object (dropped: it would no longer be counted in the bound), tears its tree down
  at once, and so does a bind that vanished (the kernel detaches the binds of a FUSE dentry it
  invalidates, or someone ran ``umount``).
* Unmount: SIGTERM/SIGINT detach the binds before the FUSE session ends; ``artifactfs umount``
  detaches them (:func:`detach_binds_under`) before unmounting; ``fusermount3 -uz`` takes them
  with the mount.  After SIGKILL the binds stay on the dead mount until ``fusermount3 -uz``
  (which a dead mount needs anyway); the tree and pins go at the next daemon start.

Needs ``CAP_SYS_ADMIN`` (root): without it the first bind fails with EPERM, the fast path turns
itself off (logged once) and the mount serves everything through FUSE as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from client.atomic import atomic_write
from client.cache import Cache, has_verified_marker, set_verified_marker
from client.errors import InvalidNameError, NotFoundError
from client.hashing import md5_fd
from client.manifest import EXECUTABLE_KEY, symlink_target

from .daemon import _unescape
from .manifest_index import ROOT_ID, IndexEntry, ManifestIndex
from .namespace import Kind

if TYPE_CHECKING:
    from client.store.base import VersionRecord

    from .namespace import Namespace, Node

log = logging.getLogger(__name__)

DIRNAME = "fastpath"  #: ``<cache>/fastpath/``
RECHECK = 30.0  #: seconds before a version that did not qualify is checked again
PIN_SHARE = 0.5  #: fraction of the cache bound that fast-path trees may pin together
CANDIDATES = 64  #: versions found not fully cached that each sweep checks again
MISSING_TRACK = 100_000  #: objects missing from candidates that are waited for by name, all together
RECENT = "recent.json"  #: ``<cache>/fastpath/recent.json``: the versions mounts of this cache checked
RECENT_MAX = 64  #: entries kept in it, newest last
RESTORE_WAIT = 5.0  #: seconds the daemon's readiness waits for the recent versions' binds
#: objects larger than this get a verified marker once hashed for a tree (smaller ones are
#: cheaper to hash again than to fdatasync + setxattr; the mount re-checks them on open anyway)
MARK_OVER = 2 << 20

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def bind_readonly(source: Path, target: str) -> None:
    """Bind ``source`` over ``target``, then make that bind read-only, nosuid, nodev."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), f"bind {target}")
    try:
        _check(_libc.mount(None, os.fsencode(target), None,
                           MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None), f"remount {target} ro")
    except OSError:
        detach(target)
        raise


def detach(target: str) -> None:
    """Lazily unmount ``target`` (open files below it keep working); OSError if it fails."""
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), f"detach {target}")


def _mounts() -> Iterator[tuple[str, str]]:
    """(mount point, root within its filesystem) of every mount of this mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            yield _unescape(fields[4]), _unescape(fields[3])


def _is_tree_root(root: str) -> bool:
    """Whether a mount's root is a fast-path tree: ``…/fastpath/<pid>-<start>/<version>``."""
    parts = root.rstrip("/").split("/")
    return len(parts) >= 3 and parts[-3] == DIRNAME and re.fullmatch(r"\d+-\d+", parts[-2]) is not None


def detach_binds_under(mountpoint: str | os.PathLike[str]) -> int:
    """Detach every fast-path bind below ``mountpoint`` (``artifactfs umount`` before the
    unmount itself, which binds below it would make EBUSY).  Returns how many went."""
    prefix = os.fspath(mountpoint).rstrip("/") + "/"
    done = 0
    for point, root in list(_mounts()):
        if point.startswith(prefix) and _is_tree_root(root):
            try:
                detach(point)
                done += 1
            except OSError as exc:
                log.warning("%s", exc)
    return done


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_name(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid)}"


def _alive(owner: str) -> bool:
    pid, _, start = owner.partition("-")
    return pid.isdigit() and _start_time(int(pid)) == start


def _remove_tree(path: Path) -> None:
    """rmtree of a tree whose directories are read-only (a non-root daemon needs u+w first)."""
    def retry(func: Callable[[str], object], p: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            func(p)

    if path.exists():
        shutil.rmtree(path, onerror=retry)


def _unpin_unlinked(cache: Cache, keys: list[str]) -> None:
    """Unpin the objects of ``keys`` that no tree links any more (link count back to 1)."""
    free = []
    for key in keys:
        try:
            if os.stat(cache.path(key)).st_nlink <= 1:
                free.append(key)
        except FileNotFoundError:
            free.append(key)
    cache.index.unpin(free, time.time_ns())


def clean_stale(cache: Cache) -> int:
    """Remove the trees (and release the pins) of daemons that are gone; returns how many.

    Their binds are detached first where they are still mounted (on another mountpoint, or
    a dead mount nobody unmounted: best effort, a failure is logged)."""
    root = cache.root / DIRNAME
    if not root.is_dir():
        return 0
    gone = [p for p in root.iterdir() if p.is_dir() and not _alive(p.name)]
    if not gone:
        return 0
    names = {p.name for p in gone}
    for point, mroot in list(_mounts()):
        if _is_tree_root(mroot) and mroot.rstrip("/").split("/")[-2] in names:
            with contextlib.suppress(OSError):
                detach(point)
    for owner in gone:
        keys: list[str] = []
        for listing in owner.glob("*.keys"):
            with contextlib.suppress(OSError):
                keys += listing.read_text(encoding="ascii").split()
        _remove_tree(owner)
        _unpin_unlinked(cache, keys)
        log.info("removed the fast-path trees of a daemon that is gone (%s, %d objects unpinned)", owner.name, len(keys))
    return len(gone)


class NotEligible(Exception):
    """The version cannot be served by a tree (a reference, an executable, too big)."""


class NotCached(Exception):
    """Some object of the version is not (or no longer) in the cache."""

    def __init__(self, message: str, missing: set[str] | None = None) -> None:
        super().__init__(message)
        self.missing = missing  #: md5 of every object missing, when the check counted them all


@dataclass
class Tree:
    """One bound version."""

    name: str  #: entity/project/collection:vN
    target: str  #: the version directory on the mount
    path: Path  #: the tree under <cache>/fastpath/<owner>/
    keys: list[str]  #: md5 of every linked object (pinned)
    #: (link, md5, inode, size, mtime_ns) of every linked file, for the sweep
    files: list[tuple[str, str, int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    version: VersionRecord
    rel: str  #: mount-relative path of the version directory


class FastPath:
    """The daemon's fast-path trees: background checks, builds, binds, sweeps, teardown."""

    def __init__(self, cache: Cache, ns: Namespace, mountpoint: str, *, sweep: float = 60.0,
                 dir_mode: int = 0o555, file_mode: int = 0o444, uid: int | None = None, gid: int | None = None,
                 drop_pages: Callable[[int], None] = lambda inode: None, location: str = "",
                 trusted: Callable[[int, str, os.stat_result], bool] = has_verified_marker) -> None:
        self.cache, self.ns, self.mountpoint = cache, ns, mountpoint
        #: whether an open cache object is known to hash to its md5 (its verified marker; the
        #: daemon's ContentReader.trusted also knows what this daemon checked or installed)
        self._trusted = trusted
        self.location = location  #: the store's, to tell its entries in RECENT from other stores'
        #: set once the versions in RECENT were checked (and bound if they qualify) at start
        self.restored = threading.Event()
        self.sweep_every = sweep
        #: drops the kernel's cached pages of a FUSE inode (the daemon's pyfuse3.invalidate_inode)
        self._drop_pages = drop_pages
        self.dir_mode = dir_mode
        self.owner = owner_name()
        self.dir = cache.root / DIRNAME / self.owner
        self._lock = threading.Lock()  #: never held across a path walk through the mount
        self._bind_lock = threading.Lock()  #: held across a bind; never taken on the trio loop
        self._jobs: queue.Queue[_Job | int | None] = queue.Queue()  #: checks; an int: pages to drop
        self._trees: dict[str, Tree] = {}  #: by version id
        self._checked: dict[str, float] = {}  #: version id -> when it was last queued
        #: versions whose last check found objects missing, checked again at each sweep (oldest
        #: first out past CANDIDATES): a version read to its end through FUSE is bound without
        #: another lookup, which the kernel's cached dentry would never send
        self._candidates: dict[str, _Job] = {}
        #: what each candidate still misses, and who waits for each object: the object that
        #: completes a candidate queues its check at once (Cache.on_installed -> object_cached)
        self._missing: dict[str, set[str]] = {}
        self._waiters: dict[str, set[str]] = {}
        self._closing = False
        self._thread: threading.Thread | None = None
        self.counts = {"checks": 0, "not_cached": 0, "not_eligible": 0, "torn_down": 0, "failed": 0,
                       "rechecks": 0, "pages_dropped": 0, "restores": 0, "completed": 0, "hashed": 0}
        # A hard link shares the object's owner and mode: only what the objects carry can be shown.
        st = os.stat(cache.objects_dir)
        self.enabled = (file_mode == 0o444 and uid in (None, st.st_uid) and gid in (None, st.st_gid))
        if not self.enabled:
            log.warning("fast path off: --file-mode/--uid/--gid differ from the cache objects' (0444, owner %d:%d)",
                        st.st_uid, st.st_gid)

    # -- the namespace's hook (on the trio loop or a worker thread: never blocks) ---------
    def notice(self, node: Node) -> None:
        """A version directory was looked up or listed: queue a check if it may qualify."""
        if node.kind is not Kind.VERSION_DIR or ":" not in node.name or node.version is None or not self.enabled:
            return
        vid, now = node.version.id, time.monotonic()
        with self._lock:
            if self._closing or vid in self._trees or now - self._checked.get(vid, -RECHECK) < RECHECK:
                return
            self._checked[vid] = now
        self._jobs.put(_Job(node.version, self.ns.path_of(node)))

    def start(self) -> None:
        """Start the worker (after the FUSE session is live: binds resolve paths through it)."""
        self._thread = threading.Thread(target=self._work, name="artifactfs-fastpath", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._restore()
        except Exception as exc:  # noqa: BLE001 - a hint only: the FUSE path serves meanwhile
            log.warning("fast path: the recent versions were not checked: %s", exc)
        finally:
            self.restored.set()
        next_sweep = time.monotonic() + self.sweep_every
        while True:
            try:
                job = self._jobs.get(timeout=max(0.01, next_sweep - time.monotonic()))
            except queue.Empty:
                pass
            else:
                if job is None:
                    return
                if isinstance(job, int):
                    self._drop_one(job)
                else:
                    self._remember(job)
                    self._run(job)
            if time.monotonic() >= next_sweep:
                self.sweep()
                self._recheck()
                next_sweep = time.monotonic() + self.sweep_every

    # -- the versions of recent mounts ---------------------------------------------------
    def _recent(self) -> list[dict[str, str]]:
        try:
            entries = json.loads((self.cache.root / DIRNAME / RECENT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        ok = isinstance(entries, list) and all(isinstance(e, dict) for e in entries)
        return [e for e in entries if {"store", "rel", "id"} <= e.keys()] if ok else []

    def _remember(self, job: _Job) -> None:
        """Note a version this mount was asked for, so the next mount of the cache checks it at
        its start: a remount binds what it can before its first reader looks (a hint, shared
        by the mounts of the cache; the last writer wins)."""
        entry = {"store": self.location, "rel": job.rel, "id": job.version.id}
        entries = [e for e in self._recent() if (e["store"], e["rel"]) != (entry["store"], entry["rel"])]
        entries = [*entries, entry][-RECENT_MAX:]
        try:
            (self.cache.root / DIRNAME).mkdir(parents=True, exist_ok=True)
            with atomic_write(self.cache.root / DIRNAME / RECENT, mode=0o644, durable=False) as f:
                f.write(json.dumps(entries).encode())
        except OSError as exc:
            log.debug("fast path: %s not written: %s", RECENT, exc)

    def _restore(self) -> None:
        """At start: check (and bind) the versions recent mounts of this store were asked for,
        newest first; one whose name now resolves to another version is skipped."""
        for entry in reversed(self._recent()):
            if self._closing or not self.enabled:
                return
            if entry["store"] != self.location:
                continue
            try:
                version = self.ns.version_at(entry["rel"])
            except (NotFoundError, InvalidNameError) as exc:  # gone, or never a version's name
                log.debug("fast path: recent %s skipped: %s", entry["rel"], exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the store unreachable: the rest would wait as long
                log.info("fast path: the recent versions are not checked (%s); lookups still are", exc)
                return
            if version.id != entry["id"]:
                continue
            with self._lock:
                if version.id in self._trees:
                    continue
                self._checked[version.id] = time.monotonic()
            self._count("restores")
            self._run(_Job(version, entry["rel"]))

    def _recheck(self) -> None:
        """Check the candidates again (objects other processes put in the cache are seen only
        here).  One with a set of what it misses is checked only once none of those is still
        missing (a stat each, stopping at the first): not a pass over the version per sweep."""
        with self._lock:
            jobs = [(job, set(self._missing.get(vid, ())) if vid in self._missing else None)
                    for vid, job in self._candidates.items()]
        for job, missing in jobs:
            if self._closing:
                return
            if missing is not None and any(not self.cache.path(md5).exists() for md5 in missing):
                continue
            self._count("rechecks")
            self._run(job)

    def _run(self, job: _Job) -> None:
        vid = job.version.id
        with self._lock:
            if vid in self._trees:  # bound meanwhile (a completion and a sweep both queued it)
                self._untrack(vid)
                return
            self.counts["checks"] += 1
        try:
            self._serve(job)
        except NotCached as exc:
            self._count("not_cached")
            with self._lock:
                self._untrack(vid)
                self._candidates[vid] = job  # the newest last
                while len(self._candidates) > CANDIDATES:
                    self._untrack(next(iter(self._candidates)))
                tracked = sum(len(m) for m in self._missing.values())
                missing = exc.missing if exc.missing and tracked + len(exc.missing) <= MISSING_TRACK else set()
                if missing:
                    self._missing[vid] = set(missing)
                    for md5 in missing:
                        self._waiters.setdefault(md5, set()).add(vid)
            # An object installed between the pass's stat of it and the waiters above had no
            # one to tell: look again now that any later install will be seen.
            for md5 in missing:
                if self.cache.path(md5).exists():
                    self.object_cached(md5)
            log.debug("%s stays on the FUSE path: %s", job.version.qualified_name, exc)
            return
        except NotEligible as exc:
            self._count("not_eligible")
            log.info("%s stays on the FUSE path: %s", job.version.qualified_name, exc)
        except Exception as exc:  # noqa: BLE001 - the FUSE path still serves the version
            self._count("failed")
            log.warning("fast path for %s failed: %s", job.version.qualified_name, exc)
            if isinstance(exc, PermissionError):
                self.enabled = False
                log.warning("fast path off: binding needs CAP_SYS_ADMIN (root)")
        with self._lock:
            self._untrack(vid)

    def _untrack(self, vid: str) -> None:
        """Forget a candidate (under self._lock)."""
        self._candidates.pop(vid, None)
        for md5 in self._missing.pop(vid, ()):
            waiting = self._waiters.get(md5)
            if waiting is not None:
                waiting.discard(vid)
                if not waiting:
                    del self._waiters[md5]

    def object_cached(self, md5: str) -> None:
        """Cache.on_installed: an object is in the cache; a candidate it completes is checked
        now (on the worker), not at the next sweep.  Any thread; never blocks."""
        ready = []
        with self._lock:
            for vid in self._waiters.pop(md5, ()):
                missing = self._missing.get(vid)
                if missing is None:
                    continue
                missing.discard(md5)
                if not missing and vid in self._candidates:
                    del self._missing[vid]
                    ready.append(self._candidates[vid])
        for job in ready:
            self._count("completed")
            self._jobs.put(job)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    # -- building ------------------------------------------------------------------------
    def _walk(self, index: ManifestIndex) -> Iterator[tuple[str, IndexEntry]]:
        """(relative path, entry) of every directory and file, parents before children."""
        stack = [(ROOT_ID, "")]
        while stack:
            parent, prefix = stack.pop()
            after = 0
            while page := index.children(parent, after, 512):
                for e in page:
                    rel = prefix + e.name
                    yield rel, e
                    if e.is_dir:
                        stack.append((e.id, rel + "/"))
                after = page[-1].id

    def _kind(self, e: IndexEntry) -> str:
        """``dir``, ``link``, ``empty`` or ``object``; NotEligible for what a tree cannot show."""
        if e.is_dir:
            return "dir"
        if e.ref is not None:
            raise NotEligible(f"{e.name} is a reference")
        extra = _extra(e)
        if symlink_target(extra) is not None:
            return "link"
        if extra.get(EXECUTABLE_KEY) is True:
            raise NotEligible(f"{e.name} is executable (a hard link would share the mode of its cache object)")
        if e.md5 is None:
            raise NotEligible(f"{e.name} has no md5")
        return "empty" if e.size == 0 else "object"

    def _serve(self, job: _Job) -> None:
        version = job.version
        index = self.ns.indexes.get(version.blob_entity, version.manifest_md5)
        if index.total_size + self.cache.index.pinned_bytes() > PIN_SHARE * self.cache.max_bytes:
            raise NotEligible(f"{index.total_size} bytes would pin more than {PIN_SHARE:.0%} of the cache bound")
        keys, missing = [], set()
        for rel, e in self._walk(index):  # a cheap pass first (stats): what is missing
            if self._kind(e) == "object":
                md5 = str(e.md5)
                try:
                    present = os.stat(self.cache.path(md5)).st_size == e.size
                except FileNotFoundError:
                    present = False
                if not present:
                    missing.add(md5)
                    if len(missing) > MISSING_TRACK:  # too many to wait for by name: the sweep will do
                        raise NotCached(f"over {MISSING_TRACK} objects are not in the cache (first: {rel})")
                keys.append(md5)
        if missing:
            raise NotCached(f"{len(missing)} objects are not in the cache", missing)
        tree = Tree(version.qualified_name, os.path.join(self.mountpoint, job.rel),
                    self.dir / re.sub(r"[^A-Za-z0-9_.-]", "_", version.id), sorted(set(keys)))
        self.dir.mkdir(parents=True, exist_ok=True)
        listing = tree.path.with_name(tree.path.name + ".keys")
        listing.write_text("\n".join(tree.keys), encoding="ascii")  # for clean_stale after a crash
        self.cache.index.pin(tree.keys, time.time_ns())  # before linking: eviction skips them from now
        try:
            self._build(tree, index, version)
            # Not under self._lock: the bind's path walk may send a lookup of the version
            # directory (its dentry forgotten, or never made: a restore), whose notice() on the
            # trio loop takes self._lock.  _bind_lock orders binds against detach_all.
            with self._bind_lock:
                if self._closing:
                    raise NotEligible("the mount is closing")
                bind_readonly(tree.path, tree.target)
                with self._lock:
                    self._trees[version.id] = tree
        except BaseException:
            _remove_tree(tree.path)
            with contextlib.suppress(OSError):
                listing.unlink()
            self._release(tree.keys)
            raise
        log.info("fast path: %s served from %s (%d objects)", tree.name, tree.path, len(tree.keys))
        self._drop_fuse_copies(job.rel, version.id)

    def _drop_fuse_copies(self, rel: str, version_id: str) -> None:
        """The bind hides the version's FUSE inodes from every new open: drop the pages the
        kernel cached for them, so what a read through FUSE left in memory is held once, by the
        cache objects the tree links (the fast path keeps those: no drop-behind, see
        mountfs.daemon).  A file still open through FUSE keeps them until its last close
        (Namespace.on_unused): dropping them under a reader would send the rest of its reads
        to the daemon."""
        for inode in self.ns.idle_files_below(rel, version_id):
            self._drop_one(inode)

    def _drop_one(self, inode: int) -> None:
        try:
            self._drop_pages(inode)
        except OSError as exc:  # the kernel forgot it meanwhile (ENOENT), or cannot (ENOSYS)
            log.debug("fast path: pages of inode %d stay: %s", inode, exc)
        else:
            self._count("pages_dropped")

    def unused(self, inode: int) -> None:
        """Namespace.on_unused: a hidden FUSE inode's last handle is closed; its pages go on the
        worker (never on the trio loop: the kernel may wait there for a read it is serving)."""
        self._jobs.put(inode)

    def _build(self, tree: Tree, index: ManifestIndex, version: VersionRecord) -> None:
        mtime_ns = int(version.created_at.timestamp() * 1e9)
        _remove_tree(tree.path)
        tree.path.mkdir()
        dirs = [tree.path]
        for rel, e in self._walk(index):
            dest = tree.path / rel
            kind = self._kind(e)
            if kind == "dir":
                dest.mkdir()
                dirs.append(dest)
            elif kind == "link":
                os.symlink(str(symlink_target(_extra(e))), dest)
            elif kind == "empty":
                dest.touch(0o444)
                os.chmod(dest, 0o444)
                os.utime(dest, ns=(mtime_ns, mtime_ns))
            else:
                tree.files.append(self._link(str(e.md5), e.size, dest, rel))
        # What never changes of a version is on its directories as on the FUSE path (aliases,
        # tags, metadata can change: those, and the files' own, are read through ``<coll>@vN``).
        fixed = {"user.artifact.version": version.qualified_name, "user.artifact.digest": version.digest,
                 "user.artifact.id": version.id, "user.artifact.created_at": version.created_at.isoformat()}
        for d in reversed(dirs):  # children first: a read-only parent is made last
            for name, value in (fixed.items() if d == tree.path else list(fixed.items())[:1]):
                with contextlib.suppress(OSError):  # a cache filesystem without user xattrs
                    os.setxattr(d, name, value.encode())
            os.chmod(d, self.dir_mode)
            os.utime(d, ns=(mtime_ns, mtime_ns))

    def _link(self, md5: str, size: int, dest: Path, rel: str) -> tuple[str, str, int, int, int]:
        """Link the cache object ``md5`` at ``dest`` once it is verified: by a valid verified
        marker or this daemon's own check of that very file (``trusted``), else by its whole md5
        (a large one is then marked, sparing the next check).
        The link is checked to name the very inode that was verified."""
        src = self.cache.path(md5)
        try:
            fd = os.open(src, os.O_RDONLY)
        except FileNotFoundError:
            raise NotCached(f"{rel} left the cache") from None
        try:
            st = os.fstat(fd)
            if st.st_size != size or st.st_mode & 0o222:
                raise NotCached(f"{rel}: its cache object is not a read-only file of {size} bytes")
            if not self._trusted(fd, md5, st):
                self._count("hashed")
                if md5_fd(fd, size) != md5:
                    log.warning("cache object %s (%s) fails its md5: dropping it", md5, rel)
                    self.cache.drop(md5)
                    raise NotCached(f"{rel}: its cache object failed verification")
                if size > MARK_OVER:
                    set_verified_marker(fd, md5)
                    st = os.fstat(fd)
            os.link(src, dest)
            linked = os.stat(dest)
            if linked.st_ino != st.st_ino:
                raise NotCached(f"{rel} was replaced in the cache while it was linked")
            return str(dest), md5, st.st_ino, st.st_size, st.st_mtime_ns
        finally:
            os.close(fd)

    # -- teardown --------------------------------------------------------------------------
    def _release(self, keys: list[str]) -> None:
        with contextlib.suppress(Exception):
            _unpin_unlinked(self.cache, keys)

    def _ours(self) -> dict[str, str]:
        """Mount point -> root of the binds of this daemon's trees that are mounted now."""
        return {point: root for point, root in _mounts()
                if _is_tree_root(root) and root.rstrip("/").split("/")[-2] == self.owner}

    def _tear_down(self, vid: str, reason: str) -> None:
        with self._lock:
            tree = self._trees.pop(vid, None)
        if tree is None:
            return
        if tree.target in self._ours():
            with contextlib.suppress(OSError):
                detach(tree.target)
        _remove_tree(tree.path)
        with contextlib.suppress(OSError):
            tree.path.with_name(tree.path.name + ".keys").unlink()
        self._release(tree.keys)
        self._count("torn_down")
        log.warning("fast path: %s torn down (%s); served through FUSE again", tree.name, reason)

    def sweep(self) -> None:
        """Tear down trees whose objects changed or whose bind went away."""
        with self._lock:
            trees = list(self._trees.items())
        bound = self._ours()
        for vid, tree in trees:
            if tree.target not in bound:
                self._tear_down(vid, "its bind went away")
                continue
            for path, md5, ino, size, mtime in tree.files:
                try:  # the same bytes, and still the cache's object (so still counted in the bound)
                    st = os.stat(path)
                    same = (st.st_ino, st.st_size, st.st_mtime_ns) == (ino, size, mtime) and not st.st_mode & 0o222
                    same = same and os.stat(self.cache.path(md5)).st_ino == ino
                except OSError:
                    same = False
                if not same:
                    self._tear_down(vid, f"{path} changed in the cache")
                    break

    def detach_all(self) -> None:
        """Detach every bind of this daemon (before its FUSE session ends); no new ones after."""
        with self._bind_lock, self._lock:  # a bind under way ends first
            self._closing = True
            targets = [t.target for t in self._trees.values()]
        ours = self._ours()
        for target in targets:
            if target in ours:
                try:
                    detach(target)
                except OSError as exc:
                    log.warning("%s", exc)

    def close(self) -> None:
        """Stop the worker, detach what is still bound, remove the trees and release the pins."""
        with self._lock:
            self._closing = True
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(30)
        self.detach_all()
        for vid in list(self._trees):
            with self._lock:
                tree = self._trees.pop(vid)
            _remove_tree(tree.path)
            self._release(tree.keys)
        _remove_tree(self.dir)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {**self.counts, "bound": sorted(t.name for t in self._trees.values()), "enabled": self.enabled,
                    "owner": self.owner}


def _extra(e: IndexEntry) -> dict:
    return json.loads(e.extra) if e.extra else {}
