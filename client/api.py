"""``Api``: the W&B public API (read and manage what is in a store), over the Store protocol.

Name rules (from the W&B reference): an artifact is ``name:version`` or ``name:alias``,
optionally prefixed by ``project/`` or ``entity/project/``; the entity defaults to
``overrides["entity"]`` or the configured default entity, the project to
``overrides["project"]`` or "uncategorized".  ``overrides["base_url"]`` (or ``"store"``)
selects the store like ARTIFACTFS_STORE.

Collections returned by list methods are *paginated views*: iterating fetches pages of
``per_page`` items; ``len()`` and indexing work too.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar

from . import filters as flt
from . import names, settings
from .errors import InvalidNameError, LocalPathError, NotFoundError
from .store.base import CollectionRecord, RunFileRecord, RunRecord, Store
from .transfer import get_store

if TYPE_CHECKING:
    from .artifact import Artifact
    from .wandb_registries import Registries

__all__ = ["Api", "ArtifactCollection", "ArtifactType", "File", "Files", "Paginator", "Project", "PublicRun"]

T = TypeVar("T")


class Paginator(Sequence[T], Generic[T]):
    """A lazily fetched list, iterated in pages of ``per_page``."""

    def __init__(self, fetch: Callable[[], list[T]], per_page: int | None = 50) -> None:
        self._fetch = fetch
        self.per_page = max(1, per_page or 50)
        self._items: list[T] | None = None

    def _all(self) -> list[T]:
        if self._items is None:
            self._items = self._fetch()
        return self._items

    def pages(self) -> Iterator[list[T]]:
        items = self._all()
        for i in range(0, len(items), self.per_page):
            yield items[i:i + self.per_page]

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i):
        return self._all()[i]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self)}>"


class Artifacts(Paginator["Artifact"]):
    """Versions of one collection, newest first (W&B order)."""


class ArtifactCollections(Paginator["ArtifactCollection"]):
    pass


class ArtifactTypes(Paginator["ArtifactType"]):
    pass


class Projects(Paginator["Project"]):
    pass


class Runs(Paginator["PublicRun"]):
    pass


def _artifacts(store: Store, records: list[Any]) -> list[Artifact]:
    from .artifact import Artifact

    return [Artifact._from_record(store, r) for r in records]


class Summary(dict[str, Any]):
    """``run.summary``: a dict that tells its run when it changes, so the change is stored."""

    def __init__(self, on_change: Callable[[], None], values: dict[str, Any]) -> None:
        super().__init__(values)
        self._on_change = on_change

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._on_change()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._on_change()

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Merge values and store the summary (``summary.update()`` alone just stores it, the
        W&B way of saving a public run's summary)."""
        super().update(*args, **kwargs)
        self._on_change()


