"""Byte progress of transfers on a terminal, and stopping them promptly on Ctrl-C.

A :class:`Meter` counts the bytes of one phase (``hash``, ``upload``, ``download``) as they
move, chunk by chunk, from every worker thread, and draws a tqdm bar (bytes, rate, ETA) only
when stderr is a terminal and the phase is large enough to be worth one; otherwise it only
counts.  Hashing happens inside :meth:`client.artifact.Artifact.add_dir`, which knows no total,
so a caller that knows it (the CLI) opens :func:`hashing` around the call and every hashed
chunk lands in that meter.

Ctrl-C: :data:`INTERRUPTED` is set (by the CLI's SIGINT handler, or by a transfer that catches
KeyboardInterrupt in the main thread); every worker checks it between chunks and raises
:class:`TransferInterrupted`, so its temp file is removed and no file is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from .errors import ArtifactFSError

#: a bar appears for phases of at least this many bytes (smaller ones finish before it is read)
MIN_BAR_BYTES = 4 << 20
#: after Ctrl-C, the process exits at the latest this long after the signal, even if a worker
#: is stuck in a network call (its temp file is then left in a temp directory, never at a final path)
HARD_EXIT_SECONDS = 1.5
INTERRUPT_MESSAGE = "artifactfs: interrupted; complete files are kept, run the same command again to resume"
PLAIN_INTERRUPT_MESSAGE = "artifactfs: interrupted"

INTERRUPTED = threading.Event()


class TransferInterrupted(ArtifactFSError):
    """A transfer stopped because the user pressed Ctrl-C (or the process got SIGINT)."""


def check_interrupted() -> None:
    """Raise TransferInterrupted once Ctrl-C was pressed (called between chunks)."""
    if INTERRUPTED.is_set():
        raise TransferInterrupted("interrupted")


class Meter:
    """Bytes moved in one phase, from any thread; a bar on a terminal.

    Also counts files: ``files_moved`` (bytes transferred for them), ``files_present``
    (already complete at the destination or in the store, skipped) and ``replaced`` (paths
    whose existing copy at the destination differed and was overwritten).
    """

    def __init__(self, total: int, desc: str) -> None:
        self.total = total
        self.desc = desc
        self.bytes = 0
        self.files_moved = 0
        self.files_present = 0
        self.replaced: list[str] = []
        self._lock = threading.Lock()
        self._bar: Any = None
        if _collected is not None:
            _collected.append(self)
        if total >= MIN_BAR_BYTES and _stderr_is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                             dynamic_ncols=True, file=sys.stderr)

    def add(self, n: int) -> None:
        """``n`` more bytes moved (raises TransferInterrupted after Ctrl-C)."""
        check_interrupted()
        if n <= 0:
            return
        with self._lock:
            self.bytes += n
            if self._bar is not None:
                self._bar.update(n)

    def entry(self, size: int) -> EntryMeter:
        """A meter for one file of ``size`` bytes, which never counts more than ``size``."""
        return EntryMeter(self, size)

    def file_done(self, moved: bool, replaced: str | None = None, count: int = 1) -> None:
        """``count`` files done (a cached download tells its copies once, not per file)."""
        with self._lock:
            if replaced is not None:
                self.replaced.append(replaced)
            if moved:
                self.files_moved += count
            else:
                self.files_present += count

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EntryMeter:
    """Feeds one file's bytes into a :class:`Meter`, capped at the file's size (a retried
    fetch or a failed check of an existing copy does not count twice)."""

    def __init__(self, meter: Meter, size: int) -> None:
        self.meter = meter
        self.size = size
        self.counted = 0
        self._lock = threading.Lock()  # the parts of one large download arrive on several threads

    def __call__(self, n: int) -> None:
        with self._lock:
            n = max(0, min(n, self.size - self.counted))
            self.counted += n
        self.meter.add(n)

    def finish(self) -> None:
        """Count whatever of the file was not counted chunk by chunk."""
        self(self.size - self.counted)


_hash_meter: Meter | None = None
_collected: list[Meter] | None = None


@contextlib.contextmanager
def collect() -> Iterator[list[Meter]]:
    """The meters opened while the block runs (the CLI reports their counts afterwards)."""
    global _collected
    previous, _collected = _collected, []
    try:
        yield _collected
    finally:
        _collected = previous


@contextlib.contextmanager
def hashing(total: int) -> Iterator[Meter]:
    """Count (and show) the bytes hashed by any thread while the block runs."""
    global _hash_meter
    meter = Meter(total, "hash")
    previous, _hash_meter = _hash_meter, meter
    try:
        yield meter
    finally:
        _hash_meter = previous
        meter.close()


def hashed(n: int) -> None:
    """``n`` bytes were hashed (into the open :func:`hashing` meter, if any); checks Ctrl-C."""
    meter = _hash_meter
    if meter is not None:
        meter.add(n)
    else:
        check_interrupted()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def tree_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``path`` (or of the file itself), by stat only."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# -- Ctrl-C in the command line -------------------------------------------------------------------
_printed = threading.Event()


def say_interrupted() -> None:
    """Print the one-line interruption message (once per process): the resume hint when a
    transfer was stopped, a plain one for other commands."""
    if not _printed.is_set():
        _printed.set()
        with contextlib.suppress(Exception):
            sys.stderr.write((INTERRUPT_MESSAGE if INTERRUPTED.is_set() else PLAIN_INTERRUPT_MESSAGE) + "\n")
            sys.stderr.flush()


def _hard_exit() -> None:
    say_interrupted()
    os._exit(130)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if INTERRUPTED.is_set():  # a second Ctrl-C: leave now
        _hard_exit()
    INTERRUPTED.set()
    timer = threading.Timer(HARD_EXIT_SECONDS, _hard_exit)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def install_sigint_handler() -> Callable[[], None]:
    """Make SIGINT stop transfers within :data:`HARD_EXIT_SECONDS`; returns the undo, which
    puts the previous handler back (an in-process caller, e.g. a test's CliRunner, gets its
    own Ctrl-C back).  After a Ctrl-C the hard-exit timer keeps running: the command exits.

    Only in the main thread (signal handlers can only be set there); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, _on_sigint)

    def undo() -> None:
        signal.signal(signal.SIGINT, previous)

    return undo
