"""The container / Kubernetes recipe of docs/OPERATIONS.md, exercised with real mount namespaces.

The "node" is this test's mount namespace: a directory made a shared mount point (what
``mountPropagation: Bidirectional`` / docker's ``:rshared`` give the sidecar).  The "training
container" is a second mount namespace whose mounts are slaves of the node's (what
``HostToContainer`` / ``:rslave`` give), started BEFORE the drive is mounted, running as a
non-root user (65534).  The mount made afterwards on the node (as the sidecar would, with
``--allow-other --auto-unmount``) must appear inside it and be readable by that user; a mount
without ``--allow-other`` must not be.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountfs.daemon import is_mounted
from tests.mount_helpers import requires_fuse

EXE = Path(sys.executable).with_name("artifactfs")
DOC = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
pytestmark = [requires_fuse, pytest.mark.fuse,
              pytest.mark.skipif(not EXE.exists() or shutil.which("unshare") is None or shutil.which("setpriv") is None,
                                 reason="needs the console script, unshare and setpriv"),
              pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and bind mounts need root")]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def node_dir() -> Iterator[Path]:
    """A directory every user may traverse, bind-mounted on itself and made rshared."""
    root = Path(tempfile.mkdtemp(prefix="afs-node-", dir="/tmp"))
    root.chmod(0o755)
    shared = root / "shared"
    shared.mkdir(mode=0o755)
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    subprocess.run(["mount", "--make-rshared", str(shared)], check=True)
    try:
        yield root
    finally:
        for mp in (shared / "artifacts", shared / "private"):
            if is_mounted(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        subprocess.run(["umount", "-l", str(shared)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def recipe_block() -> str:
    text = DOC.read_text()
    m = re.search(r"## Containers and Kubernetes\n(.*?)(?=\n## )", text, re.S)
    assert m, "docs/OPERATIONS.md has no 'Containers and Kubernetes' section"
    return m[1]


def test_the_recipe_names_what_this_test_exercises() -> None:
    block = recipe_block()
    for needle in ("mountPropagation: Bidirectional", "mountPropagation: HostToContainer", "--allow-other",
                   "--auto-unmount", "runAsUser", "/dev/fuse", ":rshared", ":rslave", "tests/test_container_recipe.py"):
        assert needle in block, needle


def test_a_mount_made_on_the_node_is_read_by_a_non_root_user_in_a_slave_namespace(node_dir: Path) -> None:
    src = node_dir / "src"
    src.mkdir()
    (src / "train.csv").write_text("x,y\n1,2\n")
    store, cache = node_dir / "store", node_dir / "cache"
    res = cli("--store", str(store), "log", str(src), "--name", "alice/proj/ds", "--type", "dataset", cwd=node_dir)
    assert res.returncode == 0, res.stderr
    shared = node_dir / "shared"
    (shared / "artifacts").mkdir(mode=0o755)
    (shared / "private").mkdir(mode=0o755)
    ready, go = shared / "ready", shared / "go"
    seen = shared / "artifacts" / "alice" / "proj" / "ds@latest" / "train.csv"
    hidden = shared / "private" / "alice"
    # the training container: its own mount namespace (slave of the node's), then user 65534
    script = (f'touch {ready}; i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; '
              f'exec setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '
              f'\'id -u; cat {seen}; ls {hidden} >/dev/null 2>&1 && echo private-visible || echo private-refused\'')
    trainer = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()
            time.sleep(0.02)
        # the sidecar's mount, made after the container started (as in the recipe)
        common = ["--store", str(store), "--cache-dir", str(cache)]
        res = cli("mount", str(shared / "artifacts"), "--allow-other", "--auto-unmount", *common, cwd=node_dir)
        assert res.returncode == 0, res.stderr
        res = cli("mount", str(shared / "private"), *common, cwd=node_dir)  # no --allow-other
        assert res.returncode == 0, res.stderr
        go.touch()
        out, err = trainer.communicate(timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == 0, err
    assert out.splitlines() == ["65534", "x,y", "1,2", "private-refused"], (out, err)
    # the node sees the same mount (the namespace did not copy it away)
    assert seen.read_text() == "x,y\n1,2\n"
