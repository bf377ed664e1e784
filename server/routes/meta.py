"""Health, readiness, metrics and the caller's identity."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from client.store.wire import JsonCalls, OperatorCalls

from .. import observe
from ..auth import Principal
from ..context import Server, get_server, principal
from . import serve

log = logging.getLogger(__name__)
router = APIRouter()


@serve(router, OperatorCalls.healthz)
async def healthz() -> dict[str, str]:
    """The process is alive and serving (touches nothing else: see /readyz)."""
    return {"status": "ok"}


@serve(router, OperatorCalls.readyz)
def readyz(s: Server = Depends(get_server)) -> JSONResponse:
    """Ready for traffic: the database answers a query and the blob backend is reachable."""
    checks = {"database": observe.check_database(s.registry.engine), "blobs": observe.check_blobs(s.blobs.check)}
    ok = all(v is None for v in checks.values())
    if not ok:
        log.warning("not ready: %s", {k: v for k, v in checks.items() if v})
    return JSONResponse({"status": "ready" if ok else "unavailable",
                         **{k: v or "ok" for k, v in checks.items()}}, status_code=200 if ok else 503)


@serve(router, OperatorCalls.metrics)
def metrics() -> Response:
    """Prometheus metrics (text exposition format)."""
    body, content_type = observe.metrics_text()
    return Response(body, media_type=content_type)


@serve(router, JsonCalls.whoami)
def whoami(p: Principal = Depends(principal)) -> dict[str, Any]:
    return {"user": p.user, "key_id": p.key_id, "default_entity": p.default_entity,
            "teams": [{"name": t, "role": r} for t, r in p.roles]}
