"""The one way a file is replaced so that a reader sees the old content or the new, never half.

:func:`atomic_write` writes a uniquely named temp file beside the target (or in ``tmp_dir`` on
the same filesystem), and on success flushes it, fsyncs it, renames it over the target and
fsyncs the directory, so the new content survives a crash once the call returns.  On any
error the temp file is removed and the target is untouched.  ``durable=False`` skips both
fsyncs, for files that are only hints and rebuilt when lost (a partial download's bitmap).
:func:`atomic_fd` is the same writer yielding the temp file's descriptor, for a caller that
fills it in the kernel (``os.copy_file_range``, ``os.sendfile``) rather than through a buffer.

The temp file's directory is made (with its parents) only when creating the file finds it
missing, so writing many files into one directory costs no ``mkdir`` per file.

:func:`replace_durably` is the rename half, for a writer that makes its temp file another way
(SQLite builds an index at a path; the cache hashes while it writes).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
#: temp names are ``<random per process><counter>``: unique without a random read per file
_serial = itertools.count()
_prefix = os.urandom(6).hex()


def _new_prefix() -> None:
    global _prefix
    _prefix = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_prefix)  # a forked child does not repeat its parent's names


def write_fully(fd: int, data: bytes | memoryview, off: int) -> None:
    """pwrite all of ``data`` at ``off`` or raise: a short write (a full disk) is ENOSPC, never
    a file cut short."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write to the cache")
        view, off = view[n:], off + n


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike[str], dest: str | os.PathLike[str], *, durable: bool = True) -> None:
    """Rename ``tmp`` (already written and fsynced) over ``dest``; then fsync ``dest``'s directory."""
    os.replace(tmp, dest)
    if durable:
        fsync_dir(Path(dest).parent)


def _create_temp(where: str, name: str, mode: int) -> tuple[str, int]:
    """A new temp file in ``where`` for the file ``name`` (the directory made if missing): (path, fd)."""
    stem = f"{where}/.{name[:100]}."
    for _attempt in range(8):  # a name taken (a crashed writer's leftover): the next serial
        tmp = f"{stem}{_prefix}{next(_serial):x}.tmp"
        try:
            return tmp, os.open(tmp, _CREATE, mode)
        except FileNotFoundError:
            os.makedirs(where, exist_ok=True)
        except FileExistsError:
            pass
    tmp = f"{stem}{os.urandom(8).hex()}.tmp"
    return tmp, os.open(tmp, _CREATE, mode)


class atomic_fd:  # noqa: N801 - used like the function-style context managers beside it
    """``with atomic_fd(dest) as fd``: the descriptor of a new file whose content replaces
    ``dest`` when the block ends without error (the writer of :func:`atomic_write`; the
    descriptor is closed here).  A class, not a generator: it runs once per file of a download.

    ``mode`` is the new file's permission bits, less the umask (as ``open`` creates files);
    0o600 keeps a secret unreadable by others from the first byte on.
    """

    __slots__ = ("dest", "tmp_dir", "mode", "durable", "tmp", "fd")

    def __init__(self, dest: str | os.PathLike[str], *, mode: int = 0o666, tmp_dir: Path | None = None,
                 durable: bool = True) -> None:
        self.dest = dest if isinstance(dest, str) else os.fspath(dest)
        self.tmp_dir = tmp_dir
        self.mode = mode
        self.durable = durable

    def __enter__(self) -> int:
        parent, slash, name = self.dest.rpartition("/")
        where = os.fspath(self.tmp_dir) if self.tmp_dir is not None else parent if slash else "."
        self.tmp, self.fd = _create_temp(where, name, self.mode)
        return self.fd

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        try:
            try:
                if exc_type is None and self.durable:
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
            if exc_type is None:
                replace_durably(self.tmp, self.dest, durable=self.durable)
                return
        except BaseException:
            self._discard()
            raise
        self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@contextmanager
def atomic_write(dest: str | os.PathLike[str], *, mode: int = 0o666, tmp_dir: Path | None = None,
                 durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces ``dest`` when the block ends without error
    (see :func:`atomic_fd` for ``mode``)."""
    with atomic_fd(dest, mode=mode, tmp_dir=tmp_dir, durable=durable) as fd, \
            os.fdopen(fd, "wb", closefd=False) as f:
        yield f
        f.flush()
