"""The Store protocol over HTTP, against real servers: SQLite + blob directory, and
PostgreSQL + S3 (moto in server mode).  The registry rules themselves are the core's (see
test_registry.py); these tests check that they survive the trip over the wire, across
clients and across server processes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from client.errors import ConflictError, InvalidNameError, MissingBlobError, NotFoundError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest
from tests.server_fixtures import SharedRegistry, make_store, moto_s3, on_each, postgres, registry  # noqa: F401
import tests.test_registry as registry_rules
from tests.util import commit_files, run_rule, store_rules, upload_bytes

pytestmark = pytest.mark.timeout(120)


def test_version_logged_through_one_server_is_latest_on_another(registry: SharedRegistry, tmp_path: Path) -> None:
    """Two stateless server processes on one registry; two clients with different keys."""
    lab = registry.new_team("lab")
    _, key_a = registry.new_user("alice", teams=(lab,))
    bob, key_b = registry.new_user("bob", teams=(lab,))
    writer, reader = make_store(registry.server.url, key_a), make_store(registry.second.url, key_b)
    v0, created = commit_files(writer, tmp_path, {"a.txt": b"first", "d/b.bin": os.urandom(300_000)},
                               entity=lab, aliases=("best",))
    assert created and v0.index == 0
    assert reader.resolve(lab, "proj", "ds", "latest").id == v0.id
    data = os.urandom(1_000_000)
    v1, _ = commit_files(writer, tmp_path, {"a.txt": b"second", "d/b.bin": data}, entity=lab)
    seen = reader.resolve(lab, "proj", "ds", "latest")
    assert (seen.id, seen.index, seen.digest) == (v1.id, 1, v1.digest)
    assert reader.resolve(lab, "proj", "ds", "best").id == v0.id
    # the content, by ranges and whole
    md5 = md5_bytes(data)
    assert reader.read_blob(lab, md5, 1000, 4096) == data[1000:5096]
    assert reader.read_blob(lab, md5, len(data) - 10) == data[-10:]
    assert reader.read_blob(lab, md5, len(data) + 5, 10) == b""
    dest = tmp_path / "dl"
    reader.download_blob(lab, md5, dest)
    assert dest.read_bytes() == data
    # manifest is a blob like any other
    manifest = reader.read_blob(lab, seen.manifest_md5)
    assert b"d/b.bin" in manifest
    assert [c.name for c in reader.list_collections(lab, "proj")] == ["ds"]
    assert reader.list_types(lab, "proj") == ["dataset"]
    assert [v.index for v in reader.list_versions(lab, "proj", "ds")] == [0, 1]
    assert reader.get_collection(lab, "proj", "ds").aliases == {"latest": 1, "best": 0}
    assert reader.list_entities() == [lab]  # bob's personal entity holds nothing yet


def test_registry_rules_over_http(registry: SharedRegistry, tmp_path: Path) -> None:
    alice, key = registry.new_user("alice")
    store = make_store(registry.server.url, key)
    v0, _ = commit_files(store, tmp_path, {"a": b"1"}, entity=alice)
    again, created = commit_files(store, tmp_path, {"a": b"1"}, entity=alice, aliases=("prod",), tags=("gold",))
    assert not created and again.id == v0.id and set(again.aliases) == {"latest", "prod"}
    with pytest.raises(InvalidNameError):
        commit_files(store, tmp_path, {"a": b"2"}, entity=alice, aliases=("v3",))
    with pytest.raises(NotFoundError):
        store.resolve(alice, "proj", "ds", "v9")
    with pytest.raises(NotFoundError):
        store.get_collection(alice, "proj", "nope")
    # a manifest naming content never uploaded is refused
    ghost = Manifest([ManifestEntry("ghost", hex_to_b64(md5_bytes(b"never uploaded")), 14)]).to_bytes()
    manifest_md5 = upload_bytes(store, alice, ghost, tmp_path)
    with pytest.raises(MissingBlobError):
        store.commit(CommitRequest(alice, "proj", "ds", "dataset", manifest_md5))
    # updates, deletes
    upd = store.update_version(v0.id, aliases=["prod", "staging"], tags=["x"], metadata={"acc": 0.9},
                               description="d", ttl_seconds=3600)
    assert set(upd.aliases) == {"latest", "prod", "staging"} and upd.metadata == {"acc": 0.9}
    assert upd.ttl_seconds == 3600 and upd.description == "d"
    assert store.update_version(v0.id, description="e").ttl_seconds == 3600  # ttl kept
    with pytest.raises(ConflictError):
        store.delete_version(v0.id)
    v1, _ = commit_files(store, tmp_path, {"a": b"3"}, entity=alice)
    store.delete_version(v0.id, delete_aliases=True)
    assert [v.index for v in store.list_versions(alice, "proj", "ds")] == [1]
    # portfolio links
    link = store.link_version(v1.id, alice, "reg", "best-models", aliases=["prod"])
    assert link.source_index == 1 and link.index == 0
    # blob dedupe: uploaded content is not missing, other content is
    have = md5_bytes(b"3")
    assert store.missing_blobs(alice, [have, md5_bytes(b"other")]) == {md5_bytes(b"other")}


def test_runs_and_lineage_over_http(registry: SharedRegistry, tmp_path: Path) -> None:
    alice, key = registry.new_user("alice")
    store = make_store(registry.server.url, key)
    run = store.create_run(alice, "proj", "run1", name="train", job_type="train", config={"lr": 0.1})
    assert run.path == f"{alice}/proj/run1" and run.config == {"lr": 0.1}
    v0, _ = commit_files(store, tmp_path, {"a": b"1"}, entity=alice, run_id="run1")
    assert v0.logged_by_run == f"{alice}/proj/run1"
    user = store.create_run(alice, "proj", "run2")
    store.record_use(alice, "proj", user.id, v0.id, "input")
    store.finish_run(alice, "proj", "run1")
    assert store.get_run(alice, "proj", "run1").state == "finished"
    assert [v.id for v in store.versions_logged_by(alice, "proj", "run1")] == [v0.id]
    assert [v.id for v in store.versions_used_by(alice, "proj", "run2")] == [v0.id]
    assert [r.id for r in store.runs_using(v0.id)] == ["run2"]
    assert {r.id for r in store.list_runs(alice, "proj")} == {"run1", "run2"}


def test_sixteen_concurrent_clients_get_gapless_versions(registry: SharedRegistry, tmp_path: Path) -> None:
    """16 clients, each with its own session, log into one collection through two servers
    (three processes in all)."""
    lab = registry.new_team("lab")
    _, key = registry.new_user("alice", teams=(lab,))
    servers = [registry.second, registry.server]

    def log_one(i: int) -> tuple[int, str]:
        store = make_store(servers[i % 2].url, key)
        work = tmp_path / f"c{i}"
        work.mkdir()
        rec, created = commit_files(store, work, {"i.txt": f"client {i}".encode(), "shared": b"same"}, entity=lab)
        assert created
        store.close()
        return rec.index, rec.id

    results = on_each(log_one, list(range(16)), threads=16)
    assert sorted(idx for idx, _ in results) == list(range(16))
    reader = make_store(servers[0].url, key)
    versions = reader.list_versions(lab, "proj", "ds")
    assert [v.index for v in versions] == list(range(16))
    assert reader.resolve(lab, "proj", "ds", "latest").index == 15


def test_large_blob_multipart_upload_and_parallel_download(registry: SharedRegistry, tmp_path: Path) -> None:
    """With S3: presigned multipart parts (each with its own Content-MD5); locally: one stream."""
    alice, key = registry.new_user("alice")
    store = make_store(registry.server.url, key)
    src = tmp_path / "big"
    data = os.urandom((12 << 20) + 12345)
    src.write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    store.put_blob(alice, md5, src, len(data))
    assert store.missing_blobs(alice, [md5]) == set()
    store.put_blob(alice, md5, src, len(data))  # second time: nothing to send
    from client.store import http

    old = http.PARALLEL_DOWNLOAD_THRESHOLD, http.DOWNLOAD_PART
    http.PARALLEL_DOWNLOAD_THRESHOLD, http.DOWNLOAD_PART = 1 << 20, 1 << 20
    try:
        store.download_blob(alice, md5, tmp_path / "out")
    finally:
        http.PARALLEL_DOWNLOAD_THRESHOLD, http.DOWNLOAD_PART = old
    assert hashlib.md5((tmp_path / "out").read_bytes()).hexdigest() == md5


def test_every_request_is_one_urllib3_request_and_blob_gets_keep_their_checks(registry: SharedRegistry,
                                                                              tmp_path: Path) -> None:
    """Issue 17: a blob GET is one urllib3 request (a requests.Session's per-request work cost
    about as much CPU as the rest of a cold small file); issue 13: so is the signing call, like
    every JSON call; and so is an upload's PUT (the store has no session at all).  Ranges,
    expired-URL refresh and wrong-range checks work as before."""
    alice, key = registry.new_user("blobget")
    store = make_store(registry.server.url, key)
    sent: list[str] = []
    store.observe(lambda method, url, headers: sent.append(method))
    blobs = {upload_bytes(store, alice, os.urandom(5000 + i), tmp_path): 5000 + i for i in range(6)}
    assert sent.count("PUT") == len(blobs) and not hasattr(store, "session")
    reader = make_store(registry.server.url, key)
    seen: list[tuple[str, str]] = []
    reader.observe(lambda method, url, headers: seen.append((method, headers.get("Range", ""))))
    reader.prefetch_urls(alice, list(blobs))
    assert seen == [("POST", "")]  # one signing request
    for md5, size in blobs.items():
        data = reader.read_blob(alice, md5)
        assert len(data) == size and md5_bytes(data) == md5
        assert reader.read_blob(alice, md5, 100, 50) == data[100:150]
        assert b"".join(reader.stream_blob(alice, md5, 7, 1000)) == data[7:1007]
    assert seen.count(("GET", "bytes=0-")) == len(blobs) and seen.count(("GET", "bytes=100-149")) == len(blobs)
    reader.close()
    store.close()


def test_a_single_put_streams_the_file_from_disk(registry: SharedRegistry, tmp_path: Path) -> None:
    """An upload in one PUT reads the file in blocks as it sends them: the Python memory it
    allocates stays far below the file's size (tracemalloc counts every bytes object)."""
    import tracemalloc

    if registry.backend != "sqlite-local":
        pytest.skip("S3 splits a file this size into parts (each read whole by design)")
    alice, key = registry.new_user("stream")
    store = make_store(registry.server.url, key)
    src = tmp_path / "big.bin"
    data = os.urandom(12 << 20)
    src.write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        store.put_blob(alice, md5, src, 12 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak} bytes allocated for a 12 MiB upload"
    assert store.missing_blobs(alice, [md5]) == set()
    store.close()


