"""The registry's HTTP API, described once: every call's route, its arguments and its codec.

Each entry of the table below says, for one API call, its HTTP method and path (``{name}``
segments are arguments of the same name), which arguments travel in the query string, how the
JSON body is made from the arguments, how the JSON answer becomes the result, whether a
repeat is harmless (``idempotent``: the client's retry policy may send it again) and the
status of a success.  From that one entry follow:

* the client side: :class:`JsonCalls` is a base class of :class:`~client.store.http.HttpStore`,
  and each :class:`StoreCall` attribute *is* that store's method (a descriptor binding the
  arguments to the :class:`~client.store.base.Store` method's signature, typed by it, and
  sending the request);
* the server side: ``server/routes/`` registers each route with the method, path, status and
  tag (``area``) of its entry (``serve(router, JsonCalls.resolve)``); the handler there adds
  what only the server does (authorization, audit, metrics);
* the embedded store: :class:`~client.store.local.LocalStore` *is* a
  :class:`~client.registry.core.RegistryCore`, so the same calls reach the core with no layer
  in between.

``tests/test_api_table.py`` checks that every entry is served by exactly one route, that no
route exists outside the table, and that both stores implement every store call.

The record codec (records <-> JSON) lives here too: it is the other half of the wire format.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import inspect
import re
from typing import Any, Callable, Concatenate, Generic, Mapping, ParamSpec, Protocol, TypeVar, overload
from urllib.parse import quote, urlencode

from ..blockmap import BlockMap
from ..names import TtlSentinel, validate_run_dict
from .base import CollectionRecord, RunFileRecord, RunRecord, Store, VersionRecord

P = ParamSpec("P")
R = TypeVar("R")

API = "/api/v1"


# -- the record codec ---------------------------------------------------------------------------
def record_to_json(record: Any) -> dict[str, Any]:
    """A Version/Collection/Run record as JSON-safe data (datetimes as ISO 8601).

    Shallow: nested values (metadata, config) are shared with the record, not deep-copied as
    ``dataclasses.asdict`` would (that copy was most of the server's CPU for a project listing);
    the result is for serialising, not for changing."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        v = getattr(record, f.name)
        if isinstance(v, _dt.datetime):
            v = v.isoformat()
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _dt_from(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text)


def version_from_json(d: dict[str, Any]) -> VersionRecord:
    d = dict(d)
    d["created_at"], d["updated_at"] = _dt_from(d["created_at"]), _dt_from(d["updated_at"])
    d["aliases"], d["tags"] = tuple(d["aliases"]), tuple(d["tags"])
    return VersionRecord(**d)


def collection_from_json(d: dict[str, Any]) -> CollectionRecord:
    d = dict(d)
    d["created_at"] = _dt_from(d["created_at"])
    d["tags"] = tuple(d["tags"])
    return CollectionRecord(**d)


def run_from_json(d: dict[str, Any]) -> RunRecord:
    d = dict(d)
    d["created_at"] = _dt_from(d["created_at"])
    d["tags"] = tuple(d.get("tags") or ())
    return RunRecord(**d)


def run_file_from_json(d: dict[str, Any]) -> RunFileRecord:
    return RunFileRecord(**{**d, "updated_at": _dt_from(d["updated_at"])})


def blockmaps_to_json(maps: Mapping[str, BlockMap]) -> dict[str, Any]:
    return {"maps": {m: base64.b64encode(bm.to_bytes()).decode() for m, bm in sorted(maps.items())}}


def blockmaps_from_json(out: dict[str, Any]) -> dict[str, BlockMap]:
    return {m: BlockMap.from_bytes(base64.b64decode(raw)) for m, raw in out["maps"].items()}


def _versions(out: list[dict[str, Any]]) -> list[VersionRecord]:
    return [version_from_json(d) for d in out]


def _collections(out: list[dict[str, Any]]) -> list[CollectionRecord]:
    return [collection_from_json(d) for d in out]


def _runs(out: list[dict[str, Any]]) -> list[RunRecord]:
    return [run_from_json(d) for d in out]


def _listing(out: dict[str, Any]) -> tuple[list[CollectionRecord], list[VersionRecord]]:
    return _collections(out["collections"]), _versions(out["versions"])


def _committed(out: dict[str, Any]) -> tuple[VersionRecord, bool]:
    return version_from_json(out["version"]), bool(out["created"])


def _as_is(out: Any) -> Any:
    return out


def _listed(values: Any) -> list[Any] | None:
    return None if values is None else list(values)


# -- one call -----------------------------------------------------------------------------------
_SEGMENT = re.compile(r"{(\w+)}")


class Call:
    """One route of the API: what the server serves and (for a :class:`StoreCall`) the client sends."""

    name: str

    def __init__(self, method: str, path: str, area: str, *, status: int = 200,
                 query: tuple[str, ...] = (), body: Callable[[dict[str, Any]], Any] | None = None,
                 decode: Callable[[Any], Any] = _as_is, idempotent: bool | Callable[[dict[str, Any]], bool] = True,
                 conditional: bool = False) -> None:
        """``body(args)``: the JSON body from the call's arguments (None: no body);
        ``idempotent``: a bool or ``f(args)`` (whether a repeat could do something twice);
        ``conditional``: a GET answered with an ETag, which the client keeps with the answer
        and sends back (``If-None-Match``): ``304 Not Modified`` means the kept answer holds."""
        self.name = ""  # the attribute's name in the table (__set_name__)
        self.method, self.path, self.area, self.status = method, path, area, status
        self.query, self.body, self.decode, self._idempotent = query, body, decode, idempotent
        self.conditional = conditional
        self.path_args = tuple(_SEGMENT.findall(path))

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.method} {self.path}>"

    def idempotent(self, args: dict[str, Any]) -> bool:
        return self._idempotent(args) if callable(self._idempotent) else self._idempotent

    def request(self, args: dict[str, Any]) -> tuple[str, Any]:
        """(path with query string, JSON body or None) for these arguments."""
        path = self.path.format(**{k: quote(str(args[k]), safe="") for k in self.path_args})
        params = {k: _query_value(args[k]) for k in self.query if args.get(k) is not None}
        if params:
            path += "?" + urlencode(params)
        return path, None if self.body is None else self.body(args)


