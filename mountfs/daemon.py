"""The mount daemon: wires store, cache, index, namespace and ops, then runs the FUSE loop.

``run(options)`` is the foreground daemon (``artifactfs mount --foreground``).  The CLI's
background mode starts ``python -m mountfs.daemon '<options as JSON>'`` in a new session and
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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FSNAME = "artifactfs"


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
    attempts: int = 4
    backoff: float = 0.1
    timeout: float = 30.0
    readahead_kb: int = 4096  #: kernel readahead for the mount (bdi read_ahead_kb); 0 = leave it
    commit_on_unmount: bool = True  #: False: drafts are kept for the next mount, not committed
    debug: bool = False

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


def tune_readahead(mountpoint: str, kb: int) -> None:
    """Raise the kernel readahead of the mount.

    libfuse negotiates 128 KiB, so a sequential reader would cost one FUSE round trip per
    128 KiB; with a larger bdi readahead the kernel sends 1 MiB reads (max_pages) and keeps
    several in flight.  Needs root (sysfs); without it the default stays, which is correct,
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

    from .draft_fs import DraftFS
    from .drafts import DraftManager, staging_root
    from .fetch import ContentReader, FetchConfig
    from .manifest_index import IndexStore
    from .namespace import Namespace, NamespaceConfig
    from .ops import Operations

    logging.basicConfig(level=logging.DEBUG if options.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(options.store)
    if hasattr(store, "attempts"):
        # The read path retries each block itself (options.attempts); an HTTP store retrying
        # inside every one of those attempts would multiply the wait before EIO.
        store.attempts = 2
    cache = Cache(options.cache_dir, options.cache_size)
    # The embedded store reads local files (no hang short of a dead disk) and the HTTP store
    # enforces its own timeouts; only other stores need the watchdog thread per request.
    watchdog = not store.location.startswith(("http://", "https://")) and not Path(store.location).is_dir()
    content = ContentReader(store, cache, FetchConfig(
        block_size=options.block_size, parallel=options.parallel, attempts=options.attempts,
        backoff=options.backoff, timeout=options.timeout, watchdog=watchdog))
    indexes = IndexStore(cache.root / "index", content.manifest_path)
    manager = DraftManager(staging_root(cache.root, store.location), store, cache)
    report = cache.root / "logs" / f"unmount-{os.getpid()}.jsonl"  #: read by `artifactfs umount`
    for result in manager.recover_commits():
        log.info("recovered an interrupted commit: %s %s", result.state, result.version or result.error or "")
    drafts = DraftFS(manager, invalidate=lambda inode_p, name: pyfuse3.invalidate_entry_async(
        inode_p, os.fsencode(name), ignore_enoent=True))
    ns = Namespace(store, indexes, NamespaceConfig(alias_ttl=options.alias_ttl), drafts=drafts,
                   stats=lambda: {**content.stats(), "inodes": len(ns), "index_builds": indexes.builds,
                                  "requests": dict(ops.requests), "pid": os.getpid(),
                                  "unmount_report": str(report)})
    drafts.attach(ns)
    ops = Operations(ns, content, max_threads=options.threads, drafts=drafts)

    fuse_options = set(pyfuse3.default_options)
    fuse_options |= {f"fsname={FSNAME}", f"subtype={FSNAME}", "noatime"}
    if options.allow_other:
        fuse_options.add("allow_other")
    if options.debug:
        fuse_options.add("debug")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting %s", signum, options.mountpoint)
                        pyfuse3.terminate()
                        return

            async def after_init() -> None:
                # The kernel applies its own readahead when it processes our INIT reply, so
                # tune only after that reply went out (init() runs just before it is sent).
                await initialised.wait()
                await trio.sleep(0.2)
                await trio.to_thread.run_sync(tune_readahead, options.mountpoint, options.readahead_kb)

            initialised = trio.Event()
            ops.on_init = initialised.set
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
        manager.close()  # staged data stays; the next mount recovers it
        content.shutdown()
        store.close()
        raise
    pyfuse3.close(unmount=True)
    status = 0
    try:
        if options.commit_on_unmount:
            log.info("unmounted %s; committing drafts", options.mountpoint)
            status = _commit_at_unmount(manager, report)
        else:
            log.info("unmounted %s; drafts kept for the next mount (--no-commit-on-unmount)", options.mountpoint)
    finally:
        manager.close()
        content.shutdown()
        store.close()
    return status


def _commit_at_unmount(manager: "DraftManager", report: Path) -> int:  # noqa: F821
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
    return [sys.executable, "-m", "mountfs.daemon", options.to_json()]


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