@pytest.mark.parametrize("url, env", [
    ("http://s3.internal:9000/b/k", {"http_proxy": "http://p:3128"}),
    ("https://s3.internal/b/k", {"HTTPS_PROXY": "http://p:3128", "https_proxy": "http://lower:1"}),
    ("https://s3.internal/b/k", {"http_proxy": "http://p:3128"}),
    ("https://s3.internal/b/k", {"ALL_PROXY": "socks5://p:1080"}),
    ("http://10.1.2.3:9000/b", {"http_proxy": "http://p:3128", "no_proxy": "10.0.0.0/8"}),
    ("http://10.1.2.3:9000/b", {"http_proxy": "http://p:3128", "NO_PROXY": "10.1.2.3"}),
    ("http://11.1.2.3:9000/b", {"http_proxy": "http://p:3128", "no_proxy": "10.0.0.0/8"}),
    ("http://a.example.com/b", {"http_proxy": "http://p:3128", "no_proxy": "localhost, .example.com"}),
    ("http://example.com:8080/b", {"http_proxy": "http://p:3128", "no_proxy": "example.com:8080"}),
    ("http://example.com:8081/b", {"http_proxy": "http://p:3128", "no_proxy": "other.org,example.com:8080"}),
    ("http://Host.Example.COM/b", {"http_proxy": "http://p:3128", "no_proxy": "example.com"}),
    ("http://anything/b", {"http_proxy": "http://p:3128", "no_proxy": "*"}),
])
def test_proxies_are_chosen_from_the_environment_as_requests_chooses_them(
        url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The store no longer imports requests (issue 17); its choice of proxy is requests' own."""
    import requests.utils

    from client.store.http_blobs import environment_proxy

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert environment_proxy(url) == requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))