class PublicRun:
    """A run as the public API sees it (``Api().run(path)``), with its lineage.

    ``summary`` edits are stored at once (as W&B's public summary is); ``tags``, ``config`` and
    ``name`` are editable and ``update()`` stores them.
    """

    def __init__(self, store: Store, record: RunRecord) -> None:
        self._store = store
        self._set_record(record)

    def _set_record(self, record: RunRecord) -> None:
        self._record = record
        self._tags = list(record.tags)
        self._summary = Summary(self._summary_changed, record.summary)
        self._config: dict[str, Any] = dict(record.config)
        self._name = record.name

    @classmethod
    def _from_record(cls, store: Store, record: RunRecord) -> PublicRun:
        return cls(store, record)

    id = property(lambda self: self._record.id)
    entity = property(lambda self: self._record.entity)
    project = property(lambda self: self._record.project)
    job_type = property(lambda self: self._record.job_type)
    created_at = property(lambda self: self._record.created_at)
    path = property(lambda self: self._record.path)

    @property
    def name(self) -> str | None:
        """The display name (W&B's ``display_name``); the id is ``id``."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    display_name = name

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @property
    def summary(self) -> dict[str, Any]:
        """The last value of each key the run logged (``summary_metrics`` is the same dict)."""
        return self._summary

    summary_metrics = summary

    def _summary_changed(self) -> None:
        self._store.update_run(self.entity, self.project, self.id, summary=dict(self._summary))

    @property
    def tags(self) -> list[str]:
        return self._tags

    @tags.setter
    def tags(self, value: Sequence[str]) -> None:
        self._tags = list(value)

    def update(self) -> None:
        """Save changes to ``tags``, ``summary``, ``config`` and ``name`` (W&B's ``Run.update``)."""
        self._set_record(self._store.update_run(
            self.entity, self.project, self.id, summary=dict(self._summary), tags=self._tags,
            config=self._config, name=self._name))

    def save(self) -> None:
        """W&B's public ``Run.save()``: the same as ``update()``."""
        self.update()

    def load(self, force: bool = False) -> None:
        """Re-read the run from the store (local edits not yet saved are dropped)."""
        self._set_record(self._store.get_run(self.entity, self.project, self.id))

    @property
    def state(self) -> str:
        """Re-read from the store: another process may have finished the run."""
        return self._store.get_run(self.entity, self.project, self.id).state

    def wait_until_finished(self, timeout: float = 3600.0, poll: float = 1.0) -> None:
        """Wait until the run is no longer "running" (checked every ``poll`` seconds, at most
        ``timeout`` seconds: then DeadlineExceeded, a TimeoutError), then re-read it."""
        import time

        from .retry import DeadlineExceeded

        deadline = time.monotonic() + timeout
        while (record := self._store.get_run(self.entity, self.project, self.id)).state == "running":
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"run {self.path} is still running after {timeout:g} s")
            time.sleep(min(poll, left))
        self._set_record(record)

    # -- files -----------------------------------------------------------------------------
    def upload_file(self, path: str | os.PathLike[str], root: str = ".") -> File:
        """Save a local file with the run as ``relpath(path, root)`` (replacing one of that name)."""
        from .hashing import md5_file

        src = Path(path)
        if not src.is_file():
            raise LocalPathError(f"Path is not a file: {str(path)!r}")
        name = names.validate_entry_path(Path(os.path.relpath(src.resolve(), Path(root).resolve())).as_posix())
        md5_hex, size = md5_file(src), src.stat().st_size
        if md5_hex in self._store.missing_blobs(self.entity, [md5_hex]):
            self._store.put_blob(self.entity, md5_hex, src, size)
        return File(self, self._store.put_run_file(
            self.entity, self.project, self.id, name, md5_hex, size))

    def files(self, names: Sequence[str] | None = None, per_page: int = 50) -> Files:
        """The run's files, by name; only those in ``names`` when given (unknown names are left out)."""
        wanted = set(names or ())

        def fetch() -> list[File]:
            records = self._store.list_run_files(self.entity, self.project, self.id)
            return [File(self, r) for r in records if not wanted or r.name in wanted]

        return Files(fetch, per_page)

    def file(self, name: str) -> File:
        """The run's file ``name``; NotFoundError (W&B: an IndexError) when it has none."""
        found = list(self.files([name]))
        if not found:
            raise NotFoundError(f"run {self.path} has no file {name!r}")
        return found[0]

    # -- lineage ---------------------------------------------------------------------------
    def logged_artifacts(self, per_page: int = 100) -> Paginator[Artifact]:
        return Paginator(lambda: _artifacts(self._store, self._store.versions_logged_by(
            self.entity, self.project, self.id)), per_page)

    def used_artifacts(self, per_page: int = 100) -> Paginator[Artifact]:
        return Paginator(lambda: _artifacts(self._store, self._store.versions_used_by(
            self.entity, self.project, self.id)), per_page)

    def log_artifact(self, artifact: Artifact, aliases: Sequence[str] | None = None,
                     tags: Sequence[str] | None = None) -> Artifact:
        """Declare ``artifact`` an output of this run (a draft is logged)."""
        return artifact._log(self._store, self.entity, self.project, self.id, aliases, tags)

    def use_artifact(self, artifact: Artifact, use_as: str | None = None) -> Artifact:
        """Declare a logged ``artifact`` an input of this run."""
        rec = artifact._ensure_logged("use_artifact")
        self._store.record_use(self.entity, self.project, self.id, rec.id, use_as)
        return artifact

    def delete(self, delete_artifacts: bool = False) -> None:
        """Delete the run; with ``delete_artifacts`` also every version it logged (aliases and
        links included), otherwise those versions stay with no ``logged_by``."""
        self._store.delete_run(self.entity, self.project, self.id, delete_artifacts)

    def __repr__(self) -> str:
        return f"<Run {self.path} ({self._record.state})>"


