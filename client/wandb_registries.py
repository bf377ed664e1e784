"""Portfolios, registries and links: where a version is *promoted* to, and where it came from.

A link puts a logged version into a *portfolio* collection as a new version of that portfolio
(its own ``vN`` and aliases) that shares the source's manifest and blobs; the registry core
(:meth:`client.registry.core.Registry.link_version`) keeps the rules.  A *registry* is a project
named ``wandb-registry-<name>`` inside an organization entity, so registry collections are
portfolios like any other and ``Api().artifact("org/wandb-registry-model/resnet:production")``
resolves through the ordinary name rules.

Why a module of its own: the target-path grammar, the organization default and the filterable
documents of ``Api.registries()`` are one topic, and :mod:`client.artifact` stays about drafts
and files.  :class:`LinkMixin` gives ``Artifact`` its ``link``/``unlink`` and the ``source_*``
attributes (the primary, sequence collection of a linked version).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import filters as flt
from . import names, settings
from .api import ArtifactCollection, Paginator
from .errors import InvalidNameError, NotFoundError

if TYPE_CHECKING:
    from .artifact import Artifact
    from .store.base import CollectionRecord, Store, VersionRecord

__all__ = ["REGISTRY_PREFIX", "LinkMixin", "Registries", "Registry", "RegistryCollections",
           "is_registry_project", "parse_link_target"]

REGISTRY_PREFIX = "wandb-registry-"


def is_registry_project(project: str) -> bool:
    return project.startswith(REGISTRY_PREFIX) and len(project) > len(REGISTRY_PREFIX)


def organization_for(entity: str | None = None) -> str:
    """The organization registries live in: ARTIFACTFS_ORGANIZATION, else ``entity`` (a user's
    own entity doubles as its organization on a single-tenant store), else the default entity."""
    return settings.default_organization() or entity or settings.default_entity()


def parse_link_target(target_path: str, entity: str, project: str) -> tuple[str, str, str]:
    """``target_path`` of ``Artifact.link`` -> (entity, project, portfolio).

    Forms (from the W&B reference): ``{portfolio}``, ``{project}/{portfolio}``,
    ``{entity}/{project}/{portfolio}``; a project named ``wandb-registry-<name>`` without an
    entity lives in the organization (:func:`organization_for`).  ``entity``/``project`` are the
    defaults, i.e. those of the artifact being linked.
    """
    if not isinstance(target_path, str) or not target_path.strip("/"):
        raise InvalidNameError("link needs a target path: 'portfolio', 'project/portfolio' or "
                               "'entity/project/portfolio' (registries: 'wandb-registry-<name>/<collection>')")
    parts = target_path.strip("/").split("/")
    if ":" in parts[-1]:
        raise InvalidNameError(f"link target {target_path!r} names a version; pass aliases=[...] instead of ':'")
    if len(parts) == 1:
        out = (entity, project, parts[0])
    elif len(parts) == 2:
        out = (organization_for(entity) if is_registry_project(parts[0]) else entity, parts[0], parts[1])
    elif len(parts) == 3:
        out = (parts[0], parts[1], parts[2])
    else:
        raise InvalidNameError(f"link target {target_path!r} has {len(parts)} parts; at most entity/project/portfolio")
    return names.validate_entity(out[0]), names.validate_project(out[1]), names.validate_collection(out[2])


class LinkMixin:
    """``link``/``unlink`` and the ``source_*`` attributes of :class:`client.artifact.Artifact`."""

    _record: VersionRecord | None
    _store: Store | None

    def _ensure_logged(self, what: str) -> VersionRecord:  # provided by Artifact
        raise NotImplementedError

    @property
    def _blob_entity(self) -> str:
        """Whose blob space holds the content: a link shares its source's blobs."""
        return self._ensure_logged("content").blob_entity

    @property
    def is_link(self) -> bool:
        """True for a member of a portfolio/registry collection (a linked version)."""
        return self._ensure_logged("is_link").source_entity is not None

    @property
    def source_entity(self) -> str:
        return self._ensure_logged("source_entity").blob_entity

    @property
    def source_project(self) -> str:
        rec = self._ensure_logged("source_project")
        return rec.source_project or rec.project

    @property
    def source_collection(self) -> ArtifactCollection:
        rec = self._ensure_logged("source_collection")
        assert self._store is not None
        return ArtifactCollection._load(self._store, self.source_entity, self.source_project,
                                        rec.source_collection or rec.collection)

    @property
    def source_version(self) -> str:
        rec = self._ensure_logged("source_version")
        return f"v{rec.source_index}" if rec.source_index is not None else rec.version

    @property
    def source_name(self) -> str:
        rec = self._ensure_logged("source_name")
        return f"{rec.source_collection or rec.collection}:{self.source_version}"

    @property
    def source_qualified_name(self) -> str:
        return f"{self.source_entity}/{self.source_project}/{self.source_name}"

    def link(self, target_path: str, aliases: list[str] | None = None) -> Artifact:
        """Link this version into a portfolio (see :func:`parse_link_target`); returns the link.

        Linking a link links its source; linking the same source again only adds ``aliases``.
        """
        from .artifact import Artifact

        rec = self._ensure_logged("link")
        assert self._store is not None
        entity, project, portfolio = parse_link_target(
            target_path, rec.source_entity or rec.entity, rec.source_project or rec.project)
        linked = self._store.link_version(rec.id, entity, project, portfolio, list(aliases or []))
        return Artifact._from_record(self._store, linked)

    def unlink(self) -> None:
        """Remove this link from its portfolio (the source version stays).

        ValueError when this artifact is not a link, as the W&B reference says.
        """
        rec = self._ensure_logged("unlink")
        if rec.source_entity is None:
            raise ValueError(f"{rec.qualified_name} is not linked into a portfolio (it is a source version); "
                             "call unlink() on the linked artifact, e.g. Api().artifact('org/wandb-registry-x/c:v0')")
        assert self._store is not None
        self._store.unlink_version(rec.id)
        self._record = self._store.get_version(rec.id)


