"""The registry server as a team runs it (issue 13), against real servers on loopback:
SQLite + a blob directory, and PostgreSQL + S3 (moto in server mode).

Every file size travels through the server, 0 bytes included, on every path (Store, SDK,
CLI, a mount's draft)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from client.errors import NotFoundError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest
from tests.mount_helpers import requires_fuse
from tests.server_fixtures import SharedRegistry, make_store, moto_s3, on_each, postgres, registry  # noqa: F401

pytestmark = pytest.mark.timeout(120)
EMPTY_MD5 = hashlib.md5(b"").hexdigest()
#: fail in seconds instead of the default minutes, so a stall shows up as a failure
QUICK = {"timeout": 10.0, "attempts": 2, "backoff": 0.05}


def _use_server(monkeypatch: pytest.MonkeyPatch, url: str, key: str, cache: Path) -> None:
    from client import live_run as run_mod

    run_mod._reset_for_tests()
    monkeypatch.setenv("ARTIFACTFS_STORE", url)
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(cache))


# -- item 1: 0-byte files ------------------------------------------------------------------------
def test_zero_byte_blob_uploads_downloads_and_commits_through_the_store(registry: SharedRegistry,
                                                                        tmp_path: Path) -> None:
    other = registry.new_team("zt")
    user, key = registry.new_user("zero", teams=(other,))
    store = make_store(registry.server.url, key, **QUICK)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert store.missing_blobs(user, [EMPTY_MD5]) == {EMPTY_MD5}
    store.put_blob(user, EMPTY_MD5, empty, 0)
    assert store.missing_blobs(user, [EMPTY_MD5]) == set()
    store.put_blob(user, EMPTY_MD5, empty, 0)  # again: already there, a no-op
    # a fresh plan (no cached one from missing_blobs) on another entity
    store.put_blob(other, EMPTY_MD5, empty, 0)
    assert store.missing_blobs(other, [EMPTY_MD5]) == set()

    assert store.read_blob(user, EMPTY_MD5) == b""
    assert store.read_blob(user, EMPTY_MD5, 0, 10) == b""
    out = tmp_path / "out"
    store.download_blob(user, EMPTY_MD5, out)
    assert out.read_bytes() == b""

    manifest = Manifest([ManifestEntry("pkg/__init__.py", hex_to_b64(EMPTY_MD5), 0),
                         ManifestEntry("_SUCCESS", hex_to_b64(EMPTY_MD5), 0)]).to_bytes()
    manifest_md5 = md5_bytes(manifest)
    (tmp_path / "manifest").write_bytes(manifest)
    store.put_blob(user, manifest_md5, tmp_path / "manifest", len(manifest))
    version, created = store.commit(CommitRequest(user, "proj", "ds", "dataset", manifest_md5))
    assert created and version.version == "v0"


def test_zero_byte_files_log_and_get_with_the_sdk_and_the_cli(registry: SharedRegistry, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import client
    from client.cli import cli

    team = registry.new_team("lab")
    _, key = registry.new_user("alice", teams=(team,))
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    files = {"pkg/__init__.py": b"", "_SUCCESS": b"", ".gitkeep": b"", "data.bin": os.urandom(5000)}
    for name, data in files.items():
        (src / name).write_bytes(data)

    _use_server(monkeypatch, registry.server.url, key, tmp_path / "cache1")
    with client.init(entity=team, project="proj", job_type="prep") as run:
        art = client.Artifact("sdk", type="dataset")
        art.add_dir(str(src))
        run.log_artifact(art)
    res = CliRunner().invoke(cli, ["log", str(src), "--name", f"{team}/proj/cli", "--type", "dataset"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    assert f"{team}/proj/cli:v0" in res.stdout and "4 files" in res.stdout

    _use_server(monkeypatch, registry.server.url, key, tmp_path / "cache2")  # another machine
    for collection in ("sdk", "cli"):
        dest = tmp_path / f"got-{collection}"
        res = CliRunner().invoke(cli, ["get", f"{team}/proj/{collection}:v0", str(dest)], catch_exceptions=False)
        assert res.exit_code == 0, res.stderr
        assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    with pytest.raises(NotFoundError):
        client.Api().artifact(f"{team}/proj/none:v0")
    from client import live_run as run_mod

    run_mod._reset_for_tests()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_zero_byte_file_commits_through_a_mounts_draft(registry: SharedRegistry, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from tests.mount_helpers import mounted
    team = registry.new_team("lab")
    _, key = registry.new_user("alice", teams=(team,))
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    make_store(registry.server.url, key).create_project(team, "proj")
    with mounted(registry.server.url, tmp_path) as m:  # type: ignore[arg-type]
        draft = m.path / team / "proj" / "ds:draft"
        draft.mkdir()
        (draft / "pkg").mkdir()
        (draft / "pkg" / "__init__.py").write_bytes(b"")
        (draft / "_SUCCESS").touch()
        (draft / "data.txt").write_bytes(b"rows\n")
        (draft / ".commit").write_text("{}")
        status = json.loads((draft / ".commit.status").read_text())["last_commit"]
        assert status["state"] == "created", status
        assert status["version"] == f"{team}/proj/ds:v0"
        v0 = m.path / team / "proj" / "ds:v0"
        assert (v0 / "pkg" / "__init__.py").read_bytes() == b"" and (v0 / "_SUCCESS").stat().st_size == 0
    got = make_store(registry.server.url, key).resolve(team, "proj", "ds", "latest")
    assert got.version == "v0" and got.file_count == 3


# -- item 3: login, logout, whoami, the key's default entity -------------------------------------
def _cli(*args: str, input: str | None = None) -> tuple[int, str, str]:
    from client.cli import cli

    res = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def test_login_saves_the_key_0600_and_the_keys_user_is_the_default_entity(
        registry: SharedRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from client import credentials
    from client import live_run as run_mod

    team = registry.new_team("vision")
    alice, key = registry.new_user("alice", teams=(team,))
    bob, key_b = registry.new_user("bob")  # no team: his own entity
    url = registry.server.url
    # as on a fresh machine: no ARTIFACTFS_STORE, no key, no entity in the environment
    for var in ("ARTIFACTFS_STORE", "ARTIFACTFS_API_KEY", "ARTIFACTFS_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    run_mod._reset_for_tests()

    code, out, err = _cli("login", url, input="afs_00000000_wrong\n")
    assert code == 4 and err.strip().splitlines()[-1].startswith("artifactfs: error: unknown or revoked API key"), err
    assert not credentials.credentials_path().exists()  # a refused key is not saved

    code, out, err = _cli("login", url, input=key + "\n")  # prompted, hidden
    assert code == 0, err
    path = credentials.credentials_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert f"as {alice}" in out and f"default entity {team}" in out

    # the login URL is the default store, the key authenticates, names go to alice's one team
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"A")
    code, out, err = _cli("log", str(src), "--name", "cifar", "--type", "dataset")
    assert code == 0, err
    assert f"{team}/uncategorized/cifar:v0" in out
    code, out, err = _cli("get", "cifar", str(tmp_path / "got"))
    assert code == 0, err
    assert (tmp_path / "got" / "a.txt").read_bytes() == b"A"
    code, out, err = _cli("whoami")
    assert code == 0, err
    assert f"user            {alice}" in out and f"default entity  {team}" in out
    assert f"{team}:member" in out and str(path) in out and key not in out

    # an environment key wins over the file; its user (no team) is then the default entity
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key_b)
    code, out, err = _cli("whoami")
    assert code == 0, err
    assert f"user            {bob}" in out and f"default entity  {bob}" in out and "ARTIFACTFS_API_KEY" in out
    monkeypatch.delenv("ARTIFACTFS_API_KEY")

    code, out, _ = _cli("logout")
    assert code == 0 and f"logged out of {url}" in out
    assert credentials.load().get("servers") == {}
    code, out, err = _cli("ls")  # back on the embedded store (no default registry any more),
    assert code == 3 and "no store at" in err, err  # which a reading command never creates
    run_mod._reset_for_tests()


def test_admin_commands_print_a_key_once_and_say_so(registry: SharedRegistry) -> None:
    from server.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["admin", "--db", registry.factory.db_url, "create-user", "carol-once"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    key = res.stdout.strip()
    assert key.startswith("afs_") and "\n" not in key  # the key alone on stdout, for scripts
    assert "shown once" in res.stderr and "artifactfs login" in res.stderr
    assert make_store(registry.server.url, key).whoami()["user"] == "carol-once"
    res = runner.invoke(main, ["admin", "--db", registry.factory.db_url, "create-key", "carol-once"],
                        catch_exceptions=False)
    assert res.exit_code == 0 and "shown once" in res.stderr and res.stdout.strip().startswith("afs_")


# -- item 2: TLS ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(registry: SharedRegistry, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.server_fixtures import make_tls_files

    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    srv = registry.factory.start(tls=files, env={"ARTIFACTFS_S3_MULTIPART_THRESHOLD": str(6 << 20)})
    yield srv, files[2]
    srv.stop()


def test_https_server_with_its_own_tls_and_a_client_that_verifies(
        registry: SharedRegistry, tls_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from client.errors import StoreUnavailableError
    from client.store import open_store
    from tests.util import commit_files

    srv, ca = tls_server
    assert srv.url.startswith("https://")
    team = registry.new_team("sec")
    _, key = registry.new_user("alice", teams=(team,))

    # no CA bundle: the test CA is not in the system store: refused at once, with what to do
    with pytest.raises(StoreUnavailableError) as info:
        open_store(srv.url, key).whoami()  # type: ignore[attr-defined]
    assert "ARTIFACTFS_CA_BUNDLE" in str(info.value) and "attempts" not in str(info.value)
    # https to a server without TLS
    with pytest.raises(StoreUnavailableError) as info:
        open_store(registry.server.url.replace("http://", "https://"), key).whoami()  # type: ignore[attr-defined]
    assert "does not speak TLS" in str(info.value)

    monkeypatch.setenv("ARTIFACTFS_CA_BUNDLE", str(ca))
    store = open_store(srv.url, key)
    files = {"a.bin": os.urandom(70_000), "__init__.py": b""}
    v0, created = commit_files(store, tmp_path, files, entity=team)
    assert created
    out = tmp_path / "out"
    for name, data in files.items():
        md5 = md5_bytes(data)
        store.download_blob(team, md5, out)
        assert out.read_bytes() == data

    # the README's steps over https: login, whoami, get
    for var in ("ARTIFACTFS_STORE", "ARTIFACTFS_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    code, out_text, err = _cli("login", srv.url, "--key", key)
    assert code == 0, err
    code, out_text, err = _cli("get", "proj/ds", str(tmp_path / "got"))
    assert code == 0, err
    assert (tmp_path / "got" / "a.bin").read_bytes() == files["a.bin"]
    from client import live_run as run_mod

    run_mod._reset_for_tests()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_mount_over_https_with_a_ca_bundle(registry: SharedRegistry, tls_server, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from tests.mount_helpers import mounted
    from tests.util import commit_files
    srv, ca = tls_server
    team = registry.new_team("sec")
    _, key = registry.new_user("alice", teams=(team,))
    commit_files(make_store(registry.server.url, key), tmp_path, {"w.bin": b"weights" * 1000}, entity=team)
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    monkeypatch.setenv("ARTIFACTFS_CA_BUNDLE", str(ca))
    with mounted(srv.url, tmp_path) as m:  # type: ignore[arg-type]
        assert (m.path / team / "proj" / "ds:latest" / "w.bin").read_bytes() == b"weights" * 1000


# -- item 5: health, readiness, metrics, access and audit logs ------------------------------------
def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_presigned_download_urls_are_reused_for_a_tenth_of_their_lifetime(registry: SharedRegistry,
                                                                          tmp_path: Path) -> None:
    """A fleet reading one dataset asks for the same URLs over and over: S3 presigning (0.2 ms
    CPU each) is done once per blob per 30 s, and the lifetime told to the client is what the
    reused URL has left at worst."""
    import time

    import requests

    from tests.util import upload_bytes

    if registry.backend != "postgres-s3":
        pytest.skip("presigned URLs are the S3 backend's")
    user, key = registry.new_user("sign")
    store = make_store(registry.server.url, key)
    md5s = [upload_bytes(store, user, b"blob %d" % i, tmp_path) for i in range(3)]
    url = f"{registry.server.url}/api/v1/entities/{user}/blobs/urls"
    headers = {"Authorization": f"Bearer {key}"}
    first = requests.post(url, json={"md5s": md5s}, headers=headers, timeout=10).json()
    time.sleep(1.1)  # a fresh presign now would carry another X-Amz-Date
    again = requests.post(url, json={"md5s": md5s}, headers=headers, timeout=10).json()
    ttl = registry.factory.url_ttl
    assert first["expires_in"] == again["expires_in"] == ttl - ttl // 10
    assert again["urls"] == first["urls"] and sorted(first["urls"]) == sorted(md5s)
    single = requests.get(f"{registry.server.url}/api/v1/entities/{user}/blobs/{md5s[0]}/url",
                          headers=headers, timeout=10).json()
    assert single["url"] == first["urls"][md5s[0]] and single["expires_in"] == ttl - ttl // 10
    assert requests.get(single["url"], timeout=10).content == b"blob 0"
    store.close()


def test_metrics_count_requests_by_route_commits_and_refusals(registry: SharedRegistry, tmp_path: Path) -> None:
    import requests

    from client.errors import AuthenticationError
    from tests.util import commit_files

    url = registry.server.url
    user, key = registry.new_user("metric")
    store = make_store(url, key)
    before = _scrape(url)
    for _ in range(3):
        store.whoami()
    with pytest.raises(AuthenticationError):
        make_store(url, "afs_0badc0de_notakey").whoami()
    with pytest.raises(NotFoundError):
        store.get_version("no-such-version")
    commit_files(store, tmp_path, {"a.bin": b"a" * 1000}, entity=user)
    after = _scrape(url)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("artifactfs_http_requests_total", route="/api/v1/whoami", method="GET", status="200") == 3
    assert delta("artifactfs_http_requests_total", route="/api/v1/whoami", method="GET", status="401") == 1
    assert delta("artifactfs_http_requests_total", route="/api/v1/versions/{version_id}", method="GET",
                 status="404") == 1
    assert delta("artifactfs_http_request_duration_seconds_count", route="/api/v1/whoami", method="GET") == 4
    assert delta("artifactfs_commits_total", created="true") == 1
    assert delta("artifactfs_auth_refused_total") == 1
    assert delta("artifactfs_errors_total", code="NotFoundError") == 1
    assert delta("artifactfs_signed_urls_total", op="put") == 2  # the file and the manifest
    # probes answer without a key
    assert requests.get(url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "database": "ok", "blobs": "ok"}


def test_metrics_of_a_multi_worker_server_sum_its_workers(registry: SharedRegistry) -> None:
    _, key = registry.new_user("mw")
    url = registry.second.url  # two worker processes
    before = _scrape(url)
    stores = [make_store(url, key) for _ in range(8)]  # separate connections: both workers answer
    for store in stores:
        for _ in range(5):
            store.whoami()
    after = _scrape(url)
    labels = {"route": "/api/v1/whoami", "method": "GET", "status": "200"}
    assert _value(after, "artifactfs_http_requests_total", **labels) - \
        _value(before, "artifactfs_http_requests_total", **labels) == 40


@pytest.mark.parametrize("backend", ["sqlite-local", "postgres-s3"])
def test_readyz_fails_while_the_blob_backend_or_database_is_down(backend: str, request: pytest.FixtureRequest,
                                                                tmp_path: Path) -> None:
    import requests

    from tests.server_fixtures import new_factory, start_inprocess_server, start_moto, stop_process

    moto = None
    if backend == "sqlite-local":
        factory = new_factory(backend, request, tmp_path)
        blobs = factory.blobs_url
    else:
        pg = request.getfixturevalue("postgres")
        moto = start_moto(tmp_path)  # our own S3, so this test may stop it
        factory = new_factory("sqlite-local", request, tmp_path)
        factory.db_url, blobs = pg.new_database(), f"s3://{moto.new_bucket()}/blobs"
    srv = start_inprocess_server(request.getfixturevalue("monkeypatch"), factory.db_url, blobs,
                                 moto.url if moto else None)
    try:
        ok = requests.get(srv.url + "/readyz", timeout=30)
        assert ok.status_code == 200, ok.text
        if moto is None:
            os.rename(blobs, blobs + ".away")  # the blob directory vanished (an unmounted volume)
        else:
            stop_process(moto.proc)
        down = requests.get(srv.url + "/readyz", timeout=60)
        assert down.status_code == 503
        assert down.json()["status"] == "unavailable" and down.json()["blobs"] != "ok"
        assert down.json()["database"] == "ok"
        assert requests.get(srv.url + "/healthz", timeout=5).status_code == 200  # alive all the same
        if moto is None:
            os.rename(blobs + ".away", blobs)
            assert requests.get(srv.url + "/readyz", timeout=30).status_code == 200
        else:  # and the database gone too
            import psycopg

            name = factory.db_url.split("@/")[1].split("?")[0]
            with psycopg.connect(host=str(pg.sockdir), user="postgres", dbname="postgres", autocommit=True) as c:
                c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            both = requests.get(srv.url + "/readyz", timeout=60)
            assert both.status_code == 503 and both.json()["database"] != "ok"
    finally:
        srv.stop()
        if moto is not None:
            stop_process(moto.proc)


def test_access_and_audit_logs_name_who_did_what_without_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import logging

    from client.errors import AuthenticationError
    from tests.server_fixtures import start_inprocess_server
    from tests.util import commit_files

    srv = start_inprocess_server(monkeypatch, f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "blobs"))
    caplog.set_level(logging.INFO, logger="artifactfs")
    try:
        key = srv.user("auditor")
        store = make_store(srv.url, key)
        v0, _ = commit_files(store, tmp_path, {"a.bin": b"payload" * 100}, entity="auditor")
        store.download_blob("auditor", md5_bytes(b"payload" * 100), tmp_path / "out")
        with pytest.raises(AuthenticationError):
            make_store(srv.url, "afs_feedf00d_topsecretpart").whoami()
        store.delete_version(v0.id)
    finally:
        srv.stop()
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "artifactfs.access"]
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "artifactfs.audit"]
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert key.split("_", 2)[2] not in everything and "topsecretpart" not in everything
    assert "sig=" not in everything and "expires=" not in everything
    commit_line = [a for a in access if a["route"] == "/api/v1/commit"][0]
    assert commit_line["user"] == "auditor" and commit_line["status"] == 200 and commit_line["ms"] >= 0
    assert any(a["route"] == "/blobdata/{entity}/{md5}" and a["method"] == "PUT" and a["entity"] == "auditor"
               for a in access)
    assert any(a["status"] == 401 and a["user"] is None for a in access)
    events = {a["event"]: a for a in audit}
    assert events["auth_refused"]["key_id"] == "feedf00d"
    assert events["commit"]["user"] == "auditor" and events["commit"]["version"] == "auditor/proj/ds:v0"
    assert events["delete_version"]["id"] == v0.id and events["delete_version"]["user"] == "auditor"


# -- item 6: listings in a constant number of queries, indexes, the write lock --------------------
def _statements(engine):  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    seen: list[str] = []

    def record(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    return seen, lambda: sa.event.remove(engine, "before_cursor_execute", record)


def test_resolve_and_list_versions_cost_two_queries_and_errors_still_name_what_is_missing(local_store,  # type: ignore[no-untyped-def]
                                                                                           tmp_path: Path) -> None:
    """The calls a fleet of mounts makes most (bench/load): the version with its collection's path
    in one joined query, the aliases and tags of those versions in one (was 3 + 1 + 2, then 3 + 3)."""
    from client.errors import NotFoundError
    from tests.util import commit_files

    commit_files(local_store, tmp_path, {"a": b"1"}, aliases=("best",), tags=("t1",))
    commit_files(local_store, tmp_path, {"a": b"2"})
    reg = local_store
    seen, stop = _statements(reg.engine)
    best = reg.resolve("ent", "proj", "ds", "best")
    resolve_count = len(seen)
    versions = reg.list_versions("ent", "proj", "ds")
    stop()
    assert best.version == "v0" and sorted(best.aliases) == ["best"] and list(best.tags) == ["t1"]
    assert [(v.version, sorted(v.aliases)) for v in versions] == [("v0", ["best"]), ("v1", ["latest"])]
    queries = [q for q in seen if not q.startswith("BEGIN")]
    assert resolve_count - 1 == 2 and len(queries) == 4, queries
    for args, message in [(("nope", "proj", "ds"), "entity 'nope' not found"),
                          (("ent", "nope", "ds"), "project ent/nope not found"),
                          (("ent", "proj", "nope"), "collection ent/proj/nope not found")]:
        with pytest.raises(NotFoundError, match=message):
            reg.resolve(*args, "latest")
        with pytest.raises(NotFoundError, match=message):
            reg.list_versions(*args)


def test_listing_collections_costs_the_same_queries_for_3_or_40_collections(local_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.util import commit_files

    for i in range(40):
        commit_files(local_store, tmp_path, {"a": b"%d" % i}, collection=f"c{i:02d}", aliases=("best",))
        commit_files(local_store, tmp_path, {"a": b"x%d" % i}, collection=f"c{i:02d}", tags=("t",))
        if i == 2:
            seen, stop = _statements(local_store.engine)
            three = local_store.list_collections("ent", "proj")
            stop()
            queries_for_3 = len(seen)
    seen, stop = _statements(local_store.engine)
    forty = local_store.list_collections("ent", "proj")
    stop()
    assert len(forty) == 40 and len(three) == 3
    assert forty[5].aliases == {"best": 0, "latest": 1} and forty[5].version_count == 2
    assert len(seen) == queries_for_3 <= 8, seen


def test_commit_checks_blobs_outside_the_write_transaction(local_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.util import commit_files

    commit_files(local_store, tmp_path, {"a": b"1"})
    seen, stop = _statements(local_store.engine)
    commit_files(local_store, tmp_path, {f"f{i}": b"%d" % i for i in range(20)})
    stop()
    begin = [i for i, s in enumerate(seen) if s.startswith("BEGIN IMMEDIATE")]
    assert begin, seen
    in_commit_tx = seen[begin[-1]:]  # the commit's write transaction is the last one
    assert any("INSERT INTO versions" in s for s in in_commit_tx)
    assert not any("FROM blobs" in s for s in in_commit_tx), in_commit_tx


def test_indexes_on_versions_run_pk_and_usages_version_id_also_on_an_existing_database(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from client.registry import LocalBlobBackend, RegistryCore

    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = RegistryCore(url, LocalBlobBackend(tmp_path / "blobs"))

    def indexes() -> set[str]:
        insp = sa.inspect(reg.engine)
        return {i["name"] for table in ("versions", "usages") for i in insp.get_indexes(table)}

    assert {"versions_by_run", "usages_by_version"} <= indexes()
    with reg.engine.begin() as c:  # a database made before these indexes (and schema versions) existed
        c.exec_driver_sql("DROP INDEX versions_by_run")
        c.exec_driver_sql("DROP INDEX usages_by_version")
        c.exec_driver_sql("DROP TABLE alembic_version")
        c.exec_driver_sql("DROP TABLE run_files")  # and before what migration 0002 adds
        c.exec_driver_sql("ALTER TABLE runs DROP COLUMN summary")
        c.exec_driver_sql("ALTER TABLE runs DROP COLUMN tags")
        c.exec_driver_sql("ALTER TABLE collections DROP COLUMN stamp")  # and 0003
    reg.close()
    reg = RegistryCore(url, LocalBlobBackend(tmp_path / "blobs"), migrate=True)
    assert {"versions_by_run", "usages_by_version"} <= indexes()
    plan = " ".join(str(r) for r in reg.engine.connect().exec_driver_sql(
        "EXPLAIN QUERY PLAN SELECT run_pk FROM usages WHERE version_id = 'x'"))
    assert "usages_by_version" in plan
    reg.close()


def test_project_listing_is_one_request_and_constant_queries(local_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.util import commit_files

    for i in range(12):
        for rev in range(2):
            commit_files(local_store, tmp_path, {"a": b"%d-%d" % (i, rev)}, collection=f"c{i:02d}")
    seen, stop = _statements(local_store.engine)
    collections, versions = local_store.list_project("ent", "proj")
    stop()
    assert [c.name for c in collections] == [f"c{i:02d}" for i in range(12)]
    assert [(v.collection, v.version) for v in versions][:3] == [("c00", "v0"), ("c00", "v1"), ("c01", "v0")]
    assert len(versions) == 24 and len(seen) <= 10, seen
    assert versions == [v for c in collections for v in local_store.list_versions("ent", "proj", c.name)]


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_mount_lists_a_project_of_30_collections_in_one_request(registry: SharedRegistry, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.mount_helpers import mounted
    from tests.util import commit_files
    team = registry.new_team("big")
    _, key = registry.new_user("alice", teams=(team,))
    store = make_store(registry.server.url, key)
    for i in range(30):
        commit_files(store, tmp_path, {"a": b"%d" % i}, entity=team, collection=f"c{i:02d}", aliases=("best",))
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    with mounted(registry.server.url, tmp_path) as m:  # type: ignore[arg-type]
        before = _scrape(registry.server.url)
        names = os.listdir(m.path / team / "proj")
        after = _scrape(registry.server.url)
    assert len(names) == 90 and "c07:best" in names and "c29:latest" in names

    def calls(route: str) -> float:
        labels = {"route": route, "method": "GET", "status": "200"}
        return (_value(after, "artifactfs_http_requests_total", **labels)
                - _value(before, "artifactfs_http_requests_total", **labels))

    project = "/api/v1/entities/{entity}/projects/{project}"
    assert calls(project + "/listing") == 1
    assert calls(project + "/collections/{collection}/versions") == 0
    assert calls(project + "/collections") == 0


def test_concurrent_blob_registrations_share_one_write_transaction(tmp_path: Path) -> None:
    import threading
    import time

    from client.registry import LocalBlobBackend, RegistryCore
    from server.registrar import BlobRegistrar

    reg = RegistryCore(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobBackend(tmp_path / "blobs"))
    registrar = BlobRegistrar(reg)
    real, entered, gate = reg.register_blobs, threading.Event(), threading.Event()

    def held_first_write(blobs):  # type: ignore[no-untyped-def]
        if not entered.is_set():
            entered.set()
            assert gate.wait(30)
        return real(blobs)

    reg.register_blobs = held_first_write  # type: ignore[method-assign]
    md5s = [hashlib.md5(b"%d" % i).hexdigest() for i in range(21)]
    threads = [threading.Thread(target=registrar.register, args=("ent", md5s[0], 1))]
    threads[0].start()
    assert entered.wait(30)  # the leader is inside its (held) write
    threads += [threading.Thread(target=registrar.register, args=("ent", m, 1)) for m in md5s[1:]]
    for th in threads[1:]:
        th.start()
    deadline = time.monotonic() + 30
    while registrar.pending() < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert registrar.pending() == 20
    seen, stop = _statements(reg.engine)
    gate.set()
    for th in threads:
        th.join(30)
    stop()
    assert registrar.transactions == 2  # the leader's own, then all 20 that queued meanwhile
    assert sum(s.startswith("BEGIN IMMEDIATE") for s in seen) == 2
    assert reg.missing_blobs("ent", md5s) == set()
    registrar.register("ent", md5s[0], 1)  # alone: written at once, no waiting for company
    assert registrar.transactions == 3 and registrar.pending() == 0
    reg.close()


# -- item 6: URL caches that keep their recent entries -------------------------------------------
def test_url_cache_evicts_least_recent_and_expired_entries_not_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that has seen more than 100k blobs kept signing URLs again for all of them (the
    cache emptied itself at the threshold); now only the least recently used entry leaves, and
    expired entries leave on their own.  The store points at a closed port: a cache miss would
    be a request, and fail."""
    import time

    import urllib3

    store = make_store("http://127.0.0.1:9", None, attempts=1, connect_timeout=0.5)
    md5s = [f"{i:032x}" for i in range(100_001)]
    for m in md5s:
        store._remember_url("e", m, f"/blobdata/e/{m}", 600.0, 1)
    assert store._download_url("e", md5s[1]) == (f"http://127.0.0.1:9/blobdata/e/{md5s[1]}", 1)
    assert store._download_url("e", md5s[-1])[0].endswith(md5s[-1])
    with pytest.raises(urllib3.exceptions.NewConnectionError):
        store._download_url("e", md5s[0])  # the least recently used one went, and only it
    assert len(store._urls) == 100_000

    short = make_store("http://127.0.0.1:9", None, attempts=1, connect_timeout=0.5)
    short._remember_url("e", md5s[0], "/u", 0.02, None)  # valid for expires_in / 2 = 10 ms
    time.sleep(0.05)
    assert len(short._urls) == 0


