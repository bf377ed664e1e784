"""Reference entries: files an artifact tracks by URI instead of uploading them.

``Artifact.add_reference(uri, name=None, checksum=True, max_objects=None)`` records, for each
object a URI names, a manifest entry whose ``ref`` is the object's URI and whose ``digest`` /
``size`` come from the source's own metadata (the rules of the W&B SDK):

=========  ==========================================  ============================================
scheme     digest                                      extra
=========  ==========================================  ============================================
file://    base64 md5 of the bytes                     --
http(s)    the ``ETag`` header, quotes stripped        ``{"etag": <header as sent>}``
s3://      the object's ETag, quotes stripped          ``{"etag": ..., "versionID": ...}`` (versioned)
gs://      the object's base64 md5 (``md5_hash``)      ``{"etag": ..., "versionID": generation}``
other      base64 md5 of the URI string, size None     --
=========  ==========================================  ============================================

``checksum=False`` never reads the source: one entry whose digest is the base64 md5 of the URI,
so a new version appears only when the URI changes (and a directory/prefix is not expanded).
Such an entry is recognisable later (:func:`is_uri_digest`) and is fetched without verification.

Entry names: a single object is named ``name`` or its basename; a directory/prefix expands to one
entry per object, named by its key relative to the prefix, under ``name`` when given.  A listing
stops after ``max_objects`` objects (default 10,000,000) in key order and logs a warning, like the
W&B SDK does for buckets.

Reading back (download and the mount) goes through :func:`fetch_reference` and
:func:`read_reference_range`; both check what the source lets us check (size, the recorded ETag /
version, md5 where the digest is an md5) and raise :class:`DigestMismatchError` when the source
changed since it was logged, :class:`NotFoundError` when it is gone and
:class:`StoreUnavailableError` when it cannot be reached.  ``allow_missing_references`` is the
caller's business: it catches ``NotFoundError``.

Every scheme is one small :class:`ReferenceHandler`; adding a scheme means adding one class to
``_HANDLERS``.  boto3, requests and google-cloud-storage are imported lazily, on first use.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import posixpath
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Protocol
from urllib.parse import unquote, urlparse

from .errors import (
    ArtifactFSError,
    DigestMismatchError,
    InvalidPathError,
    NotFoundError,
    StoreUnavailableError,
)
from .hashing import CHUNK, b64_to_hex, hex_to_b64, md5_file
from .manifest import ManifestEntry

log = logging.getLogger(__name__)

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


class _HashingSink:
    """Copy chunks to a file while hashing them, so a download is read exactly once."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.md5.update(chunk)
        self.size += len(chunk)


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
        path = _local_path(uri)
        if not checksum:
            yield ManifestEntry(path=_entry_name(name, path.name), digest=uri_digest(uri), ref=uri)
            return
        if path.is_file():
            yield self._entry(path, _entry_name(name, path.name), uri)
            return
        if not path.is_dir():
            raise NotFoundError(f"reference {uri}: no such file or directory {path}")
        files = sorted(p for p in self._walk(path))
        if len(files) > max_objects:
            _warn_truncated(uri, max_objects)
            files = files[:max_objects]
        base = uri.rstrip("/")
        for rel in files:
            yield self._entry(path / rel, _join(name, rel), f"{base}/{rel}")

    @staticmethod
    def _walk(root: Path) -> Iterator[str]:
        for dirpath, _dirs, names in os.walk(root, followlinks=True):
            rel_dir = os.path.relpath(dirpath, root)
            for n in names:
                if os.path.isfile(os.path.join(dirpath, n)):
                    yield n if rel_dir == "." else posixpath.join(rel_dir.replace(os.sep, "/"), n)

    @staticmethod
    def _entry(path: Path, entry_path: str, uri: str) -> ManifestEntry:
        return ManifestEntry(path=entry_path, digest=hex_to_b64(md5_file(path)),
                             size=path.stat().st_size, ref=uri)

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
        _check_size(entry, os.fstat(f.fileno()).st_size, "now has")
        return f

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        expected = None if is_uri_digest(entry) else _md5_b64_to_hex(entry.digest)
        with self._open(entry) as src, _atomic_dest(dest) as out:
            sink = _HashingSink(out)
            while chunk := src.read(CHUNK):
                sink.write(chunk)
            _check_md5(entry, sink.md5.hexdigest(), expected)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        with self._open(entry) as src:
            src.seek(start)
            return src.read(length)

    def is_container(self, entry: ManifestEntry) -> bool:
        return _local_path(entry.ref or "").is_dir()