# --------------------------------------------------------------------------- Api.registries()

def _version_doc(rec: VersionRecord) -> dict[str, Any]:
    return {"name": rec.collection, "version": rec.version, "type": rec.type,
            "alias": list(rec.aliases), "aliases": list(rec.aliases), "tag": list(rec.tags), "tags": list(rec.tags),
            "metadata": rec.metadata, "description": rec.description,
            "created_at": rec.created_at, "createdAt": rec.created_at,
            "updated_at": rec.updated_at, "updatedAt": rec.updated_at}


class _CollectionInfo:
    """A registry collection with its committed versions, for filtering both levels at once."""

    def __init__(self, store: Store, record: CollectionRecord) -> None:
        self.record = record
        self.versions = store.list_versions(record.entity, record.project, record.name)

    def doc(self) -> dict[str, Any]:
        r = self.record
        updated = max([r.created_at, *(v.updated_at for v in self.versions)])
        return {"name": r.name, "type": r.type, "description": r.description,
                "tag": list(r.tags), "tags": list(r.tags),
                "created_at": r.created_at, "createdAt": r.created_at, "updated_at": updated, "updatedAt": updated}


def _pick_versions(store: Store, infos: Iterable[_CollectionInfo], filter: dict[str, Any] | None) -> list[Artifact]:
    from .artifact import Artifact

    flt.validate_filter(filter)
    out = []
    for info in infos:
        for rec in reversed(info.versions):  # newest first, like ArtifactCollection.versions()
            if flt.matches(_version_doc(rec), filter):
                out.append(Artifact._from_record(store, rec))
    return out


