"""The blob GET's hot path: one HTTP/1.1 request on a kept-alive socket (issue 17).

A cold small file is one ranged GET of a presigned URL.  Through urllib3 that GET cost about
390 µs of CPU on this machine (its pool, URL parsing and re-encoding, ``http.client``'s
response and the ``email`` header parser), a quarter of the mount daemon's time per cold
file; the same exchange written here costs about 90 µs.  It does only what a blob GET needs
and hands anything else back to urllib3 (:class:`BlobHTTP` decides, see ``http_blobs.py``):

* a request is the URL's path and query as given (a presigned URL is already encoded: it is
  never re-encoded), ``Host`` and the caller's headers; http or https (the same CA file as
  urllib3's pools, hostname checked); never through a proxy (those go to urllib3);
* a response is used when it has a ``Content-Length`` and no content or transfer coding;
  anything else (a redirect, a chunked or compressed body) closes the socket and raises
  :class:`NotFast`, and the caller sends the same GET through urllib3 (a GET may be sent twice);
* failures are urllib3's own exceptions, so the one retry policy classifies them as it always
  did: a refused or timed-out connect is ``NewConnectionError`` / ``ConnectTimeoutError``
  (never sent: safe to retry), a socket read that waits longer than the read timeout is
  ``ReadTimeoutError``, a connection reset or a body cut short ``ProtocolError``, a TLS failure
  ``SSLError``;
* a kept-alive socket the server closed while it sat idle is found when the next request gets
  no status line: that request is sent again once on a new socket (nothing of it was answered);
* a socket goes back to its pool only when its body was read to the end and the server did not
  say ``Connection: close``; at most ``pool_size`` idle sockets per host.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import urllib3.exceptions

#: bytes of a socket's read buffer (status line and headers; a body is read past it)
_BUFFER = 64 << 10
#: the longest status or header line accepted (S3's are well under 1 KiB)
_MAX_LINE = 16 << 10
#: the most header lines accepted
_MAX_HEADERS = 200
_USER_AGENT = "User-Agent: artifactfs"


class NotFast(Exception):
    """The response is not one this path reads (see the module docstring): send it again through urllib3."""


class Headers(dict[str, str]):
    """Response headers by lower-case name; ``get`` and ``[]`` take any case."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


class _Conn:
    """One socket to one (scheme, host, port) and its buffered reader."""

    __slots__ = ("sock", "file", "key")

    def __init__(self, sock: socket.socket, key: tuple[str, str, int]) -> None:
        self.sock = sock
        self.file = cast(io.BufferedReader, sock.makefile("rb", buffering=_BUFFER))
        self.key = key

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


