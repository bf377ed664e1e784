"""What every route shares: the :class:`Server` (registry core, blob access, auth database)
and the FastAPI dependencies that hand a route the server and the caller.

A route declares ``p: Principal = Depends(principal)`` and ``s: Server = Depends(get_server)``;
both are ``async`` so they run on the event loop (a sync dependency would cost a worker-thread
hop per request), and ``principal`` goes to the database only on an auth-cache miss.

Blocking work (a sync handler, an auth-cache miss) runs in the server's handler threads through
:func:`run_sync`: one executor hop, where anyio's (FastAPI's for sync routes) costs ~3x the Python
calls, and FastAPI made a second one to validate a sync route's answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from fastapi import Request

from client.errors import AuthenticationError
from client.registry import RegistryCore
from client.store.base import VersionRecord
from client.store.wire import record_to_json

from . import observe
from .auth import AuthDB, Principal
from .blob_access import BlobAccess, blob_access
from .blobs import open_backend
from .listing import ListingCache
from .registrar import BlobRegistrar

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_URL_TTL = 300
#: threads for the routes' blocking work: anyio's default limit, which served them before
HANDLER_THREADS = 40
_handler_threads = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="artifactfs-handler")


async def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a handler thread, in a copy of the caller's context."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_handler_threads, call)


class Server:
    """What the routes share: the registry core, the blob access and the auth database."""

    def __init__(self, db_url: str, blobs_url: str, s3_endpoint_url: str | None = None,
                 url_ttl: int = DEFAULT_URL_TTL, *, migrate: bool = False) -> None:
        """``migrate``: upgrade an older database schema (else SchemaVersionError; a new one is created)."""
        backend = open_backend(blobs_url, s3_endpoint_url)
        self.registry = RegistryCore(db_url, backend, migrate=migrate)  # make_engine normalises the URL
        try:
            self.auth = AuthDB(self.registry.engine)
            self.registrar = BlobRegistrar(self.registry)
            #: project listings kept encoded, collection by collection (server/listing.py)
            self.listings = ListingCache(self.registry)
            self.url_ttl = url_ttl
            #: how clients reach the blobs (S3 presigned URLs or the server's own /blobdata), chosen here once
            self.blobs: BlobAccess = blob_access(backend, self.registry, self.registrar, self.auth, url_ttl)
            self.blobs.prepare()
        except BaseException:
            self.registry.close()
            raise

    def close(self) -> None:
        self.registry.close()

    def version_for(self, p: Principal, version_id: str, write: bool = False) -> VersionRecord:
        """The version, if the caller may read (or write) its entity."""
        rec = self.registry.get_version(version_id)
        p.require(rec.entity, write=write)
        return rec


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
            p = await run_sync(auth.authenticate, key)
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