class File:
    """A file saved with a run (W&B's public ``File``): ``name``, ``size``, ``md5`` (base64, as
    W&B shows it), ``updated_at``; ``download(root)`` writes ``root/name``."""

    def __init__(self, run: PublicRun, record: RunFileRecord) -> None:
        self.run = run
        self._record = record

    name = property(lambda self: self._record.name)
    size = property(lambda self: self._record.size)
    updated_at = property(lambda self: self._record.updated_at)

    @property
    def md5(self) -> str:
        from .hashing import hex_to_b64

        return hex_to_b64(self._record.md5)

    def download(self, root: str = ".", replace: bool = False, exist_ok: bool = False) -> IO[str]:
        """Write the file to ``root/name`` and return it opened for reading, as W&B does.  An
        existing file is a ValueError unless ``replace`` (overwrite) or ``exist_ok`` (keep it)."""
        from .transfer import _atomic_write, _stream_blob

        dest = Path(root) / names.validate_entry_path(self.name)  # never outside root, whatever a server sent
        if dest.exists() and not replace:
            if exist_ok:
                return open(dest)
            raise ValueError(f"File already exists: {dest}; pass replace=True to overwrite "
                             f"or exist_ok=True to leave it as is")
        r, store = self._record, self.run._store
        _atomic_write(dest, lambda out: _stream_blob(store, self.run.entity, r.md5, r.size, out), r.md5)
        return open(dest)

    def __repr__(self) -> str:
        return f"<File {self.name} ({self.size} bytes)>"


class Files(Paginator[File]):
    pass


class ArtifactCollection:
    """A named sequence of versions (``entity/project/name``) of one type."""

    def __init__(self, store: Store, record: CollectionRecord) -> None:
        self._store = store
        self._set_record(record)

    def _set_record(self, record: CollectionRecord) -> None:
        self._record = record  # as saved; the attributes below are the edits save() writes
        self._name, self._description, self._type = record.name, record.description, record.type
        self._tags = list(record.tags)

    @classmethod
    def _load(cls, store: Store, entity: str, project: str, name: str) -> ArtifactCollection:
        return cls(store, store.get_collection(entity, project, name))

    entity = property(lambda self: self._record.entity)
    project = property(lambda self: self._record.project)
    created_at = property(lambda self: self._record.created_at)

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def description(self) -> str | None:
        return self._description

    @description.setter
    def description(self, value: str | None) -> None:
        self._description = value

    @property
    def tags(self) -> list[str]:
        return self._tags

    @tags.setter
    def tags(self, value: Sequence[str]) -> None:
        self._tags = list(value)

    @property
    def type(self) -> str:
        return self._type

    @type.setter
    def type(self, value: str) -> None:
        if not self.is_sequence():
            raise InvalidNameError("Type can only be changed if the artifact collection is a sequence.")
        self._type = value

    def save(self) -> None:
        """Store the edited ``name``, ``description``, ``tags`` and ``type`` (W&B's save)."""
        r = self._record
        if self._type != r.type:
            try:
                names.validate_type(self._type)
            except ValueError as exc:
                raise InvalidNameError(f"Failed to save artifact collection {self._name!r}: {exc}") from exc
        self._set_record(self._store.update_collection(
            r.entity, r.project, r.name,
            name=self._name if self._name != r.name else None,
            description=(self._description or "") if self._description != r.description else None,
            tags=self._tags if set(self._tags) != set(r.tags) else None,
            type=self._type if self._type != r.type else None))

    def delete(self) -> None:
        """Delete the collection: all its versions and their aliases, and links into portfolios."""
        r = self._record
        self._store.delete_collection(r.entity, r.project, r.name)

    @property
    def aliases(self) -> list[str]:
        """Every alias held by some version of the collection."""
        return sorted(self._record.aliases)

    def is_sequence(self) -> bool:
        """False for a portfolio (its versions are links, e.g. a registry collection)."""
        r = self._record
        if r.project.startswith("wandb-registry-"):
            return False
        versions = self._store.list_versions(r.entity, r.project, r.name)
        return not any(v.source_entity is not None for v in versions)

    def versions(self, per_page: int = 50) -> Artifacts:
        r = self._record
        return Artifacts(lambda: _artifacts(self._store, list(reversed(
            self._store.list_versions(r.entity, r.project, r.name)))), per_page)

    artifacts = versions

    def __repr__(self) -> str:
        return f"<ArtifactCollection {self.entity}/{self.project}/{self.name} ({self.type})>"


