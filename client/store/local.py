"""The embedded store: the registry core on a SQLite file plus a local blob directory.

No server, safe for several processes at once (SQLite WAL + BEGIN IMMEDIATE for writes,
blobs written to a temp file and renamed).  Layout of the store directory::

    <store>/
      registry.db        SQLite (WAL): entities, projects, collections, versions, aliases, runs
      blobs/<entity>/<md5[:2]>/<md5[2:]>   content, read-only, named by md5 hex
      blobs/.tmp/        uploads in progress
"""

from __future__ import annotations

import os

from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..blockmap import BlockHasher, BlockMap, wants_map
from ..errors import StoreUnavailableError
from ..names import TtlSentinel
from ..registry import LocalBlobBackend, RegistryCore
from .base import STREAM_CHUNK, CollectionRecord, CommitRequest, RunFileRecord, RunRecord, VersionRecord


class LocalStore:
    """Store protocol over an in-process RegistryCore (see client/store/base.py)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create the store directory {self.root}: {exc}") from exc
        self.location = str(self.root)
        self.blobs = LocalBlobBackend(self.root / "blobs")
        self.registry = RegistryCore(f"sqlite:///{self.root / 'registry.db'}", self.blobs)

    def __repr__(self) -> str:
        return f"LocalStore({self.location!r})"

    # namespace
    def list_entities(self) -> list[str]:
        return self.registry.list_entities()

    def list_projects(self, entity: str) -> list[str]:
        return self.registry.list_projects(entity)

    def list_collections(self, entity: str, project: str, type: str | None = None) -> list[CollectionRecord]:
        return self.registry.list_collections(entity, project, type)

    def get_collection(self, entity: str, project: str, collection: str) -> CollectionRecord:
        return self.registry.get_collection(entity, project, collection)

    def list_project(self, entity: str, project: str) -> tuple[list[CollectionRecord], list[VersionRecord]]:
        return self.registry.list_project(entity, project)

    def list_versions(self, entity: str, project: str, collection: str) -> list[VersionRecord]:
        return self.registry.list_versions(entity, project, collection)

    def list_types(self, entity: str, project: str) -> list[str]:
        return self.registry.list_types(entity, project)

    def update_collection(self, entity: str, project: str, collection: str, *, name: str | None = None,
                          description: str | None = None, tags: Iterable[str] | None = None,
                          type: str | None = None) -> CollectionRecord:
        return self.registry.update_collection(entity, project, collection, name=name, description=description,
                                               tags=tags, type=type)

    def delete_collection(self, entity: str, project: str, collection: str) -> None:
        self.registry.delete_collection(entity, project, collection)

    # versions
    def resolve(self, entity: str, project: str, collection: str, selector: str) -> VersionRecord:
        return self.registry.resolve(entity, project, collection, selector)

    def get_version(self, version_id: str) -> VersionRecord:
        return self.registry.get_version(version_id)

    def commit(self, request: CommitRequest) -> tuple[VersionRecord, bool]:
        return self.registry.commit(request)

    def update_version(self, version_id: str, *, aliases: Iterable[str] | None = None,
                       tags: Iterable[str] | None = None, metadata: dict[str, Any] | None = None,
                       description: str | None = None, ttl_seconds: float | None | str = TtlSentinel.KEEP) -> VersionRecord:
        return self.registry.update_version(version_id, aliases=aliases, tags=tags, metadata=metadata,
                                            description=description, ttl_seconds=ttl_seconds)

    def delete_version(self, version_id: str, delete_aliases: bool = False) -> None:
        self.registry.delete_version(version_id, delete_aliases)

    def link_version(self, version_id: str, entity: str, project: str, collection: str,
                     aliases: Iterable[str] = ()) -> VersionRecord:
        return self.registry.link_version(version_id, entity, project, collection, aliases)

    def unlink_version(self, version_id: str) -> None:
        self.registry.unlink_version(version_id)

    def set_entity_default_ttl(self, entity: str, ttl_seconds: float | None) -> None:
        self.registry.set_entity_default_ttl(entity, ttl_seconds)

    def gc_expired(self) -> list[VersionRecord]:
        return self.registry.gc_expired()

    def get_entity_default_ttl(self, entity: str) -> float | None:
        return self.registry.get_entity_default_ttl(entity)

    def create_project(self, entity: str, project: str) -> None:
        self.registry.create_project(entity, project)

    def delete_run(self, entity: str, project: str, run_id: str, delete_artifacts: bool = False) -> list[VersionRecord]:
        return self.registry.delete_run(entity, project, run_id, delete_artifacts)

    # runs
    def create_run(self, entity: str, project: str, run_id: str | None = None, *, name: str | None = None,
                   job_type: str | None = None, config: dict[str, Any] | None = None) -> RunRecord:
        return self.registry.create_run(entity, project, run_id, name=name, job_type=job_type, config=config)

    def get_run(self, entity: str, project: str, run_id: str) -> RunRecord:
        return self.registry.get_run(entity, project, run_id)

    def list_runs(self, entity: str, project: str) -> list[RunRecord]:
        return self.registry.list_runs(entity, project)

    def finish_run(self, entity: str, project: str, run_id: str, state: str = "finished") -> None:
        self.registry.finish_run(entity, project, run_id, state)

    def update_run(self, entity: str, project: str, run_id: str, *, summary: dict[str, Any] | None = None,
                   tags: Iterable[str] | None = None, config: dict[str, Any] | None = None,
                   name: str | None = None) -> RunRecord:
        return self.registry.update_run(entity, project, run_id, summary=summary, tags=tags, config=config, name=name)

    def put_run_file(self, entity: str, project: str, run_id: str, name: str, md5_hex: str, size: int) -> RunFileRecord:
        return self.registry.put_run_file(entity, project, run_id, name, md5_hex, size)

    def list_run_files(self, entity: str, project: str, run_id: str) -> list[RunFileRecord]:
        return self.registry.list_run_files(entity, project, run_id)

    def record_use(self, entity: str, project: str, run_id: str, version_id: str, use_as: str | None = None) -> None:
        self.registry.record_use(entity, project, run_id, version_id, use_as)

    def versions_logged_by(self, entity: str, project: str, run_id: str) -> list[VersionRecord]:
        return self.registry.versions_logged_by(entity, project, run_id)

    def versions_used_by(self, entity: str, project: str, run_id: str) -> list[VersionRecord]:
        return self.registry.versions_used_by(entity, project, run_id)

    def runs_using(self, version_id: str) -> list[RunRecord]:
        return self.registry.runs_using(version_id)

    # blobs
    def missing_blobs(self, entity: str, md5_hexes: Iterable[str]) -> set[str]:
        return self.registry.missing_blobs(entity, md5_hexes, check_files=True)  # a damaged blob is re-sent

    def put_blob(self, entity: str, md5_hex: str, src: Path, size: int,
                 progress: Callable[[int], None] | None = None) -> None:
        hasher = BlockHasher() if wants_map(size) else None
        written = self.blobs.put_file(entity, md5_hex, Path(src), hasher, progress)
        self.registry.register_blob(entity, md5_hex, written)
        if hasher is not None and wants_map(written):
            self.registry.register_blockmap(entity, md5_hex, hasher.result())

    def blockmaps(self, entity: str, md5_hexes: Iterable[str]) -> dict[str, BlockMap]:
        """Block maps of these blobs (client/blockmap.py); blobs without one are left out."""
        return self.registry.blockmaps(entity, md5_hexes)

    def read_blob(self, entity: str, md5_hex: str, start: int = 0, length: int | None = None,
                  progress: Callable[[int], None] | None = None) -> bytes:
        data = self.blobs.read(entity, md5_hex, start, length)
        if progress is not None:
            progress(len(data))
        return data

    def stream_blob(self, entity: str, md5_hex: str, start: int, length: int) -> Iterator[bytes]:
        """Bytes [start, start+length) in chunks of at most STREAM_CHUNK (see HttpStore)."""
        with self.blobs.open(entity, md5_hex) as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(STREAM_CHUNK, length))
                if not chunk:
                    return  # the caller checks that it got the whole range
                length -= len(chunk)
                yield chunk

    def download_blob(self, entity: str, md5_hex: str, dest: Path,
                      progress: Callable[[int], None] | None = None) -> None:
        self.blobs.copy_to(entity, md5_hex, Path(dest))
        if progress is not None:
            progress(os.path.getsize(dest))

    def blob_path(self, entity: str, md5_hex: str) -> Path:
        """Local stores can hand out the file itself (zero-copy reads for the mount)."""
        return self.blobs.path(entity, md5_hex)

    def close(self) -> None:
        self.registry.close()


