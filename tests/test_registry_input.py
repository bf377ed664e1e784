"""Bad input to the registry: every malformed request is refused with a 4xx and a message (never
a 500, never stored), on the real server over HTTP and on the embedded store; the documented
limits hold; garbage collection of one entity is never blocked by another's data; a manifest's
entry sizes must match the blobs they name."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from client import names
from client.errors import ArtifactFSError, InvalidNameError, ManifestError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest
from tests.server_fixtures import RegistryServer, ServerFactory, make_store
from tests.util import commit_files, upload_bytes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerFactory, RegistryServer]]:
    tmp = tmp_path_factory.mktemp("input")
    factory = ServerFactory(f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs"), tmp)
    try:
        yield factory, factory.start()
    finally:
        factory.stop_all()


def _manifest_line_format(entries: dict[str, tuple[str, int]]) -> bytes:
    return Manifest([ManifestEntry(p, d, s) for p, (d, s) in entries.items()]).to_bytes()


def bad_manifests(store, entity: str, tmp: Path) -> dict[str, bytes]:
    """Manifests the registry must refuse at commit, with their blobs uploaded."""
    data = b"payload" * 100
    digest = hex_to_b64(upload_bytes(store, entity, data, tmp))
    good = _manifest_line_format({"a.bin": (digest, len(data))})
    both = _manifest_line_format({"a": (digest, len(data)), "a/b": (digest, len(data))})
    huge = good.replace(b'"size": %d' % len(data), b'"size": %d' % (1 << 63))
    assert huge != good
    badutf = good.replace(b"a.bin", b"a\xff.bin")
    return {"trailing bytes": good + b"garbage", "file and directory": both, "size >= 2^63": huge,
            "invalid UTF-8": badutf, "deep nesting": b"[" * 100_000 + b"]" * 100_000}


def _commit(store, entity: str, manifest: bytes, tmp: Path, **kw):
    md5 = upload_bytes(store, entity, manifest, tmp)
    return store.commit(CommitRequest(entity, "proj", "ds", "dataset", md5, **kw))


@pytest.mark.parametrize("where", ["embedded", "http"])
def test_malformed_manifests_and_fields_are_refused_with_a_clear_error(where: str, server, local_store,
                                                                        tmp_path: Path) -> None:
    if where == "http":
        factory, srv = server
        entity = f"u{os.urandom(4).hex()}"
        store = make_store(srv.url, factory.user(entity))
    else:
        store, entity = local_store, "ent"
    for what, manifest in bad_manifests(store, entity, tmp_path).items():
        with pytest.raises((ManifestError, InvalidNameError)) as info:
            _commit(store, entity, manifest, tmp_path)
        assert str(info.value), what
    v0, _ = commit_files(store, tmp_path, {"x": b"x"}, entity=entity)
    for field, value in (("ttl_seconds", 1e300), ("ttl_seconds", "forever"), ("ttl_seconds", -1),
                         ("description", "d" * (20 << 20)), ("metadata", {"k": "v" * (2 << 20)})):
        with pytest.raises(InvalidNameError, match=field.split("_")[0]):
            commit_files(store, tmp_path, {"y": b"y"}, entity=entity, **{field: value})
        with pytest.raises(InvalidNameError, match=field.split("_")[0]):
            store.update_version(v0.id, **{field: value})
    with pytest.raises(InvalidNameError, match="ttl"):
        store.set_entity_default_ttl(entity, 1e300)
    assert [v.index for v in store.list_versions(entity, "proj", "ds")] == [0]  # nothing stored


def test_manifest_size_that_does_not_match_its_blob_is_refused(local_store, server, tmp_path: Path) -> None:
    factory, srv = server
    entity = f"u{os.urandom(4).hex()}"
    for store, ent in ((local_store, "ent"), (make_store(srv.url, factory.user(entity)), entity)):
        data = os.urandom(10 << 20)
        digest = hex_to_b64(upload_bytes(store, ent, data, tmp_path))
        lying = _manifest_line_format({"big.bin": (digest, 4 << 20)})
        with pytest.raises(ManifestError, match=r"big.bin.*4194304 bytes.*10485760"):
            _commit(store, ent, lying, tmp_path)
        rec, created = _commit(store, ent, _manifest_line_format({"big.bin": (digest, len(data))}), tmp_path)
        assert created and rec.size == len(data)


def test_raw_malformed_http_requests_get_4xx_never_500(server) -> None:
    factory, srv = server
    entity = f"u{os.urandom(4).hex()}"
    key = factory.user(entity)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    api = srv.url + "/api/v1"
    body = {"entity": entity, "project": "p", "collection": "c", "type": "t", "manifest_md5": "0" * 32}
    cases = [
        ("POST", "/commit", b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}"),
        ("POST", "/commit", b'{"entity": "\xff\xfe"}'),
        ("POST", "/commit", dict(body, ttl_seconds="forever")),
        ("POST", "/commit", dict(body, ttl_seconds=1e300)),
        ("POST", "/commit", dict(body, description="d" * (20 << 20))),
        ("PUT", f"/entities/{entity}/default-ttl", {"ttl_seconds": 1e300}),
        ("POST", f"/entities/{entity}/blobs/{'0' * 32}/uploads", {"size": 1 << 63}),
        ("POST", f"/entities/{entity}/blobs/{'0' * 32}/complete", {"size": 1 << 64}),
    ]
    for method, path, payload in cases:
        kw = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
        resp = requests.request(method, api + path, headers=h, timeout=60, **kw)
        assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[:300])
        assert resp.json()["error"]["message"], (path, resp.text[:300])


def test_gc_of_one_entity_is_never_blocked_by_another_entitys_ttl(local_store, tmp_path: Path) -> None:
    """A TTL beyond the calendar stored before TTLs were checked (written here straight into the
    database) neither fails the sweep nor stops other entities' expired versions from going."""
    bad, _ = commit_files(local_store, tmp_path, {"a": b"a"}, entity="mallory", ttl_seconds=10)
    good, _ = commit_files(local_store, tmp_path, {"b": b"b"}, entity="alice", ttl_seconds=10)
    registry = local_store
    from client.registry import schema as t

    with registry.engine.begin() as c:
        c.execute(t.versions.update().where(t.versions.c.id == bad.id).values(ttl_seconds=1e300))
    gone = registry.gc_expired(now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    assert [v.id for v in gone] == [good.id]
    assert names.MAX_TTL_SECONDS < 1e300


def test_limits_are_documented() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "SEMANTICS.md").read_text()
    for limit in (names.MAX_TTL_SECONDS, names.MAX_DESCRIPTION, names.MAX_METADATA_BYTES, names.MAX_ENTRIES,
                  names.MAX_PATH):
        assert f"{limit:,}" in text or str(limit) in text, limit
    assert issubclass(ManifestError, ArtifactFSError) and sa is not None
