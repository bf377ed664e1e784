"""SDK transfers through a real server (SQLite metadata, moto S3 in server mode behind a
loopback proxy): request counts per blob for ``log`` and ``download()``, transfers in flight,
the transfer pool's memory bound, and a fully cached download that asks the store for nothing.

Counted, never timed: HTTP exchanges of the SDK's store (a response hook on its session), the
server's own requests to S3 (moto's request log), TCP connections opened to S3 (the proxy).
"""

from __future__ import annotations

import glob
import math
import os
import re
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests._sdk_fixtures import tree_of, write_tree
from tests.server_fixtures import LoopbackProxy, MotoS3, ServerFactory, RegistryServer, start_moto, stop_process

pytestmark = pytest.mark.timeout(180)


@dataclass
class World:
    moto: MotoS3
    moto_log: Path
    proxy: LoopbackProxy  #: between the server's presigned URLs (and the server) and S3
    bucket: str
    factory: ServerFactory
    server: RegistryServer

    def s3_requests(self, method: str) -> int:
        """Requests of ``method`` moto answered on this world's bucket so far."""
        needle = f'"{method} /{self.bucket}/'
        return sum(line.count(needle) for line in self.moto_log.read_text(errors="replace").splitlines())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("transfers")
    moto = start_moto(tmp)
    (log,) = glob.glob(str(tmp / "moto-*.log"))
    proxy = LoopbackProxy(int(moto.url.rsplit(":", 1)[1]))
    bucket = moto.new_bucket()
    factory = ServerFactory(f"sqlite:///{tmp / 'registry.db'}", f"s3://{bucket}/blobs", tmp, s3_endpoint=proxy.url)
    try:
        yield World(moto, Path(log), proxy, bucket, factory, factory.start())
    finally:
        factory.stop_all()
        proxy.close()
        stop_process(moto.proc)


@pytest.fixture
def sdk(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The SDK pointed at the world's server as a fresh user; yields the entity."""
    import uuid

    from client import live_run as run_mod
    from client import transfer

    entity = f"u{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ARTIFACTFS_STORE", world.server.url)
    monkeypatch.setenv("ARTIFACTFS_API_KEY", world.factory.user(entity))
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ARTIFACTFS_CACHE_SIZE", "1G")
    monkeypatch.setenv("ARTIFACTFS_ENTITY", entity)
    monkeypatch.setenv("ARTIFACTFS_PROJECT", "proj")
    monkeypatch.chdir(tmp_path)
    transfer.close_stores()
    run_mod._reset_for_tests()
    yield entity
    run_mod._reset_for_tests()
    transfer.close_stores()


def _count_http(store: object) -> list[tuple[str, str]]:
    """Every HTTP exchange of the store's session as (method, path): observed, not mocked."""
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def hook(method: str, url: str, headers: object) -> None:
        with lock:
            seen.append((method, urlsplit(url).path))

    store.observe(hook)  # type: ignore[attr-defined]
    return seen


def _files(n: int, size: int, seed: int = 0) -> dict[str, bytes]:
    import random

    rnd = random.Random(seed)
    return {f"d{i % 4}/f{i:03d}.bin": rnd.randbytes(size) for i in range(n)}


def _log(tmp_path: Path, files: dict[str, bytes], name: str = "data") -> object:
    import client

    root = write_tree(tmp_path / f"src-{name}", files)
    with client.init(job_type="test") as run:
        art = client.Artifact(name, type="dataset")
        art.add_dir(str(root))
        run.log_artifact(art)
    return art


def _kind(method: str, path: str) -> str:
    """"s3 GET", "POST /missing", "POST /<md5>/complete", "GET api" (other server calls)."""
    if "/api/v1/" not in path:
        return f"s3 {method}"
    return f"{method} {path.split('/blobs', 1)[1]}" if "/blobs/" in path else f"{method} api"


def _per_blob(kinds: list[str]) -> list[str]:
    return [k for k in kinds if re.match(r"\w+ /[0-9a-f]{32}", k)]


