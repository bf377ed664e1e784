"""``Artifact``: the W&B Artifact surface over the Store protocol.

A draft artifact is a manifest being built on this machine: every ``add_*`` call hashes the
content right away (add_dir in a thread pool; hashlib releases the GIL) and, with the default
``policy="mutable"``, copies it into the content-addressed cache in the same pass, so later
edits of the source cannot corrupt what gets uploaded and the cache is warm for downloads.

Logging (``Run.log_artifact`` / ``save``) asks the store which blobs it lacks, uploads only
those, uploads the manifest (W&B v1 JSON) as one more blob and commits; the registry computes
the digest itself and turns a commit equal to ``latest`` into a no-op.  Because blobs are
content-addressed, re-logging an unchanged directory uploads nothing and a one-file change
uploads one file: incremental versions need no special protocol.

A logged artifact reads its manifest from the store lazily and downloads through the cache
(verified, atomic temp+rename writes, parallel, skipping files already present and valid).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlparse

from . import names, objects, references
from .names import TtlSentinel
from .errors import (ArtifactFinalizedError, ArtifactFSError, ArtifactNotLoggedError, InvalidPathError,
                     LocalPathError, NotFoundError)
from .hashing import b64_to_hex
from .api import ArtifactCollection, Paginator
from .api import PublicRun
from .manifest import Manifest
from .wandb_registries import LinkMixin
from .store.base import CommitRequest, Store, VersionRecord
from .transfer import (ArtifactManifestEntry, Hashed, artifact_entry_reference, default_root, download_entries,
                       get_cache, hash_into_staging, read_blob_cached, parse_file_uri, remove_extra_files, upload_entries, upload_manifest,
                       verify_tree)

__all__ = ["Artifact", "ArtifactFiles", "ArtifactManifestEntry", "ArtifactTTL"]

class ArtifactTTL(enum.Enum):
    """``Artifact.ttl = ArtifactTTL.INHERIT``: use the entity's default TTL (the default)."""

    INHERIT = "inherit"


class ArtifactFiles(Paginator[ArtifactManifestEntry]):
    """The files of a logged artifact, in path order, iterated in pages of ``per_page``."""


