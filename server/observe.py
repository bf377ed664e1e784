"""What an operator sees of a running server: readiness probes, Prometheus metrics, and the
access and audit logs.

* ``/healthz`` answers while the process serves requests; ``/readyz`` also touches the
  database (``SELECT 1``) and the blob backend (the bucket's HEAD, or the blob directory being
  writable) and answers 503 naming what failed, so a load balancer stops sending traffic.
* ``/metrics`` is the Prometheus text format.  With several uvicorn workers, ``artifactfs server``
  points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory so any worker's answer sums them all.
* One access-log line per request on the ``artifactfs.access`` logger and audit lines
  (refused keys, commits, deletions) on ``artifactfs.audit``, both JSON objects.  They carry
  the route *template* and the path without its query string: blob URL signatures and API
  keys never reach a log (a refused key is logged by its public id only).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Awaitable, Callable

import prometheus_client as prom
import sqlalchemy as sa
from prometheus_client import multiprocess

access_log = logging.getLogger("artifactfs.access")
audit_log = logging.getLogger("artifactfs.audit")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = prom.Counter("artifactfs_http_requests_total", "HTTP requests by route template, method and status",
                        ["route", "method", "status"])
LATENCY = prom.Histogram("artifactfs_http_request_duration_seconds", "HTTP request latency by route template",
                         ["route", "method"], buckets=_LATENCY_BUCKETS)
COMMITS = prom.Counter("artifactfs_commits_total", "commits, by whether they created a version", ["created"])
SIGNED_URLS = prom.Counter("artifactfs_signed_urls_total", "blob URLs handed out, by operation", ["op"])
SIGNED_BYTES = prom.Counter("artifactfs_signed_upload_bytes_total",
                            "bytes of blobs whose upload URLs were planned through /uploads (sizes the client declared)")
ERRORS = prom.Counter("artifactfs_errors_total", "error responses by error code", ["code"])
AUTH_REFUSED = prom.Counter("artifactfs_auth_refused_total", "requests refused for a missing or unknown API key")


def audit(event: str, **fields: Any) -> None:
    audit_log.info(json.dumps({"event": event, **fields}, sort_keys=True, default=str))


def metrics_text() -> tuple[bytes, str]:
    """The exposition text; summed over worker processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST
    return prom.generate_latest(), prom.CONTENT_TYPE_LATEST


# -- readiness ------------------------------------------------------------------------------------
def check_database(engine: sa.Engine) -> str | None:
    """None if a query goes through, else why not."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the reason is reported
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def check_blobs(check: Callable[[], str | None]) -> str | None:
    """None if the blob backend is ready (``check`` is the server's ``BlobAccess.check``), else why not."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - as above
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


# -- access log and request metrics (a pure ASGI middleware: request bodies stream untouched) ----
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class ObservedApp:
    """Times every HTTP request and logs/counts it by its route template once it is answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status, time.perf_counter() - start)

    @staticmethod
    def _record(scope: Scope, status: int, elapsed: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        REQUESTS.labels(route, method, str(status)).inc()
        LATENCY.labels(route, method).observe(elapsed)
        if route in ("/metrics", "/healthz", "/readyz") and status < 400:
            return  # probes and scrapes would drown the log
        if access_log.isEnabledFor(logging.INFO):
            state = scope.get("state") or {}
            params = scope.get("path_params") or {}
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({
                "method": method, "route": route, "path": scope.get("path", ""), "status": status,
                "ms": round(elapsed * 1000, 2), "user": state.get("user"),
                "entity": params.get("entity") or state.get("entity"), "client": client[0],
            }, sort_keys=True))
