"""The registry server's own duties, against real processes: who may do what, short-lived
blob URLs, md5 verification of uploads, and failures (S3 or the server gone mid-transfer)
that must end in retries and a clear StoreUnavailableError, never wrong bytes or a half
version.  The registry rules also run here on a real PostgreSQL (the lead's rule tests)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from click.testing import CliRunner

from client.errors import (AuthenticationError, DigestMismatchError, MissingBlobError, NotFoundError,
                           PermissionDeniedError, StoreUnavailableError)
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest
from tests.server_fixtures import (LoopbackProxy, SharedRegistry, make_store, moto_s3, new_factory,  # noqa: F401
                                   postgres, registry)
import tests.test_registry as registry_rules
from tests.util import commit_files, run_rule, store_rules, upload_bytes

pytestmark = pytest.mark.timeout(120)
FAST = {"attempts": 3, "backoff": 0.02}


# -- who may do what ---------------------------------------------------------------------------
def test_keys_of_one_entity_cannot_read_or_write_another(registry: SharedRegistry, tmp_path: Path) -> None:
    alice, key_a = registry.new_user("alice")
    mallory, key_m = registry.new_user("mallory")
    a, m = make_store(registry.server.url, key_a), make_store(registry.server.url, key_m)
    secret = os.urandom(1000)
    v0, _ = commit_files(a, tmp_path, {"secret.bin": secret}, entity=alice, aliases=("prod",))
    md5 = md5_bytes(secret)

    denied = [
        lambda: m.list_projects(alice),
        lambda: m.list_collections(alice, "proj"),
        lambda: m.resolve(alice, "proj", "ds", "latest"),
        lambda: m.get_version(v0.id),
        lambda: m.list_versions(alice, "proj", "ds"),
        lambda: m.read_blob(alice, md5),
        lambda: m.download_blob(alice, md5, tmp_path / "stolen"),
        lambda: m.missing_blobs(alice, [md5]),  # no existence probe either
        lambda: upload_bytes(m, alice, b"graffiti", tmp_path),
        lambda: m.commit(CommitRequest(alice, "proj", "ds", "dataset", v0.manifest_md5)),
        lambda: m.update_version(v0.id, aliases=["mine"]),
        lambda: m.delete_version(v0.id, delete_aliases=True),
        lambda: m.runs_using(v0.id),
        lambda: m.create_run(alice, "proj", "r1"),
        lambda: m.link_version(v0.id, mallory, "reg", "stolen"),
    ]
    for call in denied:
        with pytest.raises(PermissionDeniedError):
            call()
    assert not (tmp_path / "stolen").exists()
    # Dedupe is per entity: alice's content is "missing" for mallory, and mallory cannot
    # reference it from her own entity without uploading it herself.
    assert m.missing_blobs(mallory, [md5]) == {md5}
    forged = Manifest([ManifestEntry("x", hex_to_b64(md5), len(secret))]).to_bytes()
    with pytest.raises(MissingBlobError):
        m.commit(CommitRequest(mallory, "proj", "ds", "dataset", upload_bytes(m, mallory, forged, tmp_path)))
    assert m.list_entities() == [mallory]
    # nothing changed for alice
    assert a.resolve(alice, "proj", "prod" and "ds", "prod").id == v0.id


def test_missing_bad_and_revoked_keys_and_viewers(registry: SharedRegistry, tmp_path: Path) -> None:
    team = registry.new_team("lab")
    owner, key_o = registry.new_user("owner", teams=(team,))
    _, key_v = registry.new_user("viewer", teams=(team,), role="viewer")
    v0, _ = commit_files(make_store(registry.server.url, key_o), tmp_path, {"a": b"1"}, entity=team)
    for key in (None, "afs_nope_nope"):
        with pytest.raises(AuthenticationError) as info:
            make_store(registry.server.url, key).list_entities()
        assert isinstance(info.value, PermissionError)  # what the mount turns into EACCES
    raw = requests.get(registry.server.url + "/api/v1/entities", timeout=10)
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "AuthenticationError"
    raw = requests.get(f"{registry.server.url}/api/v1/entities/{owner}/projects",
                       headers={"Authorization": f"Bearer {key_v}"}, timeout=10)
    assert raw.status_code == 403 and raw.json()["error"]["code"] == "PermissionDeniedError"
    viewer = make_store(registry.server.url, key_v)
    assert viewer.resolve(team, "proj", "ds", "latest").id == v0.id
    assert viewer.read_blob(team, md5_bytes(b"1")) == b"1"
    with pytest.raises(PermissionDeniedError):
        commit_files(viewer, tmp_path, {"a": b"2"}, entity=team)
    # revoking a key (admin CLI) locks it out
    from server.cli import admin_command

    runner = CliRunner()
    out = runner.invoke(admin_command, ["--db", registry.factory.db_url, "create-key", owner])
    assert out.exit_code == 0, out.output
    fresh = out.stdout.strip()  # the key alone; "shown once" goes to stderr
    key_id = fresh.split("_")[1]
    assert runner.invoke(admin_command, ["--db", registry.factory.db_url, "revoke-key", key_id]).exit_code == 0
    with pytest.raises(AuthenticationError):
        make_store(registry.server.url, fresh).list_entities()
    listing = runner.invoke(admin_command, ["--db", registry.factory.db_url, "list-users"]).output
    assert f"{team}:viewer" in listing and f"{team}:member" in listing


def test_signed_urls_are_scoped_and_expire(registry: SharedRegistry, request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    factory = new_factory(registry.backend, request, tmp_path, url_ttl=3)
    try:
        server = factory.start()
        alice, key = "alice", factory.user("alice")
        store = make_store(server.url, key)
        data = os.urandom(5000)
        commit_files(store, tmp_path, {"f": data}, entity=alice)
        url, size = store._download_url(alice, md5_bytes(data))
        assert size == (None if registry.backend == "postgres-s3" else 5000)  # S3: no HEAD, Content-Range
        if registry.backend == "postgres-s3":
            # Blob bytes bypass the server; moto does not enforce expiry, real S3 does.
            assert url.startswith(factory.s3_endpoint) and parse_qs(urlparse(url).query)["X-Amz-Expires"] == ["3"]
        else:
            assert requests.get(url, headers={"Range": "bytes=10-19"}, timeout=10).content == data[10:20]
            factory.user("mallory")
            tampered = url.replace("/blobdata/alice/", "/blobdata/mallory/")
            assert requests.get(tampered, timeout=10).status_code == 403
            time.sleep(4.1)  # a 3 s lifetime: a loaded machine still GETs within it
            expired = requests.get(url, timeout=10)
            assert expired.status_code == 403 and "expired" in expired.text
        # the client notices and asks for a fresh URL
        assert store.read_blob(alice, md5_bytes(data), 100, 10) == data[100:110]
        if registry.backend != "postgres-s3":
            # an upload plan whose URL expired before the PUT: the client asks for a new plan
            later = os.urandom(3000)
            src = tmp_path / "later"
            src.write_bytes(later)
            assert store.missing_blobs(alice, [md5_bytes(later)]) == {md5_bytes(later)}  # caches the plan
            key_ = (alice, md5_bytes(later))
            plan, _until, limit = store._plans[key_]
            time.sleep(4.1)
            # the client still believes the plan is fresh (as under load or clock skew)
            store._plans[key_] = (plan, time.monotonic() + 60, limit)
            store.put_blob(alice, md5_bytes(later), src, len(later))
            assert store.missing_blobs(alice, [md5_bytes(later)]) == set()
    finally:
        factory.stop_all()


# -- uploads are verified ----------------------------------------------------------------------
def test_uploads_whose_bytes_do_not_match_their_md5_are_refused(registry: SharedRegistry, tmp_path: Path) -> None:
    alice, key = registry.new_user("alice")
    store = make_store(registry.server.url, key)
    for size in (1000, 12 << 20):  # one PUT; and (with S3) presigned multipart parts
        claimed = md5_bytes(os.urandom(16))
        src = tmp_path / f"wrong-{size}"
        src.write_bytes(os.urandom(size))
        with pytest.raises(DigestMismatchError):
            store.put_blob(alice, claimed, src, size)
        assert store.missing_blobs(alice, [claimed]) == {claimed}
        manifest = Manifest([ManifestEntry("f", hex_to_b64(claimed), size)]).to_bytes()
        with pytest.raises(MissingBlobError):
            store.commit(CommitRequest(alice, "proj", "ds", "dataset", upload_bytes(store, alice, manifest, tmp_path)))
    # raw: straight to the upload URL with wrong bytes, then "complete"
    claimed = md5_bytes(b"the real thing")
    base = f"{registry.server.url}/api/v1/entities/{alice}/blobs/{claimed}"
    auth = {"Authorization": f"Bearer {key}"}
    plan = requests.post(base + "/uploads", json={"size": 14}, headers=auth, timeout=10).json()
    put = requests.put(requests.compat.urljoin(registry.server.url, plan["url"]), data=b"a forged thing",
                       headers=plan["headers"], timeout=10)
    done = requests.post(base + "/complete", json={"size": 14}, headers=auth, timeout=10)
    assert put.status_code >= 400 or done.status_code == 422
    assert store.missing_blobs(alice, [claimed]) == {claimed}
    with pytest.raises(NotFoundError):
        store.read_blob(alice, claimed)


# -- failures ------------------------------------------------------------------------------------
def test_server_stopped_gives_retries_then_a_clear_error_and_no_half_version(
        tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> None:
    factory = new_factory("sqlite-local", request, tmp_path)
    try:
        server = factory.start()
        key = factory.user("alice")
        store = make_store(server.url, key, **FAST)
        commit_files(store, tmp_path, {"a": b"0"}, entity="alice")
        data = os.urandom(3 << 20)
        md5s = [upload_bytes(store, "alice", data, tmp_path)]
        manifest = Manifest([ManifestEntry("big", hex_to_b64(md5s[0]), len(data))]).to_bytes()
        manifest_md5 = upload_bytes(store, "alice", manifest, tmp_path)
        server.stop()
        caplog.set_level(logging.INFO, logger="client.store.http")
        for call in (lambda: store.resolve("alice", "proj", "ds", "latest"),
                     lambda: store.commit(CommitRequest("alice", "proj", "ds", "dataset", manifest_md5)),
                     lambda: store.read_blob("alice", md5s[0], 0, 100),
                     lambda: upload_bytes(store, "alice", b"new", tmp_path)):
            with pytest.raises(StoreUnavailableError) as info:
                call()
            assert isinstance(info.value, ConnectionError) and "unreachable after 3 attempts" in str(info.value)
        assert sum("attempt" in r.message for r in caplog.records) >= 8  # 2 retries per call
        # Back up: the interrupted commit left nothing behind, and it can simply be repeated.
        server = factory.start(port=int(server.url.rsplit(":", 1)[1]))
        assert [v.index for v in store.list_versions("alice", "proj", "ds")] == [0]
        rec, created = store.commit(CommitRequest("alice", "proj", "ds", "dataset", manifest_md5))
        assert created and rec.index == 1
    finally:
        factory.stop_all()


def test_connection_cut_mid_download_and_upload_through_the_server(tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    """Local-directory backend: blob bytes pass through the server, behind a proxy that cuts."""
    factory = new_factory("sqlite-local", request, tmp_path)
    try:
        server = factory.start()
        proxy = LoopbackProxy(int(server.url.rsplit(":", 1)[1]))
        key = factory.user("alice")
        store = make_store(proxy.url, key, **FAST)
        data = os.urandom(2 << 20)
        v0, _ = commit_files(store, tmp_path, {"big": data}, entity="alice")
        md5 = md5_bytes(data)
        _cut_downloads(store, proxy, "alice", md5, data, tmp_path)
        # an upload cut mid-body is never registered, and retried until it fails clearly
        proxy.cut_after, proxy.cut_times = 256 << 10, None
        other = os.urandom(1 << 20)
        with pytest.raises(StoreUnavailableError):
            upload_bytes(store, "alice", other, tmp_path)
        proxy.cut_after = None
        assert store.missing_blobs("alice", [md5_bytes(other)]) == {md5_bytes(other)}
        assert store.resolve("alice", "proj", "ds", "latest").id == v0.id
        proxy.close()
    finally:
        factory.stop_all()


def _cut_downloads(store, proxy: LoopbackProxy, entity: str, md5: str, data: bytes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every connection cut: a clear error.  Two connections cut: retries give the right bytes."""
    proxy.cut_after, proxy.cut_times = 64 << 10, None
    with pytest.raises(StoreUnavailableError):
        store.read_blob(entity, md5, 0, len(data))
    with pytest.raises(StoreUnavailableError):
        store.download_blob(entity, md5, tmp_path / "dl-fail")
    proxy.cut_times = proxy.cuts + 2
    assert store.read_blob(entity, md5, 1000, 1 << 20) == data[1000:1000 + (1 << 20)]
    proxy.cut_times = proxy.cuts + 2
    store.download_blob(entity, md5, tmp_path / "dl")
    assert hashlib.md5((tmp_path / "dl").read_bytes()).hexdigest() == md5
    proxy.cut_after = None


