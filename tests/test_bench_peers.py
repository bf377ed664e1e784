"""bench/peers runs end to end in a tiny mode: its table has every row, artifactfs's request
counts are there, and nothing is left mounted, running or on disk afterwards.

Only the contenders that need no bench-only package run here (artifactfs, local disk, the
boto3 limit, on moto); rclone and s3fs are checked for a clean skip with the reason when absent.
No timing is asserted: the figures are whatever this machine gives.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.mount_helpers import requires_fuse

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "peers"


def load_bench() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("bench_peers", str(SCRIPT))
    spec = importlib.util.spec_from_loader("bench_peers", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = mod  # dataclasses look their module up
    loader.exec_module(mod)
    return mod


def fuse_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [line for line in f if str(path) in line and " fuse" in line]


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
@pytest.mark.timeout(180)
def test_tiny_run_prints_every_row_and_leaves_nothing(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "results.json"
    argv = ["--quick", "--large-size", "2M", "--small-count", "12", "--small-size", "8K", "--tree-files", "30",
            "--readers", "4", "--delay-ms", "0", "--endpoints", "moto", "--sqlite",
            "--contenders", "artifactfs,local,limit", "--workdir", str(work), "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = load_bench()
    args = bench.parse_args(argv)
    result = json.loads(out.read_text())
    values, counts = result["values"]["moto"], result["counts"]["moto"]
    for case in bench.cases(args):
        assert case.label in proc.stdout, case.label
        assert isinstance(values[case.key]["artifactfs"], float), (case.key, values[case.key], result["notes"])
    for key in ("cold_seq", "warm_seq", "cold_small_1", "cold_small_4", "warm_small_1", "find_1", "ls_2"):
        assert isinstance(values[key]["local"], float), key
    for key in ("cold_seq", "cold_small_1", "cold_small_4"):
        assert isinstance(values[key]["limit"], float), key
    transfers = result["transfers"]["moto"]
    for key in ("get", "log"):
        assert isinstance(transfers[key]["artifactfs"], float), transfers
        assert isinstance(transfers[key]["boto3 16 threads"], float), transfers
    assert "/ best peer" in proc.stdout and "what each artifactfs row cost" in proc.stdout
    # request counts, from the mount's and the server's own counters
    assert counts["cold_seq"]["store_requests"] >= 1
    assert counts["warm_seq"]["store_requests"] == 0  # a page-cache re-read asks the store nothing
    assert counts["cold_small_1"]["files"] == 12
    assert counts["cold_small_1"]["store_requests"] >= 1
    assert counts["cold_small_1"]["daemon_cpu"] > 0
    # nothing left behind
    assert not fuse_mounts_under(work), fuse_mounts_under(work)
    assert not work.exists()


def test_the_delay_proxy_delays_each_request_once() -> None:
    """The latency rows' proxy: one delay per request on a keep-alive connection, not per chunk."""
    import http.server
    import threading

    import requests

    from tests.server_fixtures import LoopbackProxy

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            body = b"x" * 200_000  # several chunks back: still one request
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxy = LoopbackProxy(srv.server_address[1])
    proxy.delay = 0.001
    try:
        with requests.Session() as session:
            for _ in range(3):
                assert len(session.get(proxy.url + "/x", timeout=10).content) == 200_000
        assert proxy.delays == 3
    finally:
        proxy.close()
        srv.shutdown()
        srv.server_close()


def test_a_missing_tool_is_a_skip_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench()
    monkeypatch.setenv("PATH", str(tmp_path))  # neither rclone nor s3fs here
    data = bench.Data(tmp_path, tmp_path / "big", [], tmp_path)
    for name in ("rclone-full", "rclone-off", "s3fs-cache", "s3fs"):
        reason = bench.make_contender(name, tmp_path, data).missing()
        assert reason and "not installed" in reason and "make bench" in reason, (name, reason)
    assert bench.make_contender("artifactfs", tmp_path, data).missing() is None


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
@pytest.mark.timeout(180)
def test_peer_columns_when_installed(tmp_path: Path) -> None:
    """rclone and s3fs (bench-only Debian packages): their columns are filled where installed;
    where neither is, the test is skipped with the reason (``make test`` does not install them)."""
    peers = [peer for peer, tool in (("rclone-off", "rclone"), ("s3fs", "s3fs")) if shutil.which(tool)]
    if not peers:
        pytest.skip("neither rclone nor s3fs is installed (make bench installs them); their columns are not checked")
    work, out = tmp_path / "work", tmp_path / "results.json"
    argv = ["--quick", "--large-size", "1M", "--small-count", "4", "--small-size", "4K", "--tree-files", "5",
            "--delay-ms", "0", "--endpoints", "moto", "--sqlite", "--contenders", ",".join(peers),
            "--workdir", str(work), "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    values = result["values"]["moto"]
    for peer in peers:
        for key in ("cold_seq", "cold_small_1", "warm_small_1", "find_1", "ls_1"):
            assert isinstance(values[key][peer], float), (peer, key, values[key], result["notes"])
    assert not fuse_mounts_under(work)
    assert not work.exists()
