"""The server's routes, one module per area of the API (``meta``, ``namespace``, ``versions``,
``lineage``, ``blobs``), each an :class:`fastapi.APIRouter`.

A route is registered with :func:`serve`, which takes its method, path, status and tag from the
call's entry in the API table (:mod:`client.store.wire`), so the server serves exactly what the
HTTP store sends; the handler holds only what the server adds (authorization, audit, metrics).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from fastapi import APIRouter

from client.store.wire import Call

F = TypeVar("F", bound=Callable[..., Any])


def serve(router: APIRouter, call: Call) -> Callable[[F], F]:
    """Register the decorated function as the handler of ``call`` (it must be named as the call)."""

    def register(handler: F) -> F:
        if handler.__name__ != call.name:
            raise ValueError(f"the handler of {call.name} is named {handler.__name__}")
        router.add_api_route(call.path, handler, methods=[call.method], status_code=call.status,
                             tags=[call.area], name=call.name)
        return handler

    return register