def test_s3_cut_or_stopped_mid_transfer(tmp_path: Path, request: pytest.FixtureRequest, moto_s3) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """S3 behind a cutting proxy: ranged GETs cut mid-body, then S3 gone altogether."""
    proxy = LoopbackProxy(int(moto_s3.url.rsplit(":", 1)[1]))
    factory = new_factory("sqlite-local", request, tmp_path)
    factory.blobs_url, factory.s3_endpoint = f"s3://{moto_s3.new_bucket()}/b", proxy.url
    try:
        server = factory.start()
        key = factory.user("alice")
        store = make_store(server.url, key, **FAST)
        data = os.urandom(2 << 20)
        v0, _ = commit_files(store, tmp_path, {"big": data}, entity="alice")
        url, _ = store._download_url("alice", md5_bytes(data))
        assert url.startswith(proxy.url)  # bytes go client <-> S3, not through the server
        _cut_downloads(store, proxy, "alice", md5_bytes(data), data, tmp_path)
        # S3 goes away: uploads fail clearly, and a commit cannot reference what never arrived
        proxy.refuse = True
        proxy.drop_all()
        new = os.urandom(100_000)
        with pytest.raises(StoreUnavailableError):
            upload_bytes(store, "alice", new, tmp_path)
        proxy.refuse = False
        assert store.missing_blobs("alice", [md5_bytes(new)]) == {md5_bytes(new)}
        assert [v.id for v in store.list_versions("alice", "proj", "ds")] == [v0.id]
    finally:
        factory.stop_all()
        proxy.close()