class ArtifactType:
    """An artifact type within a project, and the collections of that type."""

    def __init__(self, store: Store, entity: str, project: str, name: str) -> None:
        self._store = store
        self.entity, self.project, self.name = entity, project, name

    def collections(self, per_page: int = 50) -> ArtifactCollections:
        return ArtifactCollections(lambda: [ArtifactCollection(self._store, c) for c in self._store.list_collections(
            self.entity, self.project, self.name)], per_page)

    def collection(self, name: str) -> ArtifactCollection:
        col = ArtifactCollection._load(self._store, self.entity, self.project, name)
        if col.type != self.name:
            raise NotFoundError(f"no {self.name!r} collection named {name!r} in {self.entity}/{self.project}")
        return col

    def __repr__(self) -> str:
        return f"<ArtifactType {self.name} in {self.entity}/{self.project}>"


class Project:
    def __init__(self, store: Store, entity: str, name: str) -> None:
        self._store = store
        self.entity, self.name = entity, name

    @property
    def path(self) -> list[str]:
        return [self.entity, self.name]

    def artifacts_types(self, per_page: int = 50) -> ArtifactTypes:
        return ArtifactTypes(lambda: [ArtifactType(self._store, self.entity, self.name, t)
                                      for t in self._store.list_types(self.entity, self.name)], per_page)

    def __repr__(self) -> str:
        return f"<Project {self.entity}/{self.name}>"


