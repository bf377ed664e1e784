"""What every reference scheme shares: digests of URIs, ETag rules, atomic verified writes,
the :class:`ReferenceHandler` protocol, and the tracking-only handler for unknown schemes."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Protocol
from urllib.parse import unquote, urlparse

from ..errors import ArtifactFSError, DigestMismatchError, NotFoundError
from ..hashing import b64_to_hex, hex_to_b64
from ..manifest import ManifestEntry

log = logging.getLogger('client.references')

DEFAULT_MAX_OBJECTS = 10_000_000


# --------------------------------------------------------------------------- helpers

def uri_digest(uri: str) -> str:
    """The digest of a reference whose content is not read: base64 md5 of the URI string."""
    return hex_to_b64(hashlib.md5(uri.encode("utf-8"), usedforsecurity=False).hexdigest())


def is_uri_digest(entry: ManifestEntry) -> bool:
    """True when the entry's digest only names its URI (checksum=False or an unknown scheme)."""
    return entry.ref is not None and entry.digest == uri_digest(entry.ref)


def _md5_b64_to_hex(digest: str) -> str | None:
    """The hex md5 a base64 digest spells, or None if it is not a base64 md5."""
    if len(digest) != 24:
        return None
    try:
        return b64_to_hex(digest)
    except ValueError:
        return None


def _strip_quotes(etag: str) -> str:
    return etag[1:-1] if len(etag) >= 2 and etag[0] == etag[-1] == '"' else etag


def _is_single_part_etag(etag: str) -> bool:
    """S3/HTTP ETags of 32 hex digits are the md5 of the bytes (no multipart '-N' suffix)."""
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower())


def _entry_name(name: str | None, default: str) -> str:
    return name if name else default


def _join(name: str | None, rel: str) -> str:
    return posixpath.join(name, rel) if name else rel


def _warn_truncated(uri: str, max_objects: int) -> None:
    log.warning("more than %d objects under %s: only the first %d (in key order) were added; "
                "pass a larger max_objects to add_reference to track more", max_objects, uri, max_objects)


def _parse_bucket_uri(uri: str) -> tuple[str, str, str | None]:
    """``s3://bucket/key?versionId=X`` -> (bucket, key, version id or None)."""
    parsed = urlparse(uri)
    version = None
    for part in parsed.query.split("&"):
        if part.startswith("versionId="):
            version = unquote(part[len("versionId="):])
    return parsed.netloc, unquote(parsed.path.lstrip("/")), version


@contextmanager
def _atomic_dest(dest: Path) -> Iterator[IO[bytes]]:
    """Write to a unique ``*.incomplete`` file beside ``dest`` and rename it into place on success,
    so a reader never sees a half-written or unverified file (the huggingface_hub pattern)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.incomplete"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)




def _unchecked_bucket_entry(uri: str, name: str | None, bucket: str, key: str) -> ManifestEntry:
    """checksum=False for a bucket URI: one entry named after the key, digest of the URI."""
    return ManifestEntry(path=_entry_name(name, posixpath.basename(key.rstrip("/")) or bucket),
                         digest=uri_digest(uri), ref=uri)


def _check_size(entry: ManifestEntry, got: int, what: str) -> None:
    if entry.size is not None and got != entry.size:
        raise DigestMismatchError(
            f"reference {entry.ref} ({entry.path}) {what} {got} bytes but {entry.size} were logged: "
            f"the source changed after the artifact was logged")


def _check_md5(entry: ManifestEntry, md5_hex: str, expected_hex: str | None) -> None:
    if expected_hex is not None and md5_hex != expected_hex:
        raise DigestMismatchError(
            f"reference {entry.ref} ({entry.path}) has md5 {md5_hex}, but {expected_hex} was logged: "
            f"the source changed after the artifact was logged")


# --------------------------------------------------------------------------- the interface

class ReferenceHandler(Protocol):
    """One URI scheme: list what a URI names, fetch it whole, read a byte range of it."""

    schemes: tuple[str, ...]

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]: ...

    def fetch(self, entry: ManifestEntry, dest: Path) -> None: ...

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes: ...

    def is_container(self, entry: ManifestEntry) -> bool:
        """Does an unchecked entry name a directory/prefix (so download expands it)?"""
        ...


# --------------------------------------------------------------------------- other schemes

class TrackingHandler:
    """Any other scheme: the URI is tracked, never read (digest = md5 of the URI, size None)."""

    schemes: tuple[str, ...] = ()

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        parsed = urlparse(uri)
        default = posixpath.basename(parsed.path.rstrip("/")) or parsed.netloc or "reference"
        yield ManifestEntry(path=_entry_name(name, default), digest=uri_digest(uri), ref=uri)

    def _refuse(self, entry: ManifestEntry) -> ArtifactFSError:
        return NotFoundError(f"reference {entry.ref} ({entry.path}): artifactfs cannot read "
                             f"{urlparse(entry.ref or '').scheme or 'scheme-less'} URIs; it only tracks them")

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        raise self._refuse(entry)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        raise self._refuse(entry)

    def is_container(self, entry: ManifestEntry) -> bool:
        return False
