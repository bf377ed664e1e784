"""The API is described once (client/store/wire.py): each call of the table is served by exactly
one route of the server, in the router of its area, no route exists outside the table, and both
stores implement every store call with the Store protocol's signature."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from client.names import TtlSentinel
from client.store.base import Store
from client.store.http import HttpStore
from client.store.local import LocalStore
from client.store.wire import CALLS, STORE_CALLS, Call, JsonCalls

#: Store methods that move blob bytes (client/transfer.py and the stores' transfer code), not
#: JSON calls of the table
TRANSFER_METHODS = {"put_blob", "read_blob", "download_blob", "stream_blob", "close"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from server.app import Server, create_app

    root = tmp_path_factory.mktemp("server")
    server = Server(f"sqlite:///{root / 'registry.db'}", str(root / "blobs"))
    yield create_app(server)
    server.close()


def api_routes(routes: list[Any]) -> list[APIRoute]:
    """The app's API routes, those of included routers too (FastAPI's own /openapi.json and /docs
    are plain starlette routes)."""
    out: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif hasattr(route, "original_router"):  # an included router (FastAPI >= 0.16x keeps it whole)
            out += api_routes(route.original_router.routes)
    return out


def table_mismatches(app: FastAPI) -> list[str]:
    """What differs between the app's routes and the table (empty: one route per call, as described)."""
    calls = {(c.method, c.path): c for c in CALLS}
    problems = []
    seen: set[tuple[str, str]] = set()
    for route in api_routes(app.routes):
        for method in sorted(route.methods):
            key = (method, route.path)
            call = calls.get(key)
            if call is None:
                problems.append(f"route {method} {route.path} is not in the API table")
                continue
            if key in seen:
                problems.append(f"{call.name} is served twice")
            seen.add(key)
            if (route.name, route.tags, route.status_code) != (call.name, [call.area], call.status):
                problems.append(f"{call.name}: route {route.name} {route.tags} {route.status_code} "
                                f"!= table {call.area} {call.status}")
            if route.endpoint.__module__ != f"server.routes.{call.area}":
                problems.append(f"{call.name} is served from {route.endpoint.__module__}, not its area's router")
    problems += [f"{c.name} ({c.method} {c.path}) has no route" for key, c in calls.items() if key not in seen]
    return problems


def test_every_call_is_served_by_exactly_one_route(app: FastAPI) -> None:
    assert len({(c.method, c.path) for c in CALLS}) == len(CALLS) == len({c.name for c in CALLS})
    assert table_mismatches(app) == []


def test_a_route_outside_the_table_is_found(tmp_path: Path) -> None:
    """The check above is not vacuous: an extra route, a missing one and a doubled one are seen."""
    from server.app import Server, create_app

    server = Server(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    try:
        app = create_app(server)
        app.add_api_route("/api/v1/extra", lambda: {}, methods=["GET"], name="extra")
        from server.routes import namespace, versions

        app.router.routes.remove(next(r for r in app.router.routes if getattr(r, "name", None) == "list_types"))
        app.router.routes.append(next(r for r in api_routes(versions.router.routes) if r.name == "resolve"))
        assert any(r.name == "list_types" for r in namespace.router.routes)  # the area's own router is left as it was
        assert sorted(table_mismatches(app)) == sorted([
            "route GET /api/v1/extra is not in the API table",
            "resolve is served twice",
            f"list_types (GET {JsonCalls.list_types.path}) has no route",
        ])
    finally:
        server.close()


def test_every_metadata_method_of_the_store_protocol_is_in_the_table() -> None:
    protocol = {name for name, v in vars(Store).items() if inspect.isfunction(v) and not name.startswith("_")}
    assert protocol - TRANSFER_METHODS == {c.name for c in STORE_CALLS}


@pytest.mark.parametrize("call", STORE_CALLS, ids=lambda c: c.name)
def test_both_stores_implement_the_call_with_the_protocols_signature(call: Call, tmp_path: Path) -> None:
    want = inspect.signature(getattr(Store, call.name))
    params = list(want.parameters.values())[1:]  # without self
    http = HttpStore("http://127.0.0.1:9")  # never contacted
    local = LocalStore(tmp_path / "store")
    try:
        for store in (http, local):
            got = inspect.signature(getattr(store, call.name))
            if store is http:
                # the table's method is bound from the protocol's signature itself
                assert getattr(type(store), call.name) in (call, vars(HttpStore).get(call.name))
            assert [(p.name, p.kind, p.default) for p in got.parameters.values()][:len(params)] == \
                [(p.name, p.kind, p.default) for p in params], (store, call.name)
        # the embedded store calls the core itself: no method of its own between them
        from client.registry import RegistryCore

        owner = next(c for c in type(local).__mro__ if call.name in vars(c))
        assert owner is RegistryCore or call.name in {"missing_blobs"}, (call.name, owner)
    finally:
        local.close()
        http.close()


def test_ttl_sentinels_are_their_wire_strings() -> None:
    """``keep`` leaves the TTL field out of an update; ``inherit`` travels as the string."""
    args = {"version_id": "v1", "aliases": None, "tags": None, "metadata": None, "description": None}
    _, keep = JsonCalls.update_version.request({**args, "ttl_seconds": TtlSentinel.KEEP})
    assert "ttl_seconds" not in keep
    _, inherit = JsonCalls.update_version.request({**args, "ttl_seconds": TtlSentinel.INHERIT})
    assert json.dumps(inherit["ttl_seconds"]) == '"inherit"' and TtlSentinel("inherit") is TtlSentinel.INHERIT
    path, _ = JsonCalls.update_version.request({**args, "version_id": "a/b", "ttl_seconds": 5.0})
    assert path == "/api/v1/versions/a%2Fb"


def test_a_call_binds_its_arguments_as_the_protocol_method_does() -> None:
    args = JsonCalls.delete_version.bind(("vid",), {})
    assert args == {"version_id": "vid", "delete_aliases": False}
    assert JsonCalls.delete_version.request(args) == ("/api/v1/versions/vid?delete_aliases=false", None)
    assert JsonCalls.list_collections.request({"entity": "e", "project": "p", "type": None})[0] == \
        "/api/v1/entities/e/projects/p/collections"
    with pytest.raises(TypeError):
        JsonCalls.resolve.bind(("e", "p"), {})
