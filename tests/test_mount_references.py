"""Reference entries read through a real mount: s3:// on moto (plain and versioned buckets),
http:// on a loopback server (with and without ETag), file:// sources, and a mixed artifact.

Requests are counted at the daemon (``reference_requests`` in the root's stats xattr) and, for
HTTP, at the server itself; no test asserts on time."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.hashing import hex_to_b64, md5_bytes, md5_file
from client.manifest import Manifest, ManifestEntry
from client.references import entries_for_reference
from client.store.base import CommitRequest
from client.store.local import LocalStore
from tests.http_site import Site, serving
from tests.mount_helpers import Mount, mounted, requires_fuse

pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.timeout(180)]

MiB = 1 << 20


# --------------------------------------------------------------------------- helpers

def commit(store_dir: Path, work: Path, refs: list[ManifestEntry], stored: dict[str, bytes] | None = None,
           collection: str = "refs") -> str:
    """Commit a version holding ``refs`` (reference entries) and ``stored`` files; its dir name."""
    store = LocalStore(store_dir)
    try:
        entries = list(refs)
        for path, data in (stored or {}).items():
            blob = work / f"blob-{time.monotonic_ns()}"
            blob.write_bytes(data)
            md5 = md5_bytes(data)
            store.put_blob("ent", md5, blob, len(data))
            entries.append(ManifestEntry(path, hex_to_b64(md5), len(data)))
        manifest = work / f"manifest-{time.monotonic_ns()}.json"
        manifest.write_bytes(Manifest(entries).to_bytes())
        mmd5 = md5_file(manifest)
        store.put_blob("ent", mmd5, manifest, manifest.stat().st_size)
        rec, _ = store.commit(CommitRequest("ent", "proj", collection, "dataset", mmd5))
        return rec.qualified_name
    finally:
        store.close()


def ref_requests(m: Mount) -> int:
    return m.stats()["reference_requests"]


def read_errno(path: Path, size: int = 4096, offset: int = 0) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, size, offset)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return 0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """boto3 client on moto; the daemon finds the endpoint the way the W&B SDK does."""
    import boto3

    monkeypatch.setenv("AWS_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.delenv("ARTIFACTFS_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def multipart(s3, bucket: str, key: str, data: bytes, part: int = 5 * MiB) -> None:
    """Upload in parts: the ETag is ``<md5 of md5s>-N``, not the md5 of the bytes."""
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for n, off in enumerate(range(0, len(data), part), start=1):
        etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=n, Body=data[off:off + part])["ETag"]
        parts.append({"ETag": etag, "PartNumber": n})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up, MultipartUpload={"Parts": parts})


@pytest.fixture
def site() -> Iterator[tuple[Site, str]]:
    with serving() as served:
        yield served


# --------------------------------------------------------------------------- s3://

def test_s3_reference_reads_lazy_ranged_pinned(s3, tmp_path: Path) -> None:
    """stat/getfattr/ls/find never touch S3; a 4 KiB read of a large uncached object costs at
    most 2 requests; whole reads give the logged bytes; an object overwritten after logging
    answers EIO (never the new bytes) with a log line naming the entry."""
    s3.create_bucket(Bucket="mnt-plain")
    big = os.urandom(12 * MiB)
    multipart(s3, "mnt-plain", "set/big.bin", big)
    s3.put_object(Bucket="mnt-plain", Key="set/small.txt", Body=b"small logged bytes\n")
    s3.put_object(Bucket="mnt-plain", Key="set/changed.txt", Body=b"logged!")
    refs = entries_for_reference("s3://mnt-plain/set", name="s3")
    refs += entries_for_reference("s3://mnt-plain/set", name="unchecked-prefix", checksum=False)
    assert "-" in next(e for e in refs if e.path == "s3/big.bin").digest  # multipart: ETag is no md5
    vdir = commit(tmp_path / "store", tmp_path, refs)
    s3.put_object(Bucket="mnt-plain", Key="set/changed.txt", Body=b"LOGGED!")  # same size, other bytes
    with mounted(tmp_path / "store", tmp_path) as m:
        root = m.path / vdir
        found = subprocess.run(["find", str(root), "-type", "f"], capture_output=True, text=True, check=True)
        assert sorted(Path(p).name for p in found.stdout.split()) == ["big.bin", "changed.txt", "small.txt", "unchecked-prefix"]
        subprocess.run(["ls", "-lR", str(root)], capture_output=True, check=True)
        assert os.stat(root / "s3/big.bin").st_size == len(big)
        assert os.getxattr(root / "s3/big.bin", "user.artifact.ref") == b"s3://mnt-plain/set/big.bin"
        etag = next(e for e in refs if e.path == "s3/big.bin").digest
        assert os.getxattr(root / "s3/big.bin", "user.artifact.etag").decode() == etag
        assert ref_requests(m) == 0
        with open(root / "s3/big.bin", "rb", buffering=0) as f:
            f.seek(7 * MiB + 123)
            assert f.read(4096) == big[7 * MiB + 123:7 * MiB + 123 + 4096]
        assert 1 <= ref_requests(m) <= 2
        assert sha((root / "s3/big.bin").read_bytes()) == sha(big)
        assert (root / "s3/small.txt").read_bytes() == b"small logged bytes\n"
        assert read_errno(root / "s3/changed.txt") == errno.EIO
        with pytest.raises(OSError) as info:  # checksum=False on a prefix: no size, maybe many objects
            open(root / "unchecked-prefix", "rb")
        assert info.value.errno == errno.ENOTSUP
        assert "s3/changed.txt" in m.log_text() and "changed since it was logged" in m.log_text()
        # A second read of the big file comes from the cache: no request.
        before = ref_requests(m)
        assert sha((root / "s3/big.bin").read_bytes()) == sha(big)
        assert ref_requests(m) == before


def test_s3_cache_is_keyed_by_reference_identity(s3, tmp_path: Path) -> None:
    """Read once, then the object is overwritten: the logged version is still served from the
    cache (those are its bytes), and a version logged after the overwrite gets the new bytes,
    never the old cache object."""
    s3.create_bucket(Bucket="mnt-ident")
    old, new = os.urandom(6 * MiB), os.urandom(6 * MiB)
    multipart(s3, "mnt-ident", "k.bin", old)
    v_old = commit(tmp_path / "store", tmp_path, entries_for_reference("s3://mnt-ident/k.bin"))
    with mounted(tmp_path / "store", tmp_path) as m:
        assert sha((m.path / v_old / "k.bin").read_bytes()) == sha(old)
    multipart(s3, "mnt-ident", "k.bin", new)
    v_new = commit(tmp_path / "store", tmp_path, entries_for_reference("s3://mnt-ident/k.bin"))
    with mounted(tmp_path / "store", tmp_path) as m:  # same cache, new daemon
        assert sha((m.path / v_old / "k.bin").read_bytes()) == sha(old)
        assert ref_requests(m) == 0
        assert sha((m.path / v_new / "k.bin").read_bytes()) == sha(new)
        assert ref_requests(m) >= 1


def test_s3_versioned_bucket_serves_logged_version(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="mnt-versioned")
    s3.put_bucket_versioning(Bucket="mnt-versioned", VersioningConfiguration={"Status": "Enabled"})
    one = os.urandom(3 * MiB)
    s3.put_object(Bucket="mnt-versioned", Key="d/f.bin", Body=one)
    refs = entries_for_reference("s3://mnt-versioned/d/f.bin")
    vid = refs[0].extra["versionID"]
    vdir = commit(tmp_path / "store", tmp_path, refs)
    s3.put_object(Bucket="mnt-versioned", Key="d/f.bin", Body=os.urandom(3 * MiB))
    with mounted(tmp_path / "store", tmp_path) as m:
        assert os.getxattr(m.path / vdir / "f.bin", "user.artifact.version_id").decode() == vid
        assert sha((m.path / vdir / "f.bin").read_bytes()) == sha(one)


def test_s3_missing_credentials_is_eacces(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3.create_bucket(Bucket="mnt-creds")
    s3.put_object(Bucket="mnt-creds", Key="a.txt", Body=b"secret")
    vdir = commit(tmp_path / "store", tmp_path, entries_for_reference("s3://mnt-creds/a.txt"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with mounted(tmp_path / "store", tmp_path) as m:
        assert read_errno(m.path / vdir / "a.txt") == errno.EACCES
        assert "a.txt" in m.log_text() and "AWS credentials" in m.log_text()


# --------------------------------------------------------------------------- http://

def test_http_references_with_and_without_etag(site, tmp_path: Path) -> None:
    s, base = site
    tagged, plain = os.urandom(5 * MiB), b"no etag here\n"
    s.files["/tagged.bin"] = tagged
    s.files["/changes.txt"] = b"first"
    s.files["/ignores.txt"] = b"logged"
    refs = [*entries_for_reference(f"{base}/tagged.bin"), *entries_for_reference(f"{base}/changes.txt"),
            *entries_for_reference(f"{base}/ignores.txt")]
    s.etags = False
    s.files["/plain.txt"] = plain
    refs += entries_for_reference(f"{base}/plain.txt")
    s.etags = True
    vdir = commit(tmp_path / "store", tmp_path, refs)
    s.files["/changes.txt"] = b"FIRST"
    s.requests.clear()
    with mounted(tmp_path / "store", tmp_path) as m:
        root = m.path / vdir
        subprocess.run(["find", str(root)], capture_output=True, check=True)
        assert [os.stat(root / n).st_size for n in ("tagged.bin", "plain.txt")] == [len(tagged), len(plain)]
        assert s.requests == []  # listing and stat never touch the source
        with open(root / "tagged.bin", "rb", buffering=0) as f:
            f.seek(3 * MiB)
            assert f.read(4096) == tagged[3 * MiB:3 * MiB + 4096]
        assert 1 <= len(s.requests) <= 2
        assert all(r[3] == f'"{md5_bytes(tagged)}"' for r in s.requests)  # pinned with If-Match
        assert sha((root / "tagged.bin").read_bytes()) == sha(tagged)
        assert read_errno(root / "changes.txt") == errno.EIO
        assert "changes.txt" in m.log_text()
        s.etags = False  # served without an ETag: only the recorded size can be checked
        assert (root / "plain.txt").read_bytes() == plain
        s.files["/plain.txt"] = plain + b"grown"
        s.forbidden.add("/tagged.bin")
    with mounted(tmp_path / "store", tmp_path / "second") as m:
        assert read_errno(m.path / vdir / "tagged.bin") == errno.EACCES
        assert "tagged.bin" in m.log_text() and "netrc" in m.log_text()
        assert read_errno(m.path / vdir / "plain.txt") == errno.EIO
        s.honour_if_match = False  # a server that ignores If-Match: the answer's ETag is checked
        s.files["/ignores.txt"] = b"LOGGED"
        assert read_errno(m.path / vdir / "ignores.txt") == errno.EIO
        assert s.requests[-1][1] == "/ignores.txt" and s.requests[-1][3] is not None


# --------------------------------------------------------------------------- file:// + mixed

def test_mixed_artifact_cp_sha256sum_and_changed_file_source(s3, site, tmp_path: Path) -> None:
    """Stored, file://, http:// and s3:// entries in one version read by cp -r and sha256sum;
    a file:// source rewritten after logging answers EIO."""
    s, base = site
    src = tmp_path / "nfs"
    src.mkdir()
    local = {"a.csv": b"id,x\n1,2\n", "deep/b.bin": os.urandom(3 * MiB + 7)}
    for rel, data in local.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "later.txt").write_bytes(b"before")
    s.files["/w.bin"] = web = os.urandom(100_000)
    s3.create_bucket(Bucket="mnt-mixed")
    s3.put_object(Bucket="mnt-mixed", Key="m/obj.bin", Body=(obj := os.urandom(2 * MiB + 5)))
    refs = (entries_for_reference(src.as_uri(), name="local") + entries_for_reference(f"{base}/w.bin", name="web/w.bin")
            + entries_for_reference("s3://mnt-mixed/m", name="bucket"))
    stored = {"stored/readme.md": b"# mixed\n", "stored/big.bin": os.urandom(3 * MiB)}
    vdir = commit(tmp_path / "store", tmp_path, refs, stored)
    (src / "later.txt").write_bytes(b"after!")
    expected = {**{f"local/{k}": v for k, v in local.items()}, "web/w.bin": web, "bucket/obj.bin": obj, **stored}
    with mounted(tmp_path / "store", tmp_path) as m:
        root = m.path / vdir
        out = tmp_path / "copy"
        result = subprocess.run(["cp", "-r", str(root), str(out)], capture_output=True, text=True)
        assert result.returncode != 0 and "later.txt" in result.stderr  # the changed source: EIO
        for rel, data in expected.items():
            assert (out / rel).read_bytes() == data, rel
        sums = subprocess.run(["sha256sum", *sorted(expected)], cwd=root, capture_output=True, text=True, check=True)
        assert dict(reversed(line.split("  ", 1)) for line in sums.stdout.splitlines()) == \
            {rel: sha(data) for rel, data in expected.items()}
        assert read_errno(root / "local/later.txt") == errno.EIO
        assert "local/later.txt" in m.log_text()
        try:  # a library reader on a referenced file (pyarrow/parquet is not installed here)
            import pandas
        except ImportError:
            return
        assert pandas.read_csv(root / "local/a.csv").to_dict("records") == [{"id": 1, "x": 2}]


