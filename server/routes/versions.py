"""Versions: resolve, commit, update, delete, link; TTL defaults and their sweep."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field

from client.names import TtlSentinel
from client.store.base import CommitRequest
from client.store.wire import JsonCalls, record_to_json

from .. import observe
from ..auth import Principal
from ..context import Server, get_server, principal, readable
from . import serve

router = APIRouter()


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


# -- routes ---------------------------------------------------------------------------------------
@serve(router, JsonCalls.list_versions)
def list_versions(entity: str, project: str, collection: str, p: Principal = Depends(principal),
                  s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity)
    return [record_to_json(v) for v in s.registry.list_versions(entity, project, collection)]


@serve(router, JsonCalls.resolve)
def resolve(entity: str, project: str, collection: str, selector: str, p: Principal = Depends(principal),
            s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity)
    return record_to_json(s.registry.resolve(entity, project, collection, selector))


@serve(router, JsonCalls.get_version)
def get_version(version_id: str, p: Principal = Depends(principal), s: Server = Depends(get_server)) -> dict[str, Any]:
    return record_to_json(s.version_for(p, version_id))


@serve(router, JsonCalls.commit)
def commit(body: CommitBody, p: Principal = Depends(principal), s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(body.entity, write=True)
    req = CommitRequest(**{**body.model_dump(), "aliases": tuple(body.aliases), "tags": tuple(body.tags)})
    version, created = s.registry.commit(req)
    observe.COMMITS.labels(str(created).lower()).inc()
    observe.audit("commit", user=p.user, entity=body.entity, version=version.qualified_name, id=version.id,
                  created=created, manifest_md5=body.manifest_md5)
    return {"version": record_to_json(version), "created": created}


@serve(router, JsonCalls.update_version)
def update_version(version_id: str, body: UpdateBody, p: Principal = Depends(principal),
                   s: Server = Depends(get_server)) -> dict[str, Any]:
    s.version_for(p, version_id, write=True)
    ttl: Any = body.ttl_seconds if "ttl_seconds" in body.model_fields_set else TtlSentinel.KEEP
    return record_to_json(s.registry.update_version(version_id, aliases=body.aliases, tags=body.tags,
                                                    metadata=body.metadata, description=body.description,
                                                    ttl_seconds=ttl))


@serve(router, JsonCalls.delete_version)
def delete_version(version_id: str, delete_aliases: bool = False, p: Principal = Depends(principal),
                   s: Server = Depends(get_server)) -> Response:
    rec = s.version_for(p, version_id, write=True)
    s.registry.delete_version(version_id, delete_aliases)
    observe.audit("delete_version", user=p.user, entity=rec.entity, version=rec.qualified_name, id=version_id,
                  delete_aliases=delete_aliases)
    return Response(status_code=204)


@serve(router, JsonCalls.link_version)
def link_version(version_id: str, body: LinkBody, p: Principal = Depends(principal),
                 s: Server = Depends(get_server)) -> dict[str, Any]:
    s.version_for(p, version_id)
    p.require(body.entity, write=True)
    return record_to_json(s.registry.link_version(version_id, body.entity, body.project, body.collection,
                                                  body.aliases))


@serve(router, JsonCalls.unlink_version)
def unlink_version(version_id: str, p: Principal = Depends(principal), s: Server = Depends(get_server)) -> Response:
    rec = s.version_for(p, version_id, write=True)
    s.registry.unlink_version(version_id)
    observe.audit("unlink_version", user=p.user, entity=rec.entity, version=rec.qualified_name, id=version_id)
    return Response(status_code=204)


@serve(router, JsonCalls.set_entity_default_ttl)
def set_entity_default_ttl(entity: str, body: TTLBody, p: Principal = Depends(principal),
                           s: Server = Depends(get_server)) -> Response:
    p.require(entity, write=True)
    s.registry.set_entity_default_ttl(entity, body.ttl_seconds)
    return Response(status_code=204)


@serve(router, JsonCalls.get_entity_default_ttl)
def get_entity_default_ttl(entity: str, p: Principal = Depends(principal),
                           s: Server = Depends(get_server)) -> dict[str, float | None]:
    p.require(entity)
    return {"ttl_seconds": s.registry.get_entity_default_ttl(entity)}


@serve(router, JsonCalls.gc_expired)
def gc_expired(p: Principal = Depends(principal), s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    """Delete versions whose TTL ran out (any caller may trigger it: they are expired anyway)."""
    gone = s.registry.gc_expired()
    if gone:
        observe.audit("gc_expired", user=p.user, deleted_versions=[v.qualified_name for v in gone])
    return readable(p, gone)
