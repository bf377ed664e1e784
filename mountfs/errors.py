"""What the mount's layers below ``mountfs.ops`` raise, and the one table from errors to errno.

Nothing below ``ops.py`` raises an errno: the namespace, the content readers and the draft
engine raise a class named for what happened (here, or the client's: ``NotFoundError``,
``StoreUnavailableError``, ...) and :func:`errno_for`, called by ops.py's handler wrapper,
says which errno the kernel hears.  ``tests/test_structure.py`` fails on an
``OSError(errno.X, ...)`` or a ``FUSEError`` raised below ``ops.py``.

Each class also derives from the stdlib type a caller would catch (``FileExistsError``,
``IsADirectoryError``, ``PermissionError``, ``ValueError``, else ``OSError``), like the rest of
:mod:`client.errors`; its ``errno`` attribute stays None: the table is the one place.
"""

from __future__ import annotations

import errno
import logging
import sqlite3

from client.errors import (ArtifactFSError, AuthenticationError, ConflictError, InvalidNameError, InvalidPathError,
                           NotFoundError, PermissionDeniedError, StoreUnavailableError)

log = logging.getLogger(__name__)


class MountError(ArtifactFSError):
    """Base of the errors the mount's operations answer with (see :data:`ERRNO`)."""


class InvalidArgumentError(MountError, ValueError):
    """An argument no operation accepts: a name with ``/`` or NUL, ``.``/``..``, a negative size,
    an unknown rename flag, a directory moved into itself, bad commit options, ``readlink`` of
    something that is not a symbolic link, a name in a project that is no draft name."""


class NameTooLongError(MountError, ValueError):
    """A name over NAME_MAX (255) bytes, or a symbolic link target of PATH_MAX or more."""


class NotDirectoryError(MountError, NotADirectoryError):
    """A directory was needed (a lookup under a file, rmdir of a file, a directory renamed over a file)."""


class IsDirectoryError(MountError, IsADirectoryError):
    """A file was needed (unlink, open or truncate of a directory, a file renamed over a directory)."""


class ExistsError(MountError, FileExistsError):
    """The name is taken (create, mkdir, link, symlink, rename with RENAME_NOREPLACE, a second draft)."""


class NotEmptyError(MountError, OSError):
    """rmdir (or rename over) a directory that has entries; rmdir of a draft or entity that holds some."""


class NotPermittedError(MountError, PermissionError):
    """What drafts never allow: hard links to directories, FIFOs/sockets/devices, changing or
    linking the control files (``.commit``, ``.commit.status``)."""


class ReadOnlyFileError(MountError, PermissionError):
    """Opening for writing a file only artifactfs writes (``.commit.status``)."""


class ReadOnlyError(MountError, PermissionError):
    """A write outside a draft: artifact versions are read-only."""


class BadHandleError(MountError, OSError):
    """A file or directory handle that is not open (or not open for writing)."""


class CrossDraftError(MountError, OSError):
    """A rename or hard link into, out of or between drafts (``mv`` then copies)."""


class DraftBusyError(MountError, OSError):
    """A draft that cannot go away now: files of it are open."""


class NotSupportedError(MountError, OSError):
    """What the mount cannot do for this node: read a reference it has no handler for, read an
    entry without a digest, extended attributes of a draft, attributes outside ``user.*``."""


class NoAttributeError(MountError, LookupError):
    """getxattr of an extended attribute the node does not have."""


class BaseUnavailableError(MountError, OSError):
    """What a draft builds on cannot be had: the collection's ``latest`` when the draft is made,
    a base file's content (not fetched, or shorter than its entry says), a base link's target."""


class CommitFailedError(MountError, OSError):
    """A commit asked for synchronously (``setxattr``, or the sentinel without a commit runner)
    made no version; the draft's status file says why."""


#: exception class -> errno; the first class of an exception's MRO found here wins, so a
#: subclass may answer differently from its base
ERRNO: dict[type[BaseException], int] = {
    NotFoundError: errno.ENOENT,
    InvalidNameError: errno.ENOENT,  # a name that cannot exist does not exist
    InvalidPathError: errno.ENOENT,
    PermissionDeniedError: errno.EACCES,
    AuthenticationError: errno.EACCES,
    StoreUnavailableError: errno.EIO,  # includes fetch.FetchError (retries exhausted)
    ConflictError: errno.EBUSY,
    UnicodeError: errno.EILSEQ,  # a name that is not UTF-8 cannot be a manifest path
    InvalidArgumentError: errno.EINVAL,
    NameTooLongError: errno.ENAMETOOLONG,
    NotDirectoryError: errno.ENOTDIR,
    IsDirectoryError: errno.EISDIR,
    ExistsError: errno.EEXIST,
    NotEmptyError: errno.ENOTEMPTY,
    NotPermittedError: errno.EPERM,
    ReadOnlyFileError: errno.EACCES,
    ReadOnlyError: errno.EROFS,
    BadHandleError: errno.EBADF,
    CrossDraftError: errno.EXDEV,
    DraftBusyError: errno.EBUSY,
    NotSupportedError: errno.ENOTSUP,
    NoAttributeError: errno.ENODATA,
    BaseUnavailableError: errno.EIO,
    CommitFailedError: errno.EIO,
}


def errno_for(exc: BaseException) -> int:
    """The one place where our exceptions become errno values.

    A class of :data:`ERRNO` (most specific first); a draft database on a full disk is
    ENOSPC; an operating-system error keeps its errno; anything else is logged and is EIO.
    """
    for cls in type(exc).__mro__:
        code = ERRNO.get(cls)
        if code is not None:
            return code
    if isinstance(exc, sqlite3.OperationalError) and _sqlite_full(exc):
        return errno.ENOSPC
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    log.exception("unexpected error in a FUSE handler; answering EIO", exc_info=exc)
    return errno.EIO


def _sqlite_full(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL (the code where Python reports it, else its fixed message)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == 13 if code is not None else "database or disk is full" in str(exc)