class FastResponse:
    """What the store reads of a response (urllib3's ``BaseHTTPResponse`` names): ``status``,
    ``headers``, ``data``, ``readinto``, ``stream``, ``close``."""

    def __init__(self, owner: FastGet, conn: _Conn, url: str, status: int, headers: Headers,
                 length: int, reusable: bool) -> None:
        self.status, self.headers, self.url = status, headers, url
        self._owner = owner
        self._conn: _Conn | None = conn
        self._left, self._reusable = length, reusable
        self._data: bytes | None = None

    def _cut_short(self) -> urllib3.exceptions.ProtocolError:
        return urllib3.exceptions.ProtocolError(f"the connection closed with {self._left} bytes of the body unread")

    def readinto(self, buf: Any) -> int:
        """Read up to ``len(buf)`` bytes of the body into ``buf``; 0 at its end (or when the
        server closed the connection before it: the caller's length check sees that)."""
        if self._left <= 0 or self._conn is None:
            return 0
        view = memoryview(buf).cast("B")
        if len(view) > self._left:
            view = view[:self._left]
        n = self._owner.read(self, self._conn.file.readinto, view) or 0
        self._left -= n
        if not n:
            self.close()
        return n

    def _read(self, amt: int) -> bytes:
        """The next ``min(amt, left)`` bytes of the body, read into one bytes object (no copy
        after); ProtocolError if the connection closes before them."""
        if self._conn is None:
            raise self._cut_short()
        want = min(amt, self._left)
        chunk: bytes = self._owner.read(self, self._conn.file.read, want)
        if len(chunk) < want:
            self._left -= len(chunk)
            self.close()
            raise self._cut_short()
        self._left -= want
        return chunk

    @property
    def data(self) -> bytes:
        """The whole (rest of the) body; ProtocolError if the connection closes before its end."""
        if self._data is None:
            self._data = self._read(self._left) if self._left else b""
            self.close()
        return self._data

    def stream(self, amt: int) -> Iterator[bytes]:
        """The body in chunks of at most ``amt`` bytes; ProtocolError if it is cut short."""
        while self._left > 0:
            yield self._read(amt)
        self.close()

    def close(self) -> None:
        """Give the socket back to its pool when the body was read to its end, else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._owner.done(conn, reuse=self._reusable and self._left == 0)

    release_conn = close


class FastGet:
    """Keep-alive GETs to any number of hosts; thread-safe (a socket serves one request at a time)."""

    def __init__(self, tls: Mapping[str, Any], pool_size: int) -> None:
        """``tls``: urllib3's certificate arguments (``tls_arguments``); the TLS context is made
        from them at the first https request (loading a CA file costs milliseconds)."""
        self._tls = dict(tls)
        self._ssl: ssl.SSLContext | None = None
        self._pool_size = pool_size
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._lock = threading.Lock()
        #: sockets opened so far (tests count them: one per concurrent request, not per request)
        self.opened = 0

    def _ssl_context(self) -> ssl.SSLContext:
        """A client context verifying against what urllib3's pools are given, hostname checked."""
        with self._lock:
            if self._ssl is None:
                ctx = ssl.create_default_context(cafile=self._tls.get("ca_certs"), capath=self._tls.get("ca_cert_dir"))
                ctx.check_hostname, ctx.verify_mode = True, ssl.CERT_REQUIRED
                self._ssl = ctx
            return self._ssl

    def get(self, url: str, headers: Mapping[str, str], timeout: tuple[float, float]) -> FastResponse:
        """One GET of ``url``; NotFast when the answer is not one this path reads."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if scheme not in ("http", "https") or not host or not target.isascii() or " " in target:
            raise NotFast(f"not a URL this path sends as is: {url.split('?')[0]!r}")  # urllib3 encodes it
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}", _USER_AGENT]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        while True:
            conn, reused = self._take(key)
            if conn is None:
                conn = self._connect(key, url, timeout[0])
            try:
                conn.sock.settimeout(timeout[1])
                conn.sock.sendall(request)
                status_line = conn.file.readline(_MAX_LINE + 1)
            except BaseException as exc:
                conn.close()
                if reused and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                    continue  # an idle socket the server had closed: send again on a new one
                raise self._failure(exc, url) from exc
            if not status_line and reused:
                conn.close()
                continue  # closed while idle: nothing of this request was answered
            return self._response(conn, url, status_line)

    def _take(self, key: tuple[str, str, int]) -> tuple[_Conn | None, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        return None, False

    def _connect(self, key: tuple[str, str, int], url: str, connect_timeout: float) -> _Conn:
        scheme, host, port = key
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError as exc:
            raise urllib3.exceptions.ConnectTimeoutError(
                None, f"Connection to {host} timed out. (connect timeout={connect_timeout})") from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(None, f"Failed to establish a new connection: {exc}") from exc  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self._ssl_context().wrap_socket(sock, server_hostname=host)
        except ssl.SSLError as exc:
            sock.close()
            raise urllib3.exceptions.SSLError(exc) from exc
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self.opened += 1
        return _Conn(sock, key)

    @staticmethod
    def _failure(exc: BaseException, url: str) -> BaseException:
        """A socket failure as urllib3 raises it (what the retry policy classifies)."""
        if isinstance(exc, (urllib3.exceptions.HTTPError, NotFast)):
            return exc
        if isinstance(exc, ssl.SSLError):
            return urllib3.exceptions.SSLError(exc)
        if isinstance(exc, TimeoutError):
            return urllib3.exceptions.ReadTimeoutError(None, url, "Read timed out.")  # type: ignore[arg-type]
        if isinstance(exc, OSError):
            return urllib3.exceptions.ProtocolError("Connection aborted.", exc)
        return exc

    def _response(self, conn: _Conn, url: str, status_line: bytes) -> FastResponse:
        try:
            version, _, rest = status_line.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or not code.isdigit() or not status_line.endswith(b"\n"):
                raise urllib3.exceptions.ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
            headers = Headers()
            for _ in range(_MAX_HEADERS + 1):
                line = conn.file.readline(_MAX_LINE + 1)
                if line in (b"\r\n", b"\n"):
                    break
                if not line.endswith(b"\n"):
                    raise urllib3.exceptions.ProtocolError("the response headers were cut short or too long")
                name, sep, value = line.decode("latin-1").partition(":")
                if sep:
                    name = name.strip().lower()
                    headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
            else:
                raise urllib3.exceptions.ProtocolError("too many response headers")
        except BaseException as exc:
            conn.close()
            raise self._failure(exc, url) from exc
        status = int(code)
        length = headers.get("content-length")
        if (100 <= status < 200 or 300 <= status < 400 or length is None or not length.isdigit()
                or headers.get("transfer-encoding") or headers.get("content-encoding", "identity") != "identity"):
            conn.close()
            raise NotFast(f"HTTP {status} with {dict(headers)!r}")
        reusable = version == b"HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        return FastResponse(self, conn, url, status, headers, int(length), reusable)

    def read(self, resp: FastResponse, read: Callable[[Any], Any], arg: Any) -> Any:
        """``read(arg)``, a read of ``resp``'s socket (``readinto``, ``read``), its failures as
        urllib3's (the socket closed, not reused)."""
        try:
            return read(arg)
        except BaseException as exc:
            resp.close()
            raise self._failure(exc, resp.url) from exc

    def done(self, conn: _Conn, *, reuse: bool) -> None:
        if reuse:
            with self._lock:
                idle = self._idle.setdefault(conn.key, [])
                if len(idle) < self._pool_size:
                    idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()
