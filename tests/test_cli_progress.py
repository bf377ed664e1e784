"""Progress bars and Ctrl-C of ``artifactfs get`` and ``log`` (issue 16 item 4).

Real console-script subprocesses against a real registry server, reached through a loopback
TCP proxy that limits each connection's rate (a slow network, without timing assertions: the
tests count bytes through the proxy and report the seconds they measured).
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_fixtures import LoopbackProxy, ServerFactory

EXE = Path(sys.executable).with_name("artifactfs")
pytestmark = pytest.mark.skipif(not EXE.exists(), reason="artifactfs console script not installed in this venv")

#: seconds each test measured between SIGINT and exit (printed at the end of the module)
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackProxy, str, str]]:
    """(proxy in front of the server, the server's own URL, an API key of alice)."""
    tmp = tmp_path_factory.mktemp("progress-srv")
    factory = ServerFactory(f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs"), tmp)
    try:
        srv = factory.start()
        proxy = LoopbackProxy(int(srv.url.rsplit(":", 1)[1]))
        yield proxy, srv.url, factory.user("alice")
        proxy.close()
    finally:
        factory.stop_all()
        for what, seconds in MEASURED.items():
            print(f"\n{what}: exited {seconds:.2f} s after SIGINT", file=sys.stderr)


def env_for(store: str, key: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ARTIFACTFS_STORE=store, ARTIFACTFS_API_KEY=key, ARTIFACTFS_CACHE_DIR=str(tmp / "cache"),
               ARTIFACTFS_ENTITY="alice")
    return env


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def make_tree(root: Path, files: dict[str, int]) -> dict[str, bytes]:
    out = {}
    for name, size in files.items():
        data = os.urandom(size)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        out[name] = data
    return out


def run_in_pty(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run with stdin/stdout/stderr on a pseudo-terminal of 120 columns; (status, output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([str(EXE), *args], env={**env, "COLUMNS": "120"}, cwd=cwd,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=180), b"".join(chunks).decode(errors="replace")


FRAME = re.compile(r"(\w+):\s+(\d+)%\|[^|]*\|\s*([\d.]+[kMG]?)/([\d.]+[kMG]?) \[[\d:]+<([\d:?]+), *([^\]]+/s)\]")


def frames(output: str, desc: str) -> list[tuple[int, str, str, str]]:
    """(percent, done, total, rate) of every drawn frame of bar ``desc``."""
    return [(int(m[2]), m[3], m[4], m[6]) for m in FRAME.finditer(output) if m[1] == desc]


def test_bars_move_by_bytes_on_a_terminal_and_stay_quiet_on_a_pipe(tmp_path: Path, server: tuple) -> None:
    proxy, url, key = server
    src = tmp_path / "src"
    # a large file first in path order, then many small ones: a bar that moved per file in path
    # order would sit at 0% until the large (slow) file is done
    files = {"a_big.bin": 8 << 20, **{f"small/{i:03d}.bin": 128 << 10 for i in range(48)}}
    data = make_tree(src, files)
    env = env_for(url, key, tmp_path)

    # 4 MiB/s per connection and 2 transfers in flight: the 14 MiB take about 2 s to upload (16
    # transfers, the default, send them in a fraction of a second: one frame, nothing to see)
    proxy.rate = 4 << 20
    try:
        status, out = run_in_pty(["log", str(src), "--name", "alice/p/bars", "--type", "dataset"],
                                 {**env_for(proxy.url, key, tmp_path), "ARTIFACTFS_TRANSFERS": "2"}, tmp_path)
    finally:
        proxy.rate = None
    assert status == 0, out
    hashed = frames(out, "hash")
    assert hashed, f"no hashing bar on a terminal:\n{out!r}"
    assert {total for _, _, total, _ in hashed} == {"14.0M"}  # the tree's bytes, not its file count
    sent = frames(out, "upload")
    assert {total for _, _, total, _ in sent} == {"14.0M"}
    assert len({done for pct, done, _, _ in sent if 0 < pct < 100}) >= 3, f"upload bar did not move:\n{out!r}"

    proxy.rate = 2 << 20  # 2 MiB/s per connection
    try:
        status, out = run_in_pty(["get", "alice/p/bars:v0", str(tmp_path / "dl")],
                                 env_for(proxy.url, key, tmp_path / "c1"), tmp_path)
    finally:
        proxy.rate = None
    assert status == 0, out
    drawn = frames(out, "download")
    moving = {done for pct, done, _, _ in drawn if 0 < pct < 100}
    assert len(moving) >= 3, f"the bar did not move by bytes:\n{out!r}"
    assert all(rate.endswith("B/s") for _, _, _, rate in drawn)  # a rate on every frame, and an ETA (regex)
    assert {total for _, _, total, _ in drawn} == {"14.0M"}
    assert all((tmp_path / "dl" / n).read_bytes() == d for n, d in data.items())

    # on a pipe: no bar, no carriage returns; just the result line
    res = run(["get", "alice/p/bars:v0", str(tmp_path / "dl2")], env_for(url, key, tmp_path / "c2"), tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and "\r" not in res.stdout
    assert res.stdout.count("\n") == 1 and "49 files downloaded, 0 already present" in res.stdout
    res = run(["log", str(src), "--name", "alice/p/bars2", "--type", "dataset"], env, tmp_path)
    assert res.returncode == 0 and res.stderr == "" and "\r" not in res.stdout, res.stderr


def interrupt_when(proc: subprocess.Popen[str], ready: object, what: str) -> tuple[float, str]:
    """Send SIGINT once ``ready()`` is true; (seconds from SIGINT to exit, stderr)."""
    deadline = time.monotonic() + 60
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, f"{what} ended before it was interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what} never got going"
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    MEASURED[what] = elapsed
    return elapsed, err


SMALL = 64 << 10
COUNT = 320  # 20 MiB in 64 KiB files: about 20 s at 128 KiB/s per connection with 8 workers
BIG = 2 << 20  # four of these first in path order: each is a 16 s download in flight at SIGINT


def test_ctrl_c_stops_get_at_once_and_a_rerun_resumes(tmp_path: Path, server: tuple) -> None:
    proxy, url, key = server
    src = tmp_path / "src"
    data = make_tree(src, {**{f"a/big{i}.bin": BIG for i in range(4)},
                           **{f"d{i % 4}/f{i:04d}.bin": SMALL for i in range(COUNT)}})
    res = run(["log", str(src), "--name", "alice/p/slowget", "--type", "dataset"], env_for(url, key, tmp_path),
              tmp_path)
    assert res.returncode == 0, res.stderr
    dest = tmp_path / "dest"
    env = env_for(proxy.url, key, tmp_path / "client")
    proxy.rate = 128 << 10
    try:
        before = proxy.counts()[1]
        proc = subprocess.Popen([str(EXE), "get", "alice/p/slowget:v0", str(dest)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        elapsed, err = interrupt_when(proc, lambda: proxy.counts()[1] - before > (1 << 20), "get")
    finally:
        proxy.rate = None
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert elapsed < 10, f"get took {elapsed:.1f} s to stop after SIGINT"

    # nothing half-written: every file at its final path is complete; no temp files left
    present = {p.relative_to(dest).as_posix(): p for p in dest.rglob("*") if p.is_file()}
    assert not [n for n in present if n.endswith(".artifactfs-tmp") or "/." in "/" + n], present
    assert 0 < len(present) < len(data)
    assert all(p.read_bytes() == data[n] for n, p in present.items())
    inodes = {n: p.stat().st_ino for n, p in present.items()}

    # the rerun resumes: the complete files are neither fetched nor rewritten
    before = proxy.counts()[1]
    res = run(["get", "alice/p/slowget:v0", str(dest)], env, tmp_path)
    assert res.returncode == 0, res.stderr
    fetched = proxy.counts()[1] - before
    assert f"{len(data) - len(present)} files downloaded, {len(present)} already present" in res.stdout
    assert all((dest / n).stat().st_ino == ino for n, ino in inodes.items())
    assert all((dest / n).read_bytes() == d for n, d in data.items())
    assert fetched <= sum(len(d) for n, d in data.items() if n not in present) + (512 << 10), fetched


def test_ctrl_c_stops_log_at_once_and_a_rerun_uploads_only_the_rest(tmp_path: Path, server: tuple) -> None:
    proxy, url, key = server
    src = tmp_path / "src"
    make_tree(src, {f"f{i:04d}.bin": SMALL for i in range(COUNT)})
    env = env_for(proxy.url, key, tmp_path)
    args = ["log", str(src), "--name", "alice/p/slowlog", "--type", "dataset"]
    proxy.rate = 128 << 10
    try:
        before = proxy.counts()[0]
        proc = subprocess.Popen([str(EXE), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        elapsed, err = interrupt_when(proc, lambda: proxy.counts()[0] - before > (1 << 20), "log")
    finally:
        proxy.rate = None
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert elapsed < 10, f"log took {elapsed:.1f} s to stop after SIGINT"
    res = run(["ls", "alice/p/slowlog"], env, tmp_path)
    assert res.returncode == 3 and "not found" in res.stderr, (res.stdout, res.stderr)  # nothing was committed

    before = proxy.counts()[0]
    res = run(args, env, tmp_path)
    assert res.returncode == 0, res.stderr
    sent_bytes = proxy.counts()[0] - before
    m = re.search(r"\((\d+) files sent, (\d+) already in the store\)", res.stdout)
    assert m, res.stdout
    sent, had = int(m[1]), int(m[2])
    assert sent + had == COUNT and had > 0, res.stdout
    assert sent_bytes <= sent * SMALL + (512 << 10), sent_bytes


def test_ctrl_c_stops_log_with_large_uploads_in_flight(tmp_path: Path, server: tuple) -> None:
    proxy, _url, key = server
    src = tmp_path / "src"
    make_tree(src, {f"big{i}.bin": BIG for i in range(8)})  # 8 workers: all of them in flight at once
    env = env_for(proxy.url, key, tmp_path)
    proxy.rate = 128 << 10  # each 2 MiB PUT would take 16 s
    try:
        before = proxy.counts()[0]
        proc = subprocess.Popen([str(EXE), "log", str(src), "--name", "alice/p/biglog", "--type", "dataset"],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        elapsed, err = interrupt_when(proc, lambda: proxy.counts()[0] - before > (512 << 10), "log, large files")
    finally:
        proxy.rate = None
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    assert elapsed < 10, f"log took {elapsed:.1f} s to stop after SIGINT"
    res = run(["ls", "alice/p/biglog"], env, tmp_path)
    assert res.returncode == 3, (res.stdout, res.stderr)  # nothing was committed
