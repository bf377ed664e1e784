"""How clients reach the blob bytes, one class per backend kind, chosen once at startup.

* :class:`S3BlobAccess` (``--blobs s3://…``): presigned S3 URLs (downloads, single PUTs,
  multipart parts); the server completes multipart uploads and checks single PUTs by their
  ETag (relayed by the writer for ``/blobs/completed``, else a HEAD).
* :class:`DirectoryBlobAccess` (``--blobs DIR``): URLs the server signs for its own
  ``/blobdata`` routes, which hash the bytes while they receive them and register the blob.

:class:`~server.context.Server` holds one :class:`BlobAccess` (``server.blobs``); the routes
and the readiness probe call it and never ask which backend is underneath.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import cachetools

from client.blockmap import BlockHasher, wants_map
from client.errors import DigestMismatchError, NotFoundError
from client.registry import LocalBlobBackend, RegistryCore

from . import observe
from .auth import AuthDB
from .blobs import MULTIPART_THRESHOLD, S3BlobBackend
from .registrar import BlobRegistrar


def _not_uploaded(md5: str) -> str:
    return f"blob {md5} was not uploaded (or did not match its md5); upload it again"


class BlobAccess(Protocol):
    """What the routes need of a blob backend beyond reading and writing bytes."""

    #: advertised with single-PUT plans: larger blobs must ask ``/uploads`` (None: no limit)
    put_limit: int | None
    #: the lifetime told to clients for a download URL (what a reused URL has left at worst)
    get_ttl: int

    def prepare(self) -> None:
        """At startup, before the first request (S3: create the bucket if it is missing)."""
        ...

    def check(self) -> str | None:
        """Readiness: None if blobs can be stored, else why not (may raise; the probe reports it)."""
        ...

    def download_url(self, entity: str, md5: str) -> str:
        """A URL that serves the blob's bytes (with Range) for ``url_ttl`` seconds."""
        ...

    def download_size(self, entity: str, md5: str) -> int | None:
        """The blob's size where that is free to know, else None (the ranged GET tells it)."""
        ...

    def single_put_plan(self, entity: str, md5: str) -> dict[str, Any]:
        """One URL to PUT the blob's bytes to (``missing_blobs`` plans)."""
        ...

    def upload_plan(self, entity: str, md5: str, size: int, part_md5s: list[str] | None) -> dict[str, Any]:
        """How to upload a blob of ``size`` bytes (``/uploads``): one PUT or multipart parts."""
        ...

    def complete(self, entity: str, md5: str, size: int, upload: dict[str, Any] | None,
                 etags: list[str] | None) -> None:
        """``/complete``: verify the uploaded blob and register it; DigestMismatchError if wrong."""
        ...

    def check_completed(self, entity: str, md5: str, size: int, etag: str | None) -> str | None:
        """``/blobs/completed``: None if this single-PUT upload is good (the caller registers
        it), else why not (a wrong S3 object is deleted)."""
        ...

    def directory(self) -> LocalBlobBackend:
        """The blob directory the ``/blobdata`` routes serve; NotFoundError where there is none."""
        ...


