"""Reference entries as a content source of the mount: what was recorded, and how to read it.

A manifest entry with a ``ref`` (``s3://``, ``gs://``, ``http(s)://``, ``file://``) has no blob
in the store; its bytes stay at the source.  :func:`describe` turns the index row of such an
entry into a :class:`RefSource`: the recorded identity (URI, ETag / version id / digest, size),
the md5 of the bytes when the record names it, the cache key, and whether blocks may be served
as they arrive.  Ranged reads go through :func:`client.references.read_reference_range`, which
pins every request to the record (S3: ``VersionId``, else ``If-Match`` on the ETag; HTTP:
``If-Match`` plus a check of the answer's ETag and total size; GCS: the generation, else the
object's md5 checked first; ``file://``: the recorded size).

Verification (see docs/SEMANTICS.md, "References on the drive"):

* *pinned* sources (s3, gs, http(s) with an ETag): a block is trusted as fetched, because the
  request itself was conditional on the recorded object; when the record names an md5, the
  complete object is checked against it before it enters the cache;
* ``file://`` with an md5 digest cannot be pinned: the whole file is md5-checked before its
  first byte is served (as a stored blob without a block map);
* unchecked references (``checksum=False``, or http(s) without an ETag): only the recorded
  size is checked; they are cached only while open.

Cache key: the recorded md5 of the bytes when there is one (content-addressed, shared with
stored blobs), else 32 hex digits of a sha256 over the identity (URI, version id, ETag,
digest, size).  Complete objects always enter the cache under their real md5; the map
identity -> md5 (:class:`RefIdentities`, under ``<cache>/refs/``) finds them again, so a
source that changed later can never be served from an old cache object of another identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from client.atomic import atomic_write
from client.hashing import hex_to_b64, is_md5_hex
from client.manifest import ManifestEntry
from client.references import is_uri_digest, read_reference_range

#: schemes the mount can read (others are only tracked: their open stays ENOTSUP)
READABLE_SCHEMES = frozenset({"s3", "gs", "http", "https", "file"})


@dataclass(frozen=True)
class RefSource:
    """One reference entry as recorded, and how the mount verifies what it reads of it."""

    uri: str
    entry: ManifestEntry = field(compare=False, repr=False)  #: the recorded entry (for the readers)
    checked: bool  #: False: checksum=False or no ETag; only the recorded size is known
    content_md5: str | None  #: hex md5 of the recorded bytes, when the record names it
    trust_blocks: bool  #: each ranged read is pinned (or unchecked): serve blocks as fetched
    key: str  #: cache key (see the module docstring)
    identity: str  #: 32 hex digits of the sha256 of what was recorded (names the partial file)

    def read(self, start: int, length: int) -> bytes:
        return read_reference_range(self.entry, start, length)

    def pinned_to(self) -> str:
        """What the reads are pinned to, for log lines."""
        extra = self.entry.extra
        if not self.checked:
            return f"size {self.entry.size} only (unchecked reference)"
        if extra.get("versionID"):
            return f"version {extra['versionID']}"
        if extra.get("etag"):
            return f"ETag {extra['etag']}"
        return f"digest {self.entry.digest}"


def describe(uri: str, md5_hex: str | None, size: int, extra_json: str | None, entry_path: str) -> RefSource | None:
    """The source of an index row with a ``ref``; None when the mount cannot read it (a scheme
    that is only tracked, or an unchecked entry without a recorded size, which may name a
    whole prefix: ``Artifact.download`` expands those).  May stat a ``file://`` path."""
    scheme = urlparse(uri).scheme.lower()
    if scheme not in READABLE_SCHEMES:
        return None
    extra = json.loads(extra_json) if extra_json else {}
    etag = str(extra["etag"]) if extra.get("etag") else None
    digest = hex_to_b64(md5_hex) if md5_hex else (etag.strip('"') if etag else uri)
    entry = ManifestEntry(path=entry_path, digest=digest, size=size, ref=uri, extra=extra)
    checked = not is_uri_digest(entry)
    if size == 0 and (not checked and scheme != "file" or scheme in ("http", "https")):
        return None  # the index says 0 for "no size recorded"
    content_md5: str | None = None
    if checked:
        if scheme in ("file", "gs"):
            content_md5 = md5_hex
        elif is_md5_hex(digest.lower()):  # a single-part S3 / HTTP ETag is the md5 of the bytes
            content_md5 = digest.lower()
    trust = not checked or scheme != "file"
    identity = "\0".join([uri, str(extra.get("versionID") or ""), etag or "", digest, str(size),
                          "checked" if checked else "unchecked"])
    ident = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return RefSource(uri, entry, checked, content_md5, trust, content_md5 or ident, ident)


class RefIdentities:
    """identity key -> md5 of the bytes fetched for it, one small file each under ``root``.

    Written after the complete object matched (its recorded md5, or the pin); read when an
    object is opened.  Losing an entry costs a refetch, nothing more."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:]

    def get(self, key: str) -> str | None:
        try:
            text = self._path(key).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if is_md5_hex(text) else None

    def put(self, key: str, md5_hex: str) -> None:
        if key == md5_hex:
            return
        path = self._path(key)
        with contextlib.suppress(OSError):  # an optimisation: a failure costs a refetch
            with atomic_write(path, durable=False) as f:  # a hint: a lost one is rebuilt
                f.write(md5_hex.encode())
