"""Artifact manifests in the W&B v1 format, and the artifact digest the W&B SDK computes.

Format (what `wandb` writes as ``wandb_manifest.json``)::

    {"version": 1, "storagePolicy": "wandb-storage-policy-v1",
     "storagePolicyConfig": {"storageLayout": "V2"},
     "contents": {"<path>": {"digest": "<base64 md5>", "size": N, "ref"?: uri, "extra"?: {...},
                              "birthArtifactID"?: id}, ...}}

Artifact digest (W&B ``ArtifactManifestV1.digest``): md5 hex over the line
``wandb-artifact-manifest-v1\\n`` followed by ``<path>:<entry digest>\\n`` for every entry in
path order.  Two trees with the same files therefore get the same digest here and in W&B.

We serialise with one entry per line.  The result is ordinary JSON, but a reader that knows
the layout (``iter_entries``) can stream a million-entry manifest without holding it as one
object; anything else (e.g. a manifest written by W&B) falls back to ``json.load``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Protocol

from .errors import ManifestError
from .names import validate_entry_path

STORAGE_POLICY = "wandb-storage-policy-v1"
STORAGE_POLICY_CONFIG: dict[str, Any] = {"storageLayout": "V2"}
_DIGEST_PREFIX = b"wandb-artifact-manifest-v1\n"
#: ``extra`` key of a symbolic link entry (value: the link's target).  The entry's blob holds
#: the target's bytes (digest = their md5, size = their length), so a reader that does not know
#: the key gets a small file naming the target, and the artifact digest of a tree without links
#: is what W&B computes.  Written by the mount's draft commits (docs/SEMANTICS.md).
SYMLINK_KEY = "symlink"
#: ``extra`` key of a file committed with an execute bit (value: true)
EXECUTABLE_KEY = "executable"


@dataclass
class ManifestEntry:
    """One file (or reference) of an artifact."""

    path: str
    digest: str  #: base64 md5 for files; for references what the seed prescribes (ETag, ...)
    size: int | None = None
    ref: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    birth_artifact_id: str | None = None
    #: Where the bytes are on this machine before upload (never serialised).
    local_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": self.digest}
        if self.birth_artifact_id:
            out["birthArtifactID"] = self.birth_artifact_id
        if self.ref:
            out["ref"] = self.ref
        if self.extra:
            out["extra"] = self.extra
        if self.size is not None:
            out["size"] = self.size
        return out

    @classmethod
    def from_json(cls, path: str, data: Any) -> "ManifestEntry":
        if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
            raise ManifestError(f"manifest entry {path!r} has no string 'digest'")
        size = data.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ManifestError(f"manifest entry {path!r} has an invalid size {size!r}")
        ref = data.get("ref")
        if ref is not None and not isinstance(ref, str):
            raise ManifestError(f"manifest entry {path!r} has a non-string ref")
        extra = data.get("extra") or {}
        if not isinstance(extra, dict):
            raise ManifestError(f"manifest entry {path!r} has a non-object 'extra'")
        try:
            validate_entry_path(path)
        except ValueError as exc:
            raise ManifestError(f"manifest refused: {exc}") from None
        return cls(path=path, digest=data["digest"], size=size, ref=ref, extra=extra,
                   birth_artifact_id=data.get("birthArtifactID"))

    @property
    def is_reference(self) -> bool:
        return self.ref is not None

    @property
    def symlink_target(self) -> str | None:
        """The target when the entry is a symbolic link (``extra["symlink"]``), else None."""
        return symlink_target(self.extra) if self.extra else None  # asked once per entry of a download

    @property
    def is_executable(self) -> bool:
        return self.extra.get(EXECUTABLE_KEY) is True


def symlink_target(extra: dict[str, Any] | None) -> str | None:
    """The symbolic link target an entry's ``extra`` names (None: not a link)."""
    target = extra.get(SYMLINK_KEY) if extra else None
    return target if isinstance(target, str) and target and "\x00" not in target else None


