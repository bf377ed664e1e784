"""Blob backends of the server: a local directory (the core's LocalBlobBackend) or S3.

Either way the server tells clients *where* to move bytes with an upload/download plan, so that
with S3 blob bytes never pass through the server:

* download: a presigned GET (clients send ``Range`` on it; the mount reads byte ranges straight
  from S3);
* upload of a small file: one presigned PUT whose signature covers ``Content-MD5``, so S3 itself
  refuses bytes that do not match the declared md5;
* upload of a large file: a multipart upload into a staging key, one presigned PUT per part
  (each with its own Content-MD5), completed by the server, which then hashes the assembled
  object (S3 has no whole-object md5 for multipart objects) and only then copies it to its
  final key.  A wrong upload is deleted and never becomes visible under a blob name.

After a single PUT the server still checks the object (its ETag is the md5 of a plain PUT; if
the store encrypts with KMS the ETag is opaque and the server reads the bytes back) — some
S3-compatible stores do not enforce Content-MD5.  Only then is the blob registered, which is
what lets a version reference it.  The batched ``/blobs/completed`` takes the ETag the PUT
answered, relayed by the uploading writer, in place of that HEAD: the same value, computed by
the store over the bytes it kept (a relayed ETag that is not the md5 gets the HEAD as before).

Keys: ``<prefix>/<entity>/<md5[:2]>/<md5[2:]>``, the same layout as the local backend, so
blob spaces are per entity and one entity's URLs can never name another's objects.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from client.blockmap import BlockHasher
from client.errors import DigestMismatchError, NotFoundError, StoreUnavailableError
from client.hashing import md5_chunks
from client.registry.blobs import LocalBlobBackend, check_key

log = logging.getLogger(__name__)

#: Files up to this size go up in one presigned PUT; larger ones in presigned multipart parts.
#: (Both adjustable through the environment so tests can exercise multipart with small files.)
MULTIPART_THRESHOLD = int(os.environ.get("ARTIFACTFS_S3_MULTIPART_THRESHOLD", 64 << 20))
MIN_PART_SIZE = int(os.environ.get("ARTIFACTFS_S3_PART_SIZE", 16 << 20))
MAX_PARTS = 10_000
#: S3's limit of one CopyObject: a verified staged object up to this size is placed by one copy
#: request; only a larger one needs a multipart copy (UploadPartCopy, which s3rver and other
#: emulators lack: boto3's managed copy went multipart from 1 GiB on, and a 1 GiB `log` failed)
MAX_SINGLE_COPY = 5 << 30


def copy_in_one_request(size: int) -> bool:
    """Whether a staged object of ``size`` bytes is placed by one CopyObject."""
    return size <= MAX_SINGLE_COPY


def part_size_for(size: int) -> int:
    """Part size for a multipart upload of ``size`` bytes: >= 16 MiB and at most 10,000 parts."""
    part = MIN_PART_SIZE
    while part * MAX_PARTS < size:
        part *= 2
    return part


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str


def parse_s3_url(url: str) -> S3Location:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket[/prefix] URL")
    return S3Location(parsed.netloc, parsed.path.strip("/"))


class _StreamingReader(io.RawIOBase):
    """A botocore StreamingBody as a proper binary file object (readinto, context manager)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._body.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


