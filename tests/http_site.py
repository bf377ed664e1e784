"""One loopback HTTP server for reference tests (SDK and mount): bytes by path, ETag = the quoted
md5 (or none), Range (206/416) and If-Match (412) honoured unless told not to, 403 for chosen
paths; every request is logged as (method, path, Range, If-Match)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from client.hashing import md5_bytes


class Site:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.etags = True  #: send an ETag at all
        self.forbidden: set[str] = set()  #: paths answered 403 (credentials refused)
        self.honour_if_match = True
        self.honour_range = True
        self.requests: list[tuple[str, str, str | None, str | None]] = []  #: method, path, Range, If-Match


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _empty(self, status: int, **headers: str) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            rng, if_match = self.headers.get("Range"), self.headers.get("If-Match")
            site.requests.append((self.command, self.path, rng, if_match))
            data = site.files.get(self.path)
            if self.path in site.forbidden:
                return self._empty(403)
            if data is None:
                return self._empty(404)
            etag = f'"{md5_bytes(data)}"' if site.etags else None
            if if_match and etag and if_match != etag and site.honour_if_match:
                return self._empty(412)
            status, part, lo, hi = 200, data, 0, len(data) - 1
            if rng and site.honour_range:
                lo_s, hi_s = rng.removeprefix("bytes=").split("-")
                lo, hi = int(lo_s), min(int(hi_s), len(data) - 1)
                if lo >= len(data):
                    return self._empty(416, Content_Range=f"bytes */{len(data)}")
                status, part = 206, data[lo:hi + 1]
            self.send_response(status)
            if etag:
                self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(part)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(part)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

    return Handler


@contextmanager
def serving() -> Iterator[tuple[Site, str]]:
    """A :class:`Site` on 127.0.0.1 (a port the OS chose) and its base URL, for one test."""
    site = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
