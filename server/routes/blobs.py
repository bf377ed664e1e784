"""Blobs: which are missing, upload plans and their completion, block maps, download URLs,
and the bytes themselves through the server's own signed URLs (local-directory backend)."""

from __future__ import annotations

from typing import Any, Iterator

import anyio.from_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from client.blockmap import BlockHasher, wants_map
from client.errors import InvalidNameError, NotFoundError
from client.hashing import is_md5_hex
from client.names import validate_entity
from client.registry import LocalBlobBackend
from client.store.wire import JsonCalls, TransferCalls, blockmaps_to_json

from .. import observe
from ..auth import Principal
from ..context import Server, get_server, principal
from . import serve

router = APIRouter()

#: missing_blobs answers with upload plans only for batches up to this many missing blobs
#: (presigning is CPU work on the server; bigger batches plan per blob).
PLAN_BATCH = 2000


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


def _one_batch(items: list[Any], refusal: str) -> None:
    """InvalidNameError(``refusal``) for a batch of more than PLAN_BATCH items."""
    if len(items) > PLAN_BATCH:
        raise InvalidNameError(refusal)


def _blob_key(p: Principal, entity: str, md5: str, write: bool = False) -> None:
    p.require(entity, write=write)
    if not is_md5_hex(md5):
        raise InvalidNameError(f"{md5!r} is not an md5 hex digest")


@serve(router, JsonCalls.missing_blobs)
def missing_blobs(entity: str, body: MissingBody, p: Principal = Depends(principal),
                  s: Server = Depends(get_server)) -> dict[str, Any]:
    """Which blobs the entity lacks; for a writer, with single-PUT upload plans for them
    (saves a round trip per blob; sizes above ``put_limit`` must ask /uploads instead)."""
    p.require(entity)
    missing = sorted(s.registry.missing_blobs(entity, body.md5s, check_files=True))  # a damaged blob is re-sent
    out: dict[str, Any] = {"missing": missing}
    if body.plan and missing and len(missing) <= PLAN_BATCH and p.role_in(entity) != "viewer":
        out["uploads"] = {m: s.blobs.single_put_plan(entity, m) for m in missing}
        out["put_limit"] = s.blobs.put_limit
        out["expires_in"] = s.url_ttl
    return out


@serve(router, TransferCalls.plan_upload)
def plan_upload(entity: str, md5: str, body: UploadBody, p: Principal = Depends(principal),
                s: Server = Depends(get_server)) -> dict[str, Any]:
    """How to upload this blob: ``exists`` (nothing to do), ``put`` (one URL) or ``multipart``."""
    _blob_key(p, entity, md5, write=True)
    if not s.registry.missing_blobs(entity, [md5], check_files=True):
        return {"method": "exists"}
    observe.SIGNED_BYTES.inc(body.size)
    return s.blobs.upload_plan(entity, md5, body.size, body.part_md5s)


@serve(router, TransferCalls.complete_upload)
def complete_upload(entity: str, md5: str, body: CompleteBody, p: Principal = Depends(principal),
                    s: Server = Depends(get_server)) -> Response:
    """Verify an uploaded blob against its md5 and register it, so versions may reference it."""
    _blob_key(p, entity, md5, write=True)
    s.blobs.complete(entity, md5, body.size, body.upload, body.etags)
    return Response(status_code=204)


@serve(router, TransferCalls.completed_uploads)
def completed_uploads(entity: str, body: CompletedBody, p: Principal = Depends(principal),
                      s: Server = Depends(get_server)) -> dict[str, Any]:
    """``/complete`` for many single-PUT uploads at once, registered in one transaction.

    With S3 the ETag each PUT answered is relayed by the writer: when it is the md5 (S3's
    ETag of a plain PUT is the md5 of the bytes it stored) no HEAD is sent; otherwise the
    object is checked as ``/complete`` checks it.  Answers the blobs that failed their
    check (deleted, to upload again) with the reason."""
    p.require(entity, write=True)
    _one_batch(body.blobs, f"complete at most {PLAN_BATCH} uploads per call")
    for b in body.blobs:
        _blob_key(p, entity, b.md5, write=True)
    reg = s.registry
    pending = reg.missing_blobs(entity, [b.md5 for b in body.blobs])
    good: list[tuple[str, str, int]] = []
    failed: dict[str, str] = {}
    for b in body.blobs:
        if b.md5 not in pending:
            continue
        reason = s.blobs.check_completed(entity, b.md5, b.size, b.etag)
        if reason is not None:
            failed[b.md5] = reason
            continue
        good.append((entity, b.md5, b.size))
    if good:
        reg.register_blobs(good)
    return {"failed": failed}


