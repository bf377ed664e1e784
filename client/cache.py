"""Content-addressed local cache shared by SDK processes and the mount daemon.

Layout (everything under one root, default ``~/.cache/artifactfs``)::

    root/
      objects/ab/cdef0123...   complete objects, named by md5 hex, read-only (0o444)
      tmp/                     in-flight writes (``*.incomplete``), renamed into objects/ when done
      locks/ab/cdef0123...     per-key lock files, present only while someone holds the key
      partial/                 reserved for the mount's sparse, partially fetched objects

Why it is built this way:

* Content addressing makes entries immutable: an object's name *is* its md5, so a reader never
  needs invalidation, and the same bytes fetched by the SDK are reused by the mount.
* Every object enters through a temp file that is fsynced, verified against its md5 and then
  renamed; a crash leaves at most a stray temp file, never a truncated object under a real name.
* Several processes share the directory.  :meth:`Cache.fetch` takes a per-key ``fcntl`` lock so
  concurrent readers of one key download it once; :meth:`Cache.evict` only removes objects whose
  key lock it can take without waiting, so an object being fetched is never evicted.
* Size and LRU order are kept incrementally in ``index.sqlite`` (:mod:`client.cache_index`):
  a miss reads the total in O(1) and the oldest objects in O(log n), never rescanning the
  directory.  ``lookup`` also touches the object's atime (the stamp a rebuild reads, as
  ``max(atime, mtime)``); ``open_checked`` does the same but hands the index row to its caller,
  so a download of many cached files writes all their stamps in one transaction.  The
  directory stays the truth: ``prune`` reconciles the index with it.  A corrupt object (wrong
  size, failed verify) is dropped and treated as a miss.  The mtime is left alone so that it
  keeps meaning "content last written".
* Verified markers: an object whose bytes were hashed *and* are durable carries the xattr
  ``user.artifactfs.verified = "<md5> <size> <mtime_ns> <ino> <marked_ns>"``.  :meth:`Cache.checked` trusts
  an object whose marker matches its current stat instead of re-hashing it (1.7 s/GiB), so a
  remount does not re-read the whole cache.  Any write through the filesystem changes the
  mtime (and a copy changes the inode), which invalidates the marker and forces a re-hash.
  What a marker cannot see is corruption below the filesystem (media bit rot that keeps the
  mtime): that is the accepted trade-off, the same one every local filesystem cache makes.
  A marker made within 100 ms of the file's mtime is not trusted (git's "racy clean" rule):
  the next check re-hashes and re-marks it.
  A marker is only written for bytes known to be on disk (after fsync / fdatasync), so a
  crash cannot leave a marker on a zeroed or short object.  Filesystems without user xattrs
  simply never get markers (every check then hashes, as before).
* Never a hard link to a store blob: a cache object is disposable and may be rewritten or
  corrupted; sharing its inode with an embedded store's blob would put the store's only copy
  at the cache's mercy.  Content from a local store is copied in (``add_file``, verified).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from . import settings
from .atomic import write_fully
from .errors import DigestMismatchError, InvalidNameError
from .hashing import CHUNK as _CHUNK
from .hashing import is_md5_hex, md5_fd, md5_file
from .cache_index import CacheIndex

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: lookup() refreshes an object's LRU stamp only when it is older than this (saves a syscall
#: per read on hot objects; LRU precision of a few seconds is plenty).
_TOUCH_GRANULARITY = 5.0
_TOUCH_GRANULARITY_NS = int(_TOUCH_GRANULARITY * 1e9)
#: prune() removes temp files left by crashed writers once they are this old.
_STALE_TMP_SECONDS = 3600.0
#: the verified marker (see the module docstring)
VERIFIED_XATTR = "user.artifactfs.verified"


#: a marker is trusted only if the file's mtime was at least this much older than the marker
#: ("racy" marker rule, as git's index): file timestamps come from a coarse clock (a jiffy),
#: so a write right after marking could otherwise keep the very same mtime and go unnoticed
_RACY_NS = 100_000_000


#: how far back a prepared object's mtime is set: past the racy window, so its marker holds at once
_SETTLED_NS = 1_000_000_000


@dataclass(frozen=True)
class Prepared:
    """An object written and checked in a temp file, waiting for :meth:`Cache.install_prepared`."""

    md5: str
    tmp: str
    size: int


def _marker(md5_hex: str, st: os.stat_result) -> str:
    return f"{md5_hex} {st.st_size} {st.st_mtime_ns} {st.st_ino}"


def has_verified_marker(fd: int, md5_hex: str, st: os.stat_result | None = None) -> bool:
    """Whether the open file ``fd`` carries a trustworthy marker for ``md5_hex`` and its stat."""
    st = st if st is not None else os.fstat(fd)
    try:
        value = os.getxattr(fd, VERIFIED_XATTR).decode()
    except (OSError, UnicodeDecodeError):
        return False  # no marker, or no xattr support: unverified
    key, _, marked = value.rpartition(" ")
    return key == _marker(md5_hex, st) and marked.isdigit() and int(marked) - st.st_mtime_ns >= _RACY_NS


def set_verified_marker(fd: int, md5_hex: str, *, durable: bool = False) -> bool:
    """Record that ``fd``'s bytes hash to ``md5_hex``.  ``durable``: they are known on disk.

    Without ``durable`` the data is fdatasync'ed first (near free for a clean file), so a crash
    cannot leave a marker on bytes that never reached the disk.  False if not recorded.
    """
    try:
        if not durable:
            os.fdatasync(fd)
        value = f"{_marker(md5_hex, os.fstat(fd))} {time.time_ns()}".encode()
        try:
            os.setxattr(fd, VERIFIED_XATTR, value)
        except PermissionError:
            # A user.* xattr needs write permission, and cache objects are read-only (0444):
            # only root could mark them.  Their owner lends itself the write bit for the call
            # (fchmod moves ctime only, which the marker does not name).
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            os.fchmod(fd, mode | stat.S_IWUSR)
            try:
                os.setxattr(fd, VERIFIED_XATTR, value)
            finally:
                os.fchmod(fd, mode)
        return True
    except OSError as exc:
        log.debug("no verified marker for %s: %s", md5_hex, exc)
        return False


def _check_key(md5_hex: str) -> str:
    """Keys become path components: accept exactly 32 lowercase hex digits."""
    if not is_md5_hex(md5_hex):
        raise InvalidNameError(f"cache key must be an md5 hex digest (32 lowercase hex digits), got {md5_hex!r}")
    return md5_hex


#: index rows of the mount's partial objects are keyed ``partial/<md5>`` (see begin_partial)
PARTIAL_KEY = "partial/"


@dataclass
class PartialHold:
    """A partial object counted in the bound and held (not evictable) until released."""

    cache: "Cache"
    key: str
    lock: "_KeyLock | None"

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


@dataclass(frozen=True)
class CacheInfo:
    """A snapshot of the cache's occupancy."""

    entries: int
    bytes: int
    max_bytes: int
    root: Path


