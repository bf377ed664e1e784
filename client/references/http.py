"""``http(s)://`` references: Content-Length and ETag, ranged GETs for the mount."""

from __future__ import annotations

import posixpath
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ..errors import ArtifactFSError, DigestMismatchError, NotFoundError, PermissionDeniedError, StoreUnavailableError
from ..hashing import HashingWriter, CHUNK
from ..manifest import ManifestEntry
from .common import (
    _atomic_dest,
    _check_md5,
    _check_size,
    _entry_name,
    _is_single_part_etag,
    _strip_quotes,
    is_uri_digest,
)


# --------------------------------------------------------------------------- http(s)://

_http_local = threading.local()


def _http_session():  # -> requests.Session (imported lazily: keeps `import client` light)
    """One requests session per thread (sessions are not documented as thread-safe), with
    retries on connection errors and 5xx for the idempotent HEAD/GET we send."""
    session = getattr(_http_local, "session", None)
    if session is None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        retry = Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                      allowed_methods=frozenset({"HEAD", "GET"}), raise_on_status=False)
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=32))
        session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=32))
        _http_local.session = session
    return session


class HttpHandler:
    """``http(s)://`` references: size from ``Content-Length``, digest from ``ETag``."""

    schemes = ("http", "https")
    timeout = 60.0

    def _request(self, method: str, uri: str, **kw):
        import requests

        try:
            resp = _http_session().request(method, uri, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise StoreUnavailableError(f"reference {uri} could not be reached: {exc}") from exc
        if resp.status_code in (404, 410):
            resp.close()
            raise NotFoundError(f"reference {uri} answered {resp.status_code}: it no longer exists")
        if resp.status_code >= 500:
            resp.close()
            raise StoreUnavailableError(f"reference {uri} answered {resp.status_code}")
        if resp.status_code == 412:
            resp.close()
            raise DigestMismatchError(f"reference {uri} answered 412 to If-Match: its ETag changed since it was logged")
        if resp.status_code in (401, 403) and method == "GET":
            resp.close()
            raise PermissionDeniedError(
                f"reference {uri} answered {resp.status_code}: no credentials of this machine are accepted for "
                f"{urlparse(uri).hostname} (requests reads them from ~/.netrc or $NETRC)")
        tolerated = (403, 405) if method == "HEAD" else (416,)  # HEAD refused / range past the end
        if resp.status_code >= 400 and resp.status_code not in tolerated:
            resp.close()
            raise ArtifactFSError(f"reference {uri} answered {resp.status_code} to {method}")
        return resp

    def entries(self, uri: str, name: str | None, checksum: bool,
                max_objects: int) -> Iterator[ManifestEntry]:
        # W&B names the entry by the basename of the whole URI string, query included
        # (``file.bin?x=1``), and uses the URI string as the digest of anything it does not read.
        entry_name = _entry_name(name, posixpath.basename(uri) or urlparse(uri).netloc)
        if not checksum:
            yield ManifestEntry(path=entry_name, digest=uri, ref=uri)
            return
        resp = self._request("HEAD", uri, allow_redirects=True)
        if resp.status_code >= 400:  # a server that refuses HEAD: ask with GET, read no body
            resp = self._request("GET", uri, stream=True)
            resp.close()
        headers = resp.headers
        etag = headers.get("ETag")
        size = int(headers["Content-Length"]) if headers.get("Content-Length") else None
        yield ManifestEntry(path=entry_name, digest=_strip_quotes(etag) if etag else uri,
                            size=size, ref=uri, extra={"etag": etag} if etag else {})

    def _check_etag(self, entry: ManifestEntry, headers) -> None:
        logged, now = entry.extra.get("etag"), headers.get("ETag")
        if logged and now and _strip_quotes(now) != _strip_quotes(logged):
            raise DigestMismatchError(
                f"reference {entry.ref} ({entry.path}) now has ETag {now}, but {logged} was logged: "
                f"the source changed after the artifact was logged")

    def fetch(self, entry: ManifestEntry, dest: Path) -> None:
        import requests

        unchecked = is_uri_digest(entry)
        with self._request("GET", entry.ref or "", stream=True) as resp:
            if not unchecked:
                self._check_etag(entry, resp.headers)
            with _atomic_dest(dest) as out:
                sink = HashingWriter(out)
                try:
                    for chunk in resp.iter_content(CHUNK):
                        sink.write(chunk)
                except requests.RequestException as exc:
                    raise StoreUnavailableError(f"reference {entry.ref}: download broke off: {exc}") from exc
                if not unchecked:
                    _check_size(entry, sink.size, "sent")
                    etag = _strip_quotes(entry.extra.get("etag") or "")
                    _check_md5(entry, sink.md5.hexdigest(),
                               etag.lower() if _is_single_part_etag(etag) else None)

    def read_range(self, entry: ManifestEntry, start: int, length: int) -> bytes:
        """A ranged GET pinned with ``If-Match`` on the recorded (strong) ETag; the answer's ETag
        and the object's total size (``Content-Range``, or ``Content-Length`` of a 200) are
        checked too, for servers that ignore the precondition or send no ETag at all."""
        if length <= 0:
            return b""
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        unchecked = is_uri_digest(entry)
        logged = entry.extra.get("etag")
        if logged and not unchecked and not str(logged).startswith("W/"):
            headers["If-Match"] = str(logged)  # weak ETags never match If-Match: checked below
        resp = self._request("GET", entry.ref or "", headers=headers, stream=True)
        with resp:
            if resp.status_code == 416:
                return b""
            if not unchecked:
                self._check_etag(entry, resp.headers)
            self._check_total(entry, resp)
            if resp.status_code == 206:
                return resp.content
            # The server ignored Range: skip to start, keep length bytes, drop the rest.
            out = bytearray()
            pos = 0
            for chunk in resp.iter_content(CHUNK):
                lo, hi = max(start - pos, 0), min(start + length - pos, len(chunk))
                if lo < hi:
                    out += chunk[lo:hi]
                pos += len(chunk)
                if pos >= start + length:
                    break
            return bytes(out)

    @staticmethod
    def _check_total(entry: ManifestEntry, resp) -> None:
        """The object's size now (``Content-Range: bytes a-b/N``, or a 200's length) must be the logged one."""
        if entry.size is None:
            return
        total: str | None = None
        if resp.status_code == 206:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2] or None
        elif resp.status_code == 200:
            total = resp.headers.get("Content-Length")
        if total is not None and total.isdigit():
            _check_size(entry, int(total), "now has")

    def is_container(self, entry: ManifestEntry) -> bool:
        return False
