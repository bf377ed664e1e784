"""Validation and parsing of every name a user types: entities, projects, collections,
aliases, tags, types, version selectors and entry paths.

Why strict: each of these becomes a path segment on the mount (``<collection>:<alias>``), a
URL segment on the server and a key in the database, so a ``/``, ``:`` or NUL in the wrong
place would alias two different things or escape a directory.  Errors say what is allowed.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InvalidMetadataError, InvalidNameError, InvalidPathError, LocalPathError

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


MAX_TYPE = 512
RESERVED_TYPE_PREFIX = "wandb-"
#: W&B's reserved artifact names per type ("" reserves every name of that type).
RESERVED_NAME_PREFIX_BY_TYPE = {"job": "", "run_table": "run-", "code": "source-"}


def validate_type(name: str, artifact_name: str | None = None) -> str:
    """Artifact types follow W&B: any non-empty string (``my type``, ``a/b``, unicode) except
    the reserved ``wandb-*`` types and ``job`` (and ``run_table``/``code`` for the artifact names
    W&B reserves for them: ``run-*``/``source-*``).  Ours on top: no control characters (they
    would break the xattr and one-line outputs) and at most MAX_TYPE characters."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"artifact type must be a non-empty string, got {name!r}")
    if len(name) > MAX_TYPE or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidNameError(f"invalid artifact type {name[:40]!r}: at most {MAX_TYPE} characters, "
                               "no control characters")
    bad_prefix = RESERVED_NAME_PREFIX_BY_TYPE.get(name)
    if name.startswith(RESERVED_TYPE_PREFIX) or (
            bad_prefix is not None and artifact_name is not None and artifact_name.startswith(bad_prefix)):
        raise InvalidNameError(f"Artifact type {name!r} is reserved for internal use. Please use a different type.")
    return name


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