class Artifact(LinkMixin):
    """A versioned set of files (the W&B ``Artifact``): build a draft, log it, read it back."""

    def __init__(self, name: str, type: str, description: str | None = None,
                 metadata: dict[str, Any] | None = None, incremental: bool = False,
                 use_as: str | None = None) -> None:
        self._name = names.validate_collection(name)
        self._type = names.validate_type(type, name)
        self._description = description
        self._metadata: dict[str, Any] = dict(names.validate_metadata(metadata))
        self._incremental = bool(incremental)
        if use_as is not None:  # W&B 0.31 ignores it too (Artifact("a", "t", use_as="x").use_as is None)
            warnings.warn("Artifact(use_as=...) is deprecated and ignored; pass use_as to use_artifact",
                          DeprecationWarning, stacklevel=2)
        self._use_as: str | None = None
        self._manifest: Manifest | None = Manifest()
        self._aliases: list[str] = []
        self._tags: list[str] = []
        self._ttl: dt.timedelta | ArtifactTTL | None = ArtifactTTL.INHERIT
        self._ttl_changed = False
        self._finalized = False
        self._record: VersionRecord | None = None
        self._store: Store | None = None
        self._added_local: dict[str, str] = {}
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()
        self.bytes_uploaded = 0  #: bytes sent to the store by the last log (0 for a no-op)

    # -- construction from the store ------------------------------------------------------------
    @classmethod
    def _from_record(cls, store: Store, record: VersionRecord) -> Artifact:
        art = cls.__new__(cls)
        art.__init__(record.collection, record.type, record.description, record.metadata)  # type: ignore[misc]
        art._manifest = None  # loaded lazily
        art._attach(store, record)
        return art

    def _attach(self, store: Store, record: VersionRecord) -> None:
        self._store = store
        self._record = record
        self._name = record.collection
        self._type = record.type
        self._description = record.description
        self._metadata = dict(record.metadata)
        self._aliases = list(record.aliases)
        self._tags = list(record.tags)
        self._ttl = None if record.ttl_seconds is None else dt.timedelta(seconds=record.ttl_seconds)
        self._ttl_changed = False
        self._finalized = True

    def __repr__(self) -> str:
        return f"<Artifact {self.qualified_name if self._record else self._name + ' (draft)'}>"

    # -- guards ---------------------------------------------------------------------------------
    def _ensure_draft(self) -> None:
        if self._finalized:
            raise ArtifactFinalizedError(
                f"artifact {self.name!r} is finalized and cannot be changed; call new_draft() to make a new version")

    def _ensure_logged(self, what: str) -> VersionRecord:
        if self._record is None:
            raise ArtifactNotLoggedError(
                f"{what} needs a logged artifact; log {self._name!r} first (run.log_artifact or artifact.save())")
        return self._record

    # -- attributes ------------------------------------------------------------------------------
    @property
    def id(self) -> str | None:
        return self._record.id if self._record else None

    @property
    def name(self) -> str:
        """``collection:vN`` once logged; just the collection name for a draft."""
        return f"{self._record.collection}:{self._record.version}" if self._record else self._name

    @property
    def qualified_name(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}"

    @property
    def version(self) -> str:
        return self._ensure_logged("version").version

    @property
    def entity(self) -> str:
        return self._ensure_logged("entity").entity

    @property
    def project(self) -> str:
        return self._ensure_logged("project").project

    @property
    def collection(self) -> ArtifactCollection:
        rec = self._ensure_logged("collection")
        return ArtifactCollection._load(self._store, rec.entity, rec.project, rec.collection)  # type: ignore[arg-type]

    @property
    def type(self) -> str:
        return self._type

    @property
    def state(self) -> str:
        """"PENDING" for a draft, else the registry's "COMMITTED" or "DELETED"."""
        return self._record.state if self._record else "PENDING"

    @property
    def created_at(self) -> dt.datetime:
        return self._ensure_logged("created_at").created_at

    @property
    def updated_at(self) -> dt.datetime:
        return self._ensure_logged("updated_at").updated_at

    @property
    def commit_hash(self) -> str:
        """md5 hex of the committed manifest blob: names exactly what was committed."""
        return self._ensure_logged("commit_hash").manifest_md5

    @property
    def url(self) -> str:
        rec = self._ensure_logged("url")
        base = self._store.location if self._store else ""
        if not base.startswith(("http://", "https://")):
            base = Path(base).as_uri()
        return f"{base.rstrip('/')}/{rec.entity}/{rec.project}/artifacts/{rec.type}/{rec.collection}/{rec.version}"

    @property
    def description(self) -> str | None:
        return self._description

    @description.setter
    def description(self, value: str | None) -> None:
        self._description = value

    @property
    def metadata(self) -> dict[str, Any]:
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, Any]) -> None:
        self._metadata = dict(names.validate_metadata(value))

    @property
    def aliases(self) -> list[str]:
        """Mutable list; ``save()`` persists edits.  ArtifactNotLoggedError on a draft, as in
        W&B: give a draft's aliases to ``log_artifact(art, aliases=...)``."""
        self._ensure_logged("Artifact.aliases")
        return self._aliases

    @aliases.setter
    def aliases(self, value: list[str]) -> None:
        self._ensure_logged("Artifact.aliases")
        self._aliases = [a if a == "latest" else names.validate_alias(a) for a in value]

    @property
    def tags(self) -> list[str]:
        """ArtifactNotLoggedError on a draft, as in W&B (pass ``tags=`` to log_artifact)."""
        self._ensure_logged("Artifact.tags")
        return self._tags

    @tags.setter
    def tags(self, value: list[str]) -> None:
        self._ensure_logged("Artifact.tags")
        self._tags = [names.validate_tag(t) for t in value]

    @property
    def ttl(self) -> dt.timedelta | None:
        """How long the version lives after it was created; None: forever.

        By default a version inherits its entity's default TTL when it is logged, so a draft
        (or a version whose TTL was set back to ``ArtifactTTL.INHERIT`` and not yet saved) has
        no TTL to show yet: ArtifactNotLoggedError, as in W&B.
        """
        if self._ttl is ArtifactTTL.INHERIT:
            raise ArtifactNotLoggedError("this artifact's TTL is inherited from its entity's default and is known "
                                         "once it is logged (or saved); log it first")
        return self._ttl

    @ttl.setter
    def ttl(self, value: dt.timedelta | ArtifactTTL | None) -> None:
        if value is not None and value is not ArtifactTTL.INHERIT and (
                not isinstance(value, dt.timedelta) or value.total_seconds() <= 0):
            raise ValueError("ttl must be a positive datetime.timedelta, None (never expire) or ArtifactTTL.INHERIT")
        self._ttl = value
        self._ttl_changed = True

    def _ttl_for_store(self) -> float | str | None:
        if self._ttl is ArtifactTTL.INHERIT:
            return TtlSentinel.INHERIT
        return None if self._ttl is None else self._ttl.total_seconds()

    @property
    def use_as(self) -> str | None:
        """Deprecated (as in W&B): the ``use_as`` given to ``use_artifact``, else None."""
        warnings.warn("Artifact.use_as is deprecated", DeprecationWarning, stacklevel=2)
        return self._use_as

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            rec = self._ensure_logged("manifest")
            assert self._store is not None
            raw = read_blob_cached(self._store, self._blob_entity, rec.manifest_md5)
            loaded = Manifest.from_bytes(raw)
            self._manifest = Manifest([ArtifactManifestEntry.wrap(e, self) for e in loaded.entries.values()],
                                      loaded.storage_policy, loaded.storage_policy_config)
        return self._manifest

    @property
    def digest(self) -> str:
        return self._record.digest if self._record else self.manifest.digest()

    @property
    def size(self) -> int:
        return self._record.size if self._record else self.manifest.size

    @property
    def file_count(self) -> int:
        return self._record.file_count if self._record else len(self.manifest)

    def is_draft(self) -> bool:
        return self._record is None

    def finalize(self) -> None:
        """Forbid further changes (logging does this)."""
        self._finalized = True

    # -- adding content ------------------------------------------------------------------------------
    def _staging_dir(self) -> Path:
        if self._staging is None:
            self._staging = tempfile.TemporaryDirectory(prefix="artifactfs-staging-")
        return Path(self._staging.name)

    @staticmethod
    def _check_policy(policy: str | None) -> str:
        checked = policy or "mutable"
        if checked not in ("mutable", "immutable"):
            raise ValueError(f"policy must be 'mutable' or 'immutable', got {checked!r}")
        return checked

    def _put_entry(self, name: str, h: Hashed, overwrite: bool, ref: str | None = None,
                   extra: dict[str, Any] | None = None) -> ArtifactManifestEntry:
        manifest = self.manifest
        old = manifest.entries.get(name)
        if old is not None and not overwrite:
            if old.digest == h.digest and old.ref == ref:
                return old  # type: ignore[return-value]
            raise ValueError(f"a file named {name!r} is already in the artifact; pass overwrite=True to replace it")
        entry = ArtifactManifestEntry(path=name, digest=h.digest, size=h.size, ref=ref, extra=extra or {},
                                      local_path=h.local_path)
        entry._artifact = self
        entry._cache_after_upload = h.cache_after_upload
        manifest.add(entry)
        if h.source is not None:
            self._added_local[h.source] = name
        return entry

    def add_file(self, local_path: str | os.PathLike[str], name: str | None = None, is_tmp: bool | None = False,
                 skip_cache: bool | None = False, policy: Literal["mutable", "immutable"] | None = "mutable",
                 overwrite: bool = False) -> ArtifactManifestEntry:
        """Add one local file (named by its basename unless ``name`` is given).

        ``policy="mutable"`` copies the file (into the cache, or a private staging dir with
        ``skip_cache``) while hashing it, so later edits of the original cannot change what is
        uploaded; ``"immutable"`` trusts the caller not to touch it (no copy).
        """
        self._ensure_draft()
        mode = self._check_policy(policy)
        src = Path(local_path)
        if not src.is_file():
            raise LocalPathError(f"Path is not a file: {str(src)!r}")
        entry_name = names.entry_path_from_local(str(name) if name is not None else src.name)
        h = hash_into_staging(src, mode, bool(skip_cache), self._staging_dir)
        if is_tmp:
            head, _, base = entry_name.rpartition("/")
            parts = base.split(".")
            parts[0] = b64_to_hex(h.digest)[:20]
            entry_name = (head + "/" if head else "") + ".".join(parts)
        with self._lock:
            return self._put_entry(entry_name, h, overwrite)

    def add_dir(self, local_path: str | os.PathLike[str], name: str | None = None, skip_cache: bool | None = False,
                policy: Literal["mutable", "immutable"] | None = "mutable", merge: bool = False) -> None:
        """Add every file under ``local_path`` (below ``name`` if given), hashing in parallel.

        An existing entry with different content is an error unless ``merge=True`` (then the
        directory's version wins).
        """
        self._ensure_draft()
        mode = self._check_policy(policy)
        root = Path(local_path)
        if not root.is_dir():
            raise LocalPathError(f"Path is not a directory: {str(root)!r}")
        prefix = names.entry_path_from_local(str(name)).rstrip("/") + "/" if name else ""
        jobs = [(Path(full), names.entry_path_from_local(prefix + rel)) for full, rel in names.local_tree(root)]
        staging = self._staging_dir
        workers = min(32, (os.cpu_count() or 4) * 2)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="artifactfs-hash") as pool:
            hashed = list(pool.map(lambda j: hash_into_staging(j[0], mode, bool(skip_cache), staging), jobs))
        with self._lock:
            for (_, entry_name), h in zip(jobs, hashed):
                self._put_entry(entry_name, h, overwrite=merge)

    @contextlib.contextmanager
    def new_file(self, name: str, mode: str = "x", encoding: str | None = None) -> Iterator[IO[Any]]:
        """Open a new file that is added to the artifact when the block exits."""
        self._ensure_draft()
        entry_name = names.entry_path_from_local(name)
        overwrite = "x" not in mode
        if not overwrite and entry_name in self.manifest:
            raise ValueError(f"a file named {name!r} is already in the artifact; open it with mode 'w' to replace it")
        path = self._staging_dir() / "new_file" / entry_name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, mode, encoding=encoding) as f:
                yield f
        except FileExistsError:
            raise ValueError(f"file {name!r} was already created with new_file(); use mode 'w' to replace it") from None
        self.add_file(path, name=entry_name, policy="immutable", skip_cache=True, overwrite=overwrite)

    def add_reference(self, uri: ArtifactManifestEntry | str, name: str | None = None, checksum: bool = True,
                      max_objects: int | None = None) -> Sequence[ArtifactManifestEntry]:
        """Track content that stays where it is (file, http(s), s3, gs; other schemes by URI).

        Digests and sizes come from the source (client.references has the per-scheme rules);
        nothing is uploaded.  A directory or prefix becomes one entry per object.
        """
        self._ensure_draft()
        if isinstance(uri, ArtifactManifestEntry):
            e = artifact_entry_reference(uri, name)
            with self._lock:
                return [self._put_entry(e.path, Hashed(e.digest, e.size, None, None, False), overwrite=True,
                                        ref=e.ref, extra=e.extra)]
        if not isinstance(uri, str) or not urlparse(uri).scheme:
            raise InvalidPathError(f"references must be URIs, got {uri!r}; to reference a local file, use file://")
        if (target := parse_file_uri(uri)) is not None and not target.exists():
            raise InvalidPathError(f"reference {uri}: no such file or directory {target}")
        out = []
        for e in references.iter_entries_for_reference(uri, name, checksum, max_objects):
            h = Hashed(e.digest, e.size, None, None, False)
            with self._lock:
                out.append(self._put_entry(names.validate_new_entry_path(e.path), h, overwrite=True, ref=e.ref,
                                           extra=e.extra))
        return out

    def remove(self, item: str | os.PathLike[str] | ArtifactManifestEntry) -> None:
        """Remove a file, or every file under a directory prefix; FileNotFoundError if none."""
        self._ensure_draft()
        path = item.path if isinstance(item, ArtifactManifestEntry) else str(item)
        path = path.strip("/")
        with self._lock:
            manifest = self.manifest
            if path in manifest.entries:
                manifest.remove(path)
                return
            prefix = path + "/"
            doomed = [p for p in manifest.entries if p.startswith(prefix)]
            if not doomed:
                raise FileNotFoundError(f"{path!r} is not a file or directory of artifact {self.name!r}")
            for p in doomed:
                manifest.remove(p)

    def add(self, obj: Any, name: str, overwrite: bool = False) -> ArtifactManifestEntry:
        """Add a W&B object (Table, Classes: see client.objects) as ``<name>.<kind>.json``."""
        self._ensure_draft()
        entry_name, data = objects.serialize(obj, name)
        path = Path(tempfile.mkdtemp(dir=self._staging_dir(), prefix="object-")) / entry_name
        path.parent.mkdir(parents=True, exist_ok=True)  # a fresh dir: never rewrites a staged entry
        path.write_bytes(data)
        return self.add_file(path, name=entry_name, policy="immutable", skip_cache=True, overwrite=overwrite)

    def __setitem__(self, name: str, item: Any) -> ArtifactManifestEntry:
        return self.add(item, name)

    def get(self, name: str) -> Any:
        """The object stored by ``add(obj, name)``, or None if there is none."""
        self._ensure_logged("get")
        for candidate in objects.candidate_entry_names(str(name)):
            entry = self.manifest.entries.get(candidate)
            if entry is not None and entry.ref is None:
                assert self._store is not None
                return objects.deserialize(candidate, self._store.read_blob(self._blob_entity,
                                                                            b64_to_hex(entry.digest)))
        return None

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    # -- reading entries -----------------------------------------------------------------------------
    def get_entry(self, name: str | os.PathLike[str]) -> ArtifactManifestEntry:
        self._ensure_logged("get_entry")
        key = str(name).strip("/")
        try:
            return self.manifest.entries[key]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(f"artifact {self.name!r} has no entry named {key!r}") from None

    def get_path(self, name: str | os.PathLike[str]) -> ArtifactManifestEntry:
        """Deprecated alias of :meth:`get_entry`."""
        warnings.warn("Artifact.get_path is deprecated; use get_entry", DeprecationWarning, stacklevel=2)
        return self.get_entry(name)

    def get_added_local_path_name(self, local_path: str | os.PathLike[str]) -> str | None:
        """The entry name a local file was added under, or None."""
        return self._added_local.get(os.path.abspath(local_path))

    def files(self, names: list[str] | None = None, per_page: int = 50) -> ArtifactFiles:
        self._ensure_logged("files")
        entries = list(self.manifest)
        if names is not None:
            wanted = set(names)
            entries = [e for e in entries if e.path in wanted]
        return ArtifactFiles(lambda: entries, per_page)  # type: ignore[arg-type,return-value]

    # -- downloading ----------------------------------------------------------------------------------
    def download(self, root: str | os.PathLike[str] | None = None, allow_missing_references: bool = False,
                 skip_cache: bool | None = None, path_prefix: str | os.PathLike[str] | None = None) -> str:
        """Materialise the files under ``root`` (default ``./artifacts/<name>``); returns root.

        Files already present with the right md5 are left alone; others are written atomically.
        """
        self._ensure_logged("download")
        dest = Path(root).absolute() if root is not None else default_root(self.name)
        prefix = str(path_prefix).lstrip("/") if path_prefix else ""
        entries = [e for e in self.manifest if e.path.startswith(prefix)]
        assert self._store is not None
        download_entries(self._store, self._blob_entity, entries, dest, skip_cache=bool(skip_cache),
                         allow_missing_references=allow_missing_references)
        return str(dest)

    def file(self, root: str | os.PathLike[str] | None = None) -> str:
        """Download a single-file artifact; ValueError if it holds more than one file."""
        self._ensure_logged("file")
        if len(self.manifest) != 1:
            raise ValueError(f"artifact {self.name!r} holds {len(self.manifest)} files; file() needs exactly one "
                             "(use download())")
        (entry,) = list(self.manifest)
        return str(Path(self.download(root)) / entry.path)

    def checkout(self, root: str | os.PathLike[str] | None = None) -> str:
        """Make ``root`` hold exactly this artifact: extra files are DELETED, the rest downloaded."""
        self._ensure_logged("checkout")
        dest = Path(root) if root is not None else default_root(self.name)
        remove_extra_files(dest, set(self.manifest.entries))
        return self.download(dest)

    def verify(self, root: str | os.PathLike[str] | None = None) -> None:
        """Check that ``root`` holds exactly the artifact's files (references are not checked).

        ValueError names the first extra, missing or changed file.
        """
        self._ensure_logged("verify")
        dest = Path(root) if root is not None else Path(self.download())
        verify_tree(dest, self.manifest, self.name)

    # -- versions and lineage ---------------------------------------------------------------------------
    def new_draft(self) -> Artifact:
        """A draft holding this version's files, to change and log as the next version."""
        rec = self._ensure_logged("new_draft")
        draft = Artifact(rec.collection, rec.type, rec.description, dict(rec.metadata))
        for e in self.manifest:
            draft.manifest.add(ArtifactManifestEntry(path=e.path, digest=e.digest, size=e.size, ref=e.ref,
                                                     extra=dict(e.extra),
                                                     birth_artifact_id=e.birth_artifact_id or rec.id))
        return draft

    def delete(self, delete_aliases: bool = False) -> None:
        """Delete this version (ConflictError while it has aliases, unless ``delete_aliases``)."""
        rec = self._ensure_logged("delete")
        assert self._store is not None
        self._store.delete_version(rec.id, delete_aliases)
        self._record = self._store.get_version(rec.id)

    def logged_by(self) -> PublicRun | None:
        rec = self._ensure_logged("logged_by")
        if not rec.logged_by_run:
            return None
        entity, project, run_id = rec.logged_by_run.split("/")
        assert self._store is not None
        return PublicRun._from_record(self._store, self._store.get_run(entity, project, run_id))

    def used_by(self) -> list[PublicRun]:
        rec = self._ensure_logged("used_by")
        assert self._store is not None
        return [PublicRun._from_record(self._store, r) for r in self._store.runs_using(rec.id)]

    def json_encode(self) -> dict[str, Any]:
        """The W&B ``artifactVersion`` JSON form (what W&B stores in run config/summaries)."""
        rec = self._ensure_logged("json_encode")
        return {"_type": "artifactVersion", "_version": "v0", "id": rec.id, "version": rec.version,
                "sequenceName": rec.collection, "usedAs": self._use_as, "entity": rec.entity,
                "project": rec.project, "type": rec.type, "digest": rec.digest,
                "qualifiedName": self.qualified_name}

    def wait(self, timeout: int | None = None) -> Artifact:
        """Logging is synchronous here, so a logged artifact is always ready."""
        self._ensure_logged("wait")
        return self

    # -- persisting ---------------------------------------------------------------------------------------
    def save(self, project: str | None = None, settings: dict[str, Any] | None = None) -> None:
        """Log a draft (through the current run, or an auto run of job type "auto"), or persist
        edited aliases, tags, metadata, description and ttl of a logged version."""
        if self._record is None:
            from . import live_run as run_mod

            current = run_mod.current_run()
            if current is not None:
                current.log_artifact(self)
                return
            opts = dict(settings) if isinstance(settings, dict) else {}  # a wandb.Settings carries nothing for us
            with run_mod.init(project=project or opts.pop("project", None), job_type="auto", reinit="create_new",
                              **opts) as auto:
                auto.log_artifact(self)
            return
        assert self._store is not None
        rec = self._store.update_version(self._record.id, aliases=[a for a in self._aliases if a != "latest"],
                                         tags=self._tags, metadata=self._metadata, description=self._description,
                                         ttl_seconds=self._ttl_for_store() if self._ttl_changed else TtlSentinel.KEEP)
        self._attach(self._store, rec)

    def _log(self, store: Store, entity: str, project: str, run_id: str | None,
             aliases: Sequence[str] | None = None, tags: Sequence[str] | None = None) -> Artifact:
        """Upload what the store lacks, upload the manifest, commit.  Used by Run.log_artifact."""
        alias_list = list(dict.fromkeys([*(self._aliases if self._record is None else []), *(aliases or [])]))
        alias_list = [a if a == "latest" else names.validate_alias(a) for a in alias_list]
        tag_list = [names.validate_tag(t) for t in dict.fromkeys([*self._tags, *(tags or [])])]
        self._metadata = names.validate_metadata(self._metadata)  # a caller may have edited it in place
        if self._record is not None:  # re-logging a logged version: a digest no-op adding aliases/tags
            if (self._record.entity, self._record.project) != (entity, project):
                raise ArtifactFSError(f"{self.qualified_name} belongs to {self._record.entity}/{self._record.project}; "
                                      f"it cannot be logged into {entity}/{project}")
            manifest_md5 = self._record.manifest_md5
            self.bytes_uploaded = 0
        else:
            self.finalize()
            try:
                manifest = self.manifest
                if self._incremental:
                    manifest = self._merge_with_latest(store, entity, project)
                self.bytes_uploaded = upload_entries(store, entity, list(manifest), get_cache())
                manifest_md5, sent = upload_manifest(store, entity, manifest)
                self.bytes_uploaded += sent
            except BaseException:
                self._finalized = False  # nothing was committed: the draft stays editable
                raise
        ttl = self._ttl_for_store()
        try:
            record, _created = store.commit(CommitRequest(
                entity=entity, project=project, collection=self._name, type=self._type, manifest_md5=manifest_md5,
                aliases=tuple(a for a in alias_list if a != "latest"), tags=tuple(tag_list),
                description=self._description, metadata=dict(self._metadata), ttl_seconds=ttl, run_id=run_id))
        except BaseException:
            if self._record is None:
                self._finalized = False
            raise
        if self._record is None and self._manifest is not None:
            for e in self._manifest.entries.values():
                if isinstance(e, ArtifactManifestEntry):
                    e._artifact = self
        self._attach(store, record)
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None
        return self

    def _merge_with_latest(self, store: Store, entity: str, project: str) -> Manifest:
        """``Artifact(incremental=True)``: this draft's entries laid over the latest version's."""
        try:
            latest = store.resolve(entity, project, self._name, "latest")
        except NotFoundError:
            return self.manifest
        base = Manifest.from_bytes(store.read_blob(entity, latest.manifest_md5))
        for e in self.manifest.entries.values():
            base.entries[e.path] = e
        self._manifest = Manifest([ArtifactManifestEntry.wrap(e, self) for e in base.entries.values()])
        return self._manifest