class Api:
    """Query and manage artifacts in a store (the W&B ``wandb.Api``)."""

    def __init__(self, overrides: dict[str, Any] | None = None, timeout: int | None = None,
                 api_key: str | None = None) -> None:
        self.settings: dict[str, Any] = dict(overrides or {})
        self.timeout = timeout
        location = self.settings.get("store") or self.settings.get("base_url")
        self._store = get_store(location, api_key=api_key)

    @property
    def default_entity(self) -> str:
        return self.settings.get("entity") or settings.default_entity()

    @property
    def default_project(self) -> str:
        return self.settings.get("project") or names_default_project()

    def flush(self) -> None:
        """Nothing is cached between calls; kept for W&B compatibility."""

    # -- name parsing ----------------------------------------------------------------------
    def _path(self, name: str, *, selector: bool) -> names.ArtifactPath:
        if not name or not isinstance(name, str):
            raise InvalidNameError("an artifact name is required, e.g. 'entity/project/dataset:latest'")
        path = names.parse_artifact_path(name, default_entity=lambda: self.default_entity,  # asked only if needed
                                         default_project=self.default_project)
        if not selector and path.selector:
            raise InvalidNameError(f"{name!r} names a version; give the collection name without ':'")
        if name.split(":", 1)[0].count("/") == 1 and path.project.startswith("wandb-registry-"):
            from .wandb_registries import organization_for  # a registry without an entity: the organization's

            path = dataclasses.replace(path, entity=self.settings.get("organization")
                                       or organization_for(self.default_entity))
        return path

    def _project_path(self, project: str | None) -> tuple[str, str]:
        if not project:
            return self.default_entity, self.default_project
        parts = project.split("/")
        if len(parts) == 1:
            return self.default_entity, names.validate_project(parts[0])
        if len(parts) == 2:
            return names.validate_entity(parts[0]), names.validate_project(parts[1])
        raise InvalidNameError(f"project path {project!r} must be 'project' or 'entity/project'")

    # -- artifacts -------------------------------------------------------------------------------
    def artifact(self, name: str, type: str | None = None) -> Artifact:
        """One version: ``[entity/][project/]name[:version|:alias]`` (``latest`` if none)."""
        from .artifact import Artifact

        path = self._path(name, selector=True)
        record = self._store.resolve(path.entity, path.project, path.collection, path.selector or "latest")
        if type is not None and record.type != type:
            raise InvalidNameError(f"artifact {path} has type {record.type!r}, but type {type!r} was requested")
        return Artifact._from_record(self._store, record)

    def artifact_exists(self, name: str, type: str | None = None) -> bool:
        try:
            self.artifact(name, type)
        except (NotFoundError, ValueError):
            return False
        return True

    def artifact_collection(self, type_name: str, name: str) -> ArtifactCollection:
        path = self._path(name, selector=False)
        col = ArtifactCollection._load(self._store, path.entity, path.project, path.collection)
        if col.type != type_name:
            raise NotFoundError(f"no {type_name!r} collection {path}: it has type {col.type!r}")
        return col

    def artifact_collection_exists(self, name: str, type: str) -> bool:
        try:
            self.artifact_collection(type, name)
        except (NotFoundError, ValueError):
            return False
        return True

    def artifact_collections(self, project_name: str, type_name: str, per_page: int | None = 50) -> ArtifactCollections:
        entity, project = self._project_path(project_name)
        return ArtifactCollections(lambda: [ArtifactCollection(self._store, c) for c in
                                            self._store.list_collections(entity, project, type_name)], per_page)

    def artifact_type(self, type_name: str, project: str | None = None) -> ArtifactType:
        entity, proj = self._project_path(project)
        if type_name not in self._store.list_types(entity, proj):
            raise NotFoundError(f"no artifacts of type {type_name!r} in {entity}/{proj}")
        return ArtifactType(self._store, entity, proj, type_name)

    def artifact_types(self, project: str | None = None) -> ArtifactTypes:
        entity, proj = self._project_path(project)
        return ArtifactTypes(lambda: [ArtifactType(self._store, entity, proj, t)
                                      for t in self._store.list_types(entity, proj)])

    def artifacts(self, type_name: str, name: str, per_page: int | None = 50,
                  tags: list[str] | None = None) -> Artifacts:
        """Versions of collection ``name`` (newest first), only those carrying all ``tags``."""
        col = self.artifact_collection(type_name, name)
        wanted = set(tags or [])
        return Artifacts(lambda: [a for a in col.versions() if wanted.issubset(a.tags)], per_page)

    def artifact_versions(self, type_name: str, name: str, per_page: int | None = 50) -> Artifacts:
        """Deprecated alias of :meth:`artifacts`."""
        warnings.warn("Api.artifact_versions is deprecated; use Api.artifacts", DeprecationWarning, stacklevel=2)
        return self.artifacts(type_name, name, per_page)

    # -- projects and runs ------------------------------------------------------------------------
    def project(self, name: str, entity: str | None = None) -> Project:
        entity = names.validate_entity(entity or self.default_entity)
        if names.validate_project(name) not in self._store.list_projects(entity):
            raise NotFoundError(f"project {entity}/{name} not found")
        return Project(self._store, entity, name)

    def projects(self, entity: str | None = None, per_page: int | None = 200) -> Projects:
        entity = names.validate_entity(entity or self.default_entity)

        def fetch() -> list[Project]:
            try:
                return [Project(self._store, entity, p) for p in self._store.list_projects(entity)]
            except NotFoundError:
                return []

        return Projects(fetch, per_page)

    def from_path(self, path: str) -> PublicRun | Artifact:
        """``Api.from_path``: a run for ``entity/project/runs/<id>``, an artifact for
        ``entity/project/artifacts/<type>/<name>:<version>`` or any ``[..]/name:version``."""
        parts = [p for p in path.strip("/").split("/") if p]
        if "runs" in parts:
            return self.run(path)
        if "artifacts" in parts:
            i = parts.index("artifacts")
            return self.artifact("/".join(parts[:i] + parts[i + 2:]), type=parts[i + 1] if len(parts) > i + 2 else None)
        if ":" in path:
            return self.artifact(path)
        raise InvalidNameError(f"cannot tell what {path!r} names: give entity/project/runs/<id> or "
                               "entity/project/artifacts/<type>/<name>:<version>")

    def run(self, path: str = "") -> PublicRun:
        """``entity/project/run_id``, ``project/run_id`` or ``run_id`` (defaults fill the rest)."""
        parts = [p for p in path.split("/") if p]
        if "runs" in parts:
            parts.remove("runs")  # W&B URLs: entity/project/runs/id
        if not parts or len(parts) > 3:
            raise InvalidNameError(f"run path {path!r} must be 'entity/project/run_id' (or shorter with defaults)")
        run_id = parts[-1]
        entity, project = self._project_path("/".join(parts[:-1]) or None)
        return PublicRun(self._store, self._store.get_run(entity, project, run_id))

    def runs(self, path: str | None = None, filters: dict[str, Any] | None = None, order: str = "+created_at",
             per_page: int = 50, include_sweeps: bool = True) -> Runs:
        """Runs of a project matching MongoDB-style ``filters`` (client.filters), sorted by
        ``order`` (``+field`` ascending, ``-field`` descending; default oldest first).

        Filterable fields: ``name`` (the run id), ``displayName``/``display_name``,
        ``jobType``/``job_type``, ``state``, ``createdAt``/``created_at``, ``config.*``.
        """
        entity, project = self._project_path(path)
        flt.validate_filter(filters)
        key = flt.sort_key(order)

        def doc(r: RunRecord) -> dict[str, Any]:
            return {"name": r.id, "id": r.id, "displayName": r.name, "display_name": r.name,
                    "jobType": r.job_type, "job_type": r.job_type, "state": r.state, "config": r.config,
                    "createdAt": r.created_at, "created_at": r.created_at, "entity": r.entity, "project": r.project,
                    "username": r.entity, "tags": list(r.tags), "summary_metrics": r.summary}

        def fetch() -> list[PublicRun]:
            docs = [(doc(r), r) for r in self._store.list_runs(entity, project)]
            picked = sorted((d for d in docs if flt.matches(d[0], filters)), key=lambda d: key(d[0]))
            return [PublicRun(self._store, r) for _, r in picked]

        return Runs(fetch, per_page)

    def create_run(self, *, run_id: str | None = None, project: str | None = None,
                   entity: str | None = None) -> PublicRun:
        """A new run (state "running") in ``entity/project`` (defaults apply); ``run_id`` is
        generated unless given.  Giving an existing id returns that run, as W&B's upsert does."""
        entity = names.validate_entity(entity or self.default_entity)
        project = names.validate_project(project or self.default_project)
        return PublicRun(self._store, self._store.create_run(entity, project, run_id))

    def create_project(self, name: str, entity: str) -> None:
        """Create ``entity/name`` (idempotent: an existing project is left as it is)."""
        self._store.create_project(names.validate_entity(entity), names.validate_project(name))

    def registries(self, organization: str | None = None, filter: dict[str, Any] | None = None) -> Registries:
        """Registries (``wandb-registry-*`` projects) of ``organization`` matching ``filter``;
        ``.collections(filter)`` and ``.versions(filter)`` narrow on (see client.wandb_registries)."""
        from .wandb_registries import Registries, organization_for

        org = organization or self.settings.get("organization")
        return Registries(self._store, names.validate_entity(org or organization_for(self.default_entity)), filter)


def names_default_project() -> str:
    return settings.default_project()
