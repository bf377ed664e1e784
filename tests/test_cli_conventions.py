"""The CLI behaves as users of rclone/mount-s3/gcsfuse/wandb expect (issue 16; issue 13 item 4).

Every test here runs the real console script (``.venv/bin/artifactfs``) in a subprocess, with
a working directory the test controls, and mounts for real where a mount is involved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountfs.daemon import is_mounted
from tests.mount_helpers import requires_fuse

EXE = Path(sys.executable).with_name("artifactfs")
pytestmark = pytest.mark.skipif(not EXE.exists(), reason="artifactfs console script not installed in this venv")


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env or {})
    return subprocess.run([str(EXE), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def force_unmount(mp: Path) -> None:
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        deadline = time.monotonic() + 15
        while is_mounted(mp) and time.monotonic() < deadline:
            time.sleep(0.05)
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.fixture
def store_with_data(tmp_path: Path) -> Path:
    """An embedded store holding alice/proj/ds:v0 (a.txt), made through the CLI."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("A")
    store = tmp_path / "store"
    res = cli("--store", str(store), "log", str(src), "--name", "alice/proj/ds", "--type", "dataset", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return store


@pytest.fixture
def mountpoints(tmp_path: Path) -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for mp in made:
        force_unmount(mp)


# -- item 1: code from the current directory never runs ------------------------------------------

@requires_fuse
def test_mount_never_imports_code_from_the_current_directory(tmp_path: Path, store_with_data: Path,
                                                               mountpoints: list[Path]) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    for module in ("client", "mountfs", "server", "pyfuse3", "trio"):
        (evil / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write('{module}\\n')\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "cache"), cwd=evil)
    assert res.returncode == 0, res.stderr
    assert (mp / "alice" / "proj" / "ds:v0" / "a.txt").read_text() == "A"
    force_unmount(mp)
    assert not marker.exists(), marker.read_text()
