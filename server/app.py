"""The registry server: a thin HTTP shell over :class:`client.registry.RegistryCore`.

Every registry rule (version numbering, aliases, digest no-op, validation, lineage) lives in
the core; the server only (1) authenticates the API key and checks that its user is a member
of the entity a call names, (2) converts JSON to core calls and records back to JSON, and
(3) hands out blob upload/download plans (presigned S3 URLs, or URLs it signs for its own
``/blobdata`` routes with the local-directory backend).

Every route is an entry of the API table (:mod:`client.store.wire`: method, path, status,
codec), served by a handler in ``server/routes/<area>.py``; what the routes share (the
:class:`~server.context.Server` and the caller) comes from :mod:`server.context` through
``Depends``.  This module builds the app: the routes, the error format and the TTL sweep.

The server keeps no state of its own between requests (keys, memberships and the URL-signing
secret are in the database), so several processes behind a load balancer serve one registry.
``create_app()`` reads its configuration from the environment so uvicorn workers can build it
(``ARTIFACTFS_SERVER_DB``, ``ARTIFACTFS_SERVER_BLOBS``, ``ARTIFACTFS_S3_ENDPOINT_URL``,
``ARTIFACTFS_URL_TTL``).  OpenAPI: ``/openapi.json``, docs at ``/docs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import botocore.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.errors import ArtifactFSError, InvalidNameError, NotFoundError, StoreUnavailableError, error_code

from . import observe
from .context import DEFAULT_URL_TTL, Server
from .routes import blobs, lineage, meta, namespace, versions

__all__ = ["DEFAULT_URL_TTL", "Server", "create_app", "periodic_gc"]

log = logging.getLogger(__name__)


def periodic_gc(server: Server, interval: float, stop: threading.Event) -> None:
    """Delete versions whose TTL ran out, every ``interval`` seconds, until ``stop`` is set.

    Every worker process runs one; that is harmless because deleting an already deleted
    version is skipped by the core.
    """
    while not stop.wait(interval):
        try:
            gone = server.registry.gc_expired()
            if gone:
                log.info("ttl gc deleted %d expired version(s): %s", len(gone),
                         ", ".join(v.qualified_name for v in gone[:20]))
        except Exception:  # noqa: BLE001 - a failed sweep must not kill the server; retried next interval
            log.exception("ttl gc sweep failed")


def _error_response(exc: ArtifactFSError) -> JSONResponse:
    observe.ERRORS.labels(error_code(exc)).inc()
    return JSONResponse({"error": {"code": error_code(exc), "message": str(exc)}}, status_code=exc.http_status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answers ``{"error": {"code", "message"}}`` (client.errors codes)."""

    @app.exception_handler(ArtifactFSError)
    async def _ours(_: Request, exc: ArtifactFSError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(botocore.exceptions.BotoCoreError)
    @app.exception_handler(botocore.exceptions.ClientError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _backend_down(_: Request, exc: Exception) -> JSONResponse:
        # The database or the object store failed under us: a "try again" for the client.
        log.warning("backend failure: %s", exc)
        return _error_response(StoreUnavailableError(f"registry backend unavailable: {type(exc).__name__}: {exc}"))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(InvalidNameError(f"invalid request: {str(exc.errors())[:2000]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not JSON, an unknown route) in our error format
        cls = NotFoundError if exc.status_code == 404 else InvalidNameError
        resp = _error_response(cls(f"{exc.detail}"))
        resp.status_code = exc.status_code
        return resp

    @app.exception_handler(RecursionError)
    @app.exception_handler(UnicodeDecodeError)
    @app.exception_handler(OverflowError)
    async def _malformed(_: Request, exc: Exception) -> JSONResponse:
        # Input no rule caught earlier (nesting too deep, bad UTF-8, a number too large for the
        # database): the request's fault, so a 400 with the reason, never a 500.
        return _error_response(InvalidNameError(f"malformed request: {type(exc).__name__}: {str(exc)[:300]}"))


def create_app(server: Server | None = None) -> FastAPI:
    """The FastAPI app; without ``server`` it is configured from the environment (uvicorn workers)."""
    if server is None:
        if not logging.getLogger().handlers:  # a uvicorn worker process: log as the parent was told to
            logging.basicConfig(level=os.environ.get("ARTIFACTFS_LOG_LEVEL", "info").upper(),
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        server = Server(
            os.environ.get("ARTIFACTFS_SERVER_DB", "sqlite:///artifactfs-server.db"),
            os.environ.get("ARTIFACTFS_SERVER_BLOBS", "./artifactfs-blobs"),
            os.environ.get("ARTIFACTFS_S3_ENDPOINT_URL") or None,
            int(os.environ.get("ARTIFACTFS_URL_TTL", DEFAULT_URL_TTL)),
        )
    gc_interval = float(os.environ.get("ARTIFACTFS_GC_INTERVAL", "3600"))
    swept = server

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        stop = threading.Event()
        worker = None
        if gc_interval > 0:
            worker = threading.Thread(target=periodic_gc, args=(swept, gc_interval, stop), name="ttl-gc", daemon=True)
            worker.start()
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                worker.join(5)

    app = FastAPI(title="artifactfs registry", version="1", lifespan=lifespan,
                  description="Versioned artifacts (entity/project/collection:vN) shared by many machines.")
    app.state.server = server
    app.add_middleware(observe.ObservedApp)
    _add_error_handlers(app)
    for area in (meta, namespace, versions, lineage, blobs):
        # The areas' routes go on the app's own router, not through include_router: FastAPI
        # keeps an included router whole and matches a request through each inclusion (~20
        # Python calls per route tried, ~1,000 for a route late in the table; ~3 when direct).
        app.router.routes.extend(area.router.routes)
    return app
