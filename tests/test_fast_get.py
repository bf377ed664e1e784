"""The blob GET's keep-alive path (client/store/fast_get.py), against real sockets on loopback:
a scripted HTTP/1.1 server for the answers S3 seldom gives, and the real registry server for
the cost of one blob read."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3.exceptions

from client.hashing import md5_bytes
from client.retry import is_transport_failure
from client.store.http_blobs import BlobHTTP
from tests.server_fixtures import SharedRegistry, make_store, moto_s3, postgres, registry  # noqa: F401
from tests.util import commit_files

BODY = bytes(range(256)) * 400  # 102,400 bytes


class ScriptedServer:
    """HTTP/1.1 on loopback; what it answers is chosen by the request's path:

    ``/ok``: the body (206 for a Range), kept alive; ``/drop``: the body, then the socket
    closed without saying so (a server that ends idle connections); ``/chunked``: a chunked
    body; ``/moved``: a redirect to ``/ok``; ``/stall``: headers and half the body, then
    silence; ``/cut``: headers and half the body, then the socket closed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.requests: list[str] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                path = line.split()[1].decode()
                self.requests.append(path)
                kind = path.split("?")[0]
                rng = headers.get("range")
                body, status = BODY, "200 OK"
                extra = ""
                if rng and kind in ("/ok", "/drop"):
                    a, b = (int(x) for x in rng.split("=")[1].split("-"))
                    body, status = BODY[a:b + 1], "206 Partial Content"
                    extra = f"Content-Range: bytes {a}-{b}/{len(BODY)}\r\n"
                if kind == "/moved":
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n")
                    continue
                if kind == "/chunked":
                    chunks = b"".join(b"%x\r\n%s\r\n" % (len(BODY[i:i + 4096]), BODY[i:i + 4096])
                                      for i in range(0, len(BODY), 4096))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
                    continue
                head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
                if kind in ("/stall", "/cut"):
                    conn.sendall(head + body[:len(body) // 2])
                    if kind == "/stall":
                        self._stop.wait(10)
                    return
                conn.sendall(head + body)
                if kind == "/drop":
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def site() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def http() -> Iterator[BlobHTTP]:
    h = BlobHTTP(True, explicit=False, pool_size=4)
    yield h
    h.close()


def test_blob_gets_share_one_kept_alive_socket(site: ScriptedServer, http: BlobHTTP) -> None:
    for i in range(20):
        resp = http.get(f"{site.url}/ok?X-Amz-Signature=abc%2Fdef&n={i}", {"Range": "bytes=100-199"}, (2, 2), stream=False)
        assert resp.status == 206 and resp.data == BODY[100:200]
        assert resp.headers.get("content-range") == resp.headers.get("Content-Range") == f"bytes 100-199/{len(BODY)}"
    assert site.accepted == 1 and http.fast.opened == 1
    # the presigned query is sent exactly as given, never re-encoded
    assert site.requests[0] == "/ok?X-Amz-Signature=abc%2Fdef&n=0"


def test_a_socket_the_server_closed_while_idle_is_replaced_without_a_failure(site: ScriptedServer, http: BlobHTTP) -> None:
    for _ in range(3):
        resp = http.get(f"{site.url}/drop", {}, (2, 2), stream=False)
        assert resp.data == BODY
        time.sleep(0.05)  # the server has closed the socket by the next request
    assert site.accepted == 3
    assert site.requests == ["/drop"] * 3  # each request reached the server once


@pytest.mark.parametrize("path", ["/chunked", "/moved"])
def test_answers_this_path_does_not_read_go_through_urllib3(site: ScriptedServer, http: BlobHTTP, path: str) -> None:
    """A chunked body or a redirect: the same GET is sent again through urllib3, which reads
    or follows it; the caller gets the right bytes either way."""
    resp = http.get(f"{site.url}{path}", {}, (2, 2), stream=False)
    assert resp.status == 200 and resp.data == BODY
    assert isinstance(resp, urllib3.BaseHTTPResponse)


def test_a_stalled_body_is_a_read_timeout_and_a_cut_one_a_protocol_error(site: ScriptedServer, http: BlobHTTP) -> None:
    """Both are transport failures the one retry policy retries; the wait is the read timeout."""
    t0 = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError) as stalled:
        http.get(f"{site.url}/stall", {}, (2, 0.5), stream=False)
    assert time.monotonic() - t0 < 3 and is_transport_failure(stalled.value)
    with pytest.raises(urllib3.exceptions.ProtocolError) as cut:
        http.get(f"{site.url}/cut", {}, (2, 2), stream=False)
    assert is_transport_failure(cut.value)
    # streamed: the reader sees the end early (readinto 0), and the socket is not reused
    resp = http.get(f"{site.url}/cut", {}, (2, 2), stream=True)
    buf = bytearray(len(BODY))
    got = 0
    while n := resp.readinto(memoryview(buf)[got:]):
        got += n
    assert got == len(BODY) // 2
    resp.close()
    before = http.fast.opened
    assert http.get(f"{site.url}/ok", {}, (2, 2), stream=False).data == BODY
    assert http.fast.opened == before + 1


def test_a_refused_connection_is_never_sent(http: BlobHTTP) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    with pytest.raises(urllib3.exceptions.NewConnectionError) as info:
        http.get(f"http://127.0.0.1:{port}/ok", {}, (1, 1), stream=False)
    assert is_transport_failure(info.value)


def _python_calls(fn: Any) -> int:
    """Python function calls ``fn()`` makes in this thread (the CPU of pure-Python layers)."""
    calls = 0

    def prof(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_a_small_blob_read_costs_few_python_calls(registry: SharedRegistry, tmp_path: Path) -> None:  # noqa: F811
    """One cold small-file read (the URL already signed) through the real server's blob URL:
    through urllib3 the read was 370-440 Python calls (its pool, URL parsing and re-encoding,
    http.client and the email header parser); on the keep-alive path 67-90."""
    team = registry.new_team("fast")
    _, key = registry.new_user(f"fast{os.getpid()}", teams=(team,))
    store = make_store(registry.server.url, key)
    data = os.urandom(100 << 10)
    commit_files(store, tmp_path, {"a.bin": data}, entity=team)
    md5 = md5_bytes(data)
    store.prefetch_urls(team, [md5])
    assert store.read_blob(team, md5, 0, len(data)) == data  # the socket is open and kept
    got: list[bytes] = []
    calls = _python_calls(lambda: got.append(store.read_blob(team, md5, 0, len(data))))
    assert got == [data]
    assert calls < 150, calls
    store.close()
