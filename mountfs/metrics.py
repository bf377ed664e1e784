"""Prometheus metrics of one mount: ``artifactfs mount --metrics-port PORT`` / ``--metrics-file``.

What is counted, and where:

* ``artifactfs_mount_fuse_requests_total{op}`` and ``artifactfs_mount_fuse_errors_total{errno}``:
  every FUSE request and every error reply, counted by ``ops._fuse_errors`` (ENOENT of a
  ``lookup`` is the normal answer for a name that does not exist, not a fault);
* ``artifactfs_mount_cache_hits_total`` / ``_misses_total``: objects opened from the local cache /
  from the store (once per object while it is open, not per read; a resumed partial file is a
  miss); ``artifactfs_mount_fetched_bytes_total``, ``artifactfs_mount_fetch_seconds`` (histogram)
  and ``artifactfs_mount_fetches_in_flight``: store requests (each attempt of a retried one) of
  the content layer (:class:`FetchMetrics`, owned by the ContentReader), manifests included,
  block maps not;
* ``artifactfs_mount_open_objects`` and ``artifactfs_mount_verify_failures_total``: from
  ``ContentReader.stats()``.

The metric objects belong to the mount (``registry=None``, collected by :class:`MountCollector`),
not to prometheus_client's global registry, so several readers in one process (tests) never
mix.  ``--metrics-port`` serves ``/metrics`` on 127.0.0.1 (``--metrics-address`` to change);
``--metrics-file`` is rewritten atomically every :data:`TEXTFILE_INTERVAL` seconds and once at
unmount, for node_exporter's textfile collector.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

TEXTFILE_INTERVAL = 15.0
#: store request latency buckets, seconds: loopback (~1 ms) to a slow remote (30 s timeout)
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class FetchMetrics:
    """The content layer's counters (mountfs/content.py updates them)."""

    def __init__(self) -> None:
        self.cache_hits = Counter("artifactfs_mount_cache_hits", "objects opened from the local cache",
                                  registry=None)
        self.cache_misses = Counter("artifactfs_mount_cache_misses", "objects opened from the store",
                                    registry=None)
        self.fetched_bytes = Counter("artifactfs_mount_fetched_bytes", "bytes received from the store",
                                     registry=None)
        self.fetch_seconds = Histogram("artifactfs_mount_fetch_seconds", "latency of one store request",
                                       buckets=FETCH_BUCKETS, registry=None)
        self.in_flight = Gauge("artifactfs_mount_fetches_in_flight", "store requests running now",
                               registry=None)

    @contextlib.contextmanager
    def fetching(self) -> Iterator[None]:
        """Around one store request: in flight meanwhile, its latency observed after."""
        self.in_flight.inc()
        start = time.monotonic()
        try:
            yield
        finally:
            self.fetch_seconds.observe(time.monotonic() - start)
            self.in_flight.dec()

    def collect(self) -> Iterator[Any]:
        for metric in (self.cache_hits, self.cache_misses, self.fetched_bytes, self.fetch_seconds, self.in_flight):
            yield from metric.collect()


class MountCollector(Collector):
    """Everything above, read at scrape time from the ops' and the content reader's counters."""

    def __init__(self, requests: dict[str, int], errors: dict[int, int], fetch: FetchMetrics,
                 stats: Callable[[], dict[str, int]]) -> None:
        self._requests, self._errors, self._fetch, self._stats = requests, errors, fetch, stats

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily("artifactfs_mount_fuse_requests", "FUSE requests served", labels=["op"])
        for op, n in sorted(dict(self._requests).items()):
            requests.add_metric([op], n)
        yield requests
        errors = CounterMetricFamily("artifactfs_mount_fuse_errors", "FUSE error replies", labels=["errno"])
        for code, n in sorted(dict(self._errors).items()):
            errors.add_metric([errno.errorcode.get(code, str(code))], n)
        yield errors
        yield from self._fetch.collect()
        stats = self._stats()
        yield GaugeMetricFamily("artifactfs_mount_open_objects", "objects open now", value=stats["open_objects"])
        yield CounterMetricFamily("artifactfs_mount_verify_failures", "blobs that failed verification",
                                  value=stats["verify_failures"])
        yield GaugeMetricFamily("artifactfs_mount_stream_splits_pay",
                                "1 while a sequential reader's stream may be split on this store (SplitGauge)",
                                value=stats["splits_pay"])
        yield GaugeMetricFamily("artifactfs_mount_stream_split_trials", "splits judged (the last 4 are kept)",
                                value=stats["split_trials"])
        yield CounterMetricFamily("artifactfs_mount_stream_splits", "streams split in two (a second connection for one reader)",
                                  value=stats["stream_splits"])


def check_address(host: str, port: int) -> None:
    """OSError (saying which address) unless ``host:port`` can be listened on now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"metrics address {host}:{port}: {exc.strerror}") from None


class MetricsExport:
    """Serves (``port``) and/or writes (``path``) one mount's metrics until :meth:`close`."""

    def __init__(self, collector: MountCollector, *, port: int | None = None, host: str = "127.0.0.1",
                 path: str | None = None) -> None:
        from prometheus_client import start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.path = path
        self._server: Any = None
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.port: int | None = None
        if port is not None:
            try:
                self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise OSError(exc.errno, f"metrics address {host}:{port}: {exc.strerror}") from None
            self.port = self._server.server_address[1]  # the bound one (port 0: the OS chose)
            log.info("metrics at http://%s:%d/metrics", host, self.port)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.write()  # fail now on a path that cannot be written, not in the thread
            self._writer = threading.Thread(target=self._write_every, name="metrics-file", daemon=True)
            self._writer.start()

    def write(self) -> None:
        from prometheus_client import write_to_textfile

        assert self.path is not None
        write_to_textfile(self.path, self.registry)  # to a temp file, renamed over: readers see whole files

    def _write_every(self) -> None:
        while not self._stop.wait(TEXTFILE_INTERVAL):
            try:
                self.write()
            except OSError as exc:
                log.warning("could not write metrics to %s: %s", self.path, exc)

    def close(self) -> None:
        """Stop serving; write the file a last time (the counters at unmount)."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(5)
            try:
                self.write()
            except OSError as exc:
                log.warning("could not write metrics to %s: %s", self.path, exc)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
