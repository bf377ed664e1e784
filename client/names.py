"""Validation and parsing of every name a user types: entities, projects, collections,
aliases, tags, types, version selectors and entry paths.

Why strict: each of these becomes a path segment on the mount (``<collection>:<alias>``), a
URL segment on the server and a key in the database, so a ``/``, ``:`` or NUL in the wrong
place would alias two different things or escape a directory.  Errors say what is allowed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InvalidNameError, InvalidPathError

log = logging.getLogger(__name__)

MAX_NAME = 128
MAX_PATH = 4096
MAX_SEGMENT_BYTES = 255  # NAME_MAX on Linux: a longer segment could never be shown on the mount
MAX_METADATA_KEYS = 100
MAX_METADATA_BYTES = 1 << 20  #: metadata as JSON (UTF-8)
MAX_DESCRIPTION = 64 * 1024  #: characters
MAX_TTL_SECONDS = 100 * 366 * 86400  #: a TTL is 0 s .. about 100 years
MAX_ENTRIES = 10_000_000  #: entries in one manifest
MAX_ENTRY_SIZE = (1 << 63) - 1  #: bytes of one entry, and of a whole version

_NAME_RE = re.compile(r"[A-Za-z0-9_\-.]+")
_VERSION_RE = re.compile(r"v(0|[1-9][0-9]*)")
_TAG_RE = re.compile(r"[-\w]+( +[-\w]+)*")
RESERVED_ALIASES = frozenset({"latest"})


def _check_simple(kind: str, value: object, *, allow_dot_start: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidNameError(f"{kind} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME:
        raise InvalidNameError(f"{kind} {value[:40]!r}… is {len(value)} characters; the limit is {MAX_NAME}")
    if not _NAME_RE.fullmatch(value):
        raise InvalidNameError(
            f"invalid {kind} {value!r}: use only letters, digits, '-', '_' and '.'"
        )
    if not allow_dot_start and value.startswith("."):
        raise InvalidNameError(f"invalid {kind} {value!r}: it must not start with '.'")
    return value


def validate_entity(name: str) -> str:
    return _check_simple("entity name", name)


def validate_project(name: str) -> str:
    return _check_simple("project name", name)


def validate_collection(name: str) -> str:
    """Artifact (collection) names: letters, digits, '-', '_', '.' (the W&B rule)."""
    return _check_simple("artifact name", name)


def validate_type(name: str) -> str:
    return _check_simple("artifact type", name)


def is_version_selector(selector: str) -> bool:
    return bool(_VERSION_RE.fullmatch(selector))


def validate_alias(alias: str) -> str:
    """Aliases are movable per-collection names; ``vN`` is reserved for version indices.

    ``latest`` is accepted here (a user may pass it to log_artifact) but the registry always
    moves it to the newest version itself.
    """
    if not isinstance(alias, str) or not alias:
        raise InvalidNameError(f"alias must be a non-empty string, got {alias!r}")
    if len(alias) > MAX_NAME:
        raise InvalidNameError(f"alias {alias[:40]!r}… is too long; the limit is {MAX_NAME} characters")
    if not _NAME_RE.fullmatch(alias) or alias.startswith("."):
        raise InvalidNameError(
            f"invalid alias {alias!r}: use letters, digits, '-', '_' and '.' (no '/', ':' or spaces)"
        )
    if is_version_selector(alias):
        raise InvalidNameError(f"invalid alias {alias!r}: names of the form vN are reserved for versions")
    if alias == "draft" or alias.startswith("draft-"):
        raise InvalidNameError(
            f"invalid alias {alias!r}: 'draft' and 'draft-*' name writable draft directories on the mount"
        )
    return alias


def validate_tag(tag: str) -> str:
    """Tags follow W&B: words of letters, digits, '_' and '-', separated by single spaces."""
    if not isinstance(tag, str) or not tag or len(tag) > MAX_NAME or not _TAG_RE.fullmatch(tag):
        raise InvalidNameError(
            f"invalid tag {tag!r}: use letters, digits, '-' and '_' (words separated by spaces), "
            f"at most {MAX_NAME} characters"
        )
    return tag


def validate_metadata(metadata: object) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidNameError(f"metadata must be a dict, got {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidNameError(
            f"metadata has {len(metadata)} keys; the limit is {MAX_METADATA_KEYS} (nest values to group them)"
        )
    for key in metadata:
        if not isinstance(key, str):
            raise InvalidNameError(f"metadata keys must be strings, got {key!r}")
    try:
        encoded = json.dumps(metadata, allow_nan=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidNameError(f"metadata must be JSON (finite numbers, not nested too deeply): {exc}") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidNameError(f"metadata is {len(encoded)} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return metadata


def validate_description(description: object) -> str | None:
    """A version's description: None or text of at most MAX_DESCRIPTION characters."""
    if description is None:
        return None
    if not isinstance(description, str):
        raise InvalidNameError(f"description must be a string, got {type(description).__name__}")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidNameError(f"description is {len(description)} characters; the limit is {MAX_DESCRIPTION}")
    return description


