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

#: wire code (class name) -> class; every subclass enters itself when it is defined
_BY_CODE: dict[str, type[ArtifactFSError]] = {}


class ArtifactFSError(Exception):
    """Base class of every error artifactfs raises on purpose."""

    #: HTTP status the server answers with for this error.
    http_status = 500

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _BY_CODE[cls.__name__] = cls


_BY_CODE[ArtifactFSError.__name__] = ArtifactFSError


class InvalidNameError(ArtifactFSError, ValueError):
    """A malformed entity/project/collection name, alias, tag or type."""

    http_status = 400


class InvalidMetadataError(InvalidNameError, TypeError):
    """Metadata that is not a dict (or JSON object) or holds a value JSON cannot represent:
    a TypeError as in W&B, and a ValueError like the other invalid names."""


class InvalidPathError(ArtifactFSError, ValueError):
    """An entry path that is absolute, climbs out with ``..``, or holds NUL/empty segments."""

    http_status = 400


class ManifestError(ArtifactFSError, ValueError):
    """A manifest that cannot be parsed or breaks the manifest rules."""

    http_status = 400


class CommError(ArtifactFSError):
    """Talking to the store failed or was refused: the base of NotFoundError, the auth errors and
    StoreUnavailableError, so ``except wandb.errors.CommError`` ports as
    ``except client.errors.CommError`` (the W&B SDK raises CommError, e.g. from ``Api.artifact``
    of a missing artifact)."""

    http_status = 500


class NotFoundError(CommError, LookupError):
    """An entity, project, collection, version, alias, run or blob that does not exist."""

    http_status = 404


class LocalPathError(InvalidPathError, FileNotFoundError):
    """``add_file`` of a missing path or a directory, ``add_dir`` of a missing path or a file.

    A ValueError as in the W&B SDK, and still a FileNotFoundError as it was here before."""

    http_status = 400


class ArtifactNotLoggedError(ArtifactFSError, AttributeError):
    """The operation needs a logged (saved) artifact, and this one is still a draft.

    An AttributeError as in the W&B SDK, so ``getattr(draft, "version", None)`` is None."""

    http_status = 400


class ArtifactFinalizedError(ArtifactFSError, AttributeError):
    """The artifact is finalized; log a new version (``new_draft()``) to change it.

    An AttributeError as in the W&B SDK."""

    http_status = 400


class ConflictError(ArtifactFSError, ValueError):
    """The request conflicts with the registry's state (e.g. deleting a version that has aliases)."""

    http_status = 409


class LatestMovedError(ConflictError):
    """A commit's precondition failed: ``latest`` is no longer the version it was made against
    (``CommitRequest.expect_latest``); re-read ``latest`` and commit again."""


class DigestMismatchError(ArtifactFSError, ValueError):
    """Bytes whose md5 differs from the digest they were declared or recorded with."""

    http_status = 422


class MissingBlobError(ArtifactFSError, LookupError):
    """A manifest references content that was never uploaded (or was not verified)."""

    http_status = 409


class AuthenticationError(CommError, PermissionError):
    """No API key, or an unknown one: set ARTIFACTFS_API_KEY."""

    http_status = 401


class PermissionDeniedError(CommError, PermissionError):
    """The key's user is not a member of the entity it tried to read or write."""

    http_status = 403


class StoreUnavailableError(CommError, ConnectionError):
    """The store (server, S3, disk) could not be reached after the allowed retries."""

    http_status = 503


class SchemaVersionError(ArtifactFSError):
    """The registry database has another schema version than this code (client/registry/migrate.py):
    older (run ``artifactfs server --migrate``) or newer (upgrade artifactfs)."""

    http_status = 503


def error_code(exc: ArtifactFSError) -> str:
    """The wire code of an error: its class name."""
    return type(exc).__name__


def error_from_code(code: str, message: str) -> ArtifactFSError:
    """Rebuild the exception a server reported, falling back to the base class."""
    return _BY_CODE.get(code, ArtifactFSError)(message)