# -- item 6: bounded client memory ---------------------------------------------------------------
def test_parallel_transfers_share_one_bounded_pool_and_buffer_budget(registry: SharedRegistry, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """8 callers each moving a multi-part blob used to start 8 part threads each (8 x 8 part
    buffers of 16 MiB, ~1 GiB): now every part of every transfer of a store goes through one
    pool of TRANSFER_THREADS threads, and at most that many part buffers are alive at once."""
    import threading
    import time

    from client.store import http

    monkeypatch.setattr(http, "DOWNLOAD_PART", 1 << 20)
    monkeypatch.setattr(http, "PARALLEL_DOWNLOAD_THRESHOLD", 2 << 20)
    user, key = registry.new_user("mem")
    store = make_store(registry.second.url, key)  # the second server has 6 MiB multipart thresholds
    blobs = []
    for i in range(8):
        p = tmp_path / f"b{i}"
        p.write_bytes(os.urandom(12 << 20))
        blobs.append((p, hashlib.md5(p.read_bytes()).hexdigest()))
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "threads": 0}
    base_threads = threading.active_count()

    def counted(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                state["threads"] = max(state["threads"], threading.active_count() - base_threads)
            try:
                time.sleep(0.02)  # let the callers overlap: the counts are what is asserted
                return fn(*args, **kwargs)
            finally:
                with lock:
                    state["now"] -= 1
        return wrapper

    store._ranged_get = counted(store._ranged_get)
    store._put_data = counted(store._put_data)
    on_each(lambda b: store.put_blob(user, b[1], b[0], 12 << 20), blobs, threads=8)
    assert store.missing_blobs(user, [m for _, m in blobs]) == set()
    if registry.backend == "postgres-s3":  # multipart: 3 parts of 5 MiB each, 24 in all
        assert state["peak"] == http.TRANSFER_THREADS
    state["peak"] = 0

    def download(b: tuple[Path, str]) -> None:
        out = tmp_path / f"out-{b[1]}"
        store.download_blob(user, b[1], out)
        assert hashlib.md5(out.read_bytes()).hexdigest() == b[1]

    on_each(download, blobs, threads=8)  # 12 ranged GETs each, 96 in all
    assert state["peak"] == http.TRANSFER_THREADS  # ranged GETs in flight, all callers together
    assert store.part_budget.peak <= http.TRANSFER_THREADS
    assert store.part_budget.in_use == 0
    # 8 callers + one pool of TRANSFER_THREADS (was 8 callers x 8 threads each)
    assert state["threads"] <= 8 + http.TRANSFER_THREADS
    store.close()
