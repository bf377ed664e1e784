"""Moving bytes for the SDK: hashing local files into staging, uploading what the store lacks,
and downloading entries through the content-addressed cache.

Kept apart from :mod:`client.artifact` so the artifact module is about the W&B surface and
this one about I/O.  Every write to a user's directory goes to a temp file next to the target
and is renamed into place after its md5 was checked, or (cached files into a root that did
not exist) into a staging directory renamed to the root once complete, so an interrupted
download never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import progress, references, settings
from .atomic import atomic_fd, atomic_write, write_fully
from .cache import Cache, Prepared
from .errors import (ArtifactFSError, ArtifactNotLoggedError, DigestMismatchError, LocalPathError, NotFoundError,
                     StoreUnavailableError)
from .hashing import BytesSink, HashingWriter, b64_to_hex, hex_to_b64, is_md5_hex, md5_bytes
from .manifest import Manifest, ManifestEntry
from .retry import RetryPolicy, is_transport_failure, resume_while_progressing
from .staging import Staging
from .store import LocalBlobs, Store, UploadBatching, UrlBatching, open_store

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_READ_CHUNK = 16 << 20  #: bytes per read_blob call when streaming from a store
#: blobs up to this size are downloaded whole into memory (one GET, counted in the transfer
#: budget) and written from there to the cache and the target; larger ones stream via a file
WHOLE_BLOB_LIMIT = 16 << 20
#: how long a transfer waits for the URL batch it is in before reading without it
_SIGN_WAIT = 120.0
#: bytes copied out of the cache between two updates of the progress meter (per batch, not per file)
_PROGRESS_BATCH = 1 << 20
#: errnos of a kernel copy that cannot copy between these two files (another filesystem, an old
#: kernel, a filesystem without the call): the next, plainer way is used
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM})
#: a file of a staging directory: new (never one that was there), written, not inherited by a child
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

_stores: dict[tuple[str, int, str | None], Store] = {}
_stores_lock = threading.Lock()


def get_store(location: str | None = None, api_key: str | None = None) -> Store:
    """One open store per location and process (SQLite engines must not cross a fork)."""
    loc = location or settings.store_location()
    key = (loc, os.getpid(), api_key)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = open_store(loc, api_key=api_key)
        return store


def close_stores() -> None:
    """Close every store this process opened (tests switch stores between cases)."""
    with _stores_lock:
        for (_, pid, _key), store in list(_stores.items()):
            if pid == os.getpid():
                store.close()
        _stores.clear()
        _caches.clear()


_caches: dict[tuple[str, int], Cache] = {}


def get_cache() -> Cache:
    """The cache named by the current settings (one instance per location and bound)."""
    key = (str(settings.cache_dir()), settings.cache_size())
    cache = _caches.get(key)
    if cache is None:
        cache = _caches[key] = Cache(Path(key[0]), key[1])
    return cache


def default_root(name: str) -> Path:
    """W&B's default download directory, absolute: ``<artifact dir>/<collection>:<version>``
    (settings.artifact_dir: ARTIFACTFS_ARTIFACT_DIR, else WANDB_ARTIFACT_DIR, else ./artifacts)."""
    return (settings.artifact_dir() / name).absolute()


def parse_file_uri(uri: str) -> Path | None:
    """The local path of a ``file://`` URI, or None for any other scheme."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        raise ArtifactFSError(f"file reference {uri!r} names a host; only local file:// URIs are supported")
    return Path(urllib.parse.unquote(parsed.path))


@dataclass
class ArtifactManifestEntry(ManifestEntry):
    """A manifest entry that knows its artifact, so it can download itself (W&B's entry type)."""

    _artifact: Any = field(default=None, repr=False, compare=False)
    _cache_after_upload: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def wrap(cls, e: ManifestEntry, artifact: Any) -> ArtifactManifestEntry:
        out = cls(path=e.path, digest=e.digest, size=e.size, ref=e.ref, extra=dict(e.extra),
                  birth_artifact_id=e.birth_artifact_id, local_path=e.local_path)
        out._artifact = artifact
        return out

    @property
    def name(self) -> str:
        return self.path

    def ref_target(self) -> str:
        """The reference URI of a reference entry (ValueError for uploaded files)."""
        if self.ref is None:
            raise ValueError(f"entry {self.path!r} is not a reference")
        return self.ref

    def download(self, root: str | os.PathLike[str] | None = None, skip_cache: bool | None = None) -> str:
        """Download just this entry under ``root`` (default: the artifact's download dir)."""
        art = self._artifact
        if art is None:
            raise ArtifactFSError(f"entry {self.path!r} is not attached to an artifact")
        art._ensure_logged("entry download")
        dest = Path(root) if root is not None else default_root(art.name)
        download_entries(art._store, art._blob_entity, [self], dest, skip_cache=bool(skip_cache))
        return str(dest / self.path)


