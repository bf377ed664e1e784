"""A download root that does not exist yet, built beside itself and renamed into place once.

A download into a new root writes every file straight into ``<parent>/.<name>.artifactfs-staging``
(no temp name and rename per file) and renames that directory to the root when the files are
all there: a reader sees no root or a root whose files are complete, never a file cut short
under its real name.  A failed download removes its staging directory; a crashed one leaves
it, and the next download into the same root removes it (:func:`clear_stale`).

Which staging directory is in use is told by a lock: its creator holds an exclusive ``flock``
on it until it is renamed or removed.  One whose lock can be taken belongs to no live download:
it is first renamed to a unique name (so a download that just made a new one under the same
name cannot lose it) and then removed.  A creator checks, once it holds the lock, that the
directory under the name is still the one it locked.  When the name is held by a live download
(two downloads into one new root), or the file system has no ``flock``, :meth:`Staging.open`
answers False and the caller writes each file atomically in place instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil

SUFFIX = ".artifactfs-staging"
_LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB


def staging_path(root: str) -> str:
    """The staging directory of the download root ``root`` (beside it, in its parent)."""
    parent, _, name = os.path.abspath(root).rpartition("/")
    return f"{parent}/.{name}{SUFFIX}"


def _locked_dir(path: str) -> int | None:
    """A descriptor of the directory ``path`` holding its exclusive lock, or None (absent, or
    locked by someone else); OSError when this file system has no ``flock``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, _LOCK)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def clear_stale(root: str) -> bool:
    """Remove the staging directory of ``root`` if no live download holds it; True if removed."""
    path = staging_path(root)
    try:
        fd = _locked_dir(path)
    except OSError:
        return False
    if fd is None:
        return False
    try:
        trash = f"{path}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            os.rename(path, trash)  # under a name no creator uses, before it is emptied
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        os.close(fd)


class Staging:
    """The staging directory of one download into the new root ``root``."""

    __slots__ = ("root", "path", "_fd")

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = staging_path(root)
        self._fd: int | None = None

    def open(self) -> bool:
        """Make the staging directory (its parents too) and take its lock; False when it cannot
        be used (held by a live download, no lock on this file system)."""
        clear_stale(self.root)
        try:
            os.mkdir(self.path)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                os.mkdir(self.path)
            except FileExistsError:
                return False
        except FileExistsError:
            return False  # a live download's
        try:
            fd = _locked_dir(self.path)
        except OSError:  # no flock on this file system: no staging here
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
            return False
        if fd is None:
            return False  # cleared as stale meanwhile (by a download that will not reuse it)
        try:
            same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # taken for stale and cleared between the mkdir and the lock
            os.close(fd)
            return False
        self._fd = fd
        return True

    def publish(self) -> None:
        """Rename the staging directory to the root.  A root that appeared meanwhile (another
        download, a user) gets the files moved into it one by one, each complete."""
        try:
            os.rename(self.path, self.root)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(self.root):
                self.discard()
                raise
            self._merge()
        self._release()

    def _merge(self) -> None:
        for dirpath, _dirs, names in os.walk(self.path):
            rel = os.path.relpath(dirpath, self.path)
            into = self.root if rel == "." else os.path.join(self.root, rel)
            os.makedirs(into, exist_ok=True)
            for name in names:
                os.replace(os.path.join(dirpath, name), os.path.join(into, name))
        shutil.rmtree(self.path, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging directory and what it holds (a failed download)."""
        if self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