def test_blob_gets_trust_the_same_certificates_as_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ARTIFACTFS_CA_BUNDLE wins over REQUESTS_CA_BUNDLE, which wins over the OS store; a
    directory of CAs is a directory; never unverified."""
    from client.store.http_blobs import tls_arguments

    pem, certs = tmp_path / "ca.pem", tmp_path / "certs"
    pem.write_text("x")
    certs.mkdir()
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs))
    assert tls_arguments(str(pem), explicit=True) == {"cert_reqs": "CERT_REQUIRED", "ca_certs": str(pem)}
    assert tls_arguments("/etc/os-store.pem", explicit=False) == {"cert_reqs": "CERT_REQUIRED",
                                                                  "ca_cert_dir": str(certs)}
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    assert tls_arguments(str(pem), explicit=False)["ca_certs"] == str(pem)
    assert tls_arguments(True, explicit=False)["ca_certs"].endswith(".pem")  # certifi's
    with pytest.raises(ValueError):
        tls_arguments(False, explicit=True)


def test_sdk_logs_and_downloads_through_the_server(registry: SharedRegistry, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK unchanged, pointed at the server by ARTIFACTFS_STORE/ARTIFACTFS_API_KEY; the
    consumer is another "machine" (its own cache) talking to another server process."""
    import client
    from client import live_run as run_mod

    team = registry.new_team("lab")
    _, key = registry.new_user("alice", teams=(team,))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    # huge.bin is larger than one read chunk: the SDK downloads it with parallel ranged GETs
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(200_000), "big.bin": os.urandom(3 << 20),
             "huge.bin": os.urandom(17 << 20)}
    for name, data in files.items():
        (src / name).write_bytes(data)

    def machine(server_url: str, cache: str) -> None:
        run_mod._reset_for_tests()
        monkeypatch.setenv("ARTIFACTFS_STORE", server_url)
        monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
        monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / cache))

    machine(registry.server.url, "cache1")
    with client.init(entity=team, project="proj", job_type="prep") as run:
        art = client.Artifact("data", type="dataset")
        art.add_dir(str(src))
        run.log_artifact(art, aliases=["best"])
    machine(registry.second.url, "cache2")
    with client.init(entity=team, project="proj", job_type="train") as run:
        got = run.use_artifact("data:latest")
        assert got.version == "v0" and set(got.aliases) >= {"latest", "best"}
        root = Path(got.download(str(tmp_path / "out")))
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    run_mod._reset_for_tests()