ARTIFACT_REF_SCHEME = "wandb-artifact://"


def artifact_entry_reference(entry: ArtifactManifestEntry, name: str | None) -> ManifestEntry:
    """The entry ``add_reference(other_artifact.get_entry(path))`` adds.

    An uploaded file becomes ``wandb-artifact://<version id>/<path>`` with the file's digest and
    size (its bytes stay in the source's blob space and are fetched from there); a reference
    entry is copied as is, so the new artifact points at the original source.
    """
    art = entry._artifact
    if art is None or getattr(art, "_record", None) is None:
        raise ArtifactNotLoggedError("add_reference(entry) needs an entry of a logged artifact "
                                     "(e.g. Api().artifact(name).get_entry(path))")
    ref = entry.ref or f"{ARTIFACT_REF_SCHEME}{art._record.id}/{entry.path}"
    return ManifestEntry(path=(name or entry.path).strip("/"), digest=entry.digest, size=entry.size, ref=ref,
                         extra=dict(entry.extra))


def artifact_ref_entity(store: Store, ref: str) -> str:
    """The entity whose blob space holds a ``wandb-artifact://`` entry (NotFoundError once the
    referenced version is deleted)."""
    version_id = ref[len(ARTIFACT_REF_SCHEME):].split("/", 1)[0]
    rec = store.get_version(version_id)
    if rec.state != "COMMITTED":
        raise NotFoundError(f"reference {ref}: artifact version {version_id} was deleted")
    return rec.blob_entity


@dataclass(frozen=True)
class Hashed:
    """The result of hashing one local file for an entry."""

    digest: str  #: base64 md5 (or the path, for unchecksummed references)
    size: int | None
    local_path: str | None  #: where the bytes to upload are
    source: str | None  #: absolute path the user added (for get_added_local_path_name)
    cache_after_upload: bool  #: copy into the cache once uploaded (immutable, not skip_cache)


