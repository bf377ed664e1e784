"""The Store protocol: the one seam between the SDK/mount and where artifacts live.

Two implementations exist: :class:`client.store.local.LocalStore` (embedded: SQLite + a blob
directory, no server) and :class:`client.store.http.HttpStore` (a registry server).  Both put
the same registry rules behind this protocol because both delegate to one core,
:class:`client.registry.core.RegistryCore` (the server is a thin HTTP shell over it).

Content addressing: a file's *digest* is the W&B entry digest, base64 of its md5.  Blobs are
keyed by the hex form of that md5 (path- and URL-safe) and scoped per entity, so dedupe never
reveals whether another entity holds some content.

A version's manifest is itself stored as a blob (W&B manifest v1 JSON, written one entry per
line by :mod:`client.manifest`), referenced from the version by its md5 hex.  That keeps
million-entry manifests out of the metadata database and lets the mount fetch and index them
like any other content.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any, Iterable, Protocol, runtime_checkable

from ..blockmap import BlockMap
from ..names import TtlSentinel


#: the most one chunk of ``Store.stream_blob`` holds.
STREAM_CHUNK = 1 << 20


@dataclass(frozen=True)
class VersionRecord:
    """One committed version of a collection, as the registry knows it."""

    id: str  #: opaque, globally unique version id
    entity: str
    project: str
    collection: str
    index: int  #: N of ``vN``
    type: str
    digest: str  #: W&B artifact digest (md5 hex over the manifest entries)
    manifest_md5: str  #: md5 hex of the manifest blob (key in the entity's blob space)
    size: int
    file_count: int
    description: str | None
    metadata: dict[str, Any]
    aliases: tuple[str, ...]
    tags: tuple[str, ...]
    created_at: _dt.datetime
    updated_at: _dt.datetime
    ttl_seconds: float | None = None  #: None: no TTL
    state: str = "COMMITTED"
    logged_by_run: str | None = None  #: run id (``entity/project/run_id``) or None
    #: For a linked version (a member of a portfolio/registry collection), where it came from.
    source_entity: str | None = None
    source_project: str | None = None
    source_collection: str | None = None
    source_index: int | None = None

    @property
    def version(self) -> str:
        return f"v{self.index}"

    @property
    def blob_entity(self) -> str:
        """Whose blob space holds the manifest and files: a version linked into a portfolio or
        registry shares its source's blobs, which live under the source entity."""
        return self.source_entity or self.entity

    @property
    def qualified_name(self) -> str:
        return f"{self.entity}/{self.project}/{self.collection}:v{self.index}"


@dataclass(frozen=True)
class CollectionRecord:
    entity: str
    project: str
    name: str
    type: str
    description: str | None
    created_at: _dt.datetime
    tags: tuple[str, ...] = ()
    version_count: int = 0
    #: alias -> version index, e.g. {"latest": 3, "best": 1}
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    entity: str
    project: str
    id: str
    name: str | None
    job_type: str | None
    config: dict[str, Any]
    state: str  #: "running" | "finished" | "crashed"
    created_at: _dt.datetime
    summary: dict[str, Any] = field(default_factory=dict)  #: last logged value per key
    tags: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.entity}/{self.project}/{self.id}"


@dataclass(frozen=True)
class RunFileRecord:
    """A file saved with a run (``Run.upload_file``); its bytes are the blob ``md5`` of the entity."""

    name: str
    md5: str  #: hex
    size: int
    updated_at: _dt.datetime


@dataclass(frozen=True)
class CommitRequest:
    """Everything needed to create a version.  The manifest blob must already be uploaded.

    The registry reads the manifest blob, validates every path, checks that every non-reference
    entry's content is present in the entity's blob space, computes digest/size/file_count
    itself (never trusting the client for them), and then creates the next version
    atomically.  If ``digest`` equals the latest version's digest, no version is created: the
    latest is returned with the new aliases/tags added (the W&B no-op rule).
    """

    entity: str
    project: str
    collection: str
    type: str
    manifest_md5: str
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    description: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: seconds, None (no TTL even if the entity has a default) or TtlSentinel.INHERIT (the entity default)
    ttl_seconds: float | None | str = TtlSentinel.INHERIT
    run_id: str | None = None  #: logging run (same entity/project)
    #: compare-and-swap on ``latest``: commit only if the collection's ``latest`` is the version
    #: with this id ("" = the collection has no version yet), else LatestMovedError; None: no check
    expect_latest: str | None = None