def test_file_sources_unchecked_and_large_changed(tmp_path: Path) -> None:
    """checksum=False file:// entries are served with only their recorded size; a large
    file:// source rewritten (same size) after logging is md5-checked whole: EIO."""
    src = tmp_path / "share"
    src.mkdir()
    (src / "loose.txt").write_bytes(b"unchecked v1")
    (src / "shrinks.txt").write_bytes(b"will shrink")
    big = os.urandom(4 * MiB)
    (src / "big.bin").write_bytes(big)
    refs = (entries_for_reference((src / "loose.txt").as_uri(), checksum=False)
            + entries_for_reference((src / "shrinks.txt").as_uri(), checksum=False)
            + entries_for_reference((src / "big.bin").as_uri()))
    vdir = commit(tmp_path / "store", tmp_path, refs)
    (src / "loose.txt").write_bytes(b"unchecked v2")  # same size: nothing recorded tells them apart
    (src / "shrinks.txt").write_bytes(b"short")
    changed = bytearray(big)
    changed[3 * MiB] ^= 0xFF
    (src / "big.bin").write_bytes(bytes(changed))
    with mounted(tmp_path / "store", tmp_path) as m:
        root = m.path / vdir
        assert (root / "loose.txt").read_bytes() == b"unchecked v2"
        assert read_errno(root / "shrinks.txt") == errno.EIO
        assert read_errno(root / "big.bin", 4096, 0) == errno.EIO  # whole md5 before the first byte
        assert "big.bin" in m.log_text() and "changed since it was logged" in m.log_text()
        (src / "big.bin").write_bytes(big)  # put back: the recorded bytes are served again
        assert sha((root / "big.bin").read_bytes()) == sha(big)


