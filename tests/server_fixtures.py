"""Real parts for the server tests: a throwaway PostgreSQL cluster, an S3 endpoint (moto in
server mode), registry servers as uvicorn subprocesses on loopback ports, and a TCP proxy that
can cut connections mid-transfer.

Import the fixtures by name from a test module (``from tests.server_fixtures import …``).
Nothing is mocked: what the tests talk to listens on a socket.  PostgreSQL comes from the
Debian package (``apt-get install postgresql``); without it the PostgreSQL cases are skipped
with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def listening_port(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> int:
    """The TCP port ``proc`` listens on, having been told to bind port 0: read from /proc, so no
    port is chosen before it is bound (a port picked and released first can be taken meanwhile,
    by another test run on this machine too, and then a health check may reach its server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:["):-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table, encoding="ascii") as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                        return int(fields[1].rsplit(":", 1)[1], 16)
        time.sleep(0.02)
    raise RuntimeError(f"process {proc.args} did not listen within {timeout}s")


def wait_for_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 30.0,
                  verify: str | bool = True) -> None:
    """Poll ``url`` until it answers; fail fast (with the log) if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{text}")
        try:
            requests.get(url, timeout=1, verify=verify)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- PostgreSQL ---------------------------------------------------------------------------------
@dataclass
class PostgresCluster:
    bindir: Path
    datadir: Path
    sockdir: Path
    as_postgres: bool

    def _run(self, *cmd: str) -> subprocess.CompletedProcess[bytes]:
        full = (["runuser", "-u", "postgres", "--"] if self.as_postgres else []) + list(cmd)
        return subprocess.run(full, check=True, capture_output=True, timeout=60)

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL (unix socket, no password)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host=str(self.sockdir), user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@/{name}?host={self.sockdir}"


    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> PostgresCluster:
    """Start a throwaway cluster in a temp dir, on a unix socket only (no TCP port).

    RuntimeError (with the reason) where it cannot run: not installed, or root without runuser.
    As root, initdb/postgres run as the ``postgres`` user (PostgreSQL refuses to run as root).
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(found[-1]).parent
    as_postgres = os.geteuid() == 0
    if as_postgres and shutil.which("runuser") is None:
        raise RuntimeError("running as root without runuser: cannot start PostgreSQL as the postgres user")
    base = Path(tempfile.mkdtemp(prefix="afs-pg-"))
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir()
    if as_postgres:
        os.chmod(base, 0o755)
        shutil.chown(base, "postgres")
        shutil.chown(sockdir, "postgres")
    cluster = PostgresCluster(bindir, datadir, sockdir, as_postgres)
    try:
        cluster._run(str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync")
        opts = f"-k {sockdir} -c listen_addresses='' -c fsync=off -c max_connections=300 -c synchronous_commit=off"
        cluster._run(str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(base / "log"), "-o", opts, "-w", "start")
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        raise RuntimeError(f"could not start PostgreSQL: {exc} {detail.decode(errors='replace')[-500:]}") from exc
    return cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL for the session; skipped, with the reason, where it cannot run."""
    try:
        cluster = start_postgres()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


# -- S3 (moto server mode) ----------------------------------------------------------------------
@dataclass
class MotoS3:
    url: str
    proc: subprocess.Popen[bytes]

    def new_bucket(self) -> str:
        import boto3

        name = "afs-" + uuid.uuid4().hex[:12]
        boto3.client("s3", endpoint_url=self.url, **_boto_kwargs()).create_bucket(Bucket=name)
        return name


def _boto_kwargs() -> dict[str, Any]:
    return {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def start_moto(tmp: Path) -> MotoS3:
    log = tmp / f"moto-{uuid.uuid4().hex[:8]}.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    url = f"http://127.0.0.1:{listening_port(proc, log)}"
    wait_for_http(url + "/moto-api/", proc, log)
    return MotoS3(url, proc)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """One moto S3 server for the session (each test takes its own bucket)."""
    s3 = start_moto(tmp_path_factory.mktemp("moto"))
    yield s3
    stop_process(s3.proc)


# -- a TCP proxy that breaks connections on purpose -------------------------------------------
class LoopbackProxy:
    """Forwards loopback TCP to ``upstream``; can slow, refuse or cut connections, and counts
    the bytes it forwarded each way.

    ``rate``: bytes/s per connection and direction (None: as fast as it goes); ``cut_after``:
    close a connection once this many bytes went through it in either direction (None: never);
    ``cut_times``: how many connections to cut before passing everything again (None: all of
    them); ``refuse``: close new connections at once (the service looks down); ``delay``: seconds
    added before each request a client sends, i.e. before the first client -> server chunk after
    the connection opened or the server answered (the latency of a distant endpoint; 0: none).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after: int | None = None
        self.cut_times: int | None = None
        self.refuse = False
        self.rate: float | None = None
        self.delay = 0.0
        self.delays = 0  #: requests delayed so far
        self.cuts = 0
        self.active = 0  #: connections being served now
        self.peak = 0  #: the most connections served at once (reset it to measure a span)
        self.up = 0  #: client -> server bytes
        self.down = 0  #: server -> client bytes
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        """(client -> server, server -> client) bytes forwarded so far."""
        with self._lock:
            return self.up, self.down

    def drop_all(self) -> None:
        """Reset every open connection (with ``refuse``: the service went away)."""
        with self._lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _should_cut(self) -> int | None:
        with self._lock:
            if self.cut_after is None or (self.cut_times is not None and self.cuts >= self.cut_times):
                return None
            return self.cut_after

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.update((client, upstream))
            self.active += 1
            self.peak = max(self.peak, self.active)
        answered = [True]  #: the server spoke last (or nobody yet): the next upward chunk starts a request

        def pump(src: socket.socket, dst: socket.socket, upward: bool) -> None:
            sent = 0
            try:
                while data := src.recv(65536):
                    if upward and answered[0] and self.delay:
                        with self._lock:
                            self.delays += 1
                        time.sleep(self.delay)
                    answered[0] = not upward
                    limit = self._should_cut()  # read per chunk: arming affects open connections too
                    if limit is not None and sent + len(data) > limit:
                        dst.sendall(data[: max(0, limit - sent)])
                        with self._lock:
                            self.cuts += 1
                        break
                    rate = self.rate
                    if rate:
                        time.sleep(len(data) / rate)
                    dst.sendall(data)
                    sent += len(data)
                    with self._lock:
                        if upward:
                            self.up += len(data)
                        else:
                            self.down += len(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
        pump(upstream, client, False)
        with self._lock:
            self.active -= 1

    def close(self) -> None:
        self._sock.close()


# -- TLS ------------------------------------------------------------------------------------------
def make_tls_files(tmp: Path, host_ip: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for ``host_ip``: (cert, key, ca)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def build(subject: str, issuer: x509.Name | None, issuer_key: Any, pub: Any, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False,
                                              encipher_only=False, decipher_only=False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host_ip))]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("artifactfs test CA", None, ca_key, ca_key.public_key(), True)
    srv_cert = build(host_ip, ca_cert.subject, ca_key, srv_key.public_key(), False)
    pem = serialization.Encoding.PEM
    cert, key, ca = tmp / "server.pem", tmp / "server.key", tmp / "ca.pem"
    cert.write_bytes(srv_cert.public_bytes(pem))
    key.write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ca.write_bytes(ca_cert.public_bytes(pem))
    return cert, key, ca


# -- registry servers ---------------------------------------------------------------------------
@dataclass
class RegistryServer:
    url: str
    db_url: str
    blobs_url: str
    proc: subprocess.Popen[bytes]
    log: Path
    s3_endpoint: str | None = None
    keys: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class ServerFactory:
    """Starts servers on one database + blob store and creates users/teams/keys in it."""

    db_url: str
    blobs_url: str
    tmp: Path
    s3_endpoint: str | None = None
    url_ttl: int = 300
    servers: list[RegistryServer] = field(default_factory=list)
    _auth: Any = None

    @property
    def auth(self) -> Any:
        if self._auth is None:
            from client.registry.core import make_engine
            from server.auth import AuthDB

            self._auth = AuthDB(make_engine(self.db_url))
        return self._auth

    def start(self, *, workers: int = 1, s3_endpoint: str | None = None, port: int | None = None,
              env: dict[str, str] | None = None, tls: tuple[Path, Path, Path] | None = None,
              args: tuple[str, ...] = (), new_session: bool = False,
              timeout: float = 30.0) -> RegistryServer:
        """``tls``: (certificate, key, CA that signed it): serve https on 127.0.0.1; ``args``: more options;
        ``new_session``: in a session of its own (so a scheduler with autogroups gives it its own CPU
        share, as a server on its own machine has, instead of sharing the caller's; benchmarks);
        ``timeout``: how long it may take to listen (it is stopped if it does not)."""
        log = self.tmp / f"server-{port or uuid.uuid4().hex[:8]}.log"
        endpoint = s3_endpoint or self.s3_endpoint
        cmd = [sys.executable, "-m", "server.cli", "server", "--db", self.db_url, "--blobs", self.blobs_url,
               "--host", "127.0.0.1", "--port", str(port or 0), "--workers", str(workers),
               "--url-ttl", str(self.url_ttl), "--log-level", "warning"]
        if endpoint:
            cmd += ["--s3-endpoint-url", endpoint]
        if tls:
            cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        cmd += list(args)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, **S3_ENV, **(env or {}), "PYTHONPATH": str(ROOT)},
                                start_new_session=new_session)
        try:
            url = f"{'https' if tls else 'http'}://127.0.0.1:{port or listening_port(proc, log, timeout)}"
            wait_for_http(url + "/healthz", proc, log, timeout, verify=str(tls[2]) if tls else True)
        except RuntimeError:
            stop_process(proc)
            raise
        srv = RegistryServer(url, self.db_url, self.blobs_url, proc, log, endpoint)
        self.servers.append(srv)
        return srv

    def user(self, name: str, teams: tuple[str, ...] = (), role: str = "member") -> str:
        """Create a user (and its personal entity), add it to ``teams``; returns an API key."""
        from client.errors import ConflictError

        self.auth.create_user(name)
        for team in teams:
            try:
                self.auth.create_team(team)
            except ConflictError:
                pass
            self.auth.add_member(team, name, role)
        return self.auth.create_key(name)

    def stop_all(self) -> None:
        for srv in self.servers:
            srv.stop()
        if self._auth is not None:
            self._auth.engine.dispose()