@serve(router, JsonCalls.blockmaps)
def blockmaps(entity: str, body: MissingBody, p: Principal = Depends(principal),
              s: Server = Depends(get_server)) -> dict[str, Any]:
    """Block maps (client/blockmap.py, base64) of these blobs; blobs without one are left out."""
    p.require(entity)
    _one_batch(body.md5s, f"ask for at most {PLAN_BATCH} block maps per call")
    return blockmaps_to_json(s.registry.blockmaps(entity, body.md5s))


@serve(router, TransferCalls.download_url)
def download_url(entity: str, md5: str, p: Principal = Depends(principal),
                 s: Server = Depends(get_server)) -> dict[str, Any]:
    """A short-lived URL for the blob (send Range on it); its size where that is free to know
    (local directory; with S3 the ranged GET's Content-Range tells it, no HEAD here)."""
    _blob_key(p, entity, md5)
    if s.registry.missing_blobs(entity, [md5]):
        raise NotFoundError(f"blob {md5} not found in {entity}")
    size = s.blobs.download_size(entity, md5)  # first: a missing blob file signs no URL
    return {"url": s.blobs.download_url(entity, md5), "expires_in": s.blobs.get_ttl, "size": size}


@serve(router, TransferCalls.download_urls)
def download_urls(entity: str, body: MissingBody, p: Principal = Depends(principal),
                  s: Server = Depends(get_server)) -> dict[str, Any]:
    """Download URLs for many blobs at once (unknown ones are left out)."""
    p.require(entity)
    _one_batch(body.md5s, f"ask for at most {PLAN_BATCH} URLs per call")
    present = set(body.md5s) - s.registry.missing_blobs(entity, body.md5s)
    return {"urls": {m: s.blobs.download_url(entity, m) for m in sorted(present)}, "expires_in": s.blobs.get_ttl}


# -- blob bytes through the server (local-directory backend only) -------------------------------
def _check_signed(s: Server, op: str, entity: str, md5: str, expires: int, sig: str) -> LocalBlobBackend:
    s.auth.check_signature(op, entity, md5, expires, sig)
    return s.blobs.directory()


@serve(router, TransferCalls.get_blob_bytes)
def get_blob_bytes(entity: str, md5: str, expires: int = Query(...), sig: str = Query(...),
                   op: str = Query("get"), s: Server = Depends(get_server)) -> FileResponse:
    """The blob's bytes with Range support (HTTP 206), for a URL from ``/url``."""
    backend = _check_signed(s, "get", entity, md5, expires, sig)
    path = backend.path(entity, md5)
    if not path.is_file():
        raise NotFoundError(f"blob {md5} not found in {entity}")
    return FileResponse(path, media_type="application/octet-stream")


@serve(router, TransferCalls.put_blob_bytes, anyio_thread=True)  # _BodyReader: anyio.from_thread
def put_blob_bytes(entity: str, md5: str, request: Request, expires: int = Query(...), sig: str = Query(...),
                   op: str = Query("put"), s: Server = Depends(get_server)) -> Response:
    """Upload for a URL from ``/uploads``: streamed to disk, hashed, refused unless it matches."""
    backend = _check_signed(s, "put", entity, md5, expires, sig)
    validate_entity(entity)
    hasher = BlockHasher()
    size = backend.put_stream(entity, md5, _BodyReader(request), hasher)
    s.registrar.register(entity, md5, size)
    if wants_map(size):
        s.registry.register_blockmap(entity, md5, hasher.result())
    return Response(status_code=204)


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
