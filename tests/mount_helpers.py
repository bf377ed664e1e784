"""Real mounts for tests: the daemon runs in a subprocess exactly as `artifactfs mount` runs it.

``mounted(...)`` starts ``python -m mountfs.daemon``, waits for the mount (failing fast with
the daemon's log if it died) and always unmounts on the way out — ``fusermount3 -u``, then
``-z`` and a kill as the last resort — so a failing test never leaves a stale mount behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mountfs.daemon import MountOptions, is_mounted, spawn_command

REPO = Path(__file__).resolve().parent.parent

requires_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen
    log: Path

    def stats(self) -> dict:
        """The daemon's counters (root xattr user.artifactfs.stats)."""
        return json.loads(os.getxattr(self.path, "user.artifactfs.stats"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for_mount(proc: subprocess.Popen, mountpoint: Path, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mount daemon exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if is_mounted(mountpoint):
            return
        time.sleep(0.02)
    pytest.fail(f"mount did not appear within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def unmount_and_reap(proc: subprocess.Popen, mountpoint: Path) -> None:
    """Unmount however necessary and make sure the daemon is gone."""
    if is_mounted(mountpoint):
        from mountfs.fastpath import detach_binds_under

        detach_binds_under(mountpoint)  # as `artifactfs umount` does: fast-path binds make -u EBUSY
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def start_daemon(options: MountOptions, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(spawn_command(options), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env)


@contextlib.contextmanager
def mounted(store: Path, workdir: Path, **options: object) -> Iterator[Mount]:
    """Mount ``store`` at ``workdir/mnt`` (cache in ``workdir/cache``) for the with-block."""
    mountpoint = workdir / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = workdir / "daemon.log"
    opts = MountOptions(str(mountpoint), store=str(store), cache_dir=str(options.pop("cache_dir", workdir / "cache")),
                        **options)  # type: ignore[arg-type]
    proc = start_daemon(opts, log)
    try:
        wait_for_mount(proc, mountpoint, log)
        yield Mount(mountpoint, proc, log)
    finally:
        unmount_and_reap(proc, mountpoint)
        if "--keep-log" not in sys.argv and proc.returncode not in (0, None):
            print(log.read_text(errors="replace")[-3000:])