class S3BlobAccess:
    """Presigned S3 URLs; bytes never pass through the server except to verify multipart uploads.

    A fleet reading one dataset asks for the same download URLs over and over; an S3 presign
    costs ~0.2 ms of CPU, so each is reused for a tenth of its lifetime."""

    put_limit: int | None = MULTIPART_THRESHOLD

    def __init__(self, backend: S3BlobBackend, registry: RegistryCore, registrar: BlobRegistrar,
                 url_ttl: int) -> None:
        self.backend = backend
        self._registry = registry
        self._registrar = registrar
        self._url_ttl = url_ttl
        self._reuse = url_ttl // 10
        self.get_ttl = url_ttl - self._reuse
        self._presigned: cachetools.TTLCache[tuple[str, str], str] = cachetools.TTLCache(
            maxsize=50_000, ttl=max(self._reuse, 1))
        self._lock = threading.Lock()
        #: (entity, md5) -> (its /complete lock, calls holding or waiting for it)
        self._completions: dict[tuple[str, str], tuple[threading.Lock, int]] = {}

    def prepare(self) -> None:
        self.backend.ensure_bucket()

    def check(self) -> str | None:
        self.backend.client.head_bucket(Bucket=self.backend.bucket)
        return None

    def download_url(self, entity: str, md5: str) -> str:
        observe.SIGNED_URLS.labels("get").inc()
        with self._lock:
            url = self._presigned.get((entity, md5)) if self._reuse else None
        if url is None:
            url = self.backend.presign_get(entity, md5, self._url_ttl)
            if self._reuse:
                with self._lock:
                    self._presigned[(entity, md5)] = url
        return url

    def download_size(self, entity: str, md5: str) -> int | None:
        return None  # a HEAD per URL would cost more than it saves

    def single_put_plan(self, entity: str, md5: str) -> dict[str, Any]:
        observe.SIGNED_URLS.labels("put").inc()
        return self.backend.plan_upload(entity, md5, 0, self._url_ttl)

    def upload_plan(self, entity: str, md5: str, size: int, part_md5s: list[str] | None) -> dict[str, Any]:
        observe.SIGNED_URLS.labels("put").inc(max(1, len(part_md5s or ())))
        return self.backend.plan_upload(entity, md5, size, self._url_ttl, part_md5s)

    def complete(self, entity: str, md5: str, size: int, upload: dict[str, Any] | None,
                 etags: list[str] | None) -> None:
        """Idempotent: a blob already in is success, whatever upload the call names.  So a
        client that lost the answer (a large multipart upload takes a while to verify) and asks
        again succeeds, instead of failing on an upload the first call consumed; a second
        uploader of the same content finds it in and its redundant upload is aborted.  Calls
        for one blob run one at a time in this process: a retry waits for the first one."""
        reg = self._registry
        with self._completing(entity, md5):
            if not reg.missing_blobs(entity, [md5]):
                if upload:
                    self.backend.abort_upload(entity, md5, upload)
                return
            hasher = BlockHasher()
            self.backend.complete_upload(entity, md5, size, upload, etags, hasher)
            self._registrar.register(entity, md5, size)
            if hasher.result().size == size and wants_map(size):  # the server read the bytes
                reg.register_blockmap(entity, md5, hasher.result())

    @contextlib.contextmanager
    def _completing(self, entity: str, md5: str) -> Iterator[None]:
        key = (entity, md5)
        with self._lock:
            lock, users = self._completions.get(key, (threading.Lock(), 0))
            self._completions[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._completions[key]
                if users == 1:
                    del self._completions[key]
                else:
                    self._completions[key] = (lock, users - 1)

    def check_completed(self, entity: str, md5: str, size: int, etag: str | None) -> str | None:
        if (etag or "").strip('"') == md5:  # S3's ETag of a plain PUT: the md5 of the bytes it kept
            return None
        try:
            self.backend.complete_upload(entity, md5, size, None, None)
        except (DigestMismatchError, NotFoundError) as exc:
            return str(exc)
        return None

    def directory(self) -> LocalBlobBackend:
        raise NotFoundError("this server keeps blobs in S3; ask /url for a presigned URL")


class DirectoryBlobAccess:
    """URLs the server signs (HMAC) for its own ``/blobdata`` routes over a blob directory;
    the PUT route verifies and registers the blob while it receives it."""

    put_limit: int | None = None

    def __init__(self, backend: LocalBlobBackend, registry: RegistryCore, auth: AuthDB, url_ttl: int) -> None:
        self.backend = backend
        self._registry = registry
        self._auth = auth
        self._url_ttl = url_ttl
        self.get_ttl = url_ttl  # signing is cheap: never reused

    def signed(self, op: str, entity: str, md5: str) -> str:
        """A ``/blobdata`` URL for ``op`` ("get" or "put") that expires after the URL TTL."""
        expires = int(time.time()) + self._url_ttl
        observe.SIGNED_URLS.labels(op).inc()
        return f"/blobdata/{entity}/{md5}?op={op}&expires={expires}&sig={self._auth.sign(op, entity, md5, expires)}"

    def prepare(self) -> None:
        pass  # LocalBlobBackend made its directory when it was opened

    def check(self) -> str | None:
        staging = self.backend.root / ".tmp"
        if not staging.is_dir() or not os.access(staging, os.W_OK):
            return f"blob directory {self.backend.root} missing or not writable"
        return None

    def download_url(self, entity: str, md5: str) -> str:
        return self.signed("get", entity, md5)

    def download_size(self, entity: str, md5: str) -> int | None:
        return self.backend.size(entity, md5)

    def single_put_plan(self, entity: str, md5: str) -> dict[str, Any]:
        # The server's own URL verifies and registers while it receives: no /complete needed.
        return {"method": "put", "url": self.signed("put", entity, md5), "headers": {}, "complete": False}

    def upload_plan(self, entity: str, md5: str, size: int, part_md5s: list[str] | None) -> dict[str, Any]:
        return self.single_put_plan(entity, md5)  # any size goes in one PUT

    def complete(self, entity: str, md5: str, size: int, upload: dict[str, Any] | None,
                 etags: list[str] | None) -> None:
        if self._registry.missing_blobs(entity, [md5]):
            raise DigestMismatchError(_not_uploaded(md5))

    def check_completed(self, entity: str, md5: str, size: int, etag: str | None) -> str | None:
        if self._registry.missing_blobs(entity, [md5], check_files=True):
            return _not_uploaded(md5)
        return None

    def directory(self) -> LocalBlobBackend:
        return self.backend


def blob_access(backend: LocalBlobBackend | S3BlobBackend, registry: RegistryCore, registrar: BlobRegistrar,
                auth: AuthDB, url_ttl: int) -> BlobAccess:
    """The access of this backend kind (the one place that asks which kind it is)."""
    match backend:
        case S3BlobBackend():
            return S3BlobAccess(backend, registry, registrar, url_ttl)
        case LocalBlobBackend():
            return DirectoryBlobAccess(backend, registry, auth, url_ttl)
    raise TypeError(f"no blob access for {type(backend).__name__}")
