"""Fixtures shared by the SDK tests: every store and cache path points into a tmp dir.

Import with ``from tests._sdk_fixtures import *`` (or by name) from an SDK test module; kept
out of conftest.py so the SDK tests do not impose their environment on other suites.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sdk_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A fresh embedded store, cache, entity and working directory for one test."""
    store = tmp_path / "store"
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("ARTIFACTFS_STORE", str(store))
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(cache))
    monkeypatch.setenv("ARTIFACTFS_CACHE_SIZE", "1G")
    monkeypatch.setenv("ARTIFACTFS_ENTITY", "alice")
    monkeypatch.setenv("ARTIFACTFS_PROJECT", "proj")
    monkeypatch.chdir(work)
    from client import live_run as run_mod

    run_mod._reset_for_tests()
    yield {"store": store, "cache": cache, "work": work, "tmp": tmp_path}
    run_mod._reset_for_tests()


def md5hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create ``files`` (relative path -> content) under ``root``."""
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def tree_of(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every regular file under ``root``."""
    out: dict[str, bytes] = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out
