"""Committing a draft: manifest from the tree, upload what the store lacks, one registry commit.

The protocol, and why each step is where it is:

1. Hash staged files (running md5 when the file was written sequentially, else read it, in a
   thread pool) and record each digest in the draft db.  Recorded digests let a retried or
   resumed commit skip re-hashing and tell which rows were part of the attempt.
2. Build the manifest by streaming the tree in path order (a recursive SQL query): base files
   are committed by digest (no upload, nothing read), staged files by their new digest.  The
   artifact digest is computed on the way, exactly as :func:`client.manifest.compute_digest`.
3. Unchanged draft (digest equal to the base's, or an empty draft without base): no version,
   nothing uploaded.  Result ``noop``.
4. Write ``commit-intent.json`` (fsynced) naming the manifest md5 and the base index.  Then
   upload the staged blobs the store is missing and the manifest blob.  Then ``store.commit``:
   the registry commit is the only atomic point, so a crash anywhere before it leaves no
   version and every staged file in place.
5. Rebase: every staged file that went into the version is moved into the shared cache with
   :meth:`Cache.adopt` (reads stay hot, no copy) and its row becomes a base row; the draft's base
   becomes the new version; the intent is removed.  The draft goes on from there.

Interrupted commits: a restarted manager finds the intent.  If the collection has a version
newer than the base with the intent's manifest md5, the commit happened: only the rebase is
redone (on rows whose recorded digest is still valid).  Otherwise no version exists, the intent
is dropped and the commit is retried (``DraftManager.recover_commits``) or left to the user.

Concurrency: the draft's lock is held for the whole commit, so FUSE operations on *this* draft
wait (other drafts do not).  When ``latest`` moved past the draft's base, the draft's changes
are merged onto it (:func:`three_way`; conflicts make no version).  Races are closed by a
check-and-set on ``latest``: the registry commit names the ``latest`` the plan was
made against (``expect_latest``) and is refused with LatestMovedError if another commit moved
it in between; the plan is then made again, merged onto the newer ``latest``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client import names
from client.atomic import atomic_write
from client.cache import Cache
from client.errors import ArtifactFSError, LatestMovedError, StoreUnavailableError
from client.hashing import HashingWriter, b64_to_hex, md5_file
from client.manifest import EXECUTABLE_KEY, DigestBuilder, ManifestEntry, iter_entries, write_manifest
from client.errors import NotFoundError
from client.store.base import CommitRequest, Store, VersionRecord

from .plan import apply_base_entries, rebase_files
from .rows import COMMIT_NAME, Digest
from .tree import DraftTree

log = logging.getLogger(__name__)

INTENT = "commit-intent.json"
#: commits made again when another commit moved ``latest`` between plan and registry commit
LATEST_MOVED_ATTEMPTS = 5
LINK_BLOBS = "link-blobs"  #: symbolic link targets as blobs, during a commit (removed after it)
DEFAULT_TYPE = "dataset"
_WORKERS = 8
_OPTION_KEYS = frozenset({"aliases", "tags", "description", "metadata", "type"})


def _checkpoint(name: str) -> None:
    """Fault-injection point (crash tests replace this to kill the process at ``name``)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CommitOptions:
    """What the JSON written into ``.commit`` may set; every key optional, unknown keys refused."""

    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    description: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    type: str | None = None

    @classmethod
    def parse(cls, data: bytes | str) -> "CommitOptions":
        """Empty/whitespace = defaults.  ValueError (with the reason) on anything malformed."""
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if not text.strip():
            return cls()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{COMMIT_NAME} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{COMMIT_NAME} must hold a JSON object")
        unknown = set(obj) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"{COMMIT_NAME}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_OPTION_KEYS)}")

        def strings(key: str) -> tuple[str, ...]:
            v = obj.get(key, [])
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{COMMIT_NAME}: {key!r} must be a string or a list of strings")
            return tuple(dict.fromkeys(v))

        aliases = tuple(a if a == "latest" else names.validate_alias(a) for a in strings("aliases"))
        tags = tuple(names.validate_tag(t) for t in strings("tags"))
        desc = obj.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ValueError(f"{COMMIT_NAME}: 'description' must be a string")
        meta = names.validate_metadata(obj.get("metadata"))
        typ = obj.get("type")
        if typ is not None:
            names.validate_type(typ)
        return cls(aliases, tags, desc, dict(meta), typ)

    def to_json(self) -> dict[str, Any]:
        return {"aliases": list(self.aliases), "tags": list(self.tags), "description": self.description,
                "metadata": self.metadata, "type": self.type}