def _json_friendly(value: object) -> object:
    """W&B's metadata conversions before JSON: sets and tuples become lists, dates and datetimes
    ISO strings, NaN None, numpy-style scalars their Python value."""
    if isinstance(value, dict):
        return {k: _json_friendly(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_json_friendly(v) for v in items]
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return _json_friendly(value.item())
    return value


def validate_metadata(metadata: object) -> dict:
    """Normalise metadata as W&B does and return the new dict: a JSON string is parsed; values
    pass through :func:`_json_friendly` and a JSON round trip (so int keys become strings).
    Infinity is a ValueError, a value JSON cannot hold a TypeError, more than 100 keys a
    ValueError, all at assignment rather than at log time."""
    if metadata is None or metadata == "":
        return {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError as exc:
            raise InvalidNameError(f"metadata string is not JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise InvalidMetadataError(f"Cannot parse {type(metadata).__name__} as artifact metadata (give a dict)")
    try:
        out = json.loads(json.dumps(_json_friendly(metadata), allow_nan=False))
    except ValueError as exc:
        raise InvalidNameError(f"metadata: {exc} (Infinity cannot be stored)") from None
    except TypeError as exc:
        raise InvalidMetadataError(f"metadata: {exc}") from None
    if len(out) > MAX_METADATA_KEYS:
        raise InvalidNameError(
            f"metadata has {len(out)} keys; the limit is {MAX_METADATA_KEYS} (nest values to group them)"
        )
    encoded = json.dumps(out).encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidNameError(f"metadata is {len(encoded)} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return out


MAX_RUN_TAG = 64  #: characters of one run tag (W&B's limit)


def validate_run_tags(tags: object) -> list[str]:
    """Run tags as W&B takes them: free text (unlike artifact tags), 1 to 64 characters without
    control characters; the order is kept and repeats dropped."""
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise InvalidNameError(f"run tags must be a list of strings, got {type(tags).__name__}")
    for tag in tags:
        if (not isinstance(tag, str) or not 0 < len(tag) <= MAX_RUN_TAG
                or any(ord(c) < 32 or ord(c) == 127 for c in tag)):
            raise InvalidNameError(f"invalid run tag {str(tag)[:40]!r}: 1 to {MAX_RUN_TAG} characters, "
                                   f"no control characters")
    return list(dict.fromkeys(tags))


def _nonfinite_as_text(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _nonfinite_as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite_as_text(v) for v in value]
    return value


def validate_run_dict(kind: str, value: object) -> dict:
    """A run's ``summary`` or ``config``: a dict normalised like metadata (sets to lists,
    datetimes to ISO strings, int keys to strings), except that NaN and infinities become the
    strings "NaN", "Infinity" and "-Infinity" (a diverging loss is data, and JSON cannot hold
    them); no key limit, at most MAX_METADATA_BYTES as JSON."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMetadataError(f"run {kind} must be a dict, got {type(value).__name__}")
    try:
        out = json.loads(json.dumps(_json_friendly(_nonfinite_as_text(value)), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidMetadataError(f"run {kind}: {exc}") from None
    if len(json.dumps(out).encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise InvalidNameError(f"run {kind} is over {MAX_METADATA_BYTES} bytes as JSON")
    return out


def validate_description(description: object) -> str | None:
    """A version's description: None or text of at most MAX_DESCRIPTION characters."""
    if description is None:
        return None
    if not isinstance(description, str):
        raise InvalidNameError(f"description must be a string, got {type(description).__name__}")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidNameError(f"description is {len(description)} characters; the limit is {MAX_DESCRIPTION}")
    return description


class TtlSentinel(str, enum.Enum):
    """The values of a ``ttl_seconds`` field besides a number of seconds and None (no TTL).  A
    ``str`` enum: on the wire (JSON) and in comparisons they are these very strings."""

    KEEP = "keep"  #: updating a version: leave its TTL as it is
    INHERIT = "inherit"  #: the entity's default TTL (a new version's default)


def validate_ttl(ttl: object, *, sentinels: tuple[TtlSentinel, ...] = ()) -> float | TtlSentinel | None:
    """A TTL in seconds: None (no TTL), a number in [0, MAX_TTL_SECONDS], or one of ``sentinels``."""
    if ttl is None:
        return None
    if isinstance(ttl, str) and ttl in sentinels:
        return TtlSentinel(ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        allowed = ", ".join(repr(x.value) for x in sentinels)
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
    wrapped = f"/{path}/"
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        raise InvalidPathError(
            f"entry path {path!r} has an empty, '.' or '..' segment; paths may not climb out of the artifact"
        )
    if len(path) > MAX_SEGMENT_BYTES or not path.isascii():  # else no segment can be too long
        for seg in path.split("/"):
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

    top = os.stat(root)
    seen_dirs = {(top.st_dev, top.st_ino)}
    # Directory symlinks are followed, as W&B does; a directory reached twice (a symlink loop,
    # or two links to one place) is walked once, so the walk always ends.
    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            try:
                dst = os.stat(os.path.join(dirpath, d))
            except OSError as exc:
                refuse(exc)
            if (dst.st_dev, dst.st_ino) not in seen_dirs:
                seen_dirs.add((dst.st_dev, dst.st_ino))
                kept.append(d)
        dirnames[:] = kept
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
                if os.path.islink(full):  # W&B fails here too (FileNotFoundError)
                    raise LocalPathError(f"dangling symlink {_shown(full)} points to nothing; "
                                         "remove it or point it at a file") from None
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


_DRIVE_RE = re.compile(r"[A-Za-z]:")


def validate_new_entry_path(path: object) -> str:
    """:func:`validate_entry_path` plus W&B's refusal of a path that starts like a Windows
    drive (``a:b.txt``), for names given to an artifact built here (not for manifests read
    back, which may come from elsewhere)."""
    path = validate_entry_path(path)
    if _DRIVE_RE.match(path):
        raise InvalidPathError(f"Invalid artifact path: {path!r} (it starts like a Windows drive, 'x:')")
    return path


def entry_path_from_local(relpath: str) -> str:
    """Turn a local relative path into an entry path.  Only the OS separator is a separator: a
    backslash on POSIX is part of the name and kept literally, as W&B does."""
    return validate_new_entry_path(PurePosixPath(*PurePosixPath(relpath.replace(os.sep, "/")).parts).as_posix())


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
    name: str, *, default_entity: str | Callable[[], str], default_project: str, require_selector: bool = False
) -> ArtifactPath:
    """Parse a W&B artifact name: ``name:version``, ``name:alias``, with optional
    ``project/`` or ``entity/project/`` prefixes.  ValueError (InvalidNameError) otherwise.

    ``default_entity`` may be a function, called only for a name without its entity: with a
    server key, finding the default costs a round trip (whoami) that a full name never needs."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError("an artifact name is required, e.g. 'entity/project/dataset:latest'")
    path, sep, selector = name.partition(":")
    if sep and not selector:
        raise InvalidNameError(f"artifact name {name!r} ends with ':'; give a version (v0) or an alias (latest)")
    if ":" in selector:
        raise InvalidNameError(f"artifact name {name!r} has more than one ':'")
    parts = path.split("/")
    if len(parts) < 3:
        entity = default_entity() if callable(default_entity) else default_entity
    if len(parts) == 1:
        project, collection = default_project, parts[0]
    elif len(parts) == 2:
        project, collection = parts
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