# --------------------------------------------------------------------------- http(s)://

_http_local = threading.local()


def _http_session():  # -> requests.Session (imported lazily: keeps `import client` light)
    """One requests session per thread (sessions are not documented as thread-safe), with
    retries on connection errors and 5xx for the idempotent HEAD/GET we send."""
    session = getattr(_http_local, "session", None)
    if session is None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        retry = Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                      allowed_methods=frozenset({"HEAD", "GET"}), raise_on_status=False)
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=32))
        session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=32))
        _http_local.session = session
    return session


class HttpHandler:
    """``http(s)://`` references: size from ``Content-Length``, digest from ``ETag``."""

    schemes = ("http", "https")
    timeout = 60.0

    def _request(self, method: str, uri: str, **kw):
        import requests

        try:
            resp = _http_session().request(method, uri, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise StoreUnavailableError(f"reference {uri} could not be reached: {exc}") from exc
        if resp.status_code in (404, 410):
            resp.close()
            raise NotFoundError(f"reference {uri} answered {resp.status_code}: it no longer exists")
        if resp.status_code >= 500:
            resp.close()
            raise StoreUnavailableError(f"reference {uri} answered {resp.status_code}")
        tolerated = (403, 405) if method == "HEAD" else (416,)  # HEAD refused / range past the end
        if resp.status_code >= 400 and resp.status_code not in tolerated:
            resp.close()
            raise ArtifactFSError(f"reference {uri} answered {resp.status_code} to {method}")
        return resp

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        entry_name = _entry_name(name, posixpath.basename(urlparse(uri).path) or urlparse(uri).netloc)
        if not checksum:
            yield ManifestEntry(path=entry_name, digest=uri_digest(uri), ref=uri)
            return
        resp = self._request("HEAD", uri, allow_redirects=True)
        if resp.status_code >= 400:  # a server that refuses HEAD: ask with GET, read no body
            resp = self._request("GET", uri, stream=True)
            resp.close()
        headers = resp.headers
        etag = headers.get("ETag")
        size = int(headers["Content-Length"]) if headers.get("Content-Length") else None
        yield ManifestEntry(path=entry_name, digest=_strip_quotes(etag) if etag else uri_digest(uri),
                            size=size, ref=uri, extra={"etag": etag} if etag else {})

    def _check_etag(self, entry: ManifestEntry, headers) -> None:
        logged, now = entry.extra.get("etag"), headers.get("ETag")
        if logged and now and _strip_quotes(now) != _strip_quotes(logged):
            raise DigestMismatchError(
                f"reference {entry.ref} ({entry.path}) now has ETag {now}, but {logged} was logged: "
                f"the source changed after the artifact was logged")

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        import requests

        unchecked = is_uri_digest(entry)
        with self._request("GET", entry.ref or "", stream=True) as resp:
            if not unchecked:
                self._check_etag(entry, resp.headers)
            with _atomic_dest(dest) as out:
                sink = _HashingSink(out)
                try:
                    for chunk in resp.iter_content(CHUNK):
                        sink.write(chunk)
                except requests.RequestException as exc:
                    raise StoreUnavailableError(f"reference {entry.ref}: download broke off: {exc}") from exc
                if not unchecked:
                    _check_size(entry, sink.size, "sent")
                    etag = _strip_quotes(entry.extra.get("etag") or "")
                    _check_md5(entry, sink.md5.hexdigest(),
                               etag.lower() if _is_single_part_etag(etag) else None)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        resp = self._request("GET", entry.ref or "", headers=headers, stream=True)
        with resp:
            if resp.status_code == 416:
                return b""
            if not is_uri_digest(entry):
                self._check_etag(entry, resp.headers)
            if resp.status_code == 206:
                return resp.content
            # The server ignored Range: skip to start, keep length bytes, drop the rest.
            out = bytearray()
            pos = 0
            for chunk in resp.iter_content(CHUNK):
                lo, hi = max(start - pos, 0), min(start + length - pos, len(chunk))
                if lo < hi:
                    out += chunk[lo:hi]
                pos += len(chunk)
                if pos >= start + length:
                    break
            return bytes(out)

    def is_container(self, entry: ManifestEntry) -> bool:
        return False


# --------------------------------------------------------------------------- s3://

_s3_lock = threading.Lock()
_s3_clients: dict[str | None, object] = {}


def s3_endpoint_url() -> str | None:
    """``ARTIFACTFS_S3_ENDPOINT_URL`` (ours) or ``AWS_ENDPOINT_URL`` (boto's) for S3-compatible
    stores such as MinIO, Ceph or moto; None means AWS itself."""
    return os.environ.get("ARTIFACTFS_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_client():
    """A boto3 client per endpoint. Clients are thread-safe, but creating them is not."""
    endpoint = s3_endpoint_url()
    with _s3_lock:
        client = _s3_clients.get(endpoint)
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32))
            _s3_clients[endpoint] = client
        return client