@dataclass(frozen=True)
class BaseInfo:
    """The version a draft continues from (persisted in the draft's meta)."""

    id: str
    index: int
    digest: str
    type: str
    manifest_md5: str

    @classmethod
    def of(cls, rec: VersionRecord) -> "BaseInfo":
        return cls(rec.id, rec.index, rec.digest, rec.type, rec.manifest_md5)


@dataclass(frozen=True)
class CommitResult:
    """The outcome of one commit attempt; also what ``.commit.status`` shows (as JSON)."""

    state: str  #: "created" | "noop" | "failed"
    version: str | None = None  #: qualified name, e.g. "ent/proj/ds:v3"
    index: int | None = None
    digest: str | None = None
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    error: str | None = None
    at: str = field(default_factory=_now)
    resumed: bool = False  #: completed by a restarted manager
    conflicts: list[str] = field(default_factory=list)  #: "conflict": paths changed on both sides
    merged_onto: str | None = None  #: the newer latest the draft's changes were applied onto

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Draft:
    """A draft: its identity (entity/project/collection/label), base version and tree."""

    def __init__(self, draft_id: str, root: Path, tree: DraftTree) -> None:
        self.id = draft_id
        self.root = root
        self.tree = tree
        ident = tree.rows.meta("identity")
        self.entity: str = ident["entity"]
        self.project: str = ident["project"]
        self.collection: str = ident["collection"]
        self.label: str | None = ident["label"]
        self.dirname: str = ident["dirname"]
        self.type: str | None = ident.get("type")

    @property
    def base(self) -> BaseInfo | None:
        b = self.tree.rows.meta("base")
        return BaseInfo(**b) if b else None

    @property
    def last_result(self) -> CommitResult | None:
        r = self.tree.rows.meta("last_result")
        return CommitResult(**r) if r else None

    def status(self) -> dict[str, Any]:
        """What the FUSE layer can expose (``.commit.status``, ``user.artifact.draft.status``)."""
        base = self.base
        last = self.last_result
        return {"draft": f"{self.entity}/{self.project}/{self.dirname}",
                "collection": f"{self.entity}/{self.project}/{self.collection}",
                "base": f"{self.collection}:v{base.index}" if base else None,
                "last_commit": last.to_json() if last else None}

    def record(self, result: CommitResult) -> None:
        self.tree.rows.set_meta("last_result", result.to_json())
        self.tree.write_status((json.dumps(self.status(), indent=1, sort_keys=True) + "\n").encode())

    def __repr__(self) -> str:
        return f"Draft({self.entity}/{self.project}/{self.dirname}, id={self.id})"


class _Utf8Sink:
    """The text face write_manifest needs, over a binary HashingWriter (md5 and size on the way)."""

    def __init__(self, out: HashingWriter) -> None:
        self.out = out

    def write(self, s: str) -> int:
        self.out.write(s.encode("utf-8"))
        return len(s)


@dataclass
class _Plan:
    digest: str
    manifest_md5: str
    manifest_path: Path
    manifest_size: int
    uploads: dict[str, tuple[Path, int]]  #: md5 -> (data file, size) of staged content
    staged: list[Digest]  #: staged files to rebase
    file_count: int


def _hash_staged(tree: DraftTree) -> None:
    """Step 1: every staged file gets a recorded digest (running hash when available)."""
    done: list[Digest] = []
    todo: list[tuple[Digest, Path]] = []  # digest still to compute
    for staged in tree.rows.staged_files():
        if staged.digest is not None:
            continue
        path = tree.data.path(staged.id)
        st = path.stat()
        with tree.lock:
            running = tree.data.running_digest(staged.id, st.st_size)
        if running is not None:
            done.append(Digest(staged.id, running, st.st_size, st.st_mtime_ns))
        else:
            todo.append((Digest(staged.id, "", st.st_size, st.st_mtime_ns), path))
    if todo:
        with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="draft-hash") as pool:
            for (d, _), md5 in zip(todo, pool.map(md5_file, [path for _, path in todo])):
                done.append(d._replace(md5=md5))
    if done:
        tree.rows.record_digests(done)


