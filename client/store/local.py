"""The embedded store: the registry core on a SQLite file plus a local blob directory.

:class:`LocalStore` *is* the core (a subclass), so the Store protocol's metadata calls reach
the registry rules in-process with nothing in between.

No server, safe for several processes at once (SQLite WAL + BEGIN IMMEDIATE for writes,
blobs written to a temp file and renamed).  Layout of the store directory::

    <store>/
      registry.db        SQLite (WAL): entities, projects, collections, versions, aliases, runs
      blobs/<entity>/<md5[:2]>/<md5[2:]>   content, read-only, named by md5 hex
      blobs/.tmp/        uploads in progress
"""

from __future__ import annotations

import os

from collections.abc import Callable
from pathlib import Path
from typing import Iterable, Iterator

from ..blockmap import BlockHasher, wants_map
from ..errors import StoreUnavailableError
from ..registry import LocalBlobBackend, RegistryCore
from .base import STREAM_CHUNK


class LocalStore(RegistryCore):
    """Store protocol in-process: the registry core itself (see client/store/base.py).

    Every metadata call of the protocol is the core's own method, inherited (no layer in
    between); this class adds the blob methods over the local directory."""

    blobs: LocalBlobBackend

    def __init__(self, path: str | os.PathLike[str], *, db_url: str | None = None) -> None:
        """``db_url``: the registry database (default: ``registry.db`` in the store directory)."""
        self.root = Path(path).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create the store directory {self.root}: {exc}") from exc
        self.location = str(self.root)
        super().__init__(db_url or f"sqlite:///{self.root / 'registry.db'}", LocalBlobBackend(self.root / "blobs"))

    def __repr__(self) -> str:
        return f"LocalStore({self.location!r})"

    # blobs
    def missing_blobs(self, entity: str, md5_hexes: Iterable[str], check_files: bool = True) -> set[str]:
        """As the core's, but checking the files by default: a damaged blob is re-sent."""
        return super().missing_blobs(entity, md5_hexes, check_files)

    def put_blob(self, entity: str, md5_hex: str, src: Path, size: int,
                 progress: Callable[[int], None] | None = None) -> None:
        hasher = BlockHasher() if wants_map(size) else None
        written = self.blobs.put_file(entity, md5_hex, Path(src), hasher, progress)
        self.register_blob(entity, md5_hex, written)
        if hasher is not None and wants_map(written):
            self.register_blockmap(entity, md5_hex, hasher.result())

    def read_blob(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None,
                  progress: Callable[[int], None] | None = None) -> bytes:
        data = self.blobs.read(entity, md5_hex, start, length)
        if progress is not None:
            progress(len(data))
        return data

    def stream_blob(self, entity: str, md5_hex: str, start: int, length: int) -> Iterator[bytes]:
        """Bytes [start, start+length) in chunks of at most STREAM_CHUNK (see HttpStore)."""
        with self.blobs.open(entity, md5_hex) as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(STREAM_CHUNK, length))
                if not chunk:
                    return  # the caller checks that it got the whole range
                length -= len(chunk)
                yield chunk

    def download_blob(self, entity: str, md5_hex: str, dest: Path,
                      progress: Callable[[int], None] | None = None) -> None:
        self.blobs.copy_to(entity, md5_hex, Path(dest))
        if progress is not None:
            progress(os.path.getsize(dest))

    def blob_path(self, entity: str, md5_hex: str) -> Path:
        """Local stores can hand out the file itself (zero-copy reads for the mount)."""
        return self.blobs.path(entity, md5_hex)


