"""Writable drafts on the mount: the engine the FUSE operations call (no FUSE in here).

Naming.  In a project directory, ``<collection>:draft`` is *the* draft of a collection and
``<collection>:draft-<label>`` one more (label: letters, digits, ``_ - .``, up to 64, starting
with a letter or digit).  ``mkdir`` of such a name creates the draft from the collection's
``latest`` (incremental: every file visible, nothing copied) or empty when the collection (or
the project, or the entity) does not exist yet.  An alias named ``draft`` or ``draft-…`` is
shadowed by these names on the mount (it stays reachable as ``:vN`` and through the SDK).

Inside a draft (see :class:`mountfs.drafts.tree.DraftTree` for the operations):

* ``.commit`` (root) is the sentinel.  Creating it, writing it, or touching it (utimens, or an
  editor renaming a file over it) requests one commit when its last handle is released (never
  on flush), or at once for a bare utimens; the commit waits until the draft is quiet
  (:meth:`DraftManager.commit_when_ready`).  Its optional JSON gives ``aliases``, ``tags``,
  ``description``, ``metadata``, ``type``; it stays in place, so the same options apply to the
  next touch.  Neither control file is ever committed.
* ``.commit.status`` (root, read-only, written by artifactfs) holds the JSON of
  :meth:`Draft.status`: the draft, its base version and the last result (``created`` with the new
  version, ``noop`` or ``failed`` with the error text).  Propose: also ``user.artifact.draft.status``.
* Unmount commits every draft (``commit_all``); an unchanged draft creates no version.
* Empty directories, owners and permission bits other than the execute bit are not committed
  (a W&B manifest lists files only).  Symbolic links, hard links and the execute bit are
  (see docs/SEMANTICS.md "Links and modes"); FIFOs, sockets, devices: EPERM.
* Base-version entries that cannot be shown as files (references, a root ``.commit``, a path
  that is both a file and a directory) are carried into every next version unchanged.
* ``rmdir`` of a draft whose tree is empty discards it (``rm -rf`` works); otherwise ENOTEMPTY.

Staging layout (under the mount's ``<cache dir>/drafts/store-<key>/``, see :func:`staging_root`)::

    <staging_root>/<draft id>/          one draft (see mountfs.drafts.tree for its inside)
    <staging_root>/tmp-<id>/            a draft being created or removed (deleted at startup)
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from client import names
from client.atomic import fsync_dir
from client.cache import Cache
from client.errors import ArtifactFSError, NotFoundError
from client.manifest import iter_entries
from client.store.base import LocalBlobs, Store, VersionRecord

from ..errors import (BaseUnavailableError, CommitFailedError, DraftBusyError, ExistsError, InvalidArgumentError,
                      NotEmptyError)
from .commit import (INTENT, BaseInfo, CommitOptions, CommitResult, Draft, _read_intent,
                           commit_draft, resolve_intent)
from .files import NodeAttr
from .plan import populate
from .rows import COMMIT_NAME, ROOT_ID, STATUS_NAME, BaseRef, stored_meta
from .tree import DraftTree

log = logging.getLogger(__name__)

DRAFT_SELECTOR = "draft"
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_READ_CHUNK = 8 << 20
#: a requested commit runs once the draft has had no change for this long (a copy in progress)
QUIET_SECONDS = 0.5
#: ... and no file of it is open for writing; after this long the request fails (status says why)
WRITERS_WAIT_SECONDS = 120.0

__all__ = ["BaseInfo", "BaseRef", "COMMIT_NAME", "CommitOptions", "CommitResult", "Draft", "DraftManager",
           "DraftTree", "NodeAttr", "ROOT_ID", "STATUS_NAME", "StatFs", "draft_dirname", "parse_draft_dirname"]


# -- names ------------------------------------------------------------------------------------
def draft_dirname(collection: str, label: str | None = None) -> str:
    """``<collection>:draft`` or ``<collection>:draft-<label>``."""
    names.validate_collection(collection)
    if label is None:
        return f"{collection}:{DRAFT_SELECTOR}"
    if not _LABEL_RE.fullmatch(label):
        raise ValueError(f"invalid draft label {label!r}: 1-64 letters, digits, '_', '-', '.', "
                         "starting with a letter or digit")
    return f"{collection}:{DRAFT_SELECTOR}-{label}"


def parse_draft_dirname(name: str) -> tuple[str, str | None] | None:
    """(collection, label) of a draft directory name, None if ``name`` is not one."""
    collection, sep, selector = name.rpartition(":")
    if not sep or not collection:
        return None
    if selector == DRAFT_SELECTOR:
        label = None
    elif selector.startswith(DRAFT_SELECTOR + "-") and _LABEL_RE.fullmatch(selector[len(DRAFT_SELECTOR) + 1:]):
        label = selector[len(DRAFT_SELECTOR) + 1:]
    else:
        return None
    try:
        names.validate_collection(collection)
    except ValueError:
        return None
    return collection, label


def is_draft_name(name: str) -> bool:
    return parse_draft_dirname(name) is not None


@dataclass(frozen=True)
class StatFs:
    """statfs(2) of the staging filesystem (where draft data really goes)."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