class RegistryCollections(Paginator[ArtifactCollection]):
    """Collections of one or more registries; ``.versions(filter)`` narrows on to versions."""

    def __init__(self, store: Store, infos: Callable[[], list[_CollectionInfo]], per_page: int | None = 50) -> None:
        self._store = store
        self._infos = infos
        super().__init__(lambda: [ArtifactCollection(store, i.record) for i in infos()], per_page)

    def versions(self, filter: dict[str, Any] | None = None, per_page: int | None = 50) -> Paginator[Artifact]:
        return Paginator(lambda: _pick_versions(self._store, self._infos(), filter), per_page)


class Registry:
    """One registry: the project ``wandb-registry-<name>`` of an organization."""

    def __init__(self, store: Store, organization: str, full_name: str) -> None:
        self._store = store
        self.organization = organization
        self.entity = organization
        self.full_name = full_name
        self.name = full_name[len(REGISTRY_PREFIX):]
        self.description: str | None = None  #: the registry schema has no description column yet
        self._infos: list[_CollectionInfo] | None = None

    @property
    def path(self) -> str:
        return f"{self.organization}/{self.full_name}"

    def _collection_infos(self) -> list[_CollectionInfo]:
        if self._infos is None:
            try:
                records = self._store.list_collections(self.organization, self.full_name)
            except NotFoundError:
                records = []
            self._infos = [_CollectionInfo(self._store, r) for r in records]
        return self._infos

    @property
    def created_at(self) -> Any:
        """When its first collection appeared (registries come into being with their first link)."""
        return min((i.record.created_at for i in self._collection_infos()), default=None)

    @property
    def updated_at(self) -> Any:
        return max((i.doc()["updated_at"] for i in self._collection_infos()), default=None)

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "full_name": self.full_name, "description": self.description,
                "created_at": self.created_at, "createdAt": self.created_at,
                "updated_at": self.updated_at, "updatedAt": self.updated_at}

    def collections(self, filter: dict[str, Any] | None = None, per_page: int | None = 50) -> RegistryCollections:
        """Collections of this registry matching ``filter`` (name, tag, description, created_at, updated_at)."""
        return _collections_of(self._store, lambda: [self], filter, per_page)

    def versions(self, filter: dict[str, Any] | None = None, per_page: int | None = 50) -> Paginator[Artifact]:
        """Linked versions matching ``filter`` (tag, alias, created_at, updated_at, metadata)."""
        return Paginator(lambda: _pick_versions(self._store, self._collection_infos(), filter), per_page)

    def __repr__(self) -> str:
        return f"<Registry {self.path}>"


def _collections_of(store: Store, registries: Callable[[], list[Registry]], filter: dict[str, Any] | None,
                    per_page: int | None) -> RegistryCollections:
    flt.validate_filter(filter)

    def infos() -> list[_CollectionInfo]:
        return [i for reg in registries() for i in reg._collection_infos() if flt.matches(i.doc(), filter)]

    return RegistryCollections(store, infos, per_page)


class Registries(Paginator[Registry]):
    """The registries of an organization matching a filter; narrow on with collections/versions."""

    def __init__(self, store: Store, organization: str, filter: dict[str, Any] | None = None,
                 per_page: int | None = 50) -> None:
        flt.validate_filter(filter)
        self._store = store
        self.organization = organization

        def fetch() -> list[Registry]:
            try:
                projects = store.list_projects(organization)
            except NotFoundError:
                return []
            regs = [Registry(store, organization, p) for p in projects if is_registry_project(p)]
            return [r for r in regs if flt.matches(r.doc(), filter)]

        super().__init__(fetch, per_page)

    def collections(self, filter: dict[str, Any] | None = None, per_page: int | None = 50) -> RegistryCollections:
        return _collections_of(self._store, self._all, filter, per_page)

    def versions(self, filter: dict[str, Any] | None = None, per_page: int | None = 50) -> Paginator[Artifact]:
        return Paginator(lambda: _pick_versions(
            self._store, [i for r in self._all() for i in r._collection_infos()], filter), per_page)
