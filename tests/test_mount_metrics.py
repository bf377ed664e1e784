"""Per-mount Prometheus metrics (mountfs/metrics.py): ``--metrics-port`` and ``--metrics-file``,
scraped from a real mount; every counter is checked against what the test made it do."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from client.cache import Cache
from client.hashing import md5_bytes
from client.store.local import LocalStore
from tests.mount_helpers import mounted, requires_fuse
from tests.util import commit_files

pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.timeout(120)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _scrape(port: int) -> Samples:
    return _parse(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_mount_metrics_count_requests_cache_fetches_and_errors(tmp_path: Path) -> None:
    small, big = os.urandom(1000), os.urandom(3 << 20)  # fetched whole / through the block reader
    store = LocalStore(tmp_path / "store")
    commit_files(store, tmp_path, {"small.bin": small, "big.bin": big})
    store.close()
    # local_blobs=False: read through the ranged store path every remote store takes; port 0:
    # the daemon binds a free port and names it in its log (no port chosen before it is bound)
    with mounted(tmp_path / "store", tmp_path, local_blobs=False, metrics_port=0) as m:
        found = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", m.log_text())
        assert found, m.log_text()[-2000:]
        port = int(found.group(1))
        version = m.path / "ent" / "proj" / "ds:v0"
        assert sorted(os.listdir(version)) == ["big.bin", "small.bin"]  # the manifest is fetched here
        before, stats_before = _scrape(port), m.stats()
        assert (version / "small.bin").read_bytes() == small
        assert (version / "big.bin").read_bytes() == big
        with pytest.raises(FileNotFoundError):
            os.stat(version / "not-there")
        after, stats_after = _scrape(port), m.stats()

    assert _delta(after, before, "artifactfs_mount_fuse_requests_total", op="open") == 2
    assert _delta(after, before, "artifactfs_mount_fuse_requests_total", op="read") \
        == stats_after["requests"]["read"] - stats_before["requests"].get("read", 0) > 0
    assert _delta(after, before, "artifactfs_mount_fuse_errors_total", errno="ENOENT") == 1
    assert _delta(after, before, "artifactfs_mount_cache_misses_total") == 2
    assert _delta(after, before, "artifactfs_mount_cache_hits_total") == 0
    assert _delta(after, before, "artifactfs_mount_fetched_bytes_total") == len(small) + len(big)
    fetches = stats_after["store_requests"] - stats_before["store_requests"]
    assert fetches >= 2
    assert _delta(after, before, "artifactfs_mount_fetch_seconds_count") == fetches
    assert _delta(after, before, "artifactfs_mount_fetch_seconds_bucket", le="+Inf") == fetches
    assert after[("artifactfs_mount_fetches_in_flight", ())] == 0
    # the split gauge (mountfs/fetch.py SplitGauge): nothing judged yet, so splitting is allowed
    assert after[("artifactfs_mount_stream_splits_pay", ())] == stats_after["splits_pay"] == 1
    assert after[("artifactfs_mount_stream_split_trials", ())] == stats_after["split_trials"] == 0
    assert after[("artifactfs_mount_stream_splits_total", ())] == stats_after["stream_splits"] == 0  # a local store: none

    # Both objects are now in the cache: a second mount (fresh counters) serves them from it,
    # and with --metrics-file writes its counters there when it unmounts.
    cache = Cache(tmp_path / "cache")
    assert cache.lookup(md5_bytes(small)) and cache.lookup(md5_bytes(big))
    textfile = tmp_path / "metrics" / "mount.prom"
    with mounted(tmp_path / "store", tmp_path, local_blobs=False, metrics_file=str(textfile)) as m:
        version = m.path / "ent" / "proj" / "ds:v0"
        assert (version / "small.bin").read_bytes() == small
        assert (version / "big.bin").read_bytes() == big
    final = _parse(textfile.read_text())
    assert final[("artifactfs_mount_cache_hits_total", ())] == 2
    assert final[("artifactfs_mount_cache_misses_total", ())] == 0
    assert final[("artifactfs_mount_fetched_bytes_total", ())] == 0
    assert final[("artifactfs_mount_fuse_requests_total", (("op", "open"),))] == 2


def test_mount_refuses_a_metrics_port_in_use(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    LocalStore(tmp_path / "store").close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "mnt").mkdir()
        done = subprocess.run([sys.executable, "-m", "client.cli", "mount", str(tmp_path / "mnt"),
                               "--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"),
                               "--metrics-port", str(port)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode != 0, done
    assert f"127.0.0.1:{port}" in done.stderr and os.strerror(errno.EADDRINUSE).lower() in done.stderr.lower(), \
        done.stderr
    assert not any(str(tmp_path / "mnt") in line for line in open("/proc/mounts"))