def _parse_bucket_uri(uri: str) -> tuple[str, str, str | None]:
    """``s3://bucket/key?versionId=X`` -> (bucket, key, version id or None)."""
    parsed = urlparse(uri)
    version = None
    for part in parsed.query.split("&"):
        if part.startswith("versionId="):
            version = unquote(part[len("versionId="):])
    return parsed.netloc, unquote(parsed.path.lstrip("/")), version


class S3Handler:
    """``s3://`` references: ETag and size from the object metadata; the version id too when the
    bucket is versioned, so a download gets the bytes that were logged even after an overwrite."""

    schemes = ("s3",)

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound") or status == 404:
                raise NotFoundError(f"{what}: not found ({code or status})") from None
            if code in ("PreconditionFailed", "412"):
                raise DigestMismatchError(f"{what}: the object changed since it was logged") from None
            if code == "InvalidRange":
                return None
            if status and status >= 500:
                raise StoreUnavailableError(f"{what}: S3 answered {status} {code}") from exc
            raise ArtifactFSError(f"{what}: S3 refused: {code} {err.get('Message', '')}".strip()) from exc
        except BotoCoreError as exc:
            raise StoreUnavailableError(f"{what}: S3 could not be reached: {exc}") from exc

    def _versioned(self, bucket: str) -> bool:
        client = _s3_client()
        resp = self._call(f"s3://{bucket}", client.get_bucket_versioning, Bucket=bucket)
        return (resp or {}).get("Status") == "Enabled"

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        bucket, key, version = _parse_bucket_uri(uri)
        if not checksum:
            yield ManifestEntry(path=_entry_name(name, posixpath.basename(key.rstrip("/")) or bucket),
                                digest=uri_digest(uri), ref=uri)
            return
        client = _s3_client()
        versioned = self._versioned(bucket)
        if key and not key.endswith("/"):
            kw = {"Bucket": bucket, "Key": key} | ({"VersionId": version} if version else {})
            try:
                head = self._call(uri, client.head_object, **kw)
            except NotFoundError:
                if version:
                    raise
                head = None
            if head is not None:
                yield self._entry(bucket, key, head["ETag"], head["ContentLength"],
                                  head.get("VersionId") if versioned else None,
                                  _entry_name(name, posixpath.basename(key)))
                return
        prefix = key.rstrip("/") + "/" if key else ""
        count = 0
        for obj_key, etag, size, vid in self._list(bucket, prefix, versioned):
            if count >= max_objects:
                _warn_truncated(uri, max_objects)
                return
            count += 1
            yield self._entry(bucket, obj_key, etag, size, vid, _join(name, obj_key[len(prefix):]))
        if count == 0:
            raise NotFoundError(f"reference {uri}: no object or prefix of that name in bucket {bucket}")

    def _list(self, bucket: str, prefix: str, versioned: bool) -> Iterator[tuple[str, str, int, str | None]]:
        """(key, etag, size, version id) of the live objects under prefix, in key order.
        A versioned bucket is listed with list_object_versions: one call gives the ids that a
        plain listing would need a HEAD per object for."""
        client = _s3_client()
        op = "list_object_versions" if versioned else "list_objects_v2"
        pages = self._pages(f"s3://{bucket}/{prefix}", client.get_paginator(op).paginate(Bucket=bucket, Prefix=prefix))
        for page in pages:
            if versioned:
                for v in page.get("Versions", []):
                    if v.get("IsLatest") and not v["Key"].endswith("/"):
                        yield v["Key"], v["ETag"], v["Size"], v.get("VersionId")
            else:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield obj["Key"], obj["ETag"], obj["Size"], None

    def _pages(self, what: str, pages) -> Iterator[dict]:
        """Iterate a paginator, translating errors raised while fetching each page."""
        it = iter(pages)
        while True:
            page = self._call(what, lambda: next(it, None))
            if page is None:
                return
            yield page

    @staticmethod
    def _entry(bucket: str, key: str, etag: str, size: int, version: str | None,
               entry_path: str) -> ManifestEntry:
        etag = _strip_quotes(etag)
        extra: dict[str, object] = {"etag": etag}
        if version and version != "null":
            extra["versionID"] = version
        return ManifestEntry(path=entry_path, digest=etag, size=size, ref=f"s3://{bucket}/{key}",
                             extra=extra)

    def _get(self, entry: ManifestEntry, **kw):
        bucket, key, version = _parse_bucket_uri(entry.ref or "")
        version = entry.extra.get("versionID") or version
        args = {"Bucket": bucket, "Key": key} | ({"VersionId": version} if version else {}) | kw
        resp = self._call(f"reference {entry.ref} ({entry.path})", _s3_client().get_object, **args)
        if resp is not None and not is_uri_digest(entry):
            now = _strip_quotes(resp.get("ETag", ""))
            if now and now != entry.digest:
                resp["Body"].close()
                raise DigestMismatchError(
                    f"reference {entry.ref} ({entry.path}) now has ETag {now}, but {entry.digest} "
                    f"was logged: the object was overwritten after the artifact was logged")
        return resp

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        resp = self._get(entry)
        body = resp["Body"]
        with _atomic_dest(dest) as out:
            sink = _HashingSink(out)
            try:
                for chunk in body.iter_chunks(CHUNK):
                    sink.write(chunk)
            except Exception as exc:  # botocore streams raise several types mid-body
                raise StoreUnavailableError(f"reference {entry.ref}: download broke off: {exc}") from exc
            finally:
                body.close()
            if not is_uri_digest(entry):
                _check_size(entry, sink.size, "sent")
                _check_md5(entry, sink.md5.hexdigest(),
                           entry.digest.lower() if _is_single_part_etag(entry.digest) else None)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        resp = self._get(entry, Range=f"bytes={start}-{start + length - 1}")
        if resp is None:  # InvalidRange: start is at or past the end
            return b""
        with resp["Body"] as body:
            return body.read()

    def is_container(self, entry: ManifestEntry) -> bool:
        bucket, key, version = _parse_bucket_uri(entry.ref or "")
        if key and not key.endswith("/") and not version:
            try:
                self._call(entry.ref or "", _s3_client().head_object, Bucket=bucket, Key=key)
                return False
            except NotFoundError:
                pass
        return True


