"""``gs://`` references: md5 and generation from object metadata (google-cloud-storage, lazily)."""

from __future__ import annotations

import importlib
import os
import posixpath
import threading
from pathlib import Path
from typing import Iterator

from ..errors import ArtifactFSError, DigestMismatchError, NotFoundError, PermissionDeniedError, StoreUnavailableError
from ..hashing import HashingWriter
from ..manifest import ManifestEntry
from .common import (
    _parse_bucket_uri,
    _unchecked_bucket_entry,
    _atomic_dest,
    _check_md5,
    _check_size,
    _entry_name,
    _join,
    _md5_b64_to_hex,
    _strip_quotes,
    _warn_truncated,
    is_uri_digest,
)


# --------------------------------------------------------------------------- gs://

_gcs_lock = threading.Lock()
_gcs_clients: dict[str | None, object] = {}


def _gcs_client():
    """A google-cloud-storage client (one per emulator host: finding the application default
    credentials costs requests); honours ``STORAGE_EMULATOR_HOST`` like the library does.
    No credentials: PermissionDeniedError naming what is looked for."""
    try:
        storage = importlib.import_module("google.cloud.storage")
    except ImportError:
        raise ArtifactFSError(
            "gs:// references need the google-cloud-storage package, which is not installed: "
            "pip install google-cloud-storage") from None
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
    with _gcs_lock:
        client = _gcs_clients.get(emulator)
        if client is not None:
            return client
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "artifactfs"),
                                    credentials=AnonymousCredentials())
        else:
            from google.auth.exceptions import DefaultCredentialsError

            try:
                client = storage.Client()
            except DefaultCredentialsError as exc:
                raise PermissionDeniedError(
                    f"gs:// references need Google application default credentials "
                    f"(GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`): {exc}") from None
        _gcs_clients[emulator] = client
        return client


class GcsHandler:
    """``gs://`` references: md5 and size from the object metadata; the generation as versionID
    when the bucket is versioned, so the logged bytes stay fetchable."""

    schemes = ("gs",)

    def _call(self, what: str, fn, *args, **kw):
        try:
            from google.api_core import exceptions as gexc
        except ImportError:
            _gcs_client()  # raises the "not installed" error
            raise
        try:
            return fn(*args, **kw)
        except gexc.NotFound:
            raise NotFoundError(f"{what}: not found") from None
        except gexc.PreconditionFailed:
            raise DigestMismatchError(f"{what}: the object changed since it was logged") from None
        except gexc.RequestRangeNotSatisfiable:
            return None
        except (gexc.Unauthorized, gexc.Forbidden) as exc:
            raise PermissionDeniedError(f"{what}: GCS refused this machine's credentials: {exc}") from None
        except (gexc.ServerError, gexc.RetryError) as exc:
            raise StoreUnavailableError(f"{what}: GCS unavailable: {exc}") from exc
        except gexc.GoogleAPICallError as exc:
            raise ArtifactFSError(f"{what}: GCS refused: {exc}") from exc

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        bucket_name, key, _version = _parse_bucket_uri(uri)
        if not checksum:
            yield _unchecked_bucket_entry("gs", name, bucket_name, key)
            return
        client = _gcs_client()
        bucket = self._call(f"gs://{bucket_name}", client.get_bucket, bucket_name)
        versioned = bool(bucket.versioning_enabled)
        if key and not key.endswith("/"):
            blob = self._call(uri, bucket.get_blob, key)
            if blob is not None:
                yield self._entry(bucket_name, blob, versioned, _entry_name(name, posixpath.basename(key)))
                return
        prefix = key.rstrip("/") + "/" if key else ""
        count = 0
        blobs = self._call(uri, lambda: sorted(client.list_blobs(bucket_name, prefix=prefix),
                                               key=lambda b: b.name))
        for blob in blobs:
            if blob.name.endswith("/"):
                continue
            if count >= max_objects:
                _warn_truncated(uri, max_objects)
                return
            count += 1
            yield self._entry(bucket_name, blob, versioned, _join(name, blob.name[len(prefix):]))
        if count == 0:
            raise NotFoundError(f"reference {uri}: no object or prefix of that name in bucket {bucket_name}")

    @staticmethod
    def _entry(bucket: str, blob, versioned: bool, entry_path: str) -> ManifestEntry:
        extra: dict[str, object] = {"etag": blob.etag}
        if versioned and blob.generation is not None:
            extra["versionID"] = blob.generation
        digest = blob.md5_hash or _strip_quotes(blob.etag or "")  # composite objects have no md5
        return ManifestEntry(path=entry_path, digest=digest, size=blob.size,
                             ref=f"gs://{bucket}/{blob.name}", extra=extra)

    def _blob(self, entry: ManifestEntry):
        bucket_name, key, _ = _parse_bucket_uri(entry.ref or "")
        client = _gcs_client()
        generation = entry.extra.get("versionID")
        blob = client.bucket(bucket_name).blob(key, generation=generation)
        return blob

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        blob = self._blob(entry)
        what = f"reference {entry.ref} ({entry.path})"
        with _atomic_dest(dest) as out:
            sink = HashingWriter(out)  # streamed: a large object never sits in memory
            self._call(what, blob.download_to_file, sink, checksum=None)
            if not is_uri_digest(entry):
                _check_size(entry, sink.size, "sent")
                _check_md5(entry, sink.md5.hexdigest(), _md5_b64_to_hex(entry.digest))

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        blob = self._blob(entry)
        what = f"reference {entry.ref} ({entry.path})"
        if not is_uri_digest(entry) and "versionID" not in entry.extra:
            self._call(what, blob.reload)
            if blob.md5_hash and blob.md5_hash != entry.digest:
                raise DigestMismatchError(f"{what} changed after the artifact was logged")
        data = self._call(what, blob.download_as_bytes, start=start, end=start + length - 1,
                          checksum=None)
        return data or b""

    def is_container(self, entry: ManifestEntry) -> bool:
        bucket_name, key, _ = _parse_bucket_uri(entry.ref or "")
        if key and not key.endswith("/"):
            blob = self._call(entry.ref or "", _gcs_client().bucket(bucket_name).get_blob, key)
            return blob is None
        return True