def test_log_sends_no_request_per_blob_to_the_server_and_no_head_to_s3(world: World, sdk: str,
                                                                        tmp_path: Path) -> None:
    """Per blob: one PUT straight to S3 and nothing else; the checks and registrations are
    batched (ceil(N / batch) calls each) and the server does not HEAD what S3 already verified."""
    from client import transfer

    n = 40
    files = _files(n, 2000)
    store = transfer.get_store()
    store.PLAN_BATCH = 16  # type: ignore[attr-defined]  # a small batch so the count says "batched"
    seen = _count_http(store)
    heads = world.s3_requests("HEAD")
    _log(tmp_path, files)
    kinds = [_kind(m, p) for m, p in seen]
    assert kinds.count("s3 PUT") == n + 1  # the blobs and the manifest
    assert _per_blob(kinds) == []
    batches = math.ceil(n / 16)
    assert kinds.count("POST /missing") <= batches + 1  # + the manifest's own check
    assert kinds.count("POST /completed") <= batches + 1
    assert world.s3_requests("HEAD") == heads  # no HEAD after a PUT whose Content-MD5 S3 checked
    # and what was logged reads back right
    import client

    art = client.Api().artifact(f"{sdk}/proj/data:latest")
    assert tree_of(Path(art.download(str(tmp_path / "out")))) == files


def test_cold_download_signs_in_batches_and_keeps_transfers_in_flight(world: World, sdk: str,
                                                                      tmp_path: Path) -> None:
    """An empty cache: URLs signed ceil(N / batch) times, no per-blob server request, one GET
    per blob, and more transfers at once than the old 8 (TCP connections to S3 through a slow
    proxy)."""
    import client
    from client import transfer

    n, size = 48, 100_000
    files = _files(n, size, seed=1)
    _log(tmp_path, files)
    transfer.close_stores()
    (tmp_path / "cache").rename(tmp_path / "cache-upload")  # the log filled the cache
    art = client.Api().artifact(f"{sdk}/proj/data:latest")
    assert len(art.manifest) == n  # the manifest is read before counting
    store = transfer.get_store()
    store.URL_BATCH = 16  # type: ignore[attr-defined]
    seen = _count_http(store)
    world.proxy.peak = 0  # moto answers HTTP/1.0: a connection per request, so this is requests at once
    world.proxy.rate = 200_000  # bytes/s per connection: each blob's GET takes about 0.5 s
    try:
        art.download(str(tmp_path / "out"))
    finally:
        world.proxy.rate = None
    kinds = [_kind(m, p) for m, p in seen]
    assert kinds.count("s3 GET") == n
    assert kinds.count("POST /urls") <= math.ceil(n / 16)
    assert _per_blob(kinds) == []
    assert world.proxy.peak >= 12  # transfers in flight at once (was at most 8)
    assert tree_of(tmp_path / "out") == files


