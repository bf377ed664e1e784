"""Entities, projects and collections."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from client.errors import NotFoundError
from client.store.wire import JsonCalls, record_to_json

from .. import observe
from ..auth import Principal
from ..context import Server, get_server, principal
from . import serve

router = APIRouter()


class CollectionBody(BaseModel):
    name: str | None = None
    description: str | None = None
    tags: list[str] | None = None
    type: str | None = None


@serve(router, JsonCalls.list_entities)
def list_entities(p: Principal = Depends(principal), s: Server = Depends(get_server)) -> list[str]:
    """Entities the caller is a member of that hold something (as the embedded store lists)."""
    known = set(s.registry.list_entities())
    return [t for t in p.teams if t in known]


@serve(router, JsonCalls.create_project)
def create_project(entity: str, project: str, p: Principal = Depends(principal),
                   s: Server = Depends(get_server)) -> Response:
    p.require(entity, write=True)
    s.registry.create_project(entity, project)
    return Response(status_code=204)


@serve(router, JsonCalls.list_projects)
def list_projects(entity: str, p: Principal = Depends(principal), s: Server = Depends(get_server)) -> list[str]:
    p.require(entity)
    try:
        return s.registry.list_projects(entity)
    except NotFoundError:
        return []  # a team that has logged nothing yet


@serve(router, JsonCalls.list_collections)
def list_collections(entity: str, project: str, type: str | None = None, p: Principal = Depends(principal),
                     s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity)
    return [record_to_json(c) for c in s.registry.list_collections(entity, project, type)]


@serve(router, JsonCalls.list_project)
def list_project(entity: str, project: str, request: Request, p: Principal = Depends(principal),
                 s: Server = Depends(get_server)) -> Response:
    """The project's collections (with aliases) and all their committed versions: one call
    for a mount's ``ls`` of a project, in a constant number of queries (one when nothing
    changed since this worker last listed it: server/listing.py); ``304 Not Modified`` when
    the caller's ``If-None-Match`` is the listing's ETag."""
    p.require(entity)
    listing = s.listings.listing(entity, project)
    if request.headers.get("if-none-match") == listing.etag:
        return Response(status_code=304, headers={"ETag": listing.etag})
    return Response(listing.body, media_type="application/json", headers={"ETag": listing.etag})


@serve(router, JsonCalls.list_types)
def list_types(entity: str, project: str, p: Principal = Depends(principal),
               s: Server = Depends(get_server)) -> list[str]:
    p.require(entity)
    return s.registry.list_types(entity, project)


@serve(router, JsonCalls.get_collection)
def get_collection(entity: str, project: str, collection: str, p: Principal = Depends(principal),
                   s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity)
    return record_to_json(s.registry.get_collection(entity, project, collection))


@serve(router, JsonCalls.update_collection)
def update_collection(entity: str, project: str, collection: str, body: CollectionBody,
                      p: Principal = Depends(principal), s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity, write=True)
    rec = s.registry.update_collection(entity, project, collection, name=body.name, description=body.description,
                                       tags=body.tags, type=body.type)
    observe.audit("update_collection", user=p.user, entity=entity, project=project, collection=collection,
                  changed=sorted(body.model_dump(exclude_none=True)), new_name=rec.name, type=rec.type)
    return record_to_json(rec)


@serve(router, JsonCalls.delete_collection)
def delete_collection(entity: str, project: str, collection: str, p: Principal = Depends(principal),
                      s: Server = Depends(get_server)) -> Response:
    p.require(entity, write=True)
    s.registry.delete_collection(entity, project, collection)
    observe.audit("delete_collection", user=p.user, entity=entity, project=project, collection=collection)
    return Response(status_code=204)
