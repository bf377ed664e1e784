"""The one exception hierarchy of artifactfs.

Every error raised on purpose derives from :class:`ArtifactFSError`, so a caller can catch
everything of ours in one clause.  Each class also derives from the stdlib type a caller
would naturally catch (``ValueError`` for bad input, ``LookupError`` for a missing thing,
``PermissionError`` for auth, ``ConnectionError`` for an unreachable store), so code written
against the W&B SDK's documented exceptions keeps working.

The HTTP server sends ``{"error": {"code": <class name>, "message": ...}}``; the client maps
the code back to the class with :func:`error_from_code`, so both stores raise the same types.
"""

from __future__ import annotations


class ArtifactFSError(Exception):
    """Base class of every error artifactfs raises on purpose."""

    #: HTTP status the server answers with for this error.
    http_status = 500


class InvalidNameError(ArtifactFSError, ValueError):
    """A malformed entity/project/collection name, alias, tag or type."""

    http_status = 400


class InvalidPathError(ArtifactFSError, ValueError):
    """An entry path that is absolute, climbs out with ``..``, or holds NUL/empty segments."""

    http_status = 400


class ManifestError(ArtifactFSError, ValueError):
    """A manifest that cannot be parsed or breaks the manifest rules."""

    http_status = 400


class NotFoundError(ArtifactFSError, LookupError):
    """An entity, project, collection, version, alias, run or blob that does not exist."""

    http_status = 404


class ArtifactNotLoggedError(ArtifactFSError, RuntimeError):
    """The operation needs a logged (saved) artifact, and this one is still a draft."""

    http_status = 400


class ArtifactFinalizedError(ArtifactFSError, RuntimeError):
    """The artifact is finalized; log a new version (``new_draft()``) to change it."""

    http_status = 400


class ConflictError(ArtifactFSError, ValueError):
    """The request conflicts with the registry's state (e.g. deleting a version that has aliases)."""

    http_status = 409


class DigestMismatchError(ArtifactFSError, ValueError):
    """Bytes whose md5 differs from the digest they were declared or recorded with."""

    http_status = 422


class MissingBlobError(ArtifactFSError, LookupError):
    """A manifest references content that was never uploaded (or was not verified)."""

    http_status = 409


class AuthenticationError(ArtifactFSError, PermissionError):
    """No API key, or an unknown one: set ARTIFACTFS_API_KEY."""

    http_status = 401


class PermissionDeniedError(ArtifactFSError, PermissionError):
    """The key's user is not a member of the entity it tried to read or write."""

    http_status = 403


class StoreUnavailableError(ArtifactFSError, ConnectionError):
    """The store (server, S3, disk) could not be reached after the allowed retries."""

    http_status = 503


_BY_CODE: dict[str, type[ArtifactFSError]] = {}


def _register() -> None:
    stack: list[type[ArtifactFSError]] = [ArtifactFSError]
    while stack:
        cls = stack.pop()
        _BY_CODE[cls.__name__] = cls
        stack.extend(cls.__subclasses__())


def error_code(exc: ArtifactFSError) -> str:
    """The wire code of an error: its class name."""
    return type(exc).__name__


def error_from_code(code: str, message: str) -> ArtifactFSError:
    """Rebuild the exception a server reported, falling back to the base class."""
    if not _BY_CODE:
        _register()
    return _BY_CODE.get(code, ArtifactFSError)(message)
