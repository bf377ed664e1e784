"""Shared fixtures: every test gets its own store, cache and default entity in a tmp dir,
so no test reads or writes the user's real ~/.local/share or ~/.cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ARTIFACTFS_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ARTIFACTFS_ENTITY", "tester")
    monkeypatch.delenv("ARTIFACTFS_PROJECT", raising=False)
    monkeypatch.delenv("ARTIFACTFS_API_KEY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))  # no real ~/.config login
    monkeypatch.delenv("ARTIFACTFS_CA_BUNDLE", raising=False)
    return tmp_path


@pytest.fixture
def local_store(tmp_path: Path):
    from client.store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    yield store
    store.close()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback for one test module (s3:// references)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