def _build(draft: Draft) -> _Plan:
    """Step 2: stream the manifest to a temp file, computing the artifact digest on the way."""
    tree = draft.tree
    digest = DigestBuilder()
    uploads: dict[str, tuple[Path, int]] = {}
    staged: list[Digest] = []
    count = 0

    def entries() -> Any:
        nonlocal count
        for f in tree.rows.commit_files():
            path, mode, size, b64 = f.path, f.mode, f.size, f.digest
            if f.node is None:  # hidden base entry (a control name at the base's root)
                entry = ManifestEntry.from_json(path, json.loads(f.entry or "{}"))
            elif f.staged:  # size and mtime as recorded with the digest by _hash_staged
                assert b64 is not None  # _hash_staged recorded one
                md5 = b64_to_hex(b64)
                uploads.setdefault(md5, (tree.data.path(f.node), size))
                staged.append(Digest(f.node, md5, size, f.mtime_ns))
                entry = ManifestEntry(path, b64, size, extra={EXECUTABLE_KEY: True} if mode & 0o111 else {})
            else:
                entry = ManifestEntry.from_json(path, {**json.loads(f.entry or "{}"), "digest": b64, "size": size})
                target = entry.symlink_target
                if target is not None:  # the target's bytes are the entry's blob
                    md5 = b64_to_hex(entry.digest)
                    uploads.setdefault(md5, (_link_blob(draft, md5, target), size))
                elif entry.ref is None:
                    entry.extra.pop(EXECUTABLE_KEY, None)
                    if mode & 0o111:
                        entry.extra[EXECUTABLE_KEY] = True
            digest.update(path, entry.digest)
            count += 1
            yield entry

    tmp = draft.root / "manifest.json.tmp"
    with open(tmp, "wb") as raw:
        sink = HashingWriter(raw)
        write_manifest(_Utf8Sink(sink), entries())  # type: ignore[arg-type]
        raw.flush()
        os.fsync(raw.fileno())
    return _Plan(digest.hexdigest(), sink.hexdigest(), tmp, sink.size, uploads, staged, count)


def _link_blob(draft: Draft, md5: str, target: str) -> Path:
    """A file holding a symbolic link's target, to upload as the link entry's blob."""
    path = draft.root / LINK_BLOBS / md5
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(target.encode("utf-8"))
    return path


def _write_intent(draft: Draft, data: dict[str, Any]) -> None:
    with atomic_write(draft.root / INTENT) as f:
        f.write(json.dumps(data).encode("utf-8"))


