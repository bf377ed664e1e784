"""What every reference scheme shares: digests of URIs, ETag rules, atomic verified writes,
the :class:`ReferenceHandler` protocol, and the tracking-only handler for unknown schemes."""

from __future__ import annotations

import hashlib
import logging
import posixpath
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Protocol
from urllib.parse import unquote, urlparse

from ..atomic import atomic_write
from ..errors import ArtifactFSError, DigestMismatchError, InvalidPathError, NotFoundError
from ..hashing import b64_to_hex, hex_to_b64
from ..manifest import ManifestEntry

log = logging.getLogger('client.references')

DEFAULT_MAX_OBJECTS = 10_000_000


# --------------------------------------------------------------------------- helpers

def uri_digest(uri: str) -> str:
    """base64 md5 of a URI string: the digest W&B gives a ``file://`` entry with checksum=False
    (of the resolved file's URI), and the one artifactfs gave every unchecked entry before it
    followed W&B (kept so such manifests are still recognised)."""
    return hex_to_b64(hashlib.md5(uri.encode("utf-8"), usedforsecurity=False).hexdigest())


def is_uri_digest(entry: ManifestEntry) -> bool:
    """True when the entry's digest only names its URI, not its bytes: the URI string itself
    (W&B's digest for http(s)/s3/gs with checksum=False, http without an ETag and unknown
    schemes), the md5 of a file's URI (file:// with checksum=False), or the md5 of the ref
    (manifests written by earlier artifactfs versions)."""
    ref = entry.ref
    if ref is None:
        return False
    if entry.digest == ref or entry.digest == uri_digest(ref):
        return True
    if urlparse(ref).scheme.lower() == "file":
        from .file import _local_path

        return entry.digest == uri_digest(_local_path(ref).resolve().as_uri())
    return False


def _md5_b64_to_hex(digest: str) -> str | None:
    """The hex md5 a base64 digest spells, or None if it is not a base64 md5."""
    if len(digest) != 24:
        return None
    try:
        return b64_to_hex(digest)
    except ValueError:
        return None


def _strip_quotes(etag: str) -> str:
    """W&B's digest of an ETag: every leading and trailing double quote removed
    (``str.strip('"')``), so a weak ``W/"x"`` becomes ``W/"x``."""
    return etag.strip('"')


def _is_single_part_etag(etag: str) -> bool:
    """S3/HTTP ETags of 32 hex digits are the md5 of the bytes (no multipart '-N' suffix)."""
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower())


def _entry_name(name: str | None, default: str) -> str:
    return name if name else default


def _join(name: str | None, rel: str) -> str:
    return posixpath.join(name, rel) if name else rel


def _too_many(uri: str, max_objects: int) -> ValueError:
    """W&B's error when a file:// directory holds more than max_objects files."""
    return InvalidPathError(f"Exceeded {max_objects!r} objects tracked under {uri}, pass max_objects to add_reference")


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
    """The fetched bytes, renamed into place on success (:mod:`client.atomic`), so a reader never
    sees a half-written or unverified file."""
    with atomic_write(dest) as f:
        yield f




def _unchecked_bucket_entry(scheme: str, name: str | None, bucket: str, key: str) -> ManifestEntry:
    """checksum=False for a bucket URI, as W&B: the ref is ``scheme://bucket/key`` (a query
    string such as ``?versionId=`` dropped), the digest is that ref string, the entry is named
    by the whole key (the bucket when there is none), no size."""
    ref = f"{scheme}://{bucket}/{key}"
    return ManifestEntry(path=_entry_name(name, key or bucket), digest=ref, ref=ref)


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

    @property
    def schemes(self) -> tuple[str, ...]:
        """The URI schemes it serves (read-only, so a handler may declare a fixed-length tuple)."""
        ...

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]: ...

    def fetch(self, entry: ManifestEntry, dest: Path) -> None: ...

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes: ...

    def is_container(self, entry: ManifestEntry) -> bool:
        """Does an unchecked entry name a directory/prefix (so download expands it)?"""
        ...


# --------------------------------------------------------------------------- other schemes

class TrackingHandler:
    """Any other scheme: the URI is tracked, never read (digest = the URI string, size None,
    ``name`` required), as in W&B."""

    schemes: tuple[str, ...] = ()

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        if not name:  # W&B's rule: an untracked scheme has no natural entry name
            raise InvalidPathError(f'pass name="<entry_name>" when tracking references with unknown schemes: {uri}')
        yield ManifestEntry(path=name, digest=uri, ref=uri)

    def _refuse(self, entry: ManifestEntry) -> ArtifactFSError:
        return NotFoundError(f"reference {entry.ref} ({entry.path}): artifactfs cannot read "
                             f"{urlparse(entry.ref or '').scheme or 'scheme-less'} URIs; it only tracks them")

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        raise self._refuse(entry)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        raise self._refuse(entry)

    def is_container(self, entry: ManifestEntry) -> bool:
        return False