@runtime_checkable
class Store(Protocol):
    """Where artifacts live.  Every method may raise :class:`client.errors.ArtifactFSError`."""

    #: A stable string naming this store (directory path or URL); part of cache keys.
    location: str

    # -- namespace -----------------------------------------------------------------------
    def list_entities(self) -> list[str]: ...
    def list_projects(self, entity: str) -> list[str]: ...
    def list_collections(self, entity: str, project: str, type: str | None = None) -> list[CollectionRecord]: ...
    def get_collection(self, entity: str, project: str, collection: str) -> CollectionRecord: ...
    def list_versions(self, entity: str, project: str, collection: str) -> list[VersionRecord]: ...
    def list_project(self, entity: str, project: str) -> tuple[list[CollectionRecord], list[VersionRecord]]:
        """The project's collections and all their committed versions, at once."""
        ...
    def list_types(self, entity: str, project: str) -> list[str]: ...
    def update_collection(self, entity: str, project: str, collection: str, *, name: str | None = None,
                          description: str | None = None, tags: Iterable[str] | None = None,
                          type: str | None = None) -> CollectionRecord:
        """Rename / describe / retag / retype a collection (None = unchanged; type: sequences only)."""
        ...
    def delete_collection(self, entity: str, project: str, collection: str) -> None:
        """Delete a collection with all its versions, aliases and the links into portfolios of them."""
        ...

    # -- versions ------------------------------------------------------------------------
    def resolve(self, entity: str, project: str, collection: str, selector: str) -> VersionRecord:
        """``selector`` is ``vN``, an alias (``latest``) or a digest; NotFoundError if none."""
        ...

    def get_version(self, version_id: str) -> VersionRecord: ...
    def commit(self, req: CommitRequest) -> tuple[VersionRecord, bool]:
        """Create the next version; returns (version, created).  See CommitRequest."""
        ...

    def update_version(
        self,
        version_id: str,
        *,
        aliases: Iterable[str] | None = None,
        tags: Iterable[str] | None = None,
        metadata: dict[str, Any] | None = None,
        description: str | None = None,
        ttl_seconds: float | None | str = TtlSentinel.KEEP,
    ) -> VersionRecord:
        """Replace the given fields (None = unchanged; ttl 'keep' = unchanged, 'inherit' = the
        entity's current default)."""
        ...

    def delete_version(self, version_id: str, delete_aliases: bool = False) -> None:
        """Delete a version (a linked one: only the link).  ConflictError if it has aliases."""
        ...

    def link_version(self, version_id: str, entity: str, project: str, collection: str,
                     aliases: Iterable[str] = ()) -> VersionRecord:
        """Link into a portfolio collection (registries are projects named wandb-registry-<name>)."""
        ...

    def unlink_version(self, version_id: str) -> None: ...
    def set_entity_default_ttl(self, entity: str, ttl_seconds: float | None) -> None: ...
    def gc_expired(self) -> list[VersionRecord]:
        """Delete versions whose TTL ran out; returns what was deleted."""
        ...

    def get_entity_default_ttl(self, entity: str) -> float | None:
        """The TTL new versions of the entity inherit (None: none).  NotFoundError if unknown."""
        ...

    def create_project(self, entity: str, project: str) -> None:
        """Create a project (and its entity) if missing; idempotent."""
        ...

    def delete_run(self, entity: str, project: str, run_id: str, delete_artifacts: bool = False) -> list[VersionRecord]:
        """Delete a run; with delete_artifacts also the versions it logged (returned)."""
        ...

    # -- runs and lineage ----------------------------------------------------------------
    def create_run(
        self, entity: str, project: str, run_id: str | None = None, *, name: str | None = None,
        job_type: str | None = None, config: dict[str, Any] | None = None,
    ) -> RunRecord: ...
    def get_run(self, entity: str, project: str, run_id: str) -> RunRecord: ...
    def list_runs(self, entity: str, project: str) -> list[RunRecord]: ...
    def finish_run(self, entity: str, project: str, run_id: str, state: str = "finished") -> None: ...
    def update_run(self, entity: str, project: str, run_id: str, *, summary: dict[str, Any] | None = None,
                   tags: Iterable[str] | None = None, config: dict[str, Any] | None = None,
                   name: str | None = None) -> RunRecord:
        """Replace the given fields of a run (None = unchanged)."""
        ...
    def put_run_file(self, entity: str, project: str, run_id: str, name: str, md5_hex: str, size: int) -> RunFileRecord:
        """Save (or replace) file ``name`` of a run; the blob must already be uploaded."""
        ...
    def list_run_files(self, entity: str, project: str, run_id: str) -> list[RunFileRecord]: ...
    def record_use(self, entity: str, project: str, run_id: str, version_id: str, use_as: str | None = None) -> None: ...
    def versions_logged_by(self, entity: str, project: str, run_id: str) -> list[VersionRecord]: ...
    def versions_used_by(self, entity: str, project: str, run_id: str) -> list[VersionRecord]: ...
    def runs_using(self, version_id: str) -> list[RunRecord]: ...

    # -- blobs (content-addressed by md5 hex, scoped per entity) -------------------------
    def missing_blobs(self, entity: str, md5_hexes: Iterable[str]) -> set[str]: ...
    def put_blob(self, entity: str, md5_hex: str, src: Path, size: int,
                 progress: Callable[[int], None] | None = None) -> None:
        """Upload ``src``; the store verifies its md5 before anything may reference it.

        ``progress(n)`` as bytes go out (it may raise to stop the upload)."""
        ...

    def read_blob(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None,
                  progress: Callable[[int], None] | None = None) -> bytes:
        """Bytes ``[start, start+length)`` of a blob (to its end if length is None); ``progress(n)``
        as they arrive (it may raise to stop the read)."""
        ...

    def download_blob(self, entity: str, md5_hex: str, dest: Path,
                      progress: Callable[[int], None] | None = None) -> None:
        """Write the whole blob to ``dest`` (the caller verifies and renames); ``progress(n)``
        as bytes arrive (it may raise to stop the download)."""
        ...

    def stream_blob(self, entity: str, md5_hex: str, start: int, length: int) -> Iterator[bytes]:
        """Bytes ``[start, start+length)`` as one ranged request whose bytes arrive as chunks of
        at most :data:`STREAM_CHUNK`, so a 64 MiB readahead never sits in memory whole.  A
        single attempt: the caller resumes from where a failed stream stopped."""
        ...

    def blockmaps(self, entity: str, md5_hexes: Iterable[str]) -> dict[str, BlockMap]:
        """The block maps (:mod:`client.blockmap`) the store holds for these blobs; a blob
        without one is left out."""
        ...

    def close(self) -> None: ...


