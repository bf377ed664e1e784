"""Where blob bytes live.  The registry knows *which* blobs exist (its ``blobs`` table); a
BlobBackend holds their bytes.  The embedded store and the server with ``--blobs DIR`` use
:class:`LocalBlobBackend`; the server's S3 backend lives in ``server/blobs.py``.

Layout: ``<root>/<entity>/<md5[:2]>/<md5[2:]>``, files made read-only once written, written to
``<root>/.tmp/`` first, hashed while copied, fsynced and renamed into place, so a reader never
sees a partial blob and a blob's bytes always match its name.

A blob file written here carries the verified marker of :mod:`client.cache` (md5, size,
mtime, inode); :meth:`LocalBlobBackend.intact` trusts a blob by its marker, else re-hashes it,
so a blob damaged on disk counts as missing and the next upload of the right bytes repairs it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from _typeshed import SupportsRead

from ..blockmap import BlockHasher
from ..cache import has_verified_marker, set_verified_marker
from ..errors import DigestMismatchError, InvalidNameError, NotFoundError
from ..hashing import is_md5_hex, md5_fd
from ..names import validate_entity


def check_key(entity: str, md5_hex: str) -> None:
    validate_entity(entity)
    if not is_md5_hex(md5_hex):
        raise InvalidNameError(f"{md5_hex!r} is not an md5 hex digest")


class BlobBackend(Protocol):
    def put_file(self, entity: str, md5_hex: str, src: Path) -> int:
        """Store ``src`` under its md5 (verified); returns its size."""
        ...

    def exists(self, entity: str, md5_hex: str) -> bool: ...
    def size(self, entity: str, md5_hex: str) -> int: ...
    def open(self, entity: str, md5_hex: str) -> BinaryIO: ...
    def read(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None) -> bytes: ...
    def delete(self, entity: str, md5_hex: str) -> None: ...


class LocalBlobBackend:
    """Blobs as files in a directory (the embedded store, or a server on one machine)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)

    def path(self, entity: str, md5_hex: str) -> Path:
        check_key(entity, md5_hex)
        return self.root / entity / md5_hex[:2] / md5_hex[2:]

    def put_file(self, entity: str, md5_hex: str, src: Path, hasher: BlockHasher | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
        """Store ``src`` (verified); a blob already present is kept only if it is intact."""
        dest = self.path(entity, md5_hex)
        if dest.exists() and self.intact(entity, md5_hex, hasher):
            return dest.stat().st_size
        if hasher is not None:
            hasher.reset()  # fed again by the copy
        with open(src, "rb") as f:
            return self.put_stream(entity, md5_hex, f, hasher, progress)

    def put_stream(self, entity: str, md5_hex: str, stream: SupportsRead[bytes], hasher: BlockHasher | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
        """Copy a stream in, hashing as it goes; refuse it if the md5 differs from the name.

        ``hasher`` is fed the same bytes (the blob's block map, at no extra read);
        ``progress(n)`` is told each chunk's length (it may raise to stop the copy).
        """
        dest = self.path(entity, md5_hex)
        fd, tmp = tempfile.mkstemp(dir=self.root / ".tmp", prefix=md5_hex + ".")
        try:
            h = hashlib.md5(usedforsecurity=False)
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(1 << 20):
                    h.update(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
                if h.hexdigest() == md5_hex:
                    set_verified_marker(out.fileno(), md5_hex, durable=True)
            if h.hexdigest() != md5_hex:
                raise DigestMismatchError(
                    f"upload for {md5_hex} has md5 {h.hexdigest()}: the data changed or was corrupted in transit; retry"
                )
            os.chmod(tmp, 0o444)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            return size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def intact(self, entity: str, md5_hex: str, hasher: BlockHasher | None = None) -> bool:
        """Whether the blob file exists and hashes to its name (by its marker, else re-hashed).

        With ``hasher`` the file is always read (feeding it), so the caller gets its block map.
        """
        try:
            fd = os.open(self.path(entity, md5_hex), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if hasher is None and has_verified_marker(fd, md5_hex):
                return True
            if md5_fd(fd, also=hasher.update if hasher is not None else None) != md5_hex:
                return False
            set_verified_marker(fd, md5_hex)
            return True
        finally:
            os.close(fd)

    def exists(self, entity: str, md5_hex: str) -> bool:
        return self.path(entity, md5_hex).is_file()

    def size(self, entity: str, md5_hex: str) -> int:
        try:
            return self.path(entity, md5_hex).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {md5_hex} not found in {entity}") from None

    def open(self, entity: str, md5_hex: str) -> BinaryIO:
        try:
            return open(self.path(entity, md5_hex), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {md5_hex} not found in {entity}") from None

    def read(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None) -> bytes:
        with self.open(entity, md5_hex) as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def copy_to(self, entity: str, md5_hex: str, dest: Path) -> None:
        with self.open(entity, md5_hex) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def delete(self, entity: str, md5_hex: str) -> None:
        try:
            self.path(entity, md5_hex).unlink()
        except FileNotFoundError:
            pass