BACKENDS = ["sqlite-local", "postgres-s3"]
#: Small multipart thresholds so tests exercise presigned multipart uploads with ~12 MiB files.
SMALL_MULTIPART = {"ARTIFACTFS_S3_MULTIPART_THRESHOLD": str(6 << 20), "ARTIFACTFS_S3_PART_SIZE": str(5 << 20)}


def new_factory(backend: str, request: pytest.FixtureRequest, tmp: Path, **kwargs: Any) -> ServerFactory:
    """A fresh registry (database + blob store) of the given backend."""
    if backend == "sqlite-local":
        return ServerFactory(f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs"), tmp, **kwargs)
    pg: PostgresCluster = request.getfixturevalue("postgres")
    s3: MotoS3 = request.getfixturevalue("moto_s3")
    return ServerFactory(pg.new_database(), f"s3://{s3.new_bucket()}/blobs", tmp, s3_endpoint=s3.url, **kwargs)


@dataclass
class SharedRegistry:
    """One registry per backend per test module, served by one server (a second on demand).

    Starting a server costs seconds (imports), so tests share it and keep out of each other's
    way with unique user and team names from :meth:`new_user`.
    """

    backend: str
    factory: ServerFactory
    server: RegistryServer
    _second: RegistryServer | None = None

    @property
    def second(self) -> RegistryServer:
        """Another server (two worker processes) on the same database and blobs."""
        if self._second is None:
            self._second = self.factory.start(workers=2, env=SMALL_MULTIPART)
        return self._second

    def new_user(self, prefix: str = "u", teams: tuple[str, ...] = (), role: str = "member") -> tuple[str, str]:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return name, self.factory.user(name, teams, role)

    def new_team(self, prefix: str = "team") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.factory.auth.create_team(name)
        return name


@pytest.fixture(scope="module", params=BACKENDS)
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRegistry]:
    """A running server over SQLite + a blob directory, or over PostgreSQL + S3 (moto)."""
    factory = new_factory(request.param, request, tmp_path_factory.mktemp(request.param))
    try:
        yield SharedRegistry(request.param, factory, factory.start(env=SMALL_MULTIPART))
    finally:
        factory.stop_all()