def _copy_hashing(src: Path, out: BinaryIO | None = None,
                  on_chunk: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(md5 hex, size) of ``src``, copying it to ``out`` in the same pass when given;
    ``on_chunk(n)`` after each chunk (progress; it raises to stop after Ctrl-C)."""
    sink = HashingWriter(out, on_chunk)
    _copy_file(src, sink)
    return sink.hexdigest(), sink.size


def hash_into_staging(src: Path, policy: str, skip_cache: bool, staging_dir: Callable[[], Path]) -> Hashed:
    """Hash ``src``; for the mutable policy copy it in the same pass (one read, one write).

    The copy goes into the cache (then it is both the upload source and a warm cache entry),
    or with ``skip_cache`` into the artifact's private staging directory.
    """
    source = os.path.abspath(src)
    if policy == "immutable":
        md5, size = _copy_hashing(src, on_chunk=progress.hashed)
        return Hashed(hex_to_b64(md5), size, source, source, not skip_cache)
    if skip_cache:
        fd, tmp = tempfile.mkstemp(prefix="staged-", dir=staging_dir())
        with os.fdopen(fd, "wb") as out:
            md5, size = _copy_hashing(src, out, progress.hashed)
        os.chmod(tmp, 0o444)
        return Hashed(hex_to_b64(md5), size, tmp, source, False)
    cache = get_cache()
    tmp = os.path.join(cache.tmp_dir, f"staged-{uuid.uuid4().hex}.incomplete")
    # the cache directory may have been removed since it was opened: made again, once
    fd = cache.in_layout(lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        with os.fdopen(fd, "wb") as out:
            md5, size = _copy_hashing(src, out, progress.hashed)
        hit = cache.lookup(md5, size)
        path = hit if hit is not None else cache.adopt(md5, tmp, fsync=False)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Hashed(hex_to_b64(md5), size, str(path), source, False)


class TransferBudget:
    """At most ``limit`` bytes of blob bodies in memory at once across one call's transfers
    (``peak``: the most there were).  A blob larger than the whole budget waits until it can
    be the only one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.limit)
        with self._cond:
            while self.used + n > self.limit:
                progress.check_interrupted()
                self._cond.wait(0.5)  # woken by each release; the timeout only re-checks Ctrl-C
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _parallel(fn: Callable[[Any], int], jobs: Iterable[Any]) -> list[int]:
    """``fn`` over ``jobs`` on one pool of ``settings.transfers()`` threads, results in job order.

    Jobs are taken from the iterable only as workers free up (at most 4 per thread queued), so
    a generator may do work between jobs (sign the next URL batch) and a long job list is never
    all queued at once.  The first failure, or Ctrl-C in the calling thread, cancels the jobs not
    started yet; the running ones stop at their next chunk (:data:`progress.INTERRUPTED`), so the
    call returns promptly instead of finishing the whole transfer first.
    """
    workers = settings.transfers()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="artifactfs-transfer")
    slots = threading.Semaphore(4 * workers)
    failed = threading.Event()
    futures: list[Future[int]] = []

    def finished(f: Future[int]) -> None:
        slots.release()
        if not f.cancelled() and f.exception() is not None:
            failed.set()

    try:
        for job in jobs:
            slots.acquire()  # a worker finishes a job (each bounded by the store's timeouts)
            if failed.is_set():
                break  # stop queueing; the failure is raised below
            fut = pool.submit(fn, job)
            fut.add_done_callback(finished)
            futures.append(fut)
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        already = progress.INTERRUPTED.is_set()
        progress.INTERRUPTED.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if not already:  # an in-process caller (not the CLI, which exits): later calls work again
            progress.INTERRUPTED.clear()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def upload_entries(store: Store, entity: str, entries: Iterable[ManifestEntry], cache: Cache) -> int:
    """Upload the content of ``entries`` the store lacks; returns the bytes uploaded.

    Entries inherited from an earlier version have no local path: their blobs are already in
    the store (or, if the store lost them, in the local cache, which is tried as a source).
    """
    sources: dict[str, tuple[str | None, int]] = {}
    to_cache: list[tuple[str, str]] = []
    for e in entries:
        if e.ref is not None:
            continue
        md5 = b64_to_hex(e.digest)
        if md5 not in sources or sources[md5][0] is None:
            sources[md5] = (e.local_path, e.size or 0)
        if getattr(e, "_cache_after_upload", False) and e.local_path:
            to_cache.append((md5, e.local_path))
    missing = store.missing_blobs(entity, sources) if sources else set()
    jobs: list[tuple[str, Path, int]] = []
    for md5 in sorted(missing):
        local, size = sources[md5]
        path = Path(local) if local else cache.lookup(md5)
        if path is None:
            continue  # the commit reports it as a MissingBlobError with a clear message
        jobs.append((md5, path, size))
    with progress.Meter(sum(size for _, _, size in jobs), "upload") as meter:
        meter.files_present = len(sources) - len(missing)

        pending: list[dict[str, Any]] = []  # single PUTs to register in batches (UploadBatching)

        def put(job: tuple[str, Path, int]) -> int:
            md5, path, size = job
            tick = meter.entry(size)
            if isinstance(store, UploadBatching):
                done = store.put_blob_deferred(entity, md5, path, size, progress=tick)
                if done is not None:
                    pending.append(done)  # list.append is atomic
            else:
                store.put_blob(entity, md5, path, size, progress=tick)
            tick.finish()
            meter.file_done(moved=True)
            return size

        uploaded = sum(_parallel(put, jobs))
        if pending:
            assert isinstance(store, UploadBatching)
            store.complete_blobs(entity, pending)
    for md5, local in to_cache:
        if cache.lookup(md5) is None:
            try:
                cache.add_file(md5, Path(local))
            except (OSError, DigestMismatchError) as exc:  # the cache is an optimisation only
                log.warning("could not cache %s: %s", local, exc)
    return uploaded


# -- downloading --------------------------------------------------------------------------------------
def read_blob_cached(store: Store, entity: str, md5: str) -> bytes:
    """A whole small blob (a manifest), verified, through the local cache.

    Manifests are immutable and content-addressed, so a second ``download`` (or the mount,
    which shares the cache) does not ask the store again; bytes that do not hash to ``md5``
    are never returned, whether they came from the cache or the store.
    """
    cache = get_cache()
    path = cache.lookup(md5)
    if path is not None:
        data = path.read_bytes()
        if md5_bytes(data) == md5:
            return data
        cache.drop(md5)
    data = store.read_blob(entity, md5)
    if md5_bytes(data) != md5:
        raise DigestMismatchError(f"blob {md5} from {store.location} has md5 {md5_bytes(data)}; refusing it")
    try:
        with cache.writer(md5) as f:
            f.write(data)
    except (OSError, ArtifactFSError) as exc:  # the cache is an optimisation only
        log.warning("could not cache manifest %s: %s", md5, exc)
    return data


class _Counted:
    """A writer that reports each write's length (progress) before passing it on."""

    def __init__(self, out: BinaryIO, tick: Callable[[int], None]) -> None:
        self._out, self._tick = out, tick

    def write(self, data: Any) -> int:
        n = self._out.write(data)
        self._tick(len(data) if n is None else n)
        return n