def _query_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class CallSender(Protocol):
    """What a :class:`StoreCall` sends itself through (the HTTP store)."""

    def send_call(self, call: Call, args: dict[str, Any]) -> Any: ...


class StoreCall(Call, Generic[P, R]):
    """A call that is a method of the HTTP store, with the signature of ``signature`` (a
    :class:`~client.store.base.Store` method: its parameters, defaults and result type)."""

    def __init__(self, signature: Callable[Concatenate[Any, P], R], method: str, path: str, area: str,
                 **kwargs: Any) -> None:
        super().__init__(method, path, area, **kwargs)
        self.signature = inspect.signature(signature)
        #: what the bound method shows (``help()``, ``inspect.signature``): the protocol's, without self
        self._method_signature = self.signature.replace(parameters=list(self.signature.parameters.values())[1:])
        self.__doc__ = signature.__doc__

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments by name, defaults filled in (a TypeError for a wrong call, as Python's)."""
        bound = self.signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        out = dict(bound.arguments)
        out.pop(next(iter(self.signature.parameters)))
        return out

    @overload
    def __get__(self, obj: None, owner: type) -> StoreCall[P, R]: ...
    @overload
    def __get__(self, obj: CallSender, owner: type) -> Callable[P, R]: ...

    def __get__(self, obj: CallSender | None, owner: type) -> StoreCall[P, R] | Callable[P, R]:
        if obj is None:
            return self

        def method(*args: P.args, **kwargs: P.kwargs) -> R:
            return obj.send_call(self, self.bind(args, kwargs))

        method.__name__ = method.__qualname__ = self.name
        method.__doc__ = self.__doc__
        method.__signature__ = self._method_signature  # type: ignore[attr-defined]
        return method


def _whoami(store: Any) -> dict[str, Any]:  # (not on Store: the embedded store has no users)
    """The signature of ``HttpStore.whoami`` (the key's user, default entity and teams)."""
    raise NotImplementedError


_ENTITY = f"{API}/entities/{{entity}}"
_PROJECT = f"{_ENTITY}/projects/{{project}}"
_COLLECTION = f"{_PROJECT}/collections/{{collection}}"
_VERSION = f"{API}/versions/{{version_id}}"
_RUN = f"{_PROJECT}/runs/{{run_id}}"
_BLOB = f"{_ENTITY}/blobs/{{md5}}"


def _commit_body(a: dict[str, Any]) -> dict[str, Any]:
    req = a["req"]
    body = dataclasses.asdict(req)
    body["aliases"], body["tags"] = list(req.aliases), list(req.tags)
    return body


def _update_version_body(a: dict[str, Any]) -> dict[str, Any]:
    body = {"aliases": _listed(a["aliases"]), "tags": _listed(a["tags"]), "metadata": a["metadata"],
            "description": a["description"]}
    if a["ttl_seconds"] != TtlSentinel.KEEP:  # an absent field leaves the TTL as it is
        body["ttl_seconds"] = a["ttl_seconds"]
    return body


def _update_run_body(a: dict[str, Any]) -> dict[str, Any]:
    # NaN/Infinity become text before sending: JSON on the wire cannot hold them
    return {"summary": None if a["summary"] is None else validate_run_dict("summary", a["summary"]),
            "tags": _listed(a["tags"]),
            "config": None if a["config"] is None else validate_run_dict("config", a["config"]), "name": a["name"]}


# -- the table ----------------------------------------------------------------------------------
class JsonCalls:
    """The JSON calls of the API.  A base class of HttpStore: each attribute is its method."""

    # meta
    whoami = StoreCall(_whoami, "GET", f"{API}/whoami", "meta")

    # namespace
    list_entities = StoreCall(Store.list_entities, "GET", f"{API}/entities", "namespace")
    create_project = StoreCall(Store.create_project, "PUT", _PROJECT, "namespace", status=204)
    list_projects = StoreCall(Store.list_projects, "GET", f"{_ENTITY}/projects", "namespace")
    list_collections = StoreCall(Store.list_collections, "GET", f"{_PROJECT}/collections", "namespace",
                                 query=("type",), decode=_collections)
    list_project = StoreCall(Store.list_project, "GET", f"{_PROJECT}/listing", "namespace", decode=_listing,
                             conditional=True)
    list_types = StoreCall(Store.list_types, "GET", f"{_PROJECT}/types", "namespace")
    get_collection = StoreCall(Store.get_collection, "GET", _COLLECTION, "namespace", decode=collection_from_json)
    update_collection = StoreCall(
        Store.update_collection, "PATCH", _COLLECTION, "namespace", decode=collection_from_json,
        body=lambda a: {"name": a["name"], "description": a["description"], "tags": _listed(a["tags"]),
                        "type": a["type"]},
        # A rename cannot be repeated (the old name is gone); the other fields are replaced.
        idempotent=lambda a: a["name"] is None or a["name"] == a["collection"])
    delete_collection = StoreCall(Store.delete_collection, "DELETE", _COLLECTION, "namespace", status=204,
                                  idempotent=False)

    # versions
    list_versions = StoreCall(Store.list_versions, "GET", f"{_COLLECTION}/versions", "versions", decode=_versions)
    resolve = StoreCall(Store.resolve, "GET", f"{_COLLECTION}/resolve/{{selector}}", "versions",
                        decode=version_from_json)
    get_version = StoreCall(Store.get_version, "GET", _VERSION, "versions", decode=version_from_json)
    commit = StoreCall(Store.commit, "POST", f"{API}/commit", "versions", body=_commit_body, decode=_committed,
                       idempotent=False)
    # Replacing fields with the same values twice gives the same result: idempotent.
    update_version = StoreCall(Store.update_version, "PATCH", _VERSION, "versions", body=_update_version_body,
                               decode=version_from_json)
    delete_version = StoreCall(Store.delete_version, "DELETE", _VERSION, "versions", status=204,
                               query=("delete_aliases",), idempotent=False)
    # Linking the same source twice only adds aliases: idempotent.
    link_version = StoreCall(Store.link_version, "POST", f"{_VERSION}/link", "versions", decode=version_from_json,
                             body=lambda a: {"entity": a["entity"], "project": a["project"],
                                             "collection": a["collection"], "aliases": list(a["aliases"])})
    unlink_version = StoreCall(Store.unlink_version, "POST", f"{_VERSION}/unlink", "versions", status=204,
                               body=lambda a: {}, idempotent=False)
    set_entity_default_ttl = StoreCall(Store.set_entity_default_ttl, "PUT", f"{_ENTITY}/default-ttl", "versions",
                                       status=204, body=lambda a: {"ttl_seconds": a["ttl_seconds"]})
    get_entity_default_ttl = StoreCall(Store.get_entity_default_ttl, "GET", f"{_ENTITY}/default-ttl", "versions",
                                       decode=lambda out: out["ttl_seconds"])
    gc_expired = StoreCall(Store.gc_expired, "POST", f"{API}/gc", "versions", body=lambda a: {}, decode=_versions,
                           idempotent=False)

    # runs and lineage
    runs_using = StoreCall(Store.runs_using, "GET", f"{_VERSION}/runs", "lineage", decode=_runs)
    create_run = StoreCall(Store.create_run, "POST", f"{_PROJECT}/runs", "lineage", decode=run_from_json,
                           body=lambda a: {"run_id": a["run_id"], "name": a["name"], "job_type": a["job_type"],
                                           "config": a["config"] or {}},
                           idempotent=lambda a: a["run_id"] is not None)  # a new id each time otherwise
    list_runs = StoreCall(Store.list_runs, "GET", f"{_PROJECT}/runs", "lineage", decode=_runs)
    get_run = StoreCall(Store.get_run, "GET", _RUN, "lineage", decode=run_from_json)
    # Repeating it finishes an interrupted deletion (see the core): idempotent.
    delete_run = StoreCall(Store.delete_run, "DELETE", _RUN, "lineage", query=("delete_artifacts",),
                           decode=_versions)
    update_run = StoreCall(Store.update_run, "PATCH", _RUN, "lineage", body=_update_run_body, decode=run_from_json)
    put_run_file = StoreCall(Store.put_run_file, "POST", f"{_RUN}/files", "lineage", decode=run_file_from_json,
                             body=lambda a: {"name": a["name"], "md5": a["md5_hex"], "size": a["size"]})
    list_run_files = StoreCall(Store.list_run_files, "GET", f"{_RUN}/files", "lineage",
                               decode=lambda out: [run_file_from_json(d) for d in out])
    finish_run = StoreCall(Store.finish_run, "POST", f"{_RUN}/finish", "lineage", status=204,
                           body=lambda a: {"state": a["state"]})
    record_use = StoreCall(Store.record_use, "POST", f"{_RUN}/use", "lineage", status=204,
                           body=lambda a: {"version_id": a["version_id"], "use_as": a["use_as"]})
    versions_logged_by = StoreCall(Store.versions_logged_by, "GET", f"{_RUN}/logged", "lineage", decode=_versions)
    versions_used_by = StoreCall(Store.versions_used_by, "GET", f"{_RUN}/used", "lineage", decode=_versions)

    # blobs: the store's methods send these in batches (HttpStore.missing_blobs, .blockmaps)
    missing_blobs = StoreCall(Store.missing_blobs, "POST", f"{_ENTITY}/blobs/missing", "blobs",
                              body=lambda a: {"md5s": list(a["md5_hexes"]), "plan": True})
    blockmaps = StoreCall(Store.blockmaps, "POST", f"{_ENTITY}/blobs/blockmaps", "blobs",
                          body=lambda a: {"md5s": list(a["md5_hexes"])}, decode=blockmaps_from_json)


class TransferCalls:
    """Routes the HTTP store's blob-transfer code uses (upload plans, signed URLs), and the
    byte routes those URLs point at; no Store method of their own."""

    plan_upload = Call("POST", f"{_BLOB}/uploads", "blobs")
    complete_upload = Call("POST", f"{_BLOB}/complete", "blobs", status=204)
    completed_uploads = Call("POST", f"{_ENTITY}/blobs/completed", "blobs")  # many single PUTs at once
    download_url = Call("GET", f"{_BLOB}/url", "blobs")
    download_urls = Call("POST", f"{_ENTITY}/blobs/urls", "blobs")
    get_blob_bytes = Call("GET", "/blobdata/{entity}/{md5}", "blobs")
    put_blob_bytes = Call("PUT", "/blobdata/{entity}/{md5}", "blobs", status=204)


class OperatorCalls:
    """Routes for operators and load balancers, outside the versioned API."""

    healthz = Call("GET", "/healthz", "meta")
    readyz = Call("GET", "/readyz", "meta")
    metrics = Call("GET", "/metrics", "meta")


def _calls(*owners: type) -> tuple[Call, ...]:
    return tuple(v for owner in owners for v in vars(owner).values() if isinstance(v, Call))


#: every route of the server, each once
CALLS: tuple[Call, ...] = _calls(JsonCalls, TransferCalls, OperatorCalls)
#: the calls that are Store methods (both stores implement each)
STORE_CALLS: tuple[StoreCall[Any, Any], ...] = tuple(c for c in CALLS if isinstance(c, StoreCall) and c.name != "whoami")
