"""What a read through a real mount costs in FUSE requests (issue 17, the read path).

Page-cache reads must never reach the daemon, the kernel must send large requests from the
first open on, and disk-cache reads must not touch the cache index per request.  Only
requests and calls are counted, never time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from client.store.local import LocalStore
from tests.mount_helpers import Mount, mounted, requires_fuse
from tests.test_mount_read import commit_tree

pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.timeout(120)]

MiB = 1 << 20
V0 = "ent/proj/ds:v0"


def _requests(m: Mount, run: Callable[[], object]) -> dict[str, int]:
    """FUSE requests the daemon served while ``run()`` ran (the two stats reads excluded)."""
    before = m.stats()["requests"]
    run()
    after = m.stats()["requests"]
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    out["getxattr"] = out.get("getxattr", 0) - 1
    return {k: v for k, v in out.items() if v}


def _read_all(path: Path, chunk: int = MiB) -> int:
    buf, total = bytearray(chunk), 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


@pytest.fixture()
def big_version(tmp_path: Path) -> tuple[Path, int]:
    src = tmp_path / "src"
    src.mkdir()
    size = 32 * MiB
    block = os.urandom(MiB - 8)
    with open(src / "big.bin", "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block)
    store = LocalStore(tmp_path / "store")
    commit_tree(store, src, tmp_path)
    store.close()
    return tmp_path / "store", size


def test_first_read_after_mount_gets_1mib_requests_and_a_warm_reread_none(big_version, tmp_path: Path) -> None:
    """The mount's readahead is raised before the first open is answered (a file's readahead
    is fixed when it is opened), so even a reader that starts the moment the mount appears
    gets 1 MiB requests, not 128 KiB ones; re-reading it is served by the page cache alone."""
    store, size = big_version
    with mounted(store, tmp_path) as m:
        path = m.path / V0 / "big.bin"
        cold = _requests(m, lambda: _read_all(path))
        assert cold.get("read", 0) <= size // MiB + 2, cold  # 128 KiB requests would be 256
        warm = _requests(m, lambda: _read_all(path))
        assert warm.get("read", 0) == 0, warm
        again = _requests(m, lambda: _read_all(path, 64 << 10))
        assert again.get("read", 0) == 0 and again.get("open", 0) == 1, again


def test_a_read_only_mount_declines_flush_once_then_gets_none(tmp_path: Path) -> None:
    """Without drafts there is nothing to flush: the first FLUSH is answered ENOSYS and the
    kernel sends none after it, so a warm small file costs open + release only (the floor's
    two requests, bench/floorfs.py), and its bytes are still right."""
    src = tmp_path / "src"
    files = {f"f{i:02d}.bin": os.urandom(4096 + i) for i in range(20)}
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    store = LocalStore(tmp_path / "store")
    commit_tree(store, src, tmp_path)
    store.close()
    with mounted(tmp_path / "store", tmp_path, read_only=True) as m:
        version = m.path / V0

        def read_all() -> None:
            for name, data in files.items():
                assert (version / name).read_bytes() == data

        first = _requests(m, read_all)
        assert first.get("flush", 0) <= 1, first
        again = _requests(m, read_all)
        assert again.get("flush", 0) == 0 and again.get("open", 0) == len(files), again
        assert again.get("release", 0) == len(files) and again.get("read", 0) == 0, again
