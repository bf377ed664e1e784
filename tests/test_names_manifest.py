"""Pure units: name rules, entry-path rules, manifest format and digest."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from client import names
from client.errors import InvalidNameError, InvalidPathError, ManifestError
from client.manifest import Manifest, ManifestEntry, compute_digest, iter_entries, read_manifest


@pytest.mark.parametrize("bad", ["", "a/b", "a:b", "a b", ".hidden", "x" * 129, "é", None, 3])
def test_collection_names_refused(bad):
    with pytest.raises(InvalidNameError):
        names.validate_collection(bad)


@pytest.mark.parametrize("good", ["mnist", "my-data_set.v2", "A1", "x" * 128])
def test_collection_names_accepted(good):
    assert names.validate_collection(good) == good


@pytest.mark.parametrize("bad", ["v0", "v12", "a/b", "a:b", "", "with space", "draft", "draft-x"])
def test_aliases_refused(bad):
    with pytest.raises(InvalidNameError):
        names.validate_alias(bad)


def test_alias_like_version_but_not_reserved():
    assert names.validate_alias("v01") == "v01"  # not a canonical index
    assert names.validate_alias("best") == "best"


def test_tags():
    assert names.validate_tag("two words") == "two words"
    for bad in ["", "a/b", " lead", "trail "]:
        with pytest.raises(InvalidNameError):
            names.validate_tag(bad)


def test_metadata_key_limit():
    assert len(names.validate_metadata({str(i): i for i in range(100)})) == 100
    with pytest.raises(InvalidNameError, match="limit is 100"):
        names.validate_metadata({str(i): i for i in range(101)})


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\x00b", "", ".", "a/", "x/" + "y" * 256])
def test_entry_paths_refused(bad):
    with pytest.raises(InvalidPathError):
        names.validate_entry_path(bad)


def test_entry_path_keeps_backslashes_literally():
    # W&B 0.31 keeps a backslash in a name on POSIX (observed: add_file(name="back\\slash.txt")).
    assert names.entry_path_from_local("sub\\dir\\f.txt") == "sub\\dir\\f.txt"


def test_parse_artifact_path_forms():
    p = names.parse_artifact_path("ds:v3", default_entity="e", default_project="p")
    assert (p.entity, p.project, p.collection, p.selector) == ("e", "p", "ds", "v3")
    p = names.parse_artifact_path("proj/ds:best", default_entity="e", default_project="p")
    assert (p.entity, p.project, p.selector) == ("e", "proj", "best")
    p = names.parse_artifact_path("ent/proj/ds", default_entity="e", default_project="p")
    assert (p.entity, p.selector) == ("ent", None)
    for bad in ["", "a/b/c/d:v0", "ds:", "ds:a:b", "bad name:v0"]:
        with pytest.raises(ValueError):
            names.parse_artifact_path(bad, default_entity="e", default_project="p")
    with pytest.raises(ValueError, match="needs a version"):
        names.parse_artifact_path("ds", default_entity="e", default_project="p", require_selector=True)


def _b64md5(data: bytes) -> str:
    import base64
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_digest_is_independent_of_insertion_order():
    a = Manifest([ManifestEntry("b", _b64md5(b"1"), 1), ManifestEntry("a", _b64md5(b"2"), 1)])
    b = Manifest([ManifestEntry("a", _b64md5(b"2"), 1), ManifestEntry("b", _b64md5(b"1"), 1)])
    assert a.digest() == b.digest()
    assert a.digest() != Manifest([ManifestEntry("a", _b64md5(b"2"), 1)]).digest()


def test_digest_rule_matches_the_w_and_b_definition():
    # md5 over "wandb-artifact-manifest-v1\n" + "path:digest\n" for entries sorted by path.
    entries = {"z.bin": _b64md5(b"z"), "a/b.txt": _b64md5(b"ab")}
    h = hashlib.md5(b"wandb-artifact-manifest-v1\n")
    h.update(f"a/b.txt:{entries['a/b.txt']}\n".encode())
    h.update(f"z.bin:{entries['z.bin']}\n".encode())
    assert compute_digest(entries.items()) == h.hexdigest()


def test_manifest_json_format_and_streaming_reader():
    m = Manifest([ManifestEntry(f"d/{i:03d}.txt", _b64md5(str(i).encode()), i) for i in range(50)])
    m.add(ManifestEntry("ref.csv", "etag-123", 10, ref="s3://bucket/ref.csv", extra={"versionID": "x"}))
    raw = m.to_bytes()
    data = json.loads(raw)
    assert data["version"] == 1 and data["storagePolicy"] == "wandb-storage-policy-v1"
    assert data["storagePolicyConfig"] == {"storageLayout": "V2"}
    assert data["contents"]["ref.csv"] == {"digest": "etag-123", "size": 10, "ref": "s3://bucket/ref.csv",
                                           "extra": {"versionID": "x"}}
    streamed = list(iter_entries(io.BytesIO(raw)))
    assert [e.path for e in streamed] == sorted(m.entries)
    assert Manifest(streamed).digest() == m.digest()
    # a manifest written compactly by another tool still parses (full-parse fallback)
    compact = json.dumps(data).encode()
    assert [e.path for e in iter_entries(io.BytesIO(compact))] == [e.path for e in streamed]


def test_manifest_with_traversal_is_refused_on_read():
    evil = {"version": 1, "contents": {"../../etc/cron.d/x": {"digest": _b64md5(b"x"), "size": 1}}}
    with pytest.raises(ManifestError, match="climb out"):
        read_manifest(io.StringIO(json.dumps(evil)))
    evil["contents"] = {"/abs": {"digest": _b64md5(b"x"), "size": 1}}
    with pytest.raises(ManifestError, match="absolute"):
        Manifest.from_bytes(json.dumps(evil).encode())


def test_truncated_and_garbage_manifests_are_refused():
    raw = Manifest([ManifestEntry("a", _b64md5(b"a"), 1), ManifestEntry("b", _b64md5(b"b"), 1)]).to_bytes()
    with pytest.raises(ManifestError, match="truncated"):
        list(iter_entries(io.BytesIO(raw[: raw.rindex(b"}}")])))
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b"not json")
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b'{"version": 2, "contents": {}}')
    with pytest.raises(ManifestError, match="size"):
        Manifest.from_bytes(b'{"version": 1, "contents": {"a": {"digest": "x", "size": -1}}}')


def test_digest_builder_streams_in_order_and_refuses_disorder():
    from client.manifest import DigestBuilder

    b = DigestBuilder()
    b.update("a", "x")
    b.update("b", "y")
    assert b.hexdigest() == compute_digest([("b", "y"), ("a", "x")])
    with pytest.raises(ManifestError, match="path order"):
        b.update("a0", "z")
