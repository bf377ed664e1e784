"""What every route shares: the :class:`Server` (registry core, blob backend, auth database,
URL signer) and the FastAPI dependencies that hand a route the server and the caller.

A route declares ``p: Principal = Depends(principal)`` and ``s: Server = Depends(get_server)``;
both are ``async`` so they run on the event loop (a sync dependency would cost a worker-thread
hop per request), and ``principal`` goes to the database only on an auth-cache miss.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import cachetools
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from client.errors import AuthenticationError
from client.registry import RegistryCore
from client.store.base import VersionRecord
from client.store.wire import record_to_json

from . import observe
from .auth import AuthDB, Principal
from .blobs import S3BlobBackend, open_backend
from .registrar import BlobRegistrar

log = logging.getLogger(__name__)

DEFAULT_URL_TTL = 300


class Server:
    """What the routes share: the registry core, the blob backend and the auth database."""

    def __init__(self, db_url: str, blobs_url: str, s3_endpoint_url: str | None = None,
                 url_ttl: int = DEFAULT_URL_TTL, *, migrate: bool = False) -> None:
        """``migrate``: upgrade an older database schema (else SchemaVersionError; a new one is created)."""
        self.blobs = open_backend(blobs_url, s3_endpoint_url)
        if isinstance(self.blobs, S3BlobBackend):
            self.blobs.ensure_bucket()
        self.registry = RegistryCore(db_url, self.blobs, migrate=migrate)  # make_engine normalises the URL
        self.auth = AuthDB(self.registry.engine)
        self.registrar = BlobRegistrar(self.registry)
        self.url_ttl = url_ttl
        self.urls = BlobUrls(self)

    def close(self) -> None:
        self.registry.close()

    def version_for(self, p: Principal, version_id: str, write: bool = False) -> VersionRecord:
        """The version, if the caller may read (or write) its entity."""
        rec = self.registry.get_version(version_id)
        p.require(rec.entity, write=write)
        return rec


class BlobUrls:
    """Download and upload URLs: presigned S3 URLs, or URLs the server signs for its own
    ``/blobdata`` routes (the local-directory backend).

    A fleet reading one dataset asks for the same download URLs over and over; an S3 presign
    costs ~0.2 ms of CPU, so each is reused for a tenth of its lifetime, and the lifetime told
    to clients (``get_ttl``) is what a reused URL has left at worst."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._reuse = server.url_ttl // 10 if isinstance(server.blobs, S3BlobBackend) else 0
        self.get_ttl = server.url_ttl - self._reuse
        self._presigned: cachetools.TTLCache[tuple[str, str], str] = cachetools.TTLCache(
            maxsize=50_000, ttl=max(self._reuse, 1))
        self._lock = threading.Lock()

    def signed(self, op: str, entity: str, md5: str) -> str:
        """A ``/blobdata`` URL for ``op`` ("get" or "put") that expires after the URL TTL."""
        expires = int(time.time()) + self._server.url_ttl
        observe.SIGNED_URLS.labels(op).inc()
        return f"/blobdata/{entity}/{md5}?op={op}&expires={expires}&sig={self._server.auth.sign(op, entity, md5, expires)}"

    def single_put_plan(self, entity: str, md5: str) -> dict[str, Any]:
        s = self._server
        if isinstance(s.blobs, S3BlobBackend):
            observe.SIGNED_URLS.labels("put").inc()
            return s.blobs.plan_upload(entity, md5, 0, s.url_ttl)
        # The server's own URL verifies and registers while it receives: no /complete needed.
        return {"method": "put", "url": self.signed("put", entity, md5), "headers": {}, "complete": False}

    def download(self, entity: str, md5: str) -> str:
        s = self._server
        if isinstance(s.blobs, S3BlobBackend):
            observe.SIGNED_URLS.labels("get").inc()
            with self._lock:
                url = self._presigned.get((entity, md5)) if self._reuse else None
            if url is None:
                url = s.blobs.presign_get(entity, md5, s.url_ttl)
                if self._reuse:
                    with self._lock:
                        self._presigned[(entity, md5)] = url
            return url
        return self.signed("get", entity, md5)


async def get_server(request: Request) -> Server:
    """The Server of this app (``app.state.server``)."""
    server: Server = request.app.state.server
    return server


async def principal(request: Request) -> Principal:
    """The caller; from the auth cache on the event loop, else the database in a thread."""
    auth: AuthDB = request.app.state.server.auth
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    try:
        p = auth.cached(key)
        if p is None:
            p = await run_in_threadpool(auth.authenticate, key)
    except AuthenticationError as exc:
        observe.AUTH_REFUSED.inc()
        observe.audit("auth_refused", reason=str(exc), key_id=public_key_id(key), route=request.url.path,
                      client=request.client.host if request.client else None)
        raise
    request.state.user = p.user
    return p


def readable(p: Principal, versions: list[VersionRecord]) -> list[dict[str, Any]]:
    """The versions the caller may read, as JSON (the others are left out)."""
    return [record_to_json(v) for v in versions if p.role_in(v.entity)]


def public_key_id(key: str | None) -> str | None:
    """The id part of an ``afs_<id>_<secret>`` key (public, like an AWS access key id); never the secret."""
    if not key:
        return None
    parts = key.split("_")
    return parts[1][:16] if len(parts) >= 3 and parts[0] == "afs" else "malformed"
