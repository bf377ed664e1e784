"""Per-request work of the namespace layer (issue 17, the request floor): what a repeated
listing of an immutable version costs, counted in index queries and node creations, never in
time.  Real LocalStore, real SQLite index, real cache; no mount."""

from __future__ import annotations

from pathlib import Path

from client.cache import Cache
from mountfs.content import ContentReader
from mountfs.manifest_index import IndexStore
from mountfs.namespace import Namespace, NamespaceConfig, Node
from tests.util import commit_files

N = 600  # more than one readdir page (256)


def _list(ns: Namespace, node: Node) -> list[str]:
    """A whole listing the way ops.readdir pages through it, every entry accepted."""
    fh = ns.opendir(node.inode)
    names, cookie = [], 0
    while True:
        page = ns.readdir_page(fh, cookie, 256)
        for cookie, name, child in page:
            names.append(name)
            ns.remember(child)
        if len(page) < 256:
            break
    ns.releasedir(fh)
    return names


def test_a_repeated_listing_of_a_version_directory_queries_the_index_once(local_store, tmp_path: Path) -> None:
    files = {f"d/f{i:04d}.bin": bytes([i % 251]) for i in range(N)}
    v0, _ = commit_files(local_store, tmp_path, files)
    cache = Cache(tmp_path / "cache")
    content = ContentReader(local_store, cache)
    indexes = IndexStore(cache.root / "index", content.manifest_path)
    ns = Namespace(local_store, indexes, NamespaceConfig())
    try:
        d = ns.walk("ent/proj/ds:v0/d")
        first = _list(ns, d)
        assert first == sorted(f.split("/")[1] for f in files)
        index = indexes.peek(v0.manifest_md5)
        assert index is not None
        queries, inodes = index.queries, len(ns)
        for _ in range(3):  # find / ls -lR again: same entries, same inodes, no SQLite
            assert _list(ns, d) == first
        assert index.queries == queries, index.queries - queries
        assert len(ns) == inodes
        # what the kernel forgets is dropped, and listed again comes back (re-registered)
        child = ns.lookup(d.inode, "f0000.bin")
        ns.forget(child.inode, child.lookups)
        assert len(ns) == inodes - 1
        assert _list(ns, d) == first and len(ns) == inodes
        assert ns.lookup(d.inode, "f0000.bin").lookups >= 1
    finally:
        content.shutdown()
