"""The mount daemon: wires store, cache, index, namespace and ops, then runs the FUSE loop.

``run(options)`` is the foreground daemon (``artifactfs mount --foreground``).  The CLI's
background mode starts ``python -P -m mountfs.daemon '<options as JSON>'`` (client/pyexec.py) from / in a new session and
waits until the mount shows up in /proc/self/mountinfo (or the child dies); tests use the
same entry point, so what they mount is exactly what users run.

Drafts: staged under ``<cache dir>/drafts/``.  Before the mount serves, commits interrupted by
a crash are completed or retried (``recover_commits``); after the FUSE session ends (umount,
SIGTERM, systemd stop) every draft is committed (``commit_all``) before the process exits, so
whoever waits for the daemon's exit (systemd, the tests) sees the new versions.  The commit runs
after the kernel has let go of the mount: nothing can hang on an unserved mount meanwhile.

Shutdown: SIGTERM/SIGINT call ``pyfuse3.terminate()`` and the mount is unmounted on the way
out; ``fusermount3 -u`` ends ``pyfuse3.main`` the same way.  On any exception the session is
closed with ``unmount=False`` (the pyfuse3 examples' rule) so the real error is reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time: `artifactfs` commands start without the mount stack
    from .drafts.manager import DraftManager

log = logging.getLogger(__name__)

FSNAME = "artifactfs"


def _request_timeout() -> float:
    from client.retry import request_timeout

    return request_timeout()


@dataclass
class MountOptions:
    mountpoint: str
    store: str | None = None
    cache_dir: str | None = None
    cache_size: int | None = None
    alias_ttl: float = 5.0
    allow_other: bool = False
    threads: int = 16  #: worker threads for blocking I/O (trio CapacityLimiter)
    block_size: int = 1 << 20
    parallel: int = 8
    stream_split: float = 10.0  #: FetchConfig.stream_split (0: one stream per sequential reader)
    attempts: int = 4
    backoff: float = 0.1
    timeout: float = dataclasses.field(default_factory=lambda: _request_timeout())  #: bound per request, s
    readahead_kb: int = 4096  #: kernel readahead for the mount (bdi read_ahead_kb); 0 = leave it
    local_blobs: bool = True  #: serve an embedded store's blob files in place (False: fetch into the cache)
    commit_on_unmount: bool = True  #: False: drafts are kept for the next mount, not committed
    debug: bool = False
    read_only: bool = False  #: no drafts: every write answers EROFS, mounted with the kernel's ro
    allow_root: bool = False
    uid: int | None = None  #: owner shown for every node (default: the daemon's user)
    gid: int | None = None
    file_mode: int = 0o444  #: permission bits of version files
    dir_mode: int = 0o555  #: permission bits of directories
    attr_timeout: float = 86400.0  #: kernel entry/attr timeout of immutable version nodes
    fuse_options: list[str] = field(default_factory=list)  #: passed through to FUSE (-o)
    log_file: str | None = None  #: rotating log file (default: stderr, which the CLI sends to its log)
    log_level: str = "info"
    metrics_port: int | None = None  #: serve Prometheus /metrics there (mountfs/metrics.py)
    metrics_address: str = "127.0.0.1"
    metrics_file: str | None = None  #: or/and rewrite this textfile (node_exporter) every 15 s and at unmount
    fast_path: bool = False  #: serve fully cached :vN versions from bound trees (mountfs/fastpath.py)
    fast_path_sweep: float = 60.0  #: seconds between the fast path's checks of its linked objects

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MountOptions":
        return cls(**json.loads(text))


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_path(mountpoint: str | os.PathLike[str]) -> str:
    """Canonical absolute path of a mountpoint *without stat'ing the mountpoint itself*.

    ``realpath`` would lstat the last component, which on a live FUSE mount is a request to
    the daemon — a deadlock when the caller is that daemon (before it serves) or when the
    daemon hangs.  Only the parent directory is resolved.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(mountpoint)))
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether an artifactfs mount is live at ``mountpoint`` (reads mountinfo, never stats it)."""
    target = mount_path(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                point = _unescape(fields[4])
                if point == target and fields[sep + 1].startswith(f"fuse.{FSNAME}"):
                    return True
    except OSError:
        pass
    return False


def mount_device(mountpoint: str | os.PathLike[str]) -> str | None:
    """``major:minor`` of the artifactfs mount at ``mountpoint`` (from mountinfo, no stat)."""
    target = mount_path(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target and f"fuse.{FSNAME}" in line:
                return fields[2]
    return None


LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
LOG_MAX_BYTES = 10 << 20
LOG_BACKUPS = 3


def setup_logging(options: MountOptions) -> None:
    """stderr, or a rotating ``--log-file`` (ARTIFACTFS_MOUNT_LOG_SIZE, default 10 MiB, x 3 old
    files); secrets are redacted either way."""
    from logging.handlers import RotatingFileHandler

    handler: logging.Handler
    if options.log_file:
        Path(options.log_file).parent.mkdir(parents=True, exist_ok=True)
        from client.settings import parse_size

        size = parse_size(os.environ.get("ARTIFACTFS_MOUNT_LOG_SIZE") or str(LOG_MAX_BYTES))
        handler = RotatingFileHandler(options.log_file, maxBytes=size, backupCount=LOG_BACKUPS)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = "DEBUG" if options.debug else options.log_level.upper()
    logging.basicConfig(level=level, handlers=[handler], force=True)


#: query parameters that carry credentials (S3/GCS/Azure presigned URLs, our own signed URLs)
_SECRET = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
                     r"x-goog-signature|x-goog-credential|expires|key)=)[^&\s\"']+")
_BEARER = re.compile(r"(?i)(bearer\s+|afs_[0-9a-f]{8}_)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``text`` with URL signatures, credentials and API keys replaced by ``***``."""
    return _BEARER.sub(r"\1***", _SECRET.sub(r"\1***", text))


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def notify_ready(status: str) -> None:
    """sd_notify(READY=1) for ``Type=notify`` units: one datagram to $NOTIFY_SOCKET, if set."""
    import socket

    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(f"READY=1\nSTATUS={status}".encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", path, exc)


class ReadyListener:
    """The other end of :func:`notify_ready`: a datagram socket in a private directory, whose
    path goes into a child's ``NOTIFY_SOCKET``; :meth:`ready` polls it without blocking."""

    def __init__(self) -> None:
        import socket
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="artifactfs-notify-")
        self.path = os.path.join(self._dir.name, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)
        self._ready = False

    def ready(self) -> bool:
        """Whether READY=1 arrived (once seen, always true)."""
        while not self._ready:
            try:
                message = self._sock.recv(4096)
            except BlockingIOError:
                break
            self._ready = b"READY=1" in message.split(b"\n")
        return self._ready

    def close(self) -> None:
        self._sock.close()
        self._dir.cleanup()

    def __enter__(self) -> ReadyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mount_source(location: str) -> str:
    """What findmnt/df show as the mount's source: ``artifactfs:<store>`` (credentials and
    query strings cut from a URL; commas escaped for the FUSE option parser)."""
    location = re.sub(r"^(\w+://)[^/@]*@", r"\1", location).split("?", 1)[0]
    return f"{FSNAME}:{location}".replace("\\", "\\\\").replace(",", "\\,")