def _stream_blob(store: Store, entity: str, md5: str, size: int, out: BinaryIO,
                 tick: Callable[[int], None] | None = None) -> None:
    """Write the blob to ``out``; ``tick(n)`` as bytes arrive (progress, Ctrl-C)."""
    if isinstance(store, LocalBlobs):
        try:
            f = open(store.blob_path(entity, md5), "rb", buffering=0)
        except FileNotFoundError:
            raise NotFoundError(f"blob {md5} is missing from the store {store.location}") from None
        if tick is not None:
            out = _Counted(out, tick)  # type: ignore[assignment]
        with f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                out.write(view[:n])
        return
    if size > _READ_CHUNK:
        _stream_remote(store, entity, md5, size, out, tick)
        return
    offset = 0
    while offset < size:
        data = store.read_blob(entity, md5, offset, min(_READ_CHUNK, size - offset), progress=tick)
        if not data:
            raise ArtifactFSError(f"blob {md5} ended after {offset} of {size} bytes")
        out.write(data)
        offset += len(data)


def _stream_temp(exc: BaseException) -> bool:
    """A stream that broke on the way (worth resuming); not a local write error, not a stop."""
    return is_transport_failure(exc) or isinstance(exc, StoreUnavailableError)


def _stream_remote(store: Store, entity: str, md5: str, size: int, out: BinaryIO,
                   tick: Callable[[int], None] | None = None) -> None:
    """A large blob as ONE streamed GET written to ``out`` in order, as it arrives.

    ``out`` is the cache's hashing file (or the destination's temp file, which is hashed as
    written): no part file, no copy, no second read.  One stream per blob because a download
    of several large files keeps the transfer pool busy across files, and because a ranged GET
    costs some endpoints a pass over the whole object (moto rebuilds it per request: 16 ranged
    parts of a 256 MiB blob cost it 4 GiB of copying).  A stream that breaks is resumed at the
    byte it reached, under the one retry policy (:func:`client.retry.resume_while_progressing`)."""
    pos = 0

    def attempt() -> None:
        nonlocal pos
        for chunk in store.stream_blob(entity, md5, pos, size - pos):
            if len(chunk) > size - pos:
                raise DigestMismatchError(f"blob {md5}: the store sent more than its {size} bytes")
            out.write(chunk)
            pos += len(chunk)
            if tick is not None:
                tick(len(chunk))
        if pos != size:
            raise StoreUnavailableError(f"blob {md5}: the stream ended at {pos} of {size} bytes")

    def give_up(exc: BaseException, attempts: int) -> BaseException:
        return StoreUnavailableError(f"downloading blob {md5} stopped at {pos} of {size} bytes "
                                     f"after {attempts} attempts: {exc}")

    resume_while_progressing(
        lambda: _STREAM_POLICY.call(attempt, is_temp=_stream_temp, give_up=give_up, what=f"blob {md5}", logger=log),
        lambda: pos, StoreUnavailableError)


#: resuming a broken download stream (RetryPolicy's defaults: 6 tries, backoff from 0.1 s)
_STREAM_POLICY = RetryPolicy()


def _atomic_write(target: Path, produce: Callable[[BinaryIO], None], md5: str | None) -> None:
    """Write ``target`` atomically (:mod:`client.atomic`); check md5 (if given) before renaming."""
    with atomic_write(target, mode=0o600) as raw:
        hashing = HashingWriter(raw)
        produce(hashing)  # type: ignore[arg-type]
        if md5 is not None and hashing.hexdigest() != md5:
            raise DigestMismatchError(f"downloaded content of {target} does not match its md5 {md5}")


