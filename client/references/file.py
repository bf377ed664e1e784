"""``file://`` references: local or network-mounted files, hashed where they are."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import unquote, urlparse

from ..errors import InvalidPathError, NotFoundError, StoreUnavailableError
from ..hashing import HashingWriter, CHUNK, hex_to_b64, md5_file
from ..manifest import ManifestEntry
from .common import (
    _atomic_dest,
    _check_md5,
    _check_size,
    _entry_name,
    _join,
    _md5_b64_to_hex,
    _too_many,
    is_uri_digest,
    uri_digest,
)


# --------------------------------------------------------------------------- file://

def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
    return Path(unquote(host + parsed.path))


class FileHandler:
    """``file://`` references: an NFS share or another mounted volume tracked in place."""

    schemes = ("file",)

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        """W&B's rules: a file is one entry, a directory one entry per file below it (directory
        symlinks are not followed, as ``os.walk`` does by default; file symlinks are read), each
        with its size; the digest is the md5 of the bytes, or with ``checksum=False`` the md5 of
        the file's resolved ``file://`` URI.  More than ``max_objects`` files, or a target that
        does not exist, is a ValueError."""
        path = _local_path(uri)
        digest = self._content_digest if checksum else self._path_digest
        if path.is_file():
            yield self._entry(path, _entry_name(name, path.name), uri, digest)
            return
        if not path.is_dir():
            raise InvalidPathError(f"reference {uri}: no such file or directory {path}")
        files = sorted(self._walk(path))
        if len(files) > max_objects:
            raise _too_many(uri, max_objects)
        base = uri.rstrip("/")
        for rel in files:
            yield self._entry(path / rel, _join(name, rel), f"{base}/{rel}", digest)

    @staticmethod
    def _walk(root: Path) -> Iterator[str]:
        for dirpath, _dirs, names in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            for n in names:
                if os.path.isfile(os.path.join(dirpath, n)):
                    yield n if rel_dir == "." else posixpath.join(rel_dir.replace(os.sep, "/"), n)

    @staticmethod
    def _content_digest(path: Path) -> str:
        return hex_to_b64(md5_file(path))

    @staticmethod
    def _path_digest(path: Path) -> str:
        return uri_digest(path.resolve().as_uri())

    @staticmethod
    def _entry(path: Path, entry_path: str, uri: str, digest) -> ManifestEntry:
        return ManifestEntry(path=entry_path, digest=digest(path), size=path.stat().st_size, ref=uri)

    def _open(self, entry: ManifestEntry) -> IO[bytes]:
        path = _local_path(entry.ref or "")
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"reference {entry.ref} ({entry.path}) no longer exists") from None
        except IsADirectoryError:
            raise InvalidPathError(f"reference {entry.ref} is a directory, not a file") from None
        except OSError as exc:
            raise StoreUnavailableError(f"reference {entry.ref}: {exc}") from exc
        if not is_uri_digest(entry):  # an unchecked reference follows the file as it is now
            _check_size(entry, os.fstat(f.fileno()).st_size, "now has")
        return f

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        expected = None if is_uri_digest(entry) else _md5_b64_to_hex(entry.digest)
        with self._open(entry) as src, _atomic_dest(dest) as out:
            sink = HashingWriter(out)
            while chunk := src.read(CHUNK):
                sink.write(chunk)
            _check_md5(entry, sink.md5.hexdigest(), expected)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        with self._open(entry) as src:
            src.seek(start)
            return src.read(length)

    def is_container(self, entry: ManifestEntry) -> bool:
        return _local_path(entry.ref or "").is_dir()
