"""The server's S3 blob backend against a real S3 endpoint (moto in server mode): what a
``/complete`` does when the endpoint fails under it, and what it leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import botocore.exceptions
import pytest
import urllib3

from client.errors import StoreUnavailableError
from client.hashing import md5_bytes
from server import blobs
from tests.server_fixtures import S3_ENV, moto_s3  # noqa: F401

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def backend(moto_s3, monkeypatch):  # noqa: F811
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    # multipart from 1 MiB on, in parts of 5 MiB (S3's smallest but the last)
    monkeypatch.setattr(blobs, "MULTIPART_THRESHOLD", MiB)
    monkeypatch.setattr(blobs, "MIN_PART_SIZE", 5 * MiB)
    return blobs.S3BlobBackend(f"s3://{moto_s3.new_bucket()}", endpoint_url=moto_s3.url)


def _upload_parts(backend: blobs.S3BlobBackend, data: bytes, md5: str | None = None) -> tuple[str, dict, list[str]]:
    """What a client does before ``/complete``: plan the multipart upload of ``data`` as blob
    ``md5`` (its own by default) and PUT every part."""
    md5 = md5 or md5_bytes(data)
    plan = backend.plan_upload("ent", md5, len(data), 600)
    size = plan["part_size"]
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    plan = backend.plan_upload("ent", md5, len(data), 600, [md5_bytes(p) for p in pieces])
    http = urllib3.PoolManager()
    etags = []
    for part, piece in zip(plan["parts"], pieces):
        resp = http.request("PUT", part["url"], body=piece, headers=part["headers"])
        assert resp.status == 200, resp.data
        etags.append(resp.headers["ETag"])
    return md5, plan["upload"], etags


def _keys(backend: blobs.S3BlobBackend) -> list[str]:
    listing = backend.client.list_objects_v2(Bucket=backend.bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_a_complete_cut_by_the_endpoint_succeeds_when_sent_again(backend, monkeypatch) -> None:
    """The fault campaign's case, seen with s3rver: the endpoint failed while the server copied
    the verified staged object to its key.  The first ``/complete`` had already completed the
    multipart upload and then deleted the staged object, so every retry failed (the upload id
    was gone and so were the bytes) and the client's upload was lost after 6 attempts.  Now a
    failure that is not the bytes' keeps the staged object: the retry verifies and places it."""
    data = os.urandom(12 * MiB)
    md5, upload, etags = _upload_parts(backend, data)
    real_copy = backend.client.copy_object
    calls = []

    def failing_copy(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=backend.endpoint_url)
        return real_copy(**kwargs)

    monkeypatch.setattr(backend.client, "copy_object", failing_copy)
    with pytest.raises(StoreUnavailableError):
        backend.complete_upload("ent", md5, len(data), upload, etags)
    assert not backend.exists("ent", md5)
    backend.complete_upload("ent", md5, len(data), upload, etags)  # the client's retry
    assert backend.read("ent", md5) == data
    assert _keys(backend) == [backend.key("ent", md5)]  # nothing staged is left behind


def test_a_staged_object_with_wrong_bytes_is_dropped_and_the_retry_refused(backend) -> None:
    """The other side of keeping a staged object: bytes that are not the blob's are deleted at
    once, and ``/complete`` sent again is told to upload again (a 4xx, not a retry forever)."""
    from client.errors import DigestMismatchError, NotFoundError
    data = os.urandom(12 * MiB)
    wrong = md5_bytes(data + b"x")  # the client names another blob for these bytes
    _, upload, etags = _upload_parts(backend, data, wrong)
    with pytest.raises(DigestMismatchError):
        backend.complete_upload("ent", wrong, len(data), upload, etags)
    with pytest.raises(NotFoundError, match="upload it again"):
        backend.complete_upload("ent", wrong, len(data), upload, etags)
    assert not backend.exists("ent", wrong)
    assert _keys(backend) == []


def test_a_blob_up_to_five_gib_is_placed_by_one_copy_request(backend) -> None:
    """A staged object is placed by CopyObject (one request, up to S3's 5 GiB limit), never by
    a multipart copy: s3rver, like other emulators, has no UploadPartCopy, and a 1 GiB `log`
    through the server failed there (boto3's managed copy went multipart from 1 GiB on)."""
    assert blobs.copy_in_one_request(5 << 30) and not blobs.copy_in_one_request((5 << 30) + 1)
    data = os.urandom(12 * MiB)
    md5, upload, etags = _upload_parts(backend, data)
    ops: list[str] = []
    backend.client.meta.events.register("before-call.s3.*", lambda model, **_: ops.append(model.name))
    backend.complete_upload("ent", md5, len(data), upload, etags)
    assert ops.count("CopyObject") == 1 and "UploadPartCopy" not in ops, ops


def test_an_upload_through_the_server_leaves_nothing_staged_when_the_endpoint_fails(backend, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """``put_file`` (the admin tooling's upload) stages under a fresh key each time, so nobody
    resumes it: a failure while placing it deletes the staged object, as it always did."""
    data = os.urandom(12 * MiB)
    src = tmp_path / "blob"
    src.write_bytes(data)

    def failing_copy(**kwargs):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url=backend.endpoint_url)

    monkeypatch.setattr(backend.client, "copy_object", failing_copy)
    with pytest.raises(StoreUnavailableError):
        backend.put_file("ent", md5_bytes(data), src)
    assert _keys(backend) == []