def validate_ttl(ttl: object, *, sentinels: tuple[str, ...] = ()) -> float | str | None:
    """A TTL in seconds: None (no TTL), a number in [0, MAX_TTL_SECONDS], or one of ``sentinels``."""
    if ttl is None or (isinstance(ttl, str) and ttl in sentinels):
        return ttl
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        allowed = ", ".join(repr(x) for x in sentinels)
        raise InvalidNameError(f"ttl_seconds must be a number of seconds or null{', ' + allowed if allowed else ''}; "
                               f"got {ttl!r}")
    if not (math.isfinite(ttl) and 0 <= ttl <= MAX_TTL_SECONDS):
        raise InvalidNameError(f"ttl_seconds {ttl!r} is out of range: 0 to {MAX_TTL_SECONDS} seconds (about 100 years)")
    return float(ttl)


def validate_entry_path(path: object) -> str:
    """Normalise and check a path inside an artifact.

    Refused: absolute paths, ``.``/``..`` segments, empty segments (``a//b``), NUL, and segments
    longer than NAME_MAX.  A manifest read from a store goes through this too, so a malicious
    manifest cannot make ``download`` or the mount write or show anything outside the root.
    """
    if not isinstance(path, str) or not path:
        raise InvalidPathError(f"entry path must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise InvalidPathError(f"entry path {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise InvalidPathError(f"entry path {path!r} is absolute; give a path relative to the artifact root")
    if len(path) > MAX_PATH:
        raise InvalidPathError(f"entry path is {len(path)} characters; the limit is {MAX_PATH}")
    parts = path.split("/")
    for seg in parts:
        if seg in ("", ".", ".."):
            raise InvalidPathError(
                f"entry path {path!r} has an empty, '.' or '..' segment; paths may not climb out of the artifact"
            )
        if len(seg.encode("utf-8", "surrogateescape")) > MAX_SEGMENT_BYTES:
            raise InvalidPathError(f"entry path {path!r} has a segment longer than {MAX_SEGMENT_BYTES} bytes")
    return path


def local_tree(root: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Every regular file under ``root`` as (full path, entry path), sorted; never skips one
    silently.  A directory that cannot be listed, a path the OS cannot reach (longer than
    PATH_MAX), a dangling link and a name that is not UTF-8 are errors (InvalidPathError)
    naming the path; sockets, FIFOs and devices are skipped with a warning."""
    def refuse(exc: OSError) -> None:
        raise InvalidPathError(f"cannot read {_shown(exc.filename)}: {exc.strerror}; nothing was added") from None

    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidPathError(f"file name {_shown(full)} is not UTF-8; manifest paths are UTF-8: rename it "
                                       "(e.g. convmv) or leave it out") from None
            try:
                st = os.stat(full)
            except OSError as exc:
                refuse(exc)
            if stat.S_ISREG(st.st_mode):
                yield full, entry_path_from_local(rel)
            else:
                log.warning("skipping %s: not a regular file (socket, FIFO or device)", _shown(full))


def _shown(path: object) -> str:
    """A path for a message: undecodable bytes as backslash escapes, never an encoding error."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return "'" + str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") + "'"


def entry_path_from_local(relpath: str) -> str:
    """Turn a local relative path (possibly with OS separators) into an entry path."""
    return validate_entry_path(PurePosixPath(*PurePosixPath(relpath.replace("\\", "/")).parts).as_posix())


@dataclass(frozen=True)
class ArtifactPath:
    """A parsed ``[entity/][project/]collection[:selector]``."""

    entity: str
    project: str
    collection: str
    selector: str | None = None  #: ``vN``, an alias, or None (no version given)

    def __str__(self) -> str:
        base = f"{self.entity}/{self.project}/{self.collection}"
        return f"{base}:{self.selector}" if self.selector else base


def parse_artifact_path(
    name: str, *, default_entity: str, default_project: str, require_selector: bool = False
) -> ArtifactPath:
    """Parse a W&B artifact name: ``name:version``, ``name:alias``, with optional
    ``project/`` or ``entity/project/`` prefixes.  ValueError (InvalidNameError) otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError("an artifact name is required, e.g. 'entity/project/dataset:latest'")
    path, sep, selector = name.partition(":")
    if sep and not selector:
        raise InvalidNameError(f"artifact name {name!r} ends with ':'; give a version (v0) or an alias (latest)")
    if ":" in selector:
        raise InvalidNameError(f"artifact name {name!r} has more than one ':'")
    parts = path.split("/")
    if len(parts) == 1:
        entity, project, collection = default_entity, default_project, parts[0]
    elif len(parts) == 2:
        entity, (project, collection) = default_entity, parts
    elif len(parts) == 3:
        entity, project, collection = parts
    else:
        raise InvalidNameError(
            f"artifact name {name!r} has too many '/': use collection, project/collection or entity/project/collection"
        )
    validate_entity(entity)
    validate_project(project)
    validate_collection(collection)
    if selector:
        if not is_version_selector(selector):
            _check_simple("alias or version", selector)
    elif require_selector:
        raise InvalidNameError(f"artifact name {name!r} needs a version or alias, e.g. {name}:latest")
    return ArtifactPath(entity, project, collection, selector or None)