def _copy_file(src: Path, out: BytesSink) -> None:
    with open(src, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            out.write(view[:n])


def _present_and_valid(target: Path, md5: str, size: int | None,
                       tick: Callable[[int], None] | None = None) -> bool:
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if size is not None and st.st_size != size:
        return False
    return _copy_hashing(target, on_chunk=tick)[0] == md5


def _download_reference(e: ManifestEntry, dest: Path, allow_missing: bool, meter: progress.Meter) -> int:
    """Fetch a reference entry (or, for an unexpanded directory reference, what is under it now)."""
    written = 0
    for sub in references.entries_to_download(e):
        target = dest / sub.path
        try:
            md5 = b64_to_hex(sub.digest) if not references.is_uri_digest(sub) else None
        except ValueError:
            md5 = None  # an ETag or a URI digest: the handler verifies what it can
        if md5 is not None and _present_and_valid(target, md5, sub.size):
            meter.file_done(moved=False)
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            references.fetch_reference(sub, target)
        except NotFoundError:
            if not allow_missing:
                raise NotFoundError(f"reference {sub.ref!r} of entry {sub.path!r} is missing; "
                                    "pass allow_missing_references=True to skip it") from None
            log.warning("skipping missing reference %s", sub.ref)
            continue
        meter.add(sub.size or 0)
        meter.file_done(moved=True)
        written += sub.size or 0
    return written


def _place_bytes(target: Path, data: bytes | bytearray) -> None:
    """Write ``data`` (already verified) to ``target`` atomically in one write.  Not fsynced,
    as cp, rclone and wandb do not: after a crash a file may be short, which the next
    download finds by its md5 and writes again."""
    with atomic_fd(target, mode=0o600, durable=False) as fd:
        write_fully(fd, memoryview(data), 0)


def _place_copy(src: int, target: str | Path, size: int, md5: str) -> None:
    """Copy the verified cache object ``md5`` open at ``src`` to ``target`` atomically, in the
    kernel where it can (:func:`_copy_fd`); not fsynced either.  An object shorter than
    ``size`` (truncated since it was checked) leaves nothing at ``target``."""
    with atomic_fd(target, mode=0o600, durable=False) as out:
        _copy_exact(src, out, size, md5)


def _write_new(src: int, target: str, size: int, md5: str) -> None:
    """Copy the verified cache object ``md5`` open at ``src`` into the new file ``target`` (its
    directory made if missing) with no temp name: only inside a staging directory, whose files
    are under no real name until it is renamed.  Not fsynced (as :func:`_place_copy`)."""
    try:
        out = os.open(target, _NEW_FILE, 0o600)
    except FileNotFoundError:
        os.makedirs(target.rpartition("/")[0], exist_ok=True)
        out = os.open(target, _NEW_FILE, 0o600)
    try:
        _copy_exact(src, out, size, md5)
    finally:
        os.close(out)


def _copy_exact(src: int, dst: int, size: int, md5: str) -> None:
    """:func:`_copy_fd` of all ``size`` bytes of the cache object ``md5``: one shorter (truncated
    since it was checked) is DigestMismatchError, and the caller discards what it wrote."""
    if (done := _copy_fd(src, dst, size)) != size:
        raise DigestMismatchError(f"cache object {md5} has {done} bytes, expected {size}")


def _copy_fd(src: int, dst: int, size: int) -> int:
    """Copy the first ``size`` bytes of ``src`` into the empty file ``dst``; returns the bytes
    copied (fewer if ``src`` is shorter).  copy_file_range (a reflink where the filesystem can),
    else sendfile (another filesystem), else read and write; ``src``'s offset is untouched."""
    for kernel_copy in (os.copy_file_range, _sendfile):
        try:
            done = 0
            while done < size and (n := kernel_copy(src, dst, size - done, done)):
                done += n
            return done
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            os.ftruncate(dst, 0)  # start again from nothing with the next way
            os.lseek(dst, 0, os.SEEK_SET)
    done = 0
    while done < size and (data := os.pread(src, min(_CHUNK, size - done), done)):
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
        done += len(data)
    return done


def _sendfile(src: int, dst: int, count: int, offset: int) -> int:
    """``os.sendfile`` in ``os.copy_file_range``'s argument order (from ``src`` at ``offset``)."""
    return os.sendfile(dst, src, offset, count)


def _make_executable(target: str | Path) -> None:
    """x wherever r is (on the umask-limited mode the downloaded file got)."""
    mode = os.stat(target).st_mode
    os.chmod(target, mode | ((mode & 0o444) >> 2))


class _Listing:
    """Which names the destination directories held, listed once per directory: a download
    into a new or sparse tree asks nothing per file to learn that its target is not there."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def __contains__(self, path: str) -> bool:
        parent, _, name = path.rpartition("/")
        names = self._names.get(parent)
        if names is None:
            try:
                names = frozenset(os.listdir(parent))
            except (FileNotFoundError, NotADirectoryError):
                names = frozenset()
            self._names[parent] = names
        return name in names


def _kept(target: Path, md5: str, size: int | None, tick: progress.EntryMeter, meter: progress.Meter) -> bool:
    """Whether the file already at ``target`` has the right content and is kept (counted as a
    file done without moving bytes): the rule of both the cached copy and the pool."""
    if not _present_and_valid(target, md5, size, tick):
        return False
    tick.finish()
    meter.file_done(moved=False)
    return True


def _cacheable_md5(e: ManifestEntry) -> str | None:
    """The blob an uploaded file's entry names (None for a reference or an invalid digest: the
    transfer pool handles those, and says what is wrong)."""
    if e.ref is not None:
        return None
    try:
        return b64_to_hex(e.digest)
    except ValueError:
        return None


def _copy_cached(cache: Cache, dest: Path, files: list[ManifestEntry],
                 meter: progress.Meter) -> tuple[int, list[ManifestEntry]]:
    """Place the ``files`` whose blob the cache holds verified, in the calling thread; returns
    (bytes written, the files left for the transfer pool).

    A warm download's whole cost: no thread hand-off, no store call, the progress meter told
    per batch of bytes and once for the files, and the LRU stamps of every object used written
    in one index transaction at the end.  A destination that did not exist holds none of the
    targets: nothing is listed or stat'ed, and the files are written straight into its staging
    directory (:mod:`client.staging`: no temp name and rename per file), renamed to the root
    once they are all there (removed if the loop fails).  Into an existing one each directory
    is listed once (a target the listing lacks is not stat'ed), a file already right is kept
    (hashed to know) and a different one replaced (and counted), as in the pool, each copy
    placed by the atomic writer.  The loop runs once per file, so it binds what it calls once.
    """
    rest: list[ManifestEntry] = []
    stamps: list[tuple[str, int, int]] = []
    root = str(dest)
    existing: _Listing | None = None
    stage: Staging | None = None
    if os.path.isdir(root):
        existing = _Listing()
    elif not (stage := Staging(root)).open():
        stage = None  # another download is building this root (or no flock here): each file in place
    base = stage.path if stage is not None else root
    open_checked, close = cache.open_checked, os.close
    place = _place_copy if stage is None else _write_new
    written = pending = moved = 0  # pending: bytes the meter has not been told yet
    try:
        for e in files:
            if (md5 := _cacheable_md5(e)) is None:
                rest.append(e)
                continue
            target, size = f"{base}/{e.path}", e.size or 0  # entry paths are normalised, relative
            tick: progress.EntryMeter | None = None
            replaced = None
            if existing is not None and target in existing:
                tick = meter.entry(size)
                if _kept(Path(target), md5, e.size, tick, meter):
                    continue
                replaced = e.path if os.path.isfile(target) else None
            if (src := open_checked(md5, size, stamps)) is None:
                rest.append(e)
                continue
            try:
                place(src, target, size, md5)
            finally:
                close(src)
            if e.is_executable:
                _make_executable(target)
            written += size
            if tick is not None:
                meter.file_done(moved=True, replaced=replaced)
                tick.finish()
                continue
            moved += 1
            if (pending := pending + size) >= _PROGRESS_BATCH:
                meter.add(pending)
                pending = 0
        if stage is not None:
            if moved:
                stage.publish()
            else:
                stage.discard()
    except BaseException:
        if stage is not None:
            stage.discard()  # no file of it was under its real name yet
        raise
    finally:
        cache.save_stamps(stamps)
        meter.file_done(moved=True, count=moved)
    meter.add(pending)
    return written, rest


def _place_object(obj: Path, target: Path, size: int, md5: str) -> None:
    """:func:`_place_copy` of the cache object at ``obj``."""
    src = os.open(obj, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _place_copy(src, target, size, md5)
    finally:
        os.close(src)


class _CacheBatch:
    """The small blobs of one download, written for the cache by the pool's threads and
    installed :data:`CACHE_BATCH` at a time (one eviction and one index transaction each) by
    whichever thread fills a batch, the rest at :meth:`close` (issue 17: a cache write per
    file cost more CPU than the GET).  The cache is an optimisation: a blob it could not take
    is noted in ``failed``, never a failed download."""

    def __init__(self, cache: Cache, failed: list[str]) -> None:
        self.cache, self.failed = cache, failed
        self._lock = threading.Lock()
        self._prepared: list[Prepared] = []
        self._bytes = 0

    def add(self, md5: str, data: bytes | bytearray) -> None:
        """Write ``data``, already md5-checked by the caller, for the cache."""
        try:
            prepared = self.cache.prepare_verified(md5, data)
        except (OSError, ArtifactFSError) as exc:
            self.failed.append(f"{md5}: {exc}")
            return
        with self._lock:
            self._prepared.append(prepared)
            self._bytes += prepared.size
            if len(self._prepared) < CACHE_BATCH and self._bytes < CACHE_BATCH_BYTES:
                return
            batch, self._prepared, self._bytes = self._prepared, [], 0
        self._install(batch)

    def _install(self, batch: list[Prepared]) -> None:
        try:
            self.cache.evict(sum(s.size for s in batch))
            self.cache.install_prepared(batch)
        except (OSError, ArtifactFSError) as exc:
            self.cache.discard_prepared(batch)
            self.failed.extend(f"{s.md5}: {exc}" for s in batch)

    def __enter__(self) -> _CacheBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Install what is prepared (also after a failed download: those bytes were checked)."""
        with self._lock:
            batch, self._prepared, self._bytes = self._prepared, [], 0
        if batch:
            self._install(batch)


#: small blobs per cache install of a download, and the most bytes prepared before one
CACHE_BATCH = 64
CACHE_BATCH_BYTES = 64 << 20


def download_entries(store: Store, entity: str, entries: list[ManifestEntry], dest: Path, *,
                     skip_cache: bool = False, allow_missing_references: bool = False) -> int:
    """Download ``entries`` under ``dest`` in parallel; returns the bytes written.

    Files already at ``dest`` with the right md5 are kept (a rerun after Ctrl-C resumes);
    progress is counted by bytes as they arrive (a bar on a terminal).  Files whose blob the
    cache holds are copied from it first, in this thread, without asking the store anything
    (:func:`_copy_cached`); the others are fetched on one pool of ``settings.transfers()``
    threads with their URLs signed in batches (the next batch signed while the current one
    downloads) and at most ``settings.transfer_memory()`` bytes of bodies in memory; symbolic
    links come last.
    """
    cache = None if skip_cache else get_cache()
    meter = progress.Meter(sum([e.size or 0 for e in entries]), "download")
    budget = TransferBudget(settings.transfer_memory())
    ref_entities: dict[str, str | None] = {}  # artifact reference version id -> blob entity (None: deleted)
    ref_lock = threading.Lock()
    signed: dict[str, threading.Event] = {}  # md5 -> set once its batch is signed (or gave up)
    not_cached: list[str] = []  # blobs the cache could not take: one warning after a download that worked
    cache_batch: Any = contextlib.nullcontext() if cache is None else _CacheBatch(cache, not_cached)

    def one(e: ManifestEntry | _Task) -> int:
        if isinstance(e, _Task):
            return e.run()
        target = dest / e.path
        written = fetch(e, target)
        if e.is_executable and e.ref is None:
            _make_executable(target)
        return written

    def ref_entity(ref: str) -> str | None:
        version_id = ref[len(ARTIFACT_REF_SCHEME):].split("/", 1)[0]
        with ref_lock:
            if version_id in ref_entities:
                return ref_entities[version_id]
        try:
            found: str | None = artifact_ref_entity(store, ref)
        except NotFoundError:
            found = None
        with ref_lock:
            ref_entities[version_id] = found
        return found

    def fetch(e: ManifestEntry, target: Path) -> int:
        blob_entity = entity
        if e.ref is not None and e.ref.startswith(ARTIFACT_REF_SCHEME):
            found = ref_entity(e.ref)
            if found is None:
                if not allow_missing_references:
                    raise NotFoundError(f"reference {e.ref!r} of entry {e.path!r} is missing; "
                                        "pass allow_missing_references=True to skip it")
                log.warning("skipping missing reference %s", e.ref)
                return 0
            blob_entity = found
        elif e.ref is not None:
            return _download_reference(e, dest, allow_missing_references, meter)
        md5, size = b64_to_hex(e.digest), e.size or 0
        if not is_md5_hex(md5):
            raise DigestMismatchError(f"entry {e.path!r} has an invalid digest")
        tick = meter.entry(size)
        if _kept(target, md5, e.size, tick, meter):
            return 0
        # wandb's download: a file whose content differs from the manifest is overwritten
        # (counted, so the CLI can say so); files the artifact does not name are left alone
        replaced = e.path if target.is_file() else None
        if cache is not None and (obj := cache.checked(md5, size)) is not None:
            _place_object(obj, target, size, md5)  # verified by its marker (or hashed just now)
        else:
            if md5 in signed:
                signed[md5].wait(_SIGN_WAIT)  # its batch is being signed; else read_blob asks itself
            if size <= WHOLE_BLOB_LIMIT:
                with budget.hold(size):
                    data = store.read_blob(blob_entity, md5, 0, size, progress=tick) if size else b""
                    if len(data) != size:
                        raise DigestMismatchError(f"blob {md5} has {len(data)} bytes, the manifest says {size}")
                    if md5_bytes(data) != md5:
                        raise DigestMismatchError(f"downloaded content of {target} does not match its md5 {md5}")
                    if cache is not None:
                        cache_batch.add(md5, data)
                    _place_bytes(target, data)
                    del data
            elif cache is None:
                _atomic_write(target, lambda out: _stream_blob(store, blob_entity, md5, size, out, tick), md5)
            else:
                obj = cache.fetch(md5, size, lambda out: _stream_blob(store, blob_entity, md5, size, out, tick))
                _place_object(obj, target, size, md5)
        tick.finish()
        meter.file_done(moved=True, replaced=replaced)
        return size

    links: list[tuple[ManifestEntry, str]] = []
    files: list[ManifestEntry] = []
    for e in entries:
        if (link := e.symlink_target) is None:
            files.append(e)
        else:
            links.append((e, link))
    with meter, cache_batch:
        written = 0
        if cache is not None:  # what the cache holds is copied first, here; the pool gets the rest
            written, files = _copy_cached(cache, dest, files, meter)
        jobs: Iterable[Any] = files
        if files and isinstance(store, UrlBatching):  # URLs signed in batches, only for what the cache lacks
            # (``files`` is what _copy_cached did not find in the cache: no second look per file)
            wanted = list(dict.fromkeys(md5 for md5 in (b64_to_hex(e.digest) for e in files if e.ref is None)
                                        if is_md5_hex(md5)))
            batches = [wanted[i:i + store.URL_BATCH] for i in range(0, len(wanted), store.URL_BATCH)]
            for batch in batches:
                ev = threading.Event()
                signed.update((m, ev) for m in batch)
            jobs = _signing_ahead(store, entity, files, batches, signed)
        if files:
            written += sum(_parallel(one, jobs))
        # symbolic links after every file: no file of this download is written through a link it made
        for e, link in links:
            _place_symlink(dest / e.path, link)
    if not_cached:  # a failed download says its own error; this is only for one that worked
        log.warning("%d downloaded file(s) were not kept in the cache (first: %s)", len(not_cached), not_cached[0])
    return written


def _signing_ahead(store: UrlBatching, entity: str, files: list[ManifestEntry], batches: list[list[str]],
                   signed: dict[str, threading.Event]) -> Iterator[Any]:
    """The jobs of a download with "sign URL batch k" jobs placed among them: batch 0 first,
    batch k+1 as soon as the first file of batch k is queued, so signing overlaps downloading.
    A failed signing is logged; those files then ask for their own URLs."""
    def sign(batch: list[str]) -> Callable[[], int]:
        def run() -> int:
            try:
                store.prefetch_urls(entity, batch)
            except ArtifactFSError as exc:
                log.warning("could not sign a batch of %d download URLs (reading them one by one): %s",
                            len(batch), exc)
            finally:
                signed[batch[0]].set()
            return 0
        return run

    first_of = {b[0]: k for k, b in enumerate(batches)}
    if batches:
        yield _Task(sign(batches[0]))
    for e in files:
        k = first_of.get(b64_to_hex(e.digest)) if e.ref is None else None
        if k is not None and k + 1 < len(batches):
            yield _Task(sign(batches[k + 1]))
        yield e


@dataclass(frozen=True)
class _Task:
    """A job of the transfer pool that is not a file (signing a URL batch)."""

    run: Callable[[], int]


def _place_symlink(target: Path, link: str) -> None:
    """Make ``target`` a symbolic link to ``link`` (atomically replacing a file or link there)."""
    try:
        if os.readlink(target) == link:
            return
    except (FileNotFoundError, OSError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name[:100]}.{uuid.uuid4().hex[:12]}.artifactfs-tmp"
    os.symlink(link, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


# -- directory-level helpers used by Artifact ---------------------------------------------------------
def remove_extra_files(dest: Path, keep: set[str]) -> None:
    """Delete every file under ``dest`` whose relative path is not in ``keep`` (and empty dirs)."""
    if not dest.is_dir():
        return
    for dirpath, _dirs, files in os.walk(dest, topdown=False):
        for fn in files:
            full = Path(dirpath, fn)
            if full.relative_to(dest).as_posix() not in keep:
                full.unlink()
        if Path(dirpath) != dest and not any(Path(dirpath).iterdir()):
            Path(dirpath).rmdir()


def verify_tree(dest: Path, manifest: Manifest, name: str) -> None:
    """ValueError unless ``dest`` holds exactly the manifest's files with their md5s.

    Reference entries are not checked (W&B semantics): they may be absent or different.
    """
    for dirpath, dirs, files in os.walk(dest):
        links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]  # links to directories
        for fn in files + links:
            rel = Path(dirpath, fn).relative_to(dest).as_posix()
            if rel not in manifest.entries:
                raise ValueError(f"found {rel!r} in {dest}, which is not a file of artifact {name!r} (extra file)")
    for e in manifest:
        if e.ref is not None:
            continue
        p = dest / e.path
        if e.symlink_target is not None:
            if not p.is_symlink() or os.readlink(p) != e.symlink_target:
                raise ValueError(f"{e.path!r} in {dest} is not the symbolic link to {e.symlink_target!r} "
                                 f"of artifact {name!r}")
            continue
        if not p.is_file():
            raise LocalPathError(f"{e.path!r} of artifact {name!r} is missing from {dest}")
        if hex_to_b64(_copy_hashing(p)[0]) != e.digest:
            raise ValueError(f"digest mismatch for {e.path!r} in {dest}: it differs from artifact {name!r}")


def upload_manifest(store: Store, entity: str, manifest: Manifest) -> tuple[str, int]:
    """Store the manifest JSON as a blob; returns (its md5 hex, bytes uploaded)."""
    data = manifest.to_bytes()
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if not store.missing_blobs(entity, [md5]):
        return md5, 0
    with tempfile.NamedTemporaryFile(prefix="manifest-", delete=False) as tmp:
        tmp.write(data)
    try:
        if isinstance(store, UploadBatching):  # its plan came with missing_blobs: a PUT and one batch call
            pending = store.put_blob_deferred(entity, md5, Path(tmp.name), len(data))
            if pending is not None:
                store.complete_blobs(entity, [pending])
        else:
            store.put_blob(entity, md5, Path(tmp.name), len(data))
    finally:
        os.unlink(tmp.name)
    return md5, len(data)