class DigestBuilder:
    """The W&B artifact digest fed one entry at a time, in path order.

    Streaming writers (the mount's draft commit) produce entries already sorted and must not
    hold them all; out-of-order input would silently give a different digest, so it is refused.
    """

    def __init__(self) -> None:
        self._h = hashlib.md5(_DIGEST_PREFIX, usedforsecurity=False)
        self._last: str | None = None

    def update(self, path: str, digest: str) -> None:
        if self._last is not None and path <= self._last:
            raise ManifestError(f"entries must come in path order: {path!r} after {self._last!r}")
        self._last = path
        self._h.update(f"{path}:{digest}\n".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def compute_digest(items: Iterable[tuple[str, str]]) -> str:
    """The W&B artifact digest of (path, entry digest) pairs (sorted here)."""
    builder = DigestBuilder()
    for path, digest in sorted(items):
        builder.update(path, digest)
    return builder.hexdigest()


class Manifest:
    """An in-memory manifest: fine for the SDK; the mount indexes manifests on disk instead."""

    def __init__(self, entries: Iterable[ManifestEntry] = (), storage_policy: str = STORAGE_POLICY,
                 storage_policy_config: dict[str, Any] | None = None) -> None:
        self.storage_policy = storage_policy
        self.storage_policy_config = dict(storage_policy_config or STORAGE_POLICY_CONFIG)
        self.entries: dict[str, ManifestEntry] = {}
        for e in entries:
            self.entries[e.path] = e

    def add(self, entry: ManifestEntry) -> None:
        validate_entry_path(entry.path)
        self.entries[entry.path] = entry

    def remove(self, path: str) -> None:
        del self.entries[path]

    def digest(self) -> str:
        return compute_digest((p, e.digest) for p, e in self.entries.items())

    @property
    def size(self) -> int:
        return sum(e.size or 0 for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def __iter__(self) -> Iterator[ManifestEntry]:
        return iter(sorted(self.entries.values(), key=lambda e: e.path))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "storagePolicy": self.storage_policy,
            "storagePolicyConfig": self.storage_policy_config,
            "contents": {e.path: e.to_json() for e in self},
        }

    def to_manifest_json(self) -> dict[str, Any]:
        """W&B's name for :meth:`to_json` (the v1 manifest as a dict)."""
        return self.to_json()

    def to_bytes(self) -> bytes:
        buf = io.StringIO()
        write_manifest(buf, self, storage_policy=self.storage_policy,
                       storage_policy_config=self.storage_policy_config)
        return buf.getvalue().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes | str) -> "Manifest":
        stream = io.StringIO(data.decode("utf-8") if isinstance(data, bytes) else data)
        policy, config, entries = read_manifest(stream)
        return cls(entries, policy, config)


def _header(policy: str, config: dict[str, Any]) -> str:
    return ('{"version": 1, "storagePolicy": %s, "storagePolicyConfig": %s, "contents": {\n'
            % (json.dumps(policy), json.dumps(config, sort_keys=True)))


def write_manifest(out: IO[str], entries: Iterable[ManifestEntry], *, storage_policy: str = STORAGE_POLICY,
                   storage_policy_config: dict[str, Any] | None = None) -> None:
    """Write entries (already in path order) one per line; the output is valid JSON."""
    out.write(_header(storage_policy, storage_policy_config or STORAGE_POLICY_CONFIG))
    first = True
    for e in entries:
        if not first:
            out.write(",\n")
        out.write(json.dumps(e.path, ensure_ascii=False))
        out.write(": ")
        out.write(json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True))
        first = False
    out.write("\n}}\n")


def read_manifest(stream: IO[str]) -> tuple[str, dict[str, Any], list[ManifestEntry]]:
    """Parse and validate a whole manifest (any valid W&B v1 JSON)."""
    try:
        data = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ManifestError("manifest is not a W&B v1 manifest (expected \"version\": 1)")
    contents = data.get("contents")
    if not isinstance(contents, dict):
        raise ManifestError("manifest has no 'contents' object")
    entries = [ManifestEntry.from_json(p, v) for p, v in contents.items()]
    return (data.get("storagePolicy") or STORAGE_POLICY,
            data.get("storagePolicyConfig") or {}, entries)


class ByteLines(Protocol):
    """What :func:`iter_entries` reads: a binary file, or anything that reads like one."""

    def read(self, size: int = -1, /) -> bytes: ...
    def readline(self, size: int = -1, /) -> bytes: ...
    def __iter__(self) -> Iterator[bytes]: ...


#: lines of our layout decoded by one ``json.loads`` (bounds the memory a chunk takes)
_CHUNK_LINES = 1024


def iter_entries(stream: ByteLines) -> Iterator[ManifestEntry]:
    """Stream a manifest's entries with flat memory when it uses our one-per-line layout.

    Falls back to a full parse for other layouts.  Every path is validated either way.
    """
    first = stream.readline()
    try:
        head = json.loads(first.decode("utf-8") + "}}")
        ours = isinstance(head, dict) and head.get("version") == 1 and head.get("contents") == {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        ours = False
    if not ours:
        rest = first + stream.read()
        yield from read_manifest(io.StringIO(rest.decode("utf-8", "replace")))[2]
        return
    chunk: list[bytes] = []
    for raw in stream:
        if raw in (b"}}\n", b"}}"):
            yield from _chunk_entries(chunk)
            return
        chunk.append(raw)
        if len(chunk) == _CHUNK_LINES:
            yield from _chunk_entries(chunk)
            chunk = []
    raise ManifestError("manifest is truncated (no closing '}}')")


def _chunk_entries(lines: list[bytes]) -> Iterator[ManifestEntry]:
    """The entries of consecutive lines of our layout, decoded as one JSON object.

    A chunk that does not decode to exactly one entry per line (a line holding two entries, a
    path listed twice, a blank or malformed line) is decoded line by line instead, so the
    result is always what reading each line alone gives.
    """
    text = b"".join(lines).decode("utf-8").rstrip()
    try:
        obj = json.loads("{" + text.removesuffix(",") + "}")
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict) or len(obj) != len(lines):
        yield from _line_entries(lines)
        return
    for path, value in obj.items():
        yield ManifestEntry.from_json(path, value)


def _line_entries(lines: list[bytes]) -> Iterator[ManifestEntry]:
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\n").removesuffix(",")
        try:
            obj = json.loads("{" + line + "}")
        except json.JSONDecodeError as exc:
            raise ManifestError(f"corrupt manifest line: {exc}") from None
        for path, value in obj.items():
            yield ManifestEntry.from_json(path, value)