class S3BlobBackend:
    """Blobs as objects in an S3-compatible bucket (AWS, MinIO, Ceph RGW, moto …)."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 max_connections: int = 64) -> None:
        loc = parse_s3_url(url)
        self.bucket, self.prefix = loc.bucket, loc.prefix
        self.endpoint_url = endpoint_url
        config = botocore.config.Config(
            max_pool_connections=max_connections,
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5, read_timeout=60,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=config,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )

    # -- keys ----------------------------------------------------------------------------------
    def key(self, entity: str, md5_hex: str) -> str:
        check_key(entity, md5_hex)
        tail = f"{entity}/{md5_hex[:2]}/{md5_hex[2:]}"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def _staging_key(self, entity: str, md5_hex: str) -> str:
        tail = f".uploads/{entity}/{md5_hex}.{uuid.uuid4().hex}"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (handy for MinIO/moto; AWS admins create their own)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    # -- BlobBackend protocol ------------------------------------------------------------------
    def put_file(self, entity: str, md5_hex: str, src: Path) -> int:
        """Upload through the server (used by the admin tooling, not by clients)."""
        size = os.path.getsize(src)
        if size <= MULTIPART_THRESHOLD:
            data = Path(src).read_bytes()
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != md5_hex:
                raise DigestMismatchError(f"{src} does not have md5 {md5_hex}")
            self._call(self.client.put_object, Bucket=self.bucket, Key=self.key(entity, md5_hex),
                       Body=data, ContentMD5=_b64(md5_hex))
            return size
        staging = self._staging_key(entity, md5_hex)
        self.client.upload_file(str(src), self.bucket, staging, Config=TransferConfig(max_concurrency=8))
        self._promote(entity, md5_hex, staging)
        return size

    def exists(self, entity: str, md5_hex: str) -> bool:
        try:
            self._head(entity, md5_hex)
            return True
        except NotFoundError:
            return False

    def size(self, entity: str, md5_hex: str) -> int:
        return int(self._head(entity, md5_hex)["ContentLength"])

    def open(self, entity: str, md5_hex: str) -> BinaryIO:
        resp = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key(entity, md5_hex),
                          not_found=f"blob {md5_hex} not found in {entity}")
        return io.BufferedReader(_StreamingReader(resp["Body"]), buffer_size=1 << 20)

    def read(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        rng = f"bytes={start}-" if length is None else f"bytes={start}-{start + length - 1}"
        try:
            resp = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key(entity, md5_hex), Range=rng,
                              not_found=f"blob {md5_hex} not found in {entity}")
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise
        return resp["Body"].read()

    def delete(self, entity: str, md5_hex: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key(entity, md5_hex))

    # -- presigned transfers -------------------------------------------------------------------
    def presign_get(self, entity: str, md5_hex: str, expires_in: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(entity, md5_hex)}, ExpiresIn=expires_in,
        )

    def plan_upload(self, entity: str, md5_hex: str, size: int, expires_in: int,
                    part_md5s: list[str] | None = None) -> dict[str, Any]:
        """How the client should send this blob: one PUT, or presigned multipart parts.

        For multipart the client must send the md5 hex of each part (it hashes them while it
        hashes the file); each part URL then signs that part's Content-MD5.
        """
        if size <= MULTIPART_THRESHOLD:
            url = self.client.generate_presigned_url(
                "put_object",
                Params={"Bucket": self.bucket, "Key": self.key(entity, md5_hex), "ContentMD5": _b64(md5_hex)},
                ExpiresIn=expires_in,
            )
            return {"method": "put", "url": url, "headers": {"Content-MD5": _b64(md5_hex)}}
        part_size = part_size_for(size)
        count = -(-size // part_size)
        if part_md5s is None:
            return {"method": "multipart", "part_size": part_size, "part_count": count, "parts": None}
        if len(part_md5s) != count:
            raise DigestMismatchError(f"expected {count} part md5s of {part_size} bytes, got {len(part_md5s)}")
        staging = self._staging_key(entity, md5_hex)
        upload_id = self._call(self.client.create_multipart_upload, Bucket=self.bucket, Key=staging)["UploadId"]
        parts = []
        for number, part_md5 in enumerate(part_md5s, start=1):
            url = self.client.generate_presigned_url(
                "upload_part",
                Params={"Bucket": self.bucket, "Key": staging, "UploadId": upload_id, "PartNumber": number,
                        "ContentMD5": _b64(part_md5)},
                ExpiresIn=expires_in,
            )
            parts.append({"number": number, "url": url, "headers": {"Content-MD5": _b64(part_md5)}})
        return {"method": "multipart", "part_size": part_size, "part_count": count, "parts": parts,
                "upload": {"key": staging, "upload_id": upload_id}}

    def abort_upload(self, entity: str, md5_hex: str, upload: dict[str, Any]) -> None:
        """Drop a multipart upload of this blob that is not needed (best effort: it may be
        complete or gone already; nothing outside this blob's staging keys is touched)."""
        key, upload_id = str(upload.get("key", "")), str(upload.get("upload_id", ""))
        if not key.startswith(self._staging_key(entity, md5_hex).rsplit(".", 1)[0] + ".") or not upload_id:
            return
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - completed or gone already: nothing to drop
            log.debug("abort of upload %s of %s: %s", upload_id, key, exc)

    def complete_upload(self, entity: str, md5_hex: str, size: int, upload: dict[str, Any] | None,
                        etags: list[str] | None, hasher: BlockHasher | None = None) -> None:
        """Verify an upload the client says it finished; DigestMismatchError if it is wrong.

        ``hasher`` is fed the bytes whenever the server reads them (its block map)."""
        if not upload:
            head = self._head(entity, md5_hex)
            etag = str(head.get("ETag", "")).strip('"')
            if int(head["ContentLength"]) != size:
                self.delete(entity, md5_hex)
                raise DigestMismatchError(f"blob {md5_hex} has {head['ContentLength']} bytes, {size} declared")
            if etag != md5_hex:
                # Opaque ETag (SSE-KMS) or a store that ignored Content-MD5: hash the bytes.
                if self._hash_object(self.key(entity, md5_hex), hasher) != md5_hex:
                    self.delete(entity, md5_hex)
                    raise DigestMismatchError(f"uploaded bytes for {md5_hex} have a different md5; upload again")
            return
        staging = str(upload["key"])
        expected_prefix = self._staging_key(entity, md5_hex).rsplit(".", 1)[0] + "."
        if not staging.startswith(expected_prefix):
            raise DigestMismatchError("multipart upload does not belong to this blob")
        parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags or [])]
        try:
            self._call(self.client.complete_multipart_upload, Bucket=self.bucket, Key=staging,
                       UploadId=str(upload["upload_id"]), MultipartUpload={"Parts": parts})
        except (botocore.exceptions.ClientError, StoreUnavailableError) as exc:
            # Sent again after a /complete that completed the upload and then failed (the
            # endpoint, while the staged object was verified or copied): the upload id is gone,
            # the staged object was kept for this retry.  Neither there: upload again.
            if not self._staged(staging):
                if isinstance(exc, StoreUnavailableError):
                    raise
                raise NotFoundError(f"the multipart upload of blob {md5_hex} is gone (completed and dropped, "
                                    f"or aborted): upload it again") from None
        self._promote(entity, md5_hex, staging, size, hasher, resumable=True)

    def _staged(self, staging: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=staging)
        except Exception:  # noqa: BLE001 - not there, or the endpoint is down: nothing to resume
            return False
        return True

    def _promote(self, entity: str, md5_hex: str, staging: str, size: int | None = None,
                 hasher: BlockHasher | None = None, resumable: bool = False) -> None:
        """Hash a staged object and copy it to its blob key if it matches; delete it then, or
        when its bytes do not match.  ``resumable`` (a client's ``/complete``, which it retries):
        a staged object the endpoint failed under (while it was hashed or copied) is kept, so the
        retry resumes from it (one a client never came back for: see OPERATIONS.md); otherwise
        it is deleted on any failure (nobody would come back for its key)."""
        try:
            head = self._call(self.client.head_object, Bucket=self.bucket, Key=staging)
            length = int(head["ContentLength"])
            if size is not None and length != size:
                raise DigestMismatchError(f"blob {md5_hex} has {length} bytes, {size} declared")
            if self._hash_object(staging, hasher) != md5_hex:
                raise DigestMismatchError(f"uploaded bytes for {md5_hex} have a different md5; upload again")
            self._place(staging, self.key(entity, md5_hex), length)
        except Exception as exc:
            if not resumable or isinstance(exc, DigestMismatchError):
                self._drop_staged(staging)
            raise
        self._drop_staged(staging)

    def _place(self, staging: str, key: str, size: int) -> None:
        """Copy a verified staged object to its blob key, server-side."""
        source = {"Bucket": self.bucket, "Key": staging}
        if copy_in_one_request(size):
            self._call(self.client.copy_object, Bucket=self.bucket, Key=key, CopySource=source)
        else:
            self._call(self.client.copy, CopySource=source, Bucket=self.bucket, Key=key,
                       Config=TransferConfig(multipart_threshold=MAX_SINGLE_COPY + 1, multipart_chunksize=256 << 20))

    def _drop_staged(self, staging: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=staging)
        except Exception as exc:  # noqa: BLE001 - the blob is decided; a leftover is swept by lifecycle
            log.warning("could not delete the staged object %s: %s", staging, exc)

    def _hash_object(self, key: str, hasher: BlockHasher | None = None) -> str:
        body = self._call(self.client.get_object, Bucket=self.bucket, Key=key)["Body"]
        return md5_chunks(body.iter_chunks(1 << 20), also=hasher.update if hasher is not None else None)

    def _head(self, entity: str, md5_hex: str) -> dict[str, Any]:
        return self._call(self.client.head_object, Bucket=self.bucket, Key=self.key(entity, md5_hex),
                          not_found=f"blob {md5_hex} not found in {entity}")

    @staticmethod
    def _call(fn: Any, not_found: str | None = None, **kwargs: Any) -> Any:
        """One S3 call with botocore's own retries; its failures as our error types."""
        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound") and not_found:
                raise NotFoundError(not_found) from None
            if code in ("BadDigest", "InvalidDigest"):
                raise DigestMismatchError(f"S3 refused the bytes: {code}") from None
            raise
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as exc:
            raise StoreUnavailableError(f"S3 endpoint unreachable: {exc}") from exc


def _b64(md5_hex: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")


def open_backend(url: str, endpoint_url: str | None = None) -> LocalBlobBackend | S3BlobBackend:
    """``s3://bucket/prefix`` -> S3BlobBackend; anything else is a local directory."""
    if url.startswith("s3://"):
        backend = S3BlobBackend(url, endpoint_url=endpoint_url)
        return backend
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalBlobBackend(url)
