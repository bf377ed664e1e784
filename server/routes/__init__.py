"""The server's routes, one module per area of the API (``meta``, ``namespace``, ``versions``,
``lineage``, ``blobs``), each an :class:`fastapi.APIRouter`.

A route is registered with :func:`serve`, which takes its method, path, status and tag from the
call's entry in the API table (:mod:`client.store.wire`), so the server serves exactly what the
HTTP store sends; the handler holds only what the server adds (authorization, audit, metrics).

A sync handler (most: they wait for the database) is served by an ``async`` endpoint that runs it
in a handler thread (:func:`server.context.run_sync`), with the handler's own signature, so
FastAPI sees the same parameters, answer type and OpenAPI description.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

from fastapi import APIRouter

from client.store.wire import Call

from ..context import run_sync

F = TypeVar("F", bound=Callable[..., Any])


def serve(router: APIRouter, call: Call, *, anyio_thread: bool = False) -> Callable[[F], F]:
    """Register the decorated function as the handler of ``call`` (it must be named as the call).

    ``anyio_thread``: a sync handler that calls back into the event loop (``anyio.from_thread``)
    runs in anyio's worker threads, as FastAPI runs any sync route, instead of a handler thread."""

    def register(handler: F) -> F:
        if handler.__name__ != call.name:
            raise ValueError(f"the handler of {call.name} is named {handler.__name__}")
        endpoint = handler if anyio_thread or inspect.iscoroutinefunction(handler) else _in_thread(handler)
        router.add_api_route(call.path, endpoint, methods=[call.method], status_code=call.status,
                             tags=[call.area], name=call.name)
        return handler

    return register


def _in_thread(handler: Callable[..., Any]) -> Callable[..., Any]:
    """An async endpoint running ``handler`` in a handler thread (``__wrapped__``: its signature)."""

    @functools.wraps(handler)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        return await run_sync(handler, *args, **kwargs)

    return endpoint

