"""Helpers for tests that talk to a Store directly (below the SDK)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from client.hashing import hex_to_b64, md5_bytes
from client.manifest import Manifest, ManifestEntry
from client.store.base import CommitRequest, Store, VersionRecord


def upload_bytes(store: Store, entity: str, data: bytes, tmp_dir) -> str:
    md5 = md5_bytes(data)
    src = tmp_dir / f"upload-{md5}"
    src.write_bytes(data)
    store.put_blob(entity, md5, src, len(data))
    return md5


def commit_files(store: Store, tmp_dir, files: dict[str, bytes], *, entity: str = "ent", project: str = "proj",
                 collection: str = "ds", type: str = "dataset", **kw) -> tuple[VersionRecord, bool]:
    """Upload ``files`` and their manifest, then commit: the path the SDK takes, by hand."""
    entries = []
    for path, data in files.items():
        md5 = upload_bytes(store, entity, data, tmp_dir)
        entries.append(ManifestEntry(path, hex_to_b64(md5), len(data)))
    manifest_md5 = upload_bytes(store, entity, Manifest(entries).to_bytes(), tmp_dir)
    return store.commit(CommitRequest(entity, project, collection, type, manifest_md5, **kw))


def write_tree(root, files: dict[str, bytes]):
    """Create ``files`` (relative path -> bytes) under ``root``; returns root."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def store_rules(module: Any, exclude: dict[str, str]) -> list[Callable[..., None]]:
    """Every ``test_`` function of ``module`` that is a rule of the Store protocol (it takes
    ``local_store`` and maybe ``tmp_path``), less ``exclude`` (name -> why not).  Any other
    test there must be excluded by name with a reason, so no rule is left out silently."""
    unknown = set(exclude) - set(vars(module))
    assert not unknown, f"excluded rules that do not exist: {sorted(unknown)}"
    picked = []
    for name, fn in sorted(vars(module).items()):
        if not (name.startswith("test_") and callable(fn)) or name in exclude:
            continue
        params = set(inspect.signature(fn).parameters)
        assert "local_store" in params and params <= {"local_store", "tmp_path"}, (
            f"{module.__name__}.{name} takes {sorted(params)}: make it a store rule or exclude it with a reason")
        picked.append(fn)
    return picked


def run_rule(rule: Callable[..., None], store: Store, tmp_path: Any) -> None:
    """Call a rule of :func:`store_rules` with ``store`` as its ``local_store``."""
    params = inspect.signature(rule).parameters
    rule(**{k: v for k, v in (("local_store", store), ("tmp_path", tmp_path)) if k in params})


def resident_bytes(path) -> int:
    """Bytes of ``path`` that sit in the page cache now (mincore(2) over a mapping of it)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = ctypes.create_string_buffer(-(-size // page))
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
