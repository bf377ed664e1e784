"""Runs and lineage: which run logged and which used a version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field

from client.store.wire import JsonCalls, record_to_json

from .. import observe
from ..auth import Principal
from ..context import Server, get_server, principal, readable
from . import serve

router = APIRouter()


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


class FinishBody(BaseModel):
    state: str = "finished"


class UseBody(BaseModel):
    version_id: str
    use_as: str | None = None


@serve(router, JsonCalls.runs_using)
def runs_using(version_id: str, p: Principal = Depends(principal), s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    s.version_for(p, version_id)
    return [record_to_json(r) for r in s.registry.runs_using(version_id) if p.role_in(r.entity)]


@serve(router, JsonCalls.create_run)
def create_run(entity: str, project: str, body: RunBody, p: Principal = Depends(principal),
               s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity, write=True)
    return record_to_json(s.registry.create_run(entity, project, body.run_id, name=body.name,
                                                job_type=body.job_type, config=body.config))


@serve(router, JsonCalls.list_runs)
def list_runs(entity: str, project: str, p: Principal = Depends(principal),
              s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity)
    return [record_to_json(r) for r in s.registry.list_runs(entity, project)]


@serve(router, JsonCalls.get_run)
def get_run(entity: str, project: str, run_id: str, p: Principal = Depends(principal),
            s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity)
    return record_to_json(s.registry.get_run(entity, project, run_id))


@serve(router, JsonCalls.delete_run)
def delete_run(entity: str, project: str, run_id: str, delete_artifacts: bool = False,
               p: Principal = Depends(principal), s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity, write=True)
    gone = s.registry.delete_run(entity, project, run_id, delete_artifacts)
    observe.audit("delete_run", user=p.user, entity=entity, project=project, run_id=run_id,
                  deleted_versions=[v.qualified_name for v in gone])
    return [record_to_json(v) for v in gone]


@serve(router, JsonCalls.update_run)
def update_run(entity: str, project: str, run_id: str, body: RunUpdateBody, p: Principal = Depends(principal),
               s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity, write=True)
    return record_to_json(s.registry.update_run(entity, project, run_id, summary=body.summary, tags=body.tags,
                                                config=body.config, name=body.name))


@serve(router, JsonCalls.put_run_file)
def put_run_file(entity: str, project: str, run_id: str, body: RunFileBody, p: Principal = Depends(principal),
                 s: Server = Depends(get_server)) -> dict[str, Any]:
    p.require(entity, write=True)
    return record_to_json(s.registry.put_run_file(entity, project, run_id, body.name, body.md5, body.size))


@serve(router, JsonCalls.list_run_files)
def list_run_files(entity: str, project: str, run_id: str, p: Principal = Depends(principal),
                   s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity)
    return [record_to_json(f) for f in s.registry.list_run_files(entity, project, run_id)]


@serve(router, JsonCalls.finish_run)
def finish_run(entity: str, project: str, run_id: str, body: FinishBody, p: Principal = Depends(principal),
               s: Server = Depends(get_server)) -> Response:
    p.require(entity, write=True)
    s.registry.finish_run(entity, project, run_id, body.state)
    return Response(status_code=204)


@serve(router, JsonCalls.record_use)
def record_use(entity: str, project: str, run_id: str, body: UseBody, p: Principal = Depends(principal),
               s: Server = Depends(get_server)) -> Response:
    p.require(entity, write=True)
    s.version_for(p, body.version_id)  # using an artifact needs read access to it
    s.registry.record_use(entity, project, run_id, body.version_id, body.use_as)
    return Response(status_code=204)


@serve(router, JsonCalls.versions_logged_by)
def versions_logged_by(entity: str, project: str, run_id: str, p: Principal = Depends(principal),
                       s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity)
    return readable(p, s.registry.versions_logged_by(entity, project, run_id))


@serve(router, JsonCalls.versions_used_by)
def versions_used_by(entity: str, project: str, run_id: str, p: Principal = Depends(principal),
                     s: Server = Depends(get_server)) -> list[dict[str, Any]]:
    p.require(entity)
    return readable(p, s.registry.versions_used_by(entity, project, run_id))