# --------------------------------------------------------------------------- gs://

def _gcs_client():
    """A google-cloud-storage client; honours ``STORAGE_EMULATOR_HOST`` like the library does."""
    try:
        storage = importlib.import_module("google.cloud.storage")
    except ImportError:
        raise ArtifactFSError(
            "gs:// references need the google-cloud-storage package, which is not installed: "
            "pip install google-cloud-storage") from None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials  # type: ignore[import-untyped]

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "artifactfs"),
                              credentials=AnonymousCredentials())
    return storage.Client()


class GcsHandler:
    """``gs://`` references: md5 and size from the object metadata; the generation as versionID
    when the bucket is versioned, so the logged bytes stay fetchable."""

    schemes = ("gs",)

    def _call(self, what: str, fn, *args, **kw):
        try:
            from google.api_core import exceptions as gexc  # type: ignore[import-untyped]
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
        except (gexc.ServerError, gexc.RetryError) as exc:
            raise StoreUnavailableError(f"{what}: GCS unavailable: {exc}") from exc
        except gexc.GoogleAPICallError as exc:
            raise ArtifactFSError(f"{what}: GCS refused: {exc}") from exc

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        bucket_name, key, _version = _parse_bucket_uri(uri)
        if not checksum:
            yield ManifestEntry(path=_entry_name(name, posixpath.basename(key.rstrip("/")) or bucket_name),
                                digest=uri_digest(uri), ref=uri)
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
            sink = _HashingSink(out)  # streamed: a large object never sits in memory
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