def make_fetch_base(store: Store, cache: Cache) -> Callable[[BaseRef], Path]:
    """Default ``fetch_base``: the cache object, filled from the store on a miss (whole blob)."""

    def fetch(ref: BaseRef) -> Path:
        hit = cache.checked(ref.md5, ref.size)  # verified (marker or md5): base bytes enter new versions
        if hit is not None:
            return hit
        def fill(out: BinaryIO) -> None:
            if isinstance(store, LocalBlobs):
                with open(store.blob_path(ref.entity, ref.md5), "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                return
            pos = 0
            while pos < ref.size:
                chunk = store.read_blob(ref.entity, ref.md5, pos, min(_READ_CHUNK, ref.size - pos))
                if not chunk:
                    raise BaseUnavailableError(f"blob {ref.md5} ended at {pos} of {ref.size} bytes")
                out.write(chunk)
                pos += len(chunk)

        try:
            return cache.fetch(ref.md5, ref.size, fill)
        except ArtifactFSError as exc:
            raise BaseUnavailableError(f"cannot fetch base content of {ref.path}: {exc}") from exc

    return fetch


def staging_root(cache_root: Path | str, store_location: str) -> Path:
    """Where the drafts of one store live: ``<cache>/drafts/<store key>/``.

    Drafts belong to their store, not to the cache: the key is derived from the store's
    canonical location (the resolved directory of an embedded store, the URL of a server), so
    a mount of another store sharing the cache never lists or commits them.
    """
    import hashlib

    key = hashlib.sha256(store_location.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return Path(cache_root) / "drafts" / f"store-{key}"


class DraftManager:
    """Every draft under one staging root: create, list, find, remove, commit, recover.

    ``fetch_base`` defaults to :func:`make_fetch_base` (cache, then store); the FUSE daemon may
    inject its ranged fetcher's.  ``commit_runner(draft)`` is what a sentinel touch calls; the
    default commits synchronously and raises ``CommitFailedError`` (EIO) on failure (so close() reports it).
    """

    def __init__(self, staging_root: Path | str, store: Store, cache: Cache, *,
                 fetch_base: Callable[[BaseRef], Path] | None = None,
                 commit_runner: Callable[[Draft], None] | None = None, sync_metadata: bool = False) -> None:
        self.root = Path(staging_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.cache = cache
        self.fetch_base = fetch_base or make_fetch_base(store, cache)
        self.commit_runner = commit_runner
        self.sync_metadata = sync_metadata
        self._lock = threading.RLock()
        self._drafts: dict[str, Draft] = {}
        self._waiting: set[str] = set()  #: drafts with a commit request waiting to run
        self._load()

    # -- loading --------------------------------------------------------------------------
    def _open(self, draft_id: str, root: Path, entity: str) -> Draft:
        tree = DraftTree(root, self.fetch_base, entity=entity, sync_metadata=self.sync_metadata)
        draft = Draft(draft_id, root, tree)
        tree.on_commit_request = lambda: self._sentinel(draft)
        return draft

    def _load(self) -> None:
        """Open every draft; remove half-created/half-removed ones; repair after a crash."""
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.startswith("store-"):  # another store's drafts (the parent's layout)
                continue
            if entry.name.startswith("tmp-"):
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            root = Path(entry.path)
            try:
                ident = stored_meta(root / "draft.db", "identity")
                draft = self._open(entry.name, root, ident["entity"])
                draft.tree.recover()
            except (sqlite3.Error, TypeError, KeyError, ValueError, OSError) as exc:
                log.error("staging dir %s is not a readable draft (%s); leaving it alone", root, exc)
                continue
            self._drafts[draft.id] = draft

    # -- listing ----------------------------------------------------------------------------
    def list(self, entity: str | None = None, project: str | None = None) -> list[Draft]:
        with self._lock:
            return sorted((d for d in self._drafts.values()
                           if (entity is None or d.entity == entity) and (project is None or d.project == project)),
                          key=lambda d: (d.entity, d.project, d.dirname))

    def names(self, entity: str, project: str) -> builtins.list[str]:
        """Directory names of the drafts of one project (for the project listing)."""
        return [d.dirname for d in self.list(entity, project)]

    def find(self, entity: str, project: str, dirname: str) -> Draft | None:
        with self._lock:
            for d in self._drafts.values():
                if (d.entity, d.project, d.dirname) == (entity, project, dirname):
                    return d
        return None

    def by_id(self, draft_id: str) -> Draft | None:
        """The draft with this id (the mount keys inodes by it), None once removed."""
        with self._lock:
            return self._drafts.get(draft_id)

    def get(self, entity: str, project: str, dirname: str) -> Draft:
        d = self.find(entity, project, dirname)
        if d is None:
            raise NotFoundError(f"no draft {entity}/{project}/{dirname}")
        return d

    # -- create / remove ---------------------------------------------------------------------
    def create(self, entity: str, project: str, dirname: str, *, type: str | None = None) -> Draft:
        """mkdir of a draft name: from the collection's latest version, or empty."""
        parsed = parse_draft_dirname(dirname)
        if parsed is None:
            raise InvalidArgumentError(f"{dirname!r} is not <collection>:draft or <collection>:draft-<label>")
        collection, label = parsed
        try:
            names.validate_entity(entity)
            names.validate_project(project)
            if type is not None:
                names.validate_type(type)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        with self._lock:
            if self.find(entity, project, dirname) is not None:
                raise ExistsError(f"draft {entity}/{project}/{dirname} exists")
            try:
                base: VersionRecord | None = self.store.resolve(entity, project, collection, "latest")
            except NotFoundError:
                base = None
            except ArtifactFSError as exc:
                raise BaseUnavailableError(f"cannot resolve {collection}:latest: {exc}") from exc
            draft_id = uuid.uuid4().hex
            tmp = self.root / f"tmp-{draft_id}"
            tmp.mkdir()
            try:
                (tmp / "data").mkdir()
                tree = DraftTree(tmp, self.fetch_base, entity=entity, sync_metadata=self.sync_metadata)
                try:
                    ident = {"entity": entity, "project": project, "collection": collection, "label": label,
                             "dirname": dirname, "type": type, "created": time.time()}
                    self._populate(tree, ident, base)
                finally:
                    tree.close()
                final = self.root / draft_id
                os.replace(tmp, final)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            draft = self._open(draft_id, final, entity)
            draft.tree.write_status((json.dumps(draft.status(), indent=1, sort_keys=True) + "\n").encode())
            self._drafts[draft_id] = draft
            return draft

    def _populate(self, tree: DraftTree, ident: dict, base: VersionRecord | None) -> None:
        """Root row, identity, and one row per base entry (streamed; nothing is copied)."""
        if base is None:
            populate(tree, ident, None, (), 0)
            return
        manifest = tree.root / "base-manifest.json"
        cached = self.cache.lookup(base.manifest_md5)
        if cached is not None:
            shutil.copyfile(cached, manifest)
        else:
            self.store.download_blob(base.entity, base.manifest_md5, manifest)
        with open(manifest, "rb") as f:
            populate(tree, ident, asdict(BaseInfo.of(base)), iter_entries(f), int(base.created_at.timestamp() * 1e9))
        manifest.unlink(missing_ok=True)

    def remove(self, draft: Draft, *, force: bool = False) -> None:
        """rmdir of a draft: ENOTEMPTY unless its tree (control files aside) is empty or ``force``."""
        with self._lock, draft.tree.lock:
            if not force and not draft.tree.is_empty(ROOT_ID, ignore_control=True):
                raise NotEmptyError(f"draft {draft.dirname} is not empty")
            if draft.tree.has_open_files():
                raise DraftBusyError(f"draft {draft.dirname} has open files")
            draft.tree.close()
            self._drafts.pop(draft.id, None)
            doomed = self.root / f"tmp-{draft.id}"
            os.replace(draft.root, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, draft: Draft, options: CommitOptions | None = None) -> CommitResult:
        """Commit now (options: given, else the JSON in ``.commit``).  Never raises for a failed
        commit: the result (also recorded in the draft and its status file) says what happened."""
        with draft.tree.lock:
            try:
                resolve_intent(draft, self.store, self.cache)
                if options is None:
                    options = CommitOptions.parse(draft.tree.read_control(COMMIT_NAME))
                result = commit_draft(draft, self.store, self.cache, options)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, staged files stay
                log.warning("commit of %r failed: %s", draft, exc)
                result = CommitResult("failed", error=f"{type(exc).__name__}: {exc}")
            draft.record(result)
            log.info("commit of %r: %s %s", draft, result.state, result.version or result.error or "")
            return result

    def commit_when_ready(self, draft: Draft, options: CommitOptions | None = None, *,
                          quiet: float = QUIET_SECONDS, max_wait: float = WRITERS_WAIT_SECONDS) -> CommitResult | None:
        """A requested commit: wait (bounded) until no file of the draft is open for writing and
        the draft has had no change for ``quiet`` seconds, then commit under the draft's lock.

        A request arriving while another one of the same draft waits joins it (returns None):
        one attempt, which reads ``.commit`` when it runs, so it sees the newest JSON.
        """
        with self._lock:
            if draft.id in self._waiting:
                return None
            self._waiting.add(draft.id)
        try:
            deadline = time.monotonic() + max_wait
            while True:
                with draft.tree.lock:
                    writers = draft.tree.open_writers()
                    calm = time.monotonic() - draft.tree.last_change >= quiet
                    if not writers and calm:
                        with self._lock:
                            self._waiting.discard(draft.id)
                        return self.commit(draft, options)
                    if time.monotonic() >= deadline:
                        paths = ", ".join(draft.tree.path_of(n) for n in writers[:5])
                        why = (f"{len(writers)} file(s) still open for writing ({paths})" if writers
                               else "the draft kept changing")
                        result = CommitResult("failed", error=f"not committed: {why} after {max_wait:.0f} s; "
                                                              "close them and touch .commit again")
                        draft.record(result)
                        log.warning("commit of %r: %s", draft, result.error)
                        return result
                time.sleep(0.05)
        finally:
            with self._lock:
                self._waiting.discard(draft.id)

    def _sentinel(self, draft: Draft) -> None:
        if self.commit_runner is not None:
            self.commit_runner(draft)
            return
        result = self.commit_when_ready(draft)
        if result is not None and result.state == "failed":
            raise CommitFailedError(f"commit failed: {result.error}")

    def commit_all(self) -> builtins.list[tuple[Draft, CommitResult]]:
        """Unmount: commit every draft (unchanged ones are no-ops).  A draft with a file still
        open for writing (the daemon was stopped under a writer) is not committed: it is kept
        for the next mount and its status says why."""
        out: list[tuple[Draft, CommitResult]] = []
        for d in self.list():
            writers = d.tree.open_writers()
            if writers:
                paths = ", ".join(d.tree.path_of(n) for n in writers[:5])
                result = CommitResult("failed", error=f"not committed at unmount: {len(writers)} file(s) open "
                                                      f"for writing ({paths}); the draft is kept")
                d.record(result)
                log.warning("unmount: %r %s", d, result.error)
            else:
                result = self.commit(d)
            out.append((d, result))
        return out

    def recover_commits(self) -> builtins.list[CommitResult]:
        """At mount: finish commits interrupted after the registry commit, retry the others."""
        out: list[CommitResult] = []
        for d in self.list():
            with d.tree.lock:
                intent = _read_intent(d)
                if intent is None:
                    continue
                try:
                    done = resolve_intent(d, self.store, self.cache)
                except ArtifactFSError as exc:
                    out.append(CommitResult("failed", error=f"{type(exc).__name__}: {exc}"))
                    continue
                if done is not None:
                    out.append(done)
                    continue
                opts = (intent or {}).get("options") or {}
                try:
                    options = CommitOptions.parse(json.dumps({k: v for k, v in opts.items() if v}))
                except ValueError:
                    options = None
                out.append(self.commit(d, options))
        return out

    def has_pending_intent(self, draft: Draft) -> bool:
        return (draft.root / INTENT).exists()

    # -- misc -----------------------------------------------------------------------------------
    def statfs(self) -> StatFs:
        st = os.statvfs(self.root)
        return StatFs(st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, 255)

    def close(self) -> None:
        with self._lock:
            for d in self._drafts.values():
                d.tree.close()
            self._drafts.clear()