def make_store(url: str, key: str | None, **kwargs: Any) -> Any:
    from client.store.http import HttpStore

    return HttpStore(url, key, **kwargs)


def on_each(fn: Callable[..., Any], items: list[Any], threads: int) -> list[Any]:
    """Run ``fn`` over ``items`` on ``threads`` threads; re-raise the first failure."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


@dataclass
class InProcessServer:
    """A registry server in a thread of the test process: for suites that need a fresh registry
    per test, where a subprocess per test would cost seconds of imports each time."""

    url: str
    app_server: Any  #: server.app.Server (registry, blobs, auth)
    uvicorn_server: Any
    thread: threading.Thread

    def user(self, name: str, teams: tuple[str, ...] = ()) -> str:
        from client.errors import ConflictError

        auth = self.app_server.auth
        auth.create_user(name)
        for team in teams:
            with contextlib.suppress(ConflictError):
                auth.create_team(team)
            auth.add_member(team, name)
        return auth.create_key(name)

    def stop(self) -> None:
        self.uvicorn_server.should_exit = True
        self.thread.join(10)
        self.app_server.close()


def start_inprocess_server(monkeypatch: pytest.MonkeyPatch, db_url: str, blobs_url: str,
                           s3_endpoint: str | None = None) -> InProcessServer:
    """A server in this process; its S3 credentials (moto's) are set for the calling test only."""
    import uvicorn

    from server.app import Server, create_app

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    app_server = Server(db_url, blobs_url, s3_endpoint)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no port can be lost in between
    port = sock.getsockname()[1]
    from server.cli import PROTOCOLS

    config = uvicorn.Config(create_app(app_server), log_level="warning", **PROTOCOLS)  # as `artifactfs server`
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-process server did not start")
        time.sleep(0.01)
    return InProcessServer(f"http://127.0.0.1:{port}", app_server, srv, thread)
