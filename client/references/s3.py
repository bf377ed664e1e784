"""``s3://`` references: object metadata (ETag, versionId), prefixes expanded page by page."""

from __future__ import annotations

import os
import posixpath
import threading
from pathlib import Path
from typing import Iterator

from ..errors import ArtifactFSError, DigestMismatchError, NotFoundError, PermissionDeniedError, StoreUnavailableError
from ..hashing import HashingWriter, CHUNK
from ..manifest import ManifestEntry
from .common import (
    _parse_bucket_uri,
    _unchecked_bucket_entry,
    _atomic_dest,
    _check_md5,
    _check_size,
    _entry_name,
    _is_single_part_etag,
    _join,
    _strip_quotes,
    _warn_truncated,
    is_uri_digest,
)


# --------------------------------------------------------------------------- s3://

_s3_lock = threading.Lock()
_s3_clients: dict[str | None, object] = {}


def s3_endpoint_url() -> str | None:
    """The S3 endpoint for S3-compatible stores such as MinIO, Ceph or moto; None means AWS itself.

    First set of ``ARTIFACTFS_S3_ENDPOINT_URL`` (ours), ``AWS_S3_ENDPOINT_URL`` (what the W&B SDK
    reads, so a wandb set-up talks to the same store) and ``AWS_ENDPOINT_URL`` (boto's)."""
    for var in ("ARTIFACTFS_S3_ENDPOINT_URL", "AWS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


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


#: S3 error codes that mean "these credentials may not read this"
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "AllAccessDisabled", "403"})


class S3Handler:
    """``s3://`` references: ETag and size from the object metadata; the version id too when the
    bucket is versioned, so a download gets the bytes that were logged even after an overwrite."""

    schemes = ("s3",)

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        try:
            return fn(**kw)
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise PermissionDeniedError(
                f"{what}: no usable AWS credentials ({exc}); the boto3 default chain is used: "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, an instance role") from None
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
            if code in _DENIED or status == 403:
                raise PermissionDeniedError(
                    f"{what}: S3 refused the AWS credentials of this machine: {code} {err.get('Message', '')}".strip()
                ) from None
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
            yield _unchecked_bucket_entry("s3", name, bucket, key)
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
            if size == 0:
                continue  # W&B skips empty objects (folder markers among them) under a prefix
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
        """GET pinned to what was logged: the recorded version id, else ``If-Match`` on the
        recorded ETag (412 -> DigestMismatchError); the answer's ETag is checked as well, for
        S3-compatible stores that ignore the precondition."""
        bucket, key, version = _parse_bucket_uri(entry.ref or "")
        version = entry.extra.get("versionID") or version
        args: dict[str, object] = {"Bucket": bucket, "Key": key}
        if version:
            args["VersionId"] = version
        elif not is_uri_digest(entry):
            args["IfMatch"] = f'"{entry.digest}"'
        args |= kw
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
            sink = HashingWriter(out)
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