def test_gcs_reference_through_the_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("google.cloud.storage")
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    import socket

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        bucket = storage.Client(project="artifactfs", credentials=AnonymousCredentials()).create_bucket("gsm")
        data = os.urandom(3 * MiB + 1)
        bucket.blob("d/obj.bin").upload_from_string(data)
        bucket.blob("d/later.txt").upload_from_string(b"gcs logged")
        vdir = commit(tmp_path / "store", tmp_path, entries_for_reference("gs://gsm/d"))
        bucket.blob("d/later.txt").upload_from_string(b"GCS LOGGED")
        with mounted(tmp_path / "store", tmp_path) as m:
            root = m.path / vdir
            assert os.stat(root / "obj.bin").st_size == len(data)
            assert sha((root / "obj.bin").read_bytes()) == sha(data)
            assert read_errno(root / "later.txt") == errno.EIO
            assert "later.txt" in m.log_text()
    finally:
        server.stop()


def test_draft_commit_keeps_references_without_touching_sources(site, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    s, base = site
    s.files["/r.bin"] = web = os.urandom(50_000)
    s.files["/w.bin"] = b"to be rewritten"
    refs = entries_for_reference(f"{base}/r.bin", name="data/r.bin")
    rewritten = entries_for_reference(f"{base}/w.bin", name="data/w.bin")
    commit(tmp_path / "store", tmp_path, refs + rewritten, {"stored.txt": b"stored\n"})
    s.requests.clear()
    with mounted(tmp_path / "store", tmp_path) as m:
        draft = m.path / "ent/proj/refs:draft"
        draft.mkdir()
        (draft / "new.txt").write_bytes(b"added in a draft\n")
        (draft / "data").mkdir(exist_ok=True)
        (draft / "data/w.bin").write_bytes(b"rewritten: now a stored file\n")
        (draft / ".commit").touch()
        result = json.loads(os.getxattr(draft, "user.artifact.draft.status"))["last_commit"]
        assert result["version"] == "ent/proj/refs:v1", result
        assert s.requests == [] and ref_requests(m) == 0  # the commit downloaded no reference
        assert (m.path / "ent/proj/refs:v1/data/r.bin").read_bytes() == web
    monkeypatch.setenv("ARTIFACTFS_STORE", str(tmp_path / "store"))
    import client

    got = {e.path: e for e in client.Api().artifact("ent/proj/refs:v1").manifest}
    assert sorted(got) == ["data/r.bin", "data/w.bin", "new.txt", "stored.txt"]
    assert (got["data/r.bin"].ref, got["data/r.bin"].digest, got["data/r.bin"].extra) == \
        (refs[0].ref, refs[0].digest, refs[0].extra)
    assert got["data/w.bin"].ref is None  # the rewritten reference is a stored entry now
    assert got["data/w.bin"].digest == hex_to_b64(md5_bytes(b"rewritten: now a stored file\n"))


def test_reference_to_another_artifacts_file(tmp_path: Path) -> None:
    """``add_reference(other.get_entry(path))``: a wandb-artifact:// entry is read from the
    other version's blob, md5-checked like any stored file."""
    data = os.urandom(3 * MiB)
    src_dir = commit(tmp_path / "store", tmp_path, [], {"weights.bin": data}, collection="src")
    store = LocalStore(tmp_path / "store")
    try:
        src_id = store.resolve("ent", "proj", "src", "v0").id
    finally:
        store.close()
    ref = ManifestEntry("model/weights.bin", hex_to_b64(md5_bytes(data)), len(data),
                        ref=f"wandb-artifact://{src_id}/weights.bin")
    vdir = commit(tmp_path / "store", tmp_path, [ref], collection="uses")
    with mounted(tmp_path / "store", tmp_path) as m:
        assert os.getxattr(m.path / vdir / "model/weights.bin", "user.artifact.ref").startswith(b"wandb-artifact://")
        assert sha((m.path / vdir / "model/weights.bin").read_bytes()) == sha(data)
        assert (m.path / src_dir / "weights.bin").read_bytes() == data
        assert ref_requests(m) == 0  # a blob of the store, not an outside source


def test_reference_and_stored_file_of_same_bytes_stay_apart(s3, tmp_path: Path) -> None:
    """A reference whose recorded md5 equals a stored file's: the stored file never depends on
    the outside source, even while the changed reference is open beside it."""
    data = os.urandom(3 * MiB)
    s3.create_bucket(Bucket="mnt-same")
    s3.put_object(Bucket="mnt-same", Key="same.bin", Body=data)  # single part: ETag = md5
    vdir = commit(tmp_path / "store", tmp_path, entries_for_reference("s3://mnt-same/same.bin", name="ref.bin"),
                  {"stored.bin": data})
    s3.put_object(Bucket="mnt-same", Key="same.bin", Body=os.urandom(3 * MiB))
    with mounted(tmp_path / "store", tmp_path) as m:
        fd = os.open(m.path / vdir / "ref.bin", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 0)
            assert info.value.errno == errno.EIO
            assert sha((m.path / vdir / "stored.bin").read_bytes()) == sha(data)
        finally:
            os.close(fd)
