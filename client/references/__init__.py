"""Reference entries: files an artifact tracks by URI instead of uploading them.

``Artifact.add_reference(uri, name=None, checksum=True, max_objects=None)`` records, for each
object a URI names, a manifest entry whose ``ref`` is the object's URI and whose ``digest`` /
``size`` come from the source's own metadata (the rules of the W&B SDK):

=========  ===========================================  ============================================
scheme     digest                                       extra
=========  ===========================================  ============================================
file://    base64 md5 of the bytes                      --
http(s)    the ``ETag`` header, ``strip('"')``-ed;       ``{"etag": <header as sent>}``
           the URL string when there is no ETag
s3://      the object's ETag, quotes stripped           ``{"etag": ..., "versionID": ...}`` (versioned)
gs://      the object's base64 md5 (``md5_hash``)       ``{"etag": ..., "versionID": generation}``
other      the URI string, size None (``name`` needed)  --
=========  ===========================================  ============================================

``checksum=False`` reads no content.  For http(s), s3, gs and other schemes: one entry whose
digest is the URI string itself (s3/gs: ``scheme://bucket/key``, query dropped, named by the
whole key), no size, so a new version appears only when the URI changes.  For ``file://``: the
file or directory is still walked, each entry getting its size and the base64 md5 of its
resolved ``file://`` URI as digest.  Such entries are recognisable later (:func:`is_uri_digest`)
and are fetched without verification.

Entry names: a single object is named ``name`` or its basename (for http(s) the basename of the
whole URL, query string included, as W&B); a directory/prefix expands to one entry per object,
named by its key relative to the prefix, under ``name`` when given.  An s3 prefix skips 0-byte
objects.  A ``file://`` directory holding more than ``max_objects`` files (default 10,000,000)
is a ValueError (``Exceeded N objects``), a missing ``file://`` target too, as in W&B; a bucket
listing stops after ``max_objects`` objects in key order and logs a warning (W&B truncates too).
All these rules were observed side by side with wandb 0.31.0 (tests/test_wandb_fidelity.py).

Reading back (download and the mount) goes through :func:`fetch_reference` and
:func:`read_reference_range`; both check what the source lets us check (size, the recorded ETag /
version, md5 where the digest is an md5).  Ranged reads are pinned to the record: S3 by
``VersionId``, else ``If-Match`` on the ETag; HTTP by ``If-Match`` plus the answer's ETag and
total size; GCS by the generation, else the md5 from the object's metadata.  They raise
:class:`DigestMismatchError` when the source changed since it was logged, :class:`NotFoundError`
when it is gone, :class:`PermissionDeniedError` when this machine's credentials are missing or
refused and :class:`StoreUnavailableError` when it cannot be reached.  ``allow_missing_references`` is the
caller's business: it catches ``NotFoundError``.

Every scheme is one small :class:`ReferenceHandler`; adding a scheme means adding one class to
``_HANDLERS`` (one module per scheme in this package: common, file, http, s3, gcs).  boto3,
requests and google-cloud-storage are imported lazily, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ..errors import InvalidPathError
from ..manifest import ManifestEntry
from .common import DEFAULT_MAX_OBJECTS, ReferenceHandler, is_uri_digest, uri_digest, TrackingHandler
from .file import FileHandler
from .gcs import GcsHandler
from .http import HttpHandler
from .s3 import S3Handler, s3_endpoint_url

_TRACKING = TrackingHandler()
_HANDLERS: dict[str, ReferenceHandler] = {}
for _h in (FileHandler(), HttpHandler(), S3Handler(), GcsHandler()):
    for _s in _h.schemes:
        _HANDLERS[_s] = _h


def handler_for(uri: str) -> ReferenceHandler:
    """The handler of a URI's scheme (case-insensitive); unknown schemes are only tracked."""
    return _HANDLERS.get(urlparse(uri).scheme.lower(), _TRACKING)


# --------------------------------------------------------------------------- public API

def iter_entries_for_reference(uri: str, name: str | None = None, checksum: bool = True,
                               max_objects: int | None = None) -> Iterator[ManifestEntry]:
    """Like :func:`entries_for_reference`, one entry at a time (flat memory for huge prefixes)."""
    if not isinstance(uri, str) or not uri:
        raise InvalidPathError(f"a reference URI must be a non-empty string, got {uri!r}")
    if max_objects is not None and max_objects < 1:
        raise InvalidPathError(f"max_objects must be at least 1, got {max_objects}")
    name = name.strip("/") if name else None
    yield from handler_for(uri).entries(uri, name or None, checksum, max_objects or DEFAULT_MAX_OBJECTS)


def entries_for_reference(uri: str, name: str | None = None, checksum: bool = True,
                          max_objects: int | None = None) -> list[ManifestEntry]:
    """The manifest entries ``Artifact.add_reference(uri, name, checksum, max_objects)`` adds."""
    return list(iter_entries_for_reference(uri, name, checksum, max_objects))


def fetch_reference(entry: ManifestEntry, dest: Path) -> None:
    """Download a reference entry's bytes to ``dest`` (atomically), verified as far as possible.

    Raises NotFoundError (gone: the caller may skip it under allow_missing_references),
    DigestMismatchError (changed since logged), StoreUnavailableError (unreachable).
    """
    if not entry.ref:
        raise InvalidPathError(f"entry {entry.path} is not a reference")
    handler_for(entry.ref).fetch(entry, Path(dest))


def read_reference_range(entry: ManifestEntry, start: int, length: int) -> bytes:
    """Up to ``length`` bytes from offset ``start`` of a reference (fewer at the end of the
    object): a ranged GET for http(s)/s3/gs, a seek for file://.  For the mount's lazy reads."""
    if not entry.ref:
        raise InvalidPathError(f"entry {entry.path} is not a reference")
    if start < 0 or length < 0:
        raise InvalidPathError(f"invalid range start={start} length={length}")
    return handler_for(entry.ref).read_range(entry, start, length)


def entries_to_download(entry: ManifestEntry) -> list[ManifestEntry]:
    """What ``Artifact.download`` fetches for one reference entry: the entry itself, or, for a
    ``checksum=False`` reference to a directory/prefix (never expanded when logged), the objects
    under it now, named below ``entry.path``."""
    if entry.ref and is_uri_digest(entry) and handler_for(entry.ref).is_container(entry):
        return list(iter_entries_for_reference(entry.ref, entry.path, checksum=True))
    return [entry]


__all__ = [
    "DEFAULT_MAX_OBJECTS", "ReferenceHandler", "entries_for_reference", "entries_to_download",
    "fetch_reference", "handler_for", "is_uri_digest", "iter_entries_for_reference",
    "read_reference_range", "s3_endpoint_url", "uri_digest",
]
