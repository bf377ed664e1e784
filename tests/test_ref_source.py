"""mountfs.ref_source: what the mount makes of a reference entry's index row (pure, no mount)."""

from __future__ import annotations

import json
from pathlib import Path

from client.hashing import b64_to_hex, md5_bytes
from client.references import uri_digest
from mountfs.ref_source import RefIdentities, describe

ETAG_MD5 = "0123456789abcdef0123456789abcdef"


def test_s3_keys_follow_the_recorded_identity() -> None:
    single = describe("s3://b/k", None, 10, json.dumps({"etag": ETAG_MD5}), "k")
    assert single is not None and single.checked and single.trust_blocks
    assert single.content_md5 == single.key == ETAG_MD5  # a single-part ETag is the md5: shared cache
    multi = describe("s3://b/k", None, 10, json.dumps({"etag": "abc-2"}), "k")
    other = describe("s3://b/k", None, 10, json.dumps({"etag": "abd-2"}), "k")
    versioned = describe("s3://b/k", None, 10, json.dumps({"etag": "abc-2", "versionID": "v1"}), "k")
    assert multi is not None and other is not None and versioned is not None
    assert multi.content_md5 is None and len(multi.key) == 32
    assert len({multi.key, other.key, versioned.key}) == 3  # a changed ETag or version: another key
    assert versioned.pinned_to() == "version v1" and multi.pinned_to() == "ETag abc-2"
    # checksum=False on a bucket: no size recorded (index 0), maybe a prefix -> not readable
    assert describe("s3://b/prefix", None, 0, None, "prefix") is None


def test_http_file_and_tracked_schemes(tmp_path: Path) -> None:
    strong = describe("http://h/x", None, 5, json.dumps({"etag": f'"{ETAG_MD5}"'}), "x")
    weak = describe("http://h/x", None, 5, json.dumps({"etag": 'W/"v1"'}), "x")
    no_etag = describe("http://h/x", None, 5, None, "x")
    assert strong is not None and strong.content_md5 == ETAG_MD5
    assert weak is not None and weak.checked and weak.content_md5 is None
    assert no_etag is not None and not no_etag.checked and no_etag.trust_blocks  # size only
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    md5 = md5_bytes(b"hello")
    checked = describe(f.as_uri(), md5, 5, None, "a.bin")
    assert checked is not None and checked.content_md5 == checked.key == md5
    assert not checked.trust_blocks  # a file cannot be pinned: md5-checked whole first
    unchecked = describe(f.as_uri(), b64_to_hex(uri_digest(f.resolve().as_uri())), 5, None, "a.bin")
    assert unchecked is not None and not unchecked.checked and unchecked.key != md5
    assert describe("custom://x/y", None, 0, None, "y") is None


def test_identities_map_round_trip(tmp_path: Path) -> None:
    ids = RefIdentities(tmp_path / "refs")
    key, md5 = "ab" * 16, md5_bytes(b"x")
    assert ids.get(key) is None
    ids.put(key, md5)
    assert ids.get(key) == md5
    (tmp_path / "refs" / key[:2] / key[2:]).write_text("not an md5")
    assert ids.get(key) is None  # a damaged entry is a miss, never a wrong object