def test_openapi_description_lists_the_api(registry: SharedRegistry) -> None:
    spec = requests.get(registry.server.url + "/openapi.json", timeout=10).json()
    assert "/api/v1/commit" in spec["paths"] and "/api/v1/entities/{entity}/blobs/{md5}/uploads" in spec["paths"]


# -- the registry rules on a real PostgreSQL ---------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("rule", store_rules(registry_rules, {
    "test_concurrent_writers_get_gapless_versions": "8 processes on an embedded store (SQLite locking)"}),
    ids=lambda f: f.__name__.removeprefix("test_"))
def test_registry_rule_on_postgresql(rule, postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The core's rule tests (tests/test_registry.py), with the registry on PostgreSQL."""
    from client.store.local import LocalStore

    store = LocalStore(tmp_path / "store", db_url=postgres.new_database())
    try:
        run_rule(rule, store, tmp_path)
    finally:
        store.close()


def test_server_sweeps_expired_versions_periodically(local_store, tmp_path: Path) -> None:
    """The server's background sweep deletes a version once its TTL has run out."""
    import threading
    import types

    from server.app import periodic_gc

    keep, _ = commit_files(local_store, tmp_path, {"a": b"keep"}, collection="keep", ttl_seconds=None)
    short, _ = commit_files(local_store, tmp_path, {"a": b"short"}, collection="short", ttl_seconds=0.01)
    stop = threading.Event()
    sweeper = threading.Thread(target=periodic_gc, args=(types.SimpleNamespace(registry=local_store), 0.05, stop))
    sweeper.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                local_store.resolve("ent", "proj", "short", "latest")
            except NotFoundError:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        sweeper.join(10)
    assert not sweeper.is_alive()
    with pytest.raises(NotFoundError):
        local_store.resolve("ent", "proj", "short", "v0")
    assert local_store.resolve("ent", "proj", "keep", "latest").id == keep.id


def test_batch_routes_refuse_more_than_one_batch_with_a_400_naming_the_limit(registry: SharedRegistry) -> None:
    """URLs, block maps and completed uploads are asked for in batches of at most 2,000: one
    more is a 400 saying the limit (not a slow answer, not a 500); exactly 2,000 is served."""
    alice, key = registry.new_user("alice")
    base = f"{registry.server.url}/api/v1/entities/{alice}/blobs"
    auth = {"Authorization": f"Bearer {key}"}
    md5s = [f"{i:032x}" for i in range(2001)]
    for route, body, words in [("/urls", {"md5s": md5s}, "at most 2000 URLs per call"),
                               ("/blockmaps", {"md5s": md5s}, "at most 2000 block maps per call"),
                               ("/completed", {"blobs": [{"md5": m, "size": 1} for m in md5s]},
                                "complete at most 2000 uploads per call")]:
        refused = requests.post(base + route, json=body, headers=auth, timeout=30)
        assert refused.status_code == 400 and words in refused.text, (route, refused.status_code, refused.text)
    for route in ("/urls", "/blockmaps"):
        served = requests.post(base + route, json={"md5s": md5s[:2000]}, headers=auth, timeout=30)
        assert served.status_code == 200, (route, served.text)
