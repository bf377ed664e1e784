"""The registry server: a thin HTTP shell over :class:`client.registry.RegistryCore`.

Every registry rule (version numbering, aliases, digest no-op, validation, lineage) lives in
the core; this module only (1) authenticates the API key and checks that its user is a member
of the entity a call names, (2) converts JSON to core calls and records back to JSON, and
(3) hands out blob upload/download plans (presigned S3 URLs, or URLs it signs for its own
``/blobdata`` routes with the local-directory backend).

The server keeps no state of its own between requests (keys, memberships and the URL-signing
secret are in the database), so several processes behind a load balancer serve one registry.
``create_app()`` reads its configuration from the environment so uvicorn workers can build it
(``ARTIFACTFS_SERVER_DB``, ``ARTIFACTFS_SERVER_BLOBS``, ``ARTIFACTFS_S3_ENDPOINT_URL``,
``ARTIFACTFS_URL_TTL``).  OpenAPI: ``/openapi.json``, docs at ``/docs``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator

import anyio.from_thread
import cachetools
import botocore.exceptions
import sqlalchemy.exc
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from client.blockmap import BlockHasher, wants_map
from client.errors import (ArtifactFSError, AuthenticationError, DigestMismatchError, InvalidNameError, NotFoundError, StoreUnavailableError,
                           error_code)
from client.hashing import is_md5_hex
from client.names import TtlSentinel, validate_entity
from client.registry import LocalBlobBackend, RegistryCore
from client.store.base import CommitRequest, VersionRecord
from client.store.http import record_to_json

from . import observe
from .auth import AuthDB, Principal
from .blobs import MULTIPART_THRESHOLD, S3BlobBackend, open_backend
from .registrar import BlobRegistrar

log = logging.getLogger(__name__)

DEFAULT_URL_TTL = 300
#: missing_blobs answers with upload plans only for batches up to this many missing blobs
#: (presigning is CPU work on the server; bigger batches plan per blob).
PLAN_BATCH = 2000


# -- request bodies (they also make the OpenAPI description) -----------------------------------
class CommitBody(BaseModel):
    entity: str
    project: str
    collection: str
    type: str
    manifest_md5: str
    aliases: list[str] = []
    tags: list[str] = []
    description: str | None = None
    metadata: dict[str, Any] = {}
    ttl_seconds: float | None | str = Field(default=TtlSentinel.INHERIT.value, description='seconds, null (no TTL) or "inherit"')
    run_id: str | None = None
    expect_latest: str | None = Field(default=None, description='commit only if latest is this version id ("": none)')


class UpdateBody(BaseModel):
    aliases: list[str] | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    description: str | None = None
    ttl_seconds: float | None | str = Field(default=None,
                                           description='absent: unchanged; null: no TTL; "inherit": the entity default')


class LinkBody(BaseModel):
    entity: str
    project: str
    collection: str
    aliases: list[str] = []


class TTLBody(BaseModel):
    ttl_seconds: float | None = None


class RunBody(BaseModel):
    run_id: str | None = None
    name: str | None = None
    job_type: str | None = None
    config: dict[str, Any] = {}


class RunUpdateBody(BaseModel):
    summary: dict[str, Any] | None = None
    tags: list[str] | None = None
    config: dict[str, Any] | None = None
    name: str | None = None


class RunFileBody(BaseModel):
    name: str
    md5: str
    size: int = Field(ge=0, lt=1 << 63)


class CollectionBody(BaseModel):
    name: str | None = None
    description: str | None = None
    tags: list[str] | None = None
    type: str | None = None


class FinishBody(BaseModel):
    state: str = "finished"


class UseBody(BaseModel):
    version_id: str
    use_as: str | None = None


class MissingBody(BaseModel):
    md5s: list[str]
    plan: bool = Field(default=False, description="also return upload plans for the missing blobs")


class UploadBody(BaseModel):
    size: int = Field(ge=0, lt=1 << 63)
    part_md5s: list[str] | None = None


class CompleteBody(BaseModel):
    size: int = Field(ge=0, lt=1 << 63)
    upload: dict[str, Any] | None = None
    etags: list[str] | None = None


class CompletedBlob(BaseModel):
    md5: str
    size: int = Field(ge=0, lt=1 << 63)
    etag: str | None = Field(default=None, description="the ETag the single PUT answered with")


class CompletedBody(BaseModel):
    blobs: list[CompletedBlob]


# -- the application ----------------------------------------------------------------------------
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

    def close(self) -> None:
        self.registry.close()


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

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        stop = threading.Event()
        worker = None
        if gc_interval > 0:
            worker = threading.Thread(target=periodic_gc, args=(server, gc_interval, stop), name="ttl-gc", daemon=True)
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
    reg, auth = server.registry, server.auth

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

    async def principal(request: Request) -> Principal:
        """The caller; from the auth cache on the event loop, else the database in a thread."""
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        try:
            p = auth.cached(key)
            if p is None:
                p = await run_in_threadpool(auth.authenticate, key)
        except AuthenticationError as exc:
            observe.AUTH_REFUSED.inc()
            observe.audit("auth_refused", reason=str(exc), key_id=_public_key_id(key), route=request.url.path,
                          client=request.client.host if request.client else None)
            raise
        request.state.user = p.user
        return p

    def readable(p: Principal, versions: list[VersionRecord]) -> list[dict[str, Any]]:
        return [record_to_json(v) for v in versions if p.role_in(v.entity)]

    # -- health and identity -----------------------------------------------------------------
    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:
        """The process is alive and serving (touches nothing else: see /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["meta"])
    def readyz() -> JSONResponse:
        """Ready for traffic: the database answers a query and the blob backend is reachable."""
        checks = {"database": observe.check_database(reg.engine), "blobs": observe.check_blobs(server.blobs)}
        ok = all(v is None for v in checks.values())
        if not ok:
            log.warning("not ready: %s", {k: v for k, v in checks.items() if v})
        return JSONResponse({"status": "ready" if ok else "unavailable",
                             **{k: v or "ok" for k, v in checks.items()}}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["meta"])
    def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        body, content_type = observe.metrics_text()
        return Response(body, media_type=content_type)

    @app.get("/api/v1/whoami", tags=["meta"])
    def whoami(p: Principal = Depends(principal)) -> dict[str, Any]:
        return {"user": p.user, "key_id": p.key_id, "default_entity": p.default_entity,
                "teams": [{"name": t, "role": r} for t, r in p.roles]}

    # -- namespace ----------------------------------------------------------------------------
    @app.get("/api/v1/entities", tags=["namespace"])
    def list_entities(p: Principal = Depends(principal)) -> list[str]:
        """Entities the caller is a member of that hold something (as the embedded store lists)."""
        known = set(reg.list_entities())
        return [t for t in p.teams if t in known]

    @app.put("/api/v1/entities/{entity}/projects/{project}", tags=["namespace"], status_code=204)
    def create_project(entity: str, project: str, p: Principal = Depends(principal)) -> Response:
        p.require(entity, write=True)
        reg.create_project(entity, project)
        return Response(status_code=204)

    @app.get("/api/v1/entities/{entity}/projects", tags=["namespace"])
    def list_projects(entity: str, p: Principal = Depends(principal)) -> list[str]:
        p.require(entity)
        try:
            return reg.list_projects(entity)
        except NotFoundError:
            return []  # a team that has logged nothing yet

    @app.get("/api/v1/entities/{entity}/projects/{project}/collections", tags=["namespace"])
    def list_collections(entity: str, project: str, type: str | None = None,
                         p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity)
        return [record_to_json(c) for c in reg.list_collections(entity, project, type)]

    @app.get("/api/v1/entities/{entity}/projects/{project}/listing", tags=["namespace"])
    def list_project(entity: str, project: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        """The project's collections (with aliases) and all their committed versions: one call
        for a mount's ``ls`` of a project, in a constant number of queries."""
        p.require(entity)
        collections, versions = reg.list_project(entity, project)
        return {"collections": [record_to_json(c) for c in collections],
                "versions": [record_to_json(v) for v in versions]}

    @app.get("/api/v1/entities/{entity}/projects/{project}/types", tags=["namespace"])
    def list_types(entity: str, project: str, p: Principal = Depends(principal)) -> list[str]:
        p.require(entity)
        return reg.list_types(entity, project)

    @app.get("/api/v1/entities/{entity}/projects/{project}/collections/{collection}", tags=["namespace"])
    def get_collection(entity: str, project: str, collection: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity)
        return record_to_json(reg.get_collection(entity, project, collection))

    @app.patch("/api/v1/entities/{entity}/projects/{project}/collections/{collection}", tags=["namespace"])
    def update_collection(entity: str, project: str, collection: str, body: CollectionBody,
                          p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity, write=True)
        rec = reg.update_collection(entity, project, collection, name=body.name, description=body.description,
                                    tags=body.tags, type=body.type)
        observe.audit("update_collection", user=p.user, entity=entity, project=project, collection=collection,
                      changed=sorted(body.model_dump(exclude_none=True)), new_name=rec.name, type=rec.type)
        return record_to_json(rec)

    @app.delete("/api/v1/entities/{entity}/projects/{project}/collections/{collection}", tags=["namespace"],
                status_code=204)
    def delete_collection(entity: str, project: str, collection: str, p: Principal = Depends(principal)) -> Response:
        p.require(entity, write=True)
        reg.delete_collection(entity, project, collection)
        observe.audit("delete_collection", user=p.user, entity=entity, project=project, collection=collection)
        return Response(status_code=204)

    @app.get("/api/v1/entities/{entity}/projects/{project}/collections/{collection}/versions", tags=["versions"])
    def list_versions(entity: str, project: str, collection: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity)
        return [record_to_json(v) for v in reg.list_versions(entity, project, collection)]

    @app.get("/api/v1/entities/{entity}/projects/{project}/collections/{collection}/resolve/{selector}",
             tags=["versions"])
    def resolve(entity: str, project: str, collection: str, selector: str,
                p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity)
        return record_to_json(reg.resolve(entity, project, collection, selector))

    # -- versions -------------------------------------------------------------------------------
    def version_for(p: Principal, version_id: str, write: bool = False) -> VersionRecord:
        rec = reg.get_version(version_id)
        p.require(rec.entity, write=write)
        return rec

    @app.get("/api/v1/versions/{version_id}", tags=["versions"])
    def get_version(version_id: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        return record_to_json(version_for(p, version_id))

    @app.post("/api/v1/commit", tags=["versions"])
    def commit(body: CommitBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(body.entity, write=True)
        req = CommitRequest(**{**body.model_dump(), "aliases": tuple(body.aliases), "tags": tuple(body.tags)})
        version, created = reg.commit(req)
        observe.COMMITS.labels(str(created).lower()).inc()
        observe.audit("commit", user=p.user, entity=body.entity, version=version.qualified_name, id=version.id,
                      created=created, manifest_md5=body.manifest_md5)
        return {"version": record_to_json(version), "created": created}

    @app.patch("/api/v1/versions/{version_id}", tags=["versions"])
    def update_version(version_id: str, body: UpdateBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        version_for(p, version_id, write=True)
        ttl: Any = body.ttl_seconds if "ttl_seconds" in body.model_fields_set else TtlSentinel.KEEP
        return record_to_json(reg.update_version(version_id, aliases=body.aliases, tags=body.tags,
                                                 metadata=body.metadata, description=body.description,
                                                 ttl_seconds=ttl))

    @app.delete("/api/v1/versions/{version_id}", tags=["versions"], status_code=204)
    def delete_version(version_id: str, delete_aliases: bool = False, p: Principal = Depends(principal)) -> Response:
        rec = version_for(p, version_id, write=True)
        reg.delete_version(version_id, delete_aliases)
        observe.audit("delete_version", user=p.user, entity=rec.entity, version=rec.qualified_name, id=version_id,
                      delete_aliases=delete_aliases)
        return Response(status_code=204)

    @app.post("/api/v1/versions/{version_id}/link", tags=["versions"])
    def link_version(version_id: str, body: LinkBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        version_for(p, version_id)
        p.require(body.entity, write=True)
        return record_to_json(reg.link_version(version_id, body.entity, body.project, body.collection, body.aliases))

    @app.post("/api/v1/versions/{version_id}/unlink", tags=["versions"], status_code=204)
    def unlink_version(version_id: str, p: Principal = Depends(principal)) -> Response:
        rec = version_for(p, version_id, write=True)
        reg.unlink_version(version_id)
        observe.audit("unlink_version", user=p.user, entity=rec.entity, version=rec.qualified_name, id=version_id)
        return Response(status_code=204)

    @app.put("/api/v1/entities/{entity}/default-ttl", tags=["versions"], status_code=204)
    def set_entity_default_ttl(entity: str, body: TTLBody, p: Principal = Depends(principal)) -> Response:
        p.require(entity, write=True)
        reg.set_entity_default_ttl(entity, body.ttl_seconds)
        return Response(status_code=204)

    @app.get("/api/v1/entities/{entity}/default-ttl", tags=["versions"])
    def get_entity_default_ttl(entity: str, p: Principal = Depends(principal)) -> dict[str, float | None]:
        p.require(entity)
        return {"ttl_seconds": reg.get_entity_default_ttl(entity)}

    @app.post("/api/v1/gc", tags=["versions"])
    def gc_expired(p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        """Delete versions whose TTL ran out (any caller may trigger it: they are expired anyway)."""
        gone = reg.gc_expired()
        if gone:
            observe.audit("gc_expired", user=p.user, deleted_versions=[v.qualified_name for v in gone])
        return readable(p, gone)

    @app.get("/api/v1/versions/{version_id}/runs", tags=["lineage"])
    def runs_using(version_id: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        version_for(p, version_id)
        return [record_to_json(r) for r in reg.runs_using(version_id) if p.role_in(r.entity)]

    # -- runs -----------------------------------------------------------------------------------
    runs_path = "/api/v1/entities/{entity}/projects/{project}/runs"

    @app.post(runs_path, tags=["lineage"])
    def create_run(entity: str, project: str, body: RunBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity, write=True)
        return record_to_json(reg.create_run(entity, project, body.run_id, name=body.name,
                                             job_type=body.job_type, config=body.config))

    @app.get(runs_path, tags=["lineage"])
    def list_runs(entity: str, project: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity)
        return [record_to_json(r) for r in reg.list_runs(entity, project)]

    @app.get(runs_path + "/{run_id}", tags=["lineage"])
    def get_run(entity: str, project: str, run_id: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity)
        return record_to_json(reg.get_run(entity, project, run_id))

    @app.delete(runs_path + "/{run_id}", tags=["lineage"])
    def delete_run(entity: str, project: str, run_id: str, delete_artifacts: bool = False,
                   p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity, write=True)
        gone = reg.delete_run(entity, project, run_id, delete_artifacts)
        observe.audit("delete_run", user=p.user, entity=entity, project=project, run_id=run_id,
                      deleted_versions=[v.qualified_name for v in gone])
        return [record_to_json(v) for v in gone]

    @app.patch(runs_path + "/{run_id}", tags=["lineage"])
    def update_run(entity: str, project: str, run_id: str, body: RunUpdateBody,
                   p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity, write=True)
        return record_to_json(reg.update_run(entity, project, run_id, summary=body.summary, tags=body.tags,
                                             config=body.config, name=body.name))

    @app.post(runs_path + "/{run_id}/files", tags=["lineage"])
    def put_run_file(entity: str, project: str, run_id: str, body: RunFileBody,
                     p: Principal = Depends(principal)) -> dict[str, Any]:
        p.require(entity, write=True)
        return record_to_json(reg.put_run_file(entity, project, run_id, body.name, body.md5, body.size))

    @app.get(runs_path + "/{run_id}/files", tags=["lineage"])
    def list_run_files(entity: str, project: str, run_id: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity)
        return [record_to_json(f) for f in reg.list_run_files(entity, project, run_id)]

    @app.post(runs_path + "/{run_id}/finish", tags=["lineage"], status_code=204)
    def finish_run(entity: str, project: str, run_id: str, body: FinishBody,
                   p: Principal = Depends(principal)) -> Response:
        p.require(entity, write=True)
        reg.finish_run(entity, project, run_id, body.state)
        return Response(status_code=204)

    @app.post(runs_path + "/{run_id}/use", tags=["lineage"], status_code=204)
    def record_use(entity: str, project: str, run_id: str, body: UseBody, p: Principal = Depends(principal)) -> Response:
        p.require(entity, write=True)
        version_for(p, body.version_id)  # using an artifact needs read access to it
        reg.record_use(entity, project, run_id, body.version_id, body.use_as)
        return Response(status_code=204)

    @app.get(runs_path + "/{run_id}/logged", tags=["lineage"])
    def versions_logged_by(entity: str, project: str, run_id: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity)
        return readable(p, reg.versions_logged_by(entity, project, run_id))

    @app.get(runs_path + "/{run_id}/used", tags=["lineage"])
    def versions_used_by(entity: str, project: str, run_id: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        p.require(entity)
        return readable(p, reg.versions_used_by(entity, project, run_id))

    # -- blobs ----------------------------------------------------------------------------------
    blob_path = "/api/v1/entities/{entity}/blobs/{md5}"

    def blob_key(p: Principal, entity: str, md5: str, write: bool = False) -> None:
        p.require(entity, write=write)
        if not is_md5_hex(md5):
            raise InvalidNameError(f"{md5!r} is not an md5 hex digest")

    def signed(op: str, entity: str, md5: str) -> str:
        expires = int(time.time()) + server.url_ttl
        observe.SIGNED_URLS.labels(op).inc()
        return f"/blobdata/{entity}/{md5}?op={op}&expires={expires}&sig={auth.sign(op, entity, md5, expires)}"

    def single_put_plan(entity: str, md5: str) -> dict[str, Any]:
        if isinstance(server.blobs, S3BlobBackend):
            observe.SIGNED_URLS.labels("put").inc()
            return server.blobs.plan_upload(entity, md5, 0, server.url_ttl)
        # The server's own URL verifies and registers while it receives: no /complete needed.
        return {"method": "put", "url": signed("put", entity, md5), "headers": {}, "complete": False}

    @app.post("/api/v1/entities/{entity}/blobs/missing", tags=["blobs"])
    def missing_blobs(entity: str, body: MissingBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        """Which blobs the entity lacks; for a writer, with single-PUT upload plans for them
        (saves a round trip per blob; sizes above ``put_limit`` must ask /uploads instead)."""
        p.require(entity)
        missing = sorted(reg.missing_blobs(entity, body.md5s, check_files=True))  # a damaged blob is re-sent
        out: dict[str, Any] = {"missing": missing}
        if body.plan and missing and len(missing) <= PLAN_BATCH and p.role_in(entity) != "viewer":
            out["uploads"] = {m: single_put_plan(entity, m) for m in missing}
            out["put_limit"] = MULTIPART_THRESHOLD if isinstance(server.blobs, S3BlobBackend) else None
            out["expires_in"] = server.url_ttl
        return out

    @app.post(blob_path + "/uploads", tags=["blobs"])
    def plan_upload(entity: str, md5: str, body: UploadBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        """How to upload this blob: ``exists`` (nothing to do), ``put`` (one URL) or ``multipart``."""
        blob_key(p, entity, md5, write=True)
        if not reg.missing_blobs(entity, [md5], check_files=True):
            return {"method": "exists"}
        observe.SIGNED_BYTES.inc(body.size)
        if isinstance(server.blobs, S3BlobBackend):
            observe.SIGNED_URLS.labels("put").inc(max(1, len(body.part_md5s or ())))
            return server.blobs.plan_upload(entity, md5, body.size, server.url_ttl, body.part_md5s)
        return single_put_plan(entity, md5)

    @app.post(blob_path + "/complete", tags=["blobs"], status_code=204)
    def complete_upload(entity: str, md5: str, body: CompleteBody, p: Principal = Depends(principal)) -> Response:
        """Verify an uploaded blob against its md5 and register it, so versions may reference it."""
        blob_key(p, entity, md5, write=True)
        if isinstance(server.blobs, S3BlobBackend):
            if reg.missing_blobs(entity, [md5]) or body.upload:
                hasher = BlockHasher()
                server.blobs.complete_upload(entity, md5, body.size, body.upload, body.etags, hasher)
                server.registrar.register(entity, md5, body.size)
                if hasher.result().size == body.size and wants_map(body.size):  # the server read the bytes
                    reg.register_blockmap(entity, md5, hasher.result())
        elif reg.missing_blobs(entity, [md5]):
            raise DigestMismatchError(f"blob {md5} was not uploaded (or did not match its md5); upload it again")
        return Response(status_code=204)

    @app.post("/api/v1/entities/{entity}/blobs/completed", tags=["blobs"])
    def completed_uploads(entity: str, body: CompletedBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        """``/complete`` for many single-PUT uploads at once, registered in one transaction.

        With S3 the ETag each PUT answered is relayed by the writer: when it is the md5 (S3's
        ETag of a plain PUT is the md5 of the bytes it stored) no HEAD is sent; otherwise the
        object is checked as ``/complete`` checks it.  Answers the blobs that failed their
        check (deleted, to upload again) with the reason."""
        p.require(entity, write=True)
        if len(body.blobs) > PLAN_BATCH:
            raise InvalidNameError(f"complete at most {PLAN_BATCH} uploads per call")
        for b in body.blobs:
            blob_key(p, entity, b.md5, write=True)
        pending = reg.missing_blobs(entity, [b.md5 for b in body.blobs])
        good: list[tuple[str, str, int]] = []
        failed: dict[str, str] = {}
        for b in body.blobs:
            if b.md5 not in pending:
                continue
            if isinstance(server.blobs, S3BlobBackend):
                if (b.etag or "").strip('"') != b.md5:
                    try:
                        server.blobs.complete_upload(entity, b.md5, b.size, None, None)
                    except (DigestMismatchError, NotFoundError) as exc:
                        failed[b.md5] = str(exc)
                        continue
            elif reg.missing_blobs(entity, [b.md5], check_files=True):
                failed[b.md5] = f"blob {b.md5} was not uploaded (or did not match its md5); upload it again"
                continue
            good.append((entity, b.md5, b.size))
        if good:
            reg.register_blobs(good)
        return {"failed": failed}

    @app.post("/api/v1/entities/{entity}/blobs/blockmaps", tags=["blobs"])
    def blockmaps(entity: str, body: MissingBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        """Block maps (client/blockmap.py, base64) of these blobs; blobs without one are left out."""
        p.require(entity)
        if len(body.md5s) > PLAN_BATCH:
            raise InvalidNameError(f"ask for at most {PLAN_BATCH} block maps per call")
        maps = reg.blockmaps(entity, body.md5s)
        return {"maps": {m: base64.b64encode(bm.to_bytes()).decode() for m, bm in sorted(maps.items())}}

    # A fleet reading one dataset asks for the same download URLs over and over; an S3 presign
    # costs ~0.2 ms of CPU, so each is reused for a tenth of its lifetime, and the lifetime told
    # to clients (``get_ttl``) is what a reused URL has left at worst.
    reuse = server.url_ttl // 10 if isinstance(server.blobs, S3BlobBackend) else 0
    get_ttl = server.url_ttl - reuse
    presigned: cachetools.TTLCache[tuple[str, str], str] = cachetools.TTLCache(maxsize=50_000, ttl=max(reuse, 1))
    presigned_lock = threading.Lock()

    def url_for(entity: str, md5: str) -> str:
        if isinstance(server.blobs, S3BlobBackend):
            observe.SIGNED_URLS.labels("get").inc()
            with presigned_lock:
                url = presigned.get((entity, md5)) if reuse else None
            if url is None:
                url = server.blobs.presign_get(entity, md5, server.url_ttl)
                if reuse:
                    with presigned_lock:
                        presigned[(entity, md5)] = url
            return url
        return signed("get", entity, md5)

    @app.get(blob_path + "/url", tags=["blobs"])
    def download_url(entity: str, md5: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        """A short-lived URL for the blob (send Range on it); its size where that is free to know
        (local directory; with S3 the ranged GET's Content-Range tells it, no HEAD here)."""
        blob_key(p, entity, md5)
        if reg.missing_blobs(entity, [md5]):
            raise NotFoundError(f"blob {md5} not found in {entity}")
        size = None if isinstance(server.blobs, S3BlobBackend) else server.blobs.size(entity, md5)
        return {"url": url_for(entity, md5), "expires_in": get_ttl, "size": size}

    @app.post("/api/v1/entities/{entity}/blobs/urls", tags=["blobs"])
    def download_urls(entity: str, body: MissingBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        """Download URLs for many blobs at once (unknown ones are left out)."""
        p.require(entity)
        if len(body.md5s) > PLAN_BATCH:
            raise InvalidNameError(f"ask for at most {PLAN_BATCH} URLs per call")
        present = set(body.md5s) - reg.missing_blobs(entity, body.md5s)
        return {"urls": {m: url_for(entity, m) for m in sorted(present)}, "expires_in": get_ttl}

    # -- blob bytes through the server (local-directory backend only) ---------------------------
    def check_signed(op: str, entity: str, md5: str, expires: int, sig: str) -> LocalBlobBackend:
        auth.check_signature(op, entity, md5, expires, sig)
        if not isinstance(server.blobs, LocalBlobBackend):
            raise NotFoundError("this server keeps blobs in S3; ask /url for a presigned URL")
        return server.blobs

    @app.get("/blobdata/{entity}/{md5}", tags=["blobs"])
    def get_blob_bytes(entity: str, md5: str, expires: int = Query(...), sig: str = Query(...),
                       op: str = Query("get")) -> FileResponse:
        """The blob's bytes with Range support (HTTP 206), for a URL from ``/url``."""
        backend = check_signed("get", entity, md5, expires, sig)
        path = backend.path(entity, md5)
        if not path.is_file():
            raise NotFoundError(f"blob {md5} not found in {entity}")
        return FileResponse(path, media_type="application/octet-stream")

    @app.put("/blobdata/{entity}/{md5}", tags=["blobs"], status_code=204)
    def put_blob_bytes(entity: str, md5: str, request: Request, expires: int = Query(...), sig: str = Query(...),
                       op: str = Query("put")) -> Response:
        """Upload for a URL from ``/uploads``: streamed to disk, hashed, refused unless it matches."""
        backend = check_signed("put", entity, md5, expires, sig)
        validate_entity(entity)
        hasher = BlockHasher()
        size = backend.put_stream(entity, md5, _BodyReader(request), hasher)
        server.registrar.register(entity, md5, size)
        if wants_map(size):
            reg.register_blockmap(entity, md5, hasher.result())
        return Response(status_code=204)

    return app


def _public_key_id(key: str | None) -> str | None:
    """The id part of an ``afs_<id>_<secret>`` key (public, like an AWS access key id); never the secret."""
    if not key:
        return None
    parts = key.split("_")
    return parts[1][:16] if len(parts) >= 3 and parts[0] == "afs" else "malformed"


class _BodyReader:
    """The request body as a blocking file object, for a sync route running in a worker thread."""

    def __init__(self, request: Request) -> None:
        self._chunks: Iterator[bytes] | None = None
        self._stream = request.stream()
        self._buf = b""
        self._done = False

    def _next(self) -> bytes | None:
        try:
            return anyio.from_thread.run(self._stream.__anext__)
        except StopAsyncIteration:
            return None

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) < n):
            chunk = self._next()
            if chunk is None:
                self._done = True
            else:
                self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out