def test_download_memory_is_bounded_by_the_transfer_budget(world: World, sdk: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes held by transfers in flight stay under the budget however many workers run
    (traced allocations of this process: the bodies read into memory are Python objects)."""
    import client
    from client import transfer

    size = 1_500_000
    files = _files(12, size, seed=2)
    _log(tmp_path, files)
    transfer.close_stores()
    (tmp_path / "cache").rename(tmp_path / "cache-upload")
    monkeypatch.setenv("ARTIFACTFS_TRANSFER_MEMORY", str(2 * size))
    art = client.Api().artifact(f"{sdk}/proj/data:latest")
    assert len(art.manifest) == 12
    tracemalloc.start()
    try:
        art.download(str(tmp_path / "out"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the budget, plus one body in passing and bookkeeping (8 workers held 8 bodies at once)
    assert peak < 2 * size + size + (2 << 20), peak
    assert tree_of(tmp_path / "out") == files


def test_fully_cached_download_asks_the_store_nothing_per_file(world: World, sdk: str, tmp_path: Path) -> None:
    """Every blob in the cache: ``download()`` resolves once, then copies from the cache objects
    (no request at all, no hashing of objects whose verified marker holds), and a corrupted
    object is still caught."""
    import client
    from client import transfer
    from client.hashing import md5_bytes

    n = 60
    files = _files(n, 3000, seed=3)
    _log(tmp_path, files)
    art = client.Api().artifact(f"{sdk}/proj/data:latest")
    art.download(str(tmp_path / "first"))  # fills whatever the log did not
    store = transfer.get_store()
    seen = _count_http(store)
    art.download(str(tmp_path / "second"))
    assert seen == []
    assert tree_of(tmp_path / "second") == files
    # a cache object changed behind our back is detected (its marker no longer holds) and replaced
    victim = next(iter(files.values()))
    obj = transfer.get_cache().path(md5_bytes(victim))
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"X")
    art.download(str(tmp_path / "third"))
    assert tree_of(tmp_path / "third") == files


def _ranged_gets(store: object, md5: str) -> list[str]:
    """The Range header of every GET of blob ``md5`` the store sends to S3 (observed, in order)."""
    seen: list[str] = []
    lock = threading.Lock()

    def hook(method: str, url: str, headers: object) -> None:
        if method == "GET" and "/api/v1/" not in urlsplit(url).path and md5[2:] in urlsplit(url).path:
            with lock:
                seen.append(str(dict(headers).get("Range", "")))  # type: ignore[call-overload]

    store.observe(hook)  # type: ignore[attr-defined]
    return seen


def test_a_large_cold_blob_is_one_stream_resumed_where_it_broke(world: World, sdk: str, tmp_path: Path) -> None:
    """A 40 MiB blob (above the 16 MiB whole-body limit) downloads as ONE streamed GET straight
    into the cache (it was a 16 MiB part, then two more ranged parts, through a part file and
    a copy), and a connection cut mid-way resumes at the byte it reached, not at a part's
    start; the bytes are right either way."""
    import client
    from client import transfer
    from client.hashing import md5_bytes

    size = 40 << 20
    files = {"model.bin": os.urandom(size)}
    _log(tmp_path, files, name="big")
    for attempt, cut in (("whole", None), ("cut", 8 << 20)):
        transfer.close_stores()
        cache = tmp_path / "cache"
        if cache.exists():
            cache.rename(tmp_path / f"cache-before-{attempt}")  # cold: an empty cache each time
        art = client.Api().artifact(f"{sdk}/proj/big:latest")
        ranges = _ranged_gets(transfer.get_store(), md5_bytes(files["model.bin"]))
        world.proxy.cut_after, world.proxy.cut_times, world.proxy.cuts = cut, 1, 0
        try:
            art.download(str(tmp_path / f"out-{attempt}"))
        finally:
            world.proxy.cut_after = world.proxy.cut_times = None
        assert tree_of(tmp_path / f"out-{attempt}") == files
        starts = [int(r.split("=")[1].split("-")[0]) for r in ranges]
        if cut is None:
            assert starts == [0], ranges
        else:
            assert len(starts) == 2 and starts[0] == 0, ranges
            assert 0 < starts[1] <= cut, ranges  # resumed where the stream broke
            assert world.proxy.cuts == 1


def test_a_cold_download_of_small_files_writes_the_cache_in_batches(world: World, sdk: str, tmp_path: Path) -> None:
    """200 small blobs into an empty cache: their index rows go in a few transactions (one per
    CACHE_BATCH blobs; it was an eviction check and a transaction per blob), each object is
    durable and marked verified (the next download copies it without hashing), and no temp
    file is left."""
    import client
    from client import transfer
    from client.cache import has_verified_marker

    n = 200
    files = _files(n, 3000, seed=7)
    _log(tmp_path, files, name="small")
    transfer.close_stores()
    (tmp_path / "cache").rename(tmp_path / "cache-logged")  # cold
    art = client.Api().artifact(f"{sdk}/proj/small:latest")
    cache = transfer.get_cache()
    before = cache.index.queries
    art.download(str(tmp_path / "out"))
    statements = cache.index.queries - before
    assert tree_of(tmp_path / "out") == files
    assert statements <= 4 * -(-n // transfer.CACHE_BATCH) + 4, statements
    from client.hashing import md5_bytes

    for data in files.values():
        obj = cache.path(md5_bytes(data))
        fd = os.open(obj, os.O_RDONLY)
        try:
            assert has_verified_marker(fd, md5_bytes(data)), obj
        finally:
            os.close(fd)
        assert cache.index.has(md5_bytes(data))
    assert not list(cache.tmp_dir.iterdir())


def test_a_large_download_over_a_link_that_keeps_breaking_fails_in_bounded_requests(
        world: World, sdk: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection cut after 512 KiB: each round of the stream's retry policy moves about
    3 MiB of the 40 MiB blob, less than RESUME_MIN_PROGRESS, so the download fails with a clear
    error after THIN_ROUNDS rounds; it used to resume round after round through the whole blob
    (each GET a little further, about 80 of them here, hours for a large file).  Nothing is left
    under the destination's name and the cache holds no object for the blob."""
    import client
    from client import transfer
    from client.errors import StoreUnavailableError
    from client.hashing import md5_bytes
    from client.retry import THIN_ROUNDS, RetryPolicy

    monkeypatch.setattr(transfer, "_STREAM_POLICY", RetryPolicy(backoff=0.01, max_backoff=0.02))
    size = 40 << 20
    files = {"model.bin": os.urandom(size)}
    md5 = md5_bytes(files["model.bin"])
    _log(tmp_path, files, name="flaky")
    transfer.close_stores()
    (tmp_path / "cache").rename(tmp_path / "cache-logged")  # cold
    art = client.Api().artifact(f"{sdk}/proj/flaky:latest")
    ranges = _ranged_gets(transfer.get_store(), md5)
    world.proxy.cut_after, world.proxy.cut_times, world.proxy.cuts = 512 << 10, None, 0
    try:
        with pytest.raises(StoreUnavailableError, match="stopped at"):
            art.download(str(tmp_path / "out"))
    finally:
        world.proxy.cut_after = None
    assert len(ranges) <= THIN_ROUNDS * RetryPolicy().tries, ranges
    assert not (tmp_path / "out" / "model.bin").exists()
    assert not list((tmp_path / "cache").rglob(md5))


def test_a_multipart_upload_waits_for_the_servers_verification(world: World, tmp_path: Path) -> None:
    """The server reads a multipart upload back from S3 before ``/complete`` answers; with a
    slow S3 (0.8 s added to each request, through the proxy: five or more requests) that takes
    longer than the client's read timeout (2.5 s here, enough for the plan's one request).  The client waits as long as verifying that size may take, so the
    upload succeeds with ONE ``/complete`` (it used to time out, retry, and fail)."""
    import hashlib

    from tests.server_fixtures import SMALL_MULTIPART, make_store

    server = world.factory.start(env=SMALL_MULTIPART)
    try:
        entity = f"slow{os.getpid()}"
        store = make_store(server.url, world.factory.user(entity), timeout=2.5)
        seen = _count_http(store)
        data = os.urandom((12 << 20) + 3)
        src = tmp_path / "big.bin"
        src.write_bytes(data)
        md5 = hashlib.md5(data).hexdigest()
        world.proxy.delay = 0.8
        try:
            store.put_blob(entity, md5, src, len(data))
        finally:
            world.proxy.delay = 0.0
        assert [p for m, p in seen if p.endswith("/complete")] == [f"/api/v1/entities/{entity}/blobs/{md5}/complete"]
        assert store.missing_blobs(entity, [md5]) == set()
        assert store.read_blob(entity, md5) == data
        store.close()
    finally:
        server.stop()
