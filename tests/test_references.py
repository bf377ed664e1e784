"""Reference entries against real sources: file:// trees, a loopback HTTP server with Range and
ETag support, and moto's S3 server on loopback (plain and versioned buckets)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import pytest

from tests.http_site import Site, serving
from tests.util import write_tree

from client.errors import DigestMismatchError, InvalidPathError, NotFoundError, StoreUnavailableError
from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest
from client.references import (
    entries_for_reference,
    entries_to_download,
    fetch_reference,
    is_uri_digest,
    read_reference_range,
    uri_digest,
)

# --------------------------------------------------------------------------- helpers


def b64md5(data: bytes) -> str:
    return hex_to_b64(md5_bytes(data))




# --------------------------------------------------------------------------- file://


def test_file_single_object(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.bin": b"hello"}) / "a.bin"
    [e] = entries_for_reference(src.as_uri())
    assert (e.path, e.digest, e.size, e.ref) == ("a.bin", b64md5(b"hello"), 5, src.as_uri())
    [named] = entries_for_reference(src.as_uri(), name="x/y.bin")
    assert named.path == "x/y.bin"


def test_file_directory_expands_with_relative_names(tmp_path: Path) -> None:
    files = {"a.txt": b"A", "sub/b.txt": b"BB", "sub/deep/c.txt": b"CCC"}
    root = write_tree(tmp_path / "tree", files)
    entries = entries_for_reference(root.as_uri())
    assert [e.path for e in entries] == ["a.txt", "sub/b.txt", "sub/deep/c.txt"]
    for e in entries:
        assert e.digest == b64md5(files[e.path])
        assert e.size == len(files[e.path])
        assert e.ref == root.as_uri() + "/" + e.path
    prefixed = entries_for_reference(root.as_uri() + "/", name="data/")
    assert [e.path for e in prefixed] == ["data/a.txt", "data/sub/b.txt", "data/sub/deep/c.txt"]
    # A manifest accepts them and its digest is stable across calls.
    assert Manifest(entries).digest() == Manifest(entries_for_reference(root.as_uri())).digest()


def test_file_directory_max_objects_exceeded_is_value_error(tmp_path: Path) -> None:
    # wandb 0.31.0 raises ValueError("Exceeded 3 objects tracked, ...") (observed side by side).
    root = write_tree(tmp_path / "tree", {f"f{i:02d}": bytes([i]) for i in range(10)})
    with pytest.raises(ValueError, match="Exceeded 3 objects"):
        entries_for_reference(root.as_uri(), max_objects=3)
    assert len(entries_for_reference(root.as_uri(), max_objects=10)) == 10
    with pytest.raises(InvalidPathError):
        entries_for_reference(root.as_uri(), max_objects=0)


def test_file_checksum_false_expands_with_uri_digests(tmp_path: Path) -> None:
    # wandb's rule: the directory is walked; each digest is the md5 of the file's resolved URI.
    root = write_tree(tmp_path / "tree", {"a": b"1", "b/c": b"2"})
    entries = entries_for_reference(root.as_uri(), checksum=False)
    assert [(e.path, e.size) for e in entries] == [("a", 1), ("b/c", 1)]
    assert entries[0].digest == uri_digest((root / "a").as_uri())
    assert all(is_uri_digest(e) for e in entries)
    # Changing the content does not change the entry: only the URI counts.
    (root / "a").write_bytes(b"changed")
    assert entries_for_reference(root.as_uri(), checksum=False)[0].digest == entries[0].digest
    assert entries_to_download(entries[0]) == [entries[0]]


def test_file_fetch_and_range(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    src = write_tree(tmp_path / "src", {"blob": data}) / "blob"
    [e] = entries_for_reference(src.as_uri())
    dest = tmp_path / "out" / "blob"
    fetch_reference(e, dest)
    assert dest.read_bytes() == data
    assert read_reference_range(e, 100, 50) == data[100:150]
    assert read_reference_range(e, len(data) - 5, 100) == data[-5:]
    assert read_reference_range(e, len(data) + 10, 4) == b""


def test_file_changed_after_logging_raises(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"f": b"original"}) / "f"
    [e] = entries_for_reference(src.as_uri())
    src.write_bytes(b"modified")  # same size, other bytes: only the md5 shows it
    dest = tmp_path / "out"
    with pytest.raises(DigestMismatchError, match="changed"):
        fetch_reference(e, dest)
    assert not dest.exists(), "an unverified download must not be left in place"
    assert not list(tmp_path.glob(".*incomplete"))
    src.write_bytes(b"longer than before")
    with pytest.raises(DigestMismatchError):
        read_reference_range(e, 0, 4)


def test_file_missing_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(ValueError):  # wandb: ValueError "must be a valid file or directory path"
        entries_for_reference((tmp_path / "nope").as_uri())
    src = write_tree(tmp_path / "s", {"f": b"x"}) / "f"
    [e] = entries_for_reference(src.as_uri())
    src.unlink()
    with pytest.raises(NotFoundError):
        fetch_reference(e, tmp_path / "out")
    assert isinstance(NotFoundError("x"), LookupError)


def test_unchecked_file_fetch_skips_verification(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "s", {"f": b"v1"}) / "f"
    [e] = entries_for_reference(src.as_uri(), checksum=False)
    src.write_bytes(b"version two")
    fetch_reference(e, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"version two"


# --------------------------------------------------------------------------- other schemes


def test_other_scheme_tracks_uri_only() -> None:
    uri = "ftp://example.org/pub/data.csv"
    with pytest.raises(ValueError, match="name="):  # wandb: an unknown scheme needs a name
        entries_for_reference(uri)
    [e] = entries_for_reference(uri, name="mine.csv")
    assert e.path == "mine.csv" and e.size is None and e.ref == uri
    assert e.digest == uri  # wandb: the digest is the URI string
    with pytest.raises(NotFoundError, match="cannot read"):
        fetch_reference(e, Path("/nonexistent/never"))
    with pytest.raises(InvalidPathError):
        entries_for_reference("")


# --------------------------------------------------------------------------- http(s)://


@pytest.fixture
def http_site() -> Iterator[tuple[Site, str]]:
    with serving() as served:
        yield served


def test_http_entry_from_head(http_site) -> None:
    site, base = http_site
    site.files["/data/file.txt"] = b"hello over http"
    [e] = entries_for_reference(base + "/data/file.txt")
    md5 = md5_bytes(b"hello over http")
    assert (e.path, e.digest, e.size) == ("file.txt", md5, 15)
    assert e.extra == {"etag": f'"{md5}"'}
    assert site.requests[-1][0] == "HEAD"
    [named] = entries_for_reference(base + "/data/file.txt", name="renamed.txt")
    assert named.path == "renamed.txt"


def test_http_checksum_false_sends_nothing(http_site) -> None:
    site, base = http_site
    [e] = entries_for_reference(base + "/never/requested.bin", checksum=False)
    assert is_uri_digest(e) and e.size is None and e.path == "requested.bin"
    assert site.requests == []


def test_http_fetch_and_ranged_reads(http_site, tmp_path: Path) -> None:
    site, base = http_site
    data = bytes(range(256)) * 100
    site.files["/big.bin"] = data
    [e] = entries_for_reference(base + "/big.bin")
    fetch_reference(e, tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == data
    site.requests.clear()
    assert read_reference_range(e, 1000, 300) == data[1000:1300]
    assert [r[:3] for r in site.requests] == [("GET", "/big.bin", "bytes=1000-1299")]
    assert read_reference_range(e, len(data) - 10, 100) == data[-10:]
    assert read_reference_range(e, len(data) + 1, 10) == b""
    # A server that ignores Range still yields the right slice.
    site.honour_range = False
    assert read_reference_range(e, 5000, 7) == data[5000:5007]


def test_http_changed_after_logging_raises(http_site, tmp_path: Path) -> None:
    site, base = http_site
    site.files["/f"] = b"first"
    [e] = entries_for_reference(base + "/f")
    site.files["/f"] = b"other"
    with pytest.raises(DigestMismatchError, match="ETag"):
        fetch_reference(e, tmp_path / "f")
    with pytest.raises(DigestMismatchError):
        read_reference_range(e, 0, 2)
    assert not (tmp_path / "f").exists()


def test_http_missing_and_unreachable(http_site, tmp_path: Path) -> None:
    site, base = http_site
    with pytest.raises(NotFoundError):
        entries_for_reference(base + "/missing")
    site.files["/gone"] = b"x"
    [e] = entries_for_reference(base + "/gone")
    del site.files["/gone"]
    with pytest.raises(NotFoundError):
        fetch_reference(e, tmp_path / "gone")
    with pytest.raises(StoreUnavailableError):
        entries_for_reference("http://127.0.0.1:9/unreachable")  # discard port: refused


# --------------------------------------------------------------------------- s3:// (moto server)


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    import boto3

    monkeypatch.setenv("ARTIFACTFS_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _bucket(s3, name: str, versioned: bool = False) -> str:
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def test_s3_single_object(s3, tmp_path: Path) -> None:
    _bucket(s3, "plain-one")
    s3.put_object(Bucket="plain-one", Key="models/m.bin", Body=b"weights")
    [e] = entries_for_reference("s3://plain-one/models/m.bin")
    assert (e.path, e.digest, e.size, e.ref) == ("m.bin", md5_bytes(b"weights"), 7, "s3://plain-one/models/m.bin")
    assert e.extra == {"etag": md5_bytes(b"weights")}  # not versioned: no versionID
    fetch_reference(e, tmp_path / "m.bin")
    assert (tmp_path / "m.bin").read_bytes() == b"weights"
    assert read_reference_range(e, 2, 3) == b"igh"
    assert read_reference_range(e, 100, 3) == b""


def test_s3_prefix_expands_with_names_and_max_objects(s3) -> None:
    _bucket(s3, "plain-prefix")
    keys = ["data/a", "data/b/c", "data/b/d", "data2/x", "other/y"]
    for k in keys:
        s3.put_object(Bucket="plain-prefix", Key=k, Body=k.encode())
    entries = entries_for_reference("s3://plain-prefix/data")
    assert [e.path for e in entries] == ["a", "b/c", "b/d"]  # data2/ is not under data/
    assert all(e.digest == md5_bytes(("data/" + e.path).encode()) for e in entries)
    named = entries_for_reference("s3://plain-prefix/data/", name="path")
    assert [e.path for e in named] == ["path/a", "path/b/c", "path/b/d"]
    assert [e.path for e in entries_for_reference("s3://plain-prefix/data", max_objects=2)] == ["a", "b/c"]
    assert len(entries_for_reference("s3://plain-prefix")) == 5
    with pytest.raises(NotFoundError):
        entries_for_reference("s3://plain-prefix/nothing-here")


def test_s3_checksum_false(s3) -> None:
    _bucket(s3, "plain-nock")
    s3.put_object(Bucket="plain-nock", Key="p/a", Body=b"1")
    s3.put_object(Bucket="plain-nock", Key="p/b", Body=b"2")
    [e] = entries_for_reference("s3://plain-nock/p", checksum=False)
    assert is_uri_digest(e) and e.path == "p" and e.size is None
    assert [x.path for x in entries_to_download(e)] == ["p/a", "p/b"]


def test_s3_overwrite_after_logging_raises(s3, tmp_path: Path) -> None:
    _bucket(s3, "plain-change")
    s3.put_object(Bucket="plain-change", Key="f", Body=b"logged")
    [e] = entries_for_reference("s3://plain-change/f")
    s3.put_object(Bucket="plain-change", Key="f", Body=b"LOGGED")
    with pytest.raises(DigestMismatchError):
        fetch_reference(e, tmp_path / "f")
    with pytest.raises(DigestMismatchError):
        read_reference_range(e, 0, 3)
    assert not (tmp_path / "f").exists()
    s3.delete_object(Bucket="plain-change", Key="f")
    with pytest.raises(NotFoundError):
        fetch_reference(e, tmp_path / "f")


def test_s3_versioned_bucket_pins_logged_version(s3, tmp_path: Path) -> None:
    _bucket(s3, "versioned", versioned=True)
    v1 = s3.put_object(Bucket="versioned", Key="d/f.txt", Body=b"version one")["VersionId"]
    s3.put_object(Bucket="versioned", Key="d/g.txt", Body=b"gee")
    [e] = entries_for_reference("s3://versioned/d/f.txt")
    assert e.extra["versionID"] == v1 and e.extra["etag"] == e.digest
    listed = entries_for_reference("s3://versioned/d")
    assert [x.path for x in listed] == ["f.txt", "g.txt"]
    assert listed[0].extra["versionID"] == v1
    # Overwriting the key does not change what the logged entry fetches.
    s3.put_object(Bucket="versioned", Key="d/f.txt", Body=b"version two!")
    fetch_reference(e, tmp_path / "f.txt")
    assert (tmp_path / "f.txt").read_bytes() == b"version one"
    assert read_reference_range(e, 8, 3) == b"one"
    # An explicit ?versionId= pins a reference to an older version.
    [old] = entries_for_reference(f"s3://versioned/d/f.txt?versionId={v1}")
    assert old.size == len(b"version one")


def test_s3_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreUnavailableError):
        entries_for_reference("s3://any/key")


# --------------------------------------------------------------------------- gs:// (emulator)


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    pytest.importorskip("google.cloud.storage")
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    import socket

    with socket.socket() as s:  # the emulator wants a concrete port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return storage.Client(project="artifactfs", credentials=AnonymousCredentials())


def test_gs_object_prefix_fetch_range_and_change(gcs, tmp_path: Path) -> None:
    bucket = gcs.create_bucket("gs-refs")
    bucket.blob("d/a.txt").upload_from_string(b"hello gcs")
    bucket.blob("d/e/f").upload_from_string(b"ffff")
    bucket.blob("d2/z").upload_from_string(b"z")
    [e] = entries_for_reference("gs://gs-refs/d/a.txt")
    assert (e.path, e.digest, e.size) == ("a.txt", b64md5(b"hello gcs"), 9)
    assert [x.path for x in entries_for_reference("gs://gs-refs/d", name="path")] == ["path/a.txt", "path/e/f"]
    assert [x.path for x in entries_for_reference("gs://gs-refs/d", max_objects=1)] == ["a.txt"]
    fetch_reference(e, tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == b"hello gcs"
    assert read_reference_range(e, 2, 3) == b"llo"
    bucket.blob("d/a.txt").upload_from_string(b"HELLO gcs")
    with pytest.raises(DigestMismatchError):
        fetch_reference(e, tmp_path / "changed")
    with pytest.raises(NotFoundError):
        entries_for_reference("gs://gs-refs/none")


def test_gs_without_library_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from client.errors import ArtifactFSError

    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # import now raises ImportError
    with pytest.raises(ArtifactFSError, match="google-cloud-storage"):
        entries_for_reference("gs://bucket/key")
    # checksum=False never needs the library.
    assert entries_for_reference("gs://bucket/key", checksum=False)[0].path == "key"


# --------------------------------------------------------------------------- through Artifact


def test_artifact_logs_downloads_and_verifies_http_and_s3_references(http_site, s3, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """add_reference -> log -> download (fetching from the sources) -> verify, end to end."""
    import client
    from client import live_run as run_mod

    monkeypatch.setenv("ARTIFACTFS_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    run_mod._reset_for_tests()
    site, base = http_site
    site.files["/data/page.html"] = b"<html>hi</html>"
    _bucket(s3, "art-refs")
    s3.put_object(Bucket="art-refs", Key="set/a.bin", Body=b"aaa")
    s3.put_object(Bucket="art-refs", Key="set/b/c.bin", Body=b"cc")
    art = client.Artifact("mixed", "dataset")
    art.add_reference(f"{base}/data/page.html")
    art.add_reference("s3://art-refs/set", name="bucket")
    art.add_reference("custom://somewhere/x", name="tracked")  # other schemes: URI digest only
    with client.init(project="proj") as r:
        r.log_artifact(art)
    got = client.Api().artifact("proj/mixed:latest")
    assert sorted(e.path for e in got.manifest) == ["bucket/a.bin", "bucket/b/c.bin", "page.html", "tracked"]
    assert got.bytes_uploaded == 0 and art.bytes_uploaded == len(art.manifest.to_bytes())
    with pytest.raises(NotFoundError):
        got.download(tmp_path / "d0")  # custom:// cannot be fetched: a missing reference
    out = Path(got.download(tmp_path / "d1", allow_missing_references=True))
    assert (out / "page.html").read_bytes() == b"<html>hi</html>"
    assert (out / "bucket/a.bin").read_bytes() == b"aaa" and (out / "bucket/b/c.bin").read_bytes() == b"cc"
    got.verify(out)  # references are not verified (tracked is absent, that is fine)
    s3.put_object(Bucket="art-refs", Key="set/a.bin", Body=b"changed")
    with pytest.raises(DigestMismatchError):
        got.download(tmp_path / "d2", allow_missing_references=True)
    run_mod._reset_for_tests()
