"""One draft's staged data: ``data/<node id>`` files, their descriptors and running hashes.  No SQL.

A staged file's data file is the truth for its size and mtime (``utimens`` is applied to it
too), so writes never touch the database and a restarted process sees exactly the bytes that
reached the data file; what the application fsynced is therefore there after ``kill -9``.
A copy-up (a base file becoming staged) is written to ``data/<id>.copyup`` and renamed over
``data/<id>`` when complete.

Hash while writing: a staged file written strictly sequentially from offset 0 (or copied up
and then appended to) keeps a running md5 (:class:`RunningHash`), so committing it does not
read it again.  Any other write pattern drops the running hash; the commit re-hashes that file.

Callers hold the draft's lock around every call (it guards the descriptors and the hashes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import BaseUnavailableError
from .rows import BaseRef

_CHUNK = 1 << 20


class RunningHash:
    """Running md5 of a staged file that has only been written sequentially from offset 0."""

    __slots__ = ("md5", "pos")

    def __init__(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.pos = 0


class StagedData:
    """The data files of one draft under ``data_dir``; base content comes from ``fetch_base``."""

    def __init__(self, data_dir: Path, fetch_base: Callable[[BaseRef], Path]) -> None:
        self.dir = data_dir
        self.fetch_base = fetch_base
        self._fds: dict[int, int] = {}
        self._hashes: dict[int, RunningHash] = {}
        self._dir_synced: set[int] = set()

    def path(self, nid: int) -> Path:
        return self.dir / str(nid)

    def _fd(self, nid: int) -> int:
        fd = self._fds.get(nid)
        if fd is None:
            fd = os.open(self.path(nid), os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[nid] = fd
        return fd

    def close_fd(self, nid: int) -> None:
        fd = self._fds.pop(nid, None)
        if fd is not None:
            os.close(fd)

    def forget(self, nid: int) -> None:
        """Node ``nid`` is no longer staged here (rebased into the cache): descriptor and hash go."""
        self.close_fd(nid)
        self._hashes.pop(nid, None)

    def discard(self, nid: int) -> None:
        """Node ``nid`` is gone: its descriptor, hash and data file too."""
        self.forget(nid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(nid))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- recovery -------------------------------------------------------------------------
    def scrub(self, staged: set[int]) -> None:
        """Remove every file that is not the data file of a staged node (half copy-ups, strays)."""
        self.dir.mkdir(exist_ok=True)
        for entry in os.scandir(self.dir):
            stem = entry.name.split(".", 1)[0]
            if not stem.isdigit() or int(stem) not in staged or entry.name != stem:
                os.unlink(entry.path)

    # -- content ------------------------------------------------------------------------------
    def stat(self, nid: int) -> os.stat_result | None:
        try:
            return os.stat(self.path(nid))
        except FileNotFoundError:
            return None

    def create(self, nid: int) -> int:
        """An empty data file for a new node (its running hash starts); returns its mtime, the
        data file's clock (atime = mtime = ctime at creation)."""
        fd = os.open(self.path(nid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fds[nid] = fd
        self._hashes[nid] = RunningHash()
        return os.fstat(fd).st_mtime_ns

    def read(self, nid: int, off: int, size: int) -> bytes:
        return os.pread(self._fd(nid), size, off)

    def read_all(self, nid: int) -> bytes:
        """The whole data file (empty if it is absent)."""
        with contextlib.suppress(FileNotFoundError):
            return self.path(nid).read_bytes()
        return b""

    def replace(self, nid: int, data: bytes) -> None:
        """Replace a data file atomically with ``data`` (the status file, written by the engine)."""
        self.close_fd(nid)
        tmp = self.dir / f"{nid}.status"
        tmp.write_bytes(data)
        os.replace(tmp, self.path(nid))

    @staticmethod
    def read_base(path: Path, off: int, size: int) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, off)

    def write(self, nid: int, off: int, data: bytes | memoryview) -> int:
        n = os.pwrite(self._fd(nid), data, off)
        running = self._hashes.get(nid)
        if running is not None:
            if off == running.pos:
                running.md5.update(memoryview(data)[:n])
                running.pos += n
            else:
                del self._hashes[nid]
        return n

    def copy_up(self, nid: int, ref: BaseRef | None, mtime_ns: int, *, covers_all: bool) -> None:
        """Make the data file of a base file: its content (fetched, unless it will all be
        overwritten or there is none) and its mtime; the running hash covers what was copied."""
        tmp = self.dir / f"{nid}.copyup"
        running = RunningHash()
        if covers_all or ref is None or ref.size == 0:
            open(tmp, "wb").close()
        else:
            src = self.fetch_base(ref)
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
                while n := fin.readinto(buf):
                    fout.write(view[:n])
                    running.md5.update(view[:n])
                    running.pos += n
            if running.pos != ref.size:
                os.unlink(tmp)
                raise BaseUnavailableError(f"base content of {ref.path} has {running.pos} bytes, "
                                           f"expected {ref.size}")
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, self.path(nid))
        self.close_fd(nid)
        self._hashes[nid] = running

    def truncate(self, nid: int, size: int) -> None:
        os.truncate(self.path(nid), size)
        running = self._hashes.get(nid)
        if size == 0:
            self._hashes[nid] = RunningHash()
        elif running is not None and running.pos != size:
            del self._hashes[nid]

    def set_times(self, nid: int, atime_ns: int, mtime_ns: int) -> None:
        os.utime(self.path(nid), ns=(atime_ns, mtime_ns))

    def fsync(self, nid: int, datasync: bool) -> None:
        """The data, and once per file the directory entry of the data file."""
        (os.fdatasync if datasync else os.fsync)(self._fd(nid))
        if nid not in self._dir_synced:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._dir_synced.add(nid)

    def running_digest(self, nid: int, size: int) -> str | None:
        """md5 hex from the running hash when it covers exactly the file's ``size`` bytes."""
        running = self._hashes.get(nid)
        return running.md5.hexdigest() if running is not None and running.pos == size else None