@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_two_mounts_on_one_server(registry: SharedRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two mounts with separate caches (two users of one team), each through its own server
    process: a version committed through one mount's draft shows up at ``:latest`` on the other
    within the alias TTL; an entity the key's user is not a member of is neither listed nor
    found (the mount resolves entity names against the key's teams); a key the server refuses
    gets EACCES."""
    import errno
    import time

    from tests.mount_helpers import mounted, requires_fuse

    if requires_fuse.args and requires_fuse.args[0]:
        pytest.skip(requires_fuse.kwargs.get("reason", "needs FUSE"))
    lab = registry.new_team("lab")
    _, key_a = registry.new_user("alice", teams=(lab,))
    _, key_b = registry.new_user("bob", teams=(lab,))
    stranger, _ = registry.new_user("stranger")
    v0, _ = commit_files(make_store(registry.server.url, key_a), tmp_path, {"data.bin": b"old" * 100_000}, entity=lab)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key_a)
    with mounted(registry.server.url, tmp_path / "a", alias_ttl=0.5) as ma:  # type: ignore[arg-type]
        monkeypatch.setenv("ARTIFACTFS_API_KEY", key_b)
        with mounted(registry.second.url, tmp_path / "b", alias_ttl=0.5) as mb:  # type: ignore[arg-type]
            latest_b = mb.path / lab / "proj" / "ds:latest"
            assert (latest_b / "data.bin").read_bytes() == b"old" * 100_000
            # commit v1 through mount A's draft
            draft = ma.path / lab / "proj" / "ds:draft"
            draft.mkdir()
            (draft / "data.bin").write_bytes(b"NEW" * 10)
            (draft / ".commit").write_text("{}")
            deadline = time.monotonic() + 20
            while (latest_b / "data.bin").stat().st_size != 30 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (latest_b / "data.bin").read_bytes() == b"NEW" * 10
            assert (mb.path / lab / "proj" / "ds:v0" / "data.bin").read_bytes() == b"old" * 100_000
            with pytest.raises(OSError) as info:
                os.listdir(mb.path / stranger / "proj")
            assert info.value.errno == errno.ENOENT  # not a member: the entity does not exist for this key
            assert stranger not in os.listdir(mb.path)
    # a key the server does not accept: the mount answers EACCES
    (tmp_path / "c").mkdir()
    monkeypatch.setenv("ARTIFACTFS_API_KEY", "afs_00000000_revoked")
    with mounted(registry.server.url, tmp_path / "c") as mc:  # type: ignore[arg-type]
        with pytest.raises(PermissionError) as denied:
            os.listdir(mc.path / lab)
        assert denied.value.errno == errno.EACCES


# -- the core's rule tests, through HTTP -------------------------------------------------------
#: rules of tests/test_registry.py that cannot run against a server, and why
_NOT_OVER_HTTP = {
    "test_concurrent_writers_get_gapless_versions": "starts 8 processes on one embedded store directory",
    "test_ttl_inherits_the_entity_default_and_gc_removes_expired": "calls the core's gc_expired with a chosen "
    "clock (over HTTP the server's sweep runs it: test_server_sweeps_expired_versions_periodically)",
}


@pytest.mark.parametrize("backend", ["sqlite-local", "postgres-s3"])
@pytest.mark.parametrize("rule", store_rules(registry_rules, _NOT_OVER_HTTP),
                         ids=lambda f: f.__name__.removeprefix("test_"))
def test_registry_rule_through_http(rule, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same rule tests as the embedded store, with HttpStore against a fresh server."""
    from tests.server_fixtures import new_factory, start_inprocess_server

    factory = new_factory(backend, request, tmp_path)
    server = start_inprocess_server(request.getfixturevalue("monkeypatch"), factory.db_url, factory.blobs_url, factory.s3_endpoint)
    try:
        store = make_store(server.url, server.user("tester", teams=("ent", "other", "alice", "bob", "nobody")))
        run_rule(rule, store, tmp_path)
    finally:
        server.stop()


def test_a_multipart_complete_sent_again_succeeds_once_the_blob_is_in(registry: SharedRegistry,
                                                                     tmp_path: Path) -> None:
    """A client that lost the answer to ``/complete`` (a large upload takes the server a while
    to verify) sends it again: the blob is in, so that is success.  It used to fail with 503 on
    every retry (the upload was consumed by the first call), and ``log`` of a 1 GiB file failed."""
    if registry.backend == "sqlite-local":
        pytest.skip("multipart uploads are S3's; a blob directory registers as it receives")
    alice, key = registry.new_user("again")
    store = make_store(registry.server.url, key, attempts=2, backoff=0.01)
    data = os.urandom((12 << 20) + 99)  # above the test server's 6 MiB multipart threshold
    md5 = hashlib.md5(data).hexdigest()
    blob = store._blob(alice, md5)
    part_size = 5 << 20
    part_md5s = [hashlib.md5(data[i:i + part_size]).hexdigest() for i in range(0, len(data), part_size)]
    plan = store._call("POST", f"{blob}/uploads", {"size": len(data), "part_md5s": part_md5s})
    assert plan["method"] == "multipart" and int(plan["part_size"]) == part_size
    etags = [store._put_data(part, data[(int(part["number"]) - 1) * part_size:][:part_size]).headers.get("ETag", "")
             for part in plan["parts"]]
    body = {"size": len(data), "upload": plan["upload"], "etags": etags}
    store._call("POST", f"{blob}/complete", body)
    assert store.missing_blobs(alice, [md5]) == set()
    store._call("POST", f"{blob}/complete", body)  # the same call again: success, nothing changes
    assert store.missing_blobs(alice, [md5]) == set()
    assert store.read_blob(alice, md5) == data