# -- optional capabilities ------------------------------------------------------------------
# What only some stores can do.  Callers choose by type, ``isinstance(store, LocalBlobs)``,
# never by probing for a method name; each store class states what it offers by having the
# methods (tests/test_infrastructure.py checks both stores against this list).


@runtime_checkable
class LocalBlobs(Protocol):
    """A store whose blobs are files on this machine (the embedded store): readers open them
    in place instead of asking for bytes."""

    def blob_path(self, entity: str, md5_hex: str) -> Path:
        """The blob's file on this machine (zero-copy reads)."""
        ...


@runtime_checkable
class UrlBatching(Protocol):
    """A store that reads blobs through signed download URLs (the HTTP store) and can sign
    many in one request, so walking a cold directory costs no signing round trip per file."""

    #: blobs per signing request (callers hand prefetch_urls chunks of this many)
    URL_BATCH: int

    def url_known(self, entity: str, md5_hex: str) -> bool:
        """Whether an unexpired download URL for this blob is already at hand."""
        ...

    def prefetch_urls(self, entity: str, md5_hexes: Iterable[str]) -> None:
        """Sign the download URLs of these blobs in one request (kept for later reads)."""
        ...


@runtime_checkable
class UploadBatching(Protocol):
    """A store whose uploads are registered in batches (the HTTP store): a single-PUT upload
    is sent now and registered later with many others, in one request instead of one per blob."""

    def put_blob_deferred(self, entity: str, md5_hex: str, src: Path, size: int,
                          progress: Callable[[int], None] | None = None) -> dict[str, Any] | None:
        """Upload like put_blob; returns what :meth:`complete_blobs` needs to register the blob
        (None: already registered).  Nothing may reference the blob before that."""
        ...

    def complete_blobs(self, entity: str, pending: list[dict[str, Any]]) -> None:
        """Register uploads :meth:`put_blob_deferred` left pending (DigestMismatchError names
        the ones the store refused; they are to be uploaded again)."""
        ...
