"""The one way a file is replaced so that a reader sees the old content or the new, never half.

:func:`atomic_write` writes a uniquely named temp file beside the target (or in ``tmp_dir`` on
the same filesystem), and on success flushes it, fsyncs it, renames it over the target and
fsyncs the directory, so the new content survives a crash once the call returns.  On any
error the temp file is removed and the target is untouched.  ``durable=False`` skips both
fsyncs, for files that are only hints and rebuilt when lost (a partial download's bitmap).

:func:`replace_durably` is the rename half, for a writer that makes its temp file another way
(SQLite builds an index at a path; the cache hashes while it writes).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


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


@contextmanager
def atomic_write(dest: str | os.PathLike[str], *, mode: int = 0o666, tmp_dir: Path | None = None,
                 durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces ``dest`` when the block ends without error.

    ``mode`` is the new file's permission bits, less the umask (as ``open`` creates files);
    0o600 keeps a secret unreadable by others from the first byte on.
    """
    dest = Path(dest)
    where = tmp_dir if tmp_dir is not None else dest.parent
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".{dest.name[:100]}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        replace_durably(tmp, dest, durable=durable)
    finally:
        tmp.unlink(missing_ok=True)