def tune_readahead(mountpoint: str, kb: int) -> None:
    """Raise the kernel readahead of the mount.

    libfuse negotiates 128 KiB, so a sequential reader would cost one FUSE round trip per
    128 KiB; with a larger bdi readahead the kernel sends 1 MiB reads (max_pages) and keeps
    several in flight.  Called before the first open is answered: a file keeps the readahead
    it was opened with.  Needs root (sysfs); without it the default stays, which is correct,
    only slower.
    """
    dev = mount_device(mountpoint)
    if not kb or dev is None:
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as exc:
        log.info("could not raise readahead of %s to %d KiB (%s); keeping the default", mountpoint, kb, exc)


def run(options: MountOptions) -> int:
    """Mount and serve until unmounted or signalled.  Returns the exit status."""
    import pyfuse3
    import trio

    from client.cache import Cache
    from client.store import open_store
    from client.store.http import HttpStore
    from client.store.local import LocalStore

    from .content import ContentReader
    from .drafts.fs import DraftFS
    from .drafts.manager import DraftManager, staging_root
    from .fastpath import RESTORE_WAIT, FastPath, clean_stale
    from .fetch import FetchConfig
    from .manifest_index import IndexStore
    from .namespace import Namespace, NamespaceConfig
    from .ops import Operations

    setup_logging(options)
    store = open_store(options.store)
    cache = Cache(options.cache_dir, options.cache_size)
    clean_stale(cache)  # fast-path trees and pins of daemons that died (also without --fast-path)
    # The embedded store reads local files (no hang short of a dead disk) and the HTTP store
    # enforces its own timeouts; only other stores need the watchdog thread per request.
    watchdog = not isinstance(store, (LocalStore, HttpStore))
    content = ContentReader(store, cache, FetchConfig(
        block_size=options.block_size, parallel=options.parallel, attempts=options.attempts,
        backoff=options.backoff, timeout=options.timeout, watchdog=watchdog, local_blobs=options.local_blobs,
        stream_split=options.stream_split,
        # With the fast path, a version read to its end is served from its cache objects (the
        # FUSE copy is dropped when it is bound): keep their pages, not the reader's.
        **({"drop_behind": 0} if options.fast_path else {})))
    indexes = IndexStore(cache.root / "index", content.manifest_path)
    manager: DraftManager | None = None
    drafts: DraftFS | None = None
    report = cache.root / "logs" / f"unmount-{os.getpid()}.jsonl"  #: read by `artifactfs umount`
    if not options.read_only:  # a read-only mount has no drafts: mkdir/create answer EROFS
        manager = DraftManager(staging_root(cache.root, store.location), store, cache)
        for result in manager.recover_commits():
            log.info("recovered an interrupted commit: %s %s", result.state, result.version or result.error or "")
        drafts = DraftFS(manager, invalidate=lambda inode_p, name: pyfuse3.invalidate_entry_async(
            inode_p, os.fsencode(name), ignore_enoent=True))
    ns_config = NamespaceConfig(alias_ttl=options.alias_ttl, version_ttl=options.attr_timeout,
                                file_mode=options.file_mode, dir_mode=options.dir_mode)
    if options.uid is not None:
        ns_config.uid = options.uid
    if options.gid is not None:
        ns_config.gid = options.gid
    fast: FastPath | None = None
    ns = Namespace(store, indexes, ns_config, drafts=drafts,
                   stats=lambda: {**content.stats(), "inodes": len(ns), "index_builds": indexes.builds,
                                  "requests": dict(ops.requests), "pid": os.getpid(),
                                  "unmount_report": str(report),
                                  **({"fastpath": fast.stats()} if fast is not None else {})})
    if options.fast_path:
        fast = FastPath(cache, ns, mount_path(options.mountpoint), sweep=options.fast_path_sweep,
                        dir_mode=options.dir_mode, file_mode=options.file_mode, uid=options.uid, gid=options.gid,
                        drop_pages=lambda inode: pyfuse3.invalidate_inode(inode, attr_only=False),
                        location=store.location, trusted=content.trusted)
        ns.on_version = fast.notice
        def installed(md5: str) -> None:
            content.note_installed(md5)  # its bytes were checked: the tree need not hash it again
            fast.object_cached(md5)  # a candidate completed by a read is bound at once

        cache.on_installed = installed
        ns.on_unused = fast.unused  # a FUSE inode a bind hid, closed at last: its pages go
    content.directory_files = ns.directory_files  # batched block maps / URLs of siblings
    if drafts is not None:
        drafts.attach(ns)
    ops = Operations(ns, content, max_threads=options.threads, drafts=drafts)
    metrics = None
    if options.metrics_port is not None or options.metrics_file:
        from .metrics import MetricsExport, MountCollector

        try:
            metrics = MetricsExport(MountCollector(ops.requests, ops.errors, content.metrics, content.stats),
                                    port=options.metrics_port, host=options.metrics_address, path=options.metrics_file)
        except OSError as exc:
            log.error("cannot export metrics: %s", exc)
            content.shutdown()
            store.close()
            return 1

    fuse_options = set(pyfuse3.default_options)
    fuse_options |= {f"fsname={mount_source(store.location)}", f"subtype={FSNAME}", "noatime"}
    if options.allow_other:
        fuse_options.add("allow_other")
    if options.allow_root:
        fuse_options.add("allow_root")
    if options.read_only:
        fuse_options.add("ro")
    fuse_options |= set(options.fuse_options)
    if options.debug:
        fuse_options.add("debug")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting %s", signum, options.mountpoint)
                        if fast is not None:  # binds below the mount first (they resolve through it)
                            await trio.to_thread.run_sync(fast.detach_all)
                        pyfuse3.terminate()
                        return

            async def after_init() -> None:
                await initialised.wait()
                if fast is not None:
                    fast.start()  # the versions of recent mounts first: bound before READY
                    await trio.to_thread.run_sync(fast.restored.wait, RESTORE_WAIT)
                notify_ready(f"serving {store.location} at {options.mountpoint}")

            initialised = trio.Event()
            ops.on_init = initialised.set
            # The kernel applies its own readahead when it processes our INIT reply and fixes
            # each file's when it opens it: the first open, before its reply, comes after both.
            ops.before_first_open = lambda: tune_readahead(options.mountpoint, options.readahead_kb)
            nursery.start_soon(on_signal)
            nursery.start_soon(after_init)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    pyfuse3.init(ops, options.mountpoint, fuse_options)
    log.info("mounted %s at %s (cache %s)", store.location, options.mountpoint, cache.root)
    try:
        trio.run(serve)
    except BaseException:
        pyfuse3.close(unmount=False)
        if fast is not None:  # after the session is closed: a path through the mount fails, never hangs
            fast.close()
        if manager is not None:
            manager.close()  # staged data stays; the next mount recovers it
        content.shutdown()
        if metrics is not None:
            metrics.close()
        store.close()
        raise
    pyfuse3.close(unmount=True)
    if fast is not None:
        fast.close()
    status = 0
    try:
        if manager is not None and options.commit_on_unmount:  # a read-only mount has no drafts
            log.info("unmounted %s; committing drafts", options.mountpoint)
            status = _commit_at_unmount(manager, report)
        elif manager is not None:
            log.info("unmounted %s; drafts kept for the next mount (--no-commit-on-unmount)", options.mountpoint)
    finally:
        if manager is not None:
            manager.close()
        content.shutdown()
        if metrics is not None:
            metrics.close()  # after the installs landed: the file holds the final counters
        store.close()
    return status


def _commit_at_unmount(manager: DraftManager, report: Path) -> int:
    """commit_all, one JSON line per draft in ``report`` (written as each commit ends, so
    `artifactfs umount` can show progress).  Returns 1 if a commit failed, else 0."""
    report.parent.mkdir(parents=True, exist_ok=True)
    failed = False
    with open(report, "a", encoding="utf-8") as out:
        for draft, result in manager.commit_all():
            line = {"draft": f"{draft.entity}/{draft.project}/{draft.dirname}", **result.to_json()}
            out.write(json.dumps(line) + "\n")
            out.flush()
            failed |= result.state not in ("created", "noop")
            if result.state != "noop":
                log.info("unmount commit: %s %s", result.state, result.version or result.error or "")
    return 1 if failed else 0


def spawn_command(options: MountOptions) -> list[str]:
    """The command line of a daemon process for ``options`` (CLI background mode, tests)."""
    from client.pyexec import python_argv

    return python_argv("-m", "mountfs.daemon", options.to_json())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mountfs.daemon '<MountOptions JSON>'", file=sys.stderr)
        return 2
    options = MountOptions.from_json(argv[0])
    Path(options.mountpoint).mkdir(parents=True, exist_ok=True)
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