class _HashingFile:
    """A binary file wrapper that hashes sequential writes as they happen.

    If the writer seeks (e.g. fills ranges out of order) the running hash is abandoned and the
    file is re-hashed once at the end, so correctness never depends on the write pattern.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._pos = 0
        self.sequential = True
        self.written = 0

    def write(self, data: Any) -> int:
        n = self._raw.write(data)
        if self.sequential:
            self._md5.update(memoryview(data)[:n] if n is not None else data)
            self._pos += n
        self.written += n
        return n

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._raw.seek(offset, whence)
        if pos != self._pos:
            self.sequential = False
        return pos

    def truncate(self, size: int | None = None) -> int:
        self.sequential = False
        return self._raw.truncate(size)

    def digest(self) -> str | None:
        return self._md5.hexdigest() if self.sequential else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _HashingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _KeyLock:
    """An exclusive per-key lock on ``locks/ab/cdef...`` that survives lock-file removal.

    The lock file is unlinked by its holder on release so the directory does not grow without
    bound.  A waiter that was blocked on the old (now unlinked) inode notices the path no
    longer names its inode and retries on the new file, so exclusion holds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)  # the holder removed the file while we waited: lock the new one

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


class Cache:
    """The content-addressed cache; see the module docstring for layout and guarantees."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else settings.cache_dir()
        self.max_bytes = max_bytes if max_bytes is not None else settings.cache_size()
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.partial_dir = self.root / "partial"
        self._objects = str(self.objects_dir)
        for d in (self.objects_dir, self.tmp_dir, self.locks_dir, self.partial_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._shards: set[str] = set()  #: shard dirs known to exist (saves a mkdir per insert)
        self._layout_lock = threading.Lock()
        #: called with the md5 of each object this process installs, once it is in place (the
        #: mount's fast path: a version waiting for that object is checked at once); must be
        #: quick and must not block, as the installer may hold locks of its own
        self.on_installed: Callable[[str], None] | None = None
        self.index = CacheIndex(self.root / "index.sqlite")
        if not self.index.built():  # a new index, or a cache from before the index: one scan
            self.reindex()

    def restore_layout(self) -> None:
        """Make the cache's directories and index again where they went missing under this
        process (a user's ``rm -rf`` of the cache while a mount or a notebook runs).  The
        objects that went with them are fetched again when next read; nothing else is lost, and
        the index is made to match what is on disk (one scan), so the bound still holds."""
        with self._layout_lock:
            objects_gone = not self.objects_dir.is_dir()
            for d in (self.objects_dir, self.tmp_dir, self.locks_dir, self.partial_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._shards.clear()
            if self.index.reopen_if_replaced() or objects_gone or not self.index.built():
                log.warning("the cache directory %s was removed or emptied while in use: made again", self.root)
                self.reindex()

    def in_layout(self, create: Callable[[], _T]) -> _T:
        """``create()``: a file made in the cache's directories; tried once more after
        :meth:`restore_layout` when a directory it needed had gone (FileNotFoundError)."""
        try:
            return create()
        except FileNotFoundError:
            self.restore_layout()
            return create()

    # -- addressing ------------------------------------------------------------------------
    def path(self, md5_hex: str) -> Path:
        """Where the complete object for ``md5_hex`` lives (it may not exist)."""
        return Path(self._object_name(md5_hex))

    def _object_name(self, md5_hex: str) -> str:
        """:meth:`path` as a string (no pathlib work for the per-file loops of a download)."""
        _check_key(md5_hex)
        return f"{self._objects}/{md5_hex[:2]}/{md5_hex[2:]}"

    def _lock(self, md5_hex: str) -> _KeyLock:
        if md5_hex.startswith(PARTIAL_KEY):
            return _KeyLock(self.locks_dir / "partial" / md5_hex[len(PARTIAL_KEY):])
        return _KeyLock(self.locks_dir / md5_hex[:2] / md5_hex[2:])

    # -- partial objects (the mount's sparse files) count in the bound ------------------------
    def begin_partial(self, md5_hex: str, size: int) -> PartialHold | None:
        """Count a partial object under ``partial/`` in the size bound, making room for it.

        It is counted at its full size from the start (a reservation: the sparse file grows to
        that), so the whole cache directory stays under ``max_bytes`` however many partial
        objects are being filled.  Returns the hold to release when the object is closed
        (eviction skips a held partial; an unheld one, resumable later, may be evicted), or
        None when even after eviction there is no room: the caller then streams the object
        without caching it.
        """
        _check_key(md5_hex)
        key = PARTIAL_KEY + md5_hex
        lock = self._lock(key)
        if not lock.acquire(blocking=False):
            return PartialHold(self, key, None)  # another process fills it and counts it
        try:
            counted = (self.partial_dir / f"{md5_hex}.part").exists() and self.index.has(key)
            needed = 0 if counted else size
            self.evict(needed)
            _, total = self.index.totals()
            if total + needed > self.max_bytes:
                lock.release()
                return None
            self.index.put(key, size, time.time_ns())
            return PartialHold(self, key, lock)
        except (OSError, sqlite3.Error) as exc:  # a full disk (SQLITE_FULL) or a broken index: no room
            log.warning("could not count partial object %s in the cache: %s", md5_hex, exc)
            lock.release()
            return None
        except BaseException:
            lock.release()
            raise

    def forget_partial(self, md5_hex: str) -> None:
        """The partial object's files are gone (promoted, or given up): stop counting it.

        On a full disk the row may stay (SQLite needs room to delete): an over-count, which
        eviction (the row has no files) or ``prune`` clears later."""
        try:
            self.index.remove(PARTIAL_KEY + md5_hex)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not uncount partial object %s: %s", md5_hex, exc)

    def _unlink_partial(self, md5_hex: str) -> bool:
        found = False
        for suffix in (".part", ".bits"):
            with contextlib.suppress(FileNotFoundError):
                (self.partial_dir / f"{md5_hex}{suffix}").unlink()
                found = True
        return found

    def _tmp(self, md5_hex: str) -> Path:
        fd, path = self._open_tmp(md5_hex)
        os.close(fd)
        return path

    def _open_tmp(self, md5_hex: str) -> tuple[int, Path]:
        """A new, empty temp file for ``md5_hex``, open for writing.  Written through this very
        descriptor: reopening it with O_TRUNC would make ext4 flush it on close (auto_da_alloc),
        CPU and disk writes on the read path of every cold small file."""
        fd, name = self.in_layout(lambda: tempfile.mkstemp(prefix=f"{md5_hex}.", suffix=".incomplete",
                                                           dir=self.tmp_dir))
        return fd, Path(name)

    # -- reading ---------------------------------------------------------------------------
    def lookup(self, md5_hex: str, size: int | None = None) -> Path | None:
        """The object's path if present (and of ``size`` bytes when given), else None.

        A present object of the wrong size is corrupt: it is dropped and reported as a miss.
        A hit refreshes the LRU stamp.
        """
        p = self.path(md5_hex)
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        if not self._sized(md5_hex, st, size):
            return None
        if (stamp := self._restamp(p, md5_hex, st)) is not None:
            self.index.put(*stamp)
        return p

    def _sized(self, md5_hex: str, st: os.stat_result, size: int | None) -> bool:
        """Whether the object has ``size`` bytes (any, for None); a wrong size is corruption:
        the object is dropped."""
        if size is None or st.st_size == size:
            return True
        log.warning("cache object %s has %d bytes, expected %d: dropping it", md5_hex, st.st_size, size)
        self.drop(md5_hex)
        return False

    def _restamp(self, obj: Path | int, md5_hex: str, st: os.stat_result) -> tuple[str, int, int] | None:
        """Move the LRU stamp of the used object ``obj`` (a path or an open fd) when it is older
        than :data:`_TOUCH_GRANULARITY`: its atime now (mtime stays); returns the index row to
        write (it also adds an object the index missed), None when the stamp was recent."""
        now_ns = time.time_ns()
        if now_ns - max(st.st_atime_ns, st.st_mtime_ns) <= _TOUCH_GRANULARITY_NS:
            return None
        try:  # once per object of a warm download: no context manager
            os.utime(obj, ns=(now_ns, st.st_mtime_ns))
        except OSError:
            pass
        return md5_hex, st.st_size, now_ns

    def save_stamps(self, stamps: list[tuple[str, int, int]]) -> None:
        """Write the index rows :meth:`open_checked` collected, in one transaction."""
        if stamps:
            self.index.stamp_many(stamps)

    def verify(self, md5_hex: str) -> bool:
        """Re-hash the object; a corrupt one is dropped.  False when absent or corrupt.

        A good object gets a verified marker, so :meth:`checked` can skip the next hash.
        """
        try:
            fd = os.open(self._object_name(md5_hex), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            return self._verify_fd(md5_hex, fd)
        finally:
            os.close(fd)

    def _verify_fd(self, md5_hex: str, fd: int) -> bool:
        if (actual := md5_fd(fd)) != md5_hex:
            log.warning("cache object %s hashes to %s: dropping it", md5_hex, actual)
            self.drop(md5_hex)
            return False
        set_verified_marker(fd, md5_hex)
        return True

    def open_checked(self, md5_hex: str, size: int, stamps: list[tuple[str, int, int]]) -> int | None:
        """A read-only descriptor of the object if it is present, of ``size`` bytes and verified
        (by its marker, else by a hash), else None (a corrupt object is dropped).  The caller
        reads the very inode that was checked, and closes it.

        Its LRU stamp moves as in :meth:`lookup`, but the index row is appended to ``stamps``,
        for the caller to write with the others of one batch by :meth:`save_stamps`.
        """
        try:
            fd = os.open(self._object_name(md5_hex), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if self._sized(md5_hex, st, size) and (has_verified_marker(fd, md5_hex, st)
                                                   or self._verify_fd(md5_hex, fd)):
                if (stamp := self._restamp(fd, md5_hex, st)) is not None:
                    stamps.append(stamp)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def checked(self, md5_hex: str, size: int) -> Path | None:
        """The object if present, of ``size`` bytes and verified: by its marker, else by a hash."""
        stamps: list[tuple[str, int, int]] = []
        fd = self.open_checked(md5_hex, size, stamps)
        if fd is None:
            return None
        os.close(fd)
        self.save_stamps(stamps)
        return self.path(md5_hex)

    # -- writing ---------------------------------------------------------------------------
    def _install(self, md5_hex: str, tmp: Path, *, mark: bool = True, mtime_ns: int | None = None) -> Path:
        """Make a verified, fsynced temp file read-only and rename it into place.

        ``mark``: also give it a verified marker (only for bytes that are hashed and durable).
        ``mtime_ns``: the content's own (older) write time, e.g. a copied store blob's, so the
        marker is not "racy" and a remount trusts it; a later write still moves the mtime.
        """
        os.chmod(tmp, 0o444)
        now_ns = time.time_ns()
        if mark and mtime_ns is None:
            # Bytes written just now (a promoted partial, a download): backdate the mtime past
            # the racy window, so the marker made now is trusted after a remount (otherwise
            # every later daemon re-hashes the object block by block); a write after the
            # marker still moves the mtime, to now, which no longer matches it.
            mtime_ns = min(os.stat(tmp).st_mtime_ns, now_ns - _RACY_NS)
        with contextlib.suppress(OSError):
            # LRU stamp (adopted files may have been written long ago); the mtime is kept
            os.utime(tmp, ns=(now_ns, mtime_ns if mtime_ns is not None else os.stat(tmp).st_mtime_ns))
        if mark:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                set_verified_marker(fd, md5_hex, durable=True)
            finally:
                os.close(fd)
        self.index.put(md5_hex, os.stat(tmp).st_size, now_ns)  # row first: a crash never hides an object
        return self._rename_in(md5_hex, tmp)

    def _rename_in(self, md5_hex: str, tmp: Path | str) -> Path:
        """The last step of an install, after its index row is written: rename ``tmp`` into
        place (its row goes again if that fails)."""
        dest = self.path(md5_hex)
        if md5_hex[:2] not in self._shards:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._shards.add(md5_hex[:2])
        try:
            try:
                os.replace(tmp, dest)
            except FileNotFoundError:  # the shard dir was removed behind our back
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
        except BaseException:
            if not dest.exists():
                self.index.remove(md5_hex)
            raise
        if self.on_installed is not None:
            try:
                self.on_installed(md5_hex)
            except Exception:  # noqa: BLE001 - an observer's failure must not fail the install
                log.exception("cache observer failed for %s", md5_hex)
        return dest

    def install_verified(self, objects: list[tuple[str, bytes]]) -> int:
        """Put small objects whose bytes the caller has just md5-checked (the mount's cold small
        files) into the cache, with all their index rows in one transaction; returns the bytes added.

        Each is written once through its temp file's own descriptor: no second hash, no fsync,
        no verified marker (as ``writer(fsync=False)``): every reader md5-checks a small object,
        so one that a crash left short or zeroed is caught.  Objects already present are skipped.
        """
        prepared: list[Prepared] = []
        try:
            for md5_hex, data in dict(objects).items():
                _check_key(md5_hex)
                if not os.path.exists(self._object_name(md5_hex)):
                    prepared.append(Prepared(md5_hex, str(self._write_tmp(md5_hex, data)), len(data)))
        except BaseException:
            self.discard_prepared(prepared)
            raise
        return self.install_prepared(prepared)

    def prepare_verified(self, md5_hex: str, data: bytes | bytearray) -> Prepared:
        """Write bytes the caller has just md5-checked to a temp file, durable (fdatasync'ed) and
        marked verified, for :meth:`install_prepared` (an object already present is replaced by
        the same bytes: the caller found it missing a moment ago, and asks no stat to know).

        The SDK's downloads: many threads stage at once (their fdatasyncs share the file
        system's journal commits) and one of them installs each batch, so a small blob costs a
        temp file, its write, fdatasync, mtime, marker and mode, and a share of one index
        transaction, not a transaction, two stats and a reopen of its own.  The mtime is set
        back past the racy window, so the marker is trusted at once; a later write moves it.
        """
        _check_key(md5_hex)
        fd, tmp = self._open_tmp(md5_hex)
        try:
            write_fully(fd, memoryview(data), 0)
            os.fdatasync(fd)
            now_ns = time.time_ns()
            os.utime(fd, ns=(now_ns, now_ns - _SETTLED_NS))
            set_verified_marker(fd, md5_hex, durable=True)
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return Prepared(md5_hex, str(tmp), len(data))

    def install_prepared(self, prepared: list[Prepared]) -> int:
        """Rename prepared objects into place, all their index rows written first in one
        transaction; returns the bytes added.  No temp file of ``prepared`` is left after, in
        every case (one that failed to install costs a fetch later, never a wrong byte)."""
        renamed = 0
        try:
            if not prepared:
                return 0
            now_ns = time.time_ns()
            self.index.put_many((s.md5, s.size, now_ns) for s in prepared)  # rows first
            added = 0
            for s in prepared:
                try:
                    self._rename_in(s.md5, s.tmp)
                except BaseException:
                    for rest in prepared[renamed + 1:]:  # their rows would count objects never installed
                        self.index.remove(rest.md5)
                    raise
                renamed += 1
                added += s.size
            return added
        finally:
            self.discard_prepared(prepared[renamed:])

    @staticmethod
    def discard_prepared(prepared: list[Prepared]) -> None:
        """Remove the temp files of ``prepared`` still there (renamed ones are gone already)."""
        for s in prepared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.tmp)

    def _write_tmp(self, md5_hex: str, data: bytes) -> Path:
        """A read-only temp file holding ``data`` (not fsynced)."""
        fd, tmp = self._open_tmp(md5_hex)
        try:
            write_fully(fd, data, 0)
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _finish(self, md5_hex: str, tmp: Path, hf: _HashingFile, size: int | None,
                mtime_ns: int | None = None, fsync: bool = True) -> Path:
        hf.flush()
        if fsync:
            os.fsync(hf.fileno())
        actual = hf.digest() or md5_file(tmp)
        if actual != md5_hex:
            raise DigestMismatchError(f"content written for {md5_hex} hashes to {actual}; nothing was cached")
        if size is not None and tmp.stat().st_size != size:
            raise DigestMismatchError(f"content written for {md5_hex} has {tmp.stat().st_size} bytes, expected {size}")
        return self._install(md5_hex, tmp, mtime_ns=mtime_ns, mark=fsync)

    @contextlib.contextmanager
    def writer(self, md5_hex: str, *, fsync: bool = True, mtime_ns: int | None = None) -> Iterator[BinaryIO]:
        """Write an object's bytes; on exit they are verified, fsynced and renamed into place.

        ``fsync=False`` (no flush, no verified marker): for small objects that every reader
        md5-checks anyway, so a crash that leaves them short or zeroed is always detected.
        ``mtime_ns``: the content's own (older) write time, as for ``_install`` (a store blob
        downloaded now was written before), so its marker is trusted at once, not "racy".

        On a digest mismatch (or any exception in the block) nothing is left behind and
        :class:`DigestMismatchError` (or the block's exception) propagates.
        """
        _check_key(md5_hex)
        fd, tmp = self._open_tmp(md5_hex)
        try:
            with open(fd, "wb") as raw:
                hf = _HashingFile(raw)
                yield hf  # type: ignore[misc]
                self._finish(md5_hex, tmp, hf, None, mtime_ns=mtime_ns, fsync=fsync)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def add_file(self, md5_hex: str, src: Path | str, *, move: bool = False, keep_mtime: bool = False) -> Path:
        """Copy (or move) ``src`` into the cache after checking it hashes to ``md5_hex``.

        With ``move=True`` the source is renamed when it is on the same filesystem (no copy);
        it is gone afterwards in every successful case.  ``keep_mtime``: the copy keeps the
        source's mtime (an immutable store blob), so its verified marker holds.  A mismatch raises
        :class:`DigestMismatchError` and leaves ``src`` where it was.
        """
        _check_key(md5_hex)
        src = Path(src)
        if (hit := self.lookup(md5_hex)) is not None:
            if move:
                src.unlink()
            return hit
        tmp = self._tmp(md5_hex)
        try:
            if move:
                try:
                    os.replace(src, tmp)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                else:
                    try:
                        if (actual := md5_file(tmp)) != md5_hex:
                            raise DigestMismatchError(f"{src} hashes to {actual}, not {md5_hex}")
                    except BaseException:
                        os.replace(tmp, src)  # give the caller its file back
                        raise
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    return self._install(md5_hex, tmp)
            with open(src, "rb") as fin, open(tmp, "wb") as raw:
                hf = _HashingFile(raw)
                shutil.copyfileobj(fin, hf, _CHUNK)
                dest = self._finish(md5_hex, tmp, hf, None,
                                    os.fstat(fin.fileno()).st_mtime_ns if keep_mtime else None)
            if move:
                src.unlink()
            return dest
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def adopt(self, md5_hex: str, path: Path | str, *, fsync: bool = True) -> Path:
        """Move a file the caller already verified into place (atomic rename, no re-hash).

        Use it when the bytes were hashed while being downloaded; falls back to a verified
        copy when ``path`` is on another filesystem.  ``fsync=False`` skips the flush for
        callers that keep their own copy of the bytes (SDK staging of local files): after a
        crash such an object may be short or zeroed, which ``lookup(size=)``, every verified
        copy out of the cache and the store's md5 check on upload all detect.
        """
        _check_key(md5_hex)
        path = Path(path)
        try:
            if fsync:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            dest = self._install(md5_hex, path, mark=fsync)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            dest = self.add_file(md5_hex, path, move=True)
        if path.parent == self.partial_dir:  # a promoted partial object: counted as an object now
            self.forget_partial(md5_hex)
        return dest

    def fetch(self, md5_hex: str, size: int, fill: Callable[[BinaryIO], None]) -> Path:
        """Return the object, calling ``fill(file)`` to produce it on a miss.

        The miss path runs under the key's lock, so when several processes ask for the same
        missing object at once, one fills it and the others find it present.  Space for
        ``size`` bytes is made first (LRU eviction).  What ``fill`` wrote is verified.
        """
        if (hit := self.lookup(md5_hex, size)) is not None:
            return hit
        lock = self._lock(md5_hex)
        lock.acquire()
        try:
            if (hit := self.lookup(md5_hex, size)) is not None:
                return hit
            self.evict(size)
            fd, tmp = self._open_tmp(md5_hex)
            try:
                with open(fd, "wb") as raw:
                    hf = _HashingFile(raw)
                    fill(hf)  # type: ignore[arg-type]
                    return self._finish(md5_hex, tmp, hf, size)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        finally:
            lock.release()

    # -- removal ---------------------------------------------------------------------------
    def drop(self, md5_hex: str) -> None:
        """Remove an object if present (readers holding it open keep their bytes)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(md5_hex).unlink()
        self.index.remove(md5_hex)

    def reindex(self) -> None:
        """Reconcile the size/LRU index with the objects directory (one full scan)."""
        start = time.time_ns()
        self.index.rebuild(self._scan(), start)

    def _scan(self) -> list[tuple[str, int, int]]:
        """(key, size, LRU stamp in ns) of every complete object: a full rescan, for rebuilds."""
        out: list[tuple[str, int, int]] = []
        try:
            shards = list(os.scandir(self.objects_dir))
        except FileNotFoundError:
            return out
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError), os.scandir(shard.path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    key = shard.name + e.name
                    if is_md5_hex(key):
                        out.append((key, st.st_size, max(st.st_atime_ns, st.st_mtime_ns)))
        with contextlib.suppress(FileNotFoundError), os.scandir(self.partial_dir) as it:
            for e in it:  # partial objects count at their full (sparse) size, as begin_partial does
                md5, dot, suffix = e.name.partition(".")
                if suffix == "part" and is_md5_hex(md5):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat(follow_symlinks=False)
                        out.append((PARTIAL_KEY + md5, st.st_size, st.st_mtime_ns))
        return out

    def evict(self, needed: int = 0, max_bytes: int | None = None) -> int:
        """Drop least recently used objects until ``total + needed <= max_bytes``.

        Objects whose key is locked (being fetched) are skipped.  Returns the bytes freed.
        Reads the total and the oldest rows from the index: no directory scan.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        if self.index.reopen_if_replaced():  # one stat: the index file was deleted under us
            self.restore_layout()
        _, total = self.index.totals()
        freed = skipped = 0
        while total + needed > limit:
            batch = self.index.oldest(32, skipped)
            if not batch:
                break
            for key, size in batch:
                if total + needed <= limit:
                    break
                lock = self._lock(key)
                if not lock.acquire(blocking=False):
                    skipped += 1
                    continue
                try:
                    if key.startswith(PARTIAL_KEY):  # an unheld partial object (resumable, not in use)
                        if self._unlink_partial(key[len(PARTIAL_KEY):]):
                            freed += size
                    else:
                        try:
                            self.path(key).unlink()
                        except FileNotFoundError:
                            pass  # a row left by a crash: it only needs to go
                        else:
                            freed += size
                    self.index.remove(key)
                    total -= size
                finally:
                    lock.release()
        return freed

    def prune(self, max_bytes: int | None = None) -> int:
        """Shrink the cache to ``max_bytes`` (default: the configured bound); returns bytes freed.

        Also removes temp files abandoned by crashed writers, and reconciles the size/LRU index
        with the directory (one full scan: the repair after a crash or a hand edit).
        """
        self.reindex()
        freed = 0
        cutoff = time.time() - _STALE_TMP_SECONDS
        with contextlib.suppress(FileNotFoundError), os.scandir(self.tmp_dir) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    if st.st_mtime < cutoff:
                        os.unlink(e.path)
                        freed += st.st_size
        return freed + self.evict(0, max_bytes=max_bytes)

    def info(self) -> CacheInfo:
        entries, nbytes = self.index.totals()
        return CacheInfo(entries=entries, bytes=nbytes, max_bytes=self.max_bytes, root=self.root)

    def open(self, md5_hex: str) -> IO[bytes] | None:
        """Open a present object for reading (None on a miss); convenient for the mount."""
        p = self.lookup(md5_hex)
        if p is None:
            return None
        try:
            return open(p, "rb")
        except FileNotFoundError:
            return None
