"""The Store protocol over HTTP: a registry server (``server/``) shared by many machines.

Metadata calls are JSON requests to the server.  Blob bytes go wherever the server's upload or
download *plan* says: with an S3 backend that is a presigned S3 URL, so bytes never pass through
the server (and the mount's ranged reads hit S3 directly); with a local-directory backend it is a
short-lived URL the server signed for itself.

Failure handling lives in two functions: :func:`client.retry.is_transport_failure` says whether
an exception is worth another attempt (connection refused or reset, timeouts, truncated bodies,
429/502/503/504: :class:`TransientHTTPError`), and :func:`retrying` runs the one retry loop (exponential backoff with jitter).  A call that is not
idempotent (a commit) is retried only when the request provably never reached the server (the
connection was refused), so a retry can never create a second version.  When the attempts run
out, the caller gets :class:`~client.errors.StoreUnavailableError`.

Server errors arrive as ``{"error": {"code", "message"}}`` and are raised again as the same
class (:func:`client.errors.error_from_code`), so both stores raise the same types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import quote, urljoin

import urllib3.exceptions
from cachetools import LRUCache, TLRUCache

from .. import names, settings
from ..errors import (ArtifactFSError, DigestMismatchError, PermissionDeniedError, StoreUnavailableError,
                      error_from_code)
from ..blockmap import BlockMap
from ..hashing import md5_bytes
from ..retry import DeadlineExceeded, RetryPolicy, TemporaryFailure, attempt_timeout, is_transport_failure
from .base import STREAM_CHUNK
from .http_blobs import BlobHTTP, Observer
from .wire import API, Call, JsonCalls

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Blobs above this size are downloaded with parallel ranged GETs (like boto3's transfer manager).
PARALLEL_DOWNLOAD_THRESHOLD = 32 << 20
DOWNLOAD_PART = 16 << 20
#: threads of a store's one transfer pool, and part buffers alive at once across all its
#: transfers: with the SDK's 8 files at a time this bounds buffers to 8 parts (128 MiB), not 8 x 8
TRANSFER_THREADS = 8
#: ``/complete`` of a multipart upload: the server reads the object back from S3 (and copies
#: it into place) before it answers, so each attempt waits this long plus the time to move the
#: blob at COMPLETE_RATE bytes/s (the slowest verification we wait for), not the read timeout
COMPLETE_WAIT = 60.0
COMPLETE_RATE = 4 << 20


class PartBudget:
    """At most ``slots`` part buffers alive at once; ``peak`` is the most there ever were."""

    def __init__(self, slots: int) -> None:
        self._sem = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0

    @contextlib.contextmanager
    def slot(self) -> Any:
        with self._sem:
            with self._lock:
                self.in_use += 1
                self.peak = max(self.peak, self.in_use)
            try:
                yield
            finally:
                with self._lock:
                    self.in_use -= 1


# -- retries ----------------------------------------------------------------------------------
class TransientHTTPError(TemporaryFailure):
    """A response that says "try again" (429, 500, 502, 503, 504: S3 documents InternalError
    and SlowDown as retryable) or a body cut short."""


def _blob_exchange(method: str, url: str, send: Callable[[], urllib3.BaseHTTPResponse]) -> urllib3.BaseHTTPResponse:
    """``send()``: one request to a blob URL (a ranged GET, a presigned PUT).  A TLS connection
    that cannot be set up is not retried (it says what to fix); a transport failure is raised
    as is (retried by the caller); any other urllib3 failure (too many redirects, a URL it
    cannot parse) becomes ours."""
    try:
        return send()
    except urllib3.exceptions.SSLError as exc:
        if _tls_refused(exc):
            raise _tls_error(url.split("?")[0], exc) from exc
        raise  # broken mid-way: a transport failure, retried
    except urllib3.exceptions.HTTPError as exc:
        if is_transport_failure(exc):
            raise
        raise ArtifactFSError(f"{method} {url.split('?')[0]} failed: {exc}") from exc


class _NotSent(TemporaryFailure):
    """Wraps a failure that happened before the request reached the server (safe to retry)."""


def _never_sent(exc: BaseException) -> bool:
    """True if a urllib3 failure happened while connecting, before any byte was sent (a
    connect timeout, a refused connection: urllib3's NewConnectionError is a ConnectTimeoutError)."""
    return isinstance(exc, (urllib3.exceptions.ConnectTimeoutError, ConnectionRefusedError))


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a method of HttpStore under its :class:`~client.retry.RetryPolicy` (``self.policy``):
    retried while :func:`~client.retry.is_transport_failure` says so, within the policy's total time bound.
    Gives up with StoreUnavailableError."""

    @functools.wraps(fn)
    def wrapper(self: "HttpStore", *args: Any, **kwargs: Any) -> T:
        def give_up(exc: BaseException, attempts: int) -> BaseException:
            cause = exc.__cause__ if isinstance(exc, _NotSent) and exc.__cause__ else exc
            return StoreUnavailableError(f"registry at {self.location} unreachable after {attempts} attempts: {cause}")

        return self.policy.call(lambda: fn(self, *args, **kwargs), is_temp=is_transport_failure, give_up=give_up,
                                what=fn.__name__, logger=log)

    return wrapper


#: project listings an HttpStore keeps with their ETags (least recently used dropped first)
KEPT_LISTINGS = 64


def _copied(result: Any) -> Any:
    """A kept answer handed out again: its lists (in a tuple) copied, so a caller that changes
    one changes nothing kept; the records in them are immutable."""
    if isinstance(result, tuple):
        return tuple(list(x) if isinstance(x, list) else x for x in result)
    return list(result) if isinstance(result, list) else result


def _raise_status(status: int, url: str, body: bytes) -> None:
    """Turn an error status (and its body) into our exception (or a transient one worth retrying)."""
    if status < 400:
        return
    where = url.split("?")[0]
    try:
        err = json.loads(body)["error"]
        exc: ArtifactFSError | None = error_from_code(str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        exc = None
    if exc is not None and not isinstance(exc, StoreUnavailableError):
        raise exc  # the server's own verdict; a "try again" from it is handled below
    if status in (429, 500, 502, 503, 504):
        raise TransientHTTPError(f"HTTP {status} from {where}")
    text = body[:300].decode("utf-8", "replace")
    if "<Code>BadDigest</Code>" in text or "<Code>InvalidDigest</Code>" in text:
        raise DigestMismatchError(f"the object store refused the bytes: they do not match their md5 ({text})")
    if status in (401, 403):
        raise PermissionDeniedError(f"HTTP {status} from {where}: {text}")
    if status == 404:
        from ..errors import NotFoundError

        raise NotFoundError(f"HTTP 404 from {where}")
    raise ArtifactFSError(f"HTTP {status} from {where}: {text}")


def _content_range(header: str) -> tuple[int, int, int]:
    """``bytes 0-99/1234`` -> (0, 99, 1234); a missing or odd header is a transient failure."""
    try:
        unit, _, spec = header.partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        assert unit == "bytes"
        return int(first), int(last), int(total)
    except (ValueError, AssertionError):
        raise TransientHTTPError(f"ranged response without a usable Content-Range: {header!r}") from None


def trusted_cas(ca_bundle: str | None = None) -> str | bool:
    """What https connections verify certificates against: ``ca_bundle`` or ARTIFACTFS_CA_BUNDLE
    (a PEM file or a c_rehash'd directory), else the operating system's CA store, else
    certifi's (True).  Never "no verification"."""
    chosen = ca_bundle or settings.ca_bundle()
    if chosen:
        if not os.path.exists(chosen):
            raise StoreUnavailableError(f"ARTIFACTFS_CA_BUNDLE {chosen!r} does not exist")
        return chosen
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    return True


def _tls_refused(exc: BaseException) -> bool:
    """Whether a TLS failure says the connection cannot be set up (a wrong scheme, a certificate
    not trusted): retrying cannot help, unlike a record broken mid-body."""
    text = str(exc)
    return any(s in text for s in ("WRONG_VERSION_NUMBER", "wrong version number", "CERTIFICATE_VERIFY_FAILED"))


def _tls_error(base: str, exc: urllib3.exceptions.SSLError) -> StoreUnavailableError:
    """A TLS failure is not worth retrying: the certificate or the scheme is wrong."""
    text = str(exc)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        hint = "the server does not speak TLS there: use http://, or start it with --tls-cert/--tls-key"
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        hint = "its certificate is not trusted: set ARTIFACTFS_CA_BUNDLE to the PEM file of the CA that signed it"
    else:
        hint = "check the URL and the server's certificate"
    return StoreUnavailableError(f"TLS connection to {base} failed ({hint}): {text}")


#: signed URLs and upload plans kept per HttpStore (a few hundred bytes each)
URL_CACHE_SIZE = 100_000


def _url_cache() -> TLRUCache:
    """Entries are (…, valid_until, …) tuples: each expires at its own valid_until (monotonic)."""
    return TLRUCache(maxsize=URL_CACHE_SIZE, ttu=lambda _key, value, _now: value[1], timer=time.monotonic)


def _q(segment: str) -> str:
    return quote(segment, safe="")


#: bytes per chunk of a streamed download (how often progress is told and Ctrl-C checked)
STREAM_CHUNK = 64 << 10


def _read_reporting(resp: urllib3.BaseHTTPResponse, progress: Callable[[int], None]) -> bytes:
    """The whole body of a streamed response, telling ``progress`` of each chunk.

    With a Content-Length (and no content coding) the body is read straight into one buffer
    of that size: the blob is in memory once, not once in chunks and again joined."""
    try:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and not resp.headers.get("Content-Encoding"):
            buf = bytearray(int(length))
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = resp.readinto(view[got:got + STREAM_CHUNK])
                if not n:
                    break  # cut short: the caller's length check sees it
                got += n
                progress(n)
            del view
            if got < len(buf):
                del buf[got:]
            return buf  # type: ignore[return-value]  # bytes-like; no copy into bytes
        parts = []
        for chunk in resp.stream(STREAM_CHUNK):
            parts.append(chunk)
            progress(len(chunk))
        return b"".join(parts)
    finally:
        resp.close()


class _ReportingReader:
    """A file for a request body that reports each read's length (upload progress)."""

    def __init__(self, f: Any, progress: Callable[[int], None]) -> None:
        self._f, self._progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress(len(data))
        return data


class HttpStore(JsonCalls):
    """Store protocol over a registry server.  Thread-safe: one set of urllib3 pools for all threads."""

    #: blobs per missing_blobs / completion request (the server's PLAN_BATCH caps it)
    PLAN_BATCH = 2000
    #: blobs per URL batch of an SDK download: small enough that the first files start soon
    #: (the next batch is signed while this one downloads), large enough to be few requests
    URL_BATCH = 500

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 20.0,
                 connect_timeout: float = 5.0, attempts: int = 6, backoff: float = 0.1,
                 deadline: float | None = None, pool_size: int = 64, ca_bundle: str | None = None) -> None:
        """``timeout``: most one attempt waits for the next bytes; ``deadline``: total bound of
        one call, all attempts together (None: ARTIFACTFS_REQUEST_TIMEOUT, default 30 s)."""
        self.base = url.rstrip("/")
        self.location = self.base
        self.api_key = api_key
        self.connect_timeout, self.read_timeout = connect_timeout, timeout
        self.policy = RetryPolicy(tries=max(1, attempts), backoff=backoff, deadline=deadline, attempt_timeout=timeout)
        #: every request (JSON calls, blob GETs, uploads) goes through these pools: see
        #: client/store/http_blobs.py.  ARTIFACTFS_CA_BUNDLE (``explicit``) wins over
        #: REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, which win over the system store.
        self._blobs = BlobHTTP(trusted_cas(ca_bundle), explicit=bool(ca_bundle or settings.ca_bundle()),
                               pool_size=pool_size)
        #: (entity, md5) -> (url, valid_until, size); an entry leaves at valid_until, the least
        #: recently used one when full (never the whole cache at once)
        self._urls: TLRUCache[tuple[str, str], tuple[str, float, int | None]] = _url_cache()
        self._urls_lock = threading.Lock()
        #: upload plans that came with missing_blobs: (entity, md5) -> (plan, valid_until, put_limit)
        self._plans: TLRUCache[tuple[str, str], tuple[dict[str, Any], float, int | None]] = _url_cache()
        #: path -> (ETag, decoded answer) of the last answers of conditional calls (the listings)
        self._kept: LRUCache[str, tuple[str, Any]] = LRUCache(maxsize=KEPT_LISTINGS)
        self._kept_lock = threading.Lock()
        #: every multipart upload and parallel download of this store shares one pool and one
        #: buffer budget, however many callers' threads use the store at once
        self.part_budget = PartBudget(TRANSFER_THREADS)
        self._transfer_pool = ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="artifactfs-transfer")

    def __repr__(self) -> str:
        return f"HttpStore({self.base!r})"

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next attempt: capped by the running call's deadline."""
        return self._timeouts(self.read_timeout)

    def _timeouts(self, read_timeout: float) -> tuple[float, float]:
        read = attempt_timeout(read_timeout)
        return min(self.connect_timeout, read), read

    def observe(self, fn: Observer) -> None:
        """Tell ``fn(method, url, request headers)`` of every request this store sends from now
        on (metadata calls, blob GETs and uploads, all through the same pools): tests count
        requests with it."""
        self._blobs.observers.append(fn)

    def _blob_get(self, url: str, rng: str, *, stream: bool) -> urllib3.BaseHTTPResponse:
        """One ranged GET of a blob URL (see client/store/http_blobs.py)."""
        return _blob_exchange("GET", url, lambda: self._blobs.get(url, {"Range": rng}, self.timeout, stream=stream))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _send(self, method: str, path: str, *, idempotent: bool, headers: dict[str, str] | None = None,
              body: Any = None, read_timeout: float | None = None) -> urllib3.BaseHTTPResponse:
        """One JSON call to the server (``body``: JSON data or None), on the blob GETs' urllib3
        pools with keep-alive: a ``requests.Session`` cost more client CPU per call than the
        server's whole answer to a resolve (issue 13).  An error status raises."""
        url = path if path.startswith("http") else self.base + path
        sent = {**self._headers(), **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
            sent["Content-Type"] = "application/json"
        try:
            resp = self._blobs.request(method, url, sent, self._timeouts(read_timeout or self.read_timeout), body=data)
        except urllib3.exceptions.SSLError as exc:
            raise _tls_error(self.base, exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            if not is_transport_failure(exc):
                # too many redirects, a URL urllib3 cannot parse: our error, not urllib3's
                raise ArtifactFSError(f"{method} {url.split('?')[0]} failed: {exc}") from exc
            if idempotent:
                raise
            if not _never_sent(exc):
                raise StoreUnavailableError(
                    f"lost the connection to {self.base} during {method} {path}; the request may or may not "
                    f"have been applied: {exc}") from exc
            raise _NotSent(str(exc)) from exc
        if resp.status in (429, 502, 503, 504) and not idempotent:
            raise StoreUnavailableError(f"HTTP {resp.status} from {self.base} during {method} {path}")
        _raise_status(resp.status, url, resp.data)
        return resp

    def _get_once(self, path: str) -> Any:
        return json.loads(self._send("GET", path, idempotent=True).data)

    def _call_once(self, method: str, path: str, body: Any = None, *, idempotent: bool = True,
                   read_timeout: float | None = None) -> Any:
        data = self._send(method, path, idempotent=idempotent, body=body, read_timeout=read_timeout).data
        return json.loads(data) if data else None

    # The retried form; inside an already-retried method use the *_once forms (no nesting).
    _call = retrying(_call_once)

    # -- the JSON calls ------------------------------------------------------------------------
    # Every Store metadata call is an attribute of JsonCalls (client/store/wire.py), inherited:
    # its entry there binds the arguments and builds the request; this sends it.
    def send_call(self, call: Call, args: dict[str, Any]) -> Any:
        """Send one call of the API table (retried under the policy when it is idempotent)."""
        path, body = call.request(args)
        if call.conditional:
            return self._conditional_get(call, path)
        return call.decode(self._call(call.method, path, body, idempotent=call.idempotent(args)))

    @retrying
    def _conditional_get(self, call: Call, path: str) -> Any:
        """A conditional call (the project listing): the last answer is kept with its ETag and
        sent back; on ``304 Not Modified`` the kept answer is the result, not decoded again."""
        with self._kept_lock:
            kept = self._kept.get(path)
        resp = self._send("GET", path, idempotent=True, headers={"If-None-Match": kept[0]} if kept else None)
        if resp.status == 304 and kept is not None:
            return _copied(kept[1])
        result = call.decode(json.loads(resp.data))
        tag = resp.headers.get("ETag")
        if tag:
            with self._kept_lock:
                self._kept[path] = (tag, result)
        return _copied(result)

    def create_project(self, entity: str, project: str) -> None:
        # a name with "/" would route to another URL (a 404): refuse it as the embedded store does
        names.validate_entity(entity)
        names.validate_project(project)
        self.send_call(JsonCalls.create_project, {"entity": entity, "project": project})

    # -- blobs ---------------------------------------------------------------------------------
    def _blob(self, entity: str, md5_hex: str) -> str:
        return f"{API}/entities/{_q(entity)}/blobs/{_q(md5_hex)}"

    def missing_blobs(self, entity: str, md5_hexes: Iterable[str]) -> set[str]:
        """Also keeps the upload plans the server sends along, so put_blob saves a round trip."""
        wanted = list(dict.fromkeys(md5_hexes))
        missing: set[str] = set()
        step = self.PLAN_BATCH
        for i in range(0, len(wanted), step):
            out = self.send_call(JsonCalls.missing_blobs, {"entity": entity, "md5_hexes": wanted[i:i + step]})
            missing.update(out["missing"])
            if out.get("uploads"):
                until = time.monotonic() + float(out["expires_in"]) / 2
                limit = out.get("put_limit")
                with self._urls_lock:
                    for md5, plan in out["uploads"].items():
                        self._plans[(entity, md5)] = (plan, until, limit)
        return missing

    def blockmaps(self, entity: str, md5_hexes: Iterable[str]) -> dict[str, BlockMap]:
        """Block maps of these blobs (client/blockmap.py); blobs without one are left out."""
        wanted = list(dict.fromkeys(md5_hexes))
        out: dict[str, BlockMap] = {}
        for i in range(0, len(wanted), 1000):
            out.update(self.send_call(JsonCalls.blockmaps, {"entity": entity, "md5_hexes": wanted[i:i + 1000]}))
        return out

    def _cached_plan(self, entity: str, md5_hex: str, size: int) -> dict[str, Any] | None:
        with self._urls_lock:
            hit = self._plans.pop((entity, md5_hex), None)
        if hit is None:
            return None
        plan, until, limit = hit
        if until < time.monotonic() or (limit is not None and size > limit):
            return None
        return plan

    def put_blob(self, entity: str, md5_hex: str, src: Path, size: int,
                 progress: Callable[[int], None] | None = None) -> None:
        """Upload by the server's plan: nothing (already there), one PUT, or parallel parts.

        Each step is retried on its own (all are idempotent: the blob is named by its content).
        ``progress(n)`` as bytes are sent (a single PUT) or as parts complete.
        """
        pending = self.put_blob_deferred(entity, md5_hex, src, size, progress)
        if pending is not None:
            self._call("POST", f"{self._blob(entity, md5_hex)}/complete", {"size": size})

    def put_blob_deferred(self, entity: str, md5_hex: str, src: Path, size: int,
                          progress: Callable[[int], None] | None = None) -> dict[str, Any] | None:
        """put_blob without the registration of a single PUT: that is returned, for
        :meth:`complete_blobs` to send with many others (multipart uploads complete here)."""
        pending: list[dict[str, Any]] = []

        def upload(plan: dict[str, Any]) -> None:
            if plan["method"] == "multipart":
                self._put_multipart(entity, md5_hex, Path(src), size, plan, progress)
                return
            resp = self._put_file(plan, Path(src), size, progress)
            if plan.get("complete", True):  # S3; the server's own URL registered it already
                pending.append({"md5": md5_hex, "size": size, "etag": resp.headers.get("ETag")})

        self._upload_by_plan(entity, md5_hex, size, upload)
        return pending[0] if pending else None

    def complete_blobs(self, entity: str, pending: list[dict[str, Any]]) -> None:
        """Register single-PUT uploads in batches (the server skips the HEAD where the PUT's
        signed Content-MD5 and ETag already proved the bytes)."""
        failed: dict[str, str] = {}
        step = self.PLAN_BATCH
        for i in range(0, len(pending), step):
            out = self._call("POST", f"{API}/entities/{_q(entity)}/blobs/completed", {"blobs": pending[i:i + step]})
            failed.update(out.get("failed") or {})
        if failed:
            md5, why = next(iter(sorted(failed.items())))
            raise DigestMismatchError(f"{len(failed)} upload(s) failed their check, e.g. {md5}: {why}")

    def _upload_by_plan(self, entity: str, md5_hex: str, size: int,
                        upload: Callable[[dict[str, Any]], None]) -> None:
        """Run ``upload`` with a (cached or new) plan; once more with a fresh plan if the
        presigned URLs were refused, which is what an URL that expired in between looks like
        (a slow disk, a loaded machine).  A real lack of permission is refused again by the
        server when it is asked for the fresh plan, with our key."""
        plan = self._cached_plan(entity, md5_hex, size)
        for attempt in (1, 2):
            if plan is None:
                plan = self._call("POST", f"{self._blob(entity, md5_hex)}/uploads", {"size": size})
            if plan["method"] == "exists":
                return
            try:
                upload(plan)
                return
            except PermissionDeniedError:
                if attempt == 2:
                    raise
                log.info("upload URL for %s refused (expired?); asking for a fresh one", md5_hex)
                plan = None

    def _put_once(self, target: dict[str, Any], body: Any, size: int) -> urllib3.BaseHTTPResponse:
        """One PUT of ``size`` bytes to a plan's URL with the plan's headers (Content-MD5, the
        checksum S3 checks).  ``body``: bytes, or a file that urllib3 reads in blocks as it
        sends them (never whole in memory); with the Content-Length given it is not chunked."""
        url = urljoin(self.base + "/", target["url"])
        headers = dict(target.get("headers") or {})
        headers["Content-Length"] = str(size)
        if size == 0:
            body = b""  # nothing to read: no body at all next to Content-Length: 0
        # No Authorization header: presigned URLs carry their own credentials.
        resp = _blob_exchange("PUT", url, lambda: self._blobs.request("PUT", url, headers, self.timeout, body=body))
        _raise_status(resp.status, url, resp.data)
        return resp

    @retrying
    def _put_file(self, target: dict[str, Any], src: Path, size: int,
                  progress: Callable[[int], None] | None = None) -> urllib3.BaseHTTPResponse:
        with open(src, "rb") as f:
            return self._put_once(target, f if progress is None else _ReportingReader(f, progress), size)

    @retrying
    def _put_data(self, target: dict[str, Any], data: bytes) -> urllib3.BaseHTTPResponse:
        return self._put_once(target, data, len(data))

    def _put_multipart(self, entity: str, md5_hex: str, src: Path, size: int, plan: dict[str, Any],
                       progress: Callable[[int], None] | None = None) -> None:
        part_size = int(plan["part_size"])
        part_md5s = []
        with open(src, "rb") as f:
            while chunk := f.read(part_size):
                part_md5s.append(md5_bytes(chunk))
        plan = self._call("POST", f"{self._blob(entity, md5_hex)}/uploads", {"size": size, "part_md5s": part_md5s})
        if plan["method"] == "exists":
            return

        def send(part: dict[str, Any]) -> str:
            offset = (int(part["number"]) - 1) * part_size
            with self.part_budget.slot():
                with open(src, "rb") as f:
                    f.seek(offset)
                    data = f.read(min(part_size, size - offset))
                etag = self._put_data(part, data).headers.get("ETag", "")
            if progress is not None:
                progress(len(data))
            return etag

        etags = list(self._transfer_pool.map(send, plan["parts"]))
        self._complete_multipart(entity, md5_hex, size, {"size": size, "upload": plan["upload"], "etags": etags})

    def _complete_multipart(self, entity: str, md5_hex: str, size: int, body: dict[str, Any]) -> None:
        """``/complete`` of a multipart upload, waiting as long as the server's verification may
        take (COMPLETE_WAIT + size / COMPLETE_RATE per attempt; a 1 GiB blob took moto longer
        than the read timeout, the retry failed on the upload the first call had consumed, and
        ``log`` failed).  A retry after a lost answer is safe: the server answers success for a
        blob that is in (server/blob_access.py)."""
        wait = max(self.read_timeout, COMPLETE_WAIT + size / COMPLETE_RATE)
        policy = dataclasses.replace(self.policy, attempt_timeout=wait, deadline=self.policy.total() + 2 * wait)

        def give_up(exc: BaseException, attempts: int) -> BaseException:
            return StoreUnavailableError(f"registry at {self.location} did not confirm the upload of blob {md5_hex} "
                                         f"after {attempts} attempts: {exc}")

        path = f"{self._blob(entity, md5_hex)}/complete"
        policy.call(lambda: self._call_once("POST", path, body, read_timeout=wait), is_temp=is_transport_failure,
                    give_up=give_up, what="complete", logger=log)

    # -- blob reads ----------------------------------------------------------------------------
    def _remember_url(self, entity: str, md5_hex: str, url: str, expires_in: float, size: int | None) -> str:
        url = urljoin(self.base + "/", url)
        with self._urls_lock:
            self._urls[(entity, md5_hex)] = (url, time.monotonic() + expires_in / 2, size)
        return url

    def _download_url(self, entity: str, md5_hex: str, refresh: bool = False) -> tuple[str, int | None]:
        """A (cached) short-lived URL for the blob, and its size when the server knows it cheaply
        (None with S3: asking would cost a HEAD; the ranged GET's Content-Range tells it)."""
        with self._urls_lock:
            hit = self._urls.get((entity, md5_hex))
        if hit and not refresh and hit[1] > time.monotonic():
            return hit[0], hit[2]
        out = self._get_once(f"{self._blob(entity, md5_hex)}/url")
        size = None if out.get("size") is None else int(out["size"])
        return self._remember_url(entity, md5_hex, out["url"], float(out["expires_in"]), size), size

    def url_known(self, entity: str, md5_hex: str) -> bool:
        """Whether a fresh download URL for the blob is cached (no request needed to read it)."""
        with self._urls_lock:
            hit = self._urls.get((entity, md5_hex))
        return hit is not None and hit[1] > time.monotonic()

    def prefetch_urls(self, entity: str, md5_hexes: Iterable[str]) -> None:
        """Fetch download URLs for many blobs in a few calls (before reading many small files,
        so each read is one GET straight to the object store)."""
        wanted = list(dict.fromkeys(md5_hexes))
        step = self.PLAN_BATCH  # the most one request may carry (the SDK hands in URL_BATCH at a time)
        for i in range(0, len(wanted), step):
            out = self._call("POST", f"{API}/entities/{_q(entity)}/blobs/urls", {"md5s": wanted[i:i + step]})
            for md5, url in out["urls"].items():
                self._remember_url(entity, md5, url, float(out["expires_in"]), None)

    @retrying
    def read_blob(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None,
                  progress: Callable[[int], None] | None = None) -> bytes:
        if length == 0:
            return b""
        return self._ranged_get(entity, md5_hex, start, length, progress)[0]

    def _ranged_get(self, entity: str, md5_hex: str, start: int, length: int | None,
                    progress: Callable[[int], None] | None = None) -> tuple[bytes, int | None]:
        """Bytes [start, start+length) (to the end if None) and the blob's size if learnt.

        Refreshes an expired URL once.  Checks that the bytes are exactly the range the store
        says it sent; a short body is a transient failure (retried), never returned.  With
        ``progress`` the body is streamed and ``progress(n)`` told of each chunk (it may raise
        to stop: the connection is closed, nothing is returned).
        """
        rng = f"bytes={start}-" if length is None else f"bytes={start}-{start + length - 1}"
        for refresh in (False, True):
            url, size = self._download_url(entity, md5_hex, refresh=refresh)
            if size is not None and start >= size:
                return b"", size
            resp = self._blob_get(url, rng, stream=progress is not None)
            if resp.status == 403 and not refresh:
                resp.close()
                continue  # most likely an expired URL: ask the server for a fresh one
            if resp.status == 416:
                resp.close()
                return b"", None  # start at or past the end
            if resp.status >= 400:
                with contextlib.closing(resp):
                    _raise_status(resp.status, url, resp.data)
            data = resp.data if progress is None else _read_reporting(resp, progress)
            if resp.status == 200:  # the store ignored Range: it sent the whole blob
                total = len(data)
                data = data[start:] if length is None else data[start:start + length]
                return data, total
            first, last, total = _content_range(resp.headers.get("Content-Range", ""))
            want_end = total if length is None else min(total, start + length)
            if first != start or last + 1 != want_end or len(data) != want_end - start:
                raise TransientHTTPError(f"short or misplaced read of blob {md5_hex}: got {len(data)} bytes "
                                         f"for {first}-{last}/{total}, wanted {start}-{want_end - 1}")
            return data, total
        raise AssertionError("unreachable")

    def stream_blob(self, entity: str, md5_hex: str, start: int, length: int) -> Iterator[bytes]:
        """Bytes [start, start+length) of one ranged GET as chunks of at most STREAM_CHUNK,
        read off the socket as they are consumed (never the whole range in memory).

        A single attempt (the mount resumes a failed stream where it stopped); every socket
        read is bounded by the read timeout.  A body cut short or a misplaced range raises
        StoreUnavailableError; an expired URL is refreshed once before the body starts.
        """
        if length <= 0:
            return
        rng = f"bytes={start}-{start + length - 1}"
        try:
            for refresh in (False, True):
                url, size = self._download_url(entity, md5_hex, refresh=refresh)
                if size is not None and start + length > size:
                    raise StoreUnavailableError(f"blob {md5_hex} has {size} bytes, asked for {rng}")
                resp = self._blob_get(url, rng, stream=True)
                with contextlib.closing(resp):
                    if resp.status == 403 and not refresh:
                        continue  # most likely an expired URL: ask the server for a fresh one
                    _raise_status(resp.status, url, resp.data if resp.status >= 400 else b"")
                    skip = 0
                    if resp.status == 200:  # the store ignored Range: skip to start
                        skip = start
                    else:
                        first, last, _total = _content_range(resp.headers.get("Content-Range", ""))
                        if first != start or last != start + length - 1:
                            raise TransientHTTPError(f"misplaced read of blob {md5_hex}: {first}-{last}, wanted {rng}")
                    left = length
                    for chunk in resp.stream(STREAM_CHUNK):
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                        chunk = chunk[:left]
                        if chunk:
                            left -= len(chunk)
                            yield chunk
                        if not left:
                            return
                    raise TransientHTTPError(f"short read of blob {md5_hex}: {length - left} of {length} bytes")
        except ArtifactFSError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: worth another attempt or not
            if is_transport_failure(exc):
                raise StoreUnavailableError(f"reading blob {md5_hex} [{rng}]: {exc}") from exc
            raise

    @retrying
    def _first_part(self, entity: str, md5_hex: str,
                    progress: Callable[[int], None] | None = None) -> tuple[bytes, int]:
        data, total = self._ranged_get(entity, md5_hex, 0, DOWNLOAD_PART, progress)
        return data, len(data) if total is None else total

    def download_blob(self, entity: str, md5_hex: str, dest: Path,
                      progress: Callable[[int], None] | None = None) -> None:
        """Whole blob to ``dest``: the first part tells the size, the rest in parallel ranged
        GETs (like boto3's transfer manager), each retried on its own; ``progress(n)`` as
        parts arrive (it may raise to stop: parts not started yet then do nothing)."""
        report = progress or (lambda n: None)  # report(0) raises once the transfer was stopped
        with self.part_budget.slot():
            first, size = self._first_part(entity, md5_hex, progress)
            with open(dest, "wb") as out:
                out.write(first)
                out.truncate(size)
            got = len(first)
            del first
        parts = [(off, min(off + DOWNLOAD_PART, size)) for off in range(got, size, DOWNLOAD_PART)]
        if not parts:
            return
        fd = os.open(dest, os.O_WRONLY)
        try:
            def fetch(rng: tuple[int, int]) -> None:
                report(0)  # raises once the transfer was stopped
                with self.part_budget.slot():
                    data = self.read_blob(entity, md5_hex, rng[0], rng[1] - rng[0], progress)
                    if len(data) != rng[1] - rng[0]:
                        raise StoreUnavailableError(f"blob {md5_hex} changed size while downloading")
                    os.pwrite(fd, data, rng[0])

            if size <= PARALLEL_DOWNLOAD_THRESHOLD:
                for rng in parts:
                    fetch(rng)
            else:
                list(self._transfer_pool.map(fetch, parts))
        finally:
            os.close(fd)

    def close(self) -> None:
        self._transfer_pool.shutdown(wait=False, cancel_futures=True)
        self._blobs.close()