def _read_intent(draft: Draft) -> dict[str, Any] | None:
    try:
        return json.loads((draft.root / INTENT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # a torn intent cannot name a committed manifest
        log.warning("%r: unreadable commit intent (%s); treating the commit as not done", draft, exc)
        return {}


def _upload(store: Store, entity: str, uploads: dict[str, tuple[Path, int]]) -> tuple[int, int]:
    missing = store.missing_blobs(entity, list(uploads)) if uploads else set()
    jobs = [(md5, *uploads[md5]) for md5 in sorted(missing)]

    def put(job: tuple[str, Path, int]) -> int:
        md5, path, size = job
        store.put_blob(entity, md5, path, size)
        return size

    with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="draft-upload") as pool:
        total = sum(pool.map(put, jobs))
    return len(jobs), total


def _rebase(draft: Draft, cache: Cache, rec: VersionRecord, staged: list[Digest]) -> None:
    """Step 5: staged content into the cache (rename, no copy); rows become base rows.

    ``Cache.adopt`` fsyncs each object before naming it; those fsyncs run in a pool, as one
    serial fsync per small file would dominate a commit of many files.
    """
    tree = draft.tree

    def adopt(item: Digest) -> None:
        nid, md5, size = item.id, item.md5, item.size
        path = tree.data.path(nid)
        try:
            if cache.lookup(md5, size) is not None:
                path.unlink()
            else:
                cache.adopt(md5, path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the cache is an optimisation: the store has the bytes
            log.warning("%r: could not move %s into the cache: %s", draft, md5, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    seen: set[str] = set()
    first = [s for s in staged if not (s.md5 in seen or seen.add(s.md5))]  # type: ignore[func-returns-value]
    with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="draft-adopt") as pool:
        list(pool.map(adopt, first))
    _checkpoint("data_adopted")
    for item in staged:  # duplicates of content already adopted
        with contextlib.suppress(FileNotFoundError):
            tree.data.path(item.id).unlink()
    rebase_files(tree, staged)
    tree.rows.set_meta("base", asdict(BaseInfo.of(rec)))
    with contextlib.suppress(FileNotFoundError):
        (draft.root / INTENT).unlink()
    tree.rows.sync()


def _committed_version(store: Store, draft: Draft, intent: dict[str, Any]) -> VersionRecord | None:
    """The version an interrupted commit created, if it did (newer than its base, same manifest)."""
    base_index = intent.get("base_index")
    try:
        versions = store.list_versions(draft.entity, draft.project, draft.collection)
    except ArtifactFSError as exc:
        if isinstance(exc, StoreUnavailableError):
            raise
        return None
    for v in versions:
        if v.manifest_md5 == intent.get("manifest_md5") and (base_index is None or v.index > base_index):
            return v
    return None


def resolve_intent(draft: Draft, store: Store, cache: Cache) -> CommitResult | None:
    """Finish (rebase) or drop an interrupted commit.  Caller holds the draft's lock."""
    intent = _read_intent(draft)
    if intent is None:
        return None
    rec = _committed_version(store, draft, intent) if intent else None
    if rec is None:
        with contextlib.suppress(FileNotFoundError):
            (draft.root / INTENT).unlink()
        return None
    staged = [Digest(s.id, b64_to_hex(s.digest), s.size, s.mtime_ns) for s in draft.tree.rows.staged_files()
              if s.digest is not None]
    _rebase(draft, cache, rec, staged)
    result = CommitResult("created", rec.qualified_name, rec.index, rec.digest, resumed=True)
    draft.record(result)
    return result


def _manifest_entries(store: Store, cache: Cache, entity: str, md5: str, tmp: Path) -> dict[str, ManifestEntry]:
    """path -> entry of a stored manifest (cache first)."""
    path = cache.lookup(md5)
    if path is None:
        store.download_blob(entity, md5, tmp)
        path = tmp
    try:
        with open(path, "rb") as f:
            return {e.path: e for e in iter_entries(f)}
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _same(a: ManifestEntry | None, b: ManifestEntry | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.digest, a.ref) == (b.digest, b.ref)


def three_way(base: dict[str, ManifestEntry], mine: dict[str, ManifestEntry],
              theirs: dict[str, ManifestEntry]) -> tuple[dict[str, ManifestEntry], list[str]]:
    """The draft's changes (mine vs base: adds, modifications, deletions; a rename is a deletion
    plus an add) applied onto ``theirs``.  A path both sides changed differently is a conflict,
    as is a file of one side where the other has a directory."""
    result = dict(theirs)
    conflicts: list[str] = []
    for path in set(base) | set(mine):
        b, m = base.get(path), mine.get(path)
        if _same(b, m):
            continue
        t = theirs.get(path)
        if _same(t, b) or _same(t, m):
            if m is None:
                result.pop(path, None)
            else:
                result[path] = m
        else:
            conflicts.append(path)
    for path in result:  # file/directory clashes: a file at a parent path of another file
        head = path
        while "/" in head:
            head = head.rpartition("/")[0]
            if head in result:
                conflicts.append(head)
    return result, sorted(set(conflicts))


def _merge_plan(draft: Draft, store: Store, cache: Cache, plan: _Plan, latest: VersionRecord
                ) -> tuple[_Plan, list[tuple[str, ManifestEntry | None]], list[str]]:
    """Re-plan a commit whose base is no longer latest: merged manifest, tree updates, conflicts."""
    base = draft.base
    base_entries = (_manifest_entries(store, cache, draft.entity, base.manifest_md5, draft.root / "base.tmp")
                    if base else {})
    theirs = _manifest_entries(store, cache, latest.entity, latest.manifest_md5, draft.root / "latest.tmp")
    with open(plan.manifest_path, "rb") as f:
        mine = {e.path: e for e in iter_entries(f)}
    merged, conflicts = three_way(base_entries, mine, theirs)
    if conflicts:
        return plan, [], conflicts
    updates = [(p, merged.get(p)) for p in sorted(set(merged) | set(mine)) if not _same(merged.get(p), mine.get(p))]
    digest = DigestBuilder()
    ordered = [merged[p] for p in sorted(merged)]
    for e in ordered:
        digest.update(e.path, e.digest)
    tmp = draft.root / "manifest-merged.json.tmp"
    with open(tmp, "wb") as raw:
        sink = HashingWriter(raw)
        write_manifest(_Utf8Sink(sink), ordered)  # type: ignore[arg-type]
        raw.flush()
        os.fsync(raw.fileno())
    plan.manifest_path.unlink(missing_ok=True)
    return (_Plan(digest.hexdigest(), sink.hexdigest(), tmp, sink.size, plan.uploads, plan.staged, len(ordered)),
            updates, [])


def _latest(store: Store, draft: Draft) -> VersionRecord | None:
    try:
        return store.resolve(draft.entity, draft.project, draft.collection, "latest")
    except NotFoundError:
        return None


def commit_draft(draft: Draft, store: Store, cache: Cache, options: CommitOptions) -> CommitResult:
    """Steps 1-5 (module docstring).  Caller holds the draft's lock.  Raises on failure.

    No lost updates: when ``latest`` is no longer the draft's base, the draft's changes
    relative to its base are applied onto ``latest`` (:func:`three_way`); on a conflict no
    version is made and the draft is left as it is.  The registry commit carries the
    ``latest`` the plan was made against (``CommitRequest.expect_latest``); if another commit
    moved it in between, the plan is made again on the newer ``latest`` (a few times)."""
    for attempt in range(1, LATEST_MOVED_ATTEMPTS + 1):
        try:
            return _commit_once(draft, store, cache, options)
        except LatestMovedError:
            if attempt == LATEST_MOVED_ATTEMPTS:
                raise
            log.info("%r: latest moved during the commit; merging onto the newer latest (attempt %d)",
                     draft, attempt + 1)
    raise AssertionError("unreachable")


def _commit_once(draft: Draft, store: Store, cache: Cache, options: CommitOptions) -> CommitResult:
    tree = draft.tree
    _hash_staged(tree)
    plan = _build(draft)
    updates: list[tuple[str, ManifestEntry | None]] = []
    merged_onto = None
    try:
        latest = _latest(store, draft)
        if latest is not None and (draft.base is None or latest.id != draft.base.id):
            plan, updates, conflicts = _merge_plan(draft, store, cache, plan, latest)
            if conflicts:
                return CommitResult("conflict", error=f"changed here and in {latest.qualified_name}: "
                                    f"{', '.join(conflicts[:10])}", conflicts=conflicts)
            merged_onto = latest.qualified_name
            if plan.digest == latest.digest:  # the draft's changes are all in latest already
                apply_base_entries(tree, updates)
                _rebase(draft, cache, latest, plan.staged)
                return CommitResult("noop", latest.qualified_name, latest.index, latest.digest,
                                    merged_onto=merged_onto)
        base = draft.base
        if merged_onto is None and ((base is not None and plan.digest == base.digest)
                                    or (base is None and plan.file_count == 0)):
            return CommitResult("noop", f"{draft.entity}/{draft.project}/{draft.collection}:v{base.index}"
                                if base else None, base.index if base else None, plan.digest)
        if merged_onto is not None:
            base = BaseInfo.of(latest)  # type: ignore[arg-type]  # the new version follows latest
        typ = options.type or (base.type if base else None) or draft.type or DEFAULT_TYPE
        tree.rows.sync()  # recorded digests must be durable before the intent refers to them
        _write_intent(draft, {"manifest_md5": plan.manifest_md5, "digest": plan.digest,
                              "base_index": base.index if base else None, "options": options.to_json(),
                              "started": time.time()})
        _checkpoint("intent_written")
        files, nbytes = _upload(store, draft.entity, plan.uploads)
        if store.missing_blobs(draft.entity, [plan.manifest_md5]):
            store.put_blob(draft.entity, plan.manifest_md5, plan.manifest_path, plan.manifest_size)
            files, nbytes = files + 1, nbytes + plan.manifest_size
        _checkpoint("before_store_commit")
        try:
            rec, created = store.commit(CommitRequest(
                entity=draft.entity, project=draft.project, collection=draft.collection, type=typ,
                manifest_md5=plan.manifest_md5, aliases=tuple(a for a in options.aliases if a != "latest"),
                tags=options.tags, description=options.description, metadata=dict(options.metadata),
                expect_latest=latest.id if latest is not None else ""))
        except (StoreUnavailableError, OSError, TimeoutError):
            raise  # ambiguous (the server may have committed): keep the intent for resolve_intent
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                (draft.root / INTENT).unlink()  # definite refusal: no version exists
            raise
        _checkpoint("after_store_commit")
        if updates:
            apply_base_entries(tree, updates)
        _rebase(draft, cache, rec, plan.staged)
        return CommitResult("created" if created else "noop", rec.qualified_name, rec.index, rec.digest,
                            files, nbytes, merged_onto=merged_onto)
    finally:
        with contextlib.suppress(FileNotFoundError):
            plan.manifest_path.unlink()
        shutil.rmtree(draft.root / LINK_BLOBS, ignore_errors=True)


__all__ = ["BaseInfo", "CommitOptions", "CommitResult", "Draft", "commit_draft", "resolve_intent"]
